//! The shipped monitoring configuration: the alert rules (`compose/prometheus/alerts.yml`)
//! against Debian's `promtool` (the file loads; its unit tests in `alerts_test.yml` pass, with a
//! case that fires and a case that stays silent for every rule), the Prometheus configuration,
//! the compose `monitoring` profile, and the Grafana dashboard's queries.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::chroma::{ChromaServer, py};
use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::{assert_code, compose_binary, free_port, run, wait_until};
use crate::metrics::{Sidecar, request};

fn compose_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compose")
}

fn dir() -> PathBuf {
    compose_dir().join("prometheus")
}

fn promtool(args: &[&str]) -> String {
    let o = Command::new("promtool")
        .args(args)
        .current_dir(dir())
        .output()
        .expect("promtool (Debian's prometheus package; .ci/install installs it)");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "promtool {args:?}:\n{out}");
    out
}

#[test]
fn the_alert_rules_load_and_their_unit_tests_pass() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// promtool passes a rule no test names: every rule must be named by a case where it fires
/// and a case where it stays silent.
#[test]
fn every_rule_has_a_firing_and_a_silent_case() {
    let script = r#"
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
tests = yaml.safe_load(open(sys.argv[2]))
names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
fires, silent = set(), set()
for t in tests["tests"]:
    for a in t.get("alert_rule_test", []):
        (fires if a.get("exp_alerts") else silent).add(a["alertname"])
for n in names:
    print(n, n in fires, n in silent)
"#;
    let d = dir();
    let out = py(
        script,
        &[
            d.join("alerts.yml").to_str().unwrap(),
            d.join("alerts_test.yml").to_str().unwrap(),
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 15, "{out}");
    for l in lines {
        assert!(l.ends_with("True True"), "a rule without both cases: {l}");
    }
}

#[test]
fn the_prometheus_configuration_loads_with_its_rules() {
    let out = promtool(&["check", "config", "prometheus.yml"]);
    assert!(out.contains("SUCCESS: 1 rule files found"), "{out}");
}

/// `--profile monitoring` adds Prometheus and Grafana with the shipped files mounted; without
/// it the stack is as before.
#[test]
fn the_monitoring_profile_adds_prometheus_and_grafana() {
    let Some(compose) = compose_binary() else {
        eprintln!("SKIPPED: no docker-compose (Compose v2) binary; run .ci/install");
        return;
    };
    let config = |profile: &[&str]| -> serde_json::Value {
        let o = run(Command::new(&compose)
            .current_dir(compose_dir())
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROFILES")
            .args(profile)
            .args(["-f", "compose.yaml", "config", "--format", "json"]));
        assert_code(&o, 0);
        serde_json::from_slice(&o.stdout).expect("compose config JSON")
    };
    let plain = config(&[]);
    assert!(plain["services"].get("prometheus").is_none());
    assert!(plain["services"].get("grafana").is_none());
    let with = config(&["--profile", "monitoring"]);
    let s = &with["services"];
    for (service, target) in [
        ("prometheus", "/etc/prometheus"),
        ("grafana", "/etc/grafana/provisioning"),
        ("grafana", "/var/lib/grafana/dashboards/dbkeeper.json"),
    ] {
        let mounts = s[service]["volumes"].as_array().unwrap();
        let m = mounts
            .iter()
            .find(|v| v["target"] == target)
            .unwrap_or_else(|| panic!("{service}: no mount at {target}: {mounts:?}"));
        assert_eq!(m["read_only"], true, "{m}");
        let source = Path::new(m["source"].as_str().unwrap());
        assert!(
            source.exists(),
            "{service}: {} is missing",
            source.display()
        );
    }
    // Prometheus reaches the sidecar: a network in common.
    let nets = |svc: &str| -> Vec<String> {
        s[svc]["networks"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let sidecar = nets("sidecar");
    assert!(nets("prometheus").iter().any(|n| sidecar.contains(n)));
}

/// The metric names a PromQL expression reads: identifiers that are not functions,
/// aggregation keywords, label names or label values.
fn metric_names(expr: &str) -> Vec<String> {
    const WORDS: &[&str] = &[
        "rate",
        "irate",
        "increase",
        "sum",
        "avg",
        "min",
        "max",
        "topk",
        "bottomk",
        "count",
        "by",
        "without",
        "on",
        "ignoring",
        "and",
        "or",
        "unless",
        "resets",
        "delta",
        "abs",
        "histogram_quantile",
        "label_values",
        "group_left",
        "group_right",
    ];
    let mut names = Vec::new();
    let mut rest = expr;
    // Drop label matchers and ranges: what is inside {…} and […] names no metric.
    let mut cleaned = String::new();
    let mut depth = 0;
    for ch in rest.chars() {
        match ch {
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ if depth == 0 => cleaned.push(ch),
            _ => {}
        }
    }
    rest = &cleaned;
    for word in rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
        let starts_alpha = word
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if starts_alpha && word.contains('_') && !WORDS.contains(&word) {
            names.push(word.to_owned());
        }
    }
    names
}

/// Every expression of the Grafana dashboard, and the metric names they read.
fn dashboard_metrics() -> Vec<String> {
    let d: serde_json::Value = serde_json::from_slice(
        &std::fs::read(compose_dir().join("grafana/dbkeeper.json")).unwrap(),
    )
    .unwrap();
    let mut names: Vec<String> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .flat_map(|t| metric_names(t["expr"].as_str().unwrap()))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_in_every_panel() {
    let d: serde_json::Value = serde_json::from_slice(
        &std::fs::read(compose_dir().join("grafana/dbkeeper.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(d["uid"], "dbkeeper");
    for p in d["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            assert!(!metric_names(e).is_empty(), "{}: {e}", p["title"]);
        }
    }
    let names = dashboard_metrics();
    for prefix in ["dbkeeper_", "redis_", "mongodb_", "chroma_"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "{names:?}");
    }
    assert_eq!(
        metric_names(r#"rate(redis_keyspace_hits_total{instance=~"$instance"}[5m]) / dbkeeper_x"#),
        ["redis_keyspace_hits_total", "dbkeeper_x"]
    );
}

/// The sidecar on all three engines (MongoDB with PITR on, so its figures are there too),
/// after one backup: every family the dashboard and the alert rules read.
struct Stack {
    _redis: RedisServer,
    _mongo: Mongo,
    _chroma: ChromaServer,
    _repo: tempfile::TempDir,
    sidecar: Sidecar,
}

impl Stack {
    fn start() -> Stack {
        let redis = RedisServer::start();
        redis.cli(&["SET", "k", "v"]);
        let mongo = Mongo::start(false, false);
        mongo
            .block(
                mongo
                    .client()
                    .database("app")
                    .collection::<mongodb::bson::Document>("things")
                    .insert_one(mongodb::bson::doc! {"_id": 1}),
            )
            .unwrap();
        let chroma = ChromaServer::start();
        py(
            r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), settings=chromadb.Settings(anonymized_telemetry=False))
c.create_collection("notes").add(ids=["a"], embeddings=[[1.0, 2.0]])
"#,
            &[&chroma.port.to_string()],
        );
        let repo = tempfile::tempdir().unwrap();
        let (redis_url, mongo_uri, chroma_url) = (redis.url(), mongo.uri(), chroma.url());
        let sidecar = Sidecar::start(
            repo.path(),
            &[
                ("DBKEEPER_REDIS_URL", &redis_url),
                ("DBKEEPER_MONGODB_URI", &mongo_uri),
                ("DBKEEPER_CHROMA_URL", &chroma_url),
                ("DBKEEPER_MONGODB_PITR", "on"),
            ],
        );
        let (code, _, body) = request(sidecar.port, "POST", "/backups", None).unwrap();
        assert_eq!(code, 202, "{body}");
        let done = wait_until(Duration::from_secs(60), || {
            sidecar
                .metrics(None)
                .1
                .contains("dbkeeper_backup_last_status{engine=\"chroma\"} 1")
        });
        assert!(done, "no backup:\n{}", sidecar.log());
        Stack {
            _redis: redis,
            _mongo: mongo,
            _chroma: chroma,
            _repo: repo,
            sidecar,
        }
    }

    /// The metric names of one scrape, once every engine's statistics are in.
    fn scraped_names(&self) -> Vec<String> {
        let mut page = String::new();
        let ready = wait_until(Duration::from_secs(30), || {
            page = self.sidecar.metrics(None).1;
            [
                "redis_db_keys",
                "mongodb_connections",
                "chroma_collection_records",
            ]
            .iter()
            .all(|n| page.contains(n))
        });
        assert!(ready, "{page}\n{}", self.sidecar.log());
        let mut names: Vec<String> = page
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Every metric name a dashboard panel or an alert rule reads is in a real scrape, and a real
/// Prometheus server scraping the sidecar answers PromQL for a Redis, a MongoDB and a Chroma
/// series.
#[test]
fn dashboard_and_rules_read_what_the_sidecar_serves_and_prometheus_scrapes_it() {
    let stack = Stack::start();
    let scraped = stack.scraped_names();
    // promtool accepts the page of all three engines together.
    crate::metrics::promtool_check(&stack.sidecar.metrics(None).1, false);
    let missing: Vec<String> = dashboard_metrics()
        .into_iter()
        .filter(|n| !scraped.contains(n))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard metrics not served: {missing:?}"
    );
    let rules: serde_json::Value = {
        let text = py(
            "import sys, yaml, json; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            &[dir().join("alerts.yml").to_str().unwrap()],
        );
        serde_json::from_str(&text).unwrap()
    };
    // `up` is Prometheus's own; the PITR gap and the off-host copy need a gap and a remote.
    let not_here = [
        "up",
        "dbkeeper_remote_up_to_date",
        "dbkeeper_remote_failures_total",
        "dbkeeper_test_restore_last_status",
        "mongodb_mongod_replset_member_replication_lag",
        // PostgreSQL's WAL archive: served to a real scrape in postgres_pitr's tests.
        "dbkeeper_postgres_pitr_up",
        "dbkeeper_postgres_pitr_gap",
        "dbkeeper_postgres_slot_lag_bytes",
    ];
    let mut missing = Vec::new();
    for g in rules["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            for n in metric_names(r["expr"].as_str().unwrap()) {
                if !scraped.contains(&n) && !not_here.contains(&n.as_str()) {
                    missing.push(format!("{}: {n}", r["alert"]));
                }
            }
        }
    }
    assert!(missing.is_empty(), "rule metrics not served: {missing:?}");

    // A real Prometheus, scraping every second.
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: dbkeeper\n    static_configs: [{{targets: [\"127.0.0.1:{}\"]}}]\n",
            stack.sidecar.port
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(data.path().join("log")).unwrap())
        .spawn()
        .expect("prometheus (Debian's prometheus package; .ci/install installs it)");
    let query = |q: &str| -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", percent(q));
        let (code, _, body) = request(port, "GET", &path, None).ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200
            && v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty()))
        .then_some(v)
    };
    for q in [
        r#"redis_db_keys{db="db0"}"#,
        r#"mongodb_connections{state="current"}"#,
        r#"chroma_collection_records{collection="notes"}"#,
    ] {
        let mut got = None;
        let answered = wait_until(Duration::from_secs(30), || {
            got = query(q);
            got.is_some()
        });
        let log = std::fs::read_to_string(data.path().join("log")).unwrap_or_default();
        assert!(answered, "prometheus has no {q}:\n{log}");
        let value = got.unwrap()["data"]["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap();
        assert!(value >= 1.0, "{q} = {value}");
    }
    let _ = prom.kill();
    let _ = prom.wait();
}

/// Percent-encodes a PromQL query for a URL.
fn percent(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
