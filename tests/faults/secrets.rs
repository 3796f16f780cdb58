//! Secrets never reach output: every `dbkeeper` process the fault suite runs has its stdout and
//! stderr scanned for the secrets it was given (passwords, tokens, the S3 secret key, the age
//! passphrase), raw and percent-encoded. This module's test runs failing and succeeding
//! commands with secrets in URLs, env and `_FILE`s and asserts none appears.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::redis::RedisServer;
use crate::common::{assert_code, dbkeeper, free_port, stderr, stdout};
use crate::report;

/// The Redis password the fault suite gives its servers.
pub const REDIS_PW: &str = "Crash-Redis-pw:9@Q";
/// The sidecar API token.
pub const API_TOKEN: &str = "Crash-api-t0ken-77";
/// A Chroma token.
pub const CHROMA_TOKEN: &str = "Crash-chroma-tok-31";
/// An age passphrase.
pub const AGE_PASSPHRASE: &str = "Crash-age-passphrase-ÿ-5";

/// Every form a secret could take in output: as given and percent-encoded (URLs).
fn forms(secret: &str) -> Vec<String> {
    let mut v = vec![secret.to_owned()];
    let enc: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    if enc != secret {
        v.push(enc);
    }
    let pct = percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    if !v.contains(&pct) {
        v.push(pct);
    }
    v
}

/// The first of `secrets` found in `bytes`, in any of its forms.
pub fn find_leak(bytes: &[u8], secrets: &[&str]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    secrets
        .iter()
        .flat_map(|s| forms(s))
        .find(|f| text.contains(f.as_str()))
}

/// Panics when `bytes` (what a process printed, named `what`) holds any of `secrets`.
#[track_caller]
pub fn assert_clean(what: &str, bytes: &[u8], secrets: &[&str]) {
    if let Some(f) = find_leak(bytes, secrets) {
        panic!(
            "a secret ({f:?}) reached {what}:\n{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// Panics when either stream of `o` holds any of `secrets`.
#[track_caller]
pub fn assert_output_clean(o: &Output, secrets: &[&str]) {
    assert_clean("stdout", &o.stdout, secrets);
    assert_clean("stderr", &o.stderr, secrets);
}

/// Runs `cmd` to its end and checks both streams for `secrets`.
#[track_caller]
pub fn checked_output(cmd: &mut Command, secrets: &[&str]) -> Output {
    let o = cmd.output().expect("run dbkeeper");
    assert_output_clean(&o, secrets);
    o
}

/// One `dbkeeper:` line on stderr, no panic: the contract for every failure.
#[track_caller]
pub fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dbkeeper:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line:\n{err}");
    lines[0].to_owned()
}

fn with_redis(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_REDIS_URL", url);
    c
}

/// Failing and succeeding commands, each given secrets: none is printed, in any form.
#[test]
fn no_secret_reaches_any_output() {
    let mut tried = 0;
    let mut failures = Vec::new();
    let mut case = |name: &str, f: &mut dyn FnMut()| {
        tried += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let msg = crate::report::panic_message(&*e);
            failures.push(format!("{name}: {msg}"));
        }
    };
    let repo = tempfile::tempdir().unwrap();
    let r = RedisServer::with_password(REDIS_PW);
    r.cli(&["SET", "k", "v"]);
    let all = [REDIS_PW, API_TOKEN, CHROMA_TOKEN, AGE_PASSPHRASE];
    let good = r.url();
    let wrong = format!("redis://:{}-wrong@127.0.0.1:{}", REDIS_PW, r.port);
    let closed = format!("redis://:{REDIS_PW}@127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, AGE_PASSPHRASE).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, API_TOKEN).unwrap();

    case("backup ok (debug log)", &mut || {
        let o = checked_output(
            with_redis(repo.path(), &good)
                .env("DBKEEPER_LOG", "debug")
                .arg("backup"),
            &all,
        );
        assert_code(&o, 0);
    });
    case("list --json and verify", &mut || {
        for args in [&["list", "--json"][..], &["verify", "--deep"], &["list"]] {
            let o = checked_output(with_redis(repo.path(), &good).args(args), &all);
            assert_code(&o, 0);
        }
    });
    case("wrong password", &mut || {
        let o = checked_output(with_redis(repo.path(), &wrong).arg("backup"), &all);
        assert_code(&o, 1);
        one_error_line(&o);
        // The wrong password is a secret too.
        assert!(!stderr(&o).contains("-wrong"), "{}", stderr(&o));
    });
    case("closed port", &mut || {
        let o = checked_output(
            with_redis(repo.path(), &closed).args(["wait", "--timeout", "1s"]),
            &all,
        );
        assert_code(&o, 3);
        one_error_line(&o);
    });
    case("health of a wrong password", &mut || {
        let o = checked_output(dbkeeper(repo.path()).args(["health", &wrong]), &all);
        assert_code(&o, 1);
    });
    case("a malformed URL holding a password", &mut || {
        let bad = format!("redis://:{REDIS_PW}@127.0.0.1:notaport");
        let o = checked_output(with_redis(repo.path(), &bad).arg("backup"), &all);
        assert_code(&o, 2);
        one_error_line(&o);
    });
    case("chroma token to a closed port", &mut || {
        let o = checked_output(
            dbkeeper(repo.path())
                .env(
                    "DBKEEPER_CHROMA_URL",
                    format!("http://127.0.0.1:{}", free_port()),
                )
                .env("DBKEEPER_CHROMA_TOKEN", CHROMA_TOKEN)
                .env("DBKEEPER_LOG", "debug")
                .args(["wait", "--timeout", "1s"]),
            &all,
        );
        assert_code(&o, 3);
    });
    case("encrypted backup with a passphrase file", &mut || {
        let enc = tempfile::tempdir().unwrap();
        let o = checked_output(
            with_redis(enc.path(), &good)
                .env("DBKEEPER_AGE_PASSPHRASE_FILE", &pass_file)
                .env("DBKEEPER_LOG", "debug")
                .arg("backup"),
            &all,
        );
        assert_code(&o, 0);
        let o = checked_output(
            with_redis(enc.path(), &good)
                .env("DBKEEPER_AGE_PASSPHRASE_FILE", &pass_file)
                .args(["verify", "--deep"]),
            &all,
        );
        assert_code(&o, 0);
        // A wrong passphrase fails without printing either.
        let wrong_file = dir.path().join("wrong-pass");
        std::fs::write(&wrong_file, format!("{AGE_PASSPHRASE}-nope")).unwrap();
        let o = checked_output(
            with_redis(enc.path(), &good)
                .env("DBKEEPER_AGE_PASSPHRASE_FILE", &wrong_file)
                .args(["verify", "--deep"]),
            &all,
        );
        assert!(crate::common::code(&o) != 0, "{}", stderr(&o));
        assert!(!stderr(&o).contains("-nope"), "{}", stderr(&o));
    });
    case(
        "sidecar with a token: bad config and a wrong token",
        &mut || {
            // A refused setting next to the token.
            let o = checked_output(
                with_redis(repo.path(), &good)
                    .env("DBKEEPER_API_TOKEN_FILE", &token_file)
                    .env("DBKEEPER_SCHEDULE", "not a cron")
                    .arg("sidecar"),
                &all,
            );
            assert_code(&o, 2);
            one_error_line(&o);
            let sc = crate::crash::Sidecar::start(
                repo.path(),
                &[
                    ("DBKEEPER_REDIS_URL", &good),
                    ("DBKEEPER_API_TOKEN", API_TOKEN),
                    ("DBKEEPER_LOG", "debug"),
                ],
            );
            let (code, _) = sc.http("POST", "/backups", Some("wrong-token"));
            assert_eq!(code, 401);
            let (code, v) = sc.http("POST", "/backups", Some(API_TOKEN));
            assert_eq!(code, 202, "{v}");
            let job = sc.wait_job(v["job"].as_str().unwrap());
            assert_eq!(job["status"], "succeeded", "{job}");
            for path in ["/backups", "/health", "/alerts", "/metrics"] {
                let (_, body) = sc.http("GET", path, None);
                assert_clean(path, body.to_string().as_bytes(), &all);
            }
            let (log, out) = sc.stop();
            assert_clean("the sidecar's stderr", log.as_bytes(), &all);
            assert_clean("the sidecar's stdout", out.as_bytes(), &all);
        },
    );
    case("manifests", &mut || {
        for id in crate::common::sets(repo.path()) {
            let m = std::fs::read(repo.path().join(&id).join("manifest.json")).unwrap();
            assert_clean("a manifest", &m, &all);
        }
    });
    // The checker itself: a printed secret is caught, raw or percent-encoded.
    case("the checker catches a leak", &mut || {
        let leaked = Command::new("echo").arg(&good).output().unwrap();
        assert!(stdout(&leaked).contains(REDIS_PW));
        assert!(
            find_leak(&leaked.stdout, &[REDIS_PW]).is_some(),
            "the checker missed a raw password"
        );
        let encoded: String = url::form_urlencoded::byte_serialize(REDIS_PW.as_bytes()).collect();
        assert!(
            find_leak(format!("url {encoded}").as_bytes(), &[REDIS_PW]).is_some(),
            "the checker missed an encoded password"
        );
        assert!(find_leak(b"redis://:***@127.0.0.1", &[REDIS_PW]).is_none());
    });
    report::record("secrets", tried, tried - failures.len(), &failures);
    assert!(failures.is_empty(), "{failures:#?}");
}
