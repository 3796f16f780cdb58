//! Per engine: `backup`, `preseed` (Redis also through its data directory) and
//! `restore --force` killed at random moments. One source and one target server per engine,
//! reused across kills.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mongodb::bson::{RawDocumentBuf, doc};

use super::{
    empty_dir, entries, every_set_verifies, kills, measure, next_writer, run_killed, trim,
};
use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::{self as mongo, Mongo};
use crate::common::redis::{Opts, RedisServer};
use crate::common::{assert_code, dbkeeper};
use crate::report::panic_message;
use crate::secrets::{REDIS_PW, checked_output};

/// Where a killed preseed or restore left its target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Left {
    /// Nothing yet: an empty target, which the next preseed restores.
    Empty,
    /// The restore-in-progress marker: the next preseed wipes and restores.
    Marked,
    /// The set's data, complete, without a marker.
    Done,
    /// The target's data before the restore (a `--force` killed before it dropped anything).
    Untouched,
}

/// Backup, then verify, then the next writer, for one engine's `cmd`.
pub fn backup_kills(class: &str, repo: &Path, cmd: &dyn Fn() -> Command, secrets: &[&str]) {
    let dur = measure(&mut cmd(), secrets);
    kills(class, dur, |at| {
        run_killed(&mut cmd(), at, secrets);
        every_set_verifies(repo, secrets);
        next_writer(repo, &mut cmd(), secrets);
        every_set_verifies(repo, secrets);
        trim(repo, 1);
    });
}

/// A target engine as the crash cases see it.
pub trait Target {
    /// Drops everything (marker included).
    fn wipe(&self);
    /// Puts the target's own data in (what `restore --force` overwrites).
    fn own_data(&self);
    /// A fingerprint of the data (marker excluded) and whether the marker is there.
    fn state(&self) -> (String, bool);
    fn env(&self, c: &mut Command);
}

/// Classifies what a killed preseed/restore left; panics on partial data without a marker.
#[track_caller]
pub fn classify(t: &dyn Target, want: &str, empty: &str, old: Option<&str>) -> Left {
    let (fp, marked) = t.state();
    if marked {
        Left::Marked
    } else if fp == want {
        Left::Done
    } else if fp == empty {
        Left::Empty
    } else if Some(fp.as_str()) == old {
        Left::Untouched
    } else {
        panic!("the target holds partial data and no restore-in-progress marker: {fp}")
    }
}

fn cmd_for(repo: &Path, t: &dyn Target, args: &[&str]) -> Command {
    let mut c = dbkeeper(repo);
    t.env(&mut c);
    c.args(args);
    c
}

/// `preseed` into an empty target and `restore --force` over the target's own data, killed;
/// then the next `preseed` (and, for an untouched target, `restore --force`) ends with the
/// set's data and no marker.
pub fn preseed_and_restore_kills(
    engine: &str,
    repo: &Path,
    t: &dyn Target,
    want: &str,
    secrets: &[&str],
) {
    t.wipe();
    let empty = t.state().0;
    let dur = measure(&mut cmd_for(repo, t, &["preseed"]), secrets);
    assert_eq!(t.state(), (want.to_owned(), false), "the measuring preseed");
    kills(&format!("crash/preseed-{engine}"), dur, |at| {
        t.wipe();
        let k = run_killed(&mut cmd_for(repo, t, &["preseed"]), at, secrets);
        let left = classify(t, want, &empty, None);
        eprintln!("  killed={} left {left:?}", k.killed);
        assert!(k.killed || left == Left::Done, "{left:?}");
        let o = checked_output(&mut cmd_for(repo, t, &["preseed"]), secrets);
        assert_code(&o, 0);
        assert_eq!(t.state(), (want.to_owned(), false), "after {left:?}");
    });

    t.wipe();
    t.own_data();
    let old = t.state().0;
    let dur = measure(&mut cmd_for(repo, t, &["restore", "--force"]), secrets);
    assert_eq!(t.state(), (want.to_owned(), false), "the measuring restore");
    kills(&format!("crash/restore-{engine}"), dur, |at| {
        t.wipe();
        t.own_data();
        let k = run_killed(&mut cmd_for(repo, t, &["restore", "--force"]), at, secrets);
        let left = classify(t, want, &empty, Some(&old));
        eprintln!("  killed={} left {left:?}", k.killed);
        let o = checked_output(&mut cmd_for(repo, t, &["preseed"]), secrets);
        assert_code(&o, 0);
        if left == Left::Untouched {
            assert_eq!(
                t.state(),
                (old.clone(), false),
                "preseed over the target's own data"
            );
            let o = checked_output(&mut cmd_for(repo, t, &["restore", "--force"]), secrets);
            assert_code(&o, 0);
        }
        assert_eq!(t.state(), (want.to_owned(), false), "after {left:?}");
    });
}

// --- Redis -----------------------------------------------------------------------------------

const REDIS_MARKER: &str = "__dbkeeper:restore-in-progress";

/// Enough keys that a backup or restore takes about a second here.
pub const REDIS_KEYS: &str = "250000";

impl Target for RedisServer {
    fn wipe(&self) {
        self.cli(&["FLUSHALL"]);
    }
    fn own_data(&self) {
        self.cli(&["SET", "mine", "old"]);
        self.cli(&["-n", "2", "DEBUG", "POPULATE", "1000", "own", "10"]);
    }
    fn state(&self) -> (String, bool) {
        let marked = self.cli(&["EXISTS", REDIS_MARKER]) == "1";
        if marked {
            return (String::new(), true);
        }
        (self.digest(), false)
    }
    fn env(&self, c: &mut Command) {
        c.env("DBKEEPER_REDIS_URL", self.url());
    }
}

#[test]
fn redis_backup_preseed_and_restore_killed() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let secrets = [REDIS_PW];
    let src = RedisServer::with_password(REDIS_PW);
    src.cli(&["DEBUG", "POPULATE", REDIS_KEYS, "key", "100"]);
    src.cli(&["-n", "5", "HSET", "h", "a", "1", "b", "2"]);
    let want = src.digest();
    let backup = || {
        let mut c = dbkeeper(r);
        src.env(&mut c);
        c.arg("backup");
        c
    };
    backup_kills("crash/backup-redis", r, &backup, &secrets);

    let dst = RedisServer::with_password(REDIS_PW);
    preseed_and_restore_kills("redis", r, &dst, &want, &secrets);

    // The data directory of a server that is not running yet.
    let dd = tempfile::tempdir().unwrap();
    let preseed = || {
        let mut c = dbkeeper(r);
        c.env(
            "DBKEEPER_REDIS_URL",
            format!("redis://:{REDIS_PW}@127.0.0.1:1"),
        )
        .env("DBKEEPER_REDIS_DATA_DIR", dd.path())
        .arg("preseed");
        c
    };
    let dur = measure(&mut preseed(), &secrets);
    let mut n = 0;
    kills("crash/preseed-redis-datadir", dur, |at| {
        n += 1;
        empty_dir(dd.path());
        run_killed(&mut preseed(), at, &secrets);
        let left = entries(dd.path());
        let o = checked_output(&mut preseed(), &secrets);
        assert_code(&o, 0);
        let now = entries(dd.path());
        assert!(
            now.iter().all(|e| !e.starts_with('.')),
            "temps after the next preseed: {now:?} (the kill left {left:?})"
        );
        // Both ways the server may be configured to load the directory.
        let s = RedisServer::start_with(Opts {
            dir: Some(dd.path()),
            appendonly: n % 2 == 1,
            ..Opts::default()
        });
        assert_eq!(s.digest(), want, "the kill left {left:?}");
    });
}

// --- MongoDB ---------------------------------------------------------------------------------

const MONGO_MARKER: &str = "dbkeeper_restore_marker";

fn mongo_fp(m: &Mongo) -> String {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    for db in m.databases() {
        for (name, _) in m.collections(&db) {
            if name.starts_with("system.") {
                continue;
            }
            let mut h = sha2::Sha256::new();
            let docs = m.sorted_docs(&db, &name);
            for d in &docs {
                h.update(d);
            }
            out.insert(
                format!("{db}.{name}"),
                format!("{}:{}", docs.len(), hex::encode(&h.finalize()[..8])),
            );
        }
    }
    format!("{out:?}")
}

/// Runs one of the harness's own reads or writes, again after a pause when its client failed: under
/// a full run's load the driver's monitor can time out and clear the test client's pool
/// (`ConnectionPoolCleared`), which says nothing of the target's state.
fn harness_retry<T>(what: &str, f: impl Fn() -> T) -> T {
    for _ in 0..4 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&f)) {
            Ok(v) => return v,
            Err(e) => {
                eprintln!(
                    "  the harness's {what} failed ({}); again",
                    panic_message(&*e)
                );
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    f()
}

impl Target for Mongo {
    fn wipe(&self) {
        harness_retry("wipe", || self.wipe_once())
    }
    fn own_data(&self) {
        harness_retry("insert", || self.own_data_once())
    }
    fn state(&self) -> (String, bool) {
        harness_retry("read", || self.state_once())
    }
    fn env(&self, c: &mut Command) {
        c.env("DBKEEPER_MONGODB_URI", self.uri());
    }
}

trait MongoTarget {
    fn wipe_once(&self);
    fn own_data_once(&self);
    fn state_once(&self) -> (String, bool);
}

impl MongoTarget for Mongo {
    fn wipe_once(&self) {
        for db in self.databases() {
            self.command(&db, doc! {"dropDatabase": 1});
        }
        let _ = self.block(async {
            self.client()
                .database("admin")
                .run_command(doc! {"drop": MONGO_MARKER})
                .await
        });
    }
    fn own_data_once(&self) {
        self.insert(
            "mine",
            "old",
            (0..100)
                .map(|i| raw(doc! {"_id": i, "mine": true}))
                .collect(),
        );
        self.insert("app", "users", vec![raw(doc! {"_id": "not from the set"})]);
    }
    fn state_once(&self) -> (String, bool) {
        let marked = self
            .collections("admin")
            .iter()
            .any(|(n, _)| n == MONGO_MARKER);
        if marked {
            return (String::new(), true);
        }
        (mongo_fp(self), false)
    }
}

fn raw(d: mongodb::bson::Document) -> RawDocumentBuf {
    RawDocumentBuf::from_document(&d).unwrap()
}

/// Enough documents that a dump or restore takes about a second here.
pub fn mongo_populate(m: &Mongo, per_collection: i32) {
    for (db, c) in [("app", "users"), ("app", "events"), ("logs", "lines")] {
        m.insert(
            db,
            c,
            (0..per_collection)
                .map(|i| {
                    raw(doc! {"_id": i, "pad": "p".repeat(150), "c": c, "n": i64::from(i) * 7})
                })
                .collect(),
        );
    }
    m.command(
        "app",
        doc! {"createIndexes": "users", "indexes": [{"key": {"n": 1}, "name": "n_1"}]},
    );
}

#[test]
fn mongodb_backup_preseed_and_restore_killed() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let secrets = [mongo::PASSWORD];
    let src = Mongo::start(true, false);
    mongo_populate(&src, 15_000);
    let want = mongo_fp(&src);
    let backup = || {
        let mut c = dbkeeper(r);
        src.env(&mut c);
        c.arg("backup");
        c
    };
    backup_kills("crash/backup-mongodb", r, &backup, &secrets);
    let dst = Mongo::start(true, false);
    preseed_and_restore_kills("mongodb", r, &dst, &want, &secrets);
}

// --- Chroma ----------------------------------------------------------------------------------

const CHROMA_MARKER: &str = "dbkeeper.restore-in-progress";

/// One request to a Chroma server (HTTP/1.0, so the body ends with the connection): the
/// status and the body as JSON. Written by hand to keep Python (a second or more to start)
/// out of the per-kill checks.
fn chroma_http(port: u16, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (
        code,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

const CHROMA_DB: &str = "/api/v2/tenants/default_tenant/databases/default_database/collections";

/// The default database's collections: (name, id, metadata).
fn chroma_collections(port: u16) -> Vec<(String, String, serde_json::Value)> {
    let (code, v) = chroma_http(port, "GET", &format!("{CHROMA_DB}?limit=1000"), "");
    assert_eq!(code, 200, "list collections: {v}");
    let mut out: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["id"].as_str().unwrap().to_owned(),
                c["metadata"].clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// JSON text with every object's keys sorted (serde_json keeps their order here, and a
/// restored record need not list its metadata in the same order).
fn canon(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", Value::String((*k).clone()), canon(&m[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canon).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Every collection: name, count, metadata and a hash of its records sorted by id.
fn chroma_fp(port: u16) -> String {
    use sha2::Digest;
    let mut out = String::new();
    for (name, id, meta) in chroma_collections(port) {
        let (code, g) = chroma_http(
            port,
            "POST",
            &format!("{CHROMA_DB}/{id}/get"),
            r#"{"include": ["embeddings", "documents", "metadatas", "uris"]}"#,
        );
        assert_eq!(code, 200, "get {name}: {g}");
        let ids = g["ids"].as_array().unwrap();
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by(|&a, &b| ids[a].as_str().cmp(&ids[b].as_str()));
        let mut h = sha2::Sha256::new();
        for i in order {
            for k in ["ids", "embeddings", "documents", "metadatas", "uris"] {
                h.update(canon(g[k].get(i).unwrap_or(&serde_json::Value::Null)));
            }
        }
        out.push_str(&format!(
            "{name} {} {} {}\n",
            ids.len(),
            canon(&meta),
            hex::encode(&h.finalize()[..8])
        ));
    }
    out
}

pub const CHROMA_SPEC: &str = r#"[{"name":"docs","space":"l2","dim":32,"n":4000,"seed":1,"metadata":{"team":"a"}},
{"name":"small","space":"ip","dim":8,"n":500,"seed":2,"docs":false}]"#;

impl Target for ChromaServer {
    fn wipe(&self) {
        for (name, _, _) in chroma_collections(self.port) {
            let (code, v) = chroma_http(self.port, "DELETE", &format!("{CHROMA_DB}/{name}"), "");
            assert_eq!(code, 200, "delete {name}: {v}");
        }
    }
    fn own_data(&self) {
        let (code, v) = chroma_http(
            self.port,
            "POST",
            CHROMA_DB,
            r#"{"name": "mine", "metadata": {"own": true}}"#,
        );
        assert_eq!(code, 200, "create: {v}");
        let id = v["id"].as_str().unwrap();
        let ids: Vec<String> = (0..50).map(|i| format!("mine-{i}")).collect();
        let emb: Vec<[f32; 4]> = (0..50).map(|i| [i as f32, 1.0, -0.5, 2.0]).collect();
        let body = serde_json::json!({"ids": ids, "embeddings": emb}).to_string();
        let (code, v) = chroma_http(self.port, "POST", &format!("{CHROMA_DB}/{id}/add"), &body);
        assert!(code == 200 || code == 201, "add: {code} {v}");
    }
    fn state(&self) -> (String, bool) {
        let marked = chroma_collections(self.port)
            .iter()
            .any(|(n, _, _)| n == CHROMA_MARKER);
        if marked {
            return (String::new(), true);
        }
        (chroma_fp(self.port), false)
    }
    fn env(&self, c: &mut Command) {
        c.env("DBKEEPER_CHROMA_URL", self.url());
    }
}

#[test]
fn chroma_backup_preseed_and_restore_killed() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let src = ChromaServer::start();
    let dst = ChromaServer::start();
    py(SEED, &[&src.port.to_string(), CHROMA_SPEC]);
    let want = src.state().0;
    let backup = || {
        let mut c = dbkeeper(r);
        src.env(&mut c);
        c.arg("backup");
        c
    };
    backup_kills("crash/backup-chroma", r, &backup, &[]);
    preseed_and_restore_kills("chroma", r, &dst, &want, &[]);
}
