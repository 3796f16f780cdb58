//! PostgreSQL against real `postgres` processes (Debian's postgresql-15): readiness and
//! health over the protocol with each authentication method, the "not yet" states, the
//! refusals (wrong password, another protocol on the port), and the operations that refuse
//! until physical backups are built (nothing published, nothing written).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

use crate::common::postgres::{MD5_USER, PW, PgServer, TRUST_USER};
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

#[test]
fn postgres_backup_and_online_restore_refuse_leaving_nothing() {
    let s = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_URL", s.url())
        .arg("backup"));
    assert_no_password(&o);
    assert_ne!(crate::common::code(&o), 0);
    assert!(
        stderr(&o).contains("not supported by this build yet"),
        "{}",
        stderr(&o)
    );
    assert!(sets(repo.path()).is_empty(), "a set was published");
    assert!(
        temps(repo.path()).is_empty(),
        "temps left: {:?}",
        temps(repo.path())
    );
}
