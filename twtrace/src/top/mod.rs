//! The live top-style view: a pure model and a view that renders its
//! snapshots.

pub mod model;
pub mod view;
