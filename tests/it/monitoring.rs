//! The shipped monitoring configuration: the alert rules (`compose/prometheus/alerts.yml`)
//! against Debian's `promtool` (the file loads; its unit tests in `alerts_test.yml` pass, with a
//! case that fires and a case that stays silent for every rule), the Prometheus configuration,
//! the compose `monitoring` profile, and the Grafana dashboard's queries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::chroma::py;
use crate::common::{assert_code, compose_binary, run};

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
pub fn metric_names(expr: &str) -> Vec<String> {
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
pub fn dashboard_metrics() -> Vec<String> {
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
