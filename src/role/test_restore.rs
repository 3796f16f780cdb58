//! `dbkeeper test-restore`: proves a set restores. Loads it into scratch servers (wiped
//! first: they are scratch by definition), compares the restored counts with the manifest,
//! and wipes the scratch servers again whatever the outcome.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::outcome::{EngineResult, JobStatus};
use crate::config::Config;
use crate::engine::mongodb::pitr::{Plan, SegmentStore};
use crate::engine::{Engine, EngineKind, EngineOps, RestoreOptions};
use crate::error::{Error, Result};
use crate::secret::Secret;

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Report {
    pub set: String,
    pub engines: BTreeMap<EngineKind, EngineResult>,
}

/// Restores `id` (or `latest`) into each scratch URL. Fails (after cleaning every target)
/// when a restore fails or its counts differ from the manifest.
pub async fn test_restore(
    cfg: &Config,
    id: &str,
    scratch: &[Secret],
    cancel: &CancellationToken,
) -> Result<Report> {
    run(cfg, id, scratch, None, cancel).await
}

/// A point-in-time recovery into a scratch MongoDB: the plan's base set, rolled forward to its
/// target.
pub async fn test_restore_pitr(
    cfg: &Config,
    plan: Plan,
    scratch: &[Secret],
    cancel: &CancellationToken,
) -> Result<Report> {
    let id = plan.base.set.clone();
    run(cfg, &id, scratch, Some(plan), cancel).await
}

async fn run(
    cfg: &Config,
    id: &str,
    scratch: &[Secret],
    plan: Option<Plan>,
    cancel: &CancellationToken,
) -> Result<Report> {
    if scratch.is_empty() {
        return Err(Error::config(
            "test-restore needs scratch servers: --into URL[,URL] or DBKEEPER_TEST_RESTORE_REDIS_URL / _MONGODB_URI / _CHROMA_URL",
        ));
    }
    let targets: Vec<Engine> = scratch
        .iter()
        .map(|u| Engine::from_url(u, &cfg.engine_options))
        .collect::<Result<_>>()?;
    let kinds: Vec<EngineKind> = targets.iter().map(|t| t.kind()).collect();
    let only = (kinds.len() == 1).then(|| kinds[0]);
    let set = super::find_set(cfg, id, only).await?;
    set.require_key()?;
    for k in &kinds {
        if !set.manifest.engines.contains_key(k) {
            return Err(Error::repo(
                set.location(),
                format!("set {} holds no {k} backup to test", set.id()),
            ));
        }
    }
    // Every target must answer before any is wiped.
    for t in &targets {
        t.probe(PROBE_TIMEOUT).await?;
    }
    info!(
        set = set.id(),
        targets = targets.len(),
        "test-restore started"
    );
    let mut engines = BTreeMap::new();
    let mut first_error = None;
    for t in &targets {
        let entry = &set.manifest.engines[&t.kind()];
        let start = Instant::now();
        let outcome = async {
            t.wipe().await?;
            let mut opts = RestoreOptions {
                force: true,
                mongo_pitr: None,
            };
            if let (EngineKind::Mongodb, Some(p)) = (t.kind(), &plan) {
                opts.mongo_pitr = Some((SegmentStore::new(cfg.open_repo()?), p.clone()));
            }
            let counts = t.restore(&set, entry, &opts, cancel).await?;
            if counts != entry.counts {
                return Err(Error::corrupt(
                    set.id(),
                    format!(
                        "{}: restored counts {:?} differ from the manifest's {:?}",
                        t.kind(),
                        counts,
                        entry.counts
                    ),
                ));
            }
            Ok(counts.values().sum::<u64>())
        }
        .await;
        // The scratch server is cleaned whatever happened.
        if let Err(e) = t.wipe().await {
            warn!(engine = %t.kind(), url = t.display_url(), error = %e, "cannot wipe the scratch server after the test");
        }
        let elapsed = start.elapsed().as_secs_f64();
        match outcome {
            Ok(records) => {
                info!(engine = %t.kind(), set = set.id(), records, elapsed_ms = (elapsed * 1000.0) as u64, "test-restore ok");
                println!(
                    "ok: {} from set {} restored into {}: {records} records match the manifest",
                    t.kind(),
                    set.id(),
                    t.display_url()
                );
                engines.insert(
                    t.kind(),
                    EngineResult {
                        status: JobStatus::Succeeded,
                        records: Some(records),
                        bytes: Some(entry.stored_bytes()),
                        duration_seconds: Some(elapsed),
                        error: None,
                    },
                );
            }
            Err(e) => {
                let interrupted = matches!(e, Error::Interrupted(_));
                if !interrupted {
                    println!("failed: {} from set {}: {e:#}", t.kind(), set.id());
                }
                engines.insert(
                    t.kind(),
                    EngineResult {
                        status: if interrupted {
                            JobStatus::Cancelled
                        } else {
                            JobStatus::Failed
                        },
                        records: None,
                        bytes: Some(entry.stored_bytes()),
                        duration_seconds: Some(elapsed),
                        error: Some(format!("{e:#}")),
                    },
                );
                if first_error.is_none() {
                    first_error = Some(e);
                }
                if interrupted {
                    break;
                }
            }
        }
    }
    // Every engine of the set restored with the manifest's counts: every record was decoded,
    // as a deep verify does; recorded beside the sets for `list`. (A failure is not recorded:
    // it may be the scratch server's.)
    if first_error.is_none() && set.manifest.engines.keys().all(|k| kinds.contains(k)) {
        let (place, id) = (set.place.clone(), set.id().to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            crate::repo::verified::record_pass_for(&place, &id, crate::engine::DEEP)
        })
        .await;
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(Report {
            set: set.id().to_owned(),
            engines,
        }),
    }
}
