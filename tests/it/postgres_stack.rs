//! PostgreSQL beside the other engines, as a Compose stack runs them: `dbkeeper-health` reads
//! its URL from the environment like the others; a restore of every engine refuses PostgreSQL
//! (a running server cannot load a physical backup) before any other target is touched; the
//! online preseed leaves it to the data-directory preseed instead of failing the init step.

use std::path::Path;
use std::process::Command;

use crate::common::postgres::PgServer;
use crate::common::redis::RedisServer;
use crate::common::{assert_code, dbkeeper, free_port, run, stderr, stdout};

/// Backs up a Redis and a PostgreSQL together into `repo`: one set holding both.
fn both(repo: &Path, redis: &RedisServer, pg: &PgServer) {
    let o = run(dbkeeper(repo)
        .env("DBKEEPER_REDIS_URL", redis.url())
        .env("DBKEEPER_POSTGRES_URL", pg.url())
        .arg("backup"));
    assert_code(&o, 0);
}

#[test]
fn dbkeeper_health_reads_the_postgres_url_from_the_environment() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dbkeeper-health");
    std::os::unix::fs::symlink(crate::common::bin(), &link).unwrap();
    let health = |url: &str| {
        let o = Command::new(&link)
            .env_clear()
            .env("DBKEEPER_POSTGRES_URL", url)
            .output()
            .unwrap();
        assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
        o
    };
    let o = health(&pg.url());
    assert_code(&o, 0);
    assert!(stdout(&o).contains("postgres"), "{}", stdout(&o));
    let closed = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    assert_code(&health(&closed), 1);
}

#[test]
fn a_restore_of_every_engine_refuses_postgres_before_touching_any_other() {
    let redis = RedisServer::start();
    redis.cli(&["SET", "k", "in the set"]);
    let pg = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    both(repo.path(), &redis, &pg);
    // The target's data since the set: a restore that went ahead would replace it.
    redis.cli(&["SET", "k", "newer"]);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", redis.url())
        .env("DBKEEPER_POSTGRES_URL", pg.url())
        .args(["restore", "--force"]));
    assert_code(&o, 2);
    let err = stderr(&o);
    assert!(err.contains("DBKEEPER_POSTGRES_DATA_DIR"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("dbkeeper: ")).count(),
        1,
        "{err}"
    );
    assert_eq!(
        redis.cli(&["GET", "k"]),
        "newer",
        "Redis was restored: {err}"
    );

    // Without PostgreSQL the same restore goes ahead.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", redis.url())
        .env("DBKEEPER_POSTGRES_URL", pg.url())
        .args(["restore", "--force", "--only", "redis"]));
    assert_code(&o, 0);
    assert_eq!(redis.cli(&["GET", "k"]), "in the set");
}

#[test]
fn the_online_preseed_leaves_postgres_to_its_data_directory() {
    let src = RedisServer::start();
    src.cli(&["SET", "k", "v"]);
    let pg = PgServer::start();
    let repo = tempfile::tempdir().unwrap();
    both(repo.path(), &src, &pg);
    let empty = RedisServer::start();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_URL", empty.url())
        .env("DBKEEPER_POSTGRES_URL", pg.url())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(
        stderr(&o).contains("preseed left to the data directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(empty.cli(&["GET", "k"]), "v");
}
