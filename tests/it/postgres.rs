//! PostgreSQL against real `postgres` processes (Debian's postgresql-15): readiness and
//! health over the protocol with each authentication method, the "not yet" states, the
//! refusals (wrong password, another protocol on the port), physical backups, their deep
//! verify and the preseed, and TLS by sslmode (the server's certificate, client certificates,
//! the refusals).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

use crate::common::postgres::{MD5_USER, PW, PgServer, TRUST_USER, Tls};
use crate::common::redis::RedisServer;
use crate::common::{assert_code, dbkeeper, run, sets, stderr, stdout, temps};

#[track_caller]
fn assert_no_password(o: &Output) {
    for pw in [PW, MD5_USER.1] {
        assert!(
            !stdout(o).contains(pw) && !stderr(o).contains(pw),
            "the password leaked:\n{}\n{}",
            stdout(o),
            stderr(o)
        );
    }
}

fn health(url: &str) -> Output {
    let o = run(dbkeeper(Path::new("/nonexistent")).args(["health", url]));
    assert_no_password(&o);
    o
}

fn wait(url: &str, timeout: &str) -> Output {
    let o = run(dbkeeper(Path::new("/nonexistent")).args(["wait", "--timeout", timeout, url]));
    assert_no_password(&o);
    o
}

#[test]
fn postgres_health_and_wait_with_each_auth_method() {
    let s = PgServer::start();
    for url in [
        s.url(),
        s.url_as("keeper", Some(PW)),
        s.url_as(MD5_USER.0, Some(MD5_USER.1)),
        s.url_as(TRUST_USER, None),
    ] {
        let o = health(&url);
        assert_code(&o, 0);
        let line = stdout(&o);
        assert!(line.starts_with("healthy: postgres://"), "{line}");
        assert!(line.contains(" 15."), "version: {line}");
        assert!(line.contains("role=primary"), "{line}");
        assert!(line.contains("ms"), "{line}");
        assert_code(&wait(&url, "10s"), 0);
    }
}

#[test]
fn postgres_wrong_password_and_missing_password_are_refused_at_once() {
    let s = PgServer::start();
    let wrong = s.url_as("postgres", Some("not-the-password"));
    let o = health(&wrong);
    assert_code(&o, 1);
    assert!(stdout(&o).contains("wrong password"), "{}", stdout(&o));
    assert!(stdout(&o).contains("28P01"), "{}", stdout(&o));
    // Refused (exit 1) long before the deadline, not retried (exit 3).
    let started = std::time::Instant::now();
    assert_code(&wait(&wrong, "30s"), 1);
    assert!(started.elapsed().as_secs() < 20);

    let none = s.url_as("postgres", None);
    let o = health(&none);
    assert_code(&o, 1);
    assert!(stdout(&o).contains("asks for a password"), "{}", stdout(&o));
    assert_code(&wait(&none, "30s"), 1);

    let no_db = format!("postgres://postgres:{PW}@127.0.0.1:{}/nope", s.port);
    let o = health(&no_db);
    assert_code(&o, 1);
    assert!(stdout(&o).contains("3D000"), "{}", stdout(&o));
}

#[test]
fn postgres_down_or_another_protocol_is_a_clear_error() {
    let closed = format!(
        "postgres://u:{PW}@127.0.0.1:{}/db",
        crate::common::free_port()
    );
    let o = health(&closed);
    assert_code(&o, 1);
    assert_eq!(stdout(&o).lines().count(), 1);
    assert_code(&wait(&closed, "1s"), 3);

    // A server that answers in its own protocol: refused at once.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let http = format!("postgres://u:{PW}@127.0.0.1:{port}/db");
    let o = health(&http);
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("not a PostgreSQL server"),
        "{}",
        stdout(&o)
    );
    assert_code(&wait(&http, "30s"), 1);

    // Redis waits for a line the startup message never ends: the probe's deadline says
    // what the port may be.
    let r = RedisServer::start();
    let redis = format!("postgres://u:{PW}@127.0.0.1:{}/db", r.port);
    let o = run(dbkeeper(Path::new("/nonexistent")).args(["health", "--timeout", "1s", &redis]));
    assert_code(&o, 1);
    assert!(
        stdout(&o).contains("PostgreSQL"),
        "should say it is not PostgreSQL talking: {}",
        stdout(&o)
    );
    assert_code(&wait(&redis, "2s"), 3);
}

#[test]
fn postgres_in_recovery_is_healthy_standby_but_not_ready() {
    let mut s = PgServer::start();
    s.stop();
    // A standby with no primary to follow: in recovery for as long as it runs.
    std::fs::write(s.data.join("standby.signal"), "").unwrap();
    let _ = std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(s.data.join("standby.signal"))
        .status();
    s.run();
    let o = health(&s.url());
    assert_code(&o, 0);
    assert!(stdout(&o).contains("role=standby"), "{}", stdout(&o));
    let o = wait(&s.url(), "2s");
    assert_code(&o, 3);
    assert!(stderr(&o).contains("in recovery"), "{}", stderr(&o));
}

fn populate(s: &PgServer) {
    s.psql("CREATE DATABASE app");
    s.psql("CREATE DATABASE shop");
    let app = |sql: &str| {
        let o = std::process::Command::new(crate::common::postgres::pg_bin("psql"))
            .arg("-h")
            .arg(&s.root)
            .args(["-p", &s.port.to_string(), "-U", "postgres", "-d", "app"])
            .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    app(
        "CREATE EXTENSION pgcrypto; CREATE EXTENSION hstore; CREATE SCHEMA billing; \
         CREATE SEQUENCE billing.invoice_no START 1000; \
         CREATE TABLE billing.invoice (id bigint DEFAULT nextval('billing.invoice_no') PRIMARY KEY, \
           body text, tags hstore, digest bytea); \
         INSERT INTO billing.invoice (body, tags, digest) \
           SELECT repeat(md5(g::text), 400), hstore('n', g::text), digest(g::text, 'sha256') \
           FROM generate_series(1, 300) g; \
         SELECT lo_from_bytea(0, convert_to(repeat('large object ', 5000), 'UTF8'));",
    );
}

fn set_dir(repo: &Path) -> std::path::PathBuf {
    let ids = sets(repo);
    assert_eq!(ids.len(), 1, "{ids:?}");
    repo.join(&ids[0])
}

#[test]
fn postgres_backup_is_accepted_by_pg_verifybackup_unpacked() {
    let s = PgServer::start();
    populate(&s);
    let repo = tempfile::tempdir().unwrap();
    // A role with REPLICATION only, not a superuser.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url_as("keeper", Some(PW)))
        .arg("backup"));
    assert_no_password(&o);
    assert_code(&o, 0);
    let set = set_dir(repo.path());
    let text = std::fs::read_to_string(set.join("manifest.json")).unwrap();
    assert!(!text.contains(PW));
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pg = &m["engines"]["postgres"];
    let details = &pg["details"];
    for key in ["system_identifier", "start_lsn", "end_lsn", "timeline"] {
        assert!(
            details[key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}: {pg}"
        );
    }
    assert_eq!(details["major"], "15", "{pg}");
    assert!(
        details["database_bytes"]["app"].as_u64().unwrap() > 1_000_000,
        "{pg}"
    );
    assert!(pg["counts"]["base.tar"].as_u64().unwrap() > 900, "{pg}");

    let out = tempfile::tempdir().unwrap();
    let sh = format!(
        "zstd -dc {0}/postgres/base.tar.zst | tar -x -C {1} && zstd -qdc {0}/postgres/backup_manifest.zst > {1}/backup_manifest",
        set.display(),
        out.path().display()
    );
    let o = run(std::process::Command::new("sh").args(["-c", &sh]));
    assert_code(&o, 0);
    let o = run(
        std::process::Command::new(crate::common::postgres::pg_bin("pg_verifybackup"))
            .arg(out.path()),
    );
    assert!(
        o.status.success(),
        "pg_verifybackup: {}{}",
        stdout(&o),
        stderr(&o)
    );
    // The check can fail: one byte changed in one file is caught.
    let f = out.path().join("PG_VERSION");
    std::fs::write(&f, "14\n").unwrap();
    let o = run(
        std::process::Command::new(crate::common::postgres::pg_bin("pg_verifybackup"))
            .arg(out.path()),
    );
    assert!(!o.status.success());
}

#[test]
fn postgres_deep_verify_passes_and_online_restore_refuses() {
    let s = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url())
        .arg("backup"));
    assert_code(&o, 0);
    assert!(
        temps(repo.path()).is_empty(),
        "temps left: {:?}",
        temps(repo.path())
    );
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", "latest"]));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url())
        .args(["restore", "--force"]));
    assert_no_password(&o);
    assert_ne!(crate::common::code(&o), 0);
    assert!(
        stderr(&o).contains("DBKEEPER_POSTGRES_DATA_DIR"),
        "{}",
        stderr(&o)
    );
}

fn dumpall(s: &PgServer) -> String {
    let o = std::process::Command::new(crate::common::postgres::pg_bin("pg_dumpall"))
        .arg("-h")
        .arg(&s.root)
        .args([
            "-p",
            &s.port.to_string(),
            "-U",
            "postgres",
            "--no-role-passwords",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // pg_dump's per-run \\restrict keys are random; the rest is the data.
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn preseed(repo: &Path, dir: &Path, major: &str) -> Output {
    run(dbkeeper(repo)
        .env(
            "DBKEEPER_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:1/postgres",
        )
        .env("DBKEEPER_POSTGRES_DATA_DIR", dir)
        .env("DBKEEPER_POSTGRES_MAJOR", major)
        .arg("preseed"))
}

#[test]
fn postgres_backup_under_writes_preseeds_an_empty_pgdata_equal_at_the_end_point() {
    let s = PgServer::start();
    populate(&s);
    s.psql("CREATE TABLE ticks (n bigint)");
    // A writer runs while the backup is taken; its rows are compared at the end point
    // (the backup's end is after the writer stopped: the writer stops, then the backup ends
    // only once its WAL is written, so every committed row before the end is in).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let root = s.root.clone();
        let port = s.port;
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let _ = std::process::Command::new(crate::common::postgres::pg_bin("psql"))
                    .arg("-h")
                    .arg(&root)
                    .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                    .args(["-XAtq", "-c", &format!("INSERT INTO ticks VALUES ({n})")])
                    .status();
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url_as("keeper", Some(PW)))
        .arg("backup"));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert_code(&o, 0);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(set_dir(repo.path()).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(m["engines"]["postgres"]["details"]["end_lsn"].is_string());

    // The preseeded copy, in an empty directory the server's user owns.
    let target = tempfile::tempdir().unwrap();
    std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(target.path())
        .status()
        .unwrap();
    let pgdata = target.path().join("data");
    std::fs::create_dir(&pgdata).unwrap();
    std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&pgdata)
        .status()
        .unwrap();
    // Another major version: refused in one line, nothing written.
    let o = preseed(repo.path(), &pgdata, "16");
    assert_ne!(crate::common::code(&o), 0);
    let err = stderr(&o);
    assert!(
        err.contains("PostgreSQL 15") && err.contains("PostgreSQL 16"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&pgdata).unwrap().count(), 0);

    let o = preseed(repo.path(), &pgdata, "15");
    assert!(o.status.success(), "{}", stderr(&o));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let pg_uid = std::fs::metadata(&pgdata).unwrap().uid();
    for e in walk(&pgdata) {
        let m = std::fs::symlink_metadata(&e).unwrap();
        assert_eq!(m.uid(), pg_uid, "{}", e.display());
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.permissions().mode() & 0o777, want, "{}", e.display());
    }
    assert!(
        !std::fs::read_dir(&pgdata).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.'))
    );

    // The writer numbered its rows 1, 2, ...: the copy holds those up to the backup's end
    // point, k. The source brought back to that point (its rows after k deleted) must dump
    // equal to the copy: every table, large object, sequence and row.
    let mut copy = PgServer::on_data(&pgdata);
    let k: u64 = copy
        .psql("SELECT coalesce(max(n), 0) FROM ticks")
        .trim()
        .parse()
        .unwrap();
    assert!(k > 0, "the writer wrote nothing before the backup's end");
    s.psql(&format!("DELETE FROM ticks WHERE n > {k}"));
    let want = dumpall(&s);
    let got = dumpall(&copy);
    assert!(
        got == want,
        "pg_dumpall of the copy differs from the source at the end point (k={k})"
    );
    let o =
        run(dbkeeper(Path::new("/nonexistent")).args(["wait", "--timeout", "30s", &copy.url()]));
    assert_code(&o, 0);
    copy.stop();

    // A cluster is never touched: a second preseed leaves it as it is.
    let before = std::fs::read(pgdata.join("PG_VERSION")).unwrap();
    let o = preseed(repo.path(), &pgdata, "15");
    assert_code(&o, 0);
    assert!(stderr(&o).contains("PG_VERSION"), "{}", stderr(&o));
    assert_eq!(std::fs::read(pgdata.join("PG_VERSION")).unwrap(), before);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn postgres_server_stopping_mid_backup_publishes_nothing() {
    let mut s = PgServer::start();
    // Enough incompressible data that the backup is still streaming when the server stops.
    s.psql(
        "CREATE EXTENSION pgcrypto; CREATE TABLE blob AS \
         SELECT gen_random_bytes(1024) AS b FROM generate_series(1, 300000)",
    );
    let repo = tempfile::tempdir().unwrap();
    let child = dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url_as("keeper", Some(PW)))
        .arg("backup")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the archive is being written, stop the server (immediate shutdown).
    let started = crate::common::wait_until(std::time::Duration::from_secs(30), || {
        temps(repo.path()).iter().any(|t| {
            std::fs::read_dir(repo.path().join(t).join("postgres"))
                .map(|mut d| d.next().is_some())
                .unwrap_or(false)
        })
    });
    assert!(started, "the backup never started writing");
    s.stop();
    let o = child.wait_with_output().unwrap();
    assert_no_password(&o);
    assert_ne!(crate::common::code(&o), 0, "{}", stderr(&o));
    let last = stderr(&o).lines().last().unwrap_or_default().to_owned();
    assert!(last.contains("postgres"), "{last}");
    eprintln!("mid-backup stop: {last}");
    assert!(sets(repo.path()).is_empty(), "a set was published");
    assert!(
        temps(repo.path()).is_empty(),
        "temps left: {:?}",
        temps(repo.path())
    );
}

/// Rewrites the set's base archive with `PG_VERSION` changed (same size), and the set's own
/// checksums to match: only the backup manifest's CRC32C can tell.
fn tamper_pg_version(set: &Path) {
    use sha2::Digest;
    let path = set.join("postgres/base.tar.zst");
    let raw = zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap();
    let mut out = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(&raw[..]);
    let mut changed = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut header = e.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if e.path_bytes().as_ref() == b"PG_VERSION" {
            data = b"14\n".to_vec();
            changed = true;
        }
        header.set_cksum();
        out.append(&header, &data[..]).unwrap();
    }
    assert!(changed, "no PG_VERSION in base.tar");
    let tar_bytes = out.into_inner().unwrap();
    let stored = zstd::encode_all(&tar_bytes[..], 3).unwrap();
    std::fs::write(&path, &stored).unwrap();
    let mpath = set.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    for f in m["engines"]["postgres"]["files"].as_array_mut().unwrap() {
        if f["path"] == "postgres/base.tar.zst" {
            f["size"] = stored.len().into();
            f["raw_size"] = tar_bytes.len().into();
            f["sha256"] = hex::encode(sha2::Sha256::digest(&stored)).into();
        }
    }
    let text = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(&mpath, &text).unwrap();
    std::fs::write(
        set.join("manifest.json.sha256"),
        format!(
            "{}  manifest.json\n",
            hex::encode(sha2::Sha256::digest(&text))
        ),
    )
    .unwrap();
}

#[test]
fn postgres_a_file_that_differs_from_the_backup_manifest_fails_verify_and_preseed() {
    let s = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url())
        .arg("backup"));
    assert_code(&o, 0);
    let set = set_dir(repo.path());
    tamper_pg_version(&set);
    // The set's own checksums are consistent again: a plain verify passes...
    let o = run(dbkeeper(repo.path()).args(["verify", "latest"]));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    // ...the deep one compares with the server's manifest and fails.
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", "latest"]));
    assert_code(&o, 4);
    assert!(stderr(&o).contains("PG_VERSION: CRC32C"), "{}", stderr(&o));
    // The preseed skips it (the only set: a first start) and writes nothing from it.
    let target = tempfile::tempdir().unwrap();
    let o = preseed(repo.path(), target.path(), "15");
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("skipping a set that does not verify"),
        "{}",
        stderr(&o)
    );
    let left: Vec<_> = std::fs::read_dir(target.path()).unwrap().collect();
    assert!(left.is_empty(), "the preseed left {left:?}");
}

#[test]
fn postgres_backup_without_replication_rights_says_what_the_role_needs() {
    let s = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    // md5user has no REPLICATION attribute and no `replication` line in pg_hba.conf.
    let o = run(dbkeeper(repo.path())
        .env(
            "DBKEEPER_POSTGRES_URL",
            s.url_as(MD5_USER.0, Some(MD5_USER.1)),
        )
        .arg("backup"));
    assert_no_password(&o);
    assert_code(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("REPLICATION") && err.contains("pg_hba.conf"),
        "{err}"
    );
    assert!(sets(repo.path()).is_empty());
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
}

/// A URL with `?query` after the database.
fn with_query(url: &str, query: &str) -> String {
    format!("{url}?{query}")
}

#[track_caller]
fn assert_one_line(text: &str, has: &str) {
    let text = text.trim_end();
    assert_eq!(text.lines().count(), 1, "one line: {text}");
    assert!(text.contains(has), "should say {has:?}: {text}");
}

/// The last line of stderr: the error a one-shot command reports.
fn last_error(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or_default().to_owned()
}

/// A server that takes TCP connections over TLS only (`hostssl`): health, wait and a backup
/// (with deep verify) over `verify-full` against the test CA; `require`, `prefer` (libpq's
/// default), `allow` and `verify-ca` connect too; plain text finds no pg_hba.conf entry and
/// says so in one line.
#[test]
fn postgres_tls_health_and_backup_over_verify_full() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certs(certs.path());
    let ca = certs.path().join("ca.crt");
    let s = PgServer::start_with(Some(Tls {
        certs: certs.path(),
        only: true,
        client_cert: false,
    }));
    let full = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    let url = with_query(&s.url(), &full);
    let o = health(&url);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("role=primary"), "{}", stdout(&o));
    assert_code(&wait(&url, "10s"), 0);

    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env(
            "DBKEEPER_POSTGRES_URL",
            with_query(&s.url_as("keeper", Some(PW)), &full),
        )
        .arg("backup"));
    assert_no_password(&o);
    assert_code(&o, 0);
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep", "latest"]));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    for query in [
        "sslmode=require".to_owned(),
        String::new(),
        "sslmode=prefer".to_owned(),
        "sslmode=allow".to_owned(),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        // A root certificate makes require check the chain (libpq's reading).
        format!("sslmode=require&sslrootcert={}", ca.display()),
    ] {
        let url = if query.is_empty() {
            s.url()
        } else {
            with_query(&s.url(), &query)
        };
        let o = health(&url);
        assert_code(&o, 0);
    }
    // verify-ca checks the chain, not the name: the certificate names 127.0.0.1 only.
    let localhost = format!("postgres://postgres:{PW}@localhost:{}/postgres", s.port);
    assert_code(
        &health(&with_query(
            &localhost,
            &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        )),
        0,
    );
    let o = health(&with_query(&localhost, &full));
    assert_code(&o, 1);
    assert_one_line(&stdout(&o), "certificate is not for host localhost");

    // The system's CAs (here SSL_CERT_FILE) when verify-full names no sslrootcert.
    let o = run(dbkeeper(Path::new("/nonexistent"))
        .env("SSL_CERT_FILE", &ca)
        .env_remove("SSL_CERT_DIR")
        .args(["health", &with_query(&s.url(), "sslmode=verify-full")]));
    assert_code(&o, 0);

    // prefer and allow try both ways; a wrong password is refused over TLS and finds no
    // entry in plain text: one line says both.
    for query in ["sslmode=prefer", "sslmode=allow"] {
        let o = health(&with_query(&s.url_as("postgres", Some("wrong")), query));
        assert_code(&o, 1);
        assert_one_line(&stdout(&o), "over TLS: password authentication failed");
        assert!(
            stdout(&o).contains("in plain text: no pg_hba.conf entry"),
            "{}",
            stdout(&o)
        );
    }

    // Plain text: no pg_hba.conf entry without encryption; refused at once, one line.
    let plain = with_query(&s.url(), "sslmode=disable");
    let o = health(&plain);
    assert_code(&o, 1);
    assert_one_line(&stdout(&o), "no encryption");
    let started = std::time::Instant::now();
    let o = wait(&plain, "30s");
    assert_code(&o, 1);
    assert!(started.elapsed().as_secs() < 20);
    assert!(last_error(&o).contains("no encryption"), "{}", stderr(&o));
}

/// verify-full with the wrong CA, or none the system trusts, is refused in one line naming
/// the certificate; a CA file that is not one is a configuration error (exit 2).
#[test]
fn postgres_tls_certificate_that_does_not_verify_is_refused() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certs(certs.path());
    let other = tempfile::tempdir().unwrap();
    crate::common::make_certs(other.path());
    let wrong_ca = other.path().join("ca.crt");
    let s = PgServer::start_with(Some(Tls {
        certs: certs.path(),
        only: true,
        client_cert: false,
    }));
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = with_query(
            &s.url(),
            &format!("sslmode={mode}&sslrootcert={}", wrong_ca.display()),
        );
        let o = health(&url);
        assert_code(&o, 1);
        assert_one_line(
            &stdout(&o),
            "certificate does not verify against sslrootcert",
        );
        // Not retried: retrying cannot make the certificate verify.
        let started = std::time::Instant::now();
        assert_code(&wait(&url, "30s"), 1);
        assert!(started.elapsed().as_secs() < 20);
    }
    // No sslrootcert: the system's CAs, which do not know the test CA.
    let o = run(dbkeeper(Path::new("/nonexistent"))
        .env("SSL_CERT_FILE", &wrong_ca)
        .env_remove("SSL_CERT_DIR")
        .args(["health", &with_query(&s.url(), "sslmode=verify-full")]));
    assert_no_password(&o);
    assert_code(&o, 1);
    assert_one_line(
        &stdout(&o),
        "certificate does not verify against the system's CA certificates",
    );

    // A CA file that is not one: a configuration error, before any connection.
    let junk = other.path().join("junk.crt");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    for file in [junk.clone(), other.path().join("missing.crt")] {
        let url = with_query(
            &s.url(),
            &format!("sslmode=verify-full&sslrootcert={}", file.display()),
        );
        // health says only healthy or not (Docker reserves 2); the other roles exit 2.
        let o = health(&url);
        assert_code(&o, 1);
        assert_one_line(&stdout(&o), "sslrootcert=");
        assert_code(&wait(&url, "30s"), 2);
        let repo = tempfile::tempdir().unwrap();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_POSTGRES_URL", &url)
            .arg("backup"));
        assert_no_password(&o);
        assert_code(&o, 2);
        assert!(last_error(&o).contains("sslrootcert="), "{}", stderr(&o));
    }
}

/// A server with `ssl = off` answers the TLS request 'N': sslmode=require and verify-full
/// are refused in one line, prefer (the default) goes on in plain text.
#[test]
fn postgres_tls_required_from_a_server_without_it_is_refused() {
    let s = PgServer::start();
    for query in ["sslmode=require", "sslmode=verify-full"] {
        let url = with_query(&s.url(), query);
        let o = health(&url);
        assert_code(&o, 1);
        assert_one_line(&stdout(&o), "does not accept TLS");
        let repo = tempfile::tempdir().unwrap();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_POSTGRES_URL", &url)
            .arg("backup"));
        assert_no_password(&o);
        assert_code(&o, 1);
        assert!(
            last_error(&o).contains("does not accept TLS"),
            "{}",
            stderr(&o)
        );
        assert!(sets(repo.path()).is_empty());
    }
    assert_code(&health(&with_query(&s.url(), "sslmode=prefer")), 0);
    assert_code(&health(&with_query(&s.url(), "sslmode=allow")), 0);
}

/// `clientcert=verify-ca`: without `sslcert`/`sslkey` the server refuses in one line; with
/// them health and a backup work.
#[test]
fn postgres_tls_client_certificate() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certs(certs.path());
    crate::common::make_client_cert(certs.path());
    let file = |n: &str| certs.path().join(n).display().to_string();
    let s = PgServer::start_with(Some(Tls {
        certs: certs.path(),
        only: true,
        client_cert: true,
    }));
    let full = format!("sslmode=verify-full&sslrootcert={}", file("ca.crt"));
    let o = health(&with_query(&s.url(), &full));
    assert_code(&o, 1);
    assert_one_line(&stdout(&o), "certificate");

    let with_cert = format!(
        "{full}&sslcert={}&sslkey={}",
        file("client.crt"),
        file("client.key")
    );
    assert_code(&health(&with_query(&s.url(), &with_cert)), 0);
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env(
            "DBKEEPER_POSTGRES_URL",
            with_query(&s.url_as("keeper", Some(PW)), &with_cert),
        )
        .arg("backup"));
    assert_code(&o, 0);

    // A key that is not one: configuration (exit 2), one line.
    let bad_key = with_query(
        &s.url(),
        &format!(
            "{full}&sslcert={}&sslkey={}",
            file("client.crt"),
            file("ca.crt")
        ),
    );
    let o = health(&bad_key);
    assert_code(&o, 1);
    assert_one_line(&stdout(&o), "sslkey");
    let o = wait(&bad_key, "30s");
    assert_code(&o, 2);
    assert!(
        last_error(&o).contains("no PEM private key"),
        "{}",
        stderr(&o)
    );
}
