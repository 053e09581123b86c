//! twtrace: who closes TCP connections first, and how long sockets sit in
//! each teardown state.
//!
//! The library holds everything but argument handling, so the CLI, the
//! kernel tests and the benchmarks share one loader and one decoder.

pub mod btf;
pub mod census;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod doctor;
pub mod ends;
pub mod event;
pub mod grouping;
pub mod histogram;
pub mod loader;
pub mod model;
pub mod netns;
pub mod output;
pub mod ports;
pub mod session;
pub mod snapshot;
pub mod sockdiag;
pub mod sys;
pub mod threshold;
pub mod top;
pub mod tracefs;
pub mod units;
