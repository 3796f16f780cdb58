//! Replica sets in `init`, `wait` and `health` against `secantusd-rs`, which always runs as an
//! initiated one-member set named "secantus" (or, with `--standalone`, without replication):
//! the initiated set is left as it is, another name and a standalone are one-line errors, and
//! the health line names the member's state. Initiating an uninitiated server cannot be run
//! here (the stand-in has no such state); `replset.rs`'s unit tests cover that decision. And
//! the compose override, checked with `docker compose config`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use mongodb::bson::doc;

use crate::common::mongodb::{Mongo, PASSWORD};
use crate::common::{assert_code, compose_binary, dbkeeper, run, stderr, stdout};

const SET: &str = "secantus";

/// `dbkeeper ARGS` against one MongoDB URI, with `DBKEEPER_MONGODB_REPLSET` when given.
fn dbk(repo: &Path, uri: &str, replset: Option<&str>, args: &[&str]) -> Output {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_MONGODB_URI", uri).args(args);
    if let Some(set) = replset {
        c.env("DBKEEPER_MONGODB_REPLSET", set);
    }
    let o = run(&mut c);
    for s in [stdout(&o), stderr(&o)] {
        assert!(!s.contains(PASSWORD), "password leaked:\n{s}");
        assert!(!s.contains("panicked"), "{s}");
    }
    o
}

/// The one `dbkeeper: …` error line.
#[track_caller]
fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dbkeeper:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_owned()
}

fn config_version(m: &Mongo) -> i64 {
    let reply = m.command("admin", doc! {"replSetGetConfig": 1});
    let config = reply.get_document("config").expect("config");
    match config.get("version") {
        Some(mongodb::bson::Bson::Int32(v)) => *v as i64,
        Some(mongodb::bson::Bson::Int64(v)) => *v,
        other => panic!("config version {other:?}"),
    }
}

#[test]
fn init_leaves_the_initiated_set_of_the_configured_name_as_it_is() {
    for auth in [false, true] {
        let m = Mongo::start(auth, false);
        let before = m.command("admin", doc! {"replSetGetConfig": 1});
        let version = config_version(&m);
        let repo = tempfile::tempdir().unwrap();
        // directConnection as compose gives it, and a bare seed the driver would discover.
        for discover in [false, true] {
            let o = dbk(
                repo.path(),
                &m.uri_with(discover),
                Some(SET),
                &["init", "--timeout", "30s"],
            );
            assert_code(&o, 0);
            let err = stderr(&o);
            assert!(err.contains("initiated already; left as it is"), "{err}");
            assert!(err.contains("role=primary set=secantus"), "{err}");
        }
        assert_eq!(config_version(&m), version, "auth={auth}");
        let after = m.command("admin", doc! {"replSetGetConfig": 1});
        assert_eq!(
            after.get_document("config").unwrap(),
            before.get_document("config").unwrap()
        );
    }
}

#[test]
fn another_set_name_is_one_line_and_never_a_reconfiguration() {
    let m = Mongo::start(true, false);
    let version = config_version(&m);
    let repo = tempfile::tempdir().unwrap();
    for verb in ["init", "wait"] {
        let start = Instant::now();
        let o = dbk(
            repo.path(),
            &m.uri(),
            Some("rs0"),
            &[verb, "--timeout", "60s"],
        );
        assert_code(&o, 1);
        // Refused at once, not retried until the deadline.
        assert!(start.elapsed() < Duration::from_secs(30), "{verb}");
        let line = one_error_line(&o);
        assert!(
            line.contains(
                r#"the server is in replica set "secantus", but DBKEEPER_MONGODB_REPLSET is "rs0""#
            ) && line.contains("never reconfigures"),
            "{verb}: {line}"
        );
    }
    assert_eq!(config_version(&m), version);
}

#[test]
fn a_standalone_with_a_replset_configured_is_one_line() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    for verb in ["init", "wait"] {
        let o = dbk(
            repo.path(),
            &m.uri(),
            Some("rs0"),
            &[verb, "--timeout", "60s"],
        );
        assert_code(&o, 1);
        let line = one_error_line(&o);
        assert!(
            line.contains("runs without replication") && line.contains("--replSet rs0"),
            "{verb}: {line}"
        );
    }
    // Without the setting a standalone is ready and healthy, as before.
    let o = dbk(repo.path(), &m.uri(), None, &["init", "--timeout", "30s"]);
    assert_code(&o, 0);
    let o = dbk(repo.path(), &m.uri(), None, &["health", &m.uri()]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("role=standalone"), "{}", stdout(&o));
}

#[test]
fn health_and_wait_name_the_primary_state_and_its_lag() {
    for auth in [false, true] {
        let m = Mongo::start(auth, false);
        let repo = tempfile::tempdir().unwrap();
        let uri = m.uri();
        // Without credentials: the hand-written OP_MSG probe; with them: the driver.
        let o = dbk(repo.path(), &uri, None, &["health", &uri]);
        assert_code(&o, 0);
        let line = stdout(&o);
        assert_eq!(line.trim().lines().count(), 1, "{line}");
        assert!(line.starts_with("healthy: mongodb://"), "{line}");
        assert!(
            line.contains("role=primary set=secantus lag=0s wire="),
            "auth={auth}: {line}"
        );
        // The same through `dbkeeper-health`, the name the compose healthcheck runs.
        let o = run(std::process::Command::new(crate::common::bin())
            .arg0_health()
            .arg(&uri));
        assert_code(&o, 0);
        assert!(
            stdout(&o).contains("role=primary set=secantus"),
            "{}",
            stdout(&o)
        );
        for set in [None, Some(SET)] {
            let o = dbk(repo.path(), &uri, set, &["wait", "--timeout", "30s"]);
            assert_code(&o, 0);
            assert!(
                stderr(&o).contains("role=primary set=secantus"),
                "{}",
                stderr(&o)
            );
        }
    }
}

trait Arg0Health {
    fn arg0_health(&mut self) -> &mut Self;
}

impl Arg0Health for std::process::Command {
    fn arg0_health(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.arg0("dbkeeper-health")
    }
}

#[test]
fn the_compose_replset_override_is_valid_and_wires_init() {
    let Some(compose) = compose_binary() else {
        eprintln!("SKIPPED: no docker-compose (Compose v2) binary; run .ci/install");
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compose");
    let o = run(std::process::Command::new(&compose)
        .current_dir(&dir)
        .env_remove("COMPOSE_FILE")
        .env_remove("MONGO_REPLSET")
        .args([
            "-f",
            "compose.yaml",
            "-f",
            "compose.replset.yaml",
            "config",
            "--format",
            "json",
        ]));
    assert_code(&o, 0);
    let c: serde_json::Value = serde_json::from_slice(&o.stdout).expect("compose config JSON");
    let s = &c["services"];
    assert_eq!(
        s["mongo"]["command"],
        serde_json::json!(["--replSet", "rs0", "--keyFile", "/etc/mongo-keyfile/key"])
    );
    assert_eq!(
        s["mongo"]["depends_on"]["mongo-keyfile"]["condition"],
        "service_completed_successfully"
    );
    let mounts = s["mongo"]["volumes"].as_array().unwrap();
    assert!(
        mounts.iter().any(|v| v["source"] == "mongo-keyfile"
            && v["target"] == "/etc/mongo-keyfile"
            && v["read_only"] == true),
        "{mounts:?}"
    );
    // The base file's mounts are kept.
    assert!(
        mounts.iter().any(|v| v["target"] == "/data/db"),
        "{mounts:?}"
    );
    let env = &s["preseed"]["environment"];
    assert_eq!(env["DBKEEPER_MONGODB_REPLSET"], "rs0");
    assert_eq!(env["DBKEEPER_MONGODB_REPLSET_MEMBERS"], "mongo:27017");
    assert!(
        env["DBKEEPER_MONGODB_URI"]
            .as_str()
            .unwrap()
            .contains("@mongo:27017/"),
        "{env}"
    );
    // An uninitiated member is unhealthy until `init` initiates it: preseed must not wait
    // for its healthcheck.
    assert_eq!(
        s["preseed"]["depends_on"]["mongo"]["condition"],
        "service_started"
    );
    assert_eq!(
        s["preseed"]["depends_on"]["chroma"]["condition"],
        "service_healthy"
    );
    assert_eq!(s["mongo-keyfile"]["user"], "0:0");
    assert!(
        c["volumes"]["mongo-keyfile"].is_object(),
        "{}",
        c["volumes"]
    );
}
