//! Data copies: a Chroma persist directory (`chroma.sqlite3` and its UUID-named segment
//! directories of HNSW files) taken while the server was stopped, stored file by file as
//! `chroma/data/<relative path>.zst`. Unlike the logical export it is tied to Chroma's on-disk
//! format, so it is loaded only into a stopped server's empty volume (preseed through
//! `DBKEEPER_CHROMA_DATA_DIR`) or written back out as a directory (`export`).
//!
//! `chroma.sqlite3` is read with SQLite itself (rusqlite, statically linked), opened read-only
//! and immutable (no locks, no writes, no journal), so the files are never changed. A
//! `-wal` or `-journal` beside it must be applied to be read right, which writes: then a
//! private copy in a temp directory is opened instead.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use chrono::Utc;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::ENGINE;
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::{EngineEntry, FileEntry};
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;

/// `details.format` of a data-copy set (a logical export has a number there).
pub const FORMAT: &str = "data-copy";
/// Where the files go inside the engine's part of the set.
pub const DATA_DIR: &str = "data";
pub const SQLITE: &str = "chroma.sqlite3";
/// The chromadb release the README pins, and the newest migration of each of its migration
/// directories (read from a persist directory that chromadb 1.5.9 created).
pub const PINNED_CHROMA: &str = "1.5.9";
pub const PINNED_MIGRATIONS: [(&str, i64); 3] =
    [("sysdb", 10), ("metadb", 6), ("embeddings_queue", 2)];
/// The tables every Chroma persist directory since 0.4.x has.
const TABLES: [&str; 7] = [
    "collections",
    "segments",
    "embeddings",
    "migrations",
    "tenants",
    "databases",
    "max_seq_id",
];
const HNSW_TYPE: &str = "urn:chroma:segment/vector/hnsw-local-persisted";
/// The files of a persisted HNSW segment (hnswlib's, as Chroma lays them out).
const HNSW_FILES: [&str; 4] = [
    "header.bin",
    "data_level0.bin",
    "length.bin",
    "link_lists.bin",
];
/// Files above this size are compressed on a worker thread.
const BIG_FILE: u64 = 8 << 20;
/// The temp directory a preseed or export builds in, inside the target.
pub(super) const TMP_DIR: &str = ".dbkeeper-chroma-copy.tmp";

/// `details` of a data-copy entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Details {
    pub format: String,
    /// Newest migration applied, per migration directory (`sysdb`, `metadb`, …).
    pub migrations: BTreeMap<String, i64>,
    /// `1.5.9` when the migrations are exactly the pinned release's; otherwise `older than 1.5.9`.
    pub chroma: String,
    /// Every file of the directory, relative to it, in the order stored.
    pub files: Vec<String>,
    pub collections: Vec<CollectionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub tenant: String,
    pub database: String,
    pub name: String,
    pub id: String,
    pub records: u64,
    pub dimension: Option<i64>,
}

impl CollectionInfo {
    /// The key of its count: `<database>/<collection>` as in a logical export, with the tenant
    /// in front for any tenant but the default one.
    pub fn key(&self) -> String {
        if self.tenant == "default_tenant" {
            super::format::count_key(&self.database, &self.name)
        } else {
            format!("{}/{}/{}", self.tenant, self.database, self.name)
        }
    }
}

/// Whether an entry holds a data copy rather than a logical export.
pub fn is_data_copy(entry: &EngineEntry) -> bool {
    entry.details.get("format").and_then(|f| f.as_str()) == Some(FORMAT)
}

/// What SQLite says about a persist directory's `chroma.sqlite3`.
#[derive(Debug)]
struct Inspected {
    migrations: BTreeMap<String, i64>,
    collections: Vec<CollectionInfo>,
    /// HNSW segments of collections that hold records: their files must be in the copy.
    needed_segments: Vec<(String, String)>,
}

/// Why a file is not a Chroma database; the caller picks the error kind.
struct NotChroma(String);

/// The companions of `chroma.sqlite3` in `dir` that SQLite must apply to read it right.
fn companions(dir: &Path) -> Vec<String> {
    ["-wal", "-journal"]
        .iter()
        .map(|s| format!("{SQLITE}{s}"))
        .filter(|n| fs::metadata(dir.join(n)).is_ok_and(|m| m.len() > 0))
        .collect()
}

/// Opens and checks `dir`'s `chroma.sqlite3` (`display` names the file in messages): in place,
/// immutable, or from a private copy when a `-wal` or `-journal` must be applied.
fn inspect(dir: &Path, display: &str) -> std::result::Result<Inspected, NotChroma> {
    let bad = |m: String| NotChroma(format!("{display}: {m}"));
    let path = dir.join(SQLITE);
    let mut head = [0u8; 16];
    let n = File::open(&path)
        .and_then(|mut f| read_full(&mut f, &mut head))
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(bad(
            "not a SQLite database (bytes 0-15 are not the SQLite header)".into(),
        ));
    }
    let extra = companions(dir);
    let _private;
    let conn = if extra.is_empty() {
        // A URI, so that `immutable=1` applies; the characters URIs reserve are escaped.
        let mut uri = String::from("file:");
        for c in path.to_string_lossy().chars() {
            match c {
                '%' => uri.push_str("%25"),
                '?' => uri.push_str("%3f"),
                '#' => uri.push_str("%23"),
                c => uri.push(c),
            }
        }
        uri.push_str("?immutable=1");
        Connection::open_with_flags(
            uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    } else {
        let tmp = temp_dir().map_err(|e| bad(e.to_string()))?;
        for n in std::iter::once(SQLITE.to_owned()).chain(extra) {
            fs::copy(dir.join(&n), tmp.path().join(&n))
                .map_err(|e| bad(format!("cannot copy {n}: {e}")))?;
        }
        let copy = tmp.path().join(SQLITE);
        _private = tmp;
        // The copy is ours: read-write, so that SQLite applies the journal (to the copy).
        Connection::open_with_flags(
            copy,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
    }
    .map_err(|e| bad(format!("cannot open as SQLite: {e}")))?;
    let sql = |e: rusqlite::Error| bad(format!("unreadable SQLite database: {e}"));
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(sql)?;
    let missing: Vec<&str> = TABLES
        .iter()
        .copied()
        .filter(|t| !tables.iter().any(|x| x == t))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "a SQLite database, but not Chroma's (no table {})",
            missing.join(", ")
        )));
    }
    let migrations: BTreeMap<String, i64> = conn
        .prepare("SELECT dir, max(version) FROM migrations GROUP BY dir")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(sql)?;
    if migrations.is_empty() {
        return Err(bad(
            "a SQLite database, but not Chroma's (no migration applied)".into(),
        ));
    }
    let collections: Vec<CollectionInfo> = conn
        .prepare(
            "SELECT d.tenant_id, d.name, c.name, c.id, c.dimension,
                    (SELECT count(*) FROM embeddings e JOIN segments s ON e.segment_id = s.id
                      WHERE s.collection = c.id AND s.scope = 'METADATA')
               FROM collections c JOIN databases d ON c.database_id = d.id
              ORDER BY d.tenant_id, d.name, c.name",
        )
        .and_then(|mut s| {
            s.query_map([], |r| {
                Ok(CollectionInfo {
                    tenant: r.get(0)?,
                    database: r.get(1)?,
                    name: r.get(2)?,
                    id: r.get(3)?,
                    dimension: r.get(4)?,
                    records: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })?
            .collect()
        })
        .map_err(sql)?;
    let segments: Vec<(String, String, String)> = conn
        .prepare("SELECT id, type, collection FROM segments WHERE scope = 'VECTOR'")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(sql)?;
    let mut needed_segments = Vec::new();
    for (id, kind, coll) in segments {
        let Some(c) = collections.iter().find(|c| c.id == coll) else {
            continue;
        };
        if kind == HNSW_TYPE && c.records > 0 {
            needed_segments.push((id, c.key()));
        }
    }
    Ok(Inspected {
        migrations,
        collections,
        needed_segments,
    })
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Why the schema is newer than the pinned chromadb, if it is.
fn newer_than_pinned(migrations: &BTreeMap<String, i64>) -> Option<String> {
    for (dir, v) in migrations {
        match PINNED_MIGRATIONS.iter().find(|(d, _)| d == dir) {
            Some((_, pinned)) if v > pinned => {
                return Some(format!(
                    "its {dir} migration {v} is newer than chromadb {PINNED_CHROMA}'s ({pinned})"
                ));
            }
            Some(_) => {}
            None => {
                return Some(format!(
                    "its migration directory {dir:?} is unknown to chromadb {PINNED_CHROMA}"
                ));
            }
        }
    }
    None
}

fn chroma_release(migrations: &BTreeMap<String, i64>) -> String {
    let pinned: BTreeMap<String, i64> = PINNED_MIGRATIONS
        .iter()
        .map(|(d, v)| (d.to_string(), *v))
        .collect();
    if *migrations == pinned {
        PINNED_CHROMA.to_owned()
    } else {
        format!("older than {PINNED_CHROMA}")
    }
}

fn describe_migrations(m: &BTreeMap<String, i64>) -> String {
    m.iter()
        .map(|(d, v)| format!("{d} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks a relative path from a manifest or a walk: plain components only, so nothing can be
/// written outside the target.
fn safe_rel(rel: &str) -> bool {
    !rel.is_empty()
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Every regular file under `root`, relative, sorted (`chroma.sqlite3` first). A symlink or a
/// special file is refused: the copy would not be what the server reads.
fn walk(root: &Path) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let path = e.path();
            let meta = fs::symlink_metadata(&path).map_err(|e| Error::io(&path, e))?;
            let name = e.file_name();
            // A filesystem's own directory at the top of a volume, never Chroma's.
            if rel.as_os_str().is_empty() && name == "lost+found" {
                continue;
            }
            let r = rel.join(&name);
            let Some(r_str) = r.to_str().map(str::to_owned) else {
                return Err(Error::engine(
                    ENGINE,
                    format!("{}: a file name that is not UTF-8", path.display()),
                ));
            };
            if meta.is_dir() {
                stack.push(r);
            } else if meta.is_file() {
                // The shared-memory index is rebuilt by SQLite; it is never data.
                if r_str == format!("{SQLITE}-shm") {
                    continue;
                }
                out.push((r_str, meta.len()));
            } else {
                return Err(Error::engine(
                    ENGINE,
                    format!(
                        "{}: neither a file nor a directory (a symlink or special file); copy the persist directory with its files dereferenced",
                        path.display()
                    ),
                ));
            }
        }
    }
    out.sort_by(|a, b| {
        (a.0 != SQLITE, !a.0.starts_with(SQLITE), &a.0).cmp(&(
            b.0 != SQLITE,
            !b.0.starts_with(SQLITE),
            &b.0,
        ))
    });
    Ok(out)
}

fn temp_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("dbkeeper-chroma-")
        .tempdir()
        .map_err(|e| Error::io(std::env::temp_dir(), e))
}

/// Stores a copy of a Chroma persist directory `src` (the server stopped) as the Chroma part of
/// a set. The directory is checked first (Chroma's SQLite, a schema chromadb 1.5.9 reads, every
/// HNSW segment of a non-empty collection present); a refusal writes nothing.
pub fn import_data_copy(
    src: &Path,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let meta = fs::metadata(src).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::config(format!("{}: no such directory", src.display()))
        } else {
            Error::io(src, e)
        }
    })?;
    if !meta.is_dir() {
        return Err(Error::config(format!(
            "{}: not a directory (a Chroma persist directory holds chroma.sqlite3)",
            src.display()
        )));
    }
    let files = walk(src)?;
    if !files.iter().any(|(r, _)| r == SQLITE) {
        return Err(Error::engine(
            ENGINE,
            format!(
                "{}: no {SQLITE}; not a Chroma persist directory",
                src.display()
            ),
        ));
    }
    let display = src.join(SQLITE).display().to_string();
    let found = inspect(src, &display).map_err(|NotChroma(m)| Error::engine(ENGINE, m))?;
    if let Some(why) = newer_than_pinned(&found.migrations) {
        return Err(Error::engine(
            ENGINE,
            format!(
                "{display}: {why}; this dbkeeper reads Chroma copies up to chromadb {PINNED_CHROMA}, nothing was written"
            ),
        ));
    }
    for (seg, key) in &found.needed_segments {
        if let Some(f) = HNSW_FILES
            .iter()
            .find(|f| !files.iter().any(|(r, _)| *r == format!("{seg}/{f}")))
        {
            return Err(Error::engine(
                ENGINE,
                format!(
                    "{}: segment {seg}/{f} of collection {key} is missing; copy the whole persist directory",
                    src.display()
                ),
            ));
        }
    }

    let mut entries = Vec::with_capacity(files.len());
    for (rel, size) in &files {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let path = src.join(rel);
        let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let threads = if *size > BIG_FILE { 1 } else { 0 };
        let mut w = out.create(&format!("{DATA_DIR}/{rel}"), threads)?;
        io::copy(&mut f, &mut w).map_err(|e| Error::io(&path, e))?;
        if w.raw_bytes() != *size {
            return Err(Error::engine(
                ENGINE,
                format!(
                    "{}: changed while it was copied ({size} bytes listed, {} read); stop the server and copy again",
                    path.display(),
                    w.raw_bytes()
                ),
            ));
        }
        entries.push(w.finish()?);
    }
    let counts: Counts = found
        .collections
        .iter()
        .map(|c| (c.key(), c.records))
        .collect();
    let details = Details {
        format: FORMAT.into(),
        chroma: chroma_release(&found.migrations),
        migrations: found.migrations.clone(),
        files: files.iter().map(|(r, _)| r.clone()).collect(),
        collections: found.collections,
    };
    info!(
        engine = ENGINE,
        dir = %src.display(),
        files = files.len(),
        collections = counts.len(),
        records = counts.values().sum::<u64>(),
        "chroma data copy stored"
    );
    Ok(EngineEntry {
        source: src.display().to_string(),
        server_version: format!(
            "chromadb {} (migrations {})",
            details.chroma,
            describe_migrations(&details.migrations)
        ),
        started_at,
        finished_at: Utc::now(),
        files: entries,
        counts,
        details: serde_json::to_value(details).expect("details serialize"),
    })
}

/// Reads and checks the entry's details: a data copy, safe file names, each file in the manifest.
pub fn details_of(set: &SetReader, entry: &EngineEntry) -> Result<Details> {
    let corrupt = |m: String| Error::corrupt(set.id(), format!("{ENGINE}: {m}"));
    let d: Details = serde_json::from_value(entry.details.clone())
        .map_err(|e| corrupt(format!("data-copy details do not parse: {e}")))?;
    if d.format != FORMAT {
        return Err(corrupt(format!("format {:?} is not a data copy", d.format)));
    }
    if !d.files.iter().any(|f| f == SQLITE) {
        return Err(corrupt(format!("the data copy lists no {SQLITE}")));
    }
    for f in &d.files {
        if !safe_rel(f) {
            return Err(corrupt(format!("unsafe file name {f:?} in the data copy")));
        }
        file_of(set, entry, f)?;
    }
    Ok(d)
}

fn file_of<'a>(set: &SetReader, entry: &'a EngineEntry, rel: &str) -> Result<&'a FileEntry> {
    let path = format!("{ENGINE}/{DATA_DIR}/{rel}.zst");
    entry
        .file(&path)
        .ok_or_else(|| Error::corrupt(set.id(), format!("{ENGINE}: the manifest lists no {path}")))
}

/// Decompresses one stored file to `to`, checking its checksum; fsyncs it.
fn write_file(set: &SetReader, fe: &FileEntry, to: &Path) -> Result<u64> {
    let mut r = set.open_file(fe)?;
    let mut f = File::create(to).map_err(|e| Error::io(to, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(r.error(e)),
        };
        f.write_all(&buf[..k]).map_err(|e| Error::io(to, e))?;
        n += k as u64;
    }
    r.finish()?;
    f.sync_all().map_err(|e| Error::io(to, e))?;
    Ok(n)
}

/// Re-checks the stored `chroma.sqlite3` (decompressed to a temp copy) against the manifest:
/// Chroma's, not newer than the pinned release, and the HNSW files of every non-empty collection
/// in the copy. Returns the counts it recomputed.
fn check_sqlite(set: &SetReader, entry: &EngineEntry, d: &Details, dir: &Path) -> Result<Counts> {
    let corrupt = |m: String| Error::corrupt(set.id(), format!("{ENGINE}: {m}"));
    let found = inspect(dir, &format!("{DATA_DIR}/{SQLITE}")).map_err(|NotChroma(m)| corrupt(m))?;
    if found.migrations != d.migrations {
        return Err(corrupt(format!(
            "{SQLITE} has migrations {}, the manifest says {}",
            describe_migrations(&found.migrations),
            describe_migrations(&d.migrations)
        )));
    }
    if let Some(why) = newer_than_pinned(&found.migrations) {
        return Err(Error::engine(
            ENGINE,
            format!(
                "set {}: {why}; this dbkeeper loads Chroma copies up to chromadb {PINNED_CHROMA}",
                set.id()
            ),
        ));
    }
    for (seg, key) in &found.needed_segments {
        for f in HNSW_FILES {
            let rel = format!("{seg}/{f}");
            if !d.files.contains(&rel)
                || entry
                    .file(&format!("{ENGINE}/{DATA_DIR}/{rel}.zst"))
                    .is_none()
            {
                return Err(corrupt(format!(
                    "segment file {rel} of collection {key} is missing from the copy"
                )));
            }
        }
    }
    Ok(found
        .collections
        .iter()
        .map(|c| (c.key(), c.records))
        .collect())
}

/// Offline deep verification of a data copy: every file read through its checksum, and the
/// stored SQLite re-opened (from a temp copy) to recompute the counts.
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let d = details_of(set, entry)?;
    let tmp = temp_dir()?;
    for rel in &d.files {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let fe = file_of(set, entry, rel)?;
        if rel.starts_with(SQLITE) && !rel.contains('/') {
            write_file(set, fe, &tmp.path().join(rel))?;
        } else {
            let mut r = set.open_file(fe)?;
            io::copy(&mut r, &mut io::sink()).map_err(|e| r.error(e))?;
            r.finish()?;
        }
    }
    check_sqlite(set, entry, &d, tmp.path())
}

/// Writes a data copy into `target` (which must hold nothing of Chroma's): every file is
/// written under `<target>/.dbkeeper-chroma-copy.tmp/` and checked (checksums, SQLite, counts
/// against the manifest) before anything is moved into place; the segment directories are
/// renamed first and `chroma.sqlite3` last, then the temp directory is removed. A set that does
/// not verify (`Error::Corrupt`) leaves nothing behind.
pub(super) fn materialise(
    target: &Path,
    set: &SetReader,
    entry: &EngineEntry,
    owner: Option<(u32, u32)>,
) -> Result<u64> {
    let d = details_of(set, entry)?;
    let tmp = target.join(TMP_DIR);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let built = (|| -> Result<u64> {
        let mut bytes = 0;
        for rel in &d.files {
            let to = tmp.join(rel);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            bytes += write_file(set, file_of(set, entry, rel)?, &to)?;
        }
        let counts = check_sqlite(set, entry, &d, &tmp)?;
        if counts != entry.counts {
            return Err(Error::corrupt(
                set.id(),
                format!(
                    "{ENGINE}: {SQLITE} holds {} records in {} collections, the manifest {} in {}",
                    counts.values().sum::<u64>(),
                    counts.len(),
                    entry.total_records(),
                    entry.counts.len()
                ),
            ));
        }
        Ok(bytes)
    })();
    let bytes = match built {
        Ok(b) => b,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Some(owner) = owner {
        chown_tree(&tmp, owner)?;
    }
    fsync_tree(&tmp)?;
    // Top-level entries, chroma.sqlite3 and its companions last: until it is in place the
    // directory is not a Chroma directory, and the temp directory marks the preseed unfinished.
    let mut top: Vec<String> = fs::read_dir(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    top.sort_by_key(|n| (n.starts_with(SQLITE), n == SQLITE, n.clone()));
    for name in top {
        let to = target.join(&name);
        if to.is_dir() {
            // Only an interrupted earlier preseed leaves one (the target held no data).
            fs::remove_dir_all(&to).map_err(|e| Error::io(&to, e))?;
        }
        fs::rename(tmp.join(&name), &to).map_err(|e| Error::io(&to, e))?;
    }
    fsync_path(target)?;
    fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fsync_path(target)?;
    Ok(bytes)
}

fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            fsync_tree(&p)?;
        }
    }
    fsync_path(dir)
}

/// Gives every file and directory under `dir` (and `dir`) to `owner`: the data directory's
/// owner, whoever the server runs as.
fn chown_tree(dir: &Path, owner: (u32, u32)) -> Result<()> {
    use nix::unistd::{Gid, Uid, chown};
    if owner == (Uid::effective().as_raw(), Gid::effective().as_raw()) {
        return Ok(());
    }
    let one = |p: &Path| {
        chown(
            p,
            Some(Uid::from_raw(owner.0)),
            Some(Gid::from_raw(owner.1)),
        )
        .map_err(|e| {
            Error::io(
                p,
                io::Error::other(format!(
                    "cannot give it to uid {} gid {} (the data directory's owner): {e}",
                    owner.0, owner.1
                )),
            )
        })
    };
    one(dir)?;
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            chown_tree(&p, owner)?;
        } else {
            one(&p)?;
        }
    }
    Ok(())
}

/// Writes a set's data copy back out as a persist directory into `dest`, which must be empty
/// (it is created when missing).
pub fn export_data_copy(set: &SetReader, entry: &EngineEntry, dest: &Path) -> Result<()> {
    if !is_data_copy(entry) {
        return Err(Error::config(format!(
            "set {} holds a logical Chroma export, not a data copy; load it into a running server with `dbkeeper restore`",
            set.id()
        )));
    }
    match fs::read_dir(dest) {
        Ok(mut it) => {
            if it.next().is_some() {
                return Err(Error::config(format!(
                    "{}: not empty; export a data copy into an empty directory",
                    dest.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
        }
        Err(e) => return Err(Error::io(dest, e)),
    }
    let bytes = materialise(dest, set, entry, None)?;
    info!(engine = ENGINE, dir = %dest.display(), set = set.id(), bytes, "chroma data copy exported");
    Ok(())
}

/// Refuses to load a data copy into a running server.
pub fn refuse_online(set: &SetReader, entry: &EngineEntry) -> Result<()> {
    if is_data_copy(entry) {
        return Err(Error::config(format!(
            "set {} is a Chroma data copy (a persist directory): it cannot be loaded into a running server; preseed it into the stopped server's volume with DBKEEPER_CHROMA_DATA_DIR",
            set.id()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_newer_than_pinned_is_named() {
        let m = |v: &[(&str, i64)]| -> BTreeMap<String, i64> {
            v.iter().map(|(d, n)| (d.to_string(), *n)).collect()
        };
        let pinned = m(&PINNED_MIGRATIONS);
        assert_eq!(newer_than_pinned(&pinned), None);
        assert_eq!(chroma_release(&pinned), "1.5.9");
        let older = m(&[("sysdb", 9), ("metadb", 4), ("embeddings_queue", 2)]);
        assert_eq!(newer_than_pinned(&older), None);
        assert_eq!(chroma_release(&older), "older than 1.5.9");
        let newer = m(&[("sysdb", 11), ("metadb", 6)]);
        assert!(
            newer_than_pinned(&newer)
                .unwrap()
                .contains("sysdb migration 11")
        );
        let unknown = m(&[("sysdb", 1), ("vectordb", 1)]);
        assert!(newer_than_pinned(&unknown).unwrap().contains("vectordb"));
    }

    #[test]
    fn only_plain_relative_paths_are_safe() {
        for ok in ["chroma.sqlite3", "a-b/header.bin"] {
            assert!(safe_rel(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./x"] {
            assert!(!safe_rel(bad), "{bad}");
        }
    }
}
