//! PostgreSQL point-in-time recovery against a real server: the sidecar streams WAL over a
//! replication slot into the repository, and `restore --to-time` (or a preseed to a time)
//! unpacks the base backup and the WAL into an empty data directory, where the server stops
//! at the target and promotes; the rows are exactly those committed before it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};

use crate::common::archiver::Archiver;
use crate::common::postgres::{PW, PgServer};
use crate::common::{assert_code, code, dbkeeper, run, stderr, stdout, wait_until};

/// A sidecar streaming the WAL of `url`.
fn archiver(repo: &Path, url: &str, env: &[(&str, &str)]) -> Archiver {
    let mut all = vec![
        ("DBKEEPER_POSTGRES_URL", url),
        ("DBKEEPER_POSTGRES_PITR", "on"),
    ];
    all.extend_from_slice(env);
    Archiver::start(repo, &all)
}

/// Waits until every transaction that ended before `t` is archived.
fn wait_reach(a: &Archiver, t: DateTime<Utc>) {
    let want = t.timestamp_micros() as f64 / 1e6;
    assert!(
        wait_until(Duration::from_secs(30), || {
            a.metric("dbkeeper_postgres_pitr_newest_recoverable_timestamp_seconds")
                .is_some_and(|r| r >= want)
        }),
        "the archive did not reach {t}:\n{}",
        a.log()
    );
}

/// The sets of a repository (not its `pitr/` directory).
fn sets(repo: &Path) -> Vec<String> {
    crate::common::sets(repo)
        .into_iter()
        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// An empty directory the server's user owns, for a preseed.
fn empty_pgdata() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("data");
    std::fs::create_dir(&d).unwrap();
    for p in [t.path(), d.as_path()] {
        Command::new("chown")
            .arg("postgres:postgres")
            .arg(p)
            .status()
            .unwrap();
    }
    (t, d)
}

fn restore_to(repo: &Path, dir: &Path, to: &str) -> Output {
    run(dbkeeper(repo)
        .env("DBKEEPER_POSTGRES_DATA_DIR", dir)
        .env("DBKEEPER_POSTGRES_MAJOR", "15")
        .args(["restore", "--only", "postgres", "--to-time", to]))
}

/// Starts a server on a recovered directory and waits until it has promoted.
fn recovered(dir: &Path) -> PgServer {
    let s = PgServer::on_data(dir);
    assert!(
        wait_until(Duration::from_secs(60), || {
            s.psql("SELECT pg_is_in_recovery()").trim() == "f"
        }),
        "the server did not promote: {}",
        std::fs::read_to_string(s.root.join("server.log")).unwrap_or_default()
    );
    s
}

fn rows(s: &PgServer) -> Vec<String> {
    s.psql("SELECT n || ':' || note FROM t ORDER BY n")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn insert(s: &PgServer, from: u32, to: u32, note: &str) {
    for n in from..=to {
        s.psql(&format!("INSERT INTO t VALUES ({n}, '{note}')"));
    }
}

/// A moment between two writes, with a fraction of a second (taken as given).
fn between() -> DateTime<Utc> {
    std::thread::sleep(Duration::from_millis(700));
    let t = Utc::now().trunc_subsecs(6);
    std::thread::sleep(Duration::from_millis(700));
    t
}

#[test]
fn postgres_pitr_restores_exactly_the_rows_committed_before_the_target() {
    let s = PgServer::start();
    s.psql("CREATE TABLE t (n int PRIMARY KEY, note text)");
    insert(&s, 1, 2, "before-set");
    let repo = tempfile::tempdir().unwrap();
    let a = archiver(repo.path(), &s.url_as("keeper", Some(PW)), &[]);
    // No set is followed by the archive yet: the sidecar takes one at once.
    assert!(
        wait_until(Duration::from_secs(60), || !sets(repo.path()).is_empty()),
        "no set was taken for the archive to follow:\n{}",
        a.log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || a
            .metric("dbkeeper_postgres_pitr_up")
            == Some(1.0)),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    insert(&s, 3, 4, "a");
    let t1 = between();
    insert(&s, 5, 6, "b");
    s.psql("UPDATE t SET note = 'changed' WHERE n = 1");
    let t2 = between();
    s.psql("DELETE FROM t WHERE n = 2");
    // Enough WAL for a whole segment to be published, then a partial one.
    s.psql("SELECT pg_switch_wal()");
    insert(&s, 7, 7, "c");
    let t3 = between();
    wait_reach(&a, t3);
    assert!(
        a.metric("dbkeeper_postgres_slot_lag_bytes").is_some(),
        "no slot lag figure"
    );
    assert!(
        !a.alerts()
            .iter()
            .any(|x| x["alert"] == "postgres_slot_lagging"),
        "{:?}",
        a.alerts()
    );
    let log = a.stop();
    assert!(
        log.contains("streaming WAL"),
        "the archiver did not stream:\n{log}"
    );

    // The archive is listed and verifies, shallow and deep.
    let o = run(dbkeeper(repo.path()).args(["list", "--pitr"]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("postgres"), "{}", stdout(&o));
    for deep in [false, true] {
        let mut c = dbkeeper(repo.path());
        c.arg("verify");
        if deep {
            c.arg("--deep");
        }
        let o = run(&mut c);
        assert_code(&o, 0);
        assert!(stdout(&o).contains("WAL segments"), "{}", stdout(&o));
    }

    let want_t1 = ["1:before-set", "2:before-set", "3:a", "4:a"];
    let want_t2 = ["1:changed", "2:before-set", "3:a", "4:a", "5:b", "6:b"];
    let want_t3 = ["1:changed", "3:a", "4:a", "5:b", "6:b", "7:c"];
    for (t, want) in [(t1, &want_t1[..]), (t2, &want_t2[..]), (t3, &want_t3[..])] {
        let (_keep, dir) = empty_pgdata();
        let o = restore_to(repo.path(), &dir, &t.to_rfc3339());
        assert_code(&o, 0);
        let mut copy = recovered(&dir);
        assert_eq!(rows(&copy), want, "recovered to {t}");
        // A new timeline: the archive's own WAL names are never written again.
        let tli = copy.psql("SELECT timeline_id FROM pg_control_checkpoint()");
        assert_ne!(
            tli.trim(),
            "1",
            "the server did not promote to a new timeline"
        );
        copy.stop();
    }

    // The same through a preseed (`init` in the postgres-preseed container).
    let (_keep, dir) = empty_pgdata();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_POSTGRES_DATA_DIR", &dir)
        .env("DBKEEPER_POSTGRES_MAJOR", "15")
        .env("DBKEEPER_PRESEED_TO_TIME", t1.to_rfc3339())
        .arg("preseed"));
    assert_code(&o, 0);
    let mut copy = recovered(&dir);
    assert_eq!(rows(&copy), want_t1);
    copy.stop();
    // A directory that holds a cluster is never touched.
    let o = restore_to(repo.path(), &dir, &t1.to_rfc3339());
    assert_code(&o, 2);
    assert!(stderr(&o).contains("PG_VERSION"), "{}", stderr(&o));

    // Past what is archived, and before every set: one line each, nothing written.
    for (to, says) in [
        (Utc::now() + chrono::TimeDelta::hours(1), "reaches"),
        (
            t1 - chrono::TimeDelta::days(1),
            "no PostgreSQL set finished",
        ),
    ] {
        let (_keep, dir) = empty_pgdata();
        let o = restore_to(repo.path(), &dir, &to.to_rfc3339());
        assert_ne!(code(&o), 0);
        let err = stderr(&o);
        assert!(err.contains(says), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}

#[test]
fn postgres_pitr_a_corrupt_wal_segment_stops_the_restore_before_the_directory_is_a_cluster() {
    let s = PgServer::start();
    s.psql("CREATE TABLE t (n int PRIMARY KEY, note text)");
    let repo = tempfile::tempdir().unwrap();
    let a = archiver(repo.path(), &s.url_as("keeper", Some(PW)), &[]);
    assert!(
        wait_until(Duration::from_secs(60), || !sets(repo.path()).is_empty()),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    insert(&s, 1, 3, "a");
    let t = between();
    insert(&s, 4, 4, "b");
    wait_reach(&a, Utc::now());
    a.stop();
    // Flip a byte in every archived piece.
    let wal = repo.path().join("pitr/postgres");
    let mut n = 0;
    for run in std::fs::read_dir(&wal).unwrap() {
        for f in std::fs::read_dir(run.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if p.to_string_lossy().ends_with(".wal.zst") {
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x55;
                std::fs::write(&p, b).unwrap();
                n += 1;
            }
        }
    }
    assert!(n > 0, "nothing archived");
    let o = run(dbkeeper(repo.path()).arg("verify"));
    assert_code(&o, 4);
    assert!(stderr(&o).contains("WAL segment"), "{}", stderr(&o));
    let (_keep, dir) = empty_pgdata();
    let o = restore_to(repo.path(), &dir, &t.to_rfc3339());
    assert_code(&o, 4);
    let err = stderr(&o);
    assert!(
        err.contains("WAL segment") && err.contains("checksum"),
        "{err}"
    );
    assert!(!dir.join("PG_VERSION").exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn postgres_pitr_a_slot_that_lags_raises_an_alert_and_clears_once_archived() {
    let s = PgServer::start();
    s.psql("CREATE TABLE t (n int PRIMARY KEY, note text)");
    let repo = tempfile::tempdir().unwrap();
    // The archive cannot be written: a file where its directory goes.
    std::fs::create_dir_all(repo.path().join("pitr")).unwrap();
    std::fs::write(repo.path().join("pitr/postgres"), b"in the way").unwrap();
    let a = archiver(
        repo.path(),
        &s.url_as("keeper", Some(PW)),
        &[("DBKEEPER_ALERT_POSTGRES_SLOT_LAG", "4MiB")],
    );
    // The server keeps the WAL the slot has not released: more than the threshold.
    for i in 0..3 {
        s.psql(&format!(
            "INSERT INTO t SELECT g + {i} * 100000, repeat('x', 200) FROM generate_series(1, 20000) g"
        ));
        s.psql("SELECT pg_switch_wal()");
    }
    assert!(
        wait_until(Duration::from_secs(30), || {
            let al = a.alerts();
            al.iter().any(|x| x["alert"] == "postgres_slot_lagging")
                && al
                    .iter()
                    .any(|x| x["alert"] == "pitr_stopped" && x["engine"] == "postgres")
        }),
        "no slot-lag alert: {:?}\n{}",
        a.alerts(),
        a.log()
    );
    assert!(
        a.metric("dbkeeper_postgres_slot_lag_bytes")
            .is_some_and(|l| l >= 4.0 * 1024.0 * 1024.0)
    );
    assert_eq!(a.metric("dbkeeper_postgres_pitr_up"), Some(0.0));
    // Every PostgreSQL series the shipped alert rules read is served.
    assert_eq!(a.metric("dbkeeper_postgres_pitr_gap"), Some(0.0));
    // The way cleared: the archiver catches up, the slot releases the WAL, the alerts go.
    std::fs::remove_file(repo.path().join("pitr/postgres")).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let al = a.alerts();
            !al.iter()
                .any(|x| x["alert"] == "postgres_slot_lagging" || x["alert"] == "pitr_stopped")
        }),
        "the alerts stayed: {:?}\n{}",
        a.alerts(),
        a.log()
    );
    assert_eq!(a.metric("dbkeeper_postgres_pitr_up"), Some(1.0));
    a.stop();
}

#[test]
fn postgres_pitr_wal_the_slot_lost_is_a_gap_reported_and_closed_by_a_new_set() {
    let s = PgServer::start();
    s.psql("CREATE TABLE t (n int PRIMARY KEY, note text)");
    let repo = tempfile::tempdir().unwrap();
    let url = s.url_as("keeper", Some(PW));
    let a = archiver(repo.path(), &url, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || sets(repo.path()).len() == 1),
        "{}",
        a.log()
    );
    insert(&s, 1, 1, "a");
    wait_reach(&a, Utc::now());
    a.stop();
    // While the sidecar is away the slot goes (dropped by hand, or by
    // max_slot_wal_keep_size) and the server moves on past the archive's end.
    s.psql("SELECT pg_drop_replication_slot('dbkeeper')");
    insert(&s, 2, 2, "lost");
    s.psql("SELECT pg_switch_wal()");
    insert(&s, 3, 3, "lost");
    s.psql("SELECT pg_switch_wal()");
    // A new slot reserves WAL from the last checkpoint's redo point: past the archive's end.
    s.psql("CHECKPOINT");
    let a = archiver(repo.path(), &url, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || a
            .log()
            .contains("no longer holds the WAL")),
        "{}",
        a.log()
    );
    // A new set starts a new chain, and the gap alert clears once it exists.
    assert!(
        wait_until(Duration::from_secs(60), || sets(repo.path()).len() == 2),
        "{}",
        a.log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || !a
            .alerts()
            .iter()
            .any(|x| x["alert"] == "pitr_gap")),
        "{:?}",
        a.alerts()
    );
    assert_eq!(a.metric("dbkeeper_postgres_pitr_gap"), Some(0.0));
    a.stop();
}

#[test]
fn postgres_pitr_encrypted_wal_needs_the_identity_and_recovers_with_it() {
    let s = PgServer::start();
    s.psql("CREATE TABLE t (n int PRIMARY KEY, note text)");
    let repo = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (identity, public) = crate::common::age_key(keys.path(), "key.txt");
    let identity = identity.to_string_lossy().into_owned();
    let age = [
        ("DBKEEPER_AGE_RECIPIENTS", public.as_str()),
        ("DBKEEPER_AGE_IDENTITY_FILE", identity.as_str()),
    ];
    let a = archiver(repo.path(), &s.url_as("keeper", Some(PW)), &age);
    assert!(
        wait_until(Duration::from_secs(60), || !sets(repo.path()).is_empty()),
        "{}",
        a.log()
    );
    std::thread::sleep(Duration::from_millis(500));
    insert(&s, 1, 2, "secret-row");
    let t = between();
    wait_reach(&a, t);
    a.stop();
    // Every piece is an age file, and no row is readable in it.
    let mut n = 0;
    for run_dir in std::fs::read_dir(repo.path().join("pitr/postgres")).unwrap() {
        for f in std::fs::read_dir(run_dir.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.contains(".wal.zst") {
                assert!(name.ends_with(".wal.zst.age"), "{name}");
                let bytes = std::fs::read(&p).unwrap();
                assert!(bytes.starts_with(b"age-encryption.org/v1"), "{name}");
                n += 1;
            }
        }
    }
    assert!(n > 0);
    // Without the identity: one line, and the directory stays empty.
    let (_keep, dir) = empty_pgdata();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_AGE_RECIPIENTS", &public)
        .env("DBKEEPER_POSTGRES_DATA_DIR", &dir)
        .env("DBKEEPER_POSTGRES_MAJOR", "15")
        .args([
            "restore",
            "--only",
            "postgres",
            "--to-time",
            &t.to_rfc3339(),
        ]));
    assert_ne!(code(&o), 0);
    assert!(
        stderr(&o).contains("DBKEEPER_AGE_IDENTITY_FILE"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // With it: the rows.
    let o = run(dbkeeper(repo.path())
        .envs(age)
        .env("DBKEEPER_POSTGRES_DATA_DIR", &dir)
        .env("DBKEEPER_POSTGRES_MAJOR", "15")
        .args([
            "restore",
            "--only",
            "postgres",
            "--to-time",
            &t.to_rfc3339(),
        ]));
    assert_code(&o, 0);
    let mut copy = recovered(&dir);
    assert_eq!(rows(&copy), ["1:secret-row", "2:secret-row"]);
    copy.stop();
}

#[test]
fn postgres_pitr_settings_that_cannot_work_are_refused_at_start() {
    let repo = tempfile::tempdir().unwrap();
    let port = crate::common::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("DBKEEPER_POSTGRES_PITR", "on")],
            "DBKEEPER_POSTGRES_PITR=on needs DBKEEPER_POSTGRES_URL",
        ),
        (
            &[("DBKEEPER_POSTGRES_SLOT", "Bad-Slot")],
            "DBKEEPER_POSTGRES_SLOT",
        ),
        (
            &[("DBKEEPER_PRESEED_TO_TIME", "yesterday")],
            "DBKEEPER_PRESEED_TO_TIME",
        ),
    ];
    for (env, says) in cases {
        let o = run(dbkeeper(repo.path())
            .envs(env.iter().copied())
            .env("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")
            .env("DBKEEPER_LISTEN", &listen)
            .arg("sidecar"));
        assert_code(&o, 2);
        let err = stderr(&o);
        assert!(err.contains(says), "{err}");
        // The start-up banner may come first; the refusal is one line.
        let errors = err.lines().filter(|l| l.starts_with("dbkeeper:")).count();
        assert_eq!(errors, 1, "{err}");
    }
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_ALERT_POSTGRES_SLOT_LAG", "lots")
        .env("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")
        .env("DBKEEPER_LISTEN", &listen)
        .arg("sidecar"));
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("DBKEEPER_ALERT_POSTGRES_SLOT_LAG"),
        "{}",
        stderr(&o)
    );
}
