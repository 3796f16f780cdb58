//! `manifest.json`: what a set holds, written last; a set without it does not exist.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::engine::{Counts, EngineKind};

/// The manifest's own format version; readers refuse a newer one instead of guessing.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub tool: Tool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The application's schema version (migrations); `null` until migrations exist.
    pub schema_version: Option<String>,
    pub engines: BTreeMap<EngineKind, EngineEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tool {
    pub name: String,
    pub version: String,
}

impl Tool {
    pub fn current() -> Self {
        Tool {
            name: "dbkeeper".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// One engine's part of a set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EngineEntry {
    /// The source, redacted.
    pub source: String,
    pub server_version: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub files: Vec<FileEntry>,
    /// Record counts as written: keys per Redis db, documents per namespace, records per
    /// Chroma collection.
    pub counts: Counts,
    /// Engine-specific facts a restore or an operator needs (e.g. RDB version, collection
    /// options). Free-form, but each engine documents its own keys.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl EngineEntry {
    pub fn total_records(&self) -> u64 {
        self.counts.values().sum()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// One stored file of a set. `path` is relative to the set directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    /// Bytes on disk (compressed).
    pub size: u64,
    /// SHA-256 of the bytes on disk, so `sha256sum` can check a set without dbkeeper.
    pub sha256: String,
    /// Bytes after `zstd -d`.
    pub raw_size: u64,
}

impl Manifest {
    pub fn stored_bytes(&self) -> u64 {
        self.engines.values().map(EngineEntry::stored_bytes).sum()
    }
}
