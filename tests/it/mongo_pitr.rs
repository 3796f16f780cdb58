//! MongoDB sets consistent to one point and point-in-time recovery, against the stand-in run
//! as a one-member replica set: a dump under writes equals the data at its end point; the
//! sidecar archives the oplog and `restore --to-time` brings back the data of that second,
//! document for document; a gap in the archive is reported and closed by the next set.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, SubsecRound, Utc};
use mongodb::bson::{Document, Timestamp, doc};
use serde_json::Value;

use crate::common::mongodb::Mongo;
use crate::common::{assert_code, code, dbkeeper, run, stderr, stdout, wait_until};

/// Every user collection of `db` with its documents sorted by `_id` (as canonical bytes).
fn snapshot(m: &Mongo, db: &str) -> Vec<(String, Vec<Vec<u8>>)> {
    m.collections(db)
        .into_iter()
        .map(|(name, _)| {
            let docs = m.sorted_docs(db, &name);
            (name, docs)
        })
        .collect()
}

fn collection_names(m: &Mongo, db: &str) -> Vec<String> {
    m.collections(db).into_iter().map(|(n, _)| n).collect()
}

/// A sidecar archiving the oplog of `uri`.
struct Archiver;

impl Archiver {
    fn start(repo: &Path, uri: &str) -> crate::common::archiver::Archiver {
        Archiver::start_env(repo, uri, &[])
    }

    fn start_env(
        repo: &Path,
        uri: &str,
        env: &[(&str, &str)],
    ) -> crate::common::archiver::Archiver {
        let mut all = vec![
            ("DBKEEPER_MONGODB_URI", uri),
            ("DBKEEPER_MONGODB_PITR", "on"),
        ];
        all.extend_from_slice(env);
        crate::common::archiver::Archiver::start(repo, &all)
    }
}

/// The newest archived point, per `list --pitr --json`, for the window starting at `set`.
fn window_end(repo: &Path, set: &str) -> Option<String> {
    let o = run(dbkeeper(repo).args(["list", "--pitr", "--json"]));
    let v: Value = serde_json::from_str(&stdout(&o)).ok()?;
    v.as_array()?
        .iter()
        .find(|w| w["set"] == set)
        .and_then(|w| w["to_ts"].as_str().map(str::to_owned))
}

/// Waits (20 s at most) until the archive's window from `set` reaches `point`; fails with the
/// archiver's log when it does not.
#[track_caller]
fn assert_archived_to(
    repo: &Path,
    set: &str,
    point: (u32, u32),
    arch: &crate::common::archiver::Archiver,
) {
    let reached = wait_until(Duration::from_secs(20), || {
        window_end(repo, set).is_some_and(|e| parse_ts(&e) >= point)
    });
    assert!(
        reached,
        "the archive from {set} did not reach {point:?}:\n{}",
        arch.log()
    );
}

fn parse_ts(s: &str) -> (u32, u32) {
    let (t, i) = s.split_once(':').unwrap();
    (t.parse().unwrap(), i.parse().unwrap())
}

/// The newest entry of a server's oplog (what a restore to "the last write" targets).
fn last_write(m: &Mongo) -> (u32, u32) {
    use futures_util::TryStreamExt;
    let newest: Vec<Document> = m.block(async {
        m.client()
            .database("local")
            .collection::<Document>("oplog.rs")
            .find(doc! {})
            .sort(doc! {"ts": -1})
            .limit(1)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    });
    let ts = newest[0].get_timestamp("ts").unwrap();
    (ts.time, ts.increment)
}

fn backup(repo: &Path, uri: &str) -> String {
    let o = run(dbkeeper(repo)
        .arg("backup")
        .env("DBKEEPER_MONGODB_URI", uri));
    assert_code(&o, 0);
    stdout(&o).trim().to_owned()
}

/// Sleeps until just after the next whole second, and returns that second: every write made
/// before the call is in an earlier second, every write after it in this one or later.
fn next_second() -> DateTime<Utc> {
    let now = Utc::now();
    let next = now.trunc_subsecs(0) + chrono::TimeDelta::seconds(1);
    std::thread::sleep((next - now).to_std().unwrap() + Duration::from_millis(50));
    next
}

fn batch_one(m: &Mongo) {
    m.block(async {
        let db = m.client().database("app");
        let things = db.collection::<Document>("things");
        for i in 0..50 {
            things
                .update_one(
                    doc! {"_id": i},
                    doc! {"$set": {"v": i * 2, "n.x": i}, "$unset": {"w": ""}},
                )
                .await
                .unwrap();
        }
        things
            .delete_many(doc! {"_id": {"$gte": 450}})
            .await
            .unwrap();
        let other = db.collection::<Document>("other");
        other
            .insert_many((0..40).map(|i| doc! {"_id": i, "tags": ["a", "b"], "k": i % 3}))
            .await
            .unwrap();
        other
            .create_index(mongodb::IndexModel::builder().keys(doc! {"k": 1}).build())
            .await
            .unwrap();
        // A transaction: both writes or neither.
        let mut s = m.client().start_session().await.unwrap();
        s.start_transaction().await.unwrap();
        things
            .insert_one(doc! {"_id": 10_000, "txn": 1})
            .session(&mut s)
            .await
            .unwrap();
        things
            .delete_one(doc! {"_id": 1})
            .session(&mut s)
            .await
            .unwrap();
        s.commit_transaction().await.unwrap();
    });
}

fn batch_two(m: &Mongo) {
    m.block(async {
        let db = m.client().database("app");
        db.collection::<Document>("other").drop().await.unwrap();
        let things = db.collection::<Document>("things");
        for i in 100..150 {
            things
                .replace_one(doc! {"_id": i}, doc! {"replaced": true, "i": i})
                .await
                .unwrap();
        }
        db.create_collection("temp").await.unwrap();
        db.collection::<Document>("temp")
            .insert_one(doc! {"_id": 1})
            .await
            .unwrap();
        m.client()
            .database("admin")
            .run_command(doc! {"renameCollection": "app.temp", "to": "app.renamed"})
            .await
            .unwrap();
        let mut s = m.client().start_session().await.unwrap();
        s.start_transaction().await.unwrap();
        things
            .insert_one(doc! {"_id": 20_000, "txn": 2})
            .session(&mut s)
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 2}, doc! {"$inc": {"v": 100}})
            .session(&mut s)
            .await
            .unwrap();
        s.commit_transaction().await.unwrap();
    });
}

fn seed(m: &Mongo) {
    m.block(async {
        m.client()
            .database("app")
            .collection::<Document>("things")
            .insert_many((0..500).map(|i| doc! {"_id": i, "v": i, "w": "x"}))
            .await
            .unwrap();
    });
}

#[test]
fn restore_to_time_brings_back_that_second_document_for_document() {
    let src = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    seed(&src);
    let base = backup(repo.path(), &src.uri());

    let arch = Archiver::start(repo.path(), &src.uri());
    batch_one(&src);
    let at_t = snapshot(&src, "app");
    let t = next_second();
    // Writes of the next second on are after the target.
    let _ = next_second();
    batch_two(&src);
    let final_state = snapshot(&src, "app");
    let (end_t, end_i) = last_write(&src);
    assert_archived_to(repo.path(), &base, (end_t, end_i), &arch);
    let log = arch.stop();
    assert!(log.contains("oplog segment published"), "{log}");

    // To the second: the data after batch one, before batch two.
    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-time", &t.to_rfc3339()])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    assert_eq!(collection_names(&dst, "app"), vec!["other", "things"]);
    assert!(
        snapshot(&dst, "app") == at_t,
        "restored data differs from the snapshot at T"
    );
    // The index made during batch one came back with the collection.
    assert!(
        dst.indexes("app", "other")
            .iter()
            .any(|i| i.get_str("name") == Ok("k_1"))
    );

    // To the last entry: everything, the dropped collection gone, the rename done.
    let o = run(dbkeeper(repo.path())
        .args([
            "restore",
            "--force",
            "--to-oplog-ts",
            &format!("{end_t}:{end_i}"),
        ])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    assert_eq!(collection_names(&dst, "app"), vec!["renamed", "things"]);
    assert!(
        snapshot(&dst, "app") == final_state,
        "restored data differs from the final state"
    );

    // The target must be in the archive: before every set, or past its end, is one line.
    for bad in ["2001-01-01T00:00:00Z", "2099-01-01T00:00:00Z"] {
        let o = run(dbkeeper(repo.path())
            .args(["restore", "--force", "--to-time", bad])
            .env("DBKEEPER_MONGODB_URI", dst.uri()));
        assert_ne!(code(&o), 0, "{bad}");
        let err = stderr(&o);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Nothing but a time is a time.
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-time", "yesterday"])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 2);
}

#[test]
fn a_target_before_a_newer_sets_end_uses_the_older_set_and_the_archive() {
    let src = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    seed(&src);
    let first = backup(repo.path(), &src.uri());
    let arch = Archiver::start(repo.path(), &src.uri());
    batch_one(&src);
    let at_t = snapshot(&src, "app");
    let t = next_second();
    let _ = next_second();
    batch_two(&src);
    // A newer set, consistent to a point after T: it cannot serve T.
    let second = backup(repo.path(), &src.uri());
    let (end_t, end_i) = last_write(&src);
    assert_archived_to(repo.path(), &first, (end_t, end_i), &arch);
    drop(arch);
    let o = run(dbkeeper(repo.path()).args(["list", "--pitr"]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains(&first) && stdout(&o).contains(&second));

    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-time", &t.to_rfc3339()])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains(&format!("base={first}")),
        "{}",
        stderr(&o)
    );
    assert!(snapshot(&dst, "app") == at_t);

    // test-restore --to-time proves the same into a scratch server, and leaves it empty.
    let scratch = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path()).args([
        "test-restore",
        "--to-time",
        &t.to_rfc3339(),
        "--into",
        &scratch.uri(),
    ]));
    assert_code(&o, 0);
    assert!(scratch.databases().is_empty());

    // Retention keeps what the kept set needs: with only the newest set kept, segments that
    // end before its point go, the rest stay and still reach the last write.
    let o = run(dbkeeper(repo.path())
        .args(["prune"])
        .env("DBKEEPER_KEEP_LAST", "1")
        .env("DBKEEPER_KEEP_DAILY", "0"));
    assert_code(&o, 0);
    let o = run(dbkeeper(repo.path()).args(["list", "--pitr", "--json"]));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let windows = v.as_array().unwrap();
    assert_eq!(windows.len(), 1, "{v}");
    assert_eq!(windows[0]["set"], second.as_str());
    let o = run(dbkeeper(repo.path())
        .args([
            "restore",
            "--force",
            "--to-oplog-ts",
            &format!("{end_t}:{end_i}"),
        ])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    assert!(snapshot(&dst, "app") == snapshot(&src, "app"));
}

/// One write of the writer, with the oplog position the server gave it.
enum Op {
    Insert(i64),
    Inc(i64),
    Delete(i64),
}

#[test]
fn a_dump_under_writes_restores_to_the_data_at_its_end_point() {
    let src = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    // Large enough that the dump takes a while with writes running through it.
    src.block(async {
        let c = src
            .client()
            .database("app")
            .collection::<Document>("things");
        for chunk in (0..60_000i64).collect::<Vec<_>>().chunks(10_000) {
            c.insert_many(
                chunk
                    .iter()
                    .map(|i| doc! {"_id": i, "v": 0i64, "pad": "p".repeat(200)}),
            )
            .await
            .unwrap();
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let uri = src.uri();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Vec<(Timestamp, Op)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let client = mongodb::Client::with_uri_str(&uri).await.unwrap();
                let c = client.database("app").collection::<Document>("things");
                let mut s = client.start_session().await.unwrap();
                let mut log = Vec::new();
                let mut next_id = 100_000i64;
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let op = match n % 3 {
                        0 => {
                            next_id += 1;
                            c.insert_one(doc! {"_id": next_id, "v": 0i64})
                                .session(&mut s)
                                .await
                                .unwrap();
                            Op::Insert(next_id)
                        }
                        1 => {
                            let id = (n * 7919) % 60_000;
                            c.update_one(doc! {"_id": id}, doc! {"$inc": {"v": 1i64}})
                                .session(&mut s)
                                .await
                                .unwrap();
                            Op::Inc(id)
                        }
                        _ => {
                            let id = (n * 104_729) % 60_000;
                            c.delete_one(doc! {"_id": id})
                                .session(&mut s)
                                .await
                                .unwrap();
                            Op::Delete(id)
                        }
                    };
                    log.push((s.operation_time().unwrap(), op));
                    n += 1;
                }
                log
            })
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let set = backup(repo.path(), &src.uri());
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().unwrap();

    let manifest: Value = serde_json::from_slice(
        &std::fs::read(repo.path().join(&set).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let slice = &manifest["engines"]["mongodb"]["details"]["oplog"];
    let end = (
        slice["end"]["t"].as_u64().unwrap() as u32,
        slice["end"]["i"].as_u64().unwrap() as u32,
    );
    let start = (
        slice["start"]["t"].as_u64().unwrap() as u32,
        slice["start"]["i"].as_u64().unwrap() as u32,
    );
    let during = log
        .iter()
        .filter(|(ts, _)| (ts.time, ts.increment) > start && (ts.time, ts.increment) <= end)
        .count();
    assert!(
        during > 10,
        "only {during} writes fell inside the dump ({took:?}); the test proves nothing"
    );
    assert!(
        manifest["engines"]["mongodb"]["details"]["consistency"]
            .as_str()
            .unwrap()
            .starts_with("point-in-time")
    );

    // The expected data at the end point: the seed, then every write at or before it.
    let mut expected: std::collections::BTreeMap<i64, i64> = (0..60_000).map(|i| (i, 0)).collect();
    for (ts, op) in &log {
        if (ts.time, ts.increment) > end {
            continue;
        }
        match op {
            Op::Insert(id) => {
                expected.insert(*id, 0);
            }
            Op::Inc(id) => {
                if let Some(v) = expected.get_mut(id) {
                    *v += 1;
                }
            }
            Op::Delete(id) => {
                expected.remove(id);
            }
        }
    }
    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path())
        .args(["restore", &set])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    let got: std::collections::BTreeMap<i64, i64> = dst
        .sorted_docs("app", "things")
        .into_iter()
        .map(|b| {
            let d = Document::from_reader(&b[..]).unwrap();
            (d.get_i64("_id").unwrap(), d.get_i64("v").unwrap())
        })
        .collect();
    assert_eq!(got.len(), expected.len(), "document count at the end point");
    assert!(
        got == expected,
        "restored data differs from the data at the end point"
    );
}

#[test]
fn a_gap_in_the_archive_is_reported_and_the_next_set_closes_it() {
    // A tiny oplog, so that writes made while the sidecar is down roll past the archive.
    let src = Mongo::start_args(&["--oplog-max-entries", "100"]);
    let repo = tempfile::tempdir().unwrap();
    seed(&src);
    let first = backup(repo.path(), &src.uri());
    let arch = Archiver::start(repo.path(), &src.uri());
    batch_one(&src);
    let (t1, i1) = last_write(&src);
    assert_archived_to(repo.path(), &first, (t1, i1), &arch);
    let _ = arch.stop();

    // Down for a while: far more writes than the oplog keeps.
    src.block(async {
        let c = src
            .client()
            .database("app")
            .collection::<Document>("things");
        for i in 0..600 {
            c.update_one(doc! {"_id": 200 + (i % 200)}, doc! {"$inc": {"v": 1}})
                .await
                .unwrap();
        }
    });
    let arch = Archiver::start(repo.path(), &src.uri());
    let gap = wait_until(Duration::from_secs(20), || {
        arch.alerts().iter().any(|a| a["alert"] == "pitr_gap") || arch.log().contains("pitr gap")
    });
    assert!(gap, "no gap reported:\n{}", arch.log());
    // The sidecar takes a new set at once; once it exists the gap closes.
    let closed = wait_until(Duration::from_secs(30), || {
        arch.metric("dbkeeper_pitr_gap") == Some(0.0)
            && !arch.alerts().iter().any(|a| a["alert"] == "pitr_gap")
    });
    assert!(closed, "the gap stayed open:\n{}", arch.log());
    let t = next_second();
    let _ = next_second();
    src.block(async {
        src.client()
            .database("app")
            .collection::<Document>("things")
            .insert_one(doc! {"_id": 77_777})
            .await
            .unwrap();
    });
    let at_t = snapshot(&src, "app");
    let (t2, i2) = last_write(&src);
    let sets: Vec<String> = {
        let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(sets.len(), 2, "{sets:?}\n{}", arch.log());
    let newest = sets[0].clone();
    assert_archived_to(repo.path(), &newest, (t2, i2), &arch);
    drop(arch);
    // The first set's window ends where the gap began.
    let end_first = parse_ts(&window_end(repo.path(), &first).unwrap());
    assert!(end_first < (t2, i2));

    // A point after the gap comes from the new set and the archive after it.
    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-oplog-ts", &format!("{t2}:{i2}")])
        .env("DBKEEPER_MONGODB_URI", dst.uri()));
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains(&format!("base={newest}")),
        "{}",
        stderr(&o)
    );
    assert!(snapshot(&dst, "app") == at_t);
    let _ = t;
}

#[test]
fn encrypted_segments_need_the_key_and_restore_with_it() {
    let src = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (identity, public) = crate::common::age_key(keys.path(), "key.txt");
    let identity = identity.to_string_lossy().into_owned();
    let age = [
        ("DBKEEPER_AGE_RECIPIENTS", public.as_str()),
        ("DBKEEPER_AGE_IDENTITY_FILE", identity.as_str()),
    ];
    seed(&src);
    let o = run(dbkeeper(repo.path())
        .arg("backup")
        .env("DBKEEPER_MONGODB_URI", src.uri())
        .envs(age));
    assert_code(&o, 0);
    let base = stdout(&o).trim().to_owned();
    let arch = Archiver::start_env(repo.path(), &src.uri(), &age);
    batch_one(&src);
    let (t, i) = last_write(&src);
    assert!(wait_until(Duration::from_secs(20), || {
        let o = run(dbkeeper(repo.path())
            .args(["list", "--pitr", "--json"])
            .envs(age));
        serde_json::from_str::<Value>(&stdout(&o))
            .ok()
            .and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|w| w["set"] == base.as_str())
                    .and_then(|w| w["to_ts"].as_str().map(parse_ts))
            })
            .is_some_and(|e| e >= (t, i))
    }));
    drop(arch);
    // Every segment is an age file; none holds a document in the clear.
    let mut segments = 0;
    for run_dir in std::fs::read_dir(repo.path().join("pitr/mongodb")).unwrap() {
        for f in std::fs::read_dir(run_dir.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let name = f.file_name().to_string_lossy().into_owned();
            if name.ends_with(".bson.zst.age") {
                segments += 1;
                let bytes = std::fs::read(f.path()).unwrap();
                assert!(bytes.starts_with(b"age-encryption.org/v1"), "{name}");
            }
        }
    }
    assert!(segments > 0);

    let dst = Mongo::start(false, false);
    let target = format!("{t}:{i}");
    // Without the key: one line, nothing restored.
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-oplog-ts", &target])
        .env("DBKEEPER_MONGODB_URI", dst.uri())
        .env("DBKEEPER_AGE_RECIPIENTS", &public));
    assert_ne!(code(&o), 0);
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));
    assert!(dst.databases().is_empty());
    let o = run(dbkeeper(repo.path())
        .args(["restore", "--to-oplog-ts", &target])
        .env("DBKEEPER_MONGODB_URI", dst.uri())
        .envs(age));
    assert_code(&o, 0);
    assert!(snapshot(&dst, "app") == snapshot(&src, "app"));
}

#[test]
fn the_archive_lives_in_a_bucket_too() {
    let Some(s3) = crate::common::s3::S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("pitr");
    let env: Vec<(String, String)> = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let repo = Path::new("s3://pitr/stack");
    let src = Mongo::start(false, false);
    seed(&src);
    let o = run(dbkeeper(repo)
        .arg("backup")
        .env("DBKEEPER_MONGODB_URI", src.uri())
        .envs(env.iter().copied()));
    assert_code(&o, 0);
    let base = stdout(&o).trim().to_owned();
    let arch = Archiver::start_env(repo, &src.uri(), &env);
    batch_one(&src);
    let (t, i) = last_write(&src);
    let reached = wait_until(Duration::from_secs(30), || {
        let o = run(dbkeeper(repo)
            .args(["list", "--pitr", "--json"])
            .envs(env.iter().copied()));
        serde_json::from_str::<Value>(&stdout(&o))
            .ok()
            .and_then(|v| {
                v.as_array()?
                    .iter()
                    .find(|w| w["set"] == base.as_str())
                    .and_then(|w| w["to_ts"].as_str().map(parse_ts))
            })
            .is_some_and(|e| e >= (t, i))
    });
    assert!(reached, "{}", arch.log());
    drop(arch);
    assert!(
        s3.list_keys("pitr")
            .iter()
            .any(|k| k.starts_with("stack/pitr/mongodb/") && k.ends_with(".bson.zst"))
    );
    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo)
        .args(["restore", "--to-oplog-ts", &format!("{t}:{i}")])
        .env("DBKEEPER_MONGODB_URI", dst.uri())
        .envs(env.iter().copied()));
    assert_code(&o, 0);
    assert!(snapshot(&dst, "app") == snapshot(&src, "app"));
}

#[test]
fn the_sidecar_stops_promptly_after_the_database_died() {
    let src = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    seed(&src);
    backup(repo.path(), &src.uri());
    let arch = Archiver::start(repo.path(), &src.uri());
    batch_one(&src);
    std::thread::sleep(Duration::from_millis(800));
    drop(src);
    // Long enough for the archiver to be reopening its cursor against the dead server.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    let log = arch.stop();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(6), "stop took {took:?}:\n{log}");
    assert!(!log.contains("did not stop"), "{log}");
    assert!(log.contains("sidecar stopped"), "{log}");
}
