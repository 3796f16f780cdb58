//! `dbkeeper backup`: one set holding every selected engine, published atomically.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::engine::{Engine, EngineOps};
use crate::error::{Error, Result};
use crate::repo::manifest::Manifest;

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes one backup set. Nothing is visible in the repository unless every engine's dump
/// succeeded; a failure or cancellation removes the temp directory.
pub async fn backup(
    cfg: &Config,
    engines: &[Engine],
    cancel: &CancellationToken,
) -> Result<Manifest> {
    backup_marked(cfg, engines, None, cancel).await
}

/// [`backup`], with each engine's schema version (from its migration history) in the
/// manifest, and for the set `migrate` takes first, the versions it migrates from and to.
pub async fn backup_marked(
    cfg: &Config,
    engines: &[Engine],
    pre_migration: Option<
        std::collections::BTreeMap<crate::engine::EngineKind, crate::repo::manifest::PreMigration>,
    >,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let repo = cfg.open_repo()?;
    let root = repo.local_root().map(std::path::Path::to_owned);
    let r = backup_into(cfg, repo, engines, pre_migration, cancel).await;
    match (r, root) {
        // A file error because the directory itself went away (removed or renamed under the
        // running backup) is a repository problem (exit 4), said as such.
        (Err(Error::Io { .. }), Some(root)) if !root.is_dir() => Err(Error::repo(
            &root,
            "the repository directory disappeared during the backup (removed or renamed); nothing was published",
        )),
        (r, _) => r,
    }
}

async fn backup_into(
    cfg: &Config,
    repo: crate::repo::Repo,
    engines: &[Engine],
    pre_migration: Option<
        std::collections::BTreeMap<crate::engine::EngineKind, crate::repo::manifest::PreMigration>,
    >,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let lock = repo.lock(cfg.lock_wait).await?;
    // Fail before creating anything if an engine is down.
    for e in engines {
        e.answers(PROBE_TIMEOUT).await?;
    }
    let mut set = repo.begin_set(&lock, Utc::now())?;
    let start = Instant::now();
    info!(set = set.id(), repo = %repo.display(), encrypted = repo.crypto().is_some(), "backup started");
    for e in engines {
        let t = Instant::now();
        let writer = set.engine_writer(e.kind())?;
        let entry = tokio::select! {
            r = e.dump(writer, cancel) => r?,
            _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
        };
        info!(
            engine = %e.kind(),
            records = entry.total_records(),
            raw_bytes = entry.files.iter().map(|f| f.raw_size).sum::<u64>(),
            stored_bytes = entry.stored_bytes(),
            elapsed_ms = t.elapsed().as_millis() as u64,
            "engine dumped"
        );
        set.add_engine(e.kind(), entry);
    }
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    let mut schema = crate::repo::manifest::Schema {
        pre_migration,
        ..Default::default()
    };
    for e in engines {
        if let Some((_, url)) = cfg.urls.iter().find(|(k, _)| *k == e.kind())
            && let Some(v) =
                crate::migrate::schema_version(e.kind(), url, &cfg.engine_options).await
        {
            schema.versions.insert(e.kind(), v);
        }
    }
    // Read after the dumps: the engines answered, so this costs a round trip, not a timeout.
    let schema = (!schema.versions.is_empty() || schema.pre_migration.is_some()).then_some(schema);
    let manifest = tokio::task::spawn_blocking(move || set.publish_with_schema(schema))
        .await
        .map_err(|e| Error::engine("backup", format!("publish task failed: {e}")))??;
    info!(
        set = %manifest.id,
        stored_bytes = manifest.stored_bytes(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "backup published"
    );
    drop(lock);
    Ok(manifest)
}
