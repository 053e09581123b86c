//! Everything twtrace prints.

pub mod metrics;
pub mod record;
pub mod sockets;
pub mod stream;
pub mod summary;

/// How a command prints: for people, or for programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}
