//! The roles: one file per verb, each a function over `&Config` and the engines.

pub mod backup;
pub mod export;
pub mod health;
pub mod import;
pub mod init;
pub mod install;
pub mod list;
pub mod migrate;
pub mod outcome;
pub mod pitr;
pub mod prune;
pub mod remote;
pub mod restore;
pub mod test_restore;
pub mod verify;
pub mod wait;

use std::time::Duration;

use crate::cli::{Cli, Command};
use crate::config::{Config, process_env};
use crate::engine::{EngineKind, EngineOps};
use crate::error::{Error, Result};
use crate::repo::Repo;
use crate::repo::reader::SetReader;
use crate::shutdown::Shutdown;
use tracing::{info, warn};

/// How long a role may take to clean up (remove its temp set) after a signal.
const CLEANUP_GRACE: Duration = Duration::from_secs(5);

/// Runs the verb (the sidecar and `stats` are started by the entry point, through
/// `sidecar::run_cli`). See [`supervise`] for what a signal does.
pub async fn run(cli: Cli, shutdown: &Shutdown) -> Result<()> {
    // Install needs no engine or repository settings: it runs in an init container that
    // is given none.
    if let Command::Install { dir, own } = &cli.command {
        return install::own_and_install(own, dir);
    }
    let cfg = Config::from_args(&cli.global, &process_env)?;
    let token = shutdown.token().clone();
    supervise(dispatch(cli.command, &cfg, &token), shutdown).await
}

/// Runs a verb's work. On a signal the work is cancelled (through the shutdown's token),
/// given [`CLEANUP_GRACE`] to clean up, and the result is `Interrupted(signal)` whatever it
/// returned. The sidecar is the exception: it is a service, it has its own stop timeout, and
/// a clean stop is success.
pub async fn supervise(work: impl Future<Output = Result<()>>, shutdown: &Shutdown) -> Result<()> {
    let token = shutdown.token().clone();
    tokio::pin!(work);
    let result = tokio::select! {
        r = &mut work => r,
        _ = token.cancelled() => {
            match tokio::time::timeout(CLEANUP_GRACE, &mut work).await {
                Ok(r) => r,
                Err(_) => Err(Error::Interrupted(0)),
            }
        }
    };
    match shutdown.signal() {
        Some(n) => Err(match result {
            Err(Error::Interrupted(_)) | Ok(_) => Error::Interrupted(n),
            Err(e) => e,
        }),
        None => result,
    }
}

async fn dispatch(
    command: Command,
    cfg: &Config,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<()> {
    match command {
        Command::Wait { urls, timeout } => {
            let engines = if urls.is_empty() {
                cfg.engines(&[])?
            } else {
                urls.iter()
                    .map(|u| {
                        crate::engine::Engine::from_url(
                            &crate::secret::Secret::new(u.clone()),
                            &cfg.engine_options,
                        )
                    })
                    .collect::<Result<_>>()?
            };
            if engines.is_empty() {
                return Err(Error::config(
                    "nothing to wait for: give URLs or set DBKEEPER_*_URL",
                ));
            }
            wait::wait_all(&engines, timeout, cancel).await.map(|_| ())
        }
        Command::Health { url, timeout } => {
            let urls = match url {
                Some(u) => vec![crate::secret::Secret::new(health::resolve_self(
                    &u,
                    &process_env,
                )?)],
                None => cfg.urls.iter().map(|(_, u)| u.clone()).collect(),
            };
            if urls.is_empty() {
                return Err(Error::config("no URL given and none configured"));
            }
            let opts = cfg.engine_options.clone();
            let healthy = tokio::task::spawn_blocking(move || health::check(&urls, &opts, timeout))
                .await
                .map_err(|e| Error::engine("health", e.to_string()))?;
            if healthy {
                Ok(())
            } else {
                Err(Error::engine("health", "unhealthy"))
            }
        }
        Command::Backup { only } => {
            let engines = cfg.engines_required(&only)?;
            let m = backup::backup(cfg, &engines, cancel).await?;
            println!("{}", m.id);
            // The off-host copy, as the sidecar makes it after each run.
            if let Some(remote) = cfg.open_remote()? {
                let local = cfg.open_repo()?;
                remote::sync(cfg, &local, &remote, cancel)
                    .await
                    .map_err(|e| match e {
                        Error::Interrupted(n) => Error::Interrupted(n),
                        e => Error::repo(
                            remote.display(),
                            format!(
                                "set {} is safe in the repository, but copying it failed: {e:#}",
                                m.id
                            ),
                        ),
                    })?;
            }
            Ok(())
        }
        Command::List {
            json,
            remote,
            pitr,
            verify,
        } => {
            if pitr {
                pitr::list(&pick(cfg, remote)?, json)
            } else {
                list::list(pick(cfg, remote)?, json, verify, cancel).await
            }
        }
        Command::Verify {
            id,
            deep,
            remote,
            json,
        } => verify::verify(pick(cfg, remote)?, id, deep, json, cancel).await,
        Command::Restore {
            id,
            only,
            force,
            to_time,
            to_oplog_ts,
            migrations,
        } => {
            let guard = restore::SchemaGuard::load(migrations.as_deref())?;
            if let Some(target) = pitr_target(to_time.as_deref(), to_oplog_ts.as_deref())? {
                // PostgreSQL recovers to a time through its empty data directory, before its
                // server starts.
                if only.iter().any(|o| o == "postgres") {
                    if only.len() > 1 {
                        return Err(Error::config(
                            "--to-time recovers PostgreSQL through its data directory on its own: run it once with --only postgres and once for the others",
                        ));
                    }
                    let pitr::Target::Time(t) = target else {
                        return Err(Error::config(
                            "--to-oplog-ts is a MongoDB position; PostgreSQL takes --to-time",
                        ));
                    };
                    let dir = cfg.data_dirs.get(&EngineKind::Postgres).cloned().ok_or_else(|| {
                        Error::config(
                            "--to-time for PostgreSQL needs DBKEEPER_POSTGRES_DATA_DIR: the empty data directory of a server that is not running",
                        )
                    })?;
                    let repo = cfg.open_repo()?;
                    return tokio::task::spawn_blocking(move || {
                        pitr::preseed_postgres_to_time(&repo, &dir, t).map(|_| ())
                    })
                    .await
                    .map_err(|e| Error::engine("postgres", format!("restore task failed: {e}")))?;
                }
                // Otherwise a point in time is MongoDB's: other engines are restored by set id.
                let only = if only.is_empty() {
                    vec!["mongodb".to_owned()]
                } else {
                    only
                };
                let engines = cfg.engines_required(&only)?;
                if engines.iter().any(|e| e.kind() != EngineKind::Mongodb) {
                    return Err(Error::config(
                        "--to-time and --to-oplog-ts recover MongoDB, and PostgreSQL with --only postgres; restore the other engines by set id",
                    ));
                }
                let plan = plan_blocking(cfg, target).await?;
                let id = plan.base.set.clone();
                return restore::restore(cfg, &engines, &id, force, Some(plan), &guard, cancel)
                    .await;
            }
            if id != "latest" && crate::repo::parse_set_name(&id).is_none() {
                return Err(Error::config(format!(
                    "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
                )));
            }
            let engines = cfg.engines_required(&only)?;
            restore::restore(cfg, &engines, &id, force, None, &guard, cancel).await
        }
        Command::Preseed { only, migrations } => {
            let (engines, dir_only) = cfg.preseed_targets(&only)?;
            let guard = restore::SchemaGuard::load(migrations.as_deref())?;
            restore::preseed(cfg, &engines, &guard, cancel).await?;
            for kind in dir_only {
                restore::preseed_dir_only(cfg, kind, &guard).await?;
            }
            Ok(())
        }
        Command::Prune { dry_run, remote } => {
            let (repo, policy) = if remote {
                (pick(cfg, true)?, cfg.remote_retention)
            } else {
                (cfg.open_repo()?, cfg.retention)
            };
            prune::prune_repo(repo, policy, cfg.lock_wait, dry_run, true, cancel)
                .await
                .map(|_| ())
        }
        Command::Sync => {
            let remote = pick(cfg, true)?;
            let local = cfg.open_repo()?;
            let r = remote::sync(cfg, &local, &remote, cancel).await?;
            println!(
                "copied {} set(s), {} bytes, to {}; retention deleted {} there",
                r.uploaded.len(),
                r.bytes,
                remote.display(),
                r.deleted.len()
            );
            Ok(())
        }
        Command::Install { dir, own } => install::own_and_install(&own, &dir),
        Command::Init { timeout, migrate } => {
            init::init(cfg, timeout, migrate.migrations.as_deref(), cancel).await?;
            migrate::after_init(cfg, &migrate, cancel).await
        }
        Command::Migrate {
            action,
            dry_run,
            to,
            args,
        } => migrate::run(cfg, action, dry_run, to, &args, cancel).await,
        Command::Import { path, time, all } => {
            if all {
                import::import_all(cfg, &path, cancel).await
            } else {
                import::import(cfg, &path, time.as_deref(), cancel)
                    .await
                    .map(|_| ())
            }
        }
        Command::Export { id, dir, format } => {
            if id != "latest" && crate::repo::parse_set_name(&id).is_none() {
                return Err(Error::config(format!(
                    "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
                )));
            }
            let fmt = export::Format::parse(&format)?;
            let set = find_set(cfg, &id, None).await?;
            tokio::task::spawn_blocking(move || export::export(&set, &dir, fmt))
                .await
                .map_err(|e| Error::engine("export", format!("task failed: {e}")))?
        }
        // The entry point starts the sidecar and its `stats` client (`sidecar::run_cli`).
        Command::Sidecar(_) | Command::Stats { .. } => Err(Error::config(
            "the sidecar and `stats` are not dispatched as roles",
        )),
        Command::TestRestore { id, into, to_time } => {
            if let Some(target) = pitr_target(to_time.as_deref(), None)? {
                let plan = plan_blocking(cfg, target).await?;
                let scratch = crate::config::scratch_urls(cfg, &into, &process_env)?;
                return test_restore::test_restore_pitr(cfg, plan, &scratch, cancel)
                    .await
                    .map(|_| ());
            }
            if id != "latest" && crate::repo::parse_set_name(&id).is_none() {
                return Err(Error::config(format!(
                    "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
                )));
            }
            let scratch = crate::config::scratch_urls(cfg, &into, &process_env)?;
            test_restore::test_restore(cfg, &id, &scratch, cancel)
                .await
                .map(|_| ())
        }
    }
}

fn pitr_target(to_time: Option<&str>, to_oplog_ts: Option<&str>) -> Result<Option<pitr::Target>> {
    Ok(match (to_time, to_oplog_ts) {
        (Some(t), _) => Some(pitr::Target::parse_time(t)?),
        (None, Some(o)) => Some(pitr::Target::OpTime(
            crate::engine::mongodb::pitr::OpTime::parse(o)?,
        )),
        (None, None) => None,
    })
}

async fn plan_blocking(
    cfg: &Config,
    target: pitr::Target,
) -> Result<crate::engine::mongodb::pitr::Plan> {
    let repo = cfg.open_repo()?;
    tokio::task::spawn_blocking(move || pitr::plan(&repo, target))
        .await
        .map_err(|e| Error::engine("repo", format!("task failed: {e}")))?
}

/// The repository, or with `remote` the off-host copy (`list --remote`, `verify --remote`).
fn pick(cfg: &Config, remote: bool) -> Result<Repo> {
    if !remote {
        return cfg.open_repo();
    }
    cfg.open_remote()?
        .ok_or_else(|| Error::config("--remote needs DBKEEPER_REMOTE=s3://bucket/prefix"))
}

/// Where restores look for sets, in order: the repository, then the off-host copy. A
/// repository that cannot be opened (a new host without the backup volume) is passed over
/// when a remote is configured.
pub(crate) fn sources(cfg: &Config) -> Result<Vec<Repo>> {
    let mut out = Vec::new();
    let local = cfg.open_repo();
    let remote = cfg.open_remote()?;
    match (local, &remote) {
        (Ok(r), _) => out.push(r),
        (Err(e), Some(rem)) => {
            warn!(error = %e, remote = %rem.display(), "repository unavailable; reading sets from the remote")
        }
        (Err(e), None) => return Err(e),
    }
    out.extend(remote);
    Ok(out)
}

/// The newest good set holding `kind`: from the repository, else from the remote (disaster
/// recovery on a new host).
pub(crate) async fn newest_good(cfg: &Config, kind: EngineKind) -> Result<Option<SetReader>> {
    let repos = sources(cfg)?;
    tokio::task::spawn_blocking(move || -> Result<Option<SetReader>> {
        for (i, repo) in repos.iter().enumerate() {
            if let Some(set) = repo.newest_good(Some(kind))? {
                if i > 0 {
                    info!(set = set.id(), remote = %repo.display(), engine = %kind, "no good set in the repository; using the remote's");
                }
                return Ok(Some(set));
            }
        }
        Ok(None)
    })
    .await
    .map_err(|e| Error::engine("repo", format!("task failed: {e}")))?
}

/// A set by id (or `latest`), from the repository or else the remote.
pub(crate) async fn find_set(
    cfg: &Config,
    id: &str,
    kind: Option<EngineKind>,
) -> Result<SetReader> {
    let repos = sources(cfg)?;
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || -> Result<SetReader> {
        let mut first_err = None;
        for repo in &repos {
            if id == "latest" {
                if let Some(set) = repo.newest_good(kind)? {
                    return Ok(set);
                }
                continue;
            }
            match repo.resolve(&id, kind) {
                Ok(set) => return Ok(set),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| {
            let names: Vec<String> = repos.iter().map(|r| r.display()).collect();
            Error::repo(names.join(" and "), "holds no set that verifies")
        }))
    })
    .await
    .map_err(|e| Error::engine("repo", format!("task failed: {e}")))?
}
