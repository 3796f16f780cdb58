//! Integration tests: the real binary against real servers started by `common`.

mod common;

mod chroma;
mod cli;
mod encryption;
mod install;
mod mongodb;
mod redis;
mod remote;
mod s3store;
mod sidecar;
