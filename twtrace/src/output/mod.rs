//! Everything twtrace prints.

pub mod stream;
pub mod summary;
