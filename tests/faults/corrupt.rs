//! Corrupt bytes: bit flips and truncations at seeded random positions of every artifact type
//! (Redis RDB, MongoDB BSON and metadata, Chroma collection/records/embeddings, age-encrypted
//! artifacts) and of the manifest, each in a copy of one good set. `dbkeeper verify ID` must
//! catch every one (exit 4, one line); `verify --deep` must never panic; `preseed` falls back
//! to the previous good set and names the corrupt one. The same for MongoDB's archived oplog
//! segments: `verify` names the corrupt one, and a restore to a point past it stops before the
//! target is touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::{age_key, dbkeeper, free_port, sets, stderr, stdout, wait_until};
use crate::network::{bounded, clean_failure, tally};
use crate::report;

const BOUND: Duration = Duration::from_secs(60);

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn files(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, base, out);
        } else {
            out.push(p.strip_prefix(base).unwrap().to_owned());
        }
    }
}

/// The artifact type of a file in a set: its path with database, collection and numbers
/// left out.
fn kind(rel: &Path) -> String {
    let s = rel.to_string_lossy();
    let name = rel.file_name().unwrap().to_string_lossy().into_owned();
    let engine = s.split('/').next().unwrap_or("");
    let name = if engine == "mongodb" {
        let stem = name.split('.').next().unwrap_or("");
        name.replacen(stem, "<coll>", 1)
    } else {
        name
    };
    if engine == name {
        name
    } else {
        format!("{engine}/{name}")
    }
}

/// One good set per engine (an older and a newer one), made once per test.
struct Source {
    repo: tempfile::TempDir,
    older: String,
    newer: String,
    env: Vec<(String, String)>,
}

fn two_sets(var: &str, url: &str, extra: &[(&str, &str)]) -> Source {
    let repo = tempfile::tempdir().unwrap();
    let run = || {
        let mut c = dbkeeper(repo.path());
        c.env(var, url).envs(extra.iter().copied()).arg("backup");
        let o = bounded(&mut c, BOUND).unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    };
    run();
    // Set names have a resolution of one second.
    std::thread::sleep(Duration::from_millis(1100));
    run();
    let s = sets(repo.path());
    assert_eq!(s.len(), 2, "{s:?}");
    Source {
        older: s[0].clone(),
        newer: s[1].clone(),
        env: extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        repo,
    }
}

/// Case `i` of `class`: flips one bit of `path` (even cases) or truncates it (odd ones) at a
/// seeded position; says what it did, naming the file's type `k`.
fn damage(path: &Path, class: &str, i: usize, k: &str) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let len = bytes.len();
    let seed = report::case_seed(class, i);
    let pos = (seed % len as u64) as usize;
    let what = if i.is_multiple_of(2) {
        bytes[pos] ^= 1 << (seed >> 61);
        format!(
            "{k}: bit {} of byte {pos} of {len} flipped (seed {seed})",
            seed >> 61
        )
    } else {
        bytes.truncate(pos);
        format!("{k}: truncated to {pos} of {len} bytes (seed {seed})")
    };
    std::fs::write(path, &bytes).unwrap();
    what
}

/// Flips one bit, or truncates, at a seeded position of a copy of `src`'s newer set's `rel`;
/// `verify` must fail with exit 4 and `verify --deep` must fail without a panic.
fn corrupt_cases(engine: &str, src: &Source, results: &mut Vec<(String, Result<(), String>)>) {
    let set = src.repo.path().join(&src.newer);
    let mut all = Vec::new();
    files(&set, &set, &mut all);
    all.sort();
    // One file of each type.
    let mut seen = std::collections::BTreeMap::new();
    for rel in all {
        seen.entry(kind(&rel)).or_insert(rel);
    }
    let n = report::cases(10, 100);
    for (k, rel) in seen {
        for i in 0..n {
            let tmp = tempfile::tempdir().unwrap();
            let copy = tmp.path().join(&src.newer);
            copy_dir(&set, &copy);
            let what = damage(&copy.join(&rel), &format!("corrupt/{engine}/{k}"), i, &k);
            let verify = |deep: bool| {
                let mut c = dbkeeper(tmp.path());
                c.envs(src.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                c.args(["verify", &src.newer]);
                if deep {
                    c.arg("--deep");
                }
                bounded(&mut c, BOUND)
            };
            let r = verify(false)
                .and_then(|o| clean_failure(&o, &[4]).map_err(|e| format!("verify: {e}")))
                .and_then(|()| verify(true))
                .and_then(|o| {
                    clean_failure(&o, &[1, 4]).map_err(|e| format!("verify --deep: {e}"))
                });
            results.push((what, r));
        }
    }
}

/// Corrupts the newer set's `rel`, then preseeds `target`: the older set is used and the
/// corrupt one named.
fn preseed_falls_back(src: &Source, var: &str, target: &str, rel: &str) -> Result<(), String> {
    let path = src.repo.path().join(&src.newer).join(rel);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let mut c = dbkeeper(src.repo.path());
    c.env(var, target)
        .envs(src.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .arg("preseed");
    let o = bounded(&mut c, BOUND)?;
    let e = stderr(&o);
    if o.status.code() != Some(0) {
        return Err(format!("preseed exit {:?}: {e}", o.status.code()));
    }
    if !e.contains(&src.newer) {
        return Err(format!("the corrupt set {} is not named: {e}", src.newer));
    }
    if !e.contains(&src.older) {
        return Err(format!("the older set {} is not named: {e}", src.older));
    }
    Ok(())
}

#[test]
fn redis_artifacts() {
    let s = RedisServer::start();
    s.cli(&["DEBUG", "POPULATE", "3000", "key", "64"]);
    s.cli(&["RPUSH", "list", "a", "b", "c"]);
    s.cli(&["HSET", "hash", "f", "v", "g", "w"]);
    let src = two_sets("DBKEEPER_REDIS_URL", &s.url(), &[]);
    let mut results = Vec::new();
    corrupt_cases("redis", &src, &mut results);
    let empty = RedisServer::start();
    let r = preseed_falls_back(
        &src,
        "DBKEEPER_REDIS_URL",
        &empty.url(),
        "redis/dump.rdb.zst",
    )
    .and_then(|()| {
        (empty.total_keys() == s.total_keys())
            .then_some(())
            .ok_or("the older set's keys are not all there".to_owned())
    });
    results.push(("preseed falls back".into(), r));
    tally("corrupt/redis", results);
}

#[test]
fn encrypted_artifacts() {
    let keys = tempfile::tempdir().unwrap();
    let (identity, public) = age_key(keys.path(), "id.txt");
    let s = RedisServer::start();
    s.cli(&["DEBUG", "POPULATE", "2000", "key", "64"]);
    let id = identity.to_string_lossy().into_owned();
    let src = two_sets(
        "DBKEEPER_REDIS_URL",
        &s.url(),
        &[
            ("DBKEEPER_AGE_RECIPIENTS", public.as_str()),
            ("DBKEEPER_AGE_IDENTITY_FILE", id.as_str()),
        ],
    );
    let mut results = Vec::new();
    corrupt_cases("age", &src, &mut results);
    let mut all = Vec::new();
    let set = src.repo.path().join(&src.newer);
    files(&set, &set, &mut all);
    let sealed = all
        .iter()
        .find(|p| p.starts_with("redis") && p.to_string_lossy().ends_with(".age"))
        .unwrap_or_else(|| panic!("no sealed Redis artifact in an encrypted set: {all:?}"))
        .to_string_lossy()
        .into_owned();
    let empty = RedisServer::start();
    let r = preseed_falls_back(&src, "DBKEEPER_REDIS_URL", &empty.url(), &sealed).and_then(|()| {
        (empty.total_keys() == s.total_keys())
            .then_some(())
            .ok_or("the older set's keys are not all there".to_owned())
    });
    results.push(("preseed falls back".into(), r));
    tally("corrupt/age", results);
}

#[test]
fn mongodb_artifacts() {
    let m = Mongo::start(false, true);
    let docs = (0..2000)
        .map(|i| mongodb::bson::rawdoc! { "_id": i, "name": format!("n{i}"), "v": i * 3 })
        .collect();
    m.insert("app", "people", docs);
    m.command(
        "app",
        mongodb::bson::doc! { "createIndexes": "people", "indexes": [ { "key": { "name": 1 }, "name": "by_name" } ] },
    );
    let src = two_sets("DBKEEPER_MONGODB_URI", &m.uri(), &[]);
    let mut results = Vec::new();
    corrupt_cases("mongodb", &src, &mut results);
    let empty = Mongo::start(false, true);
    let r = preseed_falls_back(
        &src,
        "DBKEEPER_MONGODB_URI",
        &empty.uri(),
        "mongodb/app/people.bson.zst",
    )
    .and_then(|()| {
        (empty.sorted_docs("app", "people") == m.sorted_docs("app", "people"))
            .then_some(())
            .ok_or("the older set's documents are not all there".to_owned())
    });
    results.push(("preseed falls back".into(), r));
    tally("corrupt/mongodb", results);
}

#[test]
fn chroma_artifacts() {
    let c = ChromaServer::start();
    py(
        SEED,
        &[
            &c.port.to_string(),
            r#"[{"name":"coll_a","space":"cosine","dim":8,"n":300,"seed":3}]"#,
        ],
    );
    let src = two_sets("DBKEEPER_CHROMA_URL", &c.url(), &[]);
    let mut results = Vec::new();
    corrupt_cases("chroma", &src, &mut results);
    let mut all = Vec::new();
    let set = src.repo.path().join(&src.newer);
    files(&set, &set, &mut all);
    let records = all
        .iter()
        .find(|p| p.ends_with("records.jsonl.zst"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let empty = ChromaServer::start();
    let r = preseed_falls_back(&src, "DBKEEPER_CHROMA_URL", &empty.url(), &records);
    results.push(("preseed falls back".into(), r));
    tally("corrupt/chroma", results);
}

/// The segment files of a repository's oplog archive, sorted.
fn segment_files(repo: &Path) -> Vec<PathBuf> {
    let dir = repo.join("pitr/mongodb");
    let mut all = Vec::new();
    if dir.is_dir() {
        files(&dir, repo, &mut all);
    }
    all.retain(|p| p.to_string_lossy().contains(".bson.zst"));
    all.sort();
    all
}

#[test]
fn pitr_segments() {
    let m = Mongo::start(false, false);
    let doc = |i: i32| mongodb::bson::rawdoc! { "_id": i, "name": format!("n{i}") };
    m.insert("app", "people", (0..500).map(doc).collect());
    let repo = tempfile::tempdir().unwrap();
    let o = bounded(
        dbkeeper(repo.path())
            .env("DBKEEPER_MONGODB_URI", m.uri())
            .arg("backup"),
        BOUND,
    )
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // The sidecar archives the oplog while batches land a little apart: several segments.
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("sidecar.log");
    let mut sidecar = dbkeeper(repo.path())
        .arg("sidecar")
        .env("DBKEEPER_MONGODB_URI", m.uri())
        .env("DBKEEPER_MONGODB_PITR", "on")
        .env("DBKEEPER_PITR_FLUSH", "200ms")
        .env("DBKEEPER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("DBKEEPER_SCHEDULE", "0 0 1 1 *")
        .env("DBKEEPER_MIN_FREE", "0%")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    for b in 1..=4 {
        m.insert(
            "app",
            "people",
            (b * 1000..b * 1000 + 200).map(doc).collect(),
        );
        std::thread::sleep(Duration::from_millis(700));
    }
    let archived = wait_until(Duration::from_secs(20), || {
        segment_files(repo.path()).len() >= 3
    });
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &sidecar.id().to_string()])
        .status();
    let _ = sidecar.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(archived, "fewer than 3 oplog segments archived:\n{log}");
    let segs = segment_files(repo.path());
    let o = bounded(
        dbkeeper(repo.path()).args(["list", "--pitr", "--json"]),
        BOUND,
    )
    .unwrap();
    let windows: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let end = windows[0]["to_ts"].as_str().unwrap().to_owned();

    // The intact archive verifies and restores: the cases below fail for the corruption alone.
    let empty = Mongo::start(false, false);
    let restore = |dir: &Path, target: &Mongo| {
        bounded(
            dbkeeper(dir)
                .env("DBKEEPER_MONGODB_URI", target.uri())
                .args(["restore", "--force", "--to-oplog-ts", &end]),
            BOUND,
        )
    };
    let o = bounded(dbkeeper(repo.path()).args(["verify", "--deep"]), BOUND).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("oplog segments"), "{}", stdout(&o));
    let o = restore(repo.path(), &empty).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        empty.sorted_docs("app", "people"),
        m.sorted_docs("app", "people")
    );
    // A fresh target for the corrupt cases: each must leave it empty.
    drop(empty);
    let empty = Mongo::start(false, false);

    let mut results = Vec::new();
    let n = report::cases(10, 100);
    for i in 0..n {
        // A middle segment: the base set and the segments before it stay good.
        let rel = &segs[(i % (segs.len() - 1)) + 1];
        let name = rel.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = tempfile::tempdir().unwrap();
        copy_dir(repo.path(), tmp.path());
        let what = damage(&tmp.path().join(rel), "corrupt/pitr", i, "segment");
        let verify = |deep: bool| {
            let mut c = dbkeeper(tmp.path());
            c.arg("verify");
            if deep {
                c.arg("--deep");
            }
            bounded(&mut c, BOUND)
        };
        let names = |o: &std::process::Output| {
            stderr(o)
                .contains(&name)
                .then_some(())
                .ok_or_else(|| format!("the segment is not named: {}", stderr(o)))
        };
        let r = verify(false)
            .and_then(|o| {
                clean_failure(&o, &[4]).map_err(|e| format!("verify: {e}"))?;
                names(&o)
            })
            .and_then(|()| verify(true))
            .and_then(|o| {
                clean_failure(&o, &[4]).map_err(|e| format!("verify --deep: {e}"))?;
                names(&o)
            })
            .and_then(|()| restore(tmp.path(), &empty))
            .and_then(|o| {
                clean_failure(&o, &[4]).map_err(|e| format!("restore: {e}"))?;
                names(&o)
            })
            .and_then(|()| {
                empty
                    .databases()
                    .is_empty()
                    .then_some(())
                    .ok_or(format!("the target was touched: {:?}", empty.databases()))
            });
        results.push((what, r));
    }
    tally("corrupt/pitr", results);
}
