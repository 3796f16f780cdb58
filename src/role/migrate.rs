//! `dbkeeper migrate` (and `init`'s last step): apply pending schema migrations to each engine
//! under its lease lock, after a pre-migration set; `migrate info|repair|baseline`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cli::{MigrateAction, MigrateArgs};
use crate::config::Config;
use crate::engine::{Emptiness, Engine, EngineKind, EngineOps};
use crate::error::{Error, Result};
use crate::migrate::files::{self, MigrationFile, Version};
use crate::migrate::{self as m, Applied, Rules, State, Target};
use crate::repo::manifest::PreMigration;
use crate::role::{backup, restore};
use crate::secret::Secret;

/// How long the lease lasts unless renewed; renewed every third of it while we work. A
/// migrator killed outright holds the database this long at most.
const LEASE: Duration = Duration::from_secs(30);

/// One engine's migrations: its URL and its files, sorted.
struct Plan {
    kind: EngineKind,
    url: Secret,
    files: Vec<MigrationFile>,
}

/// Reads every configured engine's files before any database is touched: a bad file anywhere
/// changes nothing anywhere.
fn load(cfg: &Config, dir: &Path, skip: &[EngineKind]) -> Result<Vec<Plan>> {
    if !dir.is_dir() {
        return Err(Error::config(format!(
            "DBKEEPER_MIGRATIONS={}: not a directory",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    for kind in EngineKind::ALL {
        if dir.join(kind.name()).is_dir() && !cfg.urls.iter().any(|(k, _)| *k == kind) {
            warn!(engine = %kind, dir = %dir.join(kind.name()).display(), "migrations for an engine that is not configured; skipped");
        }
    }
    for (kind, url) in &cfg.urls {
        if !dir.join(kind.name()).is_dir() || skip.contains(kind) {
            continue;
        }
        out.push(Plan {
            kind: *kind,
            url: url.clone(),
            files: files::discover(dir, *kind)?,
        });
    }
    Ok(out)
}

fn rules(args: &MigrateArgs, to: Option<&str>) -> Result<Rules> {
    let to = match to {
        None => None,
        Some(t) => Some(Version::parse(t).ok_or_else(|| {
            Error::config(format!(
                "--to {t:?}: not a version (digits, optionally dotted: 3, 1.2.10)"
            ))
        })?),
    };
    Ok(Rules {
        out_of_order: args.out_of_order,
        ignore_missing: args.ignore_missing,
        to,
    })
}

/// `init`'s step after preseeding: pending migrations, when `DBKEEPER_MIGRATIONS` is set.
pub async fn after_init(
    cfg: &Config,
    args: &MigrateArgs,
    cancel: &CancellationToken,
) -> Result<()> {
    if args.migrations.is_none() {
        return Ok(());
    }
    // A Redis preseeded through its data directory starts after init: it cannot be migrated
    // here.
    let skip: &[EngineKind] = if cfg.data_dirs.contains_key(&EngineKind::Redis) {
        if args
            .migrations
            .as_deref()
            .is_some_and(|d| d.join("redis").is_dir())
        {
            warn!(
                engine = "redis",
                "redis migrations skipped: with DBKEEPER_REDIS_DATA_DIR the server starts after init; run `dbkeeper migrate` once it is up"
            );
        }
        &[EngineKind::Redis]
    } else {
        &[]
    };
    run_skipping(cfg, None, false, None, args, skip, cancel).await
}

pub async fn run(
    cfg: &Config,
    action: Option<MigrateAction>,
    dry_run: bool,
    to: Option<String>,
    args: &MigrateArgs,
    cancel: &CancellationToken,
) -> Result<()> {
    run_skipping(cfg, action, dry_run, to, args, &[], cancel).await
}

async fn run_skipping(
    cfg: &Config,
    action: Option<MigrateAction>,
    dry_run: bool,
    to: Option<String>,
    args: &MigrateArgs,
    skip: &[EngineKind],
    cancel: &CancellationToken,
) -> Result<()> {
    let dir = args.migrations.as_deref().ok_or_else(|| {
        Error::config("no migrations: set DBKEEPER_MIGRATIONS (or --migrations) to their directory")
    })?;
    let rules = rules(args, to.as_deref())?;
    let baseline =
        match &action {
            Some(MigrateAction::Baseline {
                baseline_version: v,
                ..
            }) => Some(Version::parse(v).ok_or_else(|| {
                Error::config(format!("baseline {v:?}: not a version (3, 1.2.10)"))
            })?),
            _ => None,
        };
    let plans = load(cfg, dir, skip)?;
    if plans.is_empty() {
        info!(dir = %dir.display(), "no migrations for the configured engines");
        return Ok(());
    }
    if matches!(action, Some(MigrateAction::Info)) {
        return info_all(cfg, &plans).await;
    }
    let mut first: Option<Error> = None;
    for p in &plans {
        let target = Arc::new(Target::connect(p.kind, &p.url, &cfg.engine_options).await?);
        let r = migrate_one(
            cfg,
            p,
            &target,
            &action,
            dry_run,
            &rules,
            baseline.as_ref(),
            args,
            cancel,
        )
        .await;
        target.close().await;
        if let Err(e) = r {
            if matches!(e, Error::Interrupted(_)) {
                return Err(e);
            }
            // The first failure decides; a later engine is not migrated past a failed one.
            first.get_or_insert(e);
            break;
        }
    }
    first.map_or(Ok(()), Err)
}

/// One engine's run under its lock.
#[allow(clippy::too_many_arguments)]
async fn migrate_one(
    cfg: &Config,
    p: &Plan,
    target: &Arc<Target>,
    action: &Option<MigrateAction>,
    dry_run: bool,
    rules: &Rules,
    baseline: Option<&Version>,
    args: &MigrateArgs,
    cancel: &CancellationToken,
) -> Result<()> {
    // Asked before the lock is taken: the lock itself is a key or a document, and a
    // database holding only that holds nothing worth a pre-migration set.
    let held = match action {
        None if !dry_run => matches!(
            engine_of(cfg, p.kind)?.is_empty().await?,
            Emptiness::HasData(_)
        ),
        _ => false,
    };
    let lease = Lease::take(target.clone(), p.kind, args.migrate_lock_wait, cancel).await?;
    let r = match action {
        None => {
            let how = How {
                rules,
                dry_run,
                held,
                restore: args.on_failure == "restore",
                owner: &lease.owner,
            };
            apply(cfg, p, target, &how, cancel).await
        }
        Some(MigrateAction::Repair) => repair(p, target).await,
        Some(MigrateAction::Baseline { description, .. }) => {
            set_baseline(p, target, baseline.expect("parsed"), description).await
        }
        Some(MigrateAction::Info) => unreachable!("handled above"),
    };
    lease.release().await;
    r
}

/// How one `migrate` run treats an engine.
struct How<'a> {
    rules: &'a Rules,
    dry_run: bool,
    /// The database held data before we locked it: take a pre-migration set first.
    held: bool,
    /// `DBKEEPER_MIGRATE_ON_FAILURE=restore` (else `halt`).
    restore: bool,
    /// Who holds the lease, so that putting the database back keeps it ours.
    owner: &'a str,
}

async fn apply(
    cfg: &Config,
    p: &Plan,
    target: &Target,
    how: &How<'_>,
    cancel: &CancellationToken,
) -> Result<()> {
    let (kind, dry_run) = (p.kind, how.dry_run);
    let mut history = target.history().await?;
    if history.is_empty()
        && let Some(b) = target.foreign_baseline().await?
    {
        info!(engine = %kind, version = b.version, "adopting golang-migrate's version as the baseline");
        if !dry_run {
            target.record(&b).await?;
        }
        history.push(b);
    }
    // A migrator killed mid-way left its row "unfinished": under the restore policy, put the
    // database back as it was before that run, as the migrator itself would have.
    let unfinished: Vec<Applied> = history
        .iter()
        .filter(|a| !a.success && !a.restored && a.error.as_deref() == Some(m::UNFINISHED))
        .cloned()
        .collect();
    if how.restore && !dry_run && !unfinished.is_empty() {
        let engine = engine_of(cfg, kind)?;
        for mut a in unfinished {
            warn!(engine = %kind, file = %a.file, set = a.snapshot.as_deref(), "a migration was interrupted; putting the database back");
            put_back(
                cfg,
                &engine,
                target,
                how.owner,
                a.snapshot.as_deref(),
                cancel,
            )
            .await
            .map_err(|e| {
                Error::engine(
                    kind.name(),
                    format!(
                        "migration {} was interrupted, and putting the database back failed: {e:#}",
                        a.file
                    ),
                )
            })?;
            a.restored = true;
            target.record(&a).await?;
        }
        history = target.history().await?;
    }
    let pending = m::plan(kind, &p.files, &history, how.rules)?;
    let from = m::current(&history);
    let Some(last) = pending.last() else {
        info!(engine = %kind, version = from.as_ref().map(|v| v.to_string()), "schema up to date");
        return Ok(());
    };
    if dry_run {
        for f in &pending {
            println!(
                "{kind}: would apply {} ({} commands)",
                f.name,
                f.script.len()
            );
        }
        return Ok(());
    }
    let engine = engine_of(cfg, kind)?;
    let snapshot = if how.held {
        let mark = BTreeMap::from([(
            kind,
            PreMigration {
                from: from.as_ref().map(|v| v.to_string()),
                to: last.version.to_string(),
            },
        )]);
        let set =
            backup::backup_marked(cfg, std::slice::from_ref(&engine), Some(mark), cancel).await?;
        info!(engine = %kind, set = %set.id, "pre-migration set taken");
        Some(set.id)
    } else {
        None
    };
    for f in pending {
        let started = Utc::now();
        let t = Instant::now();
        info!(engine = %kind, file = %f.name, commands = f.script.len(), "applying migration");
        // Recorded before the first command: a migrator killed mid-way leaves "failed", never
        // a version that looks unapplied and would run again on half its changes.
        let mut row = Applied::for_file(f, started, false);
        row.error = Some(m::UNFINISHED.into());
        row.snapshot = snapshot.clone();
        target.record(&row).await?;
        match target.apply(f, cancel).await {
            Ok(()) => {
                let mut done = Applied::for_file(f, started, true);
                done.duration_ms = t.elapsed().as_millis() as u64;
                target.record(&done).await?;
                info!(engine = %kind, file = %f.name, elapsed_ms = done.duration_ms, "migration applied");
            }
            Err(step) => {
                row.duration_ms = t.elapsed().as_millis() as u64;
                row.error = Some(format!("{}: {}: {}", step.at, step.command, step.message));
                if let Err(e) = target.record(&row).await {
                    warn!(engine = %kind, error = %e, "could not record the failure in the history");
                }
                if cancel.is_cancelled() {
                    return Err(Error::Interrupted(0));
                }
                let what = format!(
                    "migration {} failed at {} ({}): {}",
                    f.name, step.at, step.command, step.message
                );
                if !how.restore {
                    return Err(Error::engine(
                        kind.name(),
                        format!(
                            "{what}; left as it is (DBKEEPER_MIGRATE_ON_FAILURE=halt): see `dbkeeper migrate info`"
                        ),
                    ));
                }
                let back =
                    put_back(cfg, &engine, target, how.owner, snapshot.as_deref(), cancel).await;
                let to = snapshot
                    .as_deref()
                    .map_or("empty, as it was".to_owned(), |id| {
                        format!("restored from pre-migration set {id}")
                    });
                if let Err(e) = back {
                    return Err(Error::engine(
                        kind.name(),
                        format!("{what}; putting the database back failed too: {e:#}"),
                    ));
                }
                row.restored = true;
                if let Err(e) = target.record(&row).await {
                    warn!(engine = %kind, error = %e, "could not record the failure in the history");
                }
                return Err(Error::engine(kind.name(), format!("{what}; database {to}")));
            }
        }
    }
    Ok(())
}

/// The database as it was before a migration run: its pre-migration set restored, or, when
/// it held nothing then, wiped. The lease is ours again afterwards: the set holds the lock as
/// it was when the set was taken (by an earlier migrator, perhaps one that was killed, whose
/// stale lease would outlive this run and hold off the next), and a wipe removes it.
async fn put_back(
    cfg: &Config,
    engine: &Engine,
    target: &Target,
    owner: &str,
    snapshot: Option<&str>,
    cancel: &CancellationToken,
) -> Result<()> {
    let back = match snapshot {
        Some(id) => {
            restore::restore(
                cfg,
                std::slice::from_ref(engine),
                id,
                true,
                None,
                &restore::SchemaGuard::default(),
                cancel,
            )
            .await
        }
        None => engine.wipe().await,
    };
    back?;
    target.retake(owner, LEASE).await
}

fn engine_of(cfg: &Config, kind: EngineKind) -> Result<Engine> {
    cfg.engines_required(&[kind.name().to_owned()])?
        .into_iter()
        .next()
        .ok_or_else(|| Error::config(format!("{kind} is not configured")))
}

async fn repair(p: &Plan, target: &Target) -> Result<()> {
    let history = target.history().await?;
    let mut changed = 0;
    for row in m::info(&p.files, &history) {
        let Some(a) = history
            .iter()
            .find(|a| a.version().as_ref() == Some(&row.version))
        else {
            continue;
        };
        match row.state {
            State::ChecksumChanged => {
                let f = p
                    .files
                    .iter()
                    .find(|f| f.version == row.version)
                    .expect("a changed checksum has a file");
                let mut a = a.clone();
                a.sha256 = f.sha256.clone();
                a.file = f.name.clone();
                a.description = f.description.clone();
                target.record(&a).await?;
                println!("{}: {} checksum accepted", p.kind, f.name);
            }
            State::Failed | State::Missing => {
                target.forget(&a.version).await?;
                println!(
                    "{}: {} ({}) removed from the history",
                    p.kind,
                    a.version,
                    row.state.name()
                );
            }
            _ => continue,
        }
        changed += 1;
    }
    info!(engine = %p.kind, rows = changed, "history repaired");
    Ok(())
}

async fn set_baseline(
    p: &Plan,
    target: &Target,
    version: &Version,
    description: &str,
) -> Result<()> {
    let history = target.history().await?;
    if !history.is_empty() {
        return Err(Error::engine(
            p.kind.name(),
            format!(
                "a baseline adopts a database without a migration history, and this one has {} row{}",
                history.len(),
                if history.len() == 1 { "" } else { "s" }
            ),
        ));
    }
    target
        .record(&Applied::baseline(version, description))
        .await?;
    println!("{}: baseline {version} recorded", p.kind);
    Ok(())
}

async fn info_all(cfg: &Config, plans: &[Plan]) -> Result<()> {
    println!(
        "{:<8} {:<10} {:<32} {:<17} APPLIED AT",
        "ENGINE", "VERSION", "DESCRIPTION", "STATE"
    );
    for p in plans {
        let target = Target::connect(p.kind, &p.url, &cfg.engine_options).await?;
        let history = target.history().await;
        target.close().await;
        let history = history?;
        for r in m::info(&p.files, &history) {
            println!(
                "{:<8} {:<10} {:<32} {:<17} {}",
                p.kind.name(),
                r.version.as_str(),
                r.description,
                r.state.name(),
                r.applied_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The database's migration lock, renewed in the background until released.
struct Lease {
    target: Arc<Target>,
    owner: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    async fn take(
        target: Arc<Target>,
        kind: EngineKind,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<Lease> {
        let owner = owner();
        let start = Instant::now();
        let mut said = false;
        while !target.lock(&owner, LEASE).await? {
            if !said {
                info!(engine = %kind, "another migrator holds the lock; waiting");
                said = true;
            }
            if start.elapsed() >= wait {
                return Err(Error::engine(
                    kind.name(),
                    format!(
                        "another migrator held the migration lock for {}s; retry later",
                        wait.as_secs()
                    ),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
            }
        }
        let stop = CancellationToken::new();
        let task = {
            let (target, owner, stop) = (target.clone(), owner.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(LEASE / 3) => {}
                        _ = stop.cancelled() => return,
                    }
                    match target.lock(&owner, LEASE).await {
                        Ok(true) => {}
                        Ok(false) => warn!(engine = %kind, "the migration lock was taken over"),
                        Err(e) => {
                            warn!(engine = %kind, error = %e, "renewing the migration lock failed")
                        }
                    }
                }
            })
        };
        Ok(Lease {
            target,
            owner,
            stop,
            task,
        })
    }

    async fn release(self) {
        self.stop.cancel();
        let _ = self.task.await;
        if let Err(e) = self.target.unlock(&self.owner).await {
            warn!(error = %e, "releasing the migration lock failed; it expires by itself");
        }
    }
}

/// Who holds a lock, for an operator reading it: host, process, and a nonce.
fn owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}:{}:{nonce:08x}", std::process::id())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_with_migrate_is_well_formed() {
        use clap::CommandFactory;
        crate::cli::Cli::command().debug_assert();
    }
}
