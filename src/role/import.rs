//! `dbkeeper import`: another tool's backup read (never changed) and written as one ordinary
//! set, through the same writer as `backup`, then deep-verified.
//!
//! Sources, told apart by their shape and magic bytes: a seed-layout set directory
//! (`YYYY-MM-DD_HH-MM-SS/` with `mongodb/mongodb_backup/`, `redis/dump.rdb` or the AOF files,
//! `chroma/`), a mongodump directory (plain or `--gzip`), a `mongodump --archive` file (plain
//! or gzip), a Redis `dump.rdb`, an `appendonlydir/` or `appendonly.aof`, a copy of a Chroma
//! persist directory.

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::engine::EngineKind;
use crate::engine::chroma::datacopy;
use crate::engine::mongodb::import as mongo;
use crate::engine::redis::{aof, import as rdb};
use crate::error::{Error, Result};
use crate::repo::manifest::{Imported, Manifest};
use crate::repo::writer::EngineWriter;
use crate::repo::{Repo, parse_set_name, set_name};

/// One engine's part of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    MongoDir(PathBuf),
    MongoArchive(PathBuf),
    Rdb(PathBuf),
    Aof(PathBuf),
    ChromaCopy(PathBuf),
}

impl Part {
    fn kind(&self) -> EngineKind {
        match self {
            Part::MongoDir(_) | Part::MongoArchive(_) => EngineKind::Mongodb,
            Part::Rdb(_) | Part::Aof(_) => EngineKind::Redis,
            Part::ChromaCopy(_) => EngineKind::Chroma,
        }
    }

    fn import(
        &self,
        out: EngineWriter,
        cancel: &CancellationToken,
    ) -> Result<crate::repo::manifest::EngineEntry> {
        match self {
            Part::MongoDir(p) => mongo::import_dir(p, out, cancel),
            Part::MongoArchive(p) => mongo::import_archive(p, out, cancel),
            Part::Rdb(p) => rdb::import_rdb(p, out, cancel),
            Part::Aof(p) => aof::import_aof(p, out, cancel),
            Part::ChromaCopy(p) => datacopy::import_data_copy(p, out, cancel),
        }
    }
}

/// What `PATH` holds: the parts to import and, for a seed-layout set, its time.
#[derive(Debug)]
pub struct Source {
    pub parts: Vec<Part>,
    pub seed_time: Option<DateTime<Utc>>,
}

fn refuse(path: &Path, why: &str) -> Error {
    Error::engine(
        "import",
        format!("{}: {why}; nothing imported", path.display()),
    )
}

fn is_aof_dir(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| n == "appendonlydir")
        || std::fs::read_dir(dir).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".aof.manifest"))
        })
}

/// The parts of a seed-layout set directory; what is absent is said in a log line.
fn seed_parts(dir: &Path) -> Vec<Part> {
    let mut parts = Vec::new();
    let mongo = dir.join("mongodb/mongodb_backup");
    if mongo.is_dir() && mongo::looks_like_dump(&mongo) {
        parts.push(Part::MongoDir(mongo));
    } else {
        info!(source = %dir.display(), "no mongodb/mongodb_backup/ dump in this seed set: MongoDB absent");
    }
    let redis = dir.join("redis");
    let (rdb_file, aof_dir, aof_file) = (
        redis.join("dump.rdb"),
        redis.join("appendonlydir"),
        redis.join("appendonly.aof"),
    );
    if rdb_file.is_file() {
        // The RDB is what the seed's script took for the backup (`redis-cli --rdb`); the AOF
        // beside it is the server's own file, copied as it was.
        if aof_dir.exists() || aof_file.exists() {
            info!(source = %dir.display(), "redis: dump.rdb imported; the AOF beside it is not");
        }
        parts.push(Part::Rdb(rdb_file));
    } else if aof_dir.is_dir() {
        parts.push(Part::Aof(aof_dir));
    } else if aof_file.is_file() {
        parts.push(Part::Aof(aof_file));
    } else {
        info!(source = %dir.display(), "no redis/dump.rdb or AOF in this seed set: Redis absent");
    }
    let chroma = dir.join("chroma");
    if chroma.join("chroma.sqlite3").is_file() {
        parts.push(Part::ChromaCopy(chroma));
    } else {
        info!(source = %dir.display(), "no chroma/chroma.sqlite3 in this seed set: Chroma absent");
    }
    parts
}

fn is_seed_set(dir: &Path) -> bool {
    ["mongodb", "redis", "chroma"]
        .iter()
        .any(|d| dir.join(d).is_dir())
}

/// Tells what `path` is. Refuses, with one line, what is none of the known sources.
pub fn detect(path: &Path) -> Result<Source> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let none = |parts| Source {
        parts,
        seed_time: None,
    };
    if meta.is_dir() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if is_seed_set(path) {
            let parts = seed_parts(path);
            if parts.is_empty() {
                return Err(refuse(path, "a seed-layout set holding no engine's backup"));
            }
            return Ok(Source {
                parts,
                seed_time: name.as_deref().and_then(parse_set_name),
            });
        }
        if path.join("chroma.sqlite3").is_file() {
            return Ok(none(vec![Part::ChromaCopy(path.to_owned())]));
        }
        if is_aof_dir(path) {
            return Ok(none(vec![Part::Aof(path.to_owned())]));
        }
        if mongo::looks_like_dump(path) {
            return Ok(none(vec![Part::MongoDir(path.to_owned())]));
        }
        let empty = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .next()
            .is_none();
        return Err(refuse(
            path,
            if empty {
                "an empty directory"
            } else {
                "not a backup this build imports (no seed layout, mongodump, AOF or Chroma files)"
            },
        ));
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .map_err(|e| Error::io(path, e))?;
    if head.is_empty() {
        return Err(refuse(path, "an empty file"));
    }
    if rdb::is_rdb(&head) {
        return Ok(none(vec![Part::Rdb(path.to_owned())]));
    }
    if mongo::is_archive(path) {
        return Ok(none(vec![Part::MongoArchive(path.to_owned())]));
    }
    let aof_name = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains(".aof"));
    if aof_name || head[0] == b'*' {
        return Ok(none(vec![Part::Aof(path.to_owned())]));
    }
    if head.starts_with(b"SQLite format 3\0") {
        return Ok(none(vec![Part::ChromaCopy(path.to_owned())]));
    }
    Err(refuse(
        path,
        "byte 0: not a backup this build imports (no RDB, mongodump archive or AOF header)",
    ))
}

/// SHA-256 over the source's files in sorted order of their relative paths: each path, a NUL,
/// its size (8 bytes, little-endian) and its bytes. Symbolic links are followed.
pub fn content_hash(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        collect(path, path, &mut files)?;
    } else {
        files.push((
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path.to_owned(),
        ));
    }
    files.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for (rel, p) in files {
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let len = f.metadata().map_err(|e| Error::io(&p, e))?.len();
        h.update(rel.as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::io(&p, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            collect(root, &p, out)?;
        } else {
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            out.push((rel, p));
        }
    }
    Ok(())
}

/// The newest modification time of the source's files (a source that is not a seed-layout
/// set says nothing more reliable about when it was taken).
fn newest_mtime(path: &Path) -> Result<DateTime<Utc>> {
    let mut files = Vec::new();
    if path.is_dir() {
        collect(path, path, &mut files)?;
    } else {
        files.push((String::new(), path.to_owned()));
    }
    let mut newest = None;
    for (_, p) in files {
        let t = rdb::file_time(&p)?;
        newest = newest.max(Some(t));
    }
    match newest {
        Some(t) => Ok(t),
        None => rdb::file_time(path),
    }
}

/// `--time`: RFC 3339 or the set-name format, in UTC.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>> {
    if let Some(t) = parse_set_name(s) {
        return Ok(t);
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::config(format!(
                "--time {s:?}: not an RFC 3339 time or YYYY-MM-DD_HH-MM-SS"
            ))
        })
}

/// The set already imported from this source with this content, if any.
fn already_imported(repo: &Repo, mark: &Imported) -> Result<Option<String>> {
    Ok(repo
        .list()?
        .into_iter()
        .find(|s| {
            s.manifest
                .as_ref()
                .is_ok_and(|m| m.imported.as_ref() == Some(mark))
        })
        .map(|s| s.id))
}

/// Imports `path` as one set. Returns `None` when the same source with the same content was
/// imported before (that set's id is logged).
pub async fn import(
    cfg: &Config,
    path: &Path,
    time: Option<&str>,
    cancel: &CancellationToken,
) -> Result<Option<Manifest>> {
    let time = time.map(parse_time).transpose()?;
    if !path.exists() {
        return Err(Error::config(format!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let abs = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
    let (src, mark, at) = {
        let abs = abs.clone();
        tokio::task::spawn_blocking(move || -> Result<(Source, Imported, DateTime<Utc>)> {
            let src = detect(&abs)?;
            let mark = Imported {
                source: abs.display().to_string(),
                sha256: content_hash(&abs)?,
            };
            let at = match (time, src.seed_time) {
                (Some(t), _) | (None, Some(t)) => t,
                (None, None) => newest_mtime(&abs)?,
            };
            Ok((src, mark, at))
        })
        .await
        .map_err(|e| Error::engine("import", format!("task failed: {e}")))??
    };
    let repo = cfg.open_repo()?;
    let lock = repo.lock(cfg.lock_wait).await?;
    if let Some(id) = already_imported(&repo, &mark)? {
        info!(source = %mark.source, set = %id, "already imported with this content: nothing to do");
        return Ok(None);
    }
    let id = set_name(at);
    if repo.has_set(&id)? {
        return Err(Error::repo(
            repo.local_root().unwrap_or(Path::new(".")),
            format!(
                "already holds set {id} (not imported from {}); refusing to replace it: give another --time",
                mark.source
            ),
        ));
    }
    let mut set = repo.begin_set(&lock, at)?;
    if set.id() != id {
        return Err(Error::repo(
            set.location(),
            format!("set {id} is being written by another process; refusing to import over it"),
        ));
    }
    info!(set = %id, source = %mark.source, parts = src.parts.len(), encrypted = repo.crypto().is_some(), "import started");
    let c = cancel.clone();
    let manifest = tokio::task::spawn_blocking(move || -> Result<Manifest> {
        for part in &src.parts {
            let kind = part.kind();
            let entry = part.import(set.engine_writer(kind)?, &c)?;
            info!(engine = %kind, records = entry.total_records(), stored_bytes = entry.stored_bytes(), "engine imported");
            set.add_engine(kind, entry);
        }
        if c.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        set.mark_imported(mark);
        set.publish()
    })
    .await
    .map_err(|e| Error::engine("import", format!("task failed: {e}")))??;
    // The deep verify of the new set: every record decoded and counted again. A set that
    // fails it is removed: an import never leaves a set that does not verify.
    let (r2, id2, c) = (repo.clone(), id.clone(), cancel.clone());
    let verdict = tokio::task::spawn_blocking(move || -> Result<()> {
        let set = r2.resolve(&id2, None)?;
        r2.verify_recorded(&set, crate::engine::DEEP, &c)
            .map(|_| ())
    })
    .await
    .map_err(|e| Error::engine("import", format!("task failed: {e}")))?;
    if let Err(e) = verdict {
        warn!(set = %id, error = %e, "the imported set fails its deep verify: removed");
        let _ = repo.delete_set(&id);
        return Err(e);
    }
    drop(lock);
    info!(set = %id, records = manifest.engines.values().map(|e| e.total_records()).sum::<u64>(), "import published and deep-verified");
    println!("{id}");
    copy_off_host(cfg, &repo, &id, cancel).await?;
    Ok(Some(manifest))
}

/// The off-host copy, as `backup` makes it.
async fn copy_off_host(
    cfg: &Config,
    local: &Repo,
    id: &str,
    cancel: &CancellationToken,
) -> Result<()> {
    let Some(remote) = cfg.open_remote()? else {
        return Ok(());
    };
    super::remote::sync(cfg, local, &remote, cancel)
        .await
        .map(|_| ())
        .map_err(|e| match e {
            Error::Interrupted(n) => Error::Interrupted(n),
            e => Error::repo(
                remote.display(),
                format!("set {id} is safe in the repository, but copying it failed: {e:#}"),
            ),
        })
}

/// `import --all DIR`: every seed-layout set directly under `dir` (named
/// `YYYY-MM-DD_HH-MM-SS`), oldest first; those already imported with the same content are
/// skipped. Stops at the first that fails.
pub async fn import_all(cfg: &Config, dir: &Path, cancel: &CancellationToken) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::config(format!("{}: no such directory", dir.display()))
        }
        _ => Error::io(dir, e),
    })?;
    let mut sets: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_set_name)
                    .is_some()
        })
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err(refuse(
            dir,
            "holds no seed-layout set (YYYY-MM-DD_HH-MM-SS/)",
        ));
    }
    let (mut imported, mut skipped) = (0, 0);
    for p in &sets {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        match import(cfg, p, None, cancel).await? {
            Some(_) => imported += 1,
            None => skipped += 1,
        }
    }
    info!(dir = %dir.display(), imported, skipped, "import --all finished");
    Ok(())
}
