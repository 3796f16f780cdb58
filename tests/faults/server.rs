//! Server-side faults with real servers: Redis loading its dataset (`-LOADING`) and a replica
//! whose master is down (`-MASTERDOWN`), a server killed in the middle of a dump or a restore,
//! and Chroma answering 500 and 429 (injected in the network path by the proxy, in place of
//! the server's answer). Expected: one clean `dbkeeper:` line with the documented exit code;
//! `wait` treats loading and a missing master as "not yet"; a cut restore leaves its marker
//! and the next preseed redoes it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::Mongo;
use crate::common::redis::{Opts, RedisServer};
use crate::common::{dbkeeper, free_port, sets, stderr, wait_until};
use crate::network::proxy::{Fault, Proxy};
use crate::network::{bounded, clean_failure, tally};

/// Kills and reaps a server process on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BOUND: Duration = Duration::from_secs(90);

fn with(repo: &Path, var: &str, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env(var, url);
    c
}

fn exit_is(o: &std::process::Output, want: i32) -> Result<(), String> {
    match o.status.code() {
        Some(c) if c == want && !stderr(o).contains("panicked") => Ok(()),
        c => Err(format!("exit {c:?}, want {want}: {}", stderr(o))),
    }
}

#[test]
fn redis_loading_is_not_yet() {
    // A dataset that loads slowly: `key-load-delay` (a real redis-server setting) sleeps per
    // key while the RDB loads at start, so the server answers -LOADING for a while.
    let dir = tempfile::tempdir().unwrap();
    let src = RedisServer::start_with(Opts {
        dir: Some(dir.path()),
        ..Opts::default()
    });
    src.cli(&["DEBUG", "POPULATE", "10000", "key", "10"]);
    src.cli(&["SAVE"]);
    src.stop();
    let s = RedisServer::start_with(Opts {
        dir: Some(dir.path()),
        // 1 ms a key; events (and so clients) served every KiB loaded, not every 2 MiB.
        extra: &[
            "--key-load-delay",
            "1000",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
        no_wait: true,
        ..Opts::default()
    });
    let repo = tempfile::tempdir().unwrap();
    let url = s.url();
    let mut results = Vec::new();
    let loading = || s.cli(&["PING"]).contains("LOADING");
    assert!(
        loading(),
        "the server is not loading; the case proves nothing"
    );
    let r = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &url).args(["wait", "--timeout", "2s"]),
        BOUND,
    )
    .and_then(|o| {
        clean_failure(&o, &[3])?;
        stderr(&o)
            .contains("loading")
            .then_some(())
            .ok_or(format!("no word of loading: {}", stderr(&o)))
    });
    results.push(("wait while loading".to_owned(), r));
    let r =
        bounded(dbkeeper(repo.path()).args(["health", &url]), BOUND).and_then(|o| exit_is(&o, 1));
    results.push(("health while loading".to_owned(), r));
    let r = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &url).arg("backup"),
        BOUND,
    )
    .and_then(|o| {
        // Either the snapshot is refused (exit 3) or, if loading ended meanwhile, taken.
        if o.status.code() == Some(0) {
            return Ok(());
        }
        clean_failure(&o, &[1, 3])
    });
    results.push(("backup while loading".to_owned(), r));
    if loading() {
        // `wait` with room to spare sees the end of loading and succeeds.
        let r = bounded(
            with(repo.path(), "DBKEEPER_REDIS_URL", &url).args(["wait", "--timeout", "80s"]),
            BOUND,
        )
        .and_then(|o| exit_is(&o, 0));
        results.push(("wait until loaded".to_owned(), r));
    }
    tally("server/redis-loading", results);
}

#[test]
fn redis_masterdown_is_not_yet() {
    // A replica whose master is down, with `replica-serve-stale-data no`: -MASTERDOWN.
    // Started by hand: the harness waits for PONG, and this server answers PING -MASTERDOWN.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dead = free_port().to_string();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .arg("--dir")
        .arg(dir.path())
        .args(["--replicaof", "127.0.0.1", &dead])
        .args(["--replica-serve-stale-data", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let _guard = Reap(child);
    let get = || {
        Command::new("redis-cli")
            .args(["-p", &port.to_string(), "GET", "x"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || get().contains("MASTERDOWN")),
        "the replica does not answer -MASTERDOWN; the case proves nothing"
    );
    let repo = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{port}");
    let mut results = Vec::new();
    let r = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &url).args(["wait", "--timeout", "2s"]),
        BOUND,
    )
    .and_then(|o| clean_failure(&o, &[3]));
    results.push(("wait on a masterless replica".to_owned(), r));
    let r =
        bounded(dbkeeper(repo.path()).args(["health", &url]), BOUND).and_then(|o| exit_is(&o, 1));
    results.push(("health on a masterless replica".to_owned(), r));
    // A restore into it is refused cleanly (a replica is read-only, its master is down).
    let src = RedisServer::start();
    src.cli(&["DEBUG", "POPULATE", "100", "key", "10"]);
    let o = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &src.url()).arg("backup"),
        BOUND,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &url).arg("restore"),
        BOUND,
    )
    .and_then(|o| clean_failure(&o, &[1, 3]));
    results.push(("restore into a masterless replica".to_owned(), r));
    tally("server/redis-masterdown", results);
}

#[test]
fn redis_killed_mid_dump() {
    // The server waits 5 s (`repl-diskless-sync-delay`) between taking the SYNC and streaming
    // the snapshot: it is killed in that window, with the dump under way.
    let dir = tempfile::tempdir().unwrap();
    let src = RedisServer::start_with(Opts {
        dir: Some(dir.path()),
        extra: &[
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "5",
        ],
        ..Opts::default()
    });
    src.cli(&["DEBUG", "POPULATE", "20000", "key", "200"]);
    src.cli(&["SAVE"]);
    let repo = tempfile::tempdir().unwrap();
    let mut cmd = with(repo.path(), "DBKEEPER_REDIS_URL", &src.url());
    cmd.arg("backup");
    let h = std::thread::spawn(move || bounded(&mut cmd, BOUND));
    assert!(
        wait_until(Duration::from_secs(30), || src
            .cli(&["INFO", "replication"])
            .contains("slave0:")),
        "the dump did not start"
    );
    src.stop();
    let r = h
        .join()
        .unwrap()
        .and_then(|o| clean_failure(&o, &[1, 3]))
        .and_then(|()| {
            sets(repo.path())
                .is_empty()
                .then_some(())
                .ok_or("a set was published".to_owned())
        });
    // The restarted server is backed up by the next run.
    let again = RedisServer::on_dir(dir.path(), false);
    let o = bounded(
        with(repo.path(), "DBKEEPER_REDIS_URL", &again.url()).arg("backup"),
        BOUND,
    )
    .unwrap();
    let r2 = exit_is(&o, 0).and_then(|()| {
        (again.total_keys() == 20000 && sets(repo.path()).len() == 1)
            .then_some(())
            .ok_or("the restarted server's set is missing".to_owned())
    });
    tally(
        "server/redis-killed-mid-dump",
        vec![
            ("dump cut by the server's death".into(), r),
            ("backup after the restart".into(), r2),
        ],
    );
}

fn mongo_source() -> Mongo {
    let m = Mongo::start(false, true);
    for c in 0..4 {
        let docs = (0..5000)
            .map(|i| mongodb::bson::rawdoc! { "_id": i, "pad": "y".repeat(100), "c": c })
            .collect();
        m.insert("app", &format!("c{c}"), docs);
    }
    m
}

const MONGO_MARKER: &str = "dbkeeper_restore_marker";

#[test]
fn mongodb_stopped_mid_restore() {
    let src = mongo_source();
    let repo = tempfile::tempdir().unwrap();
    let o = bounded(
        with(repo.path(), "DBKEEPER_MONGODB_URI", &src.uri()).arg("backup"),
        BOUND,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let want: Vec<_> = (0..4)
        .map(|c| src.sorted_docs("app", &format!("c{c}")))
        .collect();
    let mut results = Vec::new();

    // The link to the target goes down half-way: the restore stops, the marker stays, and
    // preseed (which finds it) wipes and restores again.
    // The bytes a sound restore receives, measured into a scratch server: cut at half.
    let scratch = Mongo::start(false, true);
    let p = Proxy::start(scratch.port, Fault::Pass);
    let url = format!("mongodb://127.0.0.1:{}/?directConnection=true", p.port);
    let o = bounded(
        with(repo.path(), "DBKEEPER_MONGODB_URI", &url).arg("restore"),
        BOUND,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let total = p.down_bytes();
    drop((p, scratch));
    let dst = Mongo::start(false, true);
    let p = Proxy::start(dst.port, Fault::CutAfter(total / 2));
    let url = format!("mongodb://127.0.0.1:{}/?directConnection=true", p.port);
    let r = bounded(
        with(repo.path(), "DBKEEPER_MONGODB_URI", &url).arg("restore"),
        BOUND,
    )
    .and_then(|o| clean_failure(&o, &[1, 3]))
    .and_then(|()| {
        let marked = dst
            .collections("admin")
            .iter()
            .any(|(n, _)| n == MONGO_MARKER);
        if !marked {
            return Err("no marker after a restore that stopped half-way".into());
        }
        let o = bounded(
            with(repo.path(), "DBKEEPER_MONGODB_URI", &dst.uri()).arg("preseed"),
            BOUND,
        )?;
        exit_is(&o, 0)?;
        let got: Vec<_> = (0..4)
            .map(|c| dst.sorted_docs("app", &format!("c{c}")))
            .collect();
        let marked = dst
            .collections("admin")
            .iter()
            .any(|(n, _)| n == MONGO_MARKER);
        (got == want && !marked)
            .then_some(())
            .ok_or("preseed after the cut did not restore the set".to_owned())
    });
    results.push(("link down mid-restore, then preseed".to_owned(), r));

    // The server itself dies half-way through (its process killed).
    let dst = Mongo::start(false, true);
    let p = Proxy::start(
        dst.port,
        Fault::Trickle {
            bytes: 256,
            every: Duration::from_millis(5),
        },
    );
    let url = format!("mongodb://127.0.0.1:{}/?directConnection=true", p.port);
    let mut cmd = with(repo.path(), "DBKEEPER_MONGODB_URI", &url);
    cmd.arg("restore");
    let h = std::thread::spawn(move || bounded(&mut cmd, BOUND));
    let started = wait_until(Duration::from_secs(30), || {
        dst.collections("admin")
            .iter()
            .any(|(n, _)| n == MONGO_MARKER)
    });
    drop(dst);
    let r = h.join().unwrap().and_then(|o| clean_failure(&o, &[1, 3]));
    results.push((
        "server killed mid-restore".to_owned(),
        if started {
            r
        } else {
            Err("the restore never set its marker".into())
        },
    ));
    drop(p);
    tally("server/mongodb-mid-restore", results);
}

#[test]
fn chroma_500_and_429() {
    let src = ChromaServer::start();
    py(
        SEED,
        &[
            &src.port.to_string(),
            r#"[{"name":"coll_a","space":"l2","dim":8,"n":500,"seed":2}]"#,
        ],
    );
    let repo = tempfile::tempdir().unwrap();
    let o = bounded(
        with(repo.path(), "DBKEEPER_CHROMA_URL", &src.url()).arg("backup"),
        BOUND,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let good = sets(repo.path());
    let mut results = Vec::new();
    for status in [500u16, 429] {
        // Backup: the records read answered with an error → one line, exit 1, no set.
        let p = Proxy::start(
            src.port,
            Fault::Http {
                status,
                path: "/get",
                times: usize::MAX,
            },
        );
        let r = bounded(
            with(
                repo.path(),
                "DBKEEPER_CHROMA_URL",
                &format!("http://127.0.0.1:{}", p.port),
            )
            .arg("backup"),
            BOUND,
        )
        .and_then(|o| clean_failure(&o, &[1, 3]))
        .and_then(|()| {
            (p.injected() > 0 && sets(repo.path()) == good)
                .then_some(())
                .ok_or("no error injected, or a set was published".to_owned())
        });
        results.push((format!("backup, {status} on get"), r));

        // Restore: adding records answered with an error → stops, marker left; preseed redoes.
        let dst = ChromaServer::start();
        let p = Proxy::start(
            dst.port,
            Fault::Http {
                status,
                path: "/add",
                times: usize::MAX,
            },
        );
        let r = bounded(
            with(repo.path(), "DBKEEPER_CHROMA_URL", &format!("http://127.0.0.1:{}", p.port))
                .arg("restore"),
            BOUND,
        )
        .and_then(|o| clean_failure(&o, &[1, 3]))
        .and_then(|()| {
            let names = py(
                r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), settings=chromadb.Settings(anonymized_telemetry=False))
print(",".join(sorted(x.name for x in c.list_collections())))
"#,
                &[&dst.port.to_string()],
            );
            if !names.contains("dbkeeper.restore-in-progress") {
                return Err(format!("no marker after a failed restore: {names}"));
            }
            let o = bounded(
                with(repo.path(), "DBKEEPER_CHROMA_URL", &dst.url()).arg("preseed"),
                BOUND,
            )?;
            exit_is(&o, 0)
        });
        results.push((format!("restore, {status} on add"), r));

        // wait: a heartbeat answered 429/500 is "not yet" (exit 3 at the deadline).
        let p = Proxy::start(
            src.port,
            Fault::Http {
                status,
                path: "/heartbeat",
                times: usize::MAX,
            },
        );
        let r = bounded(
            dbkeeper(repo.path()).args([
                "wait",
                &format!("http://127.0.0.1:{}", p.port),
                "--timeout",
                "2s",
            ]),
            BOUND,
        )
        .and_then(|o| clean_failure(&o, &[3]));
        results.push((format!("wait, {status} on heartbeat"), r));
    }
    tally("server/chroma-http-errors", results);
}
