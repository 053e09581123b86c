//! One module per subcommand.

pub mod doctor;
pub mod ports;
pub mod record;
pub mod serve;
pub mod session;
pub mod summary;
pub mod top;
pub mod trace;
