//! Whole-repository operations killed at random moments: a backup of all three engines and its
//! `restore --force`, `prune`, the sidecar's run, a backup onto S3 and the off-host copy, and
//! migrations.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use super::engines::{CHROMA_SPEC, REDIS_KEYS, Target, backup_kills, mongo_populate};
use super::{Sidecar, every_set_verifies, kill_at, kills, measure, next_writer, run_killed, trim};
use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::{self as mongo, Mongo};
use crate::common::redis::RedisServer;
use crate::common::s3::S3Server;
use crate::common::{assert_code, dbkeeper, sets, temps};
use crate::secrets::{API_TOKEN, REDIS_PW, assert_clean, checked_output};

#[test]
fn a_backup_of_all_three_engines_and_its_restore_killed() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let secrets = [REDIS_PW, mongo::PASSWORD];
    let (rs, ms, cs) = (
        RedisServer::with_password(REDIS_PW),
        Mongo::start(true, false),
        ChromaServer::start(),
    );
    rs.cli(&["DEBUG", "POPULATE", "100000", "key", "100"]);
    mongo_populate(&ms, 8_000);
    py(SEED, &[&cs.port.to_string(), CHROMA_SPEC]);
    let srcs: [&dyn Target; 3] = [&rs, &ms, &cs];
    let want: Vec<String> = srcs.iter().map(|t| t.state().0).collect();
    let with_all = |c: &mut Command, ts: &[&dyn Target]| {
        for t in ts {
            t.env(c);
        }
    };
    let backup = || {
        let mut c = dbkeeper(r);
        with_all(&mut c, &srcs);
        c.arg("backup");
        c
    };
    backup_kills("crash/backup-all", r, &backup, &secrets);

    // restore --force of all three over targets holding their own data.
    let (rd, md, cd) = (
        RedisServer::with_password(REDIS_PW),
        Mongo::start(true, false),
        ChromaServer::start(),
    );
    let dsts: [&dyn Target; 3] = [&rd, &md, &cd];
    let reset = || {
        for t in dsts {
            t.wipe();
            t.own_data();
        }
    };
    reset();
    let old: Vec<String> = dsts.iter().map(|t| t.state().0).collect();
    let empty = ["0".repeat(40), "{}".to_owned(), String::new()];
    let restore = || {
        let mut c = dbkeeper(r);
        with_all(&mut c, &dsts);
        c.args(["restore", "--force"]);
        c
    };
    let preseed = || {
        let mut c = dbkeeper(r);
        with_all(&mut c, &dsts);
        c.arg("preseed");
        c
    };
    let dur = measure(&mut restore(), &secrets);
    kills("crash/restore-all", dur, |at| {
        reset();
        run_killed(&mut restore(), at, &secrets);
        let left: Vec<_> = (0..3)
            .map(|i| super::engines::classify(dsts[i], &want[i], &empty[i], Some(&old[i])))
            .collect();
        eprintln!("  left {left:?}");
        let o = checked_output(&mut preseed(), &secrets);
        assert_code(&o, 0);
        if left.contains(&super::engines::Left::Untouched) {
            let o = checked_output(&mut restore(), &secrets);
            assert_code(&o, 0);
        }
        for i in 0..3 {
            assert_eq!(dsts[i].state(), (want[i].clone(), false), "after {left:?}");
        }
    });
}

/// Copies a repository's sets as hard links (prune only renames and unlinks).
fn link_copy(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-al")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
}

#[test]
fn prune_killed() {
    let template = tempfile::tempdir().unwrap();
    let src = RedisServer::with_password(REDIS_PW);
    src.cli(&["DEBUG", "POPULATE", REDIS_KEYS, "key", "100"]);
    let secrets = [REDIS_PW];
    for i in 0..6 {
        src.cli(&["SET", "generation", &i.to_string()]);
        let mut c = dbkeeper(template.path());
        src.env(&mut c);
        assert_code(&checked_output(c.arg("backup"), &secrets), 0);
    }
    let all = sets(template.path());
    assert_eq!(all.len(), 6);
    let kept = all[4..].to_vec();
    let prune = |repo: &Path| {
        let mut c = dbkeeper(repo);
        c.env("DBKEEPER_KEEP_LAST", "2")
            .env("DBKEEPER_KEEP_DAILY", "0")
            .arg("prune");
        c
    };
    let measured = tempfile::tempdir().unwrap();
    link_copy(template.path(), measured.path());
    let dur = measure(&mut prune(measured.path()), &secrets);
    assert_eq!(sets(measured.path()), kept);
    kills("crash/prune", dur, |at| {
        let repo = tempfile::tempdir().unwrap();
        link_copy(template.path(), repo.path());
        run_killed(&mut prune(repo.path()), at, &secrets);
        let left = sets(repo.path());
        for k in &kept {
            assert!(left.contains(k), "a kept set is gone: {left:?}");
        }
        every_set_verifies(repo.path(), &secrets);
        next_writer(repo.path(), &mut prune(repo.path()), &secrets);
        assert_eq!(sets(repo.path()), kept);
    });
}

#[test]
fn the_sidecar_killed_during_its_run() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let src = RedisServer::with_password(REDIS_PW);
    src.cli(&["DEBUG", "POPULATE", REDIS_KEYS, "key", "100"]);
    let secrets = [REDIS_PW, API_TOKEN];
    let url = src.url();
    let env = [
        ("DBKEEPER_REDIS_URL", url.as_str()),
        ("DBKEEPER_API_TOKEN", API_TOKEN),
    ];
    let check_logs = |sc: Sidecar| {
        let (log, out) = sc.stop();
        assert!(!log.contains("panicked"), "{log}");
        assert_clean("the sidecar's stderr", log.as_bytes(), &secrets);
        assert_clean("the sidecar's stdout", out.as_bytes(), &secrets);
    };
    let sc = Sidecar::start(r, &env);
    let t = Instant::now();
    let (code, v) = sc.http("POST", "/backups", Some(API_TOKEN));
    assert_eq!(code, 202, "{v}");
    let job = sc.wait_job(v["job"].as_str().unwrap());
    let dur = t.elapsed();
    assert_eq!(job["status"], "succeeded", "{job}");
    check_logs(sc);
    kills("crash/sidecar", dur, |at| {
        let mut sc = Sidecar::start(r, &env);
        let (code, v) = sc.http("POST", "/backups", Some(API_TOKEN));
        assert_eq!(code, 202, "{v}");
        let killed = kill_at(sc.child(), at);
        eprintln!("  killed={killed}");
        check_logs(sc);
        every_set_verifies(r, &secrets);
        let mut c = dbkeeper(r);
        c.env("DBKEEPER_REDIS_URL", &url).arg("backup");
        next_writer(r, &mut c, &secrets);
        every_set_verifies(r, &secrets);
        trim(r, 1);
    });
}

/// Set prefixes on the store that have no manifest (incomplete sets), and open uploads.
fn s3_leftovers(s3: &S3Server, bucket: &str, prefix: &str) -> Vec<String> {
    let keys = s3.list_keys(bucket);
    let mut bad: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix(&format!("{prefix}/")))
        .filter_map(|k| k.split_once('/').map(|(d, _)| d))
        .filter(|d| d.starts_with("20"))
        .filter(|d| !keys.contains(&format!("{prefix}/{d}/manifest.json")))
        .map(str::to_owned)
        .collect();
    bad.dedup();
    bad.extend(s3.open_uploads(bucket));
    bad
}

#[test]
fn backups_onto_s3_and_the_off_host_copy_killed() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("crash");
    let src = RedisServer::with_password(REDIS_PW);
    src.cli(&["DEBUG", "POPULATE", REDIS_KEYS, "key", "100"]);
    let secrets = [REDIS_PW, s3.secret_key.as_str()];
    let s3_env = |c: &mut Command| {
        for (k, v) in s3.env() {
            c.env(k, v);
        }
        // A killed writer's lease runs out soon, so the next one is not kept waiting long.
        c.env("DBKEEPER_S3_REGION", "us-east-1")
            .env("DBKEEPER_LOCK_LEASE", "3s")
            .env("DBKEEPER_LOCK_WAIT", "60s");
    };
    let on_store = |repo: &str, args: &[&str]| {
        let mut c = dbkeeper(Path::new(repo));
        s3_env(&mut c);
        c.env("DBKEEPER_REPO", repo).args(args);
        c
    };
    let verify_all = |repo: &str| {
        let o = checked_output(&mut on_store(repo, &["list", "--json"]), &secrets);
        assert_code(&o, 0);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: Vec<String> = v
            .as_array()
            .or_else(|| v["sets"].as_array())
            .unwrap_or_else(|| panic!("list --json: {v}"))
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect();
        for id in &ids {
            let o = checked_output(&mut on_store(repo, &["verify", id, "--deep"]), &secrets);
            assert_code(&o, 0);
        }
        ids
    };

    // The repository itself on the store.
    let repo = "s3://crash/repo";
    let backup = || {
        let mut c = on_store(repo, &["backup"]);
        src.env(&mut c);
        c
    };
    let dur = measure(&mut backup(), &secrets);
    kills("crash/backup-s3", dur, |at| {
        run_killed(&mut backup(), at, &secrets);
        verify_all(repo);
        let o = checked_output(&mut backup(), &secrets);
        assert_code(&o, 0);
        let left = s3_leftovers(&s3, "crash", "repo");
        assert!(left.is_empty(), "left on the store: {left:?}");
        let ids = verify_all(repo);
        for id in &ids[..ids.len().saturating_sub(1)] {
            s3.rclone_ok(&["purge", &format!("s:crash/repo/{id}")]);
        }
    });

    // A local repository with its off-host copy on the store.
    let local = tempfile::tempdir().unwrap();
    let remote = "s3://crash/remote";
    let copy = || {
        let mut c = dbkeeper(local.path());
        s3_env(&mut c);
        src.env(&mut c);
        c.env("DBKEEPER_REMOTE", remote).arg("backup");
        c
    };
    let dur = measure(&mut copy(), &secrets);
    kills("crash/remote-s3", dur, |at| {
        run_killed(&mut copy(), at, &secrets);
        every_set_verifies(local.path(), &secrets);
        verify_all(remote);
        next_writer(local.path(), &mut copy(), &secrets);
        let left = s3_leftovers(&s3, "crash", "remote");
        assert!(left.is_empty(), "left on the store: {left:?}");
        let copied = verify_all(remote);
        assert!(
            copied.contains(sets(local.path()).last().unwrap()),
            "the newest set was not copied: {copied:?}"
        );
        trim(local.path(), 1);
    });
}

#[test]
fn a_migration_killed() {
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let files = tempfile::tempdir().unwrap();
    let d = files.path().join("redis");
    std::fs::create_dir_all(&d).unwrap();
    // Not idempotent: a half-applied file run again would count twice.
    let mut body = String::from("INCR app:runs\n");
    for i in 0..20_000 {
        body.push_str(&format!("SET mig:{i} \"value {i}\"\nINCR app:counter\n"));
    }
    std::fs::write(d.join("V1__load.redis"), body).unwrap();
    std::fs::write(d.join("V2__rename.redis"), "RENAME mig:0 mig:first\n").unwrap();
    let secrets = [REDIS_PW];
    let t = RedisServer::with_password(REDIS_PW);
    let reset = || {
        t.cli(&["FLUSHALL"]);
        t.cli(&["DEBUG", "POPULATE", "20000", "key", "50"]);
    };
    // The migrated data, the history (times and durations differ) left out.
    let migrated = || {
        assert_eq!(t.cli(&["HLEN", "dbkeeper_schema_history"]), "2");
        assert_eq!(t.cli(&["EXISTS", "dbkeeper_schema_lock"]), "0", "lock left");
        t.cli(&["DEL", "dbkeeper_schema_history"]);
        t.digest()
    };
    let migrate = || {
        let mut c = dbkeeper(r);
        t.env(&mut c);
        c.env("DBKEEPER_MIGRATIONS", files.path()).arg("migrate");
        c
    };
    reset();
    let dur = measure(&mut migrate(), &secrets);
    let want = migrated();
    assert_eq!(t.cli(&["GET", "app:runs"]), "1");
    kills("crash/migrate", dur, |at| {
        reset();
        run_killed(&mut migrate(), at, &secrets);
        // The lease of a killed migrator runs out by itself (30 s); shown bounded, then ended
        // here rather than waited for.
        let pttl: i64 = t.cli(&["PTTL", "dbkeeper_schema_lock"]).parse().unwrap();
        assert!(
            pttl == -2 || (0..=30_000).contains(&pttl),
            "lock PTTL {pttl}"
        );
        t.cli(&["DEL", "dbkeeper_schema_lock"]);
        every_set_verifies(r, &secrets);
        let o = checked_output(&mut migrate(), &secrets);
        assert_code(&o, 0);
        assert!(temps(r).is_empty(), "{:?}", temps(r));
        assert_eq!(migrated(), want);
        trim(r, 2);
    });
}

#[test]
fn a_mongodb_migration_killed() {
    use mongodb::bson::doc;
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    let files = tempfile::tempdir().unwrap();
    let d = files.path().join("mongodb");
    std::fs::create_dir_all(&d).unwrap();
    // Many commands, and not idempotent: a half-applied file run again would count twice.
    let mut cmds = vec![serde_json::json!({
        "update": "meta",
        "updates": [{"q": {"_id": "runs"}, "u": {"$inc": {"n": 1}}, "upsert": true}],
    })];
    for b in 0..300 {
        let docs: Vec<_> = (0..40)
            .map(|i| serde_json::json!({"_id": b * 40 + i, "v": format!("value {b} {i}")}))
            .collect();
        cmds.push(serde_json::json!({"insert": "things", "documents": docs}));
    }
    cmds.push(serde_json::json!({
        "createIndexes": "things",
        "indexes": [{"key": {"v": 1}, "name": "v_1"}],
    }));
    std::fs::write(
        d.join("V1__load.json"),
        serde_json::to_string(&cmds).unwrap(),
    )
    .unwrap();
    let secrets = [mongo::PASSWORD];
    let t = Mongo::start(true, false);
    let uri = t.uri().replacen("/?", "/app?", 1);
    let reset = || {
        t.wipe();
        mongo_populate(&t, 2_000);
    };
    // The migrated data: every collection but the history (times differ) and the lock.
    let migrated = || {
        let lock = t.block(async {
            t.client()
                .database("app")
                .collection::<mongodb::bson::Document>("dbkeeper_schema_lock")
                .count_documents(doc! {})
                .await
        });
        assert_eq!(lock.unwrap(), 0, "the lock was left");
        let mut out = Vec::new();
        for db in t.databases() {
            for (name, _) in t.collections(&db) {
                if !name.starts_with("dbkeeper_schema") && !name.starts_with("system.") {
                    out.push((format!("{db}.{name}"), t.sorted_docs(&db, &name)));
                }
            }
        }
        out
    };
    let migrate = || {
        let mut c = dbkeeper(r);
        c.env("DBKEEPER_MONGODB_URI", &uri)
            .env("DBKEEPER_MIGRATIONS", files.path())
            .arg("migrate");
        c
    };
    reset();
    let dur = measure(&mut migrate(), &secrets);
    let want = migrated();
    kills("crash/migrate-mongodb", dur, |at| {
        reset();
        run_killed(&mut migrate(), at, &secrets);
        // A killed migrator's lease runs out by itself (30 s): shown bounded, then ended here
        // rather than waited for.
        let lock = t.block(async {
            t.client()
                .database("app")
                .collection::<mongodb::bson::Document>("dbkeeper_schema_lock")
                .find_one_and_delete(doc! {})
                .await
        });
        if let Some(l) = lock.unwrap() {
            let expires = l.get_datetime("expires_at").unwrap().timestamp_millis();
            let now = mongodb::bson::DateTime::now().timestamp_millis();
            assert!(expires <= now + 30_000, "a lease beyond 30 s: {l}");
        }
        every_set_verifies(r, &secrets);
        let o = checked_output(&mut migrate(), &secrets);
        assert_code(&o, 0);
        assert!(temps(r).is_empty(), "{:?}", temps(r));
        assert!(migrated() == want, "the migrated data differs");
        trim(r, 2);
    });
}
