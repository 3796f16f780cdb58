//! `GET /metrics`: the Prometheus text exposition format (0.0.4). Written by hand: it is a
//! dozen gauges read from the sidecar's state, which a metrics registry would only mirror.

use std::fmt::Write;

use chrono::Utc;

use super::Sidecar;
use super::state::JobStatus;
use crate::engine::EngineOps;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", fmt_f64(v));
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

pub fn render(app: &Sidecar) -> String {
    let now = Utc::now();
    let (_, age, fresh) = app.freshness(now);
    let g = app.state.lock();
    let mut o = Out(String::with_capacity(4096));

    o.family(
        "dbkeeper_engine_up",
        "gauge",
        "Whether the engine answered the last health probe (1) or not (0).",
    );
    for e in &app.engines {
        let up = g.engines.get(&e.kind()).is_some_and(|h| h.up);
        o.sample(
            "dbkeeper_engine_up",
            &[("engine", e.kind().name())],
            up as u8 as f64,
        );
    }
    o.family(
        "dbkeeper_engine_probe_duration_seconds",
        "gauge",
        "How long the last health probe took.",
    );
    for (k, h) in &g.engines {
        o.sample(
            "dbkeeper_engine_probe_duration_seconds",
            &[("engine", k.name())],
            h.latency_seconds,
        );
    }

    o.family(
        "dbkeeper_backup_last_success_timestamp_seconds",
        "gauge",
        "When the newest verified backup of the engine finished (Unix time).",
    );
    for (k, t) in &g.last_success {
        o.sample(
            "dbkeeper_backup_last_success_timestamp_seconds",
            &[("engine", k.name())],
            t.timestamp_millis() as f64 / 1000.0,
        );
    }
    if let Some(run) = &g.last_backup {
        o.family(
            "dbkeeper_backup_last_status",
            "gauge",
            "Outcome of the engine in the last backup run: 1 succeeded, 0 failed or cancelled.",
        );
        for (k, r) in &run.engines {
            o.sample(
                "dbkeeper_backup_last_status",
                &[("engine", k.name())],
                (r.status == JobStatus::Succeeded) as u8 as f64,
            );
        }
        o.family(
            "dbkeeper_backup_last_duration_seconds",
            "gauge",
            "How long the engine's dump took in the last successful run.",
        );
        for (k, r) in &run.engines {
            if let Some(d) = r.duration_seconds {
                o.sample(
                    "dbkeeper_backup_last_duration_seconds",
                    &[("engine", k.name())],
                    d,
                );
            }
        }
        o.family(
            "dbkeeper_backup_last_size_bytes",
            "gauge",
            "Stored (compressed) size of the engine's part of the last successful run.",
        );
        for (k, r) in &run.engines {
            if let Some(b) = r.bytes {
                o.sample(
                    "dbkeeper_backup_last_size_bytes",
                    &[("engine", k.name())],
                    b as f64,
                );
            }
        }
        o.family(
            "dbkeeper_backup_last_run_duration_seconds",
            "gauge",
            "Wall time of the last backup run (backup, verify and retention).",
        );
        o.sample(
            "dbkeeper_backup_last_run_duration_seconds",
            &[],
            run.duration.as_secs_f64(),
        );
        o.family(
            "dbkeeper_backup_last_run_timestamp_seconds",
            "gauge",
            "When the last backup run finished (Unix time), whatever its outcome.",
        );
        o.sample(
            "dbkeeper_backup_last_run_timestamp_seconds",
            &[],
            run.finished_at.timestamp_millis() as f64 / 1000.0,
        );
    }
    o.family(
        "dbkeeper_backup_runs_total",
        "counter",
        "Backup runs since the sidecar started, by result.",
    );
    for result in ["succeeded", "failed", "cancelled"] {
        let n = g.runs.get(result).copied().unwrap_or(0);
        o.sample(
            "dbkeeper_backup_runs_total",
            &[("result", result)],
            n as f64,
        );
    }
    o.family(
        "dbkeeper_backup_runs_skipped_total",
        "counter",
        "Scheduled runs skipped because a job was still running.",
    );
    o.sample("dbkeeper_backup_runs_skipped_total", &[], g.skipped as f64);
    o.family(
        "dbkeeper_backup_running",
        "gauge",
        "Whether a job is running now.",
    );
    let running = g.jobs.iter().any(|j| !j.status.is_finished());
    o.sample("dbkeeper_backup_running", &[], running as u8 as f64);
    o.family(
        "dbkeeper_backup_newest_verified_age_seconds",
        "gauge",
        "Age of the newest verified set (the sidecar's uptime when there is none).",
    );
    o.sample("dbkeeper_backup_newest_verified_age_seconds", &[], age);
    o.family(
        "dbkeeper_backup_fresh",
        "gauge",
        "Whether the newest verified set is younger than the maximum backup age.",
    );
    o.sample("dbkeeper_backup_fresh", &[], fresh.is_ok() as u8 as f64);
    if let Some(tr) = &g.last_test_restore {
        o.family(
            "dbkeeper_test_restore_last_status",
            "gauge",
            "Outcome of the last test-restore: 1 succeeded, 0 otherwise.",
        );
        o.sample(
            "dbkeeper_test_restore_last_status",
            &[],
            (tr.status == JobStatus::Succeeded) as u8 as f64,
        );
    }

    o.family(
        "dbkeeper_repository_sets",
        "gauge",
        "Backup sets in the repository.",
    );
    o.sample("dbkeeper_repository_sets", &[], g.repo.sets as f64);
    o.family(
        "dbkeeper_repository_bytes",
        "gauge",
        "Stored bytes of every set in the repository, per the manifests.",
    );
    o.sample("dbkeeper_repository_bytes", &[], g.repo.bytes as f64);
    if let (Some(free), Some(total)) = (g.repo.free_bytes, g.repo.total_bytes) {
        o.family(
            "dbkeeper_repository_free_bytes",
            "gauge",
            "Bytes available to dbkeeper on the repository's filesystem.",
        );
        o.sample("dbkeeper_repository_free_bytes", &[], free as f64);
        o.family(
            "dbkeeper_repository_size_bytes",
            "gauge",
            "Size of the repository's filesystem.",
        );
        o.sample("dbkeeper_repository_size_bytes", &[], total as f64);
    }
    if let Some(p) = app
        .pitr
        .as_ref()
        .and_then(|p| p.lock().ok().map(|g| g.clone()))
    {
        o.family(
            "dbkeeper_pitr_up",
            "gauge",
            "Whether the oplog archiver is running (1) or not (0).",
        );
        o.sample("dbkeeper_pitr_up", &[], p.running as u8 as f64);
        if let Some(n) = p.newest {
            o.family(
                "dbkeeper_pitr_newest_recoverable_timestamp_seconds",
                "gauge",
                "The newest point a point-in-time restore can reach (Unix time of the newest archived oplog entry).",
            );
            o.sample(
                "dbkeeper_pitr_newest_recoverable_timestamp_seconds",
                &[],
                f64::from(n.t),
            );
        }
        o.family(
            "dbkeeper_pitr_lag_seconds",
            "gauge",
            "From a write to the publication of the oplog segment holding it, for the newest segment.",
        );
        o.sample("dbkeeper_pitr_lag_seconds", &[], p.lag_seconds);
        o.family(
            "dbkeeper_pitr_gap",
            "gauge",
            "1 while the archive has a gap no set has closed yet.",
        );
        o.sample("dbkeeper_pitr_gap", &[], p.gap.is_some() as u8 as f64);
        for (name, help, v) in [
            (
                "dbkeeper_pitr_segments_total",
                "Oplog segments published by this process.",
                p.segments_total,
            ),
            (
                "dbkeeper_pitr_entries_total",
                "Oplog entries archived by this process.",
                p.entries_total,
            ),
            (
                "dbkeeper_pitr_bytes_total",
                "Stored bytes of the oplog segments published by this process.",
                p.bytes_total,
            ),
        ] {
            o.family(name, "counter", help);
            o.sample(name, &[], v as f64);
        }
    }
    if app.remote.is_some() {
        let r = &g.remote;
        if let Some(t) = r.last_success {
            o.family(
                "dbkeeper_remote_last_success_timestamp_seconds",
                "gauge",
                "When the off-host copy was last brought up to date (Unix time).",
            );
            o.sample(
                "dbkeeper_remote_last_success_timestamp_seconds",
                &[],
                t.timestamp_millis() as f64 / 1000.0,
            );
        }
        if let Some((_, t)) = &r.newest {
            o.family(
                "dbkeeper_remote_newest_set_timestamp_seconds",
                "gauge",
                "When the newest set on the remote was started (Unix time).",
            );
            o.sample(
                "dbkeeper_remote_newest_set_timestamp_seconds",
                &[],
                t.timestamp_millis() as f64 / 1000.0,
            );
        }
        o.family(
            "dbkeeper_remote_uploaded_bytes_total",
            "counter",
            "Bytes copied to the remote by this process.",
        );
        o.sample(
            "dbkeeper_remote_uploaded_bytes_total",
            &[],
            r.uploaded_bytes_total as f64,
        );
        o.family(
            "dbkeeper_remote_uploaded_sets_total",
            "counter",
            "Sets copied to the remote by this process.",
        );
        o.sample(
            "dbkeeper_remote_uploaded_sets_total",
            &[],
            r.uploaded_sets_total as f64,
        );
        o.family(
            "dbkeeper_remote_failures_total",
            "counter",
            "Attempts to bring the remote up to date that failed.",
        );
        o.sample(
            "dbkeeper_remote_failures_total",
            &[],
            r.failures_total as f64,
        );
        o.family(
            "dbkeeper_remote_up_to_date",
            "gauge",
            "Whether the last copy to the remote succeeded (1) or failed (0).",
        );
        o.sample(
            "dbkeeper_remote_up_to_date",
            &[],
            (r.last_error.is_none()) as u8 as f64,
        );
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_numbers_are_escaped_for_the_text_format() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(fmt_f64(1.5), "1.5");
        assert_eq!(fmt_f64(3.0), "3");
        assert_eq!(fmt_f64(f64::INFINITY), "+Inf");
        let mut o = Out(String::new());
        o.family("x_total", "counter", "help");
        o.sample("x_total", &[("a", "1"), ("b", "q\"")], 2.0);
        assert_eq!(
            o.0,
            "# HELP x_total help\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\"} 2\n"
        );
    }
}
