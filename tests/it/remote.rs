//! Object storage and encryption end to end: every engine backed up to a real S3-compatible
//! store (SeaweedFS) with and without age, the off-host copy and disaster recovery on a new
//! host, stock tools (rclone, age, zstd) on what dbkeeper wrote and the other way round, and
//! the faults: the store killed mid-upload, wrong credentials, a missing bucket, damaged
//! objects, two sidecars on one bucket, a dead lock holder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::chroma::{COMPARE, ChromaServer, SEED, py};
use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::s3::S3Server;
use crate::common::{
    age_key, assert_code, code, dbkeeper, free_port, noise, run, stderr, stdout, wait_until,
};

/// A `dbkeeper` command whose repository is `repo` (a path or `s3://…`), with the store's
/// endpoint and credentials.
fn dk(s3: &S3Server, repo: &str) -> Command {
    let mut c = dbkeeper(Path::new("/nonexistent"));
    c.env("DBKEEPER_REPO", repo)
        .env("DBKEEPER_S3_ENDPOINT", &s3.endpoint)
        .env("DBKEEPER_S3_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", &s3.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &s3.secret_key);
    c
}

/// One line of error output (the contract for every failure), and no secret in it.
#[track_caller]
fn one_line_error(o: &Output, s3: &S3Server) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("dbkeeper:") || l.contains("panicked"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for s in [stdout(o), err.clone()] {
        assert!(!s.contains(&s3.secret_key), "secret leaked:\n{s}");
    }
    lines[0].to_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Every object key of a bucket, as the store lists it.
fn keys(s3: &S3Server, bucket: &str) -> Vec<String> {
    s3.list_keys(bucket)
}

/// Encryption settings: (recipients, identity file) or none.
fn with_keys<'a>(c: &'a mut Command, keys: Option<&(PathBuf, String)>) -> &'a mut Command {
    if let Some((identity, public)) = keys {
        c.env("DBKEEPER_AGE_RECIPIENTS", public)
            .env("DBKEEPER_AGE_IDENTITY_FILE", identity);
    }
    c
}

#[test]
fn redis_backs_up_to_a_bucket_and_restores_bit_exact_plain_and_encrypted() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("redis");
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "20000", "key", "64"]);
    r.cli(&["HSET", "db0:customer:42", "name", "Ada", "plan", "pro"]);
    r.cli(&["EXPIRE", "key:7", "86400"]);
    let digest = r.digest();
    let tmp = tempfile::tempdir().unwrap();
    let key = age_key(tmp.path(), "key.txt");

    for (name, keys) in [("plain", None), ("sealed", Some(&key))] {
        let repo = format!("s3://redis/{name}");
        let o =
            run(with_keys(dk(&s3, &repo).env("DBKEEPER_REDIS_URL", r.url()), keys).arg("backup"));
        assert_code(&o, 0);
        let id = stdout(&o).trim().to_owned();

        let list = run(with_keys(&mut dk(&s3, &repo), keys).args(["list", "--json"]));
        assert_code(&list, 0);
        let sets = json(&list);
        assert_eq!(sets.as_array().unwrap().len(), 1, "{sets}");
        assert_eq!(sets[0]["id"], id.as_str());
        assert_eq!(sets[0]["status"], "unverified");
        assert_eq!(sets[0]["encrypted"], keys.is_some());
        assert_eq!(sets[0]["engines"]["redis"]["records"], 20001);

        let stored = keys_under(&s3, "redis", &format!("{name}/{id}/"));
        if keys.is_some() {
            // Opaque names, the full manifest sealed, no key or db name readable.
            assert!(
                stored.contains(&"redis/0001.zst.age".to_owned()),
                "{stored:?}"
            );
            assert!(
                stored.contains(&"manifest.json.age".to_owned()),
                "{stored:?}"
            );
            let public = s3.get("redis", &format!("{name}/{id}/manifest.json"));
            let text = String::from_utf8(public).unwrap();
            // (Quoted: a bare "db0" can turn up inside a hex checksum.)
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(
                v["engines"]["redis"]["counts"],
                serde_json::json!({}),
                "{text}"
            );
            for secret in ["\"db0\"", "dump.rdb", "127.0.0.1"] {
                assert!(!text.contains(secret), "{secret} readable in:\n{text}");
            }
            assert!(text.contains("x25519:"), "{text}");
            assert!(
                !text.contains(&s3.secret_key) && !text.contains(&s3.access_key),
                "{text}"
            );
        } else {
            assert!(
                stored.contains(&"redis/dump.rdb.zst".to_owned()),
                "{stored:?}"
            );
        }

        assert_code(
            &run(with_keys(&mut dk(&s3, &repo), keys).args(["verify", "--deep"])),
            0,
        );
        r.cli(&["FLUSHALL"]);
        let o = run(
            with_keys(dk(&s3, &repo).env("DBKEEPER_REDIS_URL", r.url()), keys)
                .args(["restore", "latest"]),
        );
        assert_code(&o, 0);
        assert_eq!(r.digest(), digest, "{name}: restored data differs");
    }

    // A write-only host (recipients, no identity) checks checksums but cannot decrypt; a
    // restore fails in one line naming the set's recipients and writes nothing.
    let repo = "s3://redis/sealed";
    let write_only = |c: &mut Command| {
        c.env("DBKEEPER_AGE_RECIPIENTS", &key.1);
    };
    let mut c = dk(&s3, repo);
    write_only(&mut c);
    assert_code(&run(c.arg("verify")), 0);
    let mut c = dk(&s3, repo);
    write_only(&mut c);
    let o = run(c.args(["verify", "--deep"]));
    assert_code(&o, 1);
    assert!(
        one_line_error(&o, &s3).contains("x25519:"),
        "{}",
        stderr(&o)
    );
    r.cli(&["FLUSHALL"]);
    let mut c = dk(&s3, repo);
    write_only(&mut c);
    let o = run(c
        .env("DBKEEPER_REDIS_URL", r.url())
        .args(["restore", "latest"]));
    assert_code(&o, 1);
    let line = one_line_error(&o, &s3);
    assert!(line.contains("x25519:"), "{line}");
    assert_eq!(r.total_keys(), 0, "a failed restore wrote to the target");

    // A wrong identity: the same, naming the recipients.
    let other = age_key(tmp.path(), "other.txt");
    let o = run(dk(&s3, repo)
        .env("DBKEEPER_AGE_RECIPIENTS", &other.1)
        .env("DBKEEPER_AGE_IDENTITY_FILE", &other.0)
        .env("DBKEEPER_REDIS_URL", r.url())
        .args(["restore", "latest"]));
    assert_code(&o, 1);
    assert!(one_line_error(&o, &s3).contains("x25519:"));
    assert_eq!(r.total_keys(), 0, "a failed restore wrote to the target");
}

/// Object keys below `prefix`, relative to it.
fn keys_under(s3: &S3Server, bucket: &str, prefix: &str) -> Vec<String> {
    keys(s3, bucket)
        .into_iter()
        .filter_map(|k| k.strip_prefix(prefix).map(str::to_owned))
        .collect()
}

#[test]
fn mongodb_backs_up_to_a_bucket_and_restores_bit_exact_plain_and_encrypted() {
    use mongodb::bson::{RawDocumentBuf, doc};
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("mongo");
    let m = Mongo::start(false, false);
    let docs: Vec<RawDocumentBuf> = (0..3000)
        .map(|i| {
            RawDocumentBuf::from_document(&doc! {"_id": i, "name": format!("user {i}"), "tags": ["a", "b"], "score": i as f64 / 7.0})
                .unwrap()
        })
        .collect();
    m.insert("shop", "customers", docs);
    m.insert(
        "shop",
        "orders",
        vec![RawDocumentBuf::from_document(&doc! {"_id": 1, "total": 9.5}).unwrap()],
    );
    let before = (
        m.sorted_docs("shop", "customers"),
        m.sorted_docs("shop", "orders"),
    );
    let tmp = tempfile::tempdir().unwrap();
    let key = age_key(tmp.path(), "key.txt");
    for (name, keys) in [("plain", None), ("sealed", Some(&key))] {
        let repo = format!("s3://mongo/{name}");
        let o =
            run(with_keys(dk(&s3, &repo).env("DBKEEPER_MONGODB_URI", m.uri()), keys).arg("backup"));
        assert_code(&o, 0);
        let id = stdout(&o).trim().to_owned();
        if keys.is_some() {
            let stored = keys_under(&s3, "mongo", &format!("{name}/{id}/"));
            assert!(
                stored
                    .iter()
                    .all(|k| !k.contains("shop") && !k.contains("customers")),
                "stored names reveal the data: {stored:?}"
            );
        }
        assert_code(
            &run(with_keys(&mut dk(&s3, &repo), keys).args(["verify", "--deep"])),
            0,
        );
        let o = run(
            with_keys(dk(&s3, &repo).env("DBKEEPER_MONGODB_URI", m.uri()), keys)
                .args(["restore", "latest", "--force"]),
        );
        assert_code(&o, 0);
        assert_eq!(
            (
                m.sorted_docs("shop", "customers"),
                m.sorted_docs("shop", "orders")
            ),
            before,
            "{name}: restored documents differ"
        );
    }
}

#[test]
fn chroma_backs_up_to_a_bucket_and_restores_plain_and_encrypted() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("chroma");
    let spec = r#"[{"name":"notes","space":"cosine","dim":16,"n":400,"seed":3,"metadata":{"k":"v"}},
{"name":"other","space":"l2","dim":4,"n":30,"seed":4,"docs":false}]"#;
    let src = ChromaServer::start();
    py(SEED, &[&src.port.to_string(), spec]);
    let tmp = tempfile::tempdir().unwrap();
    let key = age_key(tmp.path(), "key.txt");
    for (name, keys) in [("plain", None), ("sealed", Some(&key))] {
        let repo = format!("s3://chroma/{name}");
        let o = run(
            with_keys(dk(&s3, &repo).env("DBKEEPER_CHROMA_URL", src.url()), keys).arg("backup"),
        );
        assert_code(&o, 0);
        assert_code(
            &run(with_keys(&mut dk(&s3, &repo), keys).args(["verify", "--deep"])),
            0,
        );
        let dst = ChromaServer::start();
        let o = run(
            with_keys(dk(&s3, &repo).env("DBKEEPER_CHROMA_URL", dst.url()), keys).arg("preseed"),
        );
        assert_code(&o, 0);
        let out = py(
            COMPARE,
            &[&src.port.to_string(), &dst.port.to_string(), spec],
        );
        assert!(out.contains("OK"), "{name}: {out}");
    }
}

#[test]
fn a_new_host_preseeds_from_the_remote_and_the_remote_keeps_its_own_retention() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("offsite");
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "5000"]);
    let digest = r.digest();
    let tmp = tempfile::tempdir().unwrap();
    let key = age_key(tmp.path(), "key.txt");
    let local = tmp.path().join("backups");
    std::fs::create_dir(&local).unwrap();
    let remote = "s3://offsite/stack";
    let host = |repo: &Path| {
        let mut c = dk(&s3, repo.to_str().unwrap());
        c.env("DBKEEPER_REMOTE", remote)
            .env("DBKEEPER_REDIS_URL", r.url())
            .env("DBKEEPER_REMOTE_KEEP_LAST", "2")
            .env("DBKEEPER_REMOTE_KEEP_DAILY", "0")
            .env("DBKEEPER_KEEP_LAST", "5");
        with_keys(&mut c, Some(&key));
        c
    };
    // Three backups: each is verified locally and copied; the remote keeps its 2 newest.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let o = run(host(&local).arg("backup"));
        assert_code(&o, 0);
        ids.push(stdout(&o).trim().to_owned());
    }
    let o = run(host(&local).args(["list", "--remote", "--json"]));
    assert_code(&o, 0);
    let there: Vec<String> = json(&o)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        there,
        vec![ids[2].clone(), ids[1].clone()],
        "remote retention"
    );
    assert_code(&run(host(&local).args(["verify", "--remote", "--deep"])), 0);

    // A new host: the backup directory is empty (or not even mounted), Redis is empty.
    for new_local in [tmp.path().join("empty"), tmp.path().join("not-mounted")] {
        if new_local.ends_with("empty") {
            std::fs::create_dir(&new_local).unwrap();
        }
        r.cli(&["FLUSHALL"]);
        let o = run(host(&new_local).arg("preseed"));
        assert_code(&o, 0);
        assert_eq!(r.digest(), digest, "preseed from the remote");
        assert!(
            stderr(&o).contains(&ids[2]),
            "the preseed should name the remote set: {}",
            stderr(&o)
        );
    }
}

#[test]
fn stock_tools_read_what_dbkeeper_wrote_and_dbkeeper_reads_what_they_copied() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("stock");
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "3000"]);
    let tmp = tempfile::tempdir().unwrap();
    let key = age_key(tmp.path(), "key.txt");
    let o = run(with_keys(
        dk(&s3, "s3://stock/enc").env("DBKEEPER_REDIS_URL", r.url()),
        Some(&key),
    )
    .arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();

    // rclone fetches the set; the README's recipe decrypts and decompresses every file.
    let fetched = tmp.path().join("fetched");
    s3.rclone_ok(&[
        "copy",
        &format!("s:stock/enc/{id}"),
        fetched.to_str().unwrap(),
    ]);
    let out = tmp.path().join("plain");
    std::fs::create_dir(&out).unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{}", readme_recipe()))
        .env("SET", &fetched)
        .env("KEY", &key.0)
        .env("OUT", &out)
        .output()
        .unwrap();
    assert!(o.status.success(), "recipe: {o:?}");
    let rdb = out.join("redis/dump.rdb");
    let check = Command::new("redis-check-rdb").arg(&rdb).output().unwrap();
    assert!(
        check.status.success(),
        "redis-check-rdb: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let loaded = RedisServer::on_dir(
        &{
            let d = tmp.path().join("loaded");
            std::fs::create_dir(&d).unwrap();
            std::fs::copy(&rdb, d.join("dump.rdb")).unwrap();
            d
        },
        false,
    );
    assert_eq!(loaded.digest(), r.digest());

    // The other way: a set copied into a bucket by rclone (here a plain one from a local
    // repository) reads, verifies and restores as any other.
    let local = tmp.path().join("local");
    std::fs::create_dir(&local).unwrap();
    let o = run(dbkeeper(&local)
        .env("DBKEEPER_REDIS_URL", r.url())
        .arg("backup"));
    assert_code(&o, 0);
    let id2 = stdout(&o).trim().to_owned();
    s3.rclone_ok(&[
        "copy",
        local.join(&id2).to_str().unwrap(),
        &format!("s:stock/copied/{id2}"),
    ]);
    assert_code(
        &run(dk(&s3, "s3://stock/copied").args(["verify", "--deep", &id2])),
        0,
    );
    r.cli(&["FLUSHALL"]);
    let o = run(dk(&s3, "s3://stock/copied")
        .env("DBKEEPER_REDIS_URL", r.url())
        .args(["restore", &id2]));
    assert_code(&o, 0);
    assert_eq!(r.total_keys(), 3000);
}

/// The README's recipe for an encrypted set, run as written: the bash block that starts with
/// `# recover an encrypted set`.
fn readme_recipe() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .split("```bash\n")
        .find(|b| b.starts_with("# recover an encrypted set"))
        .and_then(|b| b.split("```").next())
        .expect("the README's recipe for an encrypted set")
        .to_owned()
}

/// A Redis whose backup uploads for a few seconds: 192 MiB of values that do not compress.
fn big_redis() -> RedisServer {
    let r = RedisServer::start();
    let mut c = r.client();
    for i in 0..192 {
        let value = noise(1 << 20, 0x2545_f491_4f6c_dd1d + i);
        redis::cmd("SET")
            .arg(format!("big:{i}"))
            .arg(value)
            .query::<()>(&mut c)
            .unwrap();
    }
    r
}

#[test]
fn the_store_killed_mid_upload_fails_the_run_and_leaves_nothing_open() {
    let Some(mut s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("fault");
    let r = big_redis();
    let repo = "s3://fault/p";
    // A short lease: the dead run cannot release its lock, so the next one waits it out.
    let mut child = dk(&s3, repo)
        .env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_LOCK_LEASE", "3s")
        .arg("backup")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the store once the upload is under way (some part has arrived).
    let started = wait_until(Duration::from_secs(60), || {
        !s3.open_uploads("fault").is_empty() || child.try_wait().unwrap().is_some()
    });
    assert!(started, "the upload never started");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the backup ended before the kill: raise the data size"
    );
    s3.kill();
    let o = child.wait_with_output().unwrap();
    assert_ne!(code(&o), 0, "a backup whose store died must fail");
    assert_code(&o, 4);
    let line = one_line_error(&o, &s3);
    assert!(line.contains("fault"), "{line}");

    s3.restart();
    // Nothing became visible, and the next run cleans up and succeeds.
    let o = run(dk(&s3, repo).args(["list", "--json"]));
    assert_code(&o, 0);
    assert_eq!(json(&o).as_array().unwrap().len(), 0, "{}", stdout(&o));
    let o = run(dk(&s3, repo)
        .env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_LOCK_WAIT", "30s")
        .arg("backup"));
    assert_code(&o, 0);
    assert!(
        s3.open_uploads("fault").is_empty(),
        "multipart uploads left open: {:?}",
        s3.open_uploads("fault")
    );
    let id = stdout(&o).trim().to_owned();
    let sets: Vec<String> = keys(&s3, "fault")
        .into_iter()
        .filter(|k| k.starts_with("p/20"))
        .map(|k| k.split('/').nth(1).unwrap().to_owned())
        .collect();
    assert!(
        sets.iter().all(|s| *s == id),
        "objects of the failed set remain: {sets:?}"
    );
}

#[test]
fn wrong_credentials_and_a_missing_bucket_fail_in_one_line_with_exit_4() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("present");
    let o = run(dk(&s3, "s3://absent/x").arg("list"));
    assert_code(&o, 4);
    let line = one_line_error(&o, &s3);
    assert!(line.contains("absent") && line.contains("create"), "{line}");

    let o = run(dk(&s3, "s3://present/x")
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
        .arg("list"));
    assert_code(&o, 4);
    let line = one_line_error(&o, &s3);
    assert!(!line.contains("not-the-secret-at-all"), "{line}");
    assert!(line.to_lowercase().contains("credential"), "{line}");

    // A malformed URL is a configuration error.
    let o = run(dk(&s3, "s3://").arg("list"));
    assert_code(&o, 2);
}

#[test]
fn a_damaged_object_is_caught_and_preseed_falls_back_to_the_previous_set() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("damage");
    let r = RedisServer::start();
    r.cli(&["SET", "version", "old"]);
    let repo = "s3://damage/p";
    let o = run(dk(&s3, repo)
        .env("DBKEEPER_REDIS_URL", r.url())
        .arg("backup"));
    assert_code(&o, 0);
    let old = stdout(&o).trim().to_owned();
    std::thread::sleep(Duration::from_millis(1100));
    r.cli(&["SET", "version", "new"]);
    let o = run(dk(&s3, repo)
        .env("DBKEEPER_REDIS_URL", r.url())
        .arg("backup"));
    assert_code(&o, 0);
    let new = stdout(&o).trim().to_owned();
    assert_ne!(old, new);

    let object = format!("p/{new}/redis/dump.rdb.zst");
    let good = s3.get("damage", &object);
    for (what, bad) in [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("bit-flipped", {
            let mut b = good.clone();
            let i = b.len() / 3;
            b[i] ^= 0x40;
            b
        }),
    ] {
        s3.put("damage", &object, &bad);
        let o = run(dk(&s3, repo).args(["verify", &new]));
        assert_code(&o, 4);
        assert!(one_line_error(&o, &s3).contains(&new), "{what}");
        r.cli(&["FLUSHALL"]);
        let o = run(dk(&s3, repo)
            .env("DBKEEPER_REDIS_URL", r.url())
            .arg("preseed"));
        assert_code(&o, 0);
        assert!(
            stderr(&o).contains(&new),
            "{what}: the skip is not named: {}",
            stderr(&o)
        );
        assert_eq!(r.cli(&["GET", "version"]), "old", "{what}");
    }
}

fn sidecar(s3: &S3Server, repo: &str, r: &RedisServer, port: u16) -> Command {
    let mut c = dk(s3, repo);
    c.env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_LISTEN", format!("127.0.0.1:{port}"))
        .env("DBKEEPER_SCHEDULE", "0 3 1 1 *")
        .arg("sidecar")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// SIGTERM, as `docker stop`: the sidecar releases its locks.
fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-s", "-m", "10", "-X", method, "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn two_sidecars_on_one_bucket_and_a_dead_holder_whose_lease_expires() {
    let Some(s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("shared");
    let r = RedisServer::start();
    let repo = "s3://shared/stack";
    let p1 = free_port();
    let mut first = sidecar(&s3, repo, &r, p1)
        .env("DBKEEPER_LOCK_LEASE", "3s")
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || http(p1, "GET", "/health").0
            != 0),
        "the first sidecar never answered"
    );
    let o = sidecar(&s3, repo, &r, free_port()).output().unwrap();
    assert_code(&o, 4);
    let line = one_line_error(&o, &s3);
    assert!(line.contains("locked by") && line.contains("pid"), "{line}");

    // The holder dies without releasing: its lease runs out and a new sidecar takes over.
    first.kill().unwrap();
    first.wait().unwrap();
    let t = Instant::now();
    let p2 = free_port();
    let mut second = sidecar(&s3, repo, &r, p2)
        .env("DBKEEPER_LOCK_WAIT", "30s")
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(40), || {
        http(p2, "GET", "/health").0 != 0
    });
    let _ = second.kill();
    let _ = second.wait();
    assert!(up, "the lock of a dead holder was never taken over");
    assert!(t.elapsed() < Duration::from_secs(35));
}

#[test]
fn a_failed_copy_to_the_remote_never_blocks_local_backups_and_is_retried() {
    let Some(mut s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("remote");
    let r = RedisServer::start();
    r.cli(&["SET", "a", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let local = tmp.path().to_str().unwrap().to_owned();
    let port = free_port();
    let sc = sidecar(&s3, &local, &r, port)
        .env("DBKEEPER_REMOTE", "s3://remote/copy")
        .env("DBKEEPER_REMOTE_MAX_AGE", "1h")
        .env("DBKEEPER_KEEP_LAST", "10")
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || http(
        port, "GET", "/health"
    )
    .0 == 200));
    let run_job = || {
        let (st, body) = http(port, "POST", "/backups");
        assert_eq!(st, 202, "{body}");
        let job: serde_json::Value = serde_json::from_str(&body).unwrap();
        let id = job["job"].as_str().unwrap().to_owned();
        let mut last = serde_json::Value::Null;
        assert!(wait_until(Duration::from_secs(60), || {
            last = serde_json::from_str(&http(port, "GET", &format!("/jobs/{id}")).1)
                .unwrap_or_default();
            matches!(
                last["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        }));
        last
    };
    let first = run_job();
    assert_eq!(first["status"], "succeeded", "{first}");
    let metrics = http(port, "GET", "/metrics").1;
    assert!(
        metrics.contains("dbkeeper_remote_uploaded_sets_total 1"),
        "{metrics}"
    );

    // The store goes away: the local backup still succeeds, the copy fails and says so.
    s3.kill();
    let second = run_job();
    assert_eq!(second["status"], "succeeded", "{second}");
    assert!(second["remote_error"].is_string(), "{second}");
    let alerts = http(port, "GET", "/alerts").1;
    assert!(alerts.contains("remote_copy_failed"), "{alerts}");
    let metrics = http(port, "GET", "/metrics").1;
    assert!(
        metrics.contains("dbkeeper_remote_failures_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dbkeeper_remote_up_to_date 0"),
        "{metrics}"
    );
    assert_eq!(crate::common::sets(tmp.path()).len(), 2);

    // Back: the next run copies its own set and the one that failed.
    s3.restart();
    std::thread::sleep(Duration::from_millis(1100));
    let third = run_job();
    assert_eq!(third["status"], "succeeded", "{third}");
    assert!(third["remote_error"].is_null(), "{third}");
    let metrics = http(port, "GET", "/metrics").1;
    assert!(
        metrics.contains("dbkeeper_remote_uploaded_sets_total 3"),
        "{metrics}"
    );
    let alerts = http(port, "GET", "/alerts").1;
    assert!(!alerts.contains("remote_copy_failed"), "{alerts}");
    stop(sc);

    // A remote whose newest set is too old makes /health 503 (remote_stale).
    let port = free_port();
    let sc = sidecar(&s3, &local, &r, port)
        .env("DBKEEPER_REMOTE", "s3://remote/copy")
        .env("DBKEEPER_REMOTE_MAX_AGE", "1s")
        .spawn()
        .unwrap();
    let stale = wait_until(Duration::from_secs(30), || {
        let (st, body) = http(port, "GET", "/health");
        st == 503 && body.contains("DBKEEPER_REMOTE_MAX_AGE")
    });
    let alerts = http(port, "GET", "/alerts").1;
    stop(sc);
    assert!(stale, "a stale remote did not make /health 503");
    assert!(alerts.contains("remote_stale"), "{alerts}");
}

/// A private endpoint over HTTPS: its CA in `DBKEEPER_S3_CA_FILE` is what makes it trusted.
#[test]
fn a_private_https_endpoint_is_trusted_through_its_ca_bundle() {
    let Some(mut s3) = S3Server::start_or_skip() else {
        return;
    };
    s3.create_bucket("tls");
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certs(certs.path());
    let https = s3.serve_tls(certs.path());
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);
    let tls = |ca: bool| {
        let mut c = dk(&s3, "s3://tls/p");
        c.env("DBKEEPER_S3_ENDPOINT", &https)
            .env("DBKEEPER_REDIS_URL", r.url());
        if ca {
            c.env("DBKEEPER_S3_CA_FILE", certs.path().join("ca.crt"));
        }
        c
    };
    let o = run(tls(false).arg("backup"));
    assert_code(&o, 4);
    let line = one_line_error(&o, &s3);
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    let o = run(tls(true).arg("backup"));
    assert_code(&o, 0);
    assert_code(&run(tls(true).args(["verify", "--deep"])), 0);
}
