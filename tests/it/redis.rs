//! Redis end to end against real `redis-server` processes: backup over the replication
//! protocol, verify, online restore, pre-start preseed (both AOF modes), the preseed rules,
//! crash safety of the repository, wait/health and the `dbkeeper-health` name.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::redis::{Opts, RedisServer};
use crate::common::{
    assert_code, code, dbkeeper, make_certs, make_client_cert, run, sets, stderr, stdout, temps,
    wait_until,
};

const PW: &str = "s3cret-Pw-4711";

fn with_url(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_REDIS_URL", url);
    c
}

fn backup(repo: &Path, s: &RedisServer) -> Output {
    let o = run(with_url(repo, &s.url()).arg("backup"));
    assert_no_password(&o);
    o
}

#[track_caller]
fn assert_no_password(o: &Output) {
    assert!(
        !stdout(o).contains(PW) && !stderr(o).contains(PW),
        "the password leaked:\n{}\n{}",
        stdout(o),
        stderr(o)
    );
}

fn manifest(repo: &Path, id: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(repo.join(id).join("manifest.json")).unwrap();
    assert!(!text.contains(PW), "password in the manifest");
    serde_json::from_str(&text).unwrap()
}

fn artifact(repo: &Path, id: &str) -> PathBuf {
    repo.join(id).join("redis/dump.rdb.zst")
}

fn q<T: redis::FromRedisValue>(c: &mut redis::Connection, cmd: &mut redis::Cmd) -> T {
    cmd.query(c).unwrap()
}

/// Every type and encoding we care about, in three dbs, some keys with TTLs. Returns the
/// (db, key) of the keys with an expiry.
fn populate(s: &RedisServer) -> Vec<(u64, Vec<u8>)> {
    let mut c = s.client();
    let mut ttl_keys = Vec::new();
    let _: () = q(&mut c, redis::cmd("SELECT").arg(0));
    let binary_key: &[u8] = b"\x00\xff bin\r\nkey\x7f";
    let _: () = q(
        &mut c,
        redis::cmd("SET").arg(binary_key).arg(b"\x00\x01\x02\xfe"),
    );
    let _: () = q(&mut c, redis::cmd("SET").arg("int").arg(123456789));
    let _: () = q(&mut c, redis::cmd("SET").arg("text").arg("hello world"));
    // Over 10 MB, and incompressible so the RDB really holds 11 MB for it.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let big: Vec<u8> = (0..11u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _: () = q(&mut c, redis::cmd("SET").arg("big").arg(big));
    let _: () = q(
        &mut c,
        redis::cmd("HSET")
            .arg("h-small")
            .arg("a")
            .arg("1")
            .arg("b")
            .arg("2"),
    );
    let mut big_hash = redis::cmd("HSET");
    big_hash.arg("h-big");
    for i in 0..2000 {
        big_hash
            .arg(format!("field{i}"))
            .arg(format!("value-{i}-{}", "x".repeat(i % 90)));
    }
    let _: () = q(&mut c, &mut big_hash);
    let _: () = q(
        &mut c,
        redis::cmd("RPUSH").arg("l-small").arg("a").arg("b").arg(3),
    );
    let mut big_list = redis::cmd("RPUSH");
    big_list.arg("l-big");
    for i in 0..20_000 {
        big_list.arg(format!("item-{i}"));
    }
    let _: () = q(&mut c, &mut big_list);
    let _: () = q(&mut c, redis::cmd("SADD").arg("s-int").arg(1).arg(2).arg(3));
    let _: () = q(&mut c, redis::cmd("SADD").arg("s-str").arg("x").arg("y"));
    let mut big_set = redis::cmd("SADD");
    big_set.arg("s-big");
    for i in 0..5000 {
        big_set.arg(format!("member-{i}"));
    }
    let _: () = q(&mut c, &mut big_set);
    let _: () = q(
        &mut c,
        redis::cmd("ZADD")
            .arg("z-small")
            .arg(1.5)
            .arg("a")
            .arg(-2)
            .arg("b"),
    );
    let mut big_z = redis::cmd("ZADD");
    big_z.arg("z-big");
    for i in 0..3000 {
        big_z.arg(i as f64 / 7.0).arg(format!("m{i}"));
    }
    let _: () = q(&mut c, &mut big_z);
    for i in 0..300 {
        let _: String = q(
            &mut c,
            redis::cmd("XADD")
                .arg("stream")
                .arg("*")
                .arg("n")
                .arg(i)
                .arg("pad")
                .arg("p".repeat(i % 50)),
        );
    }
    let _: () = q(
        &mut c,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("stream")
            .arg("g1")
            .arg("0"),
    );
    let _: () = q(
        &mut c,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("stream")
            .arg("g2")
            .arg("$"),
    );
    let _: redis::Value = q(
        &mut c,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g1")
            .arg("alice")
            .arg("COUNT")
            .arg(25)
            .arg("STREAMS")
            .arg("stream")
            .arg(">"),
    );
    let _: () = q(
        &mut c,
        redis::cmd("SET")
            .arg("ttl-string")
            .arg("v")
            .arg("PX")
            .arg(3_600_000),
    );
    ttl_keys.push((0, b"ttl-string".to_vec()));
    let _: () = q(&mut c, redis::cmd("PEXPIRE").arg("h-small").arg(7_200_123));
    ttl_keys.push((0, b"h-small".to_vec()));

    let _: () = q(&mut c, redis::cmd("SELECT").arg(1));
    for i in 0..500 {
        let _: () = q(&mut c, redis::cmd("SET").arg(format!("one:{i}")).arg(i));
    }
    let _: () = q(
        &mut c,
        redis::cmd("SET")
            .arg("one:ttl")
            .arg("x")
            .arg("EX")
            .arg(86_400),
    );
    ttl_keys.push((1, b"one:ttl".to_vec()));

    let _: () = q(&mut c, redis::cmd("SELECT").arg(7));
    let _: () = q(&mut c, redis::cmd("HSET").arg("seven").arg("k").arg("v"));
    let _: () = q(&mut c, redis::cmd("ZADD").arg("seven-z").arg(1).arg("m"));
    ttl_keys
}

fn pexpiretime(s: &RedisServer, db: u64, key: &[u8]) -> i64 {
    let mut c = s.client();
    let _: () = q(&mut c, redis::cmd("SELECT").arg(db));
    q(&mut c, redis::cmd("PEXPIRETIME").arg(key))
}

#[test]
fn backup_verify_restore_round_trip_every_type() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::with_password(PW);
    let ttl_keys = populate(&src);
    // Expires after the backup and before the restore: skipped, but still counted.
    let _: () = q(
        &mut src.client(),
        redis::cmd("SET")
            .arg("short-lived")
            .arg("v")
            .arg("PX")
            .arg(1500),
    );

    let o = backup(repo.path(), &src);
    assert_code(&o, 0);
    let ids = sets(repo.path());
    assert_eq!(ids.len(), 1);
    let m = manifest(repo.path(), &ids[0]);
    let r = &m["engines"]["redis"];
    assert_eq!(r["counts"]["db0"], 16, "{r}");
    assert_eq!(r["counts"]["db1"], 501);
    assert_eq!(r["counts"]["db7"], 2);
    assert!(
        r["server_version"].as_str().unwrap().starts_with('7'),
        "{r}"
    );
    assert!(r["details"]["rdb_version"].as_u64().unwrap() >= 9, "{r}");
    assert_eq!(r["details"]["repl_diskless_sync_delay"], 0);
    assert!(!r["source"].as_str().unwrap().contains(PW));

    // Stock tools read the artifact.
    let rdb = repo.path().join("plain.rdb");
    let z = Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&rdb)
        .arg(artifact(repo.path(), &ids[0]))
        .status()
        .unwrap();
    assert!(z.success());
    let check = Command::new("redis-check-rdb").arg(&rdb).output().unwrap();
    assert!(
        check.status.success() && stdout(&check).contains("RDB looks OK"),
        "{}",
        stdout(&check)
    );

    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);
    assert_code(&run(dbkeeper(repo.path()).args(["verify", "--deep"])), 0);

    // The short-lived key disappears from the source; the target must match the source.
    assert!(wait_until(Duration::from_secs(30), || {
        src.cli(&["EXISTS", "short-lived"]) == "0"
    }));
    let dst = RedisServer::with_password(PW);
    let o = run(with_url(repo.path(), &dst.url()).arg("restore"));
    assert_no_password(&o);
    assert_code(&o, 0);
    assert_eq!(src.digest(), dst.digest());
    assert_eq!(dst.cli(&["EXISTS", rdb_marker()]), "0", "marker cleared");
    for (db, key) in &ttl_keys {
        let a = pexpiretime(&src, *db, key);
        let b = pexpiretime(&dst, *db, key);
        assert!(a > 0 && (a - b).abs() < 1000, "{key:?}: {a} vs {b}");
    }
    let mut c = dst.client();
    let pending: redis::Value = q(&mut c, redis::cmd("XPENDING").arg("stream").arg("g1"));
    assert!(format!("{pending:?}").contains("alice"), "{pending:?}");
}

fn rdb_marker() -> &'static str {
    "__dbkeeper:restore-in-progress"
}

#[test]
fn preseed_into_an_empty_data_dir_works_with_and_without_aof() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    assert_code(&backup(repo.path(), &src), 0);
    let want = src.digest();

    for appendonly in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        // The official image's redis user owns its volume; our files must be its too.
        let root = nix::unistd::Uid::effective().is_root();
        if root {
            nix::unistd::chown(
                dir.path(),
                Some(nix::unistd::Uid::from_raw(999)),
                Some(nix::unistd::Gid::from_raw(999)),
            )
            .unwrap();
        }
        // The URL is the server that will run on this directory; it is not running yet.
        let o = run(with_url(repo.path(), "redis://127.0.0.1:1")
            .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
            .arg("preseed"));
        assert_code(&o, 0);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with('.')),
            "temps left: {names:?}"
        );
        let manifest =
            std::fs::read_to_string(dir.path().join("appendonlydir/appendonly.aof.manifest"))
                .unwrap();
        assert!(manifest.contains("appendonly.aof.1.base.rdb seq 1 type b"));
        if root {
            use std::os::unix::fs::MetadataExt;
            for p in [
                "dump.rdb",
                "appendonlydir",
                "appendonlydir/appendonly.aof.manifest",
                "appendonlydir/appendonly.aof.1.base.rdb",
                "appendonlydir/appendonly.aof.1.incr.aof",
            ] {
                let m = std::fs::metadata(dir.path().join(p)).unwrap();
                assert_eq!((m.uid(), m.gid()), (999, 999), "{p}");
            }
        }

        let s = RedisServer::on_dir(dir.path(), appendonly);
        assert_eq!(s.digest(), want, "appendonly={appendonly}");
        drop(s);

        // A directory that now holds data is left alone.
        let before = std::fs::read(dir.path().join("dump.rdb")).unwrap();
        let o = run(with_url(repo.path(), "redis://127.0.0.1:1")
            .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
            .arg("preseed"));
        assert_code(&o, 0);
        assert!(stderr(&o).contains("holds data"), "{}", stderr(&o));
        assert_eq!(std::fs::read(dir.path().join("dump.rdb")).unwrap(), before);
    }
}

/// The pre-start preseed needs only the data directory: no Redis URL is set (the server is
/// not running yet), and `preseed`, `preseed --only redis` and `init` all seed it.
#[test]
fn data_dir_preseed_needs_no_redis_url() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    assert_code(&backup(repo.path(), &src), 0);
    let want = src.digest();
    for args in [&["preseed"][..], &["preseed", "--only", "redis"], &["init"]] {
        let dir = tempfile::tempdir().unwrap();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
            .args(args));
        assert_code(&o, 0);
        assert!(stderr(&o).contains("preseeded"), "{args:?}: {}", stderr(&o));
        let s = RedisServer::on_dir(dir.path(), false);
        assert_eq!(s.digest(), want, "{args:?}");
    }
    // Without a backup it is a first start, still without a URL.
    let empty_repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(empty_repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("first start"), "{}", stderr(&o));
    // Neither a URL nor a data directory: nothing to preseed is a configuration error.
    let o = run(dbkeeper(repo.path()).arg("preseed"));
    assert_code(&o, 2);
    // `--only mongodb` with the data directory but no MongoDB URI still says what is missing.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
        .args(["preseed", "--only", "mongodb"]));
    assert_code(&o, 2);
}

#[test]
fn data_dir_preseed_interrupted_between_renames_is_redone() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    assert_code(&backup(repo.path(), &src), 0);
    let dir = tempfile::tempdir().unwrap();
    // What a crash after the first rename leaves: a dump.rdb (here: garbage) and the temp AOF dir.
    std::fs::write(dir.path().join("dump.rdb"), b"partial").unwrap();
    std::fs::create_dir(dir.path().join(".appendonlydir.tmp-999")).unwrap();
    std::fs::write(dir.path().join(".dump.rdb.tmp-999"), b"junk").unwrap();
    let o = run(with_url(repo.path(), "redis://127.0.0.1:1")
        .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(!dir.path().join(".appendonlydir.tmp-999").exists());
    assert!(!dir.path().join(".dump.rdb.tmp-999").exists());
    let s = RedisServer::on_dir(dir.path(), true);
    assert_eq!(s.digest(), src.digest());

    // A missing data directory is a clear configuration error.
    let o = run(with_url(repo.path(), "redis://127.0.0.1:1")
        .env("DBKEEPER_REDIS_DATA_DIR", dir.path().join("nope"))
        .arg("preseed"));
    assert_code(&o, 2);
    assert!(stderr(&o).contains("no such directory"), "{}", stderr(&o));
}

#[test]
fn online_preseed_and_restore_respect_existing_data() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    assert_code(&backup(repo.path(), &src), 0);

    let dst = RedisServer::start();
    dst.cli(&["-n", "3", "SET", "keep", "me"]);
    let before = dst.digest();
    let o = run(with_url(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("1 keys in db3"), "{}", stderr(&o));
    assert_eq!(dst.digest(), before);

    let o = run(with_url(repo.path(), &dst.url()).arg("restore"));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(dst.digest(), before);

    let o = run(with_url(repo.path(), &dst.url()).args(["restore", "--force"]));
    assert_code(&o, 0);
    assert_eq!(dst.digest(), src.digest());

    // Online preseed into an empty server.
    let empty = RedisServer::start();
    assert_code(&run(with_url(repo.path(), &empty.url()).arg("preseed")), 0);
    assert_eq!(empty.digest(), src.digest());
}

#[test]
fn interrupted_online_preseed_is_wiped_and_redone() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    assert_code(&backup(repo.path(), &src), 0);
    let dst = RedisServer::start();
    // What a crash half-way leaves: the marker and part of the data (one key differs).
    dst.cli(&["SET", rdb_marker(), "x"]);
    dst.cli(&["SET", "text", "half-written"]);
    dst.cli(&["-n", "9", "SET", "stray", "1"]);
    let o = run(with_url(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    assert_eq!(dst.digest(), src.digest());
}

#[test]
fn corrupt_newest_set_falls_back_to_the_previous_one() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    src.cli(&["SET", "generation", "1"]);
    assert_code(&backup(repo.path(), &src), 0);
    let old = src.digest();
    src.cli(&["SET", "generation", "2"]);
    assert_code(&backup(repo.path(), &src), 0);
    let ids = sets(repo.path());
    assert_eq!(ids.len(), 2);
    let newest = &ids[1];
    let p = artifact(repo.path(), newest);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&p, bytes).unwrap();

    let o = run(dbkeeper(repo.path()).args(["verify", newest]));
    assert_code(&o, 4);
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", newest]));
    assert_code(&o, 4);

    let dst = RedisServer::start();
    let o = run(with_url(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains(newest.as_str()), "{}", stderr(&o));
    assert_eq!(dst.digest(), old);

    let dir = tempfile::tempdir().unwrap();
    let o = run(with_url(repo.path(), "redis://127.0.0.1:1")
        .env("DBKEEPER_REDIS_DATA_DIR", dir.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains(newest.as_str()), "{}", stderr(&o));
    let s = RedisServer::on_dir(dir.path(), false);
    assert_eq!(s.digest(), old);
}

/// A dataset big enough that a backup is still running when we look.
fn big_server() -> RedisServer {
    let s = RedisServer::start();
    s.cli(&["DEBUG", "POPULATE", "1500000", "key", "100"]);
    s
}

#[test]
fn backup_killed_half_way_leaves_no_set_and_is_cleaned_next_time() {
    let repo = tempfile::tempdir().unwrap();
    let src = big_server();
    let mut child = with_url(repo.path(), &src.url())
        .arg("backup")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || {
        temps(repo.path()).iter().any(|t| {
            repo.path()
                .join(t)
                .join("redis/dump.rdb.zst")
                .metadata()
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        })
    }));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup finished before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));
    assert_eq!(temps(repo.path()).len(), 1);

    let o = backup(repo.path(), &src);
    assert_code(&o, 0);
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
    assert_eq!(sets(repo.path()).len(), 1);
    assert_code(&run(dbkeeper(repo.path()).args(["verify", "--deep"])), 0);
}

#[test]
fn concurrent_backups_fail_on_the_lock_or_wait_for_it() {
    let repo = tempfile::tempdir().unwrap();
    let src = big_server();
    let first = with_url(repo.path(), &src.url())
        .arg("backup")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || !temps(repo.path()).is_empty()));
    let second = run(with_url(repo.path(), &src.url()).arg("backup"));
    assert_code(&second, 4);
    assert!(stderr(&second).contains("locked"), "{}", stderr(&second));
    let waiting = with_url(repo.path(), &src.url())
        .env("DBKEEPER_LOCK_WAIT", "300s")
        .arg("backup")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_code(&first.wait_with_output().unwrap(), 0);
    assert_code(&waiting.wait_with_output().unwrap(), 0);
    assert_eq!(sets(repo.path()).len(), 2);
}

#[test]
fn prune_keeps_the_newest_sets() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    for i in 0..3 {
        src.cli(&["SET", "i", &i.to_string()]);
        assert_code(&backup(repo.path(), &src), 0);
    }
    let ids = sets(repo.path());
    assert_eq!(ids.len(), 3);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_KEEP_LAST", "2")
        .env("DBKEEPER_KEEP_DAILY", "0")
        .arg("prune"));
    assert_code(&o, 0);
    assert_eq!(sets(repo.path()), ids[1..].to_vec());
}

/// A port that answers like an HTTP server, whatever it is sent.
fn http_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    port
}

fn health(url: &str) -> Output {
    let o = run(dbkeeper(Path::new("/nonexistent")).args(["health", url]));
    assert_no_password(&o);
    o
}

fn wait(url: &str, timeout: &str) -> Output {
    let o = run(dbkeeper(Path::new("/nonexistent")).args(["wait", "--timeout", timeout, url]));
    assert_no_password(&o);
    o
}

#[test]
fn wait_and_health_tell_down_from_wrong() {
    let closed = format!("redis://:{PW}@127.0.0.1:{}", crate::common::free_port());
    let o = health(&closed);
    assert_code(&o, 1);
    assert_eq!(stdout(&o).lines().count(), 1);
    assert_code(&wait(&closed, "1s"), 3);

    let http = format!("redis://:{PW}@127.0.0.1:{}", http_port());
    let o = health(&http);
    assert_code(&o, 1);
    assert!(stdout(&o).contains("not a Redis server"), "{}", stdout(&o));
    // Refused at once (exit 1), not retried until the deadline (exit 3).
    let o = wait(&http, "30s");
    assert_code(&o, 1);
    assert!(stderr(&o).contains("not a Redis server"), "{}", stderr(&o));

    let s = RedisServer::with_password(PW);
    let o = health(&s.url());
    assert_code(&o, 0);
    assert!(
        stdout(&o).starts_with("healthy: redis://:***@127.0.0.1"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("7."), "version: {}", stdout(&o));
    assert_code(&wait(&s.url(), "10s"), 0);

    let wrong = format!("redis://:wrong-{PW}@127.0.0.1:{}", s.port);
    let o = health(&wrong);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("authentication failed"),
        "{}",
        stdout(&o)
    );
    assert_code(&wait(&wrong, "30s"), 1);
    let none = format!("redis://127.0.0.1:{}", s.port);
    let o = health(&none);
    assert_code(&o, 1);
    assert!(stdout(&o).contains("requires a password"), "{}", stdout(&o));
    assert_code(&wait(&none, "30s"), 1);

    // ACL users.
    s.cli(&[
        "ACL",
        "SETUSER",
        "probe",
        "on",
        &format!(">{PW}"),
        "+ping",
        "+info",
    ]);
    assert_code(
        &health(&format!("redis://probe:{PW}@127.0.0.1:{}", s.port)),
        0,
    );
    assert_code(
        &health(&format!("redis://probe:nope@127.0.0.1:{}", s.port)),
        1,
    );

    let o = health("redis://127.0.0.1:1/notadb");
    assert_code(&o, 1);
    let o = wait("redis://127.0.0.1:1/notadb", "30s");
    assert_code(&o, 2);
}

#[test]
fn dbkeeper_health_name_prints_one_line_and_exits_0_or_1() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dbkeeper-health");
    std::os::unix::fs::symlink(crate::common::bin(), &link).unwrap();
    let s = RedisServer::with_password(PW);
    let run_health = |args: &[&str]| {
        let o = Command::new(&link).args(args).env_clear().output().unwrap();
        assert_no_password(&o);
        assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
        o
    };
    assert_code(&run_health(&[&s.url()]), 0);
    assert_code(&run_health(&["--timeout", "2s", &s.url()]), 0);
    assert_code(&run_health(&["--bogus", &s.url()]), 1);
    assert_code(&run_health(&["--timeout", "forever", &s.url()]), 1);
    assert_code(&run_health(&[]), 1);
    let closed = format!("redis://:{PW}@127.0.0.1:{}", crate::common::free_port());
    assert_code(&run_health(&[&closed]), 1);
    let o = Command::new(&link)
        .env_clear()
        .env("DBKEEPER_REDIS_URL", s.url())
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert!(code(&o) == 0 && !stdout(&o).contains(PW));
}

#[test]
fn a_loading_server_is_not_ready_yet() {
    let dir = tempfile::tempdir().unwrap();
    let seed = RedisServer::on_dir(dir.path(), false);
    seed.cli(&["DEBUG", "POPULATE", "20000", "key", "100"]);
    seed.cli(&["SAVE"]);
    drop(seed);
    // About 10 s of loading, answering clients (with -LOADING) every few keys.
    let s = RedisServer::start_with(Opts {
        dir: Some(dir.path()),
        extra: &[
            "--key-load-delay",
            "500",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
        no_wait: true,
        ..Opts::default()
    });
    let o = health(&s.url());
    assert_code(&o, 1);
    assert!(stdout(&o).contains("loading"), "{}", stdout(&o));
    // Retryable: wait sees it through.
    let o = wait(&s.url(), "300s");
    assert_code(&o, 0);
    assert_eq!(s.total_keys(), 20000);
}

#[test]
fn disk_based_sync_and_a_sync_delay_are_handled_and_reported() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    populate(&src);
    // `$<len>` framing instead of the diskless `$EOF:` mark, and a delay worth a warning.
    src.cli(&["CONFIG", "SET", "repl-diskless-sync", "no"]);
    src.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "1"]);
    let o = backup(repo.path(), &src);
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("repl-diskless-sync-delay adds 1 s"),
        "{}",
        stderr(&o)
    );
    let id = &sets(repo.path())[0];
    assert_eq!(
        manifest(repo.path(), id)["engines"]["redis"]["details"]["repl_diskless_sync_delay"],
        1
    );
    assert_eq!(
        src.cli(&["CONFIG", "GET", "repl-diskless-sync-delay"])
            .lines()
            .last(),
        Some("1")
    );
    assert_code(&run(dbkeeper(repo.path()).args(["verify", "--deep"])), 0);
    let dst = RedisServer::start();
    assert_code(&run(with_url(repo.path(), &dst.url()).arg("restore")), 0);
    assert_eq!(dst.digest(), src.digest());
}

/// A password-protected server with a TLS port beside its plain one (the harness uses the
/// plain port; dbkeeper the TLS one). Returns the server and its `rediss://` URL.
fn tls_server(certs: &Path) -> (RedisServer, String) {
    let tls_port = crate::common::free_port().to_string();
    let file = |n: &str| certs.join(n).to_string_lossy().into_owned();
    let (crt, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
    let extra = [
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &crt,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ];
    let s = RedisServer::start_with(Opts {
        password: Some(PW),
        extra: &extra,
        ..Opts::default()
    });
    (s, format!("rediss://:{PW}@127.0.0.1:{tls_port}"))
}

/// `tls-auth-clients yes`: the server demands a client certificate. Without one the
/// connection is refused with one line; with `DBKEEPER_REDIS_TLS_CERT_FILE` /
/// `DBKEEPER_REDIS_TLS_KEY_FILE` health, wait, backup and restore work; bad files are one
/// line and exit 2.
#[test]
fn rediss_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    make_client_cert(certs.path());
    let file = |n: &str| certs.path().join(n).to_string_lossy().into_owned();
    let mtls_server = || {
        let tls_port = crate::common::free_port().to_string();
        let (crt, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
        let extra = [
            "--tls-port",
            &tls_port,
            "--tls-cert-file",
            &crt,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ];
        let s = RedisServer::start_with(Opts {
            password: Some(PW),
            extra: &extra,
            ..Opts::default()
        });
        (s, format!("rediss://:{PW}@127.0.0.1:{tls_port}"))
    };
    let repo = tempfile::tempdir().unwrap();
    let (src, src_url) = mtls_server();
    populate(&src);
    let ca = certs.path().join("ca.crt");
    let base = |url: &str| {
        let mut c = with_url(repo.path(), url);
        c.env("SSL_CERT_FILE", &ca).env_remove("SSL_CERT_DIR");
        c
    };
    let with_cert = |url: &str| {
        let mut c = base(url);
        c.env(
            "DBKEEPER_REDIS_TLS_CERT_FILE",
            certs.path().join("client.crt"),
        )
        .env(
            "DBKEEPER_REDIS_TLS_KEY_FILE",
            certs.path().join("client.key"),
        );
        c
    };

    // No client certificate: refused at once, one line.
    let o = run(base(&src_url).args(["wait", "--timeout", "30s"]));
    assert_no_password(&o);
    assert_code(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("TLS"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.contains("dbkeeper:")).count(),
        1,
        "{err}"
    );

    let o = run(with_cert(&src_url).args(["health", &src_url]));
    assert_code(&o, 0);
    let o = run(with_cert(&src_url).args(["wait", "--timeout", "30s"]));
    assert_code(&o, 0);
    let o = run(with_cert(&src_url).arg("backup"));
    assert_no_password(&o);
    assert_code(&o, 0);
    let (dst, dst_url) = mtls_server();
    let o = run(with_cert(&dst_url).arg("restore"));
    assert_no_password(&o);
    assert_code(&o, 0);
    assert_eq!(dst.digest(), src.digest());

    // Bad files: one line naming the variable, exit 2, before any connection.
    let missing = certs.path().join("nope.crt");
    let not_a_key = certs.path().join("client.crt");
    let cases: [(&str, &Path, &str); 2] = [
        ("DBKEEPER_REDIS_TLS_CERT_FILE", &missing, "cannot read"),
        (
            "DBKEEPER_REDIS_TLS_KEY_FILE",
            &not_a_key,
            "no PEM private key",
        ),
    ];
    for (var, path, why) in cases {
        let o = run(with_cert(&src_url).env(var, path).arg("backup"));
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(err.contains(var) && err.contains(why), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let o = run(base(&src_url)
        .env(
            "DBKEEPER_REDIS_TLS_CERT_FILE",
            certs.path().join("client.crt"),
        )
        .arg("backup"));
    assert_code(&o, 2);
    assert!(stderr(&o).contains("set both"), "{}", stderr(&o));
    assert_eq!(sets(repo.path()).len(), 1);
}

#[test]
fn rediss_probe_backup_and_restore_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let ca = certs.path().join("ca.crt");
    let repo = tempfile::tempdir().unwrap();
    let (src, src_url) = tls_server(certs.path());
    populate(&src);
    let with_tls = |url: &str| {
        let mut c = with_url(repo.path(), url);
        c.env("SSL_CERT_FILE", &ca).env_remove("SSL_CERT_DIR");
        c
    };

    let o = run(with_tls(&src_url).args(["health", &src_url]));
    assert_no_password(&o);
    assert_code(&o, 0);
    // Without our CA the server's certificate is not trusted: refused, not retried.
    let mut untrusted = with_url(repo.path(), &src_url);
    untrusted
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    let o = run(untrusted.args(["wait", "--timeout", "30s"]));
    assert_no_password(&o);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    // rediss:// to a plain port: refused at once too.
    let plain = format!("rediss://:{PW}@127.0.0.1:{}", src.port);
    let o = run(with_tls(&plain).args(["wait", "--timeout", "30s"]));
    assert_no_password(&o);
    assert_code(&o, 1);

    let o = run(with_tls(&src_url).arg("backup"));
    assert_no_password(&o);
    assert_code(&o, 0);
    let (dst, dst_url) = tls_server(certs.path());
    let o = run(with_tls(&dst_url).arg("restore"));
    assert_no_password(&o);
    assert_code(&o, 0);
    assert_eq!(dst.digest(), src.digest());
}

#[test]
fn sigterm_stops_a_backup_with_128_plus_15_and_no_set() {
    let repo = tempfile::tempdir().unwrap();
    let src = big_server();
    let mut child = with_url(repo.path(), &src.url())
        .arg("backup")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(60), || {
        temps(repo.path()).iter().any(|t| {
            repo.path()
                .join(t)
                .join("redis/dump.rdb.zst")
                .metadata()
                .map(|m| m.len() > 0)
                .unwrap_or(false)
        })
    }));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup finished before the signal"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 128 + 15);
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
}

/// A backup whose artifact cannot be written (here: past the file size limit, `ulimit -f`)
/// fails with the disk's error naming the artifact, not with a snapshot or connection
/// error, publishes no set, and the next backup works.
#[test]
fn an_artifact_that_cannot_be_written_fails_the_backup_with_the_disk_error() {
    let repo = tempfile::tempdir().unwrap();
    let src = big_server();
    let ours = with_url(repo.path(), &src.url());
    // The shell ignores SIGXFSZ (an ignored signal stays ignored across exec), so a write past
    // the limit fails with EFBIG instead of killing the process.
    let mut limited = Command::new("sh");
    limited
        .args(["-c", "trap '' XFSZ; ulimit -f 512; exec \"$0\" backup"])
        .arg(ours.get_program());
    for (k, v) in ours.get_envs() {
        match v {
            Some(v) => limited.env(k, v),
            None => limited.env_remove(k),
        };
    }
    let o = run(&mut limited);
    assert_code(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("dump.rdb.zst"), "{err}");
    assert!(err.contains("too large"), "{err}");
    assert!(!err.contains("snapshot:"), "{err}");
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));

    assert_code(&backup(repo.path(), &src), 0);
    assert_eq!(sets(repo.path()).len(), 1);
}

/// A TCP relay in front of a real redis-server that rewrites the version of the first RDB
/// header (`REDIS00xx`) the server sends on each connection to `REDIS0013`, the format Redis
/// 8.6 writes. What is real: the server, its snapshot, the replication protocol and every
/// other byte. What is not: the two version digits, so the RDB's trailing CRC64 no longer
/// matches; nothing in the v13 path checks it (this build does not parse v13), and the test
/// restores the digits to prove the stored bytes are the server's snapshot. Returns the port
/// and the original digits (once seen).
fn v13_relay(server_port: u16) -> (u16, std::sync::Arc<std::sync::Mutex<Option<[u8; 2]>>>) {
    use std::net::TcpStream;
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            let seen = seen2.clone();
            std::thread::spawn(move || {
                const PAT: &[u8] = b"REDIS00";
                // Bytes of the pattern matched so far; 7 and 8 are the version digits.
                let (mut m, mut done, mut orig) = (0usize, false, [0u8; 2]);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    for b in &mut buf[..n] {
                        if done {
                            break;
                        }
                        if m < PAT.len() {
                            m = if *b == PAT[m] {
                                m + 1
                            } else {
                                usize::from(*b == b'R')
                            };
                        } else {
                            orig[m - PAT.len()] = *b;
                            *b = b"13"[m - PAT.len()];
                            m += 1;
                            if m == PAT.len() + 2 {
                                done = true;
                                *seen.lock().unwrap() = Some(orig);
                            }
                        }
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

/// A server whose snapshot is in a format newer than this build (RDB v13, Redis 8.6) is backed
/// up anyway: the snapshot is stored byte for byte with its checksum, the counts come from
/// `INFO keyspace`, the manifest marks the set not deep-verifiable, `verify --deep` says so
/// in one line and passes on checksums (and fails on a damaged artifact), the data-directory
/// preseed writes the stored bytes, and an online restore refuses with one line.
#[test]
fn a_newer_rdb_version_is_backed_up_and_marked_not_deep_verifiable() {
    let repo = tempfile::tempdir().unwrap();
    let src = RedisServer::start();
    let mut c = src.client();
    for i in 0..50 {
        let _: () = q(&mut c, redis::cmd("SET").arg(format!("k{i}")).arg(i));
    }
    let _: () = q(&mut c, redis::cmd("SELECT").arg(3));
    let _: () = q(&mut c, redis::cmd("HSET").arg("h").arg("f").arg("v"));
    let _: () = q(&mut c, redis::cmd("RPUSH").arg("l").arg("a").arg("b"));
    let (port, seen) = v13_relay(src.port);
    let url = format!("redis://127.0.0.1:{port}");

    let o = run(with_url(repo.path(), &url).arg("backup"));
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("RDB version 13 is newer than this build"),
        "{}",
        stderr(&o)
    );
    let orig = seen.lock().unwrap().expect("the relay saw no RDB header");
    let ids = sets(repo.path());
    assert_eq!(ids.len(), 1);
    let m = manifest(repo.path(), &ids[0]);
    let r = &m["engines"]["redis"];
    assert_eq!(r["details"]["rdb_version"], 13, "{r}");
    assert_eq!(r["details"]["deep_verifiable"], false, "{r}");
    assert_eq!(r["counts"]["db0"], 50, "{r}");
    assert_eq!(r["counts"]["db3"], 2, "{r}");

    // The artifact is the server's snapshot: with its two version digits put back, the stock
    // checker accepts it and a real server loads the same data.
    let plain = repo.path().join("plain.rdb");
    let z = Command::new("zstd")
        .args(["-q", "-d", "-o"])
        .arg(&plain)
        .arg(artifact(repo.path(), &ids[0]))
        .status()
        .unwrap();
    assert!(z.success());
    let mut bytes = std::fs::read(&plain).unwrap();
    assert_eq!(&bytes[..9], b"REDIS0013");
    let stored = bytes.clone();
    bytes[7..9].copy_from_slice(&orig);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dump.rdb"), &bytes).unwrap();
    let check = Command::new("redis-check-rdb")
        .arg(dir.path().join("dump.rdb"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stdout(&check));
    let loaded = RedisServer::on_dir(dir.path(), false);
    assert_eq!(loaded.digest(), src.digest());
    drop(loaded);

    // verify --deep: one line saying so, exit 0 on good checksums.
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", &ids[0]]));
    assert_code(&o, 0);
    let err = stderr(&o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("not deep-verifiable"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");

    // The data-directory preseed (no URL) writes the stored bytes as they are.
    let seed = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", seed.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert_eq!(std::fs::read(seed.path().join("dump.rdb")).unwrap(), stored);

    // Online restore needs the records decoded: one clear line, exit 1.
    let dst = RedisServer::start();
    let o = run(with_url(repo.path(), &dst.url()).args(["restore", "latest"]));
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("DBKEEPER_REDIS_DATA_DIR"),
        "{}",
        stderr(&o)
    );

    // A damaged artifact still fails verify: the checksums are the guard.
    let art = artifact(repo.path(), &ids[0]);
    let mut z = std::fs::read(&art).unwrap();
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    std::fs::write(&art, z).unwrap();
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", &ids[0]]));
    assert_ne!(code(&o), 0, "{}", stderr(&o));
}
