//! The verification record: when each set was last verified, how thoroughly, and whether it
//! passed. One small JSON file per set under `.verified/` beside the sets
//! (`.verified/<id>.json`), so a set's own files and checksums never change, and a name
//! under `.verified` is never a set (it does not parse as a set time). Written atomically:
//! a local record through a temp file renamed over the old one, an object-storage record
//! with one PUT. A record that cannot be read is treated as no record ("never verified"):
//! it only ever describes a set, never decides what is restored.

use std::fs;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::backend::{Backend, SetPlace};
use super::{TMP_PREFIX, VerifyLevel, fsync_dir};
use crate::error::{Error, Result};

/// The directory (or object prefix) of the records, beside the sets.
pub const VERIFIED_DIR: &str = ".verified";

/// One set's last verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub at: DateTime<Utc>,
    /// `checksums` or `deep`.
    pub level: String,
    pub ok: bool,
    /// What failed, when it did not pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    pub fn new(id: &str, level: VerifyLevel, outcome: std::result::Result<(), String>) -> Record {
        Record {
            id: id.to_owned(),
            at: Utc::now(),
            level: level_name(level).to_owned(),
            ok: outcome.is_ok(),
            error: outcome.err(),
        }
    }

    /// How `list` shows it: `verified 2026-12-04T10:00:00Z (checksums)`, or
    /// `FAILED verification 2026-12-04T10:00:00Z (deep)`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} ({})",
            if self.ok {
                "verified"
            } else {
                "FAILED verification"
            },
            self.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            self.level
        )
    }
}

pub fn level_name(level: VerifyLevel) -> &'static str {
    level.name()
}

fn rel(id: &str) -> String {
    format!("{VERIFIED_DIR}/{id}.json")
}

/// Writes (replaces) a set's record.
pub fn write(backend: &Backend, record: &Record) -> Result<()> {
    let data = serde_json::to_vec_pretty(record).expect("serializes");
    match backend {
        Backend::Local(root) => write_local(root, &record.id, &data),
        Backend::S3(store) => store.put_small(&rel(&record.id), data),
    }
}

fn write_local(root: &Path, id: &str, data: &[u8]) -> Result<()> {
    let dir = root.join(VERIFIED_DIR);
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{id}.json"));
    let dst = dir.join(format!("{id}.json"));
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    fsync_dir(&dir)
}

/// A set's record; `None` when there is none or it cannot be read.
pub fn read(backend: &Backend, id: &str) -> Option<Record> {
    let raw = match backend {
        Backend::Local(root) => fs::read(root.join(rel(id))).ok()?,
        Backend::S3(store) => store.read_all(&rel(id)).ok()??,
    };
    serde_json::from_slice::<Record>(&raw)
        .ok()
        .filter(|r| r.id == id)
}

/// The record of the set at `place` (a set of a listing).
pub fn read_for(place: &SetPlace, id: &str) -> Option<Record> {
    match place {
        SetPlace::Local(dir) => read(&Backend::Local(dir.parent()?.to_owned()), id),
        SetPlace::S3 { store, .. } => read(&Backend::S3(store.clone()), id),
    }
}

/// Records a pass for the set at `place` (a set found by a restore); a failure to write is a
/// warning.
pub fn record_pass_for(place: &SetPlace, id: &str, level: VerifyLevel) {
    let backend = match place {
        SetPlace::Local(dir) => match dir.parent() {
            Some(root) => Backend::Local(root.to_owned()),
            None => return,
        },
        SetPlace::S3 { store, .. } => Backend::S3(store.clone()),
    };
    if let Err(e) = write(&backend, &Record::new(id, level, Ok(()))) {
        tracing::warn!(set = %id, error = %e, "cannot record the verification");
    }
}

/// Removes a set's record; a missing one is fine.
pub fn remove(backend: &Backend, id: &str) -> Result<()> {
    match backend {
        Backend::Local(root) => {
            let p = root.join(rel(id));
            match fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io(&p, e)),
            }
        }
        Backend::S3(store) => store.delete(&rel(id)),
    }
}

/// Removes the records of sets that are gone (deleted by hand, or a crash between a set's
/// deletion and its record's) and, locally, temp files of interrupted writes. Run by writers
/// holding the lock; a failure is a warning.
pub fn sweep(backend: &Backend) {
    let names: Vec<String> = match backend {
        Backend::Local(root) => match fs::read_dir(root.join(VERIFIED_DIR)) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => return,
        },
        Backend::S3(store) => match store.list_files(VERIFIED_DIR) {
            Ok(v) => v
                .into_iter()
                .filter_map(|(p, _)| p.rsplit('/').next().map(str::to_owned))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the verification records");
                return;
            }
        },
    };
    for name in names {
        let gone = match name.strip_suffix(".json") {
            Some(tmp) if tmp.starts_with(TMP_PREFIX) => true,
            Some(id) if super::parse_set_name(id).is_some() => {
                match backend.set(id).read_small(super::MANIFEST) {
                    Ok(m) => m.is_none(),
                    Err(_) => false,
                }
            }
            _ => false,
        };
        if !gone {
            continue;
        }
        let res = match backend {
            Backend::Local(root) => {
                fs::remove_file(root.join(VERIFIED_DIR).join(&name)).map_err(|e| e.to_string())
            }
            Backend::S3(store) => store
                .delete(&format!("{VERIFIED_DIR}/{name}"))
                .map_err(|e| e.to_string()),
        };
        match res {
            Ok(()) => {
                tracing::info!(record = %name, "removed the verification record of a set that is gone")
            }
            Err(e) => {
                tracing::warn!(record = %name, error = %e, "cannot remove a stale verification record")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_replace_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backend::Local(dir.path().to_owned());
        let id = "2026-12-04_10-00-00";
        assert_eq!(read(&b, id), None);
        let r = Record::new(id, VerifyLevel::Checksums, Ok(()));
        write(&b, &r).unwrap();
        assert_eq!(read(&b, id), Some(r));
        let bad = Record::new(
            id,
            crate::engine::DEEP,
            Err("redis/dump.rdb.zst: checksum".into()),
        );
        write(&b, &bad).unwrap();
        assert_eq!(read(&b, id).unwrap(), bad);
        assert!(bad.describe().starts_with("FAILED verification "));
        assert!(bad.describe().ends_with(" (deep)"));
        // No temp file is left beside the record.
        let names: Vec<String> = fs::read_dir(dir.path().join(VERIFIED_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [format!("{id}.json")]);
        remove(&b, id).unwrap();
        remove(&b, id).unwrap();
        assert_eq!(read(&b, id), None);
        // A record of another set under this name is not this set's.
        fs::write(
            dir.path().join(rel(id)),
            serde_json::to_vec(&Record::new(
                "2026-12-04_11-00-00",
                crate::engine::DEEP,
                Ok(()),
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(read(&b, id), None);
    }
}
