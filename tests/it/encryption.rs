//! age encryption in a local repository: what is stored and readable without the key, the
//! passphrase mode, deep verify and restores with the right, a wrong or no key, and the
//! configuration errors.

use std::path::Path;
use std::process::Output;

use crate::common::redis::RedisServer;
use crate::common::{age_key, assert_code, dbkeeper, run, sets, stderr, stdout};

#[track_caller]
fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dbkeeper:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("AGE-SECRET-KEY"),
        "{err}"
    );
    lines[0].to_owned()
}

/// Every file of a set, relative to it.
fn files(set: &Path) -> Vec<String> {
    fn walk(d: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), base, out);
            } else {
                out.push(
                    e.path()
                        .strip_prefix(base)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    let mut v = Vec::new();
    walk(set, set, &mut v);
    v.sort();
    v
}

#[test]
fn a_passphrase_set_holds_its_own_identity_and_opens_only_with_the_passphrase() {
    let repo = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not it\n").unwrap();
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "2000"]);
    let digest = r.digest();
    let dk = |p: &Path| {
        let mut c = dbkeeper(repo.path());
        c.env("DBKEEPER_REDIS_URL", r.url())
            .env("DBKEEPER_AGE_PASSPHRASE_FILE", p);
        c
    };
    let o = run(dk(&pass).arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();
    assert_eq!(
        files(&repo.path().join(&id)),
        vec![
            "identity.age",
            "manifest.json",
            "manifest.json.age",
            "manifest.json.sha256",
            "redis/0001.zst.age"
        ]
    );
    let public = std::fs::read_to_string(repo.path().join(&id).join("manifest.json")).unwrap();
    assert!(public.contains("\"scrypt\""), "{public}");
    assert!(
        !public.contains("dump.rdb") && !public.contains("\"db0\""),
        "{public}"
    );

    assert_code(&run(dk(&pass).args(["verify", "--deep"])), 0);
    // The wrong passphrase: checksums still verify; data does not open (exit 1, one line).
    assert_code(&run(dk(&wrong).arg("verify")), 0);
    let o = run(dk(&wrong).args(["verify", "--deep"]));
    assert_code(&o, 1);
    assert!(one_error_line(&o).contains(&id));
    r.cli(&["FLUSHALL"]);
    let o = run(dk(&wrong).arg("preseed"));
    assert_code(&o, 1);
    assert!(one_error_line(&o).contains("passphrase"));
    assert_eq!(r.total_keys(), 0, "nothing may be written to the target");
    let o = run(dk(&pass).arg("preseed"));
    assert_code(&o, 0);
    assert_eq!(r.digest(), digest);
}

#[test]
fn keys_without_recipients_cannot_back_up_and_bad_keys_are_configuration_errors() {
    let repo = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (identity, public) = age_key(tmp.path(), "key.txt");
    let r = RedisServer::start();
    r.cli(&["SET", "k", "v"]);

    // An identity alone can restore, not write: a plain set where an encrypted one was
    // expected would leak the data.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_AGE_IDENTITY_FILE", &identity)
        .arg("backup"));
    assert_code(&o, 2);
    assert!(one_error_line(&o).contains("DBKEEPER_AGE_RECIPIENTS"));
    assert!(sets(repo.path()).is_empty());

    for (var, value) in [
        ("DBKEEPER_AGE_RECIPIENTS", "age1notakey"),
        (
            "DBKEEPER_AGE_RECIPIENTS",
            std::fs::read_to_string(&identity)
                .unwrap()
                .lines()
                .find(|l| l.starts_with("AGE-SECRET-KEY"))
                .unwrap(),
        ),
    ] {
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", r.url())
            .env(var, value)
            .arg("backup"));
        assert_code(&o, 2);
        one_error_line(&o);
    }
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_AGE_RECIPIENTS", &public)
        .env("DBKEEPER_AGE_PASSPHRASE_FILE", &identity)
        .arg("backup"));
    assert_code(&o, 2);
    one_error_line(&o);
    assert!(sets(repo.path()).is_empty());
}

/// A sealed set that is damaged is caught by checksums like a plain one, and `list` shows
/// sealed sets with their sizes whether or not the host has the key.
#[test]
fn sealed_sets_list_and_verify_without_the_key_and_damage_is_caught() {
    let repo = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (identity, public) = age_key(tmp.path(), "key.txt");
    let r = RedisServer::start();
    r.cli(&["DEBUG", "POPULATE", "500"]);
    let with_key = || {
        let mut c = dbkeeper(repo.path());
        c.env("DBKEEPER_REDIS_URL", r.url())
            .env("DBKEEPER_AGE_RECIPIENTS", &public)
            .env("DBKEEPER_AGE_IDENTITY_FILE", &identity);
        c
    };
    let o = run(with_key().arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();

    let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["status"], "unverified");
    assert_eq!(v[0]["encrypted"], true);
    assert!(v[0]["bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        v[0]["engines"]["redis"]["records"], 0,
        "counts need the key"
    );
    let o = run(with_key().args(["list", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["engines"]["redis"]["records"], 500);
    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);

    // One flipped byte in the ciphertext: checksum verify fails (exit 4) with or without the
    // key, and so does a deep verify.
    let art = repo.path().join(&id).join("redis/0001.zst.age");
    let mut b = std::fs::read(&art).unwrap();
    let i = b.len() / 2;
    b[i] ^= 1;
    std::fs::write(&art, &b).unwrap();
    let o = run(dbkeeper(repo.path()).args(["verify", &id]));
    assert_code(&o, 4);
    assert!(one_error_line(&o).contains("checksum"));
    assert_code(&run(with_key().args(["verify", "--deep", &id])), 4);
}
