//! The backup repository on disk: set naming, listing, locking, verification and the
//! "newest good set" rule. A local directory today; the interface is what object storage
//! would implement tomorrow.

pub mod lock;
pub mod manifest;
pub mod reader;
pub mod retention;
pub mod writer;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::engine::EngineKind;
use crate::error::{Error, Result};
pub use lock::RepoLock;
use manifest::Manifest;
use reader::SetReader;
use writer::SetWriter;

pub const MANIFEST: &str = "manifest.json";
pub const TMP_PREFIX: &str = ".tmp-";
/// Set names: UTC time of the start, as the seed runbook names them.
pub const SET_NAME_FORMAT: &str = "%Y-%m-%d_%H-%M-%S";

/// Parses a set directory name into its time. Anything else in the repository is not a set.
pub fn parse_set_name(name: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(name, SET_NAME_FORMAT)
        .ok()
        .filter(|t| t.format(SET_NAME_FORMAT).to_string() == name)
        .map(|t| t.and_utc())
}

pub fn set_name(t: DateTime<Utc>) -> String {
    t.format(SET_NAME_FORMAT).to_string()
}

/// fsyncs a directory so a rename or create inside it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// A set found in the repository. `manifest` is `Err` when it cannot be read.
#[derive(Debug, Clone)]
pub struct SetInfo {
    pub id: String,
    pub time: DateTime<Utc>,
    pub dir: PathBuf,
    pub manifest: std::result::Result<Manifest, String>,
}

impl SetInfo {
    pub fn reader(&self) -> Result<SetReader> {
        SetReader::open(&self.dir)
    }
}

/// How thoroughly to verify a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLevel {
    /// Manifest parses, every file is present with its size and checksum.
    Checksums,
    /// Also decompress and decode every record; counts must match the manifest.
    Deep,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub files: usize,
    pub bytes: u64,
    pub records: u64,
}

pub struct Repo {
    root: PathBuf,
}

impl Repo {
    /// Opens an existing repository directory. A missing one is an error rather than created:
    /// in a container, a missing `/backups` usually means the volume is not mounted, and
    /// writing there would lose every backup with the container.
    pub fn open(root: &Path) -> Result<Repo> {
        match fs::metadata(root) {
            Ok(m) if m.is_dir() => Ok(Repo {
                root: root.to_owned(),
            }),
            Ok(_) => Err(Error::repo(root, "is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::repo(
                root,
                "does not exist; mount the backup volume there or set DBKEEPER_REPO",
            )),
            Err(e) => Err(Error::io(root, e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every set, newest first. Temp directories and stray files are not sets.
    pub fn list(&self) -> Result<Vec<SetInfo>> {
        let mut sets = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
            let entry = entry.map_err(|e| Error::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(time) = parse_set_name(&name) else {
                continue;
            };
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let dir = entry.path();
            let manifest = SetReader::open(&dir)
                .map(|r| r.manifest)
                .map_err(|e| e.to_string());
            sets.push(SetInfo {
                id: name,
                time,
                dir,
                manifest,
            });
        }
        sets.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(sets)
    }

    /// Takes the writer lock, waiting up to `wait`. Holding it, removes the temp directories
    /// that interrupted writers left behind.
    pub async fn lock(&self, wait: Duration) -> Result<RepoLock> {
        let lock = RepoLock::acquire(&self.root, wait).await?;
        self.remove_stale_temps();
        Ok(lock)
    }

    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) && entry.path().is_dir() {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        warn!(dir = %name, "removed an incomplete set left by an interrupted backup")
                    }
                    Err(e) => warn!(dir = %name, error = %e, "cannot remove an incomplete set"),
                }
            }
        }
    }

    /// Starts a new set named after `now` (UTC). Two sets in the same second get successive
    /// seconds rather than a suffix, so every name stays a plain timestamp.
    pub fn begin_set(&self, _lock: &RepoLock, now: DateTime<Utc>) -> Result<SetWriter> {
        let mut t = now;
        loop {
            let id = set_name(t);
            let taken = self.root.join(&id).exists()
                || self.root.join(format!("{TMP_PREFIX}{id}")).exists();
            if !taken {
                return SetWriter::create(&self.root, id, now);
            }
            t += chrono::TimeDelta::seconds(1);
        }
    }

    /// Finds a set by id. `latest` is the newest set that verifies (checksums).
    pub fn resolve(&self, id: &str, kind: Option<EngineKind>) -> Result<SetReader> {
        if id == "latest" {
            return match self.newest_good(kind)? {
                Some(set) => Ok(set),
                None => Err(Error::repo(&self.root, "holds no set that verifies")),
            };
        }
        if parse_set_name(id).is_none() {
            return Err(Error::config(format!(
                "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
            )));
        }
        let dir = self.root.join(id);
        if !dir.is_dir() {
            return Err(Error::repo(&self.root, format!("has no set {id}")));
        }
        SetReader::open(&dir)
    }

    /// The newest set that holds `kind` (any set when `None`) and whose checksums verify.
    /// Corrupt newer sets are skipped with a warning naming them.
    pub fn newest_good(&self, kind: Option<EngineKind>) -> Result<Option<SetReader>> {
        for info in self.list()? {
            let reader = match info.reader() {
                Ok(r) => r,
                Err(e) => {
                    warn!(set = %info.id, error = %e, "skipping a set that does not verify");
                    continue;
                }
            };
            if let Some(k) = kind
                && !reader.manifest.engines.contains_key(&k)
            {
                continue;
            }
            match verify(&reader, VerifyLevel::Checksums, &CancellationToken::new()) {
                Ok(_) => return Ok(Some(reader)),
                Err(e) => warn!(set = %info.id, error = %e, "skipping a set that does not verify"),
            }
        }
        Ok(None)
    }
}

/// Verifies a set: every file's size and checksum, and with [`VerifyLevel::Deep`] every
/// record decoded and counted against the manifest.
pub fn verify(
    set: &SetReader,
    level: VerifyLevel,
    cancel: &CancellationToken,
) -> Result<VerifyReport> {
    let mut report = VerifyReport {
        id: set.id().to_owned(),
        files: 0,
        bytes: 0,
        records: 0,
    };
    for (kind, entry) in &set.manifest.engines {
        match level {
            VerifyLevel::Checksums => {
                for f in &entry.files {
                    if cancel.is_cancelled() {
                        return Err(Error::Interrupted(0));
                    }
                    set.check_file(f)?;
                }
                report.records += entry.total_records();
            }
            VerifyLevel::Deep => {
                let counts = kind.verify_deep(set, entry, cancel)?;
                if counts != entry.counts {
                    return Err(Error::corrupt(
                        set.id(),
                        format!(
                            "{kind}: decoded counts {} differ from the manifest's {}",
                            describe_counts(&counts),
                            describe_counts(&entry.counts)
                        ),
                    ));
                }
                report.records += counts.values().sum::<u64>();
            }
        }
        report.files += entry.files.len();
        report.bytes += entry.stored_bytes();
    }
    Ok(report)
}

fn describe_counts(c: &crate::engine::Counts) -> String {
    let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
}

/// Deletes a set directory (retention). It is first renamed to a temp name so a crash
/// half-way never leaves a set that looks complete but lacks files.
pub fn delete_set(repo: &Repo, id: &str) -> Result<()> {
    let dir = repo.root.join(id);
    let doomed = repo.root.join(format!("{TMP_PREFIX}deleting-{id}"));
    fs::rename(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
    fsync_dir(&repo.root)?;
    fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_names_round_trip_and_reject_others() {
        let t = parse_set_name("2026-11-23_02-00-00").unwrap();
        assert_eq!(set_name(t), "2026-11-23_02-00-00");
        for bad in [
            ".tmp-2026-11-23_02-00-00",
            "2026-11-23",
            "2026-13-23_02-00-00",
            "2026-11-23_02-00-00x",
            "lost+found",
            "2026-1-23_02-00-00",
        ] {
            assert!(parse_set_name(bad).is_none(), "{bad}");
        }
    }
}
