//! The off-host copy (`DBKEEPER_REMOTE`): verified sets of the repository uploaded byte for
//! byte (still compressed, still encrypted), then the remote's own retention.

use std::collections::BTreeSet;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::reader::SetReader;
use crate::repo::{self, Repo, VerifyLevel};

/// What one synchronisation did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub uploaded: Vec<String>,
    pub bytes: u64,
    /// Sets the remote's retention deleted.
    pub deleted: Vec<String>,
    /// The newest set the remote holds afterwards, and when it was started.
    pub newest: Option<(String, chrono::DateTime<chrono::Utc>)>,
}

/// Uploads every set of `local` that verifies, is missing from `remote` and is newer than the
/// remote's newest set (so an upload that failed is retried by the next run, and sets the
/// remote's retention already dropped are not sent again), newest first; then applies the
/// remote's retention. Holds the remote's writer lock throughout.
pub async fn sync(
    cfg: &Config,
    local: &Repo,
    remote: &Repo,
    cancel: &CancellationToken,
) -> Result<SyncReport> {
    let lock = remote.lock(cfg.lock_wait).await?;
    let (local2, remote2, c) = (local.clone(), remote.clone(), cancel.clone());
    let mut report = tokio::task::spawn_blocking(move || -> Result<SyncReport> {
        let lock = lock;
        let mut report = SyncReport::default();
        let listed = remote2.list()?;
        // A set there whose manifest does not read is still there: never overwritten.
        let there: BTreeSet<String> = listed.iter().map(|s| s.id.clone()).collect();
        let newest_there = listed
            .iter()
            .filter(|s| s.manifest.is_ok())
            .map(|s| s.id.clone())
            .max();
        for info in local2.list()? {
            if c.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
            if there.contains(&info.id) || newest_there.as_ref().is_some_and(|n| info.id < *n) {
                continue;
            }
            let set = match info
                .reader()
                .and_then(|r| repo::verify(&r, VerifyLevel::Checksums, &c).map(|_| r))
            {
                Ok(r) => r,
                Err(Error::Interrupted(n)) => return Err(Error::Interrupted(n)),
                Err(e) => {
                    warn!(set = %info.id, error = %e, "not copied to the remote: does not verify");
                    continue;
                }
            };
            let t = Instant::now();
            let bytes = copy_set(&set, &remote2, &lock, &c)?;
            info!(
                set = %set.id(),
                remote = %remote2.display(),
                bytes,
                elapsed_ms = t.elapsed().as_millis() as u64,
                "set copied to the remote"
            );
            report.uploaded.push(set.id().to_owned());
            report.bytes += bytes;
        }
        drop(lock);
        Ok(report)
    })
    .await
    .map_err(|e| Error::engine("remote", format!("task failed: {e}")))??;
    let decision = super::prune::prune_repo(
        remote.clone(),
        cfg.remote_retention,
        cfg.lock_wait,
        false,
        false,
        cancel,
    )
    .await?;
    report.deleted = decision.delete;
    let remote3 = remote.clone();
    report.newest = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok(remote3
            .list()?
            .into_iter()
            .find(|s| s.manifest.is_ok())
            .map(|s| (s.id, s.time)))
    })
    .await
    .map_err(|e| Error::engine("remote", format!("task failed: {e}")))??;
    Ok(report)
}

/// Copies one set: every stored file, checked against the manifest as it streams, then the
/// manifest exactly as stored, last. Returns the bytes copied.
pub fn copy_set(
    set: &SetReader,
    to: &Repo,
    lock: &repo::RepoLock,
    cancel: &CancellationToken,
) -> Result<u64> {
    let writer = to.begin_copy(lock, set)?;
    let mut bytes = 0;
    for f in set.manifest.stored_files() {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let mut from = set.open_stored(f)?;
        writer.copy_file(f, &mut from)?;
        bytes += f.size;
    }
    writer.publish_bytes(&set.raw_manifest)?;
    Ok(bytes + set.raw_manifest.len() as u64)
}
