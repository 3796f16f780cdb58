//! `dbkeeper export ID DIR --format mongodump|rdb|seed`: a set written out in the stock
//! layouts other tools read. The files are checked against the manifest as they are read,
//! written under a temp name beside DIR and renamed into place at the end: DIR never holds a
//! half-written export, and an existing, non-empty DIR is never touched.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::engine::EngineKind;
use crate::engine::chroma::datacopy;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An uncompressed mongodump directory (`<db>/<coll>.bson`, `.metadata.json`).
    Mongodump,
    /// A plain `dump.rdb`.
    Rdb,
    /// The seed's layout: `<set-time>/mongodb/mongodb_backup/…`, `redis/dump.rdb`, `chroma/`.
    Seed,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "mongodump" => Ok(Format::Mongodump),
            "rdb" => Ok(Format::Rdb),
            "seed" => Ok(Format::Seed),
            _ => Err(Error::config(format!(
                "--format {s:?}: expected mongodump, rdb or seed"
            ))),
        }
    }
}

fn refuse(set: &SetReader, why: impl std::fmt::Display) -> Error {
    Error::engine(
        "export",
        format!("set {}: {why}; nothing exported", set.id()),
    )
}

/// Writes `set` into `dir` in `format`.
pub fn export(set: &SetReader, dir: &Path, format: Format) -> Result<()> {
    if dir.exists() {
        let empty = dir.is_dir()
            && fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .next()
                .is_none();
        if !empty {
            return Err(Error::config(format!(
                "{}: exists and is not an empty directory; refusing to write into it",
                dir.display()
            )));
        }
    }
    set.require_key()?;
    let engine = |k: EngineKind| set.manifest.engines.get(&k);
    // Refusals first, before anything is written.
    match format {
        Format::Mongodump if engine(EngineKind::Mongodb).is_none() => {
            return Err(refuse(set, "holds no MongoDB part"));
        }
        Format::Rdb => match engine(EngineKind::Redis) {
            None => return Err(refuse(set, "holds no Redis part")),
            Some(e) if rdb_file(e).is_none() => {
                return Err(refuse(
                    set,
                    "its Redis part is an AOF, not an RDB: export it with --format seed",
                ));
            }
            Some(_) => {}
        },
        _ => {}
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .ok_or_else(|| Error::config(format!("{}: not a directory name", dir.display())))?;
    let tmp = parent.join(format!(
        ".{}.export-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let r = write_all(set, &tmp, format);
    if let Err(e) = r {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        fs::remove_dir(dir).map_err(|e| Error::io(dir, e))?;
    }
    fs::rename(&tmp, dir).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        Error::io(dir, e)
    })?;
    info!(set = set.id(), dir = %dir.display(), ?format, "exported");
    Ok(())
}

fn write_all(set: &SetReader, out: &Path, format: Format) -> Result<()> {
    let engine = |k: EngineKind| set.manifest.engines.get(&k);
    match format {
        Format::Mongodump => mongodump(set, engine(EngineKind::Mongodb).expect("checked"), out),
        Format::Rdb => {
            let e = engine(EngineKind::Redis).expect("checked");
            copy_out(set, e, rdb_file(e).expect("checked"), &out.join("dump.rdb"))
        }
        Format::Seed => {
            let root = out.join(set.id());
            fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
            match engine(EngineKind::Mongodb) {
                Some(e) => mongodump(set, e, &root.join("mongodb/mongodb_backup"))?,
                None => info!(set = set.id(), "no MongoDB part: mongodb/ left out"),
            }
            match engine(EngineKind::Redis) {
                Some(e) => match rdb_file(e) {
                    Some(f) => copy_out(set, e, f, &root.join("redis/dump.rdb"))?,
                    None => {
                        // The AOF's files, under the names the server gave them.
                        for f in &e.files {
                            let rel = plain_name(&f.path, "redis");
                            copy_out(set, e, &f.path, &root.join("redis").join(rel))?;
                        }
                    }
                },
                None => info!(set = set.id(), "no Redis part: redis/ left out"),
            }
            match engine(EngineKind::Chroma) {
                Some(e) if datacopy::is_data_copy(e) => {
                    datacopy::export_data_copy(set, e, &root.join("chroma"))?
                }
                Some(_) => warn!(
                    set = set.id(),
                    "the Chroma part is a logical dump, not a copy of Chroma's data files: chroma/ left out"
                ),
                None => info!(set = set.id(), "no Chroma part: chroma/ left out"),
            }
            Ok(())
        }
    }
}

/// The set path of a Redis part's RDB, none for an AOF.
fn rdb_file(e: &EngineEntry) -> Option<&str> {
    match e.files.as_slice() {
        [f] if f.path == "redis/dump.rdb.zst" => Some(&f.path),
        _ => None,
    }
}

/// `mongodb/db/coll.bson.zst` → `db/coll.bson`.
fn plain_name<'a>(path: &'a str, engine: &str) -> &'a str {
    let p = path
        .strip_prefix(engine)
        .and_then(|p| p.strip_prefix('/'))
        .unwrap_or(path);
    p.strip_suffix(".zst").unwrap_or(p)
}

/// Every file of the MongoDB part, decompressed, under mongodump's names (the set already
/// stores them so: `<db>/<escaped coll>.bson`, `.metadata.json`, `oplog.bson`,
/// `admin/system.users.bson`).
fn mongodump(set: &SetReader, e: &EngineEntry, dir: &Path) -> Result<()> {
    for f in &e.files {
        copy_out(set, e, &f.path, &dir.join(plain_name(&f.path, "mongodb")))?;
    }
    Ok(())
}

/// One stored file, decompressed (and decrypted) to `dest`, checked against the manifest.
fn copy_out(set: &SetReader, e: &EngineEntry, path: &str, dest: &Path) -> Result<()> {
    let f = e
        .file(path)
        .ok_or_else(|| Error::corrupt(set.id(), format!("{path} is not in the manifest")))?;
    if let Some(p) = dest.parent() {
        fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    let mut r = set.open_file(f)?;
    let mut w = io::BufWriter::new(fs::File::create(dest).map_err(|e| Error::io(dest, e))?);
    io::copy(&mut r, &mut w).map_err(|e| r.error(e))?;
    r.finish()?;
    w.into_inner()
        .map_err(|e| Error::io(dest, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io(dest, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names_become_mongodump_names() {
        assert_eq!(
            plain_name("mongodb/db1/caf%C3%A9s.bson.zst", "mongodb"),
            "db1/caf%C3%A9s.bson"
        );
        assert_eq!(
            plain_name("mongodb/oplog.bson.zst", "mongodb"),
            "oplog.bson"
        );
        assert_eq!(plain_name("redis/dump.rdb.zst", "redis"), "dump.rdb");
    }
}
