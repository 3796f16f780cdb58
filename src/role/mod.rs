//! The roles: one file per verb, each a function over `&Config` and the engines.

pub mod backup;
pub mod health;
pub mod init;
pub mod install;
pub mod list;
pub mod prune;
pub mod restore;
pub mod test_restore;
pub mod verify;
pub mod wait;

use std::time::Duration;

use crate::cli::{Cli, Command};
use crate::config::{Config, SidecarConfig, process_env};
use crate::error::{Error, Result};
use crate::repo::Repo;
use crate::shutdown::Shutdown;

/// How long a role may take to clean up (remove its temp set) after a signal.
const CLEANUP_GRACE: Duration = Duration::from_secs(5);

/// Runs the verb. On a signal the role is cancelled, given [`CLEANUP_GRACE`] to clean up,
/// and the result is `Interrupted(signal)` whatever the role returned. The sidecar is the
/// exception: it is a service, it has its own stop timeout, and a clean stop is success.
pub async fn run(cli: Cli, shutdown: &Shutdown) -> Result<()> {
    // Install needs no engine or repository settings: it runs in an init container that
    // is given none.
    if let Command::Install { dir } = &cli.command {
        return install::install(dir);
    }
    let cfg = Config::from_args(&cli.global, &process_env)?;
    let token = shutdown.token().clone();
    if let Command::Sidecar(args) = &cli.command {
        let sc = SidecarConfig::from_args(&cfg, args, &process_env)?;
        return crate::sidecar::run(cfg, sc, token).await;
    }
    let work = dispatch(cli.command, &cfg, &token);
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
            Ok(())
        }
        Command::List { json } => list::list(&Repo::open(&cfg.repo)?, json),
        Command::Verify { id, deep } => verify::verify(Repo::open(&cfg.repo)?, id, deep, cancel)
            .await
            .map(|_| ()),
        Command::Restore { id, only, force } => {
            if id != "latest" && crate::repo::parse_set_name(&id).is_none() {
                return Err(Error::config(format!(
                    "{id:?} is not a set id (YYYY-MM-DD_HH-MM-SS) or `latest`"
                )));
            }
            let engines = cfg.engines_required(&only)?;
            restore::restore(cfg, &engines, &id, force, cancel).await
        }
        Command::Preseed { only } => {
            let engines = cfg.engines_required(&only)?;
            restore::preseed(cfg, &engines, cancel).await.map(|_| ())
        }
        Command::Prune { dry_run } => prune::prune(cfg, dry_run, true, cancel).await.map(|_| ()),
        Command::Install { dir } => install::install(&dir),
        Command::Init { timeout } => init::init(cfg, timeout, cancel).await,
        // `run` starts the sidecar itself, with its own stop rules.
        Command::Sidecar(_) => Err(Error::config("the sidecar cannot be dispatched as a verb")),
        Command::TestRestore { id, into } => {
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
