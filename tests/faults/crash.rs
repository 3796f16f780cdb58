//! Crash points: SIGKILL at seeded uniform moments of each operation (its duration measured
//! once first), then the invariants: every visible set verifies deep; the next writer gets the
//! lock and removes the temp set; a killed preseed/restore leaves its marker (or nothing, or
//! the finished data) and the next run ends with data equal to the set.
//!
//! Each case prints its seed and kill offset; `DBKEEPER_FAULT_SEED` replays the run.

mod engines;
mod ops;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{assert_code, dbkeeper, free_port, sets, temps, wait_until};
use crate::report;
use crate::secrets::{assert_clean, checked_output};

/// Kills per operation: ~2 in the quick run, 100 in the full one.
fn kills_per_op() -> usize {
    report::cases(2, 100)
}

/// The kill offset of case `i` of `class`: uniform over `[0, dur)`, from the case's seed.
fn offset(class: &str, i: usize, dur: Duration) -> Duration {
    // splitmix64 of the case seed: one uniform draw.
    let mut z = report::case_seed(class, i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    dur.mul_f64((z >> 11) as f64 / (1u64 << 53) as f64)
}

/// Runs `cmd` to its end once (it must succeed) and returns how long it took.
#[track_caller]
fn measure(cmd: &mut Command, secrets: &[&str]) -> Duration {
    let t = Instant::now();
    let o = checked_output(cmd, secrets);
    let took = t.elapsed();
    assert_code(&o, 0);
    took
}

/// What a process killed at some moment left.
pub struct Killed {
    /// Whether SIGKILL was sent (false: it had already ended).
    pub killed: bool,
}

/// Spawns `cmd`, SIGKILLs it `at` after the start unless it ended first, and checks what it
/// printed for `secrets` and panics. One that ended on its own must have succeeded.
#[track_caller]
fn run_killed(cmd: &mut Command, at: Duration, secrets: &[&str]) -> Killed {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn dbkeeper");
    let killed = kill_at(&mut child, at);
    let status = child.wait().unwrap();
    // A kill can land just after the process exited on its own (not yet reaped): then its
    // status has a code, not the signal, and it counts as ended on its own.
    let killed = {
        use std::os::unix::process::ExitStatusExt;
        killed && status.signal().is_some()
    };
    let (out, err) = (std::fs::read(&out).unwrap(), std::fs::read(&err).unwrap());
    assert_clean("stdout", &out, secrets);
    assert_clean("stderr", &err, secrets);
    let err = String::from_utf8_lossy(&err);
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    if killed {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{err}");
    } else {
        assert!(status.success(), "it ended on its own and failed:\n{err}");
    }
    Killed { killed }
}

/// Sleeps until `at` after now and SIGKILLs `child` unless it has ended. Returns whether it
/// was killed.
fn kill_at(child: &mut Child, at: Duration) -> bool {
    let end = Instant::now() + at;
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(5)));
    }
    if child.try_wait().unwrap().is_some() {
        return false;
    }
    child.kill().unwrap();
    true
}

/// Runs `n` cases of `class`, each killing the operation at its seeded offset within `dur`;
/// records the tally and fails the test if any case failed.
fn kills(class: &str, dur: Duration, mut case: impl FnMut(Duration)) {
    let n = kills_per_op();
    eprintln!("{class}: operation takes {dur:?}; {n} kills");
    let mut failures = Vec::new();
    for i in 0..n {
        let at = offset(class, i, dur);
        let seed = report::case_seed(class, i);
        eprintln!("{class} case {i}: SIGKILL at {at:?} of {dur:?} (case seed {seed})");
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(at))) {
            let msg = crate::report::panic_message(&*e);
            failures.push(format!("case {i} (seed {seed}, kill at {at:?}): {msg}"));
            // A broken state would fail every later case the same way.
            if failures.len() >= 3 {
                report::record(class, i + 1, i + 1 - failures.len(), &failures);
                panic!("{class}: {failures:#?}");
            }
        }
    }
    report::record(class, n, n - failures.len(), &failures);
    assert!(failures.is_empty(), "{class}: {failures:#?}");
}

/// Every visible set of a local repository verifies deep.
#[track_caller]
fn every_set_verifies(repo: &Path, secrets: &[&str]) {
    for id in sets(repo) {
        let o = checked_output(dbkeeper(repo).args(["verify", &id, "--deep"]), secrets);
        assert_code(&o, 0);
    }
}

/// The next writer (`cmd`, a backup or prune) gets the lock, succeeds and leaves no temp.
#[track_caller]
fn next_writer(repo: &Path, cmd: &mut Command, secrets: &[&str]) {
    let o = checked_output(cmd, secrets);
    assert_code(&o, 0);
    assert!(
        temps(repo).is_empty(),
        "temps after the next writer: {:?}",
        temps(repo)
    );
}

/// Keeps the `n` newest sets (by hand, so the repository stays small across cases).
fn trim(repo: &Path, n: usize) {
    let all = sets(repo);
    for id in &all[..all.len().saturating_sub(n)] {
        std::fs::remove_dir_all(repo.join(id)).unwrap();
    }
}

/// A running `dbkeeper sidecar` on a free port, killed on drop; its streams go to files.
pub struct Sidecar {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sidecar {
    pub fn start(repo: &Path, env: &[(&str, &str)]) -> Sidecar {
        let s = Sidecar::spawn(repo, env);
        let up = wait_until(Duration::from_secs(30), || {
            crate::common::try_http(s.port, "GET", "/health", None).is_ok()
        });
        assert!(up, "the sidecar did not start:\n{}", s.log());
        s
    }

    fn spawn(repo: &Path, env: &[(&str, &str)]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = dbkeeper(repo);
        cmd.arg("sidecar")
            .env("DBKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DBKEEPER_HEALTH_INTERVAL", "200ms")
            .env("DBKEEPER_LOG_FORMAT", "text")
            .env("DBKEEPER_MIN_FREE", "0%")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the sidecar");
        Sidecar {
            child: Some(child),
            port,
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("err")).unwrap_or_default()
    }

    /// One request; the body as JSON (or as a string when it is not JSON).
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let (code, body) = crate::common::try_http(self.port, method, path, token)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        (
            code,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// Polls a job until it has finished; returns it.
    pub fn wait_job(&self, id: &str) -> Value {
        let mut last = Value::Null;
        let done = wait_until(Duration::from_secs(120), || {
            last = self.http("GET", &format!("/jobs/{id}"), None).1;
            matches!(
                last["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        });
        assert!(done, "job {id} did not finish: {last}\n{}", self.log());
        last
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().unwrap()
    }

    /// Kills the process; returns (stderr, stdout).
    pub fn stop(mut self) -> (String, String) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        (
            self.log(),
            std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default(),
        )
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A scratch directory's entries (names only).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Empties a directory, keeping it.
fn empty_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p: PathBuf = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}
