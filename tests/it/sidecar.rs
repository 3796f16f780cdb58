//! The resident sidecar, `init` and `test-restore` as processes against real `redis-server`s:
//! jobs over the HTTP API, the token, metrics read by the reference parser, /health flipping
//! to 503, SIGTERM during a run, one job at a time, webhooks, and the init exit codes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::redis::RedisServer;
use crate::common::{
    age_key, assert_code, dbkeeper, free_port, run, server_binary, sets, stderr, stdout, temps,
    wait_until,
};

const TOKEN: &str = "t0ken-Sidecar-99";

/// A running `dbkeeper sidecar`, killed on drop. Its stderr goes to a file read by `log()`.
struct Sidecar {
    child: Child,
    port: u16,
    log: PathBuf,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    fn start(repo: &Path, env: &[(&str, &str)]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let out = dir.path().join("stdout");
        let port = free_port();
        let mut cmd = dbkeeper(repo);
        cmd.arg("sidecar")
            .env("DBKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DBKEEPER_HEALTH_INTERVAL", "200ms")
            .env("DBKEEPER_LOG_FORMAT", "text")
            // The build machine's own free space must not raise a low-disk alert in tests
            // that expect none; a test of that alert sets its own threshold.
            .env("DBKEEPER_MIN_FREE", "0%")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the sidecar");
        let mut s = Sidecar {
            child,
            port,
            log,
            out,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(30), || {
            s.child.try_wait().unwrap().is_none()
                && crate::common::try_http(port, "GET", "/health", None).is_ok()
        });
        assert!(up, "the sidecar did not start:\n{}", s.log());
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the sidecar printed on stdout: nothing, its output is its log.
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let (code, body) = http(self.port, "GET", path, None);
        (
            code,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
        let (code, body) = http(self.port, method, path, token);
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body:?}"));
        (code, v)
    }

    /// Polls a job until it has finished; returns it.
    fn wait_job(&self, id: &str) -> Value {
        let mut last = Value::Null;
        let done = wait_until(Duration::from_secs(120), || {
            last = self.get(&format!("/jobs/{id}")).1;
            matches!(
                last["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        });
        assert!(done, "job {id} did not finish: {last}\n{}", self.log());
        last
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit; returns its code.
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut code = None;
        wait_until(within, || match self.child.try_wait().unwrap() {
            Some(st) => {
                code = Some(st.code().unwrap_or(-1));
                true
            }
            None => false,
        });
        code
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    crate::common::try_http(port, method, path, token)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn redis_env(r: &RedisServer) -> (&'static str, String) {
    ("DBKEEPER_REDIS_URL", r.url())
}

/// Starts a backup over the API and returns the finished job.
fn backup_via_api(sc: &Sidecar, token: Option<&str>) -> Value {
    let (code, v) = sc.call("POST", "/backups", token);
    assert_eq!(code, 202, "{v}");
    sc.wait_job(v["job"].as_str().unwrap())
}

#[test]
fn a_backup_started_over_the_api_publishes_a_set_that_verifies() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "5000", "key", "50"]);
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(repo.path(), &[(k, &url)]);

    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}\n{}", sc.log());
    let set = job["set"].as_str().unwrap().to_owned();
    assert_eq!(job["engines"]["redis"]["status"], "succeeded");
    assert_eq!(job["engines"]["redis"]["records"], 5000);
    assert!(job["engines"]["redis"]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(sets(repo.path()), vec![set.clone()]);
    assert!(temps(repo.path()).is_empty());
    assert!(
        sc.log().contains("new set verifies deeply"),
        "no deep verify logged:\n{}",
        sc.log()
    );
    assert!(sc.log().contains("retention applied"), "{}", sc.log());
    // The sidecar recorded its verification beside the set: `list` shows it.
    let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed[0]["status"], "ok", "{listed}");
    assert_eq!(listed[0]["verified"]["level"], "deep", "{listed}");

    // The CLI agrees the set is whole.
    let o = run(dbkeeper(repo.path()).args(["verify", &set, "--deep"]));
    assert_code(&o, 0);

    let (code, list) = sc.get("/backups");
    assert_eq!(code, 200);
    assert_eq!(list[0]["id"], set.as_str());
    assert_eq!(list[0]["newest_verified"], true);
    assert_eq!(list[0]["engines"]["redis"]["records"], 5000);

    let ok = wait_until(Duration::from_secs(10), || sc.get("/health").0 == 200);
    assert!(ok, "{}", sc.get("/health").1);
    let (_, health) = sc.get("/health");
    assert_eq!(health["backup"]["newest_verified"], set.as_str());
    assert_eq!(sc.get("/alerts").1["alerts"], Value::Array(vec![]));

    // Unknown job and unknown endpoint: JSON errors.
    let (code, v) = sc.get("/jobs/nope");
    assert_eq!(code, 404);
    assert!(v["error"].is_string());
    let (code, v) = sc.get("/nope");
    assert_eq!(code, 404);
    assert!(v["error"].is_string());
}

#[test]
fn mutating_calls_need_the_token_when_one_is_set() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["SET", "a", "1"]);
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(
        repo.path(),
        &[
            (k, &url),
            ("DBKEEPER_API_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    );

    for token in [None, Some("wrong")] {
        let (code, v) = sc.call("POST", "/backups", token);
        assert_eq!(code, 401, "{token:?}: {v}");
        let msg = v["error"].as_str().unwrap().to_lowercase();
        assert!(msg.contains("bearer"), "{v}");
        let (code, _) = sc.call("DELETE", "/jobs/anything", token);
        assert_eq!(code, 401);
    }
    assert!(
        sets(repo.path()).is_empty(),
        "an unauthorized call started a backup"
    );
    // Reads stay open.
    assert_eq!(sc.get("/backups").0, 200);

    let job = backup_via_api(&sc, Some(TOKEN));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(sets(repo.path()).len(), 1);
    assert!(!sc.log().contains(TOKEN), "the token reached the log");
}

/// Parses a metrics page with the Prometheus project's own Python parser and returns
/// `[name, labels, value]` samples.
fn parse_metrics(text: &str) -> Vec<(String, Value, f64)> {
    let python = server_binary("DBKEEPER_TEST_PYTHON", "venv/bin/python", "python3");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    assert fam.documentation, fam.name + " has no HELP"
    assert fam.type in ("gauge", "counter"), fam.name + " " + fam.type
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser rejected the page: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Vec<(String, Value, f64)> = serde_json::from_slice(&o.stdout).unwrap();
    v
}

fn sample(samples: &[(String, Value, f64)], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l[k] == v))
        .unwrap_or_else(|| panic!("no sample {name} {label:?} in {samples:?}"))
        .2
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "1000"]);
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(repo.path(), &[(k, &url)]);
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(wait_until(Duration::from_secs(10), || sc.get("/health").0 == 200));

    let (code, text) = http(sc.port, "GET", "/metrics", None);
    assert_eq!(code, 200);
    let m = parse_metrics(&text);
    let redis = Some(("engine", "redis"));
    assert_eq!(sample(&m, "dbkeeper_engine_up", redis), 1.0);
    assert!(sample(&m, "dbkeeper_engine_probe_duration_seconds", redis) > 0.0);
    assert_eq!(sample(&m, "dbkeeper_backup_last_status", redis), 1.0);
    assert!(sample(&m, "dbkeeper_backup_last_size_bytes", redis) > 0.0);
    assert!(sample(&m, "dbkeeper_backup_last_duration_seconds", redis) >= 0.0);
    let last = sample(&m, "dbkeeper_backup_last_success_timestamp_seconds", redis);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(last > now - 3600.0 && last <= now + 1.0, "{last} vs {now}");
    assert_eq!(
        sample(
            &m,
            "dbkeeper_backup_runs_total",
            Some(("result", "succeeded"))
        ),
        1.0
    );
    assert_eq!(sample(&m, "dbkeeper_backup_runs_skipped_total", None), 0.0);
    assert_eq!(sample(&m, "dbkeeper_repository_sets", None), 1.0);
    assert!(sample(&m, "dbkeeper_repository_bytes", None) > 0.0);
    assert!(sample(&m, "dbkeeper_repository_free_bytes", None) > 0.0);
}

#[test]
fn health_turns_503_when_an_engine_stops_and_the_healthcheck_follows() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(repo.path(), &[(k, &url)]);
    let listen = format!("127.0.0.1:{}", sc.port);
    // No set yet, but the sidecar is younger than the maximum age: a first start is healthy.
    assert!(wait_until(Duration::from_secs(10), || sc.get("/health").0 == 200));
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_LISTEN", &listen)
        .args(["health", "self"]));
    assert_code(&o, 0);
    assert!(stdout(&o).starts_with("healthy:"), "{}", stdout(&o));

    r.stop();
    let down = wait_until(Duration::from_secs(20), || sc.get("/health").0 == 503);
    let (_, v) = sc.get("/health");
    assert!(down, "{v}");
    assert_eq!(v["status"], "unhealthy");
    assert!(
        v["reasons"][0].as_str().unwrap().starts_with("redis down"),
        "{v}"
    );
    assert_eq!(v["engines"]["redis"]["up"], false);
    let alerts = sc.get("/alerts").1;
    assert_eq!(alerts["alerts"][0]["alert"], "engine_down", "{alerts}");
    assert!(sc.log().contains("engine down"), "{}", sc.log());

    // `dbkeeper health self` and `dbkeeper-health http://…/health` read it: exit 1, one line.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_LISTEN", &listen)
        .args(["health", "self"]));
    assert_code(&o, 1);
    assert!(stdout(&o).contains("redis down"), "{}", stdout(&o));
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("dbkeeper-health");
    std::os::unix::fs::symlink(crate::common::bin(), &link).unwrap();
    let o = run(Command::new(&link).arg(format!("http://{listen}/health")));
    assert_code(&o, 1);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    // Nothing listening: unhealthy, not a crash.
    let o = run(Command::new(&link).arg(format!("http://127.0.0.1:{}/health", free_port())));
    assert_code(&o, 1);
}

/// Writes a copy of `set` under an old name, as if it had been taken in 2020.
fn age_set(repo: &Path, set: &str, old: &str) {
    let from = repo.join(set);
    let to = repo.join(old);
    let status = Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(&to)
        .status()
        .unwrap();
    assert!(status.success());
    let path = to.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    m["id"] = old.into();
    m["started_at"] = "2020-01-01T00:00:00Z".into();
    m["finished_at"] = "2020-01-01T00:00:05Z".into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let _ = std::fs::remove_file(to.join("manifest.json.sha256"));
    std::fs::remove_dir_all(&from).unwrap();
}

#[test]
fn health_turns_503_when_the_newest_set_is_older_than_the_limit() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", r.url())
        .arg("backup"));
    assert_code(&o, 0);
    let set = stdout(&o).trim().to_owned();
    age_set(repo.path(), &set, "2020-01-01_00-00-00");
    assert_code(
        &run(dbkeeper(repo.path()).args(["verify", "2020-01-01_00-00-00"])),
        0,
    );

    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(repo.path(), &[(k, &url), ("DBKEEPER_MAX_BACKUP_AGE", "1h")]);
    let stale = wait_until(Duration::from_secs(20), || {
        let (code, v) = sc.get("/health");
        code == 503 && v["backup"]["newest_verified"] == "2020-01-01_00-00-00"
    });
    let (_, v) = sc.get("/health");
    assert!(stale, "{v}");
    assert!(
        v["reasons"][0]
            .as_str()
            .unwrap()
            .contains("DBKEEPER_MAX_BACKUP_AGE"),
        "{v}"
    );
    assert_eq!(v["engines"]["redis"]["up"], true, "{v}");
    let alerts = sc.get("/alerts").1;
    assert_eq!(alerts["alerts"][0]["alert"], "backup_stale", "{alerts}");

    // A fresh run makes it healthy again.
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(sc.get("/health").0, 200, "{}", sc.get("/health").1);
}

#[test]
fn sigterm_during_a_run_exits_0_in_time_and_leaves_no_partial_set() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "300000", "key", "100"]);
    // The server waits this long before it streams the snapshot: the run is certainly in
    // progress, with its temp set on disk, when the signal comes.
    r.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "60"]);
    let (k, url) = redis_env(&r);
    let mut sc = Sidecar::start(repo.path(), &[(k, &url), ("DBKEEPER_STOP_TIMEOUT", "8s")]);
    let (code, v) = sc.call("POST", "/backups", None);
    assert_eq!(code, 202, "{v}");
    assert!(
        wait_until(Duration::from_secs(20), || !temps(repo.path()).is_empty()),
        "no temp set appeared:\n{}",
        sc.log()
    );
    let (_, job) = sc.get(&format!("/jobs/{}", v["job"].as_str().unwrap()));
    assert_eq!(job["status"], "running", "{job}");

    let t = Instant::now();
    sc.signal(nix::sys::signal::Signal::SIGTERM);
    // Docker sends SIGKILL 10 s after SIGTERM.
    let code = sc.wait_exit(Duration::from_secs(10));
    let took = t.elapsed();
    eprintln!("SIGTERM to exit during a run: {took:?}");
    assert_eq!(code, Some(0), "{}", sc.log());
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
    assert!(sc.log().contains("sidecar stopped"), "{}", sc.log());

    // The next start finds nothing to clean up, and /health answers.
    r.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"]);
    let sc2 = Sidecar::start(repo.path(), &[(k, &url)]);
    assert!(temps(repo.path()).is_empty());
    assert!(!sc2.log().contains("incomplete set"), "{}", sc2.log());
}

#[test]
fn a_second_post_while_one_runs_is_409_and_delete_cancels_without_a_trace() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "1000"]);
    r.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "60"]);
    let (k, url) = redis_env(&r);
    let sc = Arc::new(Sidecar::start(repo.path(), &[(k, &url)]));
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (sc, b) = (sc.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                sc.call("POST", "/backups", None)
            })
        })
        .collect();
    let posts: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut codes: Vec<u16> = posts.iter().map(|(c, _)| *c).collect();
    codes.sort();
    assert_eq!(codes, vec![202, 409], "{posts:?}");
    let (_, accepted) = posts.iter().find(|(c, _)| *c == 202).unwrap();
    let (_, refused) = posts.iter().find(|(c, _)| *c == 409).unwrap();
    let id = accepted["job"].as_str().unwrap();
    assert_eq!(refused["job"], id, "the 409 names the running job");
    assert!(refused["error"].is_string());

    assert!(wait_until(Duration::from_secs(20), || !temps(repo.path()).is_empty()));
    let (code, v) = sc.call("DELETE", &format!("/jobs/{id}"), None);
    assert_eq!(code, 202, "{v}");
    let job = sc.wait_job(id);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(sets(repo.path()).is_empty());
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
    // A cancelled job cannot be cancelled again; a new one may start.
    assert_eq!(sc.call("DELETE", &format!("/jobs/{id}"), None).0, 409);
    let (code, v) = sc.call("POST", "/backups", None);
    assert_eq!(code, 202, "{v}");
    let id = v["job"].as_str().unwrap();
    assert_eq!(sc.call("DELETE", &format!("/jobs/{id}"), None).0, 202);
    assert_eq!(sc.wait_job(id)["status"], "cancelled");
    assert!(sets(repo.path()).is_empty());
}

/// A one-connection-at-a-time webhook receiver: answers the given status codes in turn and
/// returns the bodies it received.
fn receiver(answers: Vec<u16>) -> (u16, std::thread::JoinHandle<Vec<Value>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        for status in answers {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut r = BufReader::new(s);
            let mut len = 0usize;
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if first {
                    assert!(line.starts_with("POST /hook "), "{line}");
                    first = false;
                }
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            bodies.push(serde_json::from_slice(&body).unwrap());
            let mut s = r.into_inner();
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
        }
        bodies
    });
    (port, h)
}

#[test]
fn a_failed_run_is_posted_to_the_webhook_with_retries() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    let (k, url) = redis_env(&r);
    // The first attempt gets a 500; the retry is accepted.
    let (hook_port, hook) = receiver(vec![500, 200]);
    let hook_url = format!("http://127.0.0.1:{hook_port}/hook");
    let sc = Sidecar::start(
        repo.path(),
        &[(k, &url), ("DBKEEPER_NOTIFY_URL", &hook_url)],
    );
    r.stop();
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["engines"]["redis"]["error"].is_string(), "{job}");
    let bodies = hook.join().unwrap();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1], "a retry sends the same notice");
    let b = &bodies[1];
    assert_eq!(b["event"], "backup_failed", "{b}");
    assert_eq!(b["job"], job["id"]);
    assert!(b["error"].as_str().unwrap().contains("redis"), "{b}");
    assert!(wait_until(Duration::from_secs(10), || sc
        .log()
        .contains("notification sent")));
    let alerts = sc.get("/alerts").1;
    let names: Vec<&str> = alerts["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"last_run_failed"), "{alerts}");
    assert!(sets(repo.path()).is_empty());
    assert!(temps(repo.path()).is_empty());
}

#[test]
fn sidecar_configuration_errors_exit_2_with_one_line() {
    let repo = tempfile::tempdir().unwrap();
    for (k, v, says) in [
        ("DBKEEPER_SCHEDULE", "0 2 * *", "DBKEEPER_SCHEDULE"),
        ("DBKEEPER_SCHEDULE", "0 0 0 2 * *", "5 cron fields"),
        ("TZ", "Mars/Olympus", "TZ"),
        ("DBKEEPER_LISTEN", "nowhere", "DBKEEPER_LISTEN"),
        ("DBKEEPER_MIN_FREE", "lots", "DBKEEPER_MIN_FREE"),
        ("DBKEEPER_MAX_BACKUP_AGE", "3", "unit"),
        ("DBKEEPER_NOTIFY_URL", "ftp://x", "DBKEEPER_NOTIFY_URL"),
        ("DBKEEPER_TEST_RESTORE_SCHEDULE", "0 3 * * *", "scratch"),
    ] {
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")
            .env(k, v)
            .arg("sidecar"));
        assert_code(&o, 2);
        assert!(stderr(&o).contains(says), "{k}={v}: {}", stderr(&o));
    }
    // No engine at all.
    let o = run(dbkeeper(repo.path()).arg("sidecar"));
    assert_code(&o, 2);
    // A missing repository is a repository error.
    let o = run(dbkeeper(&repo.path().join("missing"))
        .env("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")
        .arg("sidecar"));
    assert_code(&o, 4);
}

#[test]
fn init_exit_codes() {
    let repo = tempfile::tempdir().unwrap();
    // 2: nothing configured, or a bad URL.
    assert_code(&run(dbkeeper(repo.path()).arg("init")), 2);
    assert_code(
        &run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", "mongodb://x")
            .arg("init")),
        2,
    );

    // 3: the engine never becomes ready before the deadline.
    let o = run(dbkeeper(repo.path())
        .env(
            "DBKEEPER_REDIS_URL",
            format!("redis://127.0.0.1:{}", free_port()),
        )
        .args(["init", "--timeout", "1s"]));
    assert_code(&o, 3);
    assert!(stderr(&o).contains("not ready"), "{}", stderr(&o));

    // 0: first start (no backup, empty target).
    let src = RedisServer::start();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", src.url())
        .arg("init"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("first start"), "{}", stderr(&o));

    // 0: seeded from the newest set.
    src.cli(&["DEBUG", "POPULATE", "777"]);
    assert_code(
        &run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", src.url())
            .arg("backup")),
        0,
    );
    let dst = RedisServer::start();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", dst.url())
        .arg("init"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("preseeded"), "{}", stderr(&o));
    assert_eq!(dst.total_keys(), 777);
    assert_eq!(dst.digest(), src.digest());

    // 0: skipped, the target holds data (and is left alone).
    dst.cli(&["SET", "extra", "1"]);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", dst.url())
        .arg("init"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("holds data"), "{}", stderr(&o));
    assert_eq!(dst.total_keys(), 778);

    // 4: the repository is missing.
    let empty = RedisServer::start();
    let o = run(dbkeeper(&repo.path().join("missing"))
        .env("DBKEEPER_REDIS_URL", empty.url())
        .arg("init"));
    assert_code(&o, 4);
    assert_eq!(
        stderr(&o)
            .lines()
            .filter(|l| l.starts_with("dbkeeper:"))
            .count(),
        1
    );
}

#[test]
fn test_restore_restores_into_scratch_compares_and_cleans_up() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    src.cli(&["DEBUG", "POPULATE", "2500"]);
    assert_code(
        &run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", src.url())
            .arg("backup")),
        0,
    );
    let scratch = RedisServer::start();
    scratch.cli(&["SET", "leftover", "x"]);

    // Refused without a scratch target, and when the target is the configured engine.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", src.url())
        .arg("test-restore"));
    assert_code(&o, 2);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", src.url())
        .args([
            "test-restore",
            "--into",
            &src.url().replace("127.0.0.1", "localhost"),
        ]));
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("also a configured engine"),
        "{}",
        stderr(&o)
    );
    assert_eq!(src.total_keys(), 2500, "the source was touched");

    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", src.url())
        .args(["test-restore", "latest", "--into", &scratch.url()]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("2500 records match"), "{}", stdout(&o));
    assert_eq!(
        scratch.total_keys(),
        0,
        "the scratch server was not cleaned"
    );
    assert_eq!(src.total_keys(), 2500);

    // From the environment, too.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_TEST_RESTORE_REDIS_URL", scratch.url())
        .arg("test-restore"));
    assert_code(&o, 0);
}

#[test]
fn the_sidecar_runs_test_restore_into_its_scratch_server() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    src.cli(&["DEBUG", "POPULATE", "1200"]);
    let scratch = RedisServer::start();
    scratch.cli(&["SET", "leftover", "x"]);
    let (k, url) = redis_env(&src);
    // Without scratch servers the endpoint says what to set.
    let plain = Sidecar::start(repo.path(), &[(k, &url)]);
    let (code, v) = plain.call("POST", "/test-restores", None);
    assert_eq!(code, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("DBKEEPER_TEST_RESTORE_REDIS_URL")
    );
    drop(plain);

    let scratch_url = scratch.url();
    let sc = Sidecar::start(
        repo.path(),
        &[
            (k, &url),
            ("DBKEEPER_TEST_RESTORE_REDIS_URL", &scratch_url),
            ("DBKEEPER_TEST_RESTORE_SCHEDULE", "0 4 * * *"),
        ],
    );
    assert_eq!(backup_via_api(&sc, None)["status"], "succeeded");
    let (code, v) = sc.call("POST", "/test-restores", None);
    assert_eq!(code, 202, "{v}");
    let job = sc.wait_job(v["job"].as_str().unwrap());
    assert_eq!(job["status"], "succeeded", "{job}\n{}", sc.log());
    assert_eq!(job["kind"], "test_restore");
    assert_eq!(job["engines"]["redis"]["records"], 1200);
    assert_eq!(
        scratch.total_keys(),
        0,
        "the scratch server was not cleaned"
    );
    assert_eq!(src.total_keys(), 1200);
    let (_, text) = http(sc.port, "GET", "/metrics", None);
    assert_eq!(
        sample(
            &parse_metrics(&text),
            "dbkeeper_test_restore_last_status",
            None
        ),
        1.0
    );

    // A scratch URL that is the guarded engine itself is refused at start-up.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", &url)
        .env("DBKEEPER_TEST_RESTORE_REDIS_URL", &url)
        .arg("sidecar"));
    assert_code(&o, 2);
}

/// The real schedule, end to end: `* * * * *` fires at the next minute boundary (so this
/// test takes up to a minute).
#[test]
fn a_scheduled_run_fires_on_the_minute() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(
        repo.path(),
        &[(k, &url), ("DBKEEPER_SCHEDULE", "* * * * *")],
    );
    let ran = wait_until(Duration::from_secs(90), || {
        let (_, text) = http(sc.port, "GET", "/metrics", None);
        text.contains("dbkeeper_backup_runs_total{result=\"succeeded\"} 1")
    });
    assert!(ran, "no scheduled run:\n{}", sc.log());
    assert_eq!(sets(repo.path()).len(), 1);
    assert!(sc.log().contains("\"schedule\""), "{}", sc.log());
}

/// Retention runs only after a run whose set verified: a failed run deletes nothing, even
/// when the policy would.
#[test]
fn a_failed_run_never_applies_retention_and_a_verified_one_does() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);
    for _ in 0..2 {
        assert_code(
            &run(dbkeeper(repo.path())
                .env("DBKEEPER_REDIS_URL", r.url())
                .arg("backup")),
            0,
        );
    }
    let before = sets(repo.path());
    assert_eq!(before.len(), 2);
    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(
        repo.path(),
        &[
            (k, &url),
            ("DBKEEPER_KEEP_LAST", "1"),
            ("DBKEEPER_KEEP_DAILY", "0"),
        ],
    );

    // The server now wants a password the sidecar does not have: the run fails.
    r.cli(&["CONFIG", "SET", "requirepass", "locked-out"]);
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        sets(repo.path()),
        before,
        "a failed run changed the repository"
    );

    let o = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &r.port.to_string()])
        .env("REDISCLI_AUTH", "locked-out")
        .args(["CONFIG", "SET", "requirepass", ""])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        sets(repo.path()),
        vec![job["set"].as_str().unwrap().to_owned()],
        "retention (keep last 1) did not run after the verified run"
    );
    assert!(
        sc.log().contains("set deleted by retention"),
        "{}",
        sc.log()
    );
    assert_eq!(sc.stdout(), "", "the sidecar printed prune's verb output");
}

/// The whole product without Docker: one sidecar guarding all three engines takes one set
/// that covers them all and verifies; then `init` against three fresh, empty servers (the
/// `down -v` case) brings every engine's data back.
#[test]
fn one_run_covers_all_three_engines_and_init_brings_them_back() {
    use crate::common::chroma::{ChromaServer, py};
    use crate::common::mongodb::Mongo;
    use mongodb::bson::{RawDocumentBuf, doc};

    let count_chroma = |port: u16| -> u64 {
        py(
            r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
print(c.get_collection("notes").count())
"#,
            &[&port.to_string()],
        )
        .trim()
        .parse()
        .unwrap()
    };
    let raw = |d: mongodb::bson::Document| RawDocumentBuf::from_document(&d).unwrap();

    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "3000", "key", "20"]);
    let m = Mongo::start(false, true);
    m.insert(
        "shop",
        "orders",
        (0..500)
            .map(|i| raw(doc! {"_id": i, "total": i * 3}))
            .collect(),
    );
    let c = ChromaServer::start();
    py(
        r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
col = c.create_collection("notes", metadata={"hnsw:space": "l2"})
col.add(ids=[f"n{i}" for i in range(200)], embeddings=[[float(i), 1.0, 2.0, 3.0] for i in range(200)],
        documents=[f"note {i}" for i in range(200)])
"#,
        &[&c.port.to_string()],
    );

    let env = [
        ("DBKEEPER_REDIS_URL", r.url()),
        ("DBKEEPER_MONGODB_URI", m.uri()),
        ("DBKEEPER_CHROMA_URL", c.url()),
    ];
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sc = Sidecar::start(repo.path(), &env_ref);
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}\n{}", sc.log());
    assert_eq!(job["engines"]["redis"]["records"], 3000, "{job}");
    assert_eq!(job["engines"]["mongodb"]["records"], 500, "{job}");
    assert_eq!(job["engines"]["chroma"]["records"], 200, "{job}");
    let set = job["set"].as_str().unwrap().to_owned();
    assert_eq!(
        sets(repo.path()),
        vec![set.clone()],
        "one set for all engines"
    );
    let o = run(dbkeeper(repo.path()).args(["verify", &set, "--deep"]));
    assert_code(&o, 0);
    drop(sc);

    // Fresh, empty servers: init waits for all three and preseeds each one.
    let r2 = RedisServer::start();
    let m2 = Mongo::start(false, true);
    let c2 = ChromaServer::start();
    let o = run(dbkeeper(repo.path())
        .args(["init", "--timeout", "60s"])
        .env("DBKEEPER_REDIS_URL", r2.url())
        .env("DBKEEPER_MONGODB_URI", m2.uri())
        .env("DBKEEPER_CHROMA_URL", c2.url()));
    assert_code(&o, 0);
    assert_eq!(r2.digest(), r.digest());
    assert_eq!(
        m2.sorted_docs("shop", "orders"),
        m.sorted_docs("shop", "orders")
    );
    assert_eq!(count_chroma(c2.port), 200);

    // Run again: every target now holds data, so init skips all three and still exits 0.
    let o = run(dbkeeper(repo.path())
        .args(["init", "--timeout", "60s"])
        .env("DBKEEPER_REDIS_URL", r2.url())
        .env("DBKEEPER_MONGODB_URI", m2.uri())
        .env("DBKEEPER_CHROMA_URL", c2.url()));
    assert_code(&o, 0);
    assert_eq!(
        stderr(&o).matches("preseed skipped").count(),
        3,
        "{}",
        stderr(&o)
    );
}

/// With an identity that cannot open what the recipients seal, every set the sidecar would
/// write is unreadable by the key meant to restore it: it refuses to start (exit 2, one line).
/// A host with only the recipients starts, says it is write-only, and verifies its sets by
/// checksum.
#[test]
fn the_sidecar_probes_its_age_keys_and_says_when_it_is_write_only() {
    let repo = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (_id1, pub1) = age_key(keys.path(), "one.txt");
    let (id2, _pub2) = age_key(keys.path(), "two.txt");
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);
    let o = dbkeeper(repo.path())
        .arg("sidecar")
        .env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("DBKEEPER_AGE_RECIPIENTS", &pub1)
        .env("DBKEEPER_AGE_IDENTITY_FILE", &id2)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dbkeeper:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("x25519:"), "{err}");
    assert!(!err.contains("AGE-SECRET-KEY"), "{err}");

    let (k, url) = redis_env(&r);
    let sc = Sidecar::start(
        repo.path(),
        &[(k, &url), ("DBKEEPER_AGE_RECIPIENTS", pub1.as_str())],
    );
    assert!(sc.log().contains("write-only"), "{}", sc.log());
    let (_, health) = sc.get("/health");
    assert_eq!(health["encryption"]["can_decrypt"], false, "{health}");
    assert!(
        health["encryption"]["recipients"][0]
            .as_str()
            .unwrap()
            .starts_with("x25519:"),
        "{health}"
    );
    let job = backup_via_api(&sc, None);
    assert_eq!(job["status"], "succeeded", "{job}\n{}", sc.log());
    assert!(
        sc.log().contains("new set verifies by checksum"),
        "{}",
        sc.log()
    );
    let set = job["set"].as_str().unwrap();
    assert!(repo.path().join(set).join("redis/0001.zst.age").is_file());
}

/// One sidecar per repository: a second one on the same directory exits 4 naming the first,
/// which keeps running.
#[test]
fn a_second_sidecar_on_the_same_repository_exits_4_naming_the_first() {
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    let (k, url) = redis_env(&r);
    let first = Sidecar::start(repo.path(), &[(k, &url)]);
    let o = dbkeeper(repo.path())
        .arg("sidecar")
        .env(k, &url)
        .env("DBKEEPER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dbkeeper:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("locked by") && lines[0].contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    assert_eq!(
        first.get("/health").0,
        200,
        "the first sidecar must keep running"
    );
}
