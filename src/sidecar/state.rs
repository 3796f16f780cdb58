//! The sidecar's shared state: jobs (at most one running), the health loop's last probes, the
//! newest verified set, run history and counters. Everything here is in memory; the repository
//! on disk stays the source of truth for what sets exist.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use crate::role::outcome::{EngineResult, JobStatus};
use tokio_util::sync::CancellationToken;

use crate::engine::EngineKind;

/// How many finished jobs `GET /jobs/{id}` still knows about.
const KEEP_JOBS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Backup,
    TestRestore,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::TestRestore => "test_restore",
        }
    }
}

/// What started a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Schedule,
    Api,
}

#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub trigger: Trigger,
    pub status: JobStatus,
    /// The current step: `queued`, `backup`, `verify`, `retention`, `restore`, `done`.
    pub phase: &'static str,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    pub engines: BTreeMap<EngineKind, EngineResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the copy to the remote failed (the run itself succeeded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_error: Option<String>,
    #[serde(skip)]
    pub cancel: CancellationToken,
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// The last probe of one engine by the health loop.
#[derive(Debug, Clone, Serialize)]
pub struct EngineHealth {
    pub url: String,
    pub up: bool,
    pub latency_seconds: f64,
    pub checked_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The last finished run of one kind, for metrics and alerts.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub status: JobStatus,
    pub finished_at: DateTime<Utc>,
    pub duration: Duration,
    pub engines: BTreeMap<EngineKind, EngineResult>,
    pub error: Option<String>,
}

/// The repository as last looked at (set count, bytes, free space).
#[derive(Debug, Clone, Default)]
pub struct RepoStats {
    pub sets: u64,
    pub bytes: u64,
    pub free_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub error: Option<String>,
}

/// The off-host copy as last synchronised.
#[derive(Debug, Clone, Default)]
pub struct RemoteStats {
    pub last_attempt: Option<DateTime<Utc>>,
    pub last_success: Option<DateTime<Utc>>,
    /// The last attempt's error; cleared by a success.
    pub last_error: Option<String>,
    pub failures_total: u64,
    pub uploaded_bytes_total: u64,
    pub uploaded_sets_total: u64,
    /// The newest set on the remote and when it was started.
    pub newest: Option<(String, DateTime<Utc>)>,
}

#[derive(Default)]
pub struct Inner {
    pub jobs: VecDeque<Job>,
    next_job: u64,
    pub engines: BTreeMap<EngineKind, EngineHealth>,
    /// Newest set that passed verification (deep for our runs, checksums for older sets).
    pub newest_verified: Option<(String, DateTime<Utc>)>,
    pub last_backup: Option<RunRecord>,
    pub last_success: BTreeMap<EngineKind, DateTime<Utc>>,
    pub last_test_restore: Option<RunRecord>,
    pub runs: BTreeMap<&'static str, u64>,
    pub skipped: u64,
    pub repo: RepoStats,
    pub remote: RemoteStats,
}

/// Why a job could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy {
    pub running: String,
}

pub struct State {
    inner: Mutex<Inner>,
    pub started_at: DateTime<Utc>,
}

impl State {
    pub fn new(started_at: DateTime<Utc>) -> Self {
        State {
            inner: Mutex::new(Inner::default()),
            started_at,
        }
    }

    /// Short critical sections only: nothing awaits while holding this.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new job unless one is queued or running. A scheduled tick that finds one
    /// running is counted as skipped. Returns the job id and its cancellation token (a child
    /// of `parent`, so shutdown cancels it too).
    pub fn try_begin(
        &self,
        kind: JobKind,
        trigger: Trigger,
        parent: &CancellationToken,
    ) -> Result<(String, CancellationToken), Busy> {
        let mut g = self.lock();
        if let Some(j) = g.jobs.iter().find(|j| !j.status.is_finished()) {
            let running = j.id.clone();
            if trigger == Trigger::Schedule {
                g.skipped += 1;
            }
            return Err(Busy { running });
        }
        g.next_job += 1;
        let id = format!("{}-{}", Utc::now().format("%Y%m%d%H%M%S"), g.next_job);
        let cancel = parent.child_token();
        g.jobs.push_back(Job {
            id: id.clone(),
            kind,
            trigger,
            status: JobStatus::Queued,
            phase: "queued",
            created_at: Utc::now(),
            finished_at: None,
            set: None,
            engines: BTreeMap::new(),
            error: None,
            remote_error: None,
            cancel: cancel.clone(),
            started: None,
        });
        while g.jobs.len() > KEEP_JOBS {
            if g.jobs.front().is_some_and(|j| j.status.is_finished()) {
                g.jobs.pop_front();
            } else {
                break;
            }
        }
        Ok((id, cancel))
    }

    pub fn update_job(&self, id: &str, f: impl FnOnce(&mut Job)) {
        let mut g = self.lock();
        if let Some(j) = g.jobs.iter_mut().find(|j| j.id == id) {
            f(j);
        }
    }

    pub fn job(&self, id: &str) -> Option<Job> {
        self.lock().jobs.iter().find(|j| j.id == id).cloned()
    }

    pub fn running_job(&self) -> Option<Job> {
        self.lock()
            .jobs
            .iter()
            .find(|j| !j.status.is_finished())
            .cloned()
    }

    pub fn skipped(&self) -> u64 {
        self.lock().skipped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sidecar::schedule::{self, Clock, Schedule};

    struct PausedClock {
        base: DateTime<Utc>,
        start: tokio::time::Instant,
    }

    impl Clock for PausedClock {
        fn now(&self) -> DateTime<Utc> {
            self.base + chrono::TimeDelta::from_std(self.start.elapsed()).unwrap()
        }
    }

    #[test]
    fn a_second_job_is_refused_while_one_runs() {
        let state = State::new(Utc::now());
        let root = CancellationToken::new();
        let (id, _) = state
            .try_begin(JobKind::Backup, Trigger::Api, &root)
            .unwrap();
        let busy = state
            .try_begin(JobKind::Backup, Trigger::Api, &root)
            .unwrap_err();
        assert_eq!(busy.running, id);
        // An API refusal is a 409, not a skipped scheduled run.
        assert_eq!(state.skipped(), 0);
        state.update_job(&id, |j| j.status = JobStatus::Failed);
        assert!(
            state
                .try_begin(JobKind::Backup, Trigger::Api, &root)
                .is_ok()
        );
    }

    #[test]
    fn cancelling_the_parent_cancels_the_job() {
        let state = State::new(Utc::now());
        let root = CancellationToken::new();
        let (_, job) = state
            .try_begin(JobKind::Backup, Trigger::Api, &root)
            .unwrap();
        root.cancel();
        assert!(job.is_cancelled());
    }

    /// Every 10 minutes a run is due; each run takes 25 minutes. Runs never overlap: the two
    /// ticks that fall inside a run are skipped and counted, and the next tick after it
    /// finishes starts a new one.
    #[tokio::test(start_paused = true)]
    async fn scheduled_ticks_during_a_run_are_skipped_and_counted() {
        let state = Arc::new(State::new(Utc::now()));
        let root = CancellationToken::new();
        let clock = PausedClock {
            base: DateTime::parse_from_rfc3339("2026-11-23T00:05:00Z")
                .unwrap()
                .with_timezone(&Utc),
            start: tokio::time::Instant::now(),
        };
        let s = Schedule::parse("S", "*/10 * * * *", None).unwrap();
        let started = Arc::new(Mutex::new(Vec::new()));
        let stop = root.child_token();
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                // Stop at 01:04:30, after the ticks at 00:10 … 01:00 (six).
                tokio::time::sleep(Duration::from_secs(3570)).await;
                stop.cancel();
            })
        };
        let (st, started2, root2) = (state.clone(), started.clone(), root.clone());
        schedule::run(&s, &clock, &stop, move |due| {
            if let Ok((id, _)) = st.try_begin(JobKind::Backup, Trigger::Schedule, &root2) {
                started2.lock().unwrap().push(due);
                let st = st.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(25 * 60)).await;
                    st.update_job(&id, |j| j.status = JobStatus::Succeeded);
                });
            }
        })
        .await;
        stopper.await.unwrap();
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        // 00:10 starts (ends 00:35); 00:20, 00:30 skipped; 00:40 starts (ends 01:05);
        // 00:50, 01:00 skipped.
        assert_eq!(
            *started.lock().unwrap(),
            vec![at("2026-11-23T00:10:00Z"), at("2026-11-23T00:40:00Z")]
        );
        assert_eq!(state.skipped(), 4);
    }
}
