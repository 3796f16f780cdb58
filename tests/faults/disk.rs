//! Full, read-only and vanishing repositories. The repository sits on a size-limited tmpfs (or
//! a read-only bind mount) mounted for the test: we run as root here and in CI. Where mounting
//! is impossible the tests skip saying why, except under `CI`, where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use mongodb::bson::{Binary, RawDocumentBuf, doc, spec::BinarySubtype};

use crate::common::chroma::{ChromaServer, SEED, py};
use crate::common::mongodb::{self as mongo, Mongo};
use crate::common::redis::RedisServer;
use crate::common::{assert_code, code, dbkeeper, noise, sets, stderr, temps, wait_until};
use crate::crash::Sidecar;
use crate::report;
use crate::secrets::{REDIS_PW, checked_output, one_error_line};

/// A mount made for a test, lazily unmounted on drop.
struct Mount {
    at: PathBuf,
}

impl Mount {
    /// `mount ARGS… AT`; None (after saying why) when it cannot be done outside CI.
    fn new(args: &[&str], at: &Path) -> Option<Mount> {
        let o = Command::new("mount").args(args).arg(at).output();
        match o {
            Ok(o) if o.status.success() => Some(Mount { at: at.to_owned() }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                let msg = format!(
                    "cannot mount {args:?} at {} ({why}): needs root",
                    at.display()
                );
                if std::env::var_os("CI").is_some() {
                    panic!("{msg}");
                }
                eprintln!("skipping: {msg}");
                None
            }
        }
    }

    /// A tmpfs of `size` (mount's syntax: `4m`).
    fn tmpfs(size: &str, at: &Path) -> Option<Mount> {
        Mount::new(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"], at)
    }

    /// `from` again at `at`, read-only.
    fn read_only(from: &Path, at: &Path) -> Option<Mount> {
        let m = Mount::new(&["--bind", &from.to_string_lossy()], at)?;
        let o = Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(at)
            .output()
            .unwrap();
        assert!(o.status.success(), "remount ro: {o:?}");
        Some(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).output();
    }
}

/// A failed backup on a full repository: exit 4, one line naming the lack of space, the temp
/// set removed, the older set intact.
#[track_caller]
fn full_backup_fails_cleanly(repo: &Path, o: &Output, old: &[String], secrets: &[&str]) {
    assert_code(o, 4);
    let line = one_error_line(o);
    assert!(
        line.to_lowercase().contains("space"),
        "the line does not say the disk is full: {line}"
    );
    assert!(temps(repo).is_empty(), "temps left: {:?}", temps(repo));
    assert_eq!(sets(repo), old, "the older sets changed");
    for id in old {
        let o = checked_output(dbkeeper(repo).args(["verify", id, "--deep"]), secrets);
        assert_code(&o, 0);
    }
}

/// Each engine's dump runs out of space half-way: exit 4, one line, no temp set, the older
/// set still verifies; the sidecar raises `last_run_failed` and `repository_low_space`.
#[test]
fn a_full_repository_fails_each_engine_cleanly_and_the_sidecar_says_so() {
    let mut tried = 0;
    let mut failures = Vec::new();
    let mut case = |name: &str, f: &mut dyn FnMut()| {
        tried += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = crate::report::panic_message(&*e);
            failures.push(format!("{name}: {msg}"));
        }
    };
    let base = tempfile::tempdir().unwrap();
    let repo = base.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let r = repo.as_path();
    // Every engine's data is incompressible and over 4 MB; the older sets are a few KB.
    let Some(_m) = Mount::tmpfs("4m", r) else {
        return;
    };

    let rs = RedisServer::with_password(REDIS_PW);
    let ms = Mongo::start(true, false);
    let cs = ChromaServer::start();
    let secrets = [REDIS_PW, mongo::PASSWORD];
    let with = |c: &mut Command, engine: &str| {
        match engine {
            "redis" => c.env("DBKEEPER_REDIS_URL", rs.url()),
            "mongodb" => c.env("DBKEEPER_MONGODB_URI", ms.uri()),
            _ => c.env("DBKEEPER_CHROMA_URL", cs.url()),
        };
    };
    let backup = |engine: &str| {
        let mut c = dbkeeper(r);
        with(&mut c, engine);
        c.args(["backup", "--only", engine]);
        checked_output(&mut c, &secrets)
    };

    for engine in ["redis", "mongodb", "chroma"] {
        case(&format!("disk/full-{engine}"), &mut || {
            // The older set: small.
            match engine {
                "redis" => {
                    rs.cli(&["SET", "small", "1"]);
                }
                "mongodb" => ms.insert("app", "small", vec![raw(doc! {"_id": 1})]),
                _ => {
                    py(
                        SEED,
                        &[
                            &cs.port.to_string(),
                            r#"[{"name":"small","space":"l2","dim":4,"n":10,"seed":1}]"#,
                        ],
                    );
                }
            }
            assert_code(&backup(engine), 0);
            let old = sets(r);
            // Then more than the filesystem holds.
            match engine {
                "redis" => {
                    let mut c = rs.client();
                    redis::cmd("SET")
                        .arg("big")
                        .arg(noise(6 << 20, 1))
                        .exec(&mut c)
                        .unwrap();
                }
                "mongodb" => ms.insert(
                    "app",
                    "big",
                    (0..24)
                        .map(|i| {
                            raw(doc! {"_id": i, "b": Binary { subtype: BinarySubtype::Generic, bytes: noise(512 << 10, i as u64 + 2) }})
                        })
                        .collect(),
                ),
                _ => {
                    py(
                        SEED,
                        &[
                            &cs.port.to_string(),
                            r#"[{"name":"big","space":"l2","dim":512,"n":3000,"seed":2,"docs":false,"meta":false}]"#,
                        ],
                    );
                }
            }
            let o = backup(engine);
            full_backup_fails_cleanly(r, &o, &old, &secrets);
        });
    }

    case("disk/full-sidecar", &mut || {
        // A filler so the free space is below DBKEEPER_MIN_FREE whatever the sets take.
        std::fs::write(r.join(".filler"), vec![1u8; 2 << 20]).unwrap();
        let old = sets(r);
        let url = rs.url();
        let sc = Sidecar::start(
            r,
            &[("DBKEEPER_REDIS_URL", &url), ("DBKEEPER_MIN_FREE", "50%")],
        );
        let (c, v) = sc.http("POST", "/backups", None);
        assert_eq!(c, 202, "{v}");
        let job = sc.wait_job(v["job"].as_str().unwrap());
        assert_eq!(job["status"], "failed", "{job}");
        let mut alerts = serde_json::Value::Null;
        let raised = wait_until(Duration::from_secs(10), || {
            alerts = sc.http("GET", "/alerts", None).1;
            let names: Vec<&str> = alerts["alerts"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["alert"].as_str()).collect())
                .unwrap_or_default();
            names.contains(&"last_run_failed") && names.contains(&"repository_low_space")
        });
        assert!(raised, "alerts: {alerts}\n{}", sc.log());
        let (log, out) = sc.stop();
        assert!(!log.contains("panicked"), "{log}");
        crate::secrets::assert_clean("the sidecar's stderr", log.as_bytes(), &secrets);
        crate::secrets::assert_clean("the sidecar's stdout", out.as_bytes(), &secrets);
        assert!(temps(r).is_empty(), "temps left: {:?}", temps(r));
        assert_eq!(sets(r), old);
        std::fs::remove_file(r.join(".filler")).unwrap();
    });
    report::record("disk/full", tried, tried - failures.len(), &failures);
    assert!(failures.is_empty(), "{failures:#?}");
}

fn raw(d: mongodb::bson::Document) -> RawDocumentBuf {
    RawDocumentBuf::from_document(&d).unwrap()
}

/// A repository mounted read-only: a backup fails with one line and exit 4; reading it (list,
/// verify, preseed) still works.
#[test]
fn a_read_only_repository() {
    let base = tempfile::tempdir().unwrap();
    let (rw, ro) = (base.path().join("rw"), base.path().join("ro"));
    std::fs::create_dir(&rw).unwrap();
    std::fs::create_dir(&ro).unwrap();
    let rs = RedisServer::with_password(REDIS_PW);
    rs.cli(&["DEBUG", "POPULATE", "1000"]);
    let secrets = [REDIS_PW];
    let run = |repo: &Path, args: &[&str], url: &str| {
        let mut c = dbkeeper(repo);
        c.env("DBKEEPER_REDIS_URL", url).args(args);
        checked_output(&mut c, &secrets)
    };
    assert_code(&run(&rw, &["backup"], &rs.url()), 0);
    let Some(_m) = Mount::read_only(&rw, &ro) else {
        return;
    };
    let mut failures = Vec::new();
    let o = run(&ro, &["backup"], &rs.url());
    if code(&o) != 4 {
        failures.push(format!("backup exit {}: {}", code(&o), stderr(&o)));
    }
    one_error_line(&o);
    let o = run(&ro, &["prune"], &rs.url());
    if code(&o) != 4 {
        failures.push(format!("prune exit {}: {}", code(&o), stderr(&o)));
    }
    for args in [&["list"][..], &["verify", "--deep"]] {
        let o = run(&ro, args, &rs.url());
        if code(&o) != 0 {
            failures.push(format!("{args:?} exit {}: {}", code(&o), stderr(&o)));
        }
    }
    let dst = RedisServer::with_password(REDIS_PW);
    let o = run(&ro, &["preseed"], &dst.url());
    if code(&o) != 0 || dst.digest() != rs.digest() {
        failures.push(format!("preseed exit {}: {}", code(&o), stderr(&o)));
    }
    report::record("disk/read-only", 5, 5 - failures.len(), &failures);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The repository directory removed or renamed under a running backup: one line, no panic,
/// exit 4 (a missing repository), and no set appears anywhere.
#[test]
fn a_repository_that_disappears_mid_run() {
    let rs = RedisServer::with_password(REDIS_PW);
    rs.cli(&["DEBUG", "POPULATE", "1500000", "key", "100"]);
    let secrets = [REDIS_PW];
    let mut failures = Vec::new();
    let hows = ["renamed", "removed", "renamed-early"];
    for how in hows {
        let base = tempfile::tempdir().unwrap();
        let repo = base.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let child = dbkeeper(&repo)
            .env("DBKEEPER_REDIS_URL", rs.url())
            .arg("backup")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = wait_until(Duration::from_secs(60), || {
            // Early: as soon as the temp set exists, before or while its files are created.
            (how == "renamed-early" && !temps(&repo).is_empty())
                || temps(&repo).iter().any(|t| {
                    repo.join(t)
                        .join("redis/dump.rdb.zst")
                        .metadata()
                        .is_ok_and(|m| m.len() > 0)
                })
        });
        assert!(started, "the backup never started writing");
        let gone = base.path().join("gone");
        match how {
            "removed" => std::fs::remove_dir_all(&repo).unwrap(),
            _ => std::fs::rename(&repo, &gone).unwrap(),
        }
        let o = child.wait_with_output().unwrap();
        crate::secrets::assert_output_clean(&o, &secrets);
        let err = stderr(&o);
        if err.contains("panicked") || code(&o) != 4 {
            failures.push(format!("{how}: exit {}: {err}", code(&o)));
            continue;
        }
        if let Err(e) = std::panic::catch_unwind(|| one_error_line(&o)) {
            failures.push(format!("{how}: {e:?}"));
        }
        if repo.exists() {
            failures.push(format!("{how}: the repository directory was created again"));
        }
        if gone.exists() && !sets(&gone).is_empty() {
            failures.push(format!("{how}: a set appeared in the moved directory"));
        }
    }
    report::record(
        "disk/vanished",
        hows.len(),
        hows.len() - failures.len(),
        &failures,
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
