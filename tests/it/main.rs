//! Integration tests: the real binary against real servers started by `common`.

mod common;

mod chroma;
mod cli;
mod mongodb;
mod redis;
mod sidecar;
