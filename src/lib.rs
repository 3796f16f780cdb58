//! dbkeeper: waits for MongoDB, Redis and Chroma, preseeds empty volumes from the newest good
//! backup, takes scheduled, verified, rotated backups and answers health checks.
//!
//! # Layout
//! - `cli`: flags (clap) with their `DBKEEPER_*` environment twins.
//! - `config`: flags + environment → one validated `Config`.
//! - `secret`: the `Secret` type, `NAME_FILE` resolution, URL redaction.
//! - `error`, `exit`: the one error type and the exit-code table.
//! - `logging`, `shutdown`: tracing set-up; signals → cancellation.
//! - `migrate`: versioned schema migrations — files, per-database history and lock, Flyway's rules.
//! - `engine`: the engine contract and its MongoDB, Redis, Chroma, PostgreSQL and RabbitMQ
//!   implementations.
//! - `repo`: sets on disk — engine kinds and counts, manifest, atomic publish, lock,
//!   verification, retention. Below `engine`: a deep verify is given the engines' decoders.
//! - `role`: one module per verb (wait, health, backup, list, verify, restore/preseed, prune,
//!   init, test-restore, import/export of other tools' backups). Below `sidecar`.
//! - `schedule`: `DBKEEPER_SCHEDULE` (cron or interval) and the loop that fires it.
//! - `sidecar`: the resident role — schedule, jobs, health loop, HTTP API, metrics, webhooks —
//!   and its `stats` client; started by the entry point.
//!
//! Each arrow points one way (no module reaches back up): `entrypoints` → `sidecar` → `role`
//! → `config`, `migrate` → `engine` → `repo` → `secret`, `error`; `cli` and `schedule` sit
//! below `config`.

pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod exit;
pub mod logging;
pub mod migrate;
pub mod repo;
pub mod role;
pub mod schedule;
pub mod secret;
pub mod shutdown;
pub mod sidecar;
pub mod stats;

/// Entry points of parsers that are otherwise private, for the fault suite's fuzzing
/// (`tests/faults/fuzz.rs`). Not an API: nothing outside the tests may rely on it.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::engine::mongodb::bsonfile::{DocReader, validate as validate_bson};

    /// Parses `manifest.json` of set `id` as a set reader does (format and id checks included).
    pub fn manifest(id: &str, bytes: &[u8]) -> crate::Result<crate::repo::manifest::Manifest> {
        crate::repo::reader::parse(id, bytes)
    }
}

#[cfg(test)]
pub(crate) mod testutil;

pub use error::{Error, Result};
pub use exit::ExitCode;
