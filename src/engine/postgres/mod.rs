//! PostgreSQL engine (being built: every operation still refuses with a clear error).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub(crate) const ENGINE: &str = "postgres";

pub struct PostgresEngine {
    display: String,
}

impl PostgresEngine {
    pub fn new(url: &Secret, _opts: &EngineOptions) -> Result<Self> {
        Ok(PostgresEngine {
            display: redact_url(url.expose()),
        })
    }
}

fn not_built() -> Error {
    Error::engine(ENGINE, "not supported by this build yet")
}

/// Offline check of a set's PostgreSQL part.
pub fn verify_deep(
    _set: &SetReader,
    _entry: &EngineEntry,
    _cancel: &CancellationToken,
) -> Result<Counts> {
    Err(not_built())
}

impl EngineOps for PostgresEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }
    fn display_url(&self) -> &str {
        &self.display
    }
    async fn probe(&self, _timeout: Duration) -> Result<Probe> {
        Err(not_built())
    }
    async fn is_empty(&self) -> Result<Emptiness> {
        Err(not_built())
    }
    async fn dump(&self, _out: EngineWriter, _cancel: &CancellationToken) -> Result<EngineEntry> {
        Err(not_built())
    }
    async fn restore(
        &self,
        _set: &SetReader,
        _entry: &EngineEntry,
        _opts: &RestoreOptions,
        _cancel: &CancellationToken,
    ) -> Result<Counts> {
        Err(not_built())
    }
    async fn wipe(&self) -> Result<()> {
        Err(not_built())
    }
    async fn set_marker(&self, _on: bool) -> Result<()> {
        Err(not_built())
    }
}

/// Whether a PostgreSQL data directory may be preseeded.
pub fn data_dir_state(_dir: &std::path::Path) -> Result<Emptiness> {
    Err(not_built())
}

/// Unpacks a base backup into an empty PGDATA.
pub fn preseed_data_dir(
    _dir: &std::path::Path,
    _set: &SetReader,
    _entry: &EngineEntry,
) -> Result<()> {
    Err(not_built())
}
