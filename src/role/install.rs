//! `dbkeeper install DIR`: copies the running binary and its role names into a directory
//! (a shared volume), so that containers whose images have no shell and no client tools can
//! run `dbkeeper-health` from a read-only mount.
//!
//! The role names are relative symlinks (`dbkeeper-health -> dbkeeper`): exec resolves them
//! inside the mount whether it is read-only or not, argv[0] stays the link's name (which is
//! how the multi-call binary picks its role), and a later install that replaces `dbkeeper`
//! updates every name at once (hard links would keep pointing at the old inode).
//!
//! `--own PATH=UID:GID` first hands directories to the user the other containers run as (the
//! install container is the stack's one root container besides the Redis preseed): a backup
//! directory the engine created root-owned, or one written by an older root-run stack.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::info;

use crate::error::{Error, Result};

/// The binary's file name in DIR, and the role names that point at it.
pub const BINARY: &str = "dbkeeper";
pub const ROLE_LINKS: [&str; 2] = ["dbkeeper-health", "dbkeeper-init"];

pub use crate::cli::{Own, parse_own};

/// Hands every tree of `own` over, then installs the binary into `dir`.
pub fn own_and_install(own: &[Own], dir: &Path) -> Result<()> {
    for o in own {
        let changed = own_tree(o)?;
        info!(path = %o.path.display(), uid = o.uid, gid = o.gid, changed, "ownership handed over");
    }
    install(dir)
}

/// Gives `own.path` and everything under it that is not already `uid:gid`'s to them, like the
/// database images' entrypoints do with their data directories (`find . ! -user … -exec
/// chown`). Symlinks are changed themselves, never followed; a mount point of another
/// filesystem inside the tree is left alone (`find -xdev`). Returns how many entries changed.
/// Hand-written over std (a stack of directories and `lchown`): a dozen lines, not worth a
/// directory-walking dependency for one init step.
pub fn own_tree(own: &Own) -> Result<u64> {
    let root = &own.path;
    let meta = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            root,
            io::Error::new(io::ErrorKind::NotADirectory, "--own needs a directory"),
        ));
    }
    let dev = meta.dev();
    let mut changed = 0u64;
    let mut stack = vec![(root.clone(), meta)];
    while let Some((path, meta)) = stack.pop() {
        if (meta.uid(), meta.gid()) != (own.uid, own.gid) {
            std::os::unix::fs::lchown(&path, Some(own.uid), Some(own.gid))
                .map_err(|e| Error::io(&path, e))?;
            changed += 1;
        }
        if !meta.is_dir() {
            continue;
        }
        for entry in fs::read_dir(&path).map_err(|e| Error::io(&path, e))? {
            let entry = entry.map_err(|e| Error::io(&path, e))?;
            let child = entry.path();
            let m = match fs::symlink_metadata(&child) {
                Ok(m) => m,
                // Removed meanwhile (a temp file of a still-running writer): nothing to own.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&child, e)),
            };
            if m.dev() == dev {
                stack.push((child, m));
            }
        }
    }
    Ok(changed)
}

/// Installs the running executable into `dir` (created if missing). Idempotent: a second run
/// replaces every file atomically, so a container executing the old binary is never disturbed.
pub fn install(dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("/proc/self/exe", e))?;
    install_from(&exe, dir)
}

/// [`install`] from an explicit source binary.
pub fn install_from(exe: &Path, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::io(
            dir,
            io::Error::new(
                io::ErrorKind::NotADirectory,
                "exists and is not a directory",
            ),
        ));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let target = dir.join(BINARY);
    let tmp = temp_name(dir, BINARY);
    let bytes = copy_executable(exe, &tmp).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    fs::rename(&tmp, &target).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(&target, e)
    })?;
    for name in ROLE_LINKS {
        let link = dir.join(name);
        let tmp = temp_name(dir, name);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(BINARY, &tmp).map_err(|e| Error::io(&tmp, e))?;
        // rename over an existing file, symlink or stale copy is atomic; a directory in the
        // way is refused by rename and reported.
        fs::rename(&tmp, &link).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(&link, e)
        })?;
    }
    sync_dir(dir)?;
    info!(dir = %dir.display(), bytes, links = ?ROLE_LINKS, "dbkeeper installed");
    Ok(())
}

fn temp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Copies `src` to a new file `dst` with mode 0755 and fsyncs it. Returns the byte count.
fn copy_executable(src: &Path, dst: &Path) -> Result<u64> {
    let mut from = fs::File::open(src).map_err(|e| Error::io(src, e))?;
    let _ = fs::remove_file(dst);
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(dst)
        .map_err(|e| Error::io(dst, e))?;
    let bytes = io::copy(&mut from, &mut to).map_err(|e| Error::io(dst, e))?;
    // The umask may have narrowed the mode given to open: set it explicitly.
    to.set_permissions(fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(dst, e))?;
    to.sync_all().map_err(|e| Error::io(dst, e))?;
    Ok(bytes)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}
