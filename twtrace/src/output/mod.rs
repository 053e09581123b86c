//! Everything twtrace prints.

pub mod stream;
