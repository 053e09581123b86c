//! Everything twtrace prints.

pub mod record;
pub mod stream;
pub mod summary;
