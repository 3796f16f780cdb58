//! The fault suite: crash points, full disks, cut connections, server-side faults, corrupt
//! bytes and fuzzed parsers, each class tallied into `target/faults/results.json`.
//!
//! `cargo test --test faults` runs the quick subset (what CI runs); `DBKEEPER_FAULTS=full` the
//! full counts the README's Reliability section publishes. `DBKEEPER_FAULT_SEED=N` replays a run.

#[path = "../it/common/mod.rs"]
mod common;

#[allow(dead_code)]
mod report;

mod corrupt;
mod crash;
mod disk;
mod fuzz;
mod network;
mod secrets;
mod server;
