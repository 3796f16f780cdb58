//! The shipped alert rules (`compose/prometheus/alerts.yml`) against Debian's `promtool`: the
//! file loads, and its unit tests (`alerts_test.yml`) pass, with a case that fires and a case
//! that stays silent for every rule.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::chroma::py;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("compose/prometheus")
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
