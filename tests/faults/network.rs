//! Cut, reset, stalled and slow connections between dbkeeper and each real server, through a
//! fault-injecting proxy (`network/proxy.rs`). Backups fail cleanly (one `dbkeeper:` line, the
//! documented exit code, no set published) within their deadline; restores stop with the
//! in-progress marker set, and the next preseed redoes them; `wait` and `health` keep their
//! deadlines. Every child gets a hard kill after a generous bound, and needing it fails the test.

pub mod proxy;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::{dbkeeper, sets, stderr};
use crate::report;
use proxy::{Fault, Proxy};

/// Runs a child with a hard kill after `bound`. Returns its output, or `Err` naming the case
/// when the kill was needed (a hang: the bug this suite looks for).
pub fn bounded(cmd: &mut Command, bound: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dbkeeper");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let end = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Ok(Output {
                status,
                stdout: t_out.join().unwrap(),
                stderr: t_err.join().unwrap(),
            });
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            let e = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
            return Err(format!(
                "still running after {bound:?}, killed; stderr:\n{e}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A clean failure: an exit code among `codes`, a `dbkeeper: ` line on stderr, no panic.
pub fn clean_failure(o: &Output, codes: &[i32]) -> Result<(), String> {
    let e = stderr(o);
    let code = o.status.code().unwrap_or(-1);
    if !codes.contains(&code) {
        return Err(format!("exit {code}, want one of {codes:?}; stderr:\n{e}"));
    }
    if e.contains("panicked") {
        return Err(format!("panic; stderr:\n{e}"));
    }
    if !e.lines().any(|l| l.starts_with("dbkeeper: ")) {
        return Err(format!("no `dbkeeper: ` line; stderr:\n{e}"));
    }
    Ok(())
}

/// Tallies a list of `(case name, result)` and fails the test naming every failed case.
pub fn tally(class: &str, results: Vec<(String, Result<(), String>)>) {
    let tried = results.len();
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
        .collect();
    report::record(class, tried, tried - failures.len(), &failures);
    assert!(failures.is_empty(), "{class}: {}", failures.join("\n\n"));
}

/// A bound far above any deadline a case expects: reaching it means a hang.
const BOUND: Duration = Duration::from_secs(60);

fn redis_cmd(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_REDIS_URL", url);
    c
}

/// A backup through a faulty link: a clean failure (exit 1 or 3) and no set published.
fn backup_fails(mut cmd: Command, repo: &Path) -> Result<(), String> {
    let before = sets(repo);
    let o = bounded(cmd.arg("backup"), BOUND)?;
    clean_failure(&o, &[1, 3])?;
    let after = sets(repo);
    if after != before {
        return Err(format!("a set was published: {before:?} -> {after:?}"));
    }
    Ok(())
}

fn redis_source() -> RedisServer {
    let s = RedisServer::start();
    s.cli(&["DEBUG", "POPULATE", "20000", "key", "200"]);
    s
}

/// Bytes a sound backup receives from the server, measured through a pass-through proxy, so
/// cut offsets fall inside the traffic.
fn wire_size(port: u16, cmd: impl Fn(&Path, &str) -> Command, scheme: &str, tail: &str) -> usize {
    let scratch = tempfile::tempdir().unwrap();
    let p = Proxy::start(port, Fault::Pass);
    let url = format!("{scheme}://127.0.0.1:{}{tail}", p.port);
    let o = bounded(cmd(scratch.path(), &url).arg("backup"), BOUND).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    p.down_bytes()
}

/// Byte offsets into a backup's traffic: a few fixed ones (inside the handshake) and seeded
/// random ones below `total`.
fn offsets(class: &str, total: usize, n: usize) -> Vec<usize> {
    let mut v = vec![1, 20, 100];
    for i in 0..n {
        v.push((report::case_seed(class, i) % (total as u64 - 1)) as usize + 1);
    }
    v
}

#[test]
fn redis_backup_cut_and_reset() {
    let src = redis_source();
    let repo = tempfile::tempdir().unwrap();
    let n = report::cases(3, 20);
    let total = wire_size(src.port, redis_cmd, "redis", "");
    let mut results = Vec::new();
    for (name, mk) in [
        ("cut", Fault::CutAfter as fn(usize) -> Fault),
        ("reset", Fault::ResetAfter),
    ] {
        for off in offsets(&format!("network/redis-backup-{name}"), total, n) {
            let p = Proxy::start(src.port, mk(off));
            let url = format!("redis://127.0.0.1:{}", p.port);
            let r = backup_fails(redis_cmd(repo.path(), &url), repo.path());
            results.push((format!("{name} after {off} bytes"), r));
        }
    }
    // ResetAfter(0): reset before the server's first byte (the handshake).
    let p = Proxy::start(src.port, Fault::ResetAfter(0));
    let url = format!("redis://127.0.0.1:{}", p.port);
    let r = backup_fails(redis_cmd(repo.path(), &url), repo.path());
    results.push(("reset at accept".into(), r));
    // The next backup over a sound link succeeds and cleans up what the failed ones left.
    let o = bounded(redis_cmd(repo.path(), &src.url()).arg("backup"), BOUND).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(sets(repo.path()).len(), 1, "{:?}", sets(repo.path()));
    assert!(crate::common::temps(repo.path()).is_empty());
    tally("network/redis-backup-cut", results);
}

#[test]
fn redis_backup_stall() {
    let src = redis_source();
    let repo = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    // Stalled inside the handshake (INFO, CONFIG): the 10 s connect-and-handshake deadline.
    // Stalled mid-snapshot: the 120 s idle limit of the snapshot (full run only: it takes 2 min).
    let mut offs = vec![0, 50];
    if report::full() {
        offs.push(wire_size(src.port, redis_cmd, "redis", "") / 2);
    }
    for off in offs {
        let p = Proxy::start(src.port, Fault::StallAfter(off));
        let url = format!("redis://127.0.0.1:{}", p.port);
        let mut c = redis_cmd(repo.path(), &url);
        let before = sets(repo.path());
        let r = bounded(c.arg("backup"), Duration::from_secs(200))
            .and_then(|o| clean_failure(&o, &[1, 3]))
            .and_then(|()| {
                (sets(repo.path()) == before)
                    .then_some(())
                    .ok_or("a set was published".to_owned())
            });
        results.push((format!("stall after {off} bytes"), r));
    }
    tally("network/redis-backup-stall", results);
}

#[test]
fn redis_backup_trickle_completes() {
    let src = RedisServer::start();
    src.cli(&["DEBUG", "POPULATE", "500", "key", "100"]);
    let repo = tempfile::tempdir().unwrap();
    let p = Proxy::start(
        src.port,
        Fault::Trickle {
            bytes: 512,
            every: Duration::from_millis(2),
        },
    );
    let url = format!("redis://127.0.0.1:{}", p.port);
    let r = bounded(redis_cmd(repo.path(), &url).arg("backup"), BOUND).and_then(|o| {
        if o.status.code() != Some(0) {
            return Err(format!("exit {:?}: {}", o.status.code(), stderr(&o)));
        }
        let id = sets(repo.path()).pop().ok_or("no set")?;
        let v = bounded(dbkeeper(repo.path()).args(["verify", &id, "--deep"]), BOUND)?;
        (v.status.code() == Some(0))
            .then_some(())
            .ok_or(format!("deep verify: {}", stderr(&v)))
    });
    tally("network/redis-backup-trickle", vec![("trickle".into(), r)]);
}

/// The marker key a Redis restore leaves while it runs.
const REDIS_MARKER: &str = "__dbkeeper:restore-in-progress";

#[test]
fn redis_restore_cut_leaves_the_marker() {
    let src = redis_source();
    let repo = tempfile::tempdir().unwrap();
    let o = bounded(redis_cmd(repo.path(), &src.url()).arg("backup"), BOUND).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let want = src.digest();
    let n = report::cases(2, 10);
    let mut results = Vec::new();
    for i in 0..n {
        let dst = RedisServer::start();
        // Each RESTORE is answered `+OK\r\n` (5 bytes): cut somewhere inside the 20,000.
        let off = 200 + (report::case_seed("network/redis-restore-cut", i) % 90_000) as usize;
        let p = Proxy::start(dst.port, Fault::CutAfter(off));
        let url = format!("redis://127.0.0.1:{}", p.port);
        let r = bounded(redis_cmd(repo.path(), &url).arg("restore"), BOUND)
            .and_then(|o| clean_failure(&o, &[1, 3]))
            .and_then(|()| {
                if dst.cli(&["EXISTS", REDIS_MARKER]) != "1" {
                    return Err("the marker is not set after a cut restore".into());
                }
                // A marked target is redone by preseed.
                let o = bounded(redis_cmd(repo.path(), &dst.url()).arg("preseed"), BOUND)?;
                if o.status.code() != Some(0) {
                    return Err(format!("preseed after the cut: {}", stderr(&o)));
                }
                if dst.digest() != want || dst.cli(&["EXISTS", REDIS_MARKER]) != "0" {
                    return Err("preseed after the cut did not restore the set".into());
                }
                Ok(())
            });
        results.push((format!("restore cut after {off} bytes"), r));
    }
    tally("network/redis-restore-cut", results);
}

#[test]
fn wait_and_health_keep_their_deadlines_on_a_stalled_link() {
    let redis = RedisServer::start();
    let mongo = Mongo::start(false, true);
    let chroma = ChromaServer::start();
    let mut results = Vec::new();
    let repo = tempfile::tempdir().unwrap();
    for (engine, port, scheme) in [
        ("redis", redis.port, "redis"),
        ("mongodb", mongo.port, "mongodb"),
        ("chroma", chroma.port, "http"),
    ] {
        for fault in [
            Fault::StallAfter(0),
            Fault::ResetAfter(0),
            Fault::CutAfter(0),
        ] {
            let p = Proxy::start(port, fault.clone());
            let url = format!("{scheme}://127.0.0.1:{}", p.port);
            let h = bounded(
                dbkeeper(repo.path()).args(["health", &url, "--timeout", "2s"]),
                BOUND,
            )
            .and_then(|o| match o.status.code() {
                Some(1) if !stderr(&o).contains("panicked") => Ok(()),
                c => Err(format!("health exit {c:?}: {}", stderr(&o))),
            });
            results.push((format!("{engine} health {fault:?}"), h));
            let w = bounded(
                dbkeeper(repo.path()).args(["wait", &url, "--timeout", "3s"]),
                BOUND,
            )
            .and_then(|o| clean_failure(&o, &[3]));
            results.push((format!("{engine} wait {fault:?}"), w));
        }
    }
    tally("network/wait-health-stall", results);
}

fn mongo_source() -> Mongo {
    let m = Mongo::start(false, true);
    for c in 0..3 {
        let docs = (0..3000)
            .map(|i| {
                mongodb::bson::rawdoc! { "_id": i, "pad": "x".repeat(200), "c": c }
            })
            .collect();
        m.insert("app", &format!("c{c}"), docs);
    }
    m
}

fn mongo_cmd(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_MONGODB_URI", url);
    c
}

#[test]
fn mongodb_backup_cut_reset_stall() {
    let src = mongo_source();
    let repo = tempfile::tempdir().unwrap();
    let n = report::cases(2, 20);
    let tail = "/?directConnection=true";
    let total = wire_size(src.port, mongo_cmd, "mongodb", tail);
    let mut results = Vec::new();
    let mut faults: Vec<(String, Fault)> = Vec::new();
    for off in offsets("network/mongodb-backup-cut", total, n) {
        faults.push((format!("cut after {off}"), Fault::CutAfter(off)));
        faults.push((format!("reset after {off}"), Fault::ResetAfter(off)));
    }
    faults.push(("reset at accept".into(), Fault::ResetAfter(0)));
    faults.push(("stall at accept".into(), Fault::StallAfter(0)));
    // Stalled mid-dump: the dump's 120 s read idle limit (full run only: it takes 2 min).
    if report::full() {
        faults.push(("stall mid-dump".into(), Fault::StallAfter(total / 2)));
    }
    for (name, fault) in faults {
        let p = Proxy::start(src.port, fault);
        let url = format!("mongodb://127.0.0.1:{}{tail}", p.port);
        let r = backup_fails(mongo_cmd(repo.path(), &url), repo.path());
        results.push((name, r));
    }
    tally("network/mongodb-backup-cut", results);
}

fn chroma_cmd(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_CHROMA_URL", url);
    c
}

#[test]
fn chroma_backup_cut_and_reset() {
    let src = ChromaServer::start();
    py(
        SEED,
        &[
            &src.port.to_string(),
            r#"[{"name":"coll_a","space":"l2","dim":16,"n":2000,"seed":1}]"#,
        ],
    );
    let repo = tempfile::tempdir().unwrap();
    let n = report::cases(2, 20);
    let total = wire_size(src.port, chroma_cmd, "http", "");
    let mut results = Vec::new();
    let mut faults: Vec<(String, Fault)> = vec![("reset at accept".into(), Fault::ResetAfter(0))];
    for off in offsets("network/chroma-backup-cut", total, n) {
        faults.push((format!("cut after {off}"), Fault::CutAfter(off)));
        faults.push((format!("reset after {off}"), Fault::ResetAfter(off)));
    }
    for (name, fault) in faults {
        let p = Proxy::start(src.port, fault);
        let url = format!("http://127.0.0.1:{}", p.port);
        let r = backup_fails(chroma_cmd(repo.path(), &url), repo.path());
        results.push((name, r));
    }
    // Stalled mid-export: each request's 300 s deadline (full run only: it takes 5 min).
    if report::full() {
        let p = Proxy::start(src.port, Fault::StallAfter(total / 2));
        let url = format!("http://127.0.0.1:{}", p.port);
        let before = sets(repo.path());
        let r = bounded(
            chroma_cmd(repo.path(), &url).arg("backup"),
            Duration::from_secs(400),
        )
        .and_then(|o| clean_failure(&o, &[1, 3]))
        .and_then(|()| {
            (sets(repo.path()) == before)
                .then_some(())
                .ok_or("a set was published".to_owned())
        });
        results.push(("stall mid-export".into(), r));
    }
    tally("network/chroma-backup-cut", results);
}
