//! The backup repository: set naming, listing, locking, verification and the "newest good
//! set" rule, over a local directory or an S3-compatible bucket (`backend`), with sets
//! optionally encrypted with age (`crypt`).

pub mod backend;
pub mod crypt;
pub mod kind;
pub mod lock;
pub mod manifest;
pub mod reader;
pub mod retention;
pub mod s3;
pub mod verified;
pub mod writer;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use backend::{Backend, SetPlace};
use crypt::Crypto;
pub use kind::{Counts, EngineKind};
pub use lock::RepoLock;
use manifest::Manifest;
use reader::SetReader;
use s3::{S3Config, S3Store};
use writer::SetWriter;

pub const MANIFEST: &str = "manifest.json";
/// The manifest's own SHA-256, in `sha256sum` format (`sha256sum -c manifest.json.sha256`),
/// written just before it: without it a bit flipped in a time, a version or a count of the
/// manifest would go unnoticed by a checksum verify. Sets written before it existed have none
/// and are read as before.
pub const MANIFEST_SUM: &str = "manifest.json.sha256";
pub const TMP_PREFIX: &str = ".tmp-";
/// On object storage, each set's `{stored path: ETag}` as the store answered its uploads.
/// Not part of the manifest (a copy keeps the manifest's bytes): a cache that lets the newest
/// good set be found from one listing instead of a download of every object. An object whose
/// ETag differs (changed since, or copied in by another client) is checked in full.
pub const ETAGS: &str = ".etags.json";
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

/// Where a repository is, as configured: a local directory or `s3://bucket/prefix`.
#[derive(Debug, Clone)]
pub enum RepoSpec {
    Local(PathBuf),
    S3(S3Config),
}

impl RepoSpec {
    /// `value` of the variable `name`: `s3://…` (with the `DBKEEPER_S3_*` settings from `env`)
    /// or a local path.
    pub fn parse(name: &str, value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        if value.starts_with("s3://") {
            return S3Config::from_url(value, env)
                .map(RepoSpec::S3)
                .map_err(|e| match e {
                    Error::Config(m) => Error::config(format!("{name}: {m}")),
                    other => other,
                });
        }
        if value.contains("://") {
            return Err(Error::config(format!(
                "{name}={value:?}: expected a directory or s3://bucket/prefix"
            )));
        }
        Ok(RepoSpec::Local(PathBuf::from(value)))
    }

    pub fn display(&self) -> String {
        match self {
            RepoSpec::Local(p) => p.display().to_string(),
            RepoSpec::S3(c) => c.url(),
        }
    }
}

/// A set found in the repository. `manifest` is `Err` when it cannot be read.
#[derive(Debug, Clone)]
pub struct SetInfo {
    pub id: String,
    pub time: DateTime<Utc>,
    pub place: SetPlace,
    pub manifest: std::result::Result<Manifest, String>,
    crypto: Option<Arc<Crypto>>,
}

impl SetInfo {
    pub fn reader(&self) -> Result<SetReader> {
        SetReader::open(self.place.clone(), &self.id, self.crypto.as_deref())
    }
}

/// How thoroughly to verify a set.
#[derive(Clone, Copy)]
pub enum VerifyLevel {
    /// Manifest parses, every file is present with its size and checksum.
    Checksums,
    /// Also decompress and decode every record with the engines' own readers (given by the
    /// caller: `engine::DEEP`); counts must match the manifest.
    Deep(&'static dyn Decode),
}

impl VerifyLevel {
    pub fn is_deep(self) -> bool {
        matches!(self, VerifyLevel::Deep(_))
    }

    pub fn name(self) -> &'static str {
        match self {
            VerifyLevel::Checksums => "checksums",
            VerifyLevel::Deep(_) => "deep",
        }
    }
}

impl PartialEq for VerifyLevel {
    fn eq(&self, other: &Self) -> bool {
        self.is_deep() == other.is_deep()
    }
}

impl std::fmt::Debug for VerifyLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes one engine's part of a set and returns the records it counted. The engines
/// implement it; the repository knows their formats only through it.
pub trait Decode: Sync {
    fn counts(
        &self,
        kind: EngineKind,
        set: &SetReader,
        entry: &manifest::EngineEntry,
        cancel: &CancellationToken,
    ) -> Result<Counts>;
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub id: String,
    pub files: usize,
    pub bytes: u64,
    pub records: u64,
}

/// An open repository. Cheap to clone (into blocking tasks).
#[derive(Debug, Clone)]
pub struct Repo {
    backend: Backend,
    crypto: Option<Arc<Crypto>>,
    /// How long an object-storage lock lives without renewal.
    lease: Duration,
}

/// The lease of an object-storage lock: a holder renews it every third of it; a holder that
/// died is taken over once it has passed.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

impl Repo {
    /// Opens an existing repository. A missing local directory is an error rather than
    /// created: in a container, a missing `/backups` usually means the volume is not mounted,
    /// and writing there would lose every backup with the container. A bucket is checked
    /// with one request, so a missing bucket or refused credentials fail here, in one line.
    pub fn open(spec: &RepoSpec, crypto: Option<Arc<Crypto>>) -> Result<Repo> {
        let repo = Repo::connect(spec, crypto)?;
        if let Backend::S3(store) = &repo.backend {
            store.check()?;
        }
        Ok(repo)
    }

    /// Like [`Repo::open`], but a bucket is not checked: for the sidecar's remote, whose
    /// store may be down at start without that stopping local backups.
    pub fn connect(spec: &RepoSpec, crypto: Option<Arc<Crypto>>) -> Result<Repo> {
        let backend = match spec {
            RepoSpec::Local(root) => {
                match fs::metadata(root) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(Error::repo(root, "is not a directory")),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(Error::repo(
                            root,
                            "does not exist; mount the backup volume there or set DBKEEPER_REPO",
                        ));
                    }
                    Err(e) => return Err(Error::io(root, e)),
                }
                Backend::Local(root.clone())
            }
            RepoSpec::S3(cfg) => Backend::S3(S3Store::connect(cfg)?),
        };
        Ok(Repo {
            backend,
            crypto,
            lease: DEFAULT_LEASE,
        })
    }

    /// A plain local repository (tests and tools).
    pub fn local(root: &Path) -> Result<Repo> {
        Repo::open(&RepoSpec::Local(root.to_owned()), None)
    }

    /// Sets the object-storage lock's lease.
    pub fn with_lease(mut self, lease: Duration) -> Repo {
        self.lease = lease;
        self
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The repository as an operator names it: a path or `s3://bucket/prefix`.
    pub fn display(&self) -> String {
        self.backend.display()
    }

    /// The directory of a local repository.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(p) => Some(p),
            Backend::S3(_) => None,
        }
    }

    pub fn crypto(&self) -> Option<&Crypto> {
        self.crypto.as_deref()
    }

    /// Every set, newest first. Temp directories, stray files and (on object storage) set
    /// prefixes without a manifest are not sets.
    pub fn list(&self) -> Result<Vec<SetInfo>> {
        let names: Vec<String> = match &self.backend {
            Backend::Local(root) => {
                let mut v = Vec::new();
                for entry in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
                    let entry = entry.map_err(|e| Error::io(root, e))?;
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        v.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                v
            }
            Backend::S3(store) => store.list_dirs("")?,
        };
        let mut sets = Vec::new();
        for name in names {
            let Some(time) = parse_set_name(&name) else {
                continue;
            };
            let place = self.backend.set(&name);
            let opened = match place {
                SetPlace::Local(_) => SetReader::open(place.clone(), &name, self.crypto.as_deref()),
                // On object storage a prefix without a manifest is a set being written.
                SetPlace::S3 { .. } => match place.read_small(MANIFEST)? {
                    None => continue,
                    Some(raw) => {
                        SetReader::from_raw(place.clone(), &name, raw, self.crypto.as_deref())
                    }
                },
            };
            let manifest = opened.map(|r| r.manifest).map_err(|e| e.to_string());
            sets.push(SetInfo {
                id: name,
                time,
                place,
                manifest,
                crypto: self.crypto.clone(),
            });
        }
        sets.sort_by(|a, b| b.id.cmp(&a.id));
        Ok(sets)
    }

    /// Takes the writer lock, waiting up to `wait`. Holding it, removes what interrupted
    /// writers left behind: temp directories, or on object storage the objects of sets that
    /// never got a manifest and the multipart uploads that were never completed.
    pub async fn lock(&self, wait: Duration) -> Result<RepoLock> {
        let lock = self.lock_named(lock::LOCK_FILE, wait).await?;
        match &self.backend {
            Backend::Local(root) => {
                remove_stale_temps(root);
                verified::sweep(&self.backend);
            }
            Backend::S3(store) => {
                let store = store.clone();
                let backend = self.backend.clone();
                tokio::task::spawn_blocking(move || {
                    remove_stale_objects(&store);
                    verified::sweep(&backend);
                })
                .await
                .map_err(|e| Error::engine("repo", format!("cleanup task failed: {e}")))?;
            }
        }
        Ok(lock)
    }

    /// Takes the lock a sidecar holds for as long as it runs (see
    /// [`lock::SIDECAR_LOCK_FILE`]); backups and prunes still take the writer lock.
    pub async fn lock_sidecar(&self, wait: Duration) -> Result<RepoLock> {
        self.lock_named(lock::SIDECAR_LOCK_FILE, wait).await
    }

    async fn lock_named(&self, name: &'static str, wait: Duration) -> Result<RepoLock> {
        match &self.backend {
            Backend::Local(root) => Ok(RepoLock::Local(
                lock::LocalLock::acquire(root, name, wait).await?,
            )),
            Backend::S3(store) => {
                let store = store.clone();
                let lease = self.lease;
                tokio::task::spawn_blocking(move || {
                    store
                        .lock(name, &lock::holder_note(), lease, wait)
                        .map(RepoLock::S3)
                })
                .await
                .map_err(|e| Error::engine("repo", format!("lock task failed: {e}")))?
            }
        }
    }

    /// Starts a new set named after `now` (UTC). Two sets in the same second get successive
    /// seconds rather than a suffix, so every name stays a plain timestamp. With age
    /// recipients configured, the set is encrypted.
    pub fn begin_set(&self, _lock: &RepoLock, now: DateTime<Utc>) -> Result<SetWriter> {
        let keys = match &self.crypto {
            None => None,
            Some(c) if c.can_encrypt() => Some(c.new_set()?),
            Some(_) => {
                return Err(Error::config(
                    "DBKEEPER_AGE_IDENTITY_FILE is set without DBKEEPER_AGE_RECIPIENTS: this host can restore encrypted sets but not write them; set the recipients to back up",
                ));
            }
        };
        let mut t = now;
        loop {
            let id = set_name(t);
            if !self.is_taken(&id)? {
                return self.create_writer(id, now, keys);
            }
            t += chrono::TimeDelta::seconds(1);
        }
    }

    /// Starts a byte-for-byte copy of a set of another repository, under its own id.
    pub fn begin_copy(&self, _lock: &RepoLock, set: &SetReader) -> Result<SetWriter> {
        if self.is_taken(set.id())? {
            return Err(Error::repo(
                self.display(),
                format!("already holds set {}; refusing to replace it", set.id()),
            ));
        }
        self.create_writer(set.id().to_owned(), set.manifest.started_at, None)
    }

    fn create_writer(
        &self,
        id: String,
        started_at: DateTime<Utc>,
        keys: Option<(crypt::SetSealer, Option<Vec<u8>>)>,
    ) -> Result<SetWriter> {
        match &self.backend {
            Backend::Local(root) => SetWriter::create_local(root, id, started_at, keys),
            Backend::S3(store) => Ok(SetWriter::create_s3(store, id, started_at, keys)),
        }
    }

    /// Whether a set, or anything under its name, exists.
    fn is_taken(&self, id: &str) -> Result<bool> {
        Ok(match &self.backend {
            Backend::Local(root) => {
                root.join(id).exists() || root.join(format!("{TMP_PREFIX}{id}")).exists()
            }
            Backend::S3(store) => !store.list_files(id)?.is_empty(),
        })
    }

    /// Whether a published set of this id exists.
    pub fn has_set(&self, id: &str) -> Result<bool> {
        Ok(self.backend.set(id).read_small(MANIFEST)?.is_some())
    }

    /// Finds a set by id. `latest` is the newest set that verifies (checksums).
    pub fn resolve(&self, id: &str, kind: Option<EngineKind>) -> Result<SetReader> {
        if id == "latest" {
            return match self.newest_good(kind)? {
                Some(set) => Ok(set),
                None => Err(Error::repo(self.display(), "holds no set that verifies")),
            };
        }
        if parse_set_name(id).is_none() {
            return Err(Error::config(format!(
                "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
            )));
        }
        let exists = match &self.backend {
            Backend::Local(root) => root.join(id).is_dir(),
            Backend::S3(_) => self.has_set(id)?,
        };
        if !exists {
            return Err(Error::repo(self.display(), format!("has no set {id}")));
        }
        SetReader::open(self.backend.set(id), id, self.crypto.as_deref())
    }

    /// The newest set that holds `kind` (any set when `None`) and whose checksums verify.
    /// Corrupt newer sets are skipped with a warning naming them.
    pub fn newest_good(&self, kind: Option<EngineKind>) -> Result<Option<SetReader>> {
        for reader in self.candidates(kind)? {
            let verdict = match quick_verify(&reader) {
                Some(v) => v,
                None => {
                    verify(&reader, VerifyLevel::Checksums, &CancellationToken::new()).map(|_| ())
                }
            };
            match verdict {
                Ok(()) => return Ok(Some(reader)),
                Err(e) => {
                    warn!(set = %reader.id(), repo = %self.display(), error = %e, "skipping a set that does not verify")
                }
            }
        }
        Ok(None)
    }

    /// The sets holding `kind` (any set when `None`) whose manifest opens, newest first; their
    /// files are not read. For a restore that checks every byte as it goes and can drop what
    /// it wrote when a file fails (the Redis data-directory preseed), so that it reads the set
    /// once; the others restore only from [`Repo::newest_good`].
    pub fn candidates(&self, kind: Option<EngineKind>) -> Result<Vec<SetReader>> {
        let mut out = Vec::new();
        for info in self.list()? {
            let reader = match info.reader() {
                Ok(r) => r,
                Err(e) => {
                    warn!(set = %info.id, repo = %self.display(), error = %e, "skipping a set that does not verify");
                    continue;
                }
            };
            if kind.is_none_or(|k| reader.manifest.engines.contains_key(&k)) {
                out.push(reader);
            }
        }
        Ok(out)
    }

    /// A set's last verification, from its record beside the sets.
    pub fn verification(&self, id: &str) -> Option<verified::Record> {
        verified::read(&self.backend, id)
    }

    /// Verifies a set and records the outcome (unless interrupted) beside the sets. A record
    /// that cannot be written (a read-only mount) is a warning: the verdict stands.
    pub fn verify_recorded(
        &self,
        set: &SetReader,
        level: VerifyLevel,
        cancel: &CancellationToken,
    ) -> Result<VerifyReport> {
        let res = verify(set, level, cancel);
        let outcome = match &res {
            // Interrupted, or no key to decode an encrypted set: nothing was learnt about it.
            Err(Error::Interrupted(_) | Error::Key(_)) => return res,
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{e:#}")),
        };
        self.record(set.id(), level, outcome);
        res
    }

    /// Records a verification's outcome for a set; a failure to write is a warning.
    pub fn record(&self, id: &str, level: VerifyLevel, outcome: std::result::Result<(), String>) {
        let rec = verified::Record::new(id, level, outcome);
        if let Err(e) = verified::write(&self.backend, &rec) {
            warn!(set = %id, repo = %self.display(), error = %e, "cannot record the verification");
        }
    }

    /// Deletes a set (retention). A local set is first renamed to a temp name, and on
    /// object storage its manifest goes first, so a crash half-way never leaves a set that
    /// looks complete but lacks files.
    pub fn delete_set(&self, id: &str) -> Result<()> {
        // The verification record goes first: a crash between the two leaves a set shown as
        // never verified, never a record that vouches for a set that is gone.
        verified::remove(&self.backend, id)?;
        match &self.backend {
            Backend::Local(root) => {
                let dir = root.join(id);
                let doomed = root.join(format!("{TMP_PREFIX}deleting-{id}"));
                fs::rename(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
                fsync_dir(root)?;
                fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
            }
            Backend::S3(store) => {
                store.delete(&format!("{id}/{MANIFEST}"))?;
                store.delete_prefix(id).map(|_| ())
            }
        }
    }
}

/// The cheap check of a set on object storage: one listing, every stored file present at its
/// size with the ETag recorded when it was uploaded. `None` when that cannot decide (no
/// record, an ETag that differs): then the checksums are read in full.
fn quick_verify(set: &SetReader) -> Option<Result<()>> {
    let SetPlace::S3 { store, id } = &set.place else {
        return None;
    };
    let recorded: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&set.place.read_small(ETAGS).ok()??).ok()?;
    let listed: std::collections::HashMap<String, (u64, Option<String>)> = store
        .list_tagged(id)
        .ok()?
        .into_iter()
        .map(|(p, n, t)| (p, (n, t)))
        .collect();
    for f in set.manifest.stored_files() {
        let name = f.stored_path();
        let Some((size, tag)) = listed.get(name) else {
            return Some(Err(Error::corrupt(id, format!("{name} is missing"))));
        };
        if *size != f.size {
            return Some(Err(Error::corrupt(
                id,
                format!("{name}: {size} bytes stored, manifest says {}", f.size),
            )));
        }
        if tag.is_none() || recorded.get(name) != tag.as_ref() {
            return None;
        }
    }
    Some(Ok(()))
}

fn remove_stale_temps(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
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

/// On object storage, what a writer that died or lost its store left: open multipart
/// uploads, and objects under a set name that never got its manifest.
fn remove_stale_objects(store: &S3Store) {
    match store.abort_stale_uploads() {
        Ok(0) => {}
        Ok(n) => info!(
            uploads = n,
            "aborted multipart uploads left by an interrupted backup"
        ),
        Err(e) => warn!(error = %e, "cannot abort the multipart uploads of an interrupted backup"),
    }
    let dirs = match store.list_dirs("") {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "cannot look for incomplete sets");
            return;
        }
    };
    for name in dirs {
        if parse_set_name(&name).is_none() {
            continue;
        }
        match store.size(&format!("{name}/{MANIFEST}")) {
            Ok(Some(_)) => {}
            Ok(None) => match store.delete_prefix(&name) {
                Ok(n) => {
                    warn!(set = %name, objects = n, "removed an incomplete set left by an interrupted backup")
                }
                Err(e) => warn!(set = %name, error = %e, "cannot remove an incomplete set"),
            },
            Err(e) => warn!(set = %name, error = %e, "cannot check an incomplete set"),
        }
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
            VerifyLevel::Deep(decode) => {
                let counts = decode.counts(*kind, set, entry, cancel)?;
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

fn describe_counts(c: &Counts) -> String {
    let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", parts.join(", "))
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
