//! The live top-style view: a pure model and a view that renders its
//! snapshots.

pub mod charts;
pub mod model;
pub mod trend;
pub mod view;
