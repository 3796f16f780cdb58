//! `dbkeeper init` (the compose init container): wait for every engine under one deadline
//! (after its one-time set-up: a MongoDB replica set is initiated), then preseed each empty one
//! from the newest good set. One log line per engine outcome.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;
use crate::engine::EngineOps;
use crate::error::{Error, Result};
use crate::role::{restore, wait};

/// Exits 0 only when every engine is ready and seeded or legitimately skipped (holds data,
/// or a first start with no backup). Every engine is tried, so one failure does not hide
/// another; the first error decides the exit code.
pub async fn init(
    cfg: &Config,
    timeout: Duration,
    migrations: Option<&std::path::Path>,
    cancel: &CancellationToken,
) -> Result<()> {
    info!(config = %cfg.describe(), "dbkeeper init");
    let (engines, dir_only) = cfg.preseed_targets(&[])?;
    // A bad migrations directory is found before any engine is waited for.
    let guard = restore::SchemaGuard::load(migrations)?;
    // An engine preseeded through its data directory is not running yet: don't wait for it.
    let live: Vec<_> = engines
        .iter()
        .filter(|e| !cfg.data_dirs.contains_key(&e.kind()))
        .collect();
    let deadline = Instant::now() + timeout;
    // `prepare` first (a MongoDB replica set is initiated there): readiness may need it.
    let waited = join_all(live.iter().map(|e| async move {
        e.prepare(deadline, cancel).await?;
        wait::wait_one(e, deadline, cancel).await
    }))
    .await;
    let mut first: Option<Error> = None;
    for (e, r) in live.iter().zip(waited) {
        if let Err(err) = r {
            if !matches!(err, Error::Interrupted(_)) {
                error!(engine = %e.kind(), url = e.display_url(), error = %err, "not ready");
            }
            first.get_or_insert(err);
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    for e in &engines {
        // `preseed` logs the outcome line of an engine it handled.
        match restore::preseed(cfg, std::slice::from_ref(e), &guard, cancel).await {
            Ok(_) => {}
            Err(Error::Interrupted(n)) => return Err(Error::Interrupted(n)),
            Err(err) => {
                error!(engine = %e.kind(), url = e.display_url(), error = %err, "preseed failed");
                first.get_or_insert(err);
            }
        }
    }
    for &kind in &dir_only {
        match restore::preseed_dir_only(cfg, kind, &guard).await {
            Ok(()) => {}
            Err(Error::Interrupted(n)) => return Err(Error::Interrupted(n)),
            Err(err) => {
                error!(engine = %kind, error = %err, "preseed failed");
                first.get_or_insert(err);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => {
            info!(
                engines = engines.len() + dir_only.len(),
                "init done: every engine is ready and seeded"
            );
            Ok(())
        }
    }
}
