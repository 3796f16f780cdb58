//! Chroma engine (placeholder being replaced by its implementation).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub struct ChromaEngine {
    display: String,
}

impl ChromaEngine {
    pub fn new(url: &Secret, _opts: &EngineOptions) -> Result<Self> {
        Ok(ChromaEngine {
            display: redact_url(url.expose()),
        })
    }

    fn todo(&self) -> Error {
        Error::engine("chroma", "not implemented yet")
    }
}

pub fn verify_deep(
    _set: &SetReader,
    _entry: &EngineEntry,
    _cancel: &CancellationToken,
) -> Result<Counts> {
    Err(Error::engine("chroma", "deep verify not implemented yet"))
}

impl EngineOps for ChromaEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Chroma
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
