//! The resident role: the backup schedule, deep verify and retention after each run, the
//! health loop, the statistics loops, the HTTP API, notifications, and a clean stop on SIGTERM.
//!
//! The process starts no child processes, so as PID 1 it has no zombies to reap.

pub mod db_alerts;
pub mod http;
pub mod metrics;
pub mod notify;
pub use crate::schedule;
pub mod settings;
pub mod state;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cli::{Cli, Command};
use crate::config::{Config, process_env};
use crate::engine::{Engine, EngineKind, EngineOps};
use crate::error::{Error, Result};
use crate::repo::manifest::Manifest;
use crate::repo::{self, Repo, TMP_PREFIX, VerifyLevel};
use crate::role;
use crate::shutdown::Shutdown;
pub use settings::SidecarConfig;
use state::{EngineHealth, EngineResult, JobKind, JobStatus, RunRecord, State, Trigger};

/// A probe that takes longer than this counts as down.
const MAX_PROBE: Duration = Duration::from_secs(5);
/// Progress of a running job is logged this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Suffix given to a freshly written set that fails its deep verification: no longer a set
/// name, so list, restore, preseed and retention never see it; kept for the operator.
pub const FAILED_VERIFY_SUFFIX: &str = ".failed-verify";

pub struct Sidecar {
    pub cfg: Config,
    /// The repository, opened (and for a bucket, checked) once at start.
    pub repo: Repo,
    /// The off-host copy, when configured.
    pub remote: Option<Repo>,
    pub sc: SidecarConfig,
    pub engines: Vec<Engine>,
    pub state: State,
    /// Cancelled by SIGTERM/SIGINT; every job's token is a child of it.
    pub root: CancellationToken,
    /// The oplog archiver's state (`DBKEEPER_MONGODB_PITR=on`).
    pub pitr: Option<crate::engine::mongodb::SharedStatus>,
    /// The WAL archiver's state (`DBKEEPER_POSTGRES_PITR=on`).
    pub pg_pitr: Option<crate::engine::postgres::pitr::SharedWalStatus>,
    /// Each engine's last statistics round (`DBKEEPER_STATS_INTERVAL`).
    pub stats: stats::Store,
    tracker: TaskTracker,
}

/// The entry point's dispatch of `dbkeeper sidecar` and of `dbkeeper stats`, its client: the
/// sidecar runs until stopped under its own stop rules; `stats` is a verb like the roles.
pub async fn run_cli(cli: Cli, shutdown: &Shutdown) -> Result<()> {
    let cfg = Config::from_args(&cli.global, &process_env)?;
    match cli.command {
        Command::Sidecar(args) => {
            let sc = SidecarConfig::from_args(&cfg, &args, &process_env)?;
            run(cfg, sc, shutdown.token().clone()).await
        }
        Command::Stats {
            watch,
            sidecar,
            direct,
        } => {
            let source = if direct {
                stats::Source::Direct
            } else {
                stats::Source::Sidecar(stats::sidecar_url(&sidecar, &process_env)?)
            };
            let token = shutdown.token().clone();
            role::supervise(stats::cli(&cfg, source, watch, &token), shutdown).await
        }
        _ => Err(Error::config("not a sidecar command")),
    }
}

/// Runs the sidecar until `root` is cancelled, then stops within the stop timeout. A clean
/// stop is success: the sidecar is a service, not a one-shot job.
pub async fn run(cfg: Config, sc: SidecarConfig, root: CancellationToken) -> Result<()> {
    let engines = cfg.engines_required(&[])?;
    let repo = cfg.open_repo()?;
    let remote = cfg
        .remote
        .as_ref()
        .map(|r| Repo::connect(r, cfg.crypto.clone()).map(|x| x.with_lease(cfg.lock_lease)))
        .transpose()?;
    // One sidecar per repository and per remote, for as long as it runs. A remote that is
    // down at start does not stop local backups: its copies fail and alert until it is back.
    let _held = repo.lock_sidecar(cfg.lock_wait).await?;
    let _held_remote = match &remote {
        Some(r) => match r.lock_sidecar(cfg.lock_wait).await {
            Ok(l) => Some(l),
            Err(e @ Error::Locked { .. }) => return Err(e),
            Err(e) => {
                warn!(remote = %r.display(), error = %e, "the remote does not answer at start; copies to it fail and alert until it does");
                None
            }
        },
        None => None,
    };
    if let Some(c) = &cfg.crypto {
        // Refuse to start when the identity cannot open what the recipients seal: every set
        // written from now on would be unreadable by the key meant to restore it.
        c.probe()?;
        if c.can_decrypt() {
            info!(encryption = %c.describe(), "age encryption on; the identity opens what the recipients seal");
        } else {
            warn!(encryption = %c.describe(), "age encryption on, write-only: this host can back up and checksum-verify, not decrypt; sets are verified by checksum only");
        }
    }
    info!(config = %cfg.describe(), sidecar = %sc.describe(), "dbkeeper sidecar starting");
    let listener = tokio::net::TcpListener::bind(sc.listen)
        .await
        .map_err(|e| Error::config(format!("DBKEEPER_LISTEN={}: cannot listen: {e}", sc.listen)))?;
    // Each continuous archive needs its engine's URL.
    for (on, kind, what) in [
        (
            cfg.mongo_pitr,
            EngineKind::Mongodb,
            "DBKEEPER_MONGODB_PITR=on needs DBKEEPER_MONGODB_URI",
        ),
        (
            cfg.postgres_pitr,
            EngineKind::Postgres,
            "DBKEEPER_POSTGRES_PITR=on needs DBKEEPER_POSTGRES_URL",
        ),
    ] {
        if on && !engines.iter().any(|e| e.kind() == kind) {
            return Err(Error::config(what));
        }
    }
    let (pitr, pg_pitr) = (
        cfg.mongo_pitr.then(Default::default),
        cfg.postgres_pitr.then(Default::default),
    );
    let app = Arc::new(Sidecar {
        cfg,
        repo,
        remote,
        sc,
        engines,
        state: State::new(Utc::now()),
        root: root.clone(),
        pitr,
        pg_pitr,
        stats: stats::Store::default(),
        tracker: TaskTracker::new(),
    });
    info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        next_backup = %next_label(&app.sc.schedule),
        stats_interval = %humantime::format_duration(app.cfg.stats_interval),
        "sidecar ready"
    );

    app.tracker.spawn(app.clone().find_newest_verified());
    app.tracker.spawn(app.clone().health_loop());
    for i in 0..app.engines.len() {
        app.tracker.spawn(app.clone().stats_loop(i));
    }
    if app.pitr.is_some() {
        app.tracker.spawn(app.clone().pitr_loop());
    }
    if app.pg_pitr.is_some() {
        app.tracker.spawn(app.clone().pg_pitr_loop());
    }
    {
        let app2 = app.clone();
        app.tracker.spawn(async move {
            let a = app2.clone();
            schedule::run(
                &app2.sc.schedule,
                &schedule::SystemClock,
                &app2.root,
                move |due| {
                    // A skip is counted and logged by `start`.
                    let _ = a.start(JobKind::Backup, Trigger::Schedule, due);
                },
            )
            .await;
        });
    }
    if let Some(tr) = app.sc.test_restore.clone() {
        let app2 = app.clone();
        app.tracker.spawn(async move {
            let a = app2.clone();
            schedule::run(&tr, &schedule::SystemClock, &app2.root, move |due| {
                // A skip is counted and logged by `start`.
                let _ = a.start(JobKind::TestRestore, Trigger::Schedule, due);
            })
            .await;
        });
    }
    {
        let router = http::router(app.clone());
        let stop = root.clone();
        app.tracker.spawn(async move {
            let r = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = r {
                warn!(error = %e, "HTTP server stopped");
            }
        });
    }

    root.cancelled().await;
    // Every job's token is a child of `root`: a running job is already being cancelled.
    info!(
        stop_timeout_ms = app.sc.stop_timeout.as_millis() as u64,
        "stopping: no new connections, no new jobs; waiting for tasks to end"
    );
    app.tracker.close();
    match tokio::time::timeout(app.sc.stop_timeout, app.tracker.wait()).await {
        Ok(()) => {
            info!("sidecar stopped");
            Ok(())
        }
        Err(_) => Err(Error::engine(
            "sidecar",
            format!(
                "the running job did not stop within {}; an incomplete set it left is removed on the next start",
                humantime::format_duration(app.sc.stop_timeout)
            ),
        )),
    }
}

fn next_label(s: &schedule::Schedule) -> String {
    s.next_after(Utc::now())
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| "never".into())
}

/// The engine an error is about, when it names one.
fn error_engine(e: &Error) -> Option<&'static str> {
    match e {
        Error::Unreachable { engine, .. }
        | Error::Refused { engine, .. }
        | Error::Deadline { engine, .. }
        | Error::Engine { engine, .. }
        | Error::NotEmpty { engine, .. } => Some(engine),
        _ => None,
    }
}

fn status_of(r: &Result<impl Sized>) -> JobStatus {
    match r {
        Ok(_) => JobStatus::Succeeded,
        Err(Error::Interrupted(_)) => JobStatus::Cancelled,
        Err(_) => JobStatus::Failed,
    }
}

/// Bytes under `.tmp-*` directories of the repository (the set being written).
pub fn temp_bytes(root: &Path) -> u64 {
    fn size(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => size(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
    let Ok(rd) = std::fs::read_dir(root) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
        .map(|e| size(&e.path()))
        .sum()
}

/// Why a job did not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStarted {
    /// This job is still running.
    Busy(String),
    /// The sidecar is stopping.
    Stopping,
}

impl Sidecar {
    /// Starts a job unless one is running or the sidecar is stopping. Returns its id.
    pub fn start(
        self: &Arc<Self>,
        kind: JobKind,
        trigger: Trigger,
        due: DateTime<Utc>,
    ) -> std::result::Result<String, NotStarted> {
        if self.root.is_cancelled() {
            return Err(NotStarted::Stopping);
        }
        match self.state.try_begin(kind, trigger, &self.root) {
            Ok((id, cancel)) => {
                info!(job = %id, kind = kind.name(), trigger = if trigger == Trigger::Api { "api" } else { "schedule" }, due = %due.to_rfc3339(), "job started");
                let app = self.clone();
                let id2 = id.clone();
                self.tracker.spawn(async move {
                    match kind {
                        JobKind::Backup => app.run_backup(&id2, &cancel).await,
                        JobKind::TestRestore => app.run_test_restore(&id2, &cancel).await,
                    }
                });
                Ok(id)
            }
            Err(busy) => {
                if trigger == Trigger::Schedule {
                    warn!(kind = kind.name(), running = %busy.running, "scheduled run skipped: a job is still running");
                }
                Err(NotStarted::Busy(busy.running))
            }
        }
    }

    /// Logs the phase and bytes written every few seconds while `work` runs.
    async fn with_progress<T>(&self, id: &str, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let start = Instant::now();
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = tick.tick() => {
                    let phase = self.state.job(id).map(|j| j.phase).unwrap_or("?");
                    let root = self.repo.local_root().map(Path::to_path_buf);
                    let bytes = tokio::task::spawn_blocking(move || root.map_or(0, |r| temp_bytes(&r))).await.unwrap_or(0);
                    info!(job = %id, phase, bytes_written = bytes, elapsed_s = start.elapsed().as_secs(), "job progress");
                }
            }
        }
    }

    /// Marks a job running in its first phase; returns when it started.
    fn start_job(&self, id: &str, phase: &'static str) -> Instant {
        let start = Instant::now();
        self.state.update_job(id, |j| {
            j.status = JobStatus::Running;
            j.phase = phase;
            j.started = Some(start);
        });
        start
    }

    async fn run_backup(self: &Arc<Self>, id: &str, cancel: &CancellationToken) {
        let start = self.start_job(id, "backup");
        let result = self
            .with_progress(id, self.backup_verify_prune(id, cancel))
            .await;
        // The copy to the remote is part of the run (the job is not finished before it), but
        // its failure does not fail the run: the set is safe in the repository.
        let remote_error = match &result {
            Ok(_) => self.sync_remote(id, cancel).await,
            Err(_) => None,
        };
        let status = status_of(&result);
        let finished = Utc::now();
        let mut engines = std::collections::BTreeMap::new();
        let (set, error) = match &result {
            Ok((m, prune_error)) => {
                for (k, e) in &m.engines {
                    engines.insert(
                        *k,
                        EngineResult {
                            status: JobStatus::Succeeded,
                            records: Some(e.total_records()),
                            bytes: Some(e.stored_bytes()),
                            duration_seconds: Some(
                                (e.finished_at - e.started_at).num_milliseconds() as f64 / 1000.0,
                            ),
                            error: None,
                        },
                    );
                }
                (Some(m.id.clone()), prune_error.clone())
            }
            Err(e) => {
                let named = error_engine(e);
                for eng in &self.engines {
                    let k = eng.kind();
                    let mine = named.is_none_or(|n| n == k.name());
                    engines.insert(
                        k,
                        EngineResult {
                            status,
                            records: None,
                            bytes: None,
                            duration_seconds: None,
                            error: mine.then(|| format!("{e:#}")),
                        },
                    );
                }
                (None, Some(format!("{e:#}")))
            }
        };
        // A run whose set verified but whose retention failed is reported failed: the set is
        // good, but an operator has to look at the repository.
        let status = if status == JobStatus::Succeeded && error.is_some() {
            JobStatus::Failed
        } else {
            status
        };
        {
            let mut g = self.state.lock();
            if let Some(j) = g.jobs.iter_mut().find(|j| j.id == id) {
                j.status = status;
                j.phase = "done";
                j.finished_at = Some(finished);
                j.engines = engines.clone();
                j.error = error.clone();
                j.remote_error = remote_error;
                if set.is_some() {
                    j.set = set.clone();
                }
            }
            if let Ok((m, _)) = &result {
                g.newest_verified = Some((m.id.clone(), m.started_at));
                for k in m.engines.keys() {
                    g.last_success.insert(*k, m.finished_at);
                }
            }
            g.last_backup = Some(RunRecord {
                status,
                finished_at: finished,
                duration: start.elapsed(),
                engines: engines.clone(),
                error: error.clone(),
            });
            *g.runs.entry(label(status)).or_default() += 1;
        }
        match status {
            JobStatus::Succeeded => {
                info!(job = %id, set = set.as_deref().unwrap_or(""), elapsed_ms = start.elapsed().as_millis() as u64, "backup run succeeded")
            }
            JobStatus::Cancelled => {
                info!(job = %id, "backup run cancelled; its incomplete set was removed")
            }
            _ => warn!(job = %id, error = error.as_deref().unwrap_or(""), "backup run failed"),
        }
        self.refresh_repo().await;
        self.notify(id, status);
    }

    /// Copies the new set (and any an earlier run failed to copy) to the remote, then applies
    /// the remote's retention. A failure is recorded and alerted on; it never fails the run,
    /// whose set is safe in the repository, and the next run tries again. Returns the error.
    async fn sync_remote(&self, id: &str, cancel: &CancellationToken) -> Option<String> {
        let remote = self.remote.as_ref()?;
        self.state.update_job(id, |j| j.phase = "remote");
        let started = Utc::now();
        let r = role::remote::sync(&self.cfg, &self.repo, remote, cancel).await;
        let mut g = self.state.lock();
        g.remote.last_attempt = Some(started);
        match r {
            Ok(rep) => {
                info!(remote = %remote.display(), uploaded = rep.uploaded.len(), bytes = rep.bytes, deleted = rep.deleted.len(), "remote copy up to date");
                g.remote.last_success = Some(Utc::now());
                g.remote.last_error = None;
                g.remote.uploaded_bytes_total += rep.bytes;
                g.remote.uploaded_sets_total += rep.uploaded.len() as u64;
                g.remote.newest = rep.newest;
                None
            }
            Err(e) => {
                let msg = format!("{e:#}");
                warn!(remote = %remote.display(), error = %msg, "copy to the remote failed; the next run retries");
                g.remote.failures_total += 1;
                g.remote.last_error = Some(msg.clone());
                Some(msg)
            }
        }
    }

    /// One run: backup, deep verify, then retention, only after the set verified.
    /// Returns the manifest and a retention error, if any.
    async fn backup_verify_prune(
        &self,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<(Manifest, Option<String>)> {
        let m = role::backup::backup(&self.cfg, &self.engines, cancel).await?;
        self.state.update_job(id, |j| {
            j.phase = "verify";
            j.set = Some(m.id.clone());
        });
        let repo = self.repo.clone();
        let set_id = m.id.clone();
        let c = cancel.clone();
        // A write-only host (age recipients, no identity) cannot decode its own sets: their
        // checksums are what it can check.
        let level = match &self.cfg.crypto {
            Some(k) if !k.can_decrypt() => VerifyLevel::Checksums,
            _ => crate::engine::DEEP,
        };
        let verified = tokio::task::spawn_blocking(move || {
            let set = repo.resolve(&set_id, None)?;
            let report = repo::verify(&set, level, &c)?;
            // A set that fails is moved out of view below, so only a pass is recorded.
            repo.record(&set_id, level, Ok(()));
            Ok(report)
        })
        .await
        .map_err(|e| Error::engine("verify", format!("task failed: {e}")))?;
        match verified {
            Ok(report) => {
                if level.is_deep() {
                    info!(set = %m.id, files = report.files, records = report.records, "new set verifies deeply")
                } else {
                    info!(set = %m.id, files = report.files, "new set verifies by checksum (write-only host: no key to decode it)")
                }
            }
            Err(Error::Interrupted(n)) => {
                // Stopped mid-verify: the set is complete and checksummed, only unverified;
                // retention does not run, so it cannot cost a good set.
                warn!(set = %m.id, "verification interrupted; retention skipped");
                return Err(Error::Interrupted(n));
            }
            Err(e) => {
                self.quarantine(&m.id);
                return Err(Error::corrupt(
                    &m.id,
                    format!(
                        "fails deep verification right after it was written ({e:#}); renamed to {}{FAILED_VERIFY_SUFFIX}",
                        m.id
                    ),
                ));
            }
        }
        self.state.update_job(id, |j| j.phase = "retention");
        let prune_error = match role::prune::prune(&self.cfg, false, false, cancel).await {
            Ok(d) => {
                info!(
                    kept = d.keep.len(),
                    deleted = d.delete.len(),
                    "retention applied"
                );
                None
            }
            Err(Error::Interrupted(n)) => return Err(Error::Interrupted(n)),
            Err(e) => {
                warn!(error = %e, "retention failed");
                Some(format!("retention: {e:#}"))
            }
        };
        Ok((m, prune_error))
    }

    /// Moves a set that failed its deep verification out of view.
    fn quarantine(&self, id: &str) {
        let Some(root) = self.repo.local_root() else {
            // No rename on object storage: the set goes, and the error says why.
            if let Err(e) = self.repo.delete_set(id) {
                warn!(set = %id, error = %e, "set failed deep verification and cannot be deleted");
            }
            return;
        };
        let from = root.join(id);
        let to: PathBuf = root.join(format!("{id}{FAILED_VERIFY_SUFFIX}"));
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                warn!(set = %id, dir = %to.display(), "set failed deep verification; moved out of view")
            }
            Err(e) => {
                warn!(set = %id, error = %e, "set failed deep verification and cannot be moved out of view")
            }
        }
    }

    async fn run_test_restore(self: &Arc<Self>, id: &str, cancel: &CancellationToken) {
        let start = self.start_job(id, "restore");
        let result = self
            .with_progress(
                id,
                role::test_restore::test_restore(&self.cfg, "latest", &self.sc.scratch, cancel),
            )
            .await;
        let status = status_of(&result);
        let finished = Utc::now();
        let (set, engines, error) = match result {
            Ok(r) => (Some(r.set), r.engines, None),
            Err(e) => (None, Default::default(), Some(format!("{e:#}"))),
        };
        {
            let mut g = self.state.lock();
            if let Some(j) = g.jobs.iter_mut().find(|j| j.id == id) {
                j.status = status;
                j.phase = "done";
                j.finished_at = Some(finished);
                j.engines = engines.clone();
                j.error = error.clone();
                j.set = set;
            }
            g.last_test_restore = Some(RunRecord {
                status,
                finished_at: finished,
                duration: start.elapsed(),
                engines,
                error: error.clone(),
            });
        }
        match status {
            JobStatus::Succeeded => info!(job = %id, "test-restore succeeded"),
            JobStatus::Cancelled => info!(job = %id, "test-restore cancelled"),
            _ => warn!(job = %id, error = error.as_deref().unwrap_or(""), "test-restore failed"),
        }
        self.notify(id, status);
    }

    fn notify(&self, id: &str, status: JobStatus) {
        let Some(url) = &self.sc.notify_url else {
            return;
        };
        let wanted = status == JobStatus::Failed
            || (status == JobStatus::Succeeded && self.sc.notify_always);
        if !wanted {
            return;
        }
        if let Some(job) = self.state.job(id) {
            // Not tracked: a webhook that hangs must never hold up a run or the shutdown.
            tokio::spawn(notify::send(url.clone(), notify::payload(&job)));
        }
    }

    /// Looks for the newest set whose checksums verify, once at start-up (sets written by
    /// earlier runs). Runs in the background so the API answers at once.
    async fn find_newest_verified(self: Arc<Self>) {
        let repo = self.repo.clone();
        let found = tokio::task::spawn_blocking(move || repo.newest_good(None)).await;
        match found {
            Ok(Ok(Some(set))) => {
                let t = set.manifest.started_at;
                info!(set = set.id(), "newest verified set");
                let mut g = self.state.lock();
                if g.newest_verified.is_none() {
                    g.newest_verified = Some((set.id().to_owned(), t));
                    for (k, e) in &set.manifest.engines {
                        g.last_success.entry(*k).or_insert(e.finished_at);
                    }
                }
            }
            Ok(Ok(None)) => info!("no verified set in the repository yet"),
            Ok(Err(e)) => warn!(error = %e, "cannot look for the newest verified set"),
            Err(e) => warn!(error = %e, "newest verified set: task failed"),
        }
        if let Some(remote) = self.remote.clone() {
            let found = tokio::task::spawn_blocking(move || {
                remote.list().map(|sets| {
                    sets.into_iter()
                        .find(|s| s.manifest.is_ok())
                        .map(|s| (s.id, s.time))
                })
            })
            .await;
            match found {
                Ok(Ok(newest)) => {
                    let mut g = self.state.lock();
                    if g.remote.newest.is_none() {
                        g.remote.newest = newest;
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "cannot list the remote"),
                Err(e) => warn!(error = %e, "remote listing: task failed"),
            }
        }
        self.refresh_repo().await;
    }

    /// Archives the oplog for as long as the sidecar runs; a failure (server down, repository
    /// full) is recorded, alerted on, and retried.
    async fn pitr_loop(self: Arc<Self>) {
        let Some(status) = self.pitr.clone() else {
            return;
        };
        let Some(crate::engine::Engine::Mongodb(engine)) = self
            .engines
            .iter()
            .find(|e| e.kind() == EngineKind::Mongodb)
        else {
            return;
        };
        let store = crate::engine::mongodb::pitr::SegmentStore::new(self.repo.clone());
        loop {
            let repo = self.repo.clone();
            let newest_set = tokio::task::spawn_blocking(move || {
                repo.list()
                    .map(|sets| role::pitr::bases(&sets).into_iter().map(|b| b.end).max())
                    .unwrap_or(None)
            })
            .await
            .unwrap_or(None);
            let app = self.clone();
            let on_gap = move || {
                // A new set starts a new chain: take one now rather than at the next schedule.
                let _ = app.start(JobKind::Backup, Trigger::Api, Utc::now());
            };
            let r = engine
                .archive_oplog(
                    &store,
                    newest_set,
                    self.cfg.pitr_flush,
                    &status,
                    &on_gap,
                    &self.root,
                )
                .await;
            if self.root.is_cancelled() {
                return;
            }
            if let Err(e) = r {
                warn!(error = %e, "oplog archiving stopped; retrying in 5s");
                if let Ok(mut g) = status.lock() {
                    g.last_error = Some(e.to_string());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = self.root.cancelled() => return,
            }
        }
    }

    /// Streams PostgreSQL's WAL for as long as the sidecar runs; a failure (server down,
    /// repository full) is recorded, alerted on, and retried.
    async fn pg_pitr_loop(self: Arc<Self>) {
        use crate::engine::postgres::pitr;
        let Some(status) = self.pg_pitr.clone() else {
            return;
        };
        let Some(crate::engine::Engine::Postgres(engine)) = self
            .engines
            .iter()
            .find(|e| e.kind() == EngineKind::Postgres)
        else {
            return;
        };
        let store = pitr::WalStore::new(self.repo.clone());
        loop {
            let repo = self.repo.clone();
            let bases = tokio::task::spawn_blocking(move || {
                repo.list()
                    .map(|sets| pitr::bases(&sets))
                    .unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            let app = self.clone();
            let on_gap = move || {
                // A new set starts a chain: take one now rather than at the next schedule.
                let _ = app.start(JobKind::Backup, Trigger::Api, Utc::now());
            };
            let r = engine
                .archive_wal(
                    &store,
                    &self.cfg.postgres_slot,
                    self.cfg.pitr_flush,
                    &status,
                    bases,
                    &on_gap,
                    &self.root,
                )
                .await;
            if self.root.is_cancelled() {
                return;
            }
            if let Ok(mut g) = status.lock() {
                g.running = false;
            }
            if let Err(e) = r {
                warn!(error = %e, "WAL archiving stopped; retrying in 5s");
                if let Ok(mut g) = status.lock() {
                    g.last_error = Some(e.to_string());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = self.root.cancelled() => return,
            }
        }
    }

    /// Clears a reported gap once a set consistent to a point after it exists.
    async fn refresh_pitr(&self) {
        if let Some(status) = &self.pg_pitr
            && let Some((_, resumed)) = status.lock().ok().and_then(|g| g.gap)
        {
            let repo = self.repo.clone();
            let newest = tokio::task::spawn_blocking(move || {
                repo.list()
                    .map(|sets| {
                        crate::engine::postgres::pitr::bases(&sets)
                            .into_iter()
                            .map(|b| b.end_lsn)
                            .max()
                    })
                    .unwrap_or(None)
            })
            .await
            .unwrap_or(None);
            if newest.is_some_and(|n| n >= resumed)
                && let Ok(mut g) = status.lock()
            {
                info!(
                    "pitr: a PostgreSQL set after the WAL gap exists; recovery to points after it is possible again"
                );
                g.gap = None;
            }
        }
        let Some(status) = &self.pitr else { return };
        let gap = status.lock().ok().and_then(|g| g.gap);
        let Some((_, resumed)) = gap else { return };
        let repo = self.repo.clone();
        let newest = tokio::task::spawn_blocking(move || {
            repo.list()
                .map(|sets| role::pitr::bases(&sets).into_iter().map(|b| b.end).max())
                .unwrap_or(None)
        })
        .await
        .unwrap_or(None);
        if newest.is_some_and(|n| n >= resumed)
            && let Ok(mut g) = status.lock()
        {
            info!(
                "pitr: a set after the gap exists; recovery to points after it is possible again"
            );
            g.gap = None;
        }
    }

    async fn health_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.sc.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.root.cancelled() => return,
            }
            self.probe_all().await;
            self.refresh_repo().await;
            self.refresh_pitr().await;
        }
    }

    async fn probe_all(&self) {
        let timeout = self.sc.health_interval.min(MAX_PROBE);
        let results = join_all(self.engines.iter().map(|e| async move {
            let t = Instant::now();
            let r = match tokio::time::timeout(timeout, e.probe(timeout)).await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(Error::Unreachable {
                    engine: e.kind().name(),
                    url: e.display_url().to_owned(),
                    message: format!("no answer within {timeout:?}"),
                }),
            };
            (e, t.elapsed(), r)
        }))
        .await;
        let now = Utc::now();
        let mut g = self.state.lock();
        for (e, elapsed, r) in results {
            let up = r.is_ok();
            let was = g.engines.get(&e.kind()).map(|h| h.up);
            if was != Some(up) {
                match &r {
                    Ok(()) => {
                        info!(engine = %e.kind(), url = e.display_url(), latency_ms = elapsed.as_millis() as u64, "engine up")
                    }
                    Err(err) => {
                        warn!(engine = %e.kind(), url = e.display_url(), error = %err, "engine down")
                    }
                }
            }
            g.engines.insert(
                e.kind(),
                EngineHealth {
                    url: e.display_url().to_owned(),
                    up,
                    latency_seconds: elapsed.as_secs_f64(),
                    checked_at: now,
                    error: r.err().map(|e| format!("{e:#}")),
                },
            );
        }
    }

    /// Re-reads set count, bytes and free space; forgets a newest verified set that was
    /// deleted behind our back.
    async fn refresh_repo(&self) {
        let repo = self.repo.clone();
        let known = self.state.lock().newest_verified.clone();
        let stats = tokio::task::spawn_blocking(move || repo_stats(&repo, known.as_ref()))
            .await
            .unwrap_or_else(|e| {
                (
                    state::RepoStats {
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                    true,
                )
            });
        let (stats, known_exists) = stats;
        let mut g = self.state.lock();
        if g.repo.error.is_none()
            && let Some(err) = &stats.error
        {
            warn!(error = %err, "repository problem");
        }
        if !known_exists {
            g.newest_verified = None;
        }
        g.repo = stats;
    }

    /// Whether an engine is unhealthy, for `/health` and `/alerts`.
    pub fn engine_problems(&self) -> Vec<(EngineKind, String)> {
        let g = self.state.lock();
        self.engines
            .iter()
            .filter_map(|e| match g.engines.get(&e.kind()) {
                Some(h) if h.up => None,
                Some(h) => Some((e.kind(), h.error.clone().unwrap_or_else(|| "down".into()))),
                None => Some((e.kind(), "not probed yet".into())),
            })
            .collect()
    }

    /// The remote's newest set against `DBKEEPER_REMOTE_MAX_AGE`; `None` without a remote. With
    /// no set there yet, the sidecar's uptime counts, as for the repository.
    pub fn remote_freshness(&self, now: DateTime<Utc>) -> Option<std::result::Result<(), String>> {
        let remote = self.remote.as_ref()?;
        let g = self.state.lock();
        let max = self.sc.remote_max_age;
        let limit = humantime::format_duration(max);
        Some(match &g.remote.newest {
            Some((id, t)) => {
                let age = (now - *t).to_std().unwrap_or_default();
                if age > max {
                    Err(format!(
                        "newest set on the remote {} is {id}, {} old, more than DBKEEPER_REMOTE_MAX_AGE={limit}",
                        remote.display(),
                        humantime::format_duration(Duration::from_secs(age.as_secs()))
                    ))
                } else {
                    Ok(())
                }
            }
            None => {
                let up = (now - self.state.started_at).to_std().unwrap_or_default();
                if up > max {
                    Err(format!(
                        "no set on the remote {}, and the sidecar has been up longer than DBKEEPER_REMOTE_MAX_AGE={limit}",
                        remote.display()
                    ))
                } else {
                    Ok(())
                }
            }
        })
    }

    /// The newest verified set's age against the limit: `Err(reason)` when stale. With no set
    /// at all, the sidecar's own uptime counts, so a first start is healthy until one
    /// scheduled interval has had its chance.
    pub fn freshness(
        &self,
        now: DateTime<Utc>,
    ) -> (Option<String>, f64, std::result::Result<(), String>) {
        let g = self.state.lock();
        let max = self.sc.max_backup_age.as_secs_f64();
        match &g.newest_verified {
            Some((id, t)) => {
                let age = (now - *t).num_milliseconds() as f64 / 1000.0;
                let r = if age > max {
                    Err(format!(
                        "newest verified set {id} is {} old, more than DBKEEPER_MAX_BACKUP_AGE={}",
                        humantime::format_duration(Duration::from_secs(age as u64)),
                        humantime::format_duration(self.sc.max_backup_age)
                    ))
                } else {
                    Ok(())
                };
                (Some(id.clone()), age, r)
            }
            None => {
                let up = (now - self.state.started_at).num_milliseconds() as f64 / 1000.0;
                let r = if up > max {
                    Err(format!(
                        "no verified backup set, and the sidecar has been up longer than DBKEEPER_MAX_BACKUP_AGE={}",
                        humantime::format_duration(self.sc.max_backup_age)
                    ))
                } else {
                    Ok(())
                };
                (None, up, r)
            }
        }
    }
}

fn label(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
    }
}

/// Set count, stored bytes and free space of the repository, and whether `known` still exists.
fn repo_stats(repo: &Repo, known: Option<&(String, DateTime<Utc>)>) -> (state::RepoStats, bool) {
    let mut s = state::RepoStats::default();
    let known_exists = known.is_none_or(|(id, _)| repo.has_set(id).unwrap_or(true));
    match repo.list() {
        Ok(sets) => {
            s.sets = sets.len() as u64;
            s.bytes = sets
                .iter()
                .filter_map(|i| i.manifest.as_ref().ok())
                .map(|m| m.stored_bytes())
                .sum();
        }
        Err(e) => s.error = Some(format!("{e:#}")),
    }
    let Some(root) = repo.local_root() else {
        return (s, known_exists);
    };
    match nix::sys::statvfs::statvfs(root) {
        Ok(v) => {
            let frsize = v.fragment_size();
            s.free_bytes = Some(v.blocks_available() * frsize);
            s.total_bytes = Some(v.blocks() * frsize);
        }
        Err(e) => {
            if s.error.is_none() {
                s.error = Some(format!("{}: statvfs: {e}", root.display()));
            }
        }
    }
    (s, known_exists)
}
