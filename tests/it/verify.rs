//! `verify` of every set, of the newest and of one; the verification record beside the sets
//! that `list` shows (and `list --verify` refreshes); "newest" versus "newest good": what
//! `verify latest` reports and what `restore latest` and `preseed` use. Sets come from real
//! Redis backups, local and (when SeaweedFS is installed) in a bucket.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chrono::{DateTime, Utc};

use crate::common::redis::RedisServer;
use crate::common::s3::S3Server;
use crate::common::{assert_code, dbkeeper, run, sets, stderr, stdout};

fn with_url(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_REDIS_URL", url);
    c
}

/// `n` sets of one Redis server; set `i` (oldest first) holds `i + 1` keys.
fn make_sets(repo: &Path, n: usize) -> (RedisServer, Vec<String>) {
    let r = RedisServer::start();
    let mut ids = Vec::new();
    for i in 0..n {
        r.cli(&["SET", &format!("key:{i}"), "v"]);
        let o = run(with_url(repo, &r.url()).arg("backup"));
        assert_code(&o, 0);
        ids.push(stdout(&o).trim().to_owned());
    }
    (r, ids)
}

fn artifact(repo: &Path, id: &str) -> PathBuf {
    repo.join(id).join("redis/dump.rdb.zst")
}

/// Flips one byte in the middle of a set's artifact: same size, wrong checksum.
fn flip(bytes: &mut [u8]) {
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
}

fn corrupt(repo: &Path, id: &str) {
    let p = artifact(repo, id);
    let mut b = std::fs::read(&p).unwrap();
    flip(&mut b);
    std::fs::write(&p, b).unwrap();
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn listed<'a>(list: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {list}"))
}

fn verified_at(set: &serde_json::Value) -> DateTime<Utc> {
    set["verified"]["at"]
        .as_str()
        .unwrap_or_else(|| panic!("no verification time: {set}"))
        .parse()
        .unwrap()
}

/// The line of `verify`'s output about `id`.
fn line_of(out: &str, id: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no line for {id}:\n{out}"))
        .to_owned()
}

#[test]
fn verify_checks_every_set_and_names_each_bad_one_and_only_them() {
    let repo = tempfile::tempdir().unwrap();
    let (_r, ids) = make_sets(repo.path(), 4);
    corrupt(repo.path(), &ids[0]);
    corrupt(repo.path(), &ids[2]);

    let o = run(dbkeeper(repo.path()).arg("verify"));
    assert_code(&o, 4);
    let out = stdout(&o);
    for (i, id) in ids.iter().enumerate() {
        let line = line_of(&out, id);
        if i == 0 || i == 2 {
            assert!(line.contains("BAD") && line.contains("checksum"), "{line}");
        } else {
            assert!(line.contains(" ok "), "{line}");
        }
    }
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("2 of 4 sets fail verification"), "{err}");
    assert!(err.contains(&ids[0]) && err.contains(&ids[2]), "{err}");
    assert!(!err.contains(&ids[1]) && !err.contains(&ids[3]), "{err}");

    let o = run(dbkeeper(repo.path()).args(["verify", "--json"]));
    assert_code(&o, 4);
    let v = json(&o);
    let bad: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(bad, [ids[2].as_str(), ids[0].as_str()], "newest first: {v}");
    assert_eq!(v.as_array().unwrap().len(), 4);

    // One good set by id, and a bad one by id.
    assert_code(&run(dbkeeper(repo.path()).args(["verify", &ids[1]])), 0);
    let o = run(dbkeeper(repo.path()).args(["verify", &ids[2]]));
    assert_code(&o, 4);
    assert!(stderr(&o).contains(&ids[2]), "{}", stderr(&o));

    // Every set good again: exit 0.
    for id in [&ids[0], &ids[2]] {
        corrupt(repo.path(), id);
    }
    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);
}

#[test]
fn verify_latest_reports_a_corrupt_newest_set_while_restore_and_preseed_use_the_newest_good() {
    let repo = tempfile::tempdir().unwrap();
    let (_r, ids) = make_sets(repo.path(), 3);
    assert_code(&run(dbkeeper(repo.path()).args(["verify", "latest"])), 0);
    corrupt(repo.path(), &ids[2]);

    let o = run(dbkeeper(repo.path()).args(["verify", "latest"]));
    assert_code(&o, 4);
    let err = stderr(&o);
    assert!(
        err.contains(&ids[2]) && err.contains("newest set fails verification"),
        "{err}"
    );
    assert!(line_of(&stdout(&o), &ids[2]).contains("BAD"));

    // restore latest and preseed skip it: set 1 (two keys) is the newest good set.
    let dst = RedisServer::start();
    let o = run(with_url(repo.path(), &dst.url()).args(["restore", "latest"]));
    assert_code(&o, 0);
    assert_eq!(dst.total_keys(), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains(&ids[2]), "the skipped set is named");

    let fresh = RedisServer::start();
    let o = run(with_url(repo.path(), &fresh.url()).arg("preseed"));
    assert_code(&o, 0);
    assert_eq!(fresh.total_keys(), 2, "{}", stderr(&o));
}

#[test]
fn list_shows_never_verified_then_when_and_how_each_set_was_verified() {
    let repo = tempfile::tempdir().unwrap();
    let (_r, ids) = make_sets(repo.path(), 2);

    let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
    assert_code(&o, 0);
    let v = json(&o);
    for id in &ids {
        let s = listed(&v, id);
        assert_eq!(s["status"], "unverified", "{s}");
        assert_eq!(s["verified"], serde_json::Value::Null, "{s}");
        assert_eq!(s["verified_text"], "never verified", "{s}");
    }
    let o = run(dbkeeper(repo.path()).arg("list"));
    assert_code(&o, 0);
    assert!(!stdout(&o).contains(" ok "), "{}", stdout(&o));
    assert!(line_of(&stdout(&o), &ids[0]).contains("never verified"));

    // `verify ID` records that set only.
    let before = Utc::now() - chrono::TimeDelta::seconds(1);
    assert_code(&run(dbkeeper(repo.path()).args(["verify", &ids[0]])), 0);
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    let s = listed(&v, &ids[0]);
    assert_eq!(s["status"], "ok", "{s}");
    assert_eq!(s["verified"]["level"], "checksums", "{s}");
    assert_eq!(s["verified"]["ok"], true, "{s}");
    let at = verified_at(s);
    assert!(at >= before && at <= Utc::now(), "{s}");
    assert!(
        s["verified_text"]
            .as_str()
            .unwrap()
            .starts_with("verified ")
            && s["verified_text"]
                .as_str()
                .unwrap()
                .ends_with(" (checksums)"),
        "{s}"
    );
    assert_eq!(listed(&v, &ids[1])["verified_text"], "never verified");
    let out = stdout(&run(dbkeeper(repo.path()).arg("list")));
    let line = line_of(&out, &ids[0]);
    assert!(
        line.contains(" ok ") && line.contains("(checksums)"),
        "{out}"
    );

    // --deep is recorded as such.
    assert_code(
        &run(dbkeeper(repo.path()).args(["verify", "--deep", &ids[0]])),
        0,
    );
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    assert_eq!(listed(&v, &ids[0])["verified"]["level"], "deep");

    // `list --verify` checks (and records) every set now.
    let o = run(dbkeeper(repo.path()).args(["list", "--verify", "--json"]));
    assert_code(&o, 0);
    let v = json(&o);
    for id in &ids {
        assert_eq!(listed(&v, id)["status"], "ok");
        assert_eq!(listed(&v, id)["verified"]["level"], "checksums");
    }

    // A set damaged since: `list` alone cannot see a flipped byte and keeps the last
    // verdict with its time; `list --verify` finds it, records it and exits 4.
    corrupt(repo.path(), &ids[1]);
    let o = run(dbkeeper(repo.path()).args(["list", "--verify"]));
    assert_code(&o, 4);
    let out = stdout(&o);
    let line = line_of(&out, &ids[1]);
    assert!(
        line.contains("BAD") && line.contains("FAILED verification"),
        "{out}"
    );
    assert!(stderr(&o).contains(&ids[1]), "{}", stderr(&o));
    assert!(!stderr(&o).contains(&ids[0]), "{}", stderr(&o));
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    let s = listed(&v, &ids[1]);
    assert!(
        s["status"]
            .as_str()
            .unwrap()
            .starts_with("failed verification"),
        "{s}"
    );
    assert_eq!(s["verified"]["ok"], false, "{s}");

    // The set's own files are untouched by all this: its manifest still checks the same.
    let manifest = std::fs::read(repo.path().join(&ids[0]).join("manifest.json")).unwrap();
    assert_code(&run(dbkeeper(repo.path()).args(["verify", &ids[0]])), 0);
    assert_eq!(
        std::fs::read(repo.path().join(&ids[0]).join("manifest.json")).unwrap(),
        manifest
    );
    let mut files: Vec<String> = std::fs::read_dir(repo.path().join(&ids[0]))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["manifest.json", "manifest.json.sha256", "redis"]);
}

#[test]
fn a_record_is_not_a_set_and_goes_with_its_set_on_prune() {
    let repo = tempfile::tempdir().unwrap();
    let (_r, ids) = make_sets(repo.path(), 3);
    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);
    let records = |repo: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(repo.join(".verified"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let want: Vec<String> = ids.iter().map(|i| format!("{i}.json")).collect();
    assert_eq!(records(repo.path()), want);
    // The records are no set.
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    assert_eq!(v.as_array().unwrap().len(), 3, "{v}");

    // The record of a set deleted by hand, and a write interrupted before its rename: the
    // next writer sweeps both.
    std::fs::copy(
        repo.path()
            .join(".verified")
            .join(format!("{}.json", ids[0])),
        repo.path().join(".verified/2020-01-01_00-00-00.json"),
    )
    .unwrap();
    std::fs::write(
        repo.path().join(".verified/.tmp-2020-01-01_00-00-01.json"),
        b"{",
    )
    .unwrap();

    let o = run(dbkeeper(repo.path())
        .arg("prune")
        .env("DBKEEPER_KEEP_DAILY", "0")
        .env("DBKEEPER_KEEP_LAST", "1"));
    assert_code(&o, 0);
    assert_eq!(sets(repo.path()), [ids[2].clone()], "{}", stdout(&o));
    assert_eq!(records(repo.path()), [format!("{}.json", ids[2])]);
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["status"], "ok", "the kept set's record survived: {v}");
    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);
}

#[test]
fn verify_and_records_work_the_same_in_a_bucket() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("verify");
    let url = "s3://verify/repo";
    let dk = || {
        let mut c = dbkeeper(Path::new("/nonexistent"));
        c.env("DBKEEPER_REPO", url)
            .env("DBKEEPER_S3_ENDPOINT", &s3.endpoint)
            .env("DBKEEPER_S3_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key);
        c
    };
    let r = RedisServer::start();
    let mut ids = Vec::new();
    for i in 0..3 {
        r.cli(&["SET", &format!("key:{i}"), "v"]);
        let o = run(dk().env("DBKEEPER_REDIS_URL", r.url()).arg("backup"));
        assert_code(&o, 0);
        ids.push(stdout(&o).trim().to_owned());
    }
    let v = json(&run(dk().args(["list", "--json"])));
    assert_eq!(listed(&v, &ids[0])["verified_text"], "never verified");

    let key = format!("repo/{}/redis/dump.rdb.zst", ids[1]);
    let mut b = s3.get("verify", &key);
    flip(&mut b);
    s3.put("verify", &key, &b);

    let o = run(dk().arg("verify"));
    assert_code(&o, 4);
    let err = stderr(&o);
    assert!(err.contains("1 of 3") || err.contains(&ids[1]), "{err}");
    assert!(err.contains(&ids[1]), "{err}");
    assert!(!err.contains(&ids[0]) && !err.contains(&ids[2]), "{err}");

    let v = json(&run(dk().args(["list", "--json"])));
    assert_eq!(listed(&v, &ids[0])["status"], "ok", "{v}");
    assert_eq!(listed(&v, &ids[1])["verified"]["ok"], false, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 3, "records are no sets: {v}");
    let rec = |id: &str| format!("repo/.verified/{id}.json");
    assert!(s3.list_keys("verify").contains(&rec(&ids[0])));
    // A record whose set is gone is swept by the next writer.
    let orphan = rec("2020-01-01_00-00-00");
    s3.put("verify", &orphan, &s3.get("verify", &rec(&ids[0])));

    // Prune deletes the oldest good set, and its record with it; the corrupt one is left
    // for an operator, with its record.
    let o = run(dk()
        .arg("prune")
        .env("DBKEEPER_KEEP_DAILY", "0")
        .env("DBKEEPER_KEEP_LAST", "1"));
    assert_code(&o, 0);
    let keys = s3.list_keys("verify");
    assert!(!keys.contains(&rec(&ids[0])), "{keys:?}");
    assert!(keys.contains(&rec(&ids[1])), "{keys:?}");
    assert!(keys.contains(&rec(&ids[2])), "{keys:?}");
    assert!(!keys.contains(&orphan), "{keys:?}");
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with(&format!("repo/{}/", ids[0])))
    );
}

#[test]
fn bad_ids_and_an_empty_repository_get_their_exit_codes() {
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path()).arg("verify"));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("no backup sets"), "{}", stdout(&o));
    let o = run(dbkeeper(repo.path()).args(["verify", "--json"]));
    assert_code(&o, 0);
    assert_eq!(json(&o), serde_json::json!([]));
    for (args, want) in [
        (vec!["verify", "latest"], 4),
        (vec!["verify", "2026-01-01_00-00-00"], 4),
        (vec!["verify", "yesterday"], 2),
        (vec!["list", "--verify", "--pitr"], 2),
    ] {
        let o = run(dbkeeper(repo.path()).args(&args));
        assert_code(&o, want);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if want == 4 {
            assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("dbkeeper: "), "{args:?}: {err}");
        }
    }
    // Nothing was written into the repository by failing or empty verifies.
    assert!(std::fs::read_dir(repo.path()).unwrap().next().is_none());
}

#[test]
fn a_test_restore_of_every_engine_is_recorded_and_a_failed_one_is_not() {
    let repo = tempfile::tempdir().unwrap();
    let (r, ids) = make_sets(repo.path(), 2);
    let scratch = RedisServer::start();
    let o = run(with_url(repo.path(), &r.url()).args([
        "test-restore",
        &ids[0],
        "--into",
        &scratch.url(),
    ]));
    assert_code(&o, 0);
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    let s = listed(&v, &ids[0]);
    assert_eq!(s["status"], "ok", "{s}");
    assert_eq!(s["verified"]["level"], "deep", "{s}");
    assert_eq!(listed(&v, &ids[1])["verified_text"], "never verified");

    // A test-restore that fails (a damaged set) records nothing.
    corrupt(repo.path(), &ids[1]);
    let o = run(with_url(repo.path(), &r.url()).args([
        "test-restore",
        &ids[1],
        "--into",
        &scratch.url(),
    ]));
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json(&run(dbkeeper(repo.path()).args(["list", "--json"])));
    assert_eq!(listed(&v, &ids[1])["verified_text"], "never verified");
}

#[test]
fn verify_remote_checks_and_records_the_off_host_copy_on_its_own() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("offhost");
    let local = tempfile::tempdir().unwrap();
    let r = RedisServer::start();
    let host = || {
        let mut c = with_url(local.path(), &r.url());
        c.env("DBKEEPER_REMOTE", "s3://offhost/copy")
            .env("DBKEEPER_S3_ENDPOINT", &s3.endpoint)
            .env("DBKEEPER_S3_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", &s3.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key)
            .env("DBKEEPER_KEEP_DAILY", "0")
            .env("DBKEEPER_KEEP_LAST", "5")
            .env("DBKEEPER_REMOTE_KEEP_DAILY", "0")
            .env("DBKEEPER_REMOTE_KEEP_LAST", "5");
        c
    };
    let mut ids = Vec::new();
    for i in 0..2 {
        r.cli(&["SET", &format!("key:{i}"), "v"]);
        let o = run(host().arg("backup"));
        assert_code(&o, 0);
        ids.push(stdout(&o).trim().to_owned());
    }
    let key = format!("copy/{}/redis/dump.rdb.zst", ids[0]);
    assert!(
        s3.list_keys("offhost").contains(&key),
        "{:?}",
        s3.list_keys("offhost")
    );
    let mut b = s3.get("offhost", &key);
    flip(&mut b);
    s3.put("offhost", &key, &b);

    let o = run(host().args(["verify", "--remote"]));
    assert_code(&o, 4);
    let err = stderr(&o);
    assert!(err.contains("1 of 2") && err.contains(&ids[0]), "{err}");
    assert!(!err.contains(&ids[1]), "{err}");
    // The repository's own copies are whole and were not judged by that.
    let v = json(&run(host().args(["list", "--json"])));
    assert_eq!(listed(&v, &ids[0])["verified_text"], "never verified");
    assert_code(&run(host().arg("verify")), 0);

    let v = json(&run(host().args(["list", "--remote", "--json"])));
    assert_eq!(listed(&v, &ids[0])["verified"]["ok"], false, "{v}");
    assert_eq!(listed(&v, &ids[1])["status"], "ok", "{v}");
    let o = run(host().args(["verify", "--remote", "latest"]));
    assert_code(&o, 0);
}
