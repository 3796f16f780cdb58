//! Configuration, usage, signals and repository safety of the binary, with hand-made sets
//! (no database needed).

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::common::*;

/// Writes a set that holds one Redis artifact with a correct manifest.
fn make_set(repo: &Path, id: &str) {
    let dir = repo.join(id);
    fs::create_dir_all(dir.join("redis")).unwrap();
    let raw = format!("payload of {id}").into_bytes();
    let compressed = zstd::encode_all(&raw[..], 3).unwrap();
    fs::write(dir.join("redis/dump.rdb.zst"), &compressed).unwrap();
    let manifest = serde_json::json!({
        "format": 1,
        "id": id,
        "tool": {"name": "dbkeeper", "version": "test"},
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "schema_version": null,
        "engines": {"redis": {
            "source": "redis://127.0.0.1:1",
            "server_version": "7.0.15",
            "started_at": "2026-01-01T00:00:00Z",
            "finished_at": "2026-01-01T00:00:01Z",
            "files": [{
                "path": "redis/dump.rdb.zst",
                "size": compressed.len(),
                "sha256": hex::encode(Sha256::digest(&compressed)),
                "raw_size": raw.len(),
            }],
            "counts": {"db0": 1},
        }},
    });
    fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
}

/// Flips one byte in the middle of a set's artifact.
fn corrupt_set(repo: &Path, id: &str) {
    let p = repo.join(id).join("redis/dump.rdb.zst");
    let mut bytes = fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&p, bytes).unwrap();
}

#[test]
fn missing_repository_is_exit_4_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(&dir.path().join("nope")).arg("list"));
    assert_code(&o, 4);
    let err = stderr(&o);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn configuration_errors_are_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    let pw = repo.join("pw");
    fs::write(&pw, "redis://:filepw@127.0.0.1:1\n").unwrap();
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["list"],
            vec![
                ("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1"),
                ("DBKEEPER_REDIS_URL_FILE", pw.to_str().unwrap()),
            ],
            "DBKEEPER_REDIS_URL_FILE",
        ),
        (
            vec!["list"],
            vec![("DBKEEPER_REDIS_URL", "http://127.0.0.1:1")],
            "must be a redis URL",
        ),
        (
            vec!["list"],
            vec![("DBKEEPER_REDIS_URL_FILE", "/definitely/not/here")],
            "cannot read",
        ),
        (vec!["wait", "--timeout", "10"], vec![], "duration"),
        (
            vec!["list"],
            vec![("DBKEEPER_KEEP_DAILY", "seven")],
            "KEEP_DAILY",
        ),
        (
            vec!["backup", "--only", "cassandra"],
            vec![],
            "unknown engine",
        ),
        (
            vec!["backup", "--only", "postgres"],
            vec![],
            "no postgres URL is configured",
        ),
        (
            vec!["backup", "--only", "mongodb"],
            vec![("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")],
            "no mongodb URL",
        ),
        (vec!["frobnicate"], vec![], "unrecognized subcommand"),
        (vec!["list"], vec![("DBKEEPER_LOG_FORMAT", "xml")], "xml"),
        (vec!["restore", "yesterday"], vec![], "not a set id"),
    ];
    for (args, env, needle) in cases {
        let mut cmd = dbkeeper(repo);
        cmd.args(&args).envs(env.iter().copied());
        let o = run(&mut cmd);
        assert_code(&o, 2);
        assert!(
            stderr(&o).contains(needle),
            "{args:?}: expected {needle:?} in {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("filepw"));
    }
}

/// A malformed `DBKEEPER_*` value is a configuration error that names the variable the
/// operator set, in one line, without clap's usage hint that blames a flag never typed.
#[test]
fn malformed_environment_values_name_the_variable_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str, &str, &str)] = &[
        // (args, variable, value, what the reason says)
        (&["wait"], "DBKEEPER_WAIT_TIMEOUT", "10", "not a duration"),
        (&["init"], "DBKEEPER_WAIT_TIMEOUT", "10", "not a duration"),
        (&["list"], "DBKEEPER_LOCK_LEASE", "3", "not a duration"),
        (&["list"], "DBKEEPER_KEEP_DAILY", "seven", "invalid digit"),
        (&["list"], "DBKEEPER_REMOTE_KEEP_LAST", "-1", "not in 0.."),
        (&["list"], "DBKEEPER_PARALLEL", "0", "zero"),
        (&["list"], "DBKEEPER_LIST_JSON", "yes", "true, false"),
        (&["list"], "DBKEEPER_LOG_FORMAT", "xml", "text, json"),
        (&["verify"], "DBKEEPER_VERIFY_DEEP", "sure", "true, false"),
        (
            &["migrate", "info"],
            "DBKEEPER_MIGRATE_ON_FAILURE",
            "undo",
            "restore, halt",
        ),
        (&["sidecar"], "DBKEEPER_ALERT_WINDOW", "5", "not a duration"),
        (
            &["sidecar"],
            "DBKEEPER_NOTIFY_ON",
            "never",
            "failure, always",
        ),
    ];
    for (args, var, value, why) in cases {
        let o = run(dbkeeper(dir.path()).args(*args).env(var, value));
        assert_code(&o, 2);
        let err = stderr(&o);
        let line = format!("dbkeeper: {var}=\"{value}\": ");
        assert!(err.starts_with(&line), "{args:?} {var}: {err}");
        assert!(err.contains(why), "{args:?} {var}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?} {var}: {err}");
        assert!(!err.contains("Usage") && !err.contains("--help"), "{err}");
    }
}

/// A bad flag keeps clap's report (the flag and a usage hint), even when its variable is set;
/// a good flag wins over a bad variable.
#[test]
fn a_bad_flag_is_reported_as_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for env in [None, Some("10")] {
        let mut cmd = dbkeeper(dir.path());
        cmd.args(["wait", "--timeout", "5"]);
        if let Some(v) = env {
            cmd.env("DBKEEPER_WAIT_TIMEOUT", v);
        }
        let o = run(&mut cmd);
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(err.contains("'--timeout <TIMEOUT>'"), "{err}");
        assert!(err.contains("'5'") && err.contains("--help"), "{err}");
        assert!(!err.contains("DBKEEPER_WAIT_TIMEOUT"), "{err}");
    }
    let o = run(dbkeeper(dir.path())
        .args(["list", "--log-format=xml"])
        .env("DBKEEPER_LOG_FORMAT", "json"));
    assert_code(&o, 2);
    assert!(stderr(&o).contains("--log-format"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("DBKEEPER_LOG_FORMAT"),
        "{}",
        stderr(&o)
    );

    let port = free_port();
    let o = run(dbkeeper(dir.path())
        .args([
            "wait",
            "--timeout",
            "1s",
            &format!("redis://127.0.0.1:{port}"),
        ])
        .env("DBKEEPER_WAIT_TIMEOUT", "10"));
    assert_code(&o, 3);
}

#[test]
fn help_and_errors_never_show_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(dir.path())
        .arg("--help")
        .env("DBKEEPER_REDIS_URL", "redis://:topsecret@127.0.0.1:1")
        .env("DBKEEPER_CHROMA_TOKEN", "tokensecret"));
    assert_code(&o, 0);
    let all = stdout(&o) + &stderr(&o);
    assert!(
        !all.contains("topsecret") && !all.contains("tokensecret"),
        "{all}"
    );
    assert!(all.contains("DBKEEPER_REDIS_URL_FILE"), "{all}");

    // A wrong scheme in a URL with a password: the message shows it redacted.
    let o = run(dbkeeper(dir.path())
        .arg("list")
        .env("DBKEEPER_MONGODB_URI", "redis://user:topsecret@127.0.0.1:1"));
    assert_code(&o, 2);
    assert!(!stderr(&o).contains("topsecret"), "{}", stderr(&o));
    assert!(stderr(&o).contains("***"), "{}", stderr(&o));
}

#[test]
fn wait_on_a_closed_port_is_exit_3_after_the_deadline_and_names_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://:hunter2@127.0.0.1:{port}");
    let o = run(dbkeeper(dir.path()).args(["wait", "--timeout", "1s", &url]));
    assert_code(&o, 3);
    let err = stderr(&o);
    assert!(err.contains("not ready after"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn sigterm_interrupts_a_one_shot_job_with_128_plus_15() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = dbkeeper(dir.path())
        .args([
            "wait",
            "--timeout",
            "60s",
            &format!("redis://127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 143);
}

#[test]
fn healthcheck_name_only_ever_exits_0_or_1() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dbkeeper-health");
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    let port = free_port();
    for args in [
        vec!["--bogus-flag".to_string()],
        vec![],
        vec!["ftp://example".to_string()],
        vec!["--timeout".to_string(), "soon".to_string()],
        vec![format!("redis://:pw123@127.0.0.1:{port}")],
    ] {
        let o = std::process::Command::new(&link)
            .args(&args)
            .env_remove("DBKEEPER_REDIS_URL")
            .env_remove("DBKEEPER_MONGODB_URI")
            .env_remove("DBKEEPER_CHROMA_URL")
            .output()
            .unwrap();
        assert_code(&o, 1);
        let out = stdout(&o);
        assert_eq!(out.trim().lines().count(), 1, "{args:?}: {out}");
        assert!(out.starts_with("unhealthy:"), "{out}");
        assert!(!out.contains("pw123"), "{out}");
    }
}

#[test]
fn list_shows_sets_newest_first_and_flags_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    make_set(repo, "2026-01-01_02-00-00");
    make_set(repo, "2026-01-02_02-00-00");
    fs::remove_file(repo.join("2026-01-02_02-00-00/redis/dump.rdb.zst")).unwrap();
    fs::create_dir(repo.join(".tmp-2026-01-03_02-00-00")).unwrap();
    fs::create_dir(repo.join("lost+found")).unwrap();

    let o = run(dbkeeper(repo).arg("list"));
    assert_code(&o, 0);
    let out = stdout(&o);
    let first = out.find("2026-01-02_02-00-00").unwrap();
    let second = out.find("2026-01-01_02-00-00").unwrap();
    assert!(first < second, "{out}");
    assert!(out.contains("CORRUPT"), "{out}");
    assert!(
        !out.contains(".tmp-") && !out.contains("lost+found"),
        "{out}"
    );

    let o = run(dbkeeper(repo).args(["list", "--json"]));
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let items = v.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["id"], "2026-01-02_02-00-00");
    assert!(items[0]["status"].as_str().unwrap().starts_with("corrupt"));
    // Only the manifest and the sizes were read: not `ok` until its checksums are verified.
    assert_eq!(items[1]["status"], "unverified");
    assert_eq!(items[1]["engines"]["redis"]["records"], 1);
}

#[test]
fn verify_checks_checksums_and_latest_names_a_corrupt_newest_set() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    make_set(repo, "2026-01-01_02-00-00");
    make_set(repo, "2026-01-02_02-00-00");
    corrupt_set(repo, "2026-01-02_02-00-00");

    let o = run(dbkeeper(repo).args(["verify", "2026-01-02_02-00-00"]));
    assert_code(&o, 4);
    assert!(stderr(&o).contains("checksum mismatch"), "{}", stderr(&o));

    // `latest` is the newest set, good or not: a corrupt one is reported, not skipped.
    let o = run(dbkeeper(repo).args(["verify", "latest"]));
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("2026-01-02_02-00-00") && stderr(&o).contains("newest"),
        "{}",
        stderr(&o)
    );
    let o = run(dbkeeper(repo).args(["verify", "2026-01-01_02-00-00"]));
    assert_code(&o, 0);

    // A manifest that does not parse is a corrupt set, not a crash.
    fs::write(repo.join("2026-01-01_02-00-00/manifest.json"), b"{not json").unwrap();
    let o = run(dbkeeper(repo).args(["verify", "2026-01-01_02-00-00"]));
    assert_code(&o, 4);
    let o = run(dbkeeper(repo).arg("verify"));
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("2 of 2 sets fail verification"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn prune_keeps_the_policy_and_never_the_corrupt_or_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    for d in 1..=5 {
        make_set(repo, &format!("2026-01-0{d}_02-00-00"));
    }
    corrupt_set(repo, "2026-01-05_02-00-00");

    let o = run(dbkeeper(repo)
        .args(["prune", "--dry-run"])
        .env("DBKEEPER_KEEP_DAILY", "0")
        .env("DBKEEPER_KEEP_LAST", "2"));
    assert_code(&o, 0);
    assert_eq!(sets(repo).len(), 5, "dry run deletes nothing");
    assert!(stdout(&o).contains("would delete 2026-01-01_02-00-00"));

    let o = run(dbkeeper(repo)
        .arg("prune")
        .env("DBKEEPER_KEEP_DAILY", "0")
        .env("DBKEEPER_KEEP_LAST", "2"));
    assert_code(&o, 0);
    // The corrupt newest neither counts nor is deleted; the two newest good ones stay.
    assert_eq!(
        sets(repo),
        vec![
            "2026-01-03_02-00-00",
            "2026-01-04_02-00-00",
            "2026-01-05_02-00-00"
        ]
    );
    assert!(temps(repo).is_empty(), "deletion leaves no temp behind");

    // A policy that keeps nothing still keeps the newest good set.
    let o = run(dbkeeper(repo)
        .arg("prune")
        .env("DBKEEPER_KEEP_DAILY", "1")
        .env("DBKEEPER_KEEP_LAST", "0"));
    assert_code(&o, 0);
    assert!(sets(repo).contains(&"2026-01-04_02-00-00".to_string()));
}

#[test]
fn a_held_lock_fails_a_second_writer_clearly_or_makes_it_wait() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().to_owned();
    make_set(&repo, "2026-01-01_02-00-00");
    fs::create_dir(repo.join(".tmp-2026-01-02_02-00-00")).unwrap();
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(repo.join(".lock"))
        .unwrap();
    lock.lock().unwrap();
    (&lock).write_all(b"pid 4242 since test").unwrap();

    let o = run(dbkeeper(&repo).arg("prune"));
    assert_code(&o, 4);
    let err = stderr(&o);
    assert!(err.contains("locked") && err.contains("4242"), "{err}");
    assert!(
        repo.join(".tmp-2026-01-02_02-00-00").exists(),
        "a writer without the lock must not touch temps"
    );

    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(lock);
    });
    let o = run(dbkeeper(&repo)
        .arg("prune")
        .env("DBKEEPER_LOCK_WAIT", "20s"));
    releaser.join().unwrap();
    assert_code(&o, 0);
    assert!(
        temps(&repo).is_empty(),
        "the lock holder removes stale temp sets"
    );
}
