//! `dbkeeper prune`: apply the retention policy under the writer lock.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::repo::retention::{self, Candidate, Decision, Policy};
use crate::repo::{self, Repo, VerifyLevel};

/// Applies the policy to the repository. `print` lists every decision on stdout (the `prune`
/// verb); the sidecar passes false and gets the deletions in its log only.
pub async fn prune(
    cfg: &Config,
    dry_run: bool,
    print: bool,
    cancel: &CancellationToken,
) -> Result<Decision> {
    prune_repo(
        cfg.open_repo()?,
        cfg.retention,
        cfg.lock_wait,
        dry_run,
        print,
        cancel,
    )
    .await
}

/// Applies `policy` to `repo` (the repository, or the remote with its own policy).
pub async fn prune_repo(
    repo: Repo,
    policy: Policy,
    lock_wait: std::time::Duration,
    dry_run: bool,
    print: bool,
    cancel: &CancellationToken,
) -> Result<Decision> {
    let lock = repo.lock(lock_wait).await?;
    let cancel = cancel.clone();
    let decision = tokio::task::spawn_blocking(move || -> Result<Decision> {
        // Only sets whose checksums verify count toward the policy.
        let mut candidates = Vec::new();
        for info in repo.list()? {
            let good = match info.reader() {
                Ok(r) => match repo::verify(&r, VerifyLevel::Checksums, &cancel) {
                    Ok(_) => true,
                    Err(Error::Interrupted(n)) => return Err(Error::Interrupted(n)),
                    Err(e) => {
                        warn!(set = %info.id, error = %e, "set does not verify; prune leaves it alone");
                        false
                    }
                },
                Err(e) => {
                    warn!(set = %info.id, error = %e, "set does not verify; prune leaves it alone");
                    false
                }
            };
            let (engines, pre_migration) = match &info.manifest {
                Ok(m) => (
                    m.engines.keys().copied().collect(),
                    m.schema
                        .as_ref()
                        .and_then(|s| s.pre_migration.as_ref())
                        .map(|p| p.keys().copied().collect())
                        .unwrap_or_default(),
                ),
                Err(_) => (Vec::new(), Vec::new()),
            };
            candidates.push(Candidate {
                id: info.id,
                time: info.time,
                good,
                engines,
                pre_migration,
            });
        }
        let decision = retention::apply(&policy, &candidates);
        if policy.is_empty() {
            warn!("no retention policy set (all DBKEEPER_KEEP_* are 0): keeping every set");
        }
        let say = |line: String| {
            if print {
                println!("{line}");
            }
        };
        for (id, why) in &decision.keep {
            say(format!("keep    {id}  ({})", why.join(", ")));
        }
        for id in &decision.untouched {
            say(format!(
                "ignore  {id}  (does not verify; not counted, not deleted)"
            ));
        }
        for id in &decision.delete {
            if dry_run {
                say(format!("would delete {id}"));
            } else {
                repo.delete_set(id)?;
                say(format!("deleted {id}"));
                info!(set = %id, repo = %repo.display(), "set deleted by retention");
            }
        }
        super::pitr::prune_segments(&repo, &decision.delete, dry_run, print)?;
        Ok(decision)
    })
    .await
    .map_err(|e| Error::engine("prune", format!("task failed: {e}")))??;
    drop(lock);
    Ok(decision)
}
