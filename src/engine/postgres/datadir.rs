//! The pre-start preseed of an empty PGDATA: the set is verified whole first (every file
//! against the backup manifest, the WAL range present), then its base archive, WAL included,
//! is unpacked into a temp directory inside PGDATA with PostgreSQL's modes (0700 directories,
//! 0600 files) and the directory's owner, fsynced, and moved into place with `PG_VERSION`
//! last. The server then recovers to the backup's end on its first start (`backup_label`).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ENGINE;
use crate::engine::Emptiness;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Our temp directory inside PGDATA while a preseed runs.
pub(crate) const TMP_PREFIX: &str = ".dbkeeper-preseed-";

/// The major version of the server that will run on the directory: `DBKEEPER_POSTGRES_MAJOR`,
/// else the official image's `PG_MAJOR`. None when neither is set (no check possible).
fn target_major() -> Option<(String, &'static str)> {
    for var in ["DBKEEPER_POSTGRES_MAJOR", "PG_MAJOR"] {
        if let Ok(v) = std::env::var(var) {
            let v = v.trim().to_owned();
            if !v.is_empty() {
                return Some((v, var));
            }
        }
    }
    None
}

fn chown_like(path: &Path, owner: (u32, u32)) -> Result<()> {
    use nix::unistd::{Gid, Uid};
    if owner == (Uid::effective().as_raw(), Gid::effective().as_raw()) {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1)).map_err(|e| {
        Error::io(
            path,
            io::Error::other(format!(
                "cannot give it to uid {} gid {} (the data directory's owner): {e}",
                owner.0, owner.1
            )),
        )
    })
}

/// Sets modes and owner, and fsyncs, every entry under `root` (depth first).
fn settle(root: &Path, owner: (u32, u32)) -> Result<()> {
    for e in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let p = e.map_err(|e| Error::io(root, e))?.path();
        let meta = fs::symlink_metadata(&p).map_err(|e| Error::io(&p, e))?;
        if meta.is_dir() {
            settle(&p, owner)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(&p, e))?;
        } else if meta.is_file() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                .map_err(|e| Error::io(&p, e))?;
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
        chown_like(&p, owner)?;
    }
    File::open(root)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(root, e))
}

pub fn preseed_data_dir(dir: &Path, set: &SetReader, entry: &EngineEntry) -> Result<()> {
    preseed_with(dir, set, entry, None)
}

/// Work done on the unpacked directory before it is settled and moved into place (the WAL
/// and settings of a point-in-time recovery).
pub(crate) type Extra<'a> = &'a dyn Fn(&Path) -> Result<()>;

pub(crate) fn preseed_with(
    dir: &Path,
    set: &SetReader,
    entry: &EngineEntry,
    extra: Option<Extra>,
) -> Result<()> {
    let meta = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    let owner = (meta.uid(), meta.gid());
    let set_major = entry
        .details
        .get("major")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            entry
                .server_version
                .split('.')
                .next()
                .unwrap_or("")
                .to_owned()
        });
    match target_major() {
        Some((target, var)) if target != set_major => {
            return Err(Error::config(format!(
                "set {} holds a PostgreSQL {set_major} backup and the server is PostgreSQL {target} ({var}); a physical backup only starts on its own major version",
                set.id()
            )));
        }
        Some(_) => {}
        None => warn!(
            engine = ENGINE,
            set_major = %set_major,
            "neither DBKEEPER_POSTGRES_MAJOR nor PG_MAJOR is set: the server's major version is not checked against the set's"
        ),
    }
    let archives: Vec<_> = entry
        .files
        .iter()
        .filter(|f| f.path.ends_with(".tar.zst"))
        .collect();
    if archives.len() != 1 || archives[0].path != "postgres/base.tar.zst" {
        return Err(Error::config(format!(
            "set {}: its PostgreSQL backup has tablespaces ({} archives); preseeding them is not supported",
            set.id(),
            archives.len()
        )));
    }
    // Leftovers of an interrupted preseed.
    for e in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    // The whole set is checked before a byte is written.
    super::verify::verify_deep(set, entry, &CancellationToken::new())?;

    let tmp = dir.join(format!("{TMP_PREFIX}{}", std::process::id()));
    let result = unpack(set, archives[0], &tmp)
        .and_then(|()| extra.map_or(Ok(()), |f| f(&tmp)))
        .and_then(|()| settle(&tmp, owner));
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Into place, PG_VERSION last: until it is there the directory is not a cluster and a
    // preseed that stopped half-way is done again.
    let mut names: Vec<PathBuf> = fs::read_dir(&tmp)
        .map_err(|e| Error::io(&tmp, e))?
        .map(|e| e.map(|e| e.path()).map_err(|err| Error::io(&tmp, err)))
        .collect::<Result<_>>()?;
    names.sort_by_key(|p| p.file_name().is_some_and(|n| n == "PG_VERSION"));
    for from in names {
        let to = dir.join(from.file_name().expect("a name"));
        if let Ok(m) = fs::symlink_metadata(&to) {
            // Only an earlier interrupted preseed's entries can be here (no PG_VERSION).
            if m.is_dir() {
                fs::remove_dir_all(&to).map_err(|e| Error::io(&to, e))?;
            } else {
                fs::remove_file(&to).map_err(|e| Error::io(&to, e))?;
            }
        }
        fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    }
    fs::remove_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(dir, e))?;
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    if extra.is_none() {
        info!(engine = ENGINE, dir = %dir.display(), set = set.id(), "PGDATA preseeded; the server recovers to the backup's end on start");
    }
    Ok(())
}

fn unpack(set: &SetReader, file: &crate::repo::manifest::FileEntry, tmp: &Path) -> Result<()> {
    fs::create_dir(tmp).map_err(|e| Error::io(tmp, e))?;
    let reader = set.open_file(file)?;
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(false);
    tar.set_overwrite(false);
    let entries = tar
        .entries()
        .map_err(|e| Error::corrupt(set.id(), format!("postgres: base.tar: {e}")))?;
    for e in entries {
        let mut e = e.map_err(|e| Error::corrupt(set.id(), format!("postgres: base.tar: {e}")))?;
        let ok = e.unpack_in(tmp).map_err(|err| Error::io(tmp, err))?;
        if !ok {
            return Err(Error::corrupt(
                set.id(),
                format!(
                    "postgres: base.tar: {} points outside the data directory",
                    String::from_utf8_lossy(&e.path_bytes())
                ),
            ));
        }
    }
    let mut inner = tar.into_inner();
    io::copy(&mut inner, &mut io::sink()).map_err(|e| inner.error(e))?;
    inner.finish()
}

/// Whether a PostgreSQL data directory may be preseeded: one holding `PG_VERSION` is a
/// cluster and is never touched; our temp directory alone is an interrupted preseed.
pub fn data_dir_state(dir: &Path) -> Result<Emptiness> {
    let meta = fs::metadata(dir).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::config(format!(
                "DBKEEPER_POSTGRES_DATA_DIR {}: no such directory; mount the PostgreSQL data volume there",
                dir.display()
            ))
        } else {
            Error::io(dir, e)
        }
    })?;
    if !meta.is_dir() {
        return Err(Error::config(format!(
            "DBKEEPER_POSTGRES_DATA_DIR {}: not a directory",
            dir.display()
        )));
    }
    let version = dir.join("PG_VERSION");
    if version.exists() {
        let v = fs::read_to_string(&version).unwrap_or_default();
        return Ok(Emptiness::HasData(format!(
            "{} holds a PostgreSQL {} cluster (PG_VERSION)",
            dir.display(),
            v.trim()
        )));
    }
    Ok(Emptiness::Empty)
}
