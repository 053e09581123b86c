//! Everything twtrace prints.

pub mod metrics;
pub mod record;
pub mod stream;
pub mod summary;
