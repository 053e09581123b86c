//! One module per subcommand.

pub mod session;
pub mod summary;
pub mod top;
pub mod trace;
