//! The repository's writer lock: one backup or prune at a time, across processes and
//! containers sharing the volume (`flock` on `<repo>/.lock`, released by the kernel if the
//! holder dies, so a SIGKILLed backup never leaves the repository locked). On object storage
//! the lock is an object with a lease (see `s3`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::info;

use crate::error::{Error, Result};

pub const LOCK_FILE: &str = ".lock";
/// Held by a sidecar for as long as it runs: a second sidecar on the same repository (two
/// stacks pointed at one bucket, say) would write colliding sets and prune each other's.
pub const SIDECAR_LOCK_FILE: &str = ".sidecar.lock";

/// Held while writing; dropping it releases the lock.
#[derive(Debug)]
pub enum RepoLock {
    Local(LocalLock),
    S3(super::s3::S3Lock),
}

#[derive(Debug)]
pub struct LocalLock {
    _file: File,
    path: PathBuf,
}

/// Who holds a lock, for the message a second writer prints.
pub(super) fn holder_note() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "pid {} on {} since {}",
        std::process::id(),
        host.trim(),
        chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")
    )
}

impl LocalLock {
    pub(super) async fn acquire(root: &Path, name: &str, wait: Duration) -> Result<LocalLock> {
        let path = root.join(name);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                // EROFS: a repository mounted read-only can be read (list, verify, preseed,
                // restore) but not written; that is a repository problem (exit 4).
                Some(30) => Error::repo(
                    root,
                    "read-only file system: a writer needs the repository mounted read-write",
                ),
                _ => Error::io(&path, e),
            })?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut announced = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::Locked {
                            path: root.to_owned(),
                            holder: holder(&mut file),
                        });
                    }
                    if !announced {
                        info!(holder = %holder(&mut file), "waiting for the repository lock");
                        announced = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        let _ = file
            .set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(holder_note().as_bytes()));
        Ok(LocalLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn holder(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.rewind().and_then(|_| file.read_to_string(&mut s));
    let s = s.trim();
    if s.is_empty() {
        "another dbkeeper process".to_owned()
    } else {
        format!("another dbkeeper process ({s})")
    }
}
