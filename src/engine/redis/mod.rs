//! Redis engine (placeholder being replaced by its implementation).

pub mod rdb;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub struct RedisEngine {
    display: String,
}

impl RedisEngine {
    pub fn new(url: &Secret, _opts: &EngineOptions) -> Result<Self> {
        Ok(RedisEngine {
            display: redact_url(url.expose()),
        })
    }

    fn todo(&self) -> Error {
        Error::engine("redis", "not implemented yet")
    }
}

pub fn verify_deep(
    _set: &SetReader,
    _entry: &EngineEntry,
    _cancel: &CancellationToken,
) -> Result<Counts> {
    Err(Error::engine("redis", "deep verify not implemented yet"))
}

/// One PING on the calling thread (the `dbkeeper-health` path: no runtime).
pub fn probe_blocking(_url: &Secret, _timeout: Duration) -> Result<Probe> {
    Err(Error::engine("redis", "not implemented yet"))
}

/// Whether a Redis data directory (server not running) holds an RDB or AOF.
pub fn data_dir_state(_dir: &std::path::Path) -> Result<Emptiness> {
    Err(Error::engine("redis", "not implemented yet"))
}

/// Writes the set's RDB into an empty data directory so the server loads it on start.
pub fn preseed_data_dir(
    _dir: &std::path::Path,
    _set: &SetReader,
    _entry: &EngineEntry,
) -> Result<()> {
    Err(Error::engine("redis", "not implemented yet"))
}

impl EngineOps for RedisEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Redis
    }
    fn display_url(&self) -> &str {
        &self.display
    }
    async fn probe(&self, _timeout: Duration) -> Result<Probe> {
        Err(self.todo())
    }
    async fn is_empty(&self) -> Result<Emptiness> {
        Err(self.todo())
    }
    async fn dump(&self, _out: EngineWriter, _cancel: &CancellationToken) -> Result<EngineEntry> {
        Err(self.todo())
    }
    async fn restore(
        &self,
        _set: &SetReader,
        _entry: &EngineEntry,
        _opts: &RestoreOptions,
        _cancel: &CancellationToken,
    ) -> Result<Counts> {
        Err(self.todo())
    }
    async fn wipe(&self) -> Result<()> {
        Err(self.todo())
    }
    async fn set_marker(&self, _on: bool) -> Result<()> {
        Err(self.todo())
    }
}
