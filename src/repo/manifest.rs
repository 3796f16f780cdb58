//! `manifest.json`: what a set holds, written last; a set without it does not exist.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::kind::{Counts, EngineKind};

/// The manifest's own format version; readers refuse a newer one instead of guessing. Plain
/// sets are still written as format 1 (the layout older releases read); encrypted sets are
/// format 2, which adds `encryption` and each file's `stored` name.
pub const FORMAT: u32 = 2;
/// The format plain sets are written in.
pub const FORMAT_PLAIN: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub tool: Tool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The application's schema version (migrations); `null` until migrations exist.
    pub schema_version: Option<String>,
    /// Each engine's schema version, and for a set taken just before migrating, the versions
    /// it was taken to migrate from and to. Absent in sets written before migrations existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Schema>,
    /// How the set is encrypted; absent for plain sets. See [`Encryption`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Set by `import`: the backup it was read from. Absent in sets dbkeeper took itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<Imported>,
    pub engines: BTreeMap<EngineKind, EngineEntry>,
}

/// Where an imported set came from: the source path as given (made absolute) and the
/// SHA-256 of its content (every file's relative path, size and bytes, in sorted order), so
/// `import --all` can tell a source it already imported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Imported {
    pub source: String,
    pub sha256: String,
}

/// An encrypted set keeps two manifests. `manifest.json` stays readable without any key and
/// holds only what listing, checksum verification and retention need: the set's id and
/// times, each engine's times and server version, and every stored file's opaque name, size
/// and SHA-256. Everything that can name the data (file paths with database and collection
/// names, record counts, the engines' details and sources) is in the full manifest, sealed
/// with age beside it as `manifest.json.age`; its stored files are named
/// `<engine>/<n>.zst.age`. In passphrase mode the set also holds `identity.age`, the set's own
/// age identity sealed with the passphrase (see `crypt`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encryption {
    /// Always `age`.
    pub scheme: String,
    /// Fingerprints of the recipients the set is sealed to (`x25519:<16 hex>`, `scrypt`, …).
    pub recipients: Vec<String>,
    /// The sealed full manifest.
    pub manifest: FileEntry,
    /// Passphrase mode: the set's identity, sealed with the passphrase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<FileEntry>,
}

/// The migration facts of a set (see [`Manifest::schema`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Schema {
    /// The newest applied migration (or baseline) of each engine that has a history.
    #[serde(default)]
    pub versions: BTreeMap<EngineKind, String>,
    /// Set only on a `pre-migration` set: per engine, the version before (`null`: none yet)
    /// and the version the migration run was going to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_migration: Option<BTreeMap<EngineKind, PreMigration>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreMigration {
    pub from: Option<String>,
    pub to: String,
}

impl Schema {
    /// The set-level `schema_version`: the one engine's version, or `engine=version` pairs.
    pub fn summary(&self) -> Option<String> {
        match self.versions.len() {
            0 => None,
            1 => self.versions.values().next().cloned(),
            _ => Some(
                self.versions
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        }
    }
}

pub const SEALED_MANIFEST: &str = "manifest.json.age";
pub const SET_IDENTITY: &str = "identity.age";

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
    /// The name the file is stored under when it differs from `path` (encrypted sets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<String>,
    /// Bytes on disk (compressed).
    pub size: u64,
    /// SHA-256 of the bytes on disk, so `sha256sum` can check a set without dbkeeper.
    pub sha256: String,
    /// Bytes after `zstd -d`.
    pub raw_size: u64,
}

impl FileEntry {
    /// Where the bytes are, relative to the set.
    pub fn stored_path(&self) -> &str {
        self.stored.as_deref().unwrap_or(&self.path)
    }
}

impl Manifest {
    pub fn stored_bytes(&self) -> u64 {
        self.engines
            .values()
            .map(EngineEntry::stored_bytes)
            .sum::<u64>()
            + self.encryption.as_ref().map_or(0, |e| {
                e.manifest.size + e.identity.as_ref().map_or(0, |i| i.size)
            })
    }

    /// Every stored file but `manifest.json`: the engines' artifacts, then the sealed
    /// manifest and identity of an encrypted set.
    pub fn stored_files(&self) -> Vec<&FileEntry> {
        let mut v: Vec<&FileEntry> = self.engines.values().flat_map(|e| &e.files).collect();
        if let Some(enc) = &self.encryption {
            v.push(&enc.manifest);
            v.extend(enc.identity.as_ref());
        }
        v
    }

    /// The manifest readable without a key, for a full manifest of an encrypted set: the
    /// stored names, sizes and checksums of its files, nothing that names the data.
    pub fn public(&self, encryption: Encryption) -> Manifest {
        let engines = self
            .engines
            .iter()
            .map(|(k, e)| {
                let files = e
                    .files
                    .iter()
                    .map(|f| FileEntry {
                        path: f.stored_path().to_owned(),
                        stored: None,
                        size: f.size,
                        sha256: f.sha256.clone(),
                        raw_size: f.raw_size,
                    })
                    .collect();
                let entry = EngineEntry {
                    source: String::new(),
                    server_version: e.server_version.clone(),
                    started_at: e.started_at,
                    finished_at: e.finished_at,
                    files,
                    counts: Counts::new(),
                    details: serde_json::Value::Null,
                };
                (*k, entry)
            })
            .collect();
        Manifest {
            format: FORMAT,
            id: self.id.clone(),
            tool: self.tool.clone(),
            started_at: self.started_at,
            finished_at: self.finished_at,
            schema_version: self.schema_version.clone(),
            schema: self.schema.clone(),
            encryption: Some(encryption),
            // A path and a hash: nothing that names the data, and `list` shows it.
            imported: self.imported.clone(),
            engines,
        }
    }
}
