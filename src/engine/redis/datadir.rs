//! The data directory of a server that is not running: its state, and the pre-start preseed.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Instant;

use tracing::info;

use crate::engine::Emptiness;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

use super::*;

pub(super) const RDB_NAME: &str = "dump.rdb";
pub(super) const AOF_DIR: &str = "appendonlydir";
pub(super) const AOF_BASE: &str = "appendonly.aof.1.base.rdb";
pub(super) const AOF_INCR: &str = "appendonly.aof.1.incr.aof";
pub(super) const AOF_MANIFEST: &str = "appendonly.aof.manifest";
pub(super) const TMP_RDB: &str = ".dump.rdb.tmp-";
pub(super) const TMP_AOF: &str = ".appendonlydir.tmp-";

pub(super) fn dir_error(dir: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::config(format!(
            "DBKEEPER_REDIS_DATA_DIR {}: no such directory; mount the Redis data volume there",
            dir.display()
        ))
    } else {
        Error::io(dir, e)
    }
}

/// Whether a Redis data directory (server not running) holds an RDB or AOF. Our own temp
/// files never count as data; a half-published preseed (its AOF directory still a temp)
/// reports `Interrupted`.
pub fn data_dir_state(dir: &Path) -> Result<Emptiness> {
    let mut found = Vec::new();
    let mut half_done = false;
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with(TMP_AOF) {
            half_done = true;
        } else if name.starts_with('.') || name.starts_with("temp-") {
            // Ours, or the server's own unfinished saves (`temp-<pid>.rdb`), never loaded.
            continue;
        } else if path.is_file() && (name.ends_with(".rdb") || name.starts_with("appendonly.aof")) {
            found.push(name);
        } else if path.is_dir()
            && fs::read_dir(&path)
                .map_err(|e| Error::io(&path, e))?
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(".manifest"))
        {
            found.push(format!("{name}/"));
        }
    }
    Ok(if half_done {
        Emptiness::Interrupted
    } else if found.is_empty() {
        Emptiness::Empty
    } else {
        found.sort();
        Emptiness::HasData(format!("{} holds {}", dir.display(), found.join(", ")))
    })
}

pub(super) fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}

/// Gives `path` to the data directory's owner (the Redis image runs as uid 999).
pub(super) fn chown_like(path: &Path, owner: (u32, u32)) -> Result<()> {
    use nix::unistd::{Gid, Uid, chown};
    if owner == (Uid::effective().as_raw(), Gid::effective().as_raw()) {
        return Ok(());
    }
    chown(
        path,
        Some(Uid::from_raw(owner.0)),
        Some(Gid::from_raw(owner.1)),
    )
    .map_err(|e| {
        Error::io(
            path,
            io::Error::other(format!(
                "cannot give it to uid {} gid {} (the data directory's owner): {e}",
                owner.0, owner.1
            )),
        )
    })
}

/// Writes the set's RDB into an empty data directory so the server loads it on start, with
/// `appendonly no` (from `dump.rdb`) or `appendonly yes` (from a multi-part AOF whose base is
/// the same RDB; Redis 7 ignores a lone `dump.rdb` when AOF is on). Everything is built under
/// temp names and renamed into place, so an interruption leaves only temps.
/// How often a restore written to the data directory hands its pages to write-back.
pub(super) const WRITE_BACK_EVERY: u64 = 8 << 20;

/// Writes the stored file, decompressed, to `path` and fsyncs it; its checksum is checked
/// before this returns. A read (or checksum) failure is the set's, a write failure the disk's.
pub(super) fn write_checked(
    set: &SetReader,
    file: &crate::repo::manifest::FileEntry,
    path: &Path,
) -> Result<u64> {
    let mut reader = set.open_file(file)?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let mut flushed = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(reader.error(e)),
        };
        f.write_all(&buf[..n]).map_err(|e| Error::io(path, e))?;
        bytes += n as u64;
        // Start the write-back of what is written as the restore goes, so the final fsync
        // finds little left (and the page cache is not filled with a file Redis reads once).
        // Advice only: the fsync below is what makes the file durable.
        if bytes - flushed >= WRITE_BACK_EVERY {
            use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
            let _ = posix_fadvise(
                &f,
                flushed as i64,
                (bytes - flushed) as i64,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            flushed = bytes;
        }
    }
    reader.finish()?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

pub fn preseed_data_dir(dir: &Path, set: &SetReader, entry: &EngineEntry) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(|e| dir_error(dir, e))?;
    let owner = (meta.uid(), meta.gid());
    // Leftovers of an interrupted preseed.
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_RDB) {
            fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        } else if name.starts_with(TMP_AOF) {
            fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    if super::aof::is_aof(entry) {
        return super::aof::preseed_aof(dir, set, entry);
    }
    let file = entry
        .file(&format!("redis/{DUMP_REL}.zst"))
        .ok_or_else(|| Error::corrupt(set.id(), "its redis part has no dump.rdb.zst"))?;
    let pid = std::process::id();
    let tmp_rdb = dir.join(format!("{TMP_RDB}{pid}"));
    let tmp_aof = dir.join(format!("{TMP_AOF}{pid}"));
    let start = Instant::now();

    let bytes = match write_checked(set, file, &tmp_rdb) {
        Ok(n) => n,
        Err(e) => {
            // A set that fails its checksum leaves nothing behind for the next one tried.
            let _ = fs::remove_file(&tmp_rdb);
            return Err(e);
        }
    };
    chown_like(&tmp_rdb, owner)?;

    fs::create_dir(&tmp_aof).map_err(|e| Error::io(&tmp_aof, e))?;
    let base = tmp_aof.join(AOF_BASE);
    // A hard link costs no space; Redis replaces both names by rename, never in place.
    if fs::hard_link(&tmp_rdb, &base).is_err() {
        fs::copy(&tmp_rdb, &base).map_err(|e| Error::io(&base, e))?;
        fsync_path(&base)?;
    }
    let incr = tmp_aof.join(AOF_INCR);
    File::create(&incr)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&incr, e))?;
    let manifest = tmp_aof.join(AOF_MANIFEST);
    let text = format!("file {AOF_BASE} seq 1 type b\nfile {AOF_INCR} seq 1 type i\n");
    File::create(&manifest)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| Error::io(&manifest, e))?;
    for p in [&base, &incr, &manifest, &tmp_aof] {
        chown_like(p, owner)?;
    }
    fsync_path(&tmp_aof)?;

    // dump.rdb first: while the AOF directory is still a temp, `data_dir_state` reports the
    // preseed as interrupted, so a crash between the renames is redone, not skipped.
    let rdb_path = dir.join(RDB_NAME);
    fs::rename(&tmp_rdb, &rdb_path).map_err(|e| Error::io(&rdb_path, e))?;
    fsync_path(dir)?;
    install_aof_dir(dir, &tmp_aof)?;
    info!(
        engine = ENGINE,
        dir = %dir.display(),
        set = set.id(),
        bytes,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "data directory preseeded (dump.rdb and appendonlydir/)"
    );
    Ok(())
}

/// Puts a checked `appendonlydir/` built under a temp name into place, replacing what an
/// interrupted earlier preseed left (only such a preseed gets here: `data_dir_state` said no
/// data), and makes the rename durable.
pub(super) fn install_aof_dir(dir: &Path, tmp: &Path) -> Result<()> {
    let aof_path = dir.join(AOF_DIR);
    if aof_path.exists() {
        fs::remove_dir_all(&aof_path).map_err(|e| Error::io(&aof_path, e))?;
    }
    fs::rename(tmp, &aof_path).map_err(|e| Error::io(&aof_path, e))?;
    fsync_path(dir)
}
