//! `GET /metrics`: the sidecar's state and the engines' statistics, encoded at scrape time by
//! one prometheus-client [`Collector`] from memory only (a scrape never touches a database).
//! OpenMetrics 1.0 when the scraper asks for it (`Accept: application/openmetrics-text`),
//! otherwise the Prometheus text format 0.0.4 that `curl` users and older scrapers expect.
//!
//! Every family, ours and the engines', goes through the neutral [`Family`] model: a counter's
//! name is its sample name with `_total`, and the encoders add `_total` back to the family name
//! they are given, so the exposed names are the same in both formats.

use std::fmt;
use std::sync::Arc;

use chrono::Utc;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::Sidecar;
use super::state::JobStatus;
use super::stats::{EngineStats, up_name};
use crate::engine::{EngineKind, EngineOps};
use crate::stats::{Family, Kind};

pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition format of a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4.
    Text,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header prefers it at least as much as plain text (what
    /// Prometheus sends: OpenMetrics first, text/plain at a lower q); otherwise text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut om, mut text) = (0.0f64, 0.0f64);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => om = om.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if om > 0.0 && om >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => PROMETHEUS_TEXT,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// One scrape's page: the sidecar's own families and each engine's last statistics round.
struct Page {
    own: Vec<Family>,
    rounds: Vec<(EngineKind, Arc<EngineStats>)>,
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("own", &self.own.len())
            .field("rounds", &self.rounds.len())
            .finish()
    }
}

impl Collector for Page {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        for f in &self.own {
            encode_family(&mut enc, f)?;
        }
        for (kind, round) in &self.rounds {
            let up = up_name(*kind);
            for f in round.families.iter().filter(|f| f.name != up) {
                encode_family(&mut enc, f)?;
            }
        }
        Ok(())
    }
}

fn encode_family(enc: &mut DescriptorEncoder, f: &Family) -> fmt::Result {
    // The encoders append `_total` to a counter's family name. A counter without the suffix
    // (not what the stats contract allows) is exposed as a gauge under its own name rather
    // than renamed.
    let (name, ty) = match f.kind {
        Kind::Counter => match f.name.strip_suffix("_total") {
            Some(base) => (base, MetricType::Counter),
            None => (f.name.as_str(), MetricType::Gauge),
        },
        Kind::Gauge => (f.name.as_str(), MetricType::Gauge),
    };
    let mut m = enc.encode_descriptor(name, &f.help, None, ty)?;
    for s in &f.samples {
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let sm = m.encode_family(&labels)?;
        encode_value(sm, ty, s.value)?;
    }
    Ok(())
}

/// Whole numbers are written as integers (`5`, not `5.0`), as the exporters write them.
fn encode_value(mut m: MetricEncoder, ty: MetricType, v: f64) -> fmt::Result {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    let whole = v.fract() == 0.0 && v.abs() < EXACT;
    match ty {
        MetricType::Counter if whole && v >= 0.0 => {
            m.encode_counter::<NoLabelSet, u64, f64>(&(v as u64), None)
        }
        MetricType::Counter => m.encode_counter::<NoLabelSet, f64, f64>(&v, None),
        _ if whole => m.encode_gauge(&(v as i64)),
        _ => m.encode_gauge(&v),
    }
}

/// The page in `format`. Reads the state under its lock once, then encodes without it.
pub fn render(app: &Sidecar, format: Format) -> String {
    let own = own_families(app);
    let rounds = app.stats.snapshot();
    let mut all = own;
    all.extend(engine_health(app, &rounds));
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Page { own: all, rounds }));
    let mut out = String::with_capacity(16 * 1024);
    let r = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &registry),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
    };
    // Writing into a String cannot fail; an encoder error would be a bug in a name.
    if let Err(e) = r {
        tracing::warn!(error = %e, "metrics page not encoded");
    }
    out
}

/// What the sidecar says about each engine's statistics: `<engine>_up`, when and how fast
/// the last round ran. Engines whose first round has not finished yet have none.
fn engine_health(app: &Sidecar, rounds: &[(EngineKind, Arc<EngineStats>)]) -> Vec<Family> {
    let mut out = Vec::new();
    for (kind, r) in rounds {
        out.push(Family::single(
            up_name(*kind),
            Kind::Gauge,
            format!(
                "Whether the last statistics round of the {kind} server succeeded (1) or not (0)."
            ),
            r.up as u8 as f64,
        ));
    }
    let mut at = Family::new(
        "dbkeeper_stats_last_round_timestamp_seconds",
        Kind::Gauge,
        "When the engine's last statistics round ended (Unix time); its figures are this old.",
    );
    let mut took = Family::new(
        "dbkeeper_stats_round_duration_seconds",
        Kind::Gauge,
        "How long the engine's last statistics round took.",
    );
    for (kind, r) in rounds {
        let l = [("engine", kind.name())];
        at.push(&l, r.gathered_at.timestamp_millis() as f64 / 1000.0);
        took.push(&l, r.duration_seconds);
    }
    out.push(Family::single(
        "dbkeeper_stats_interval_seconds",
        Kind::Gauge,
        "How often the engines' statistics are gathered (DBKEEPER_STATS_INTERVAL).",
        app.cfg.stats_interval.as_secs_f64(),
    ));
    out.push(at);
    out.push(took);
    out
}

/// The sidecar's families as they are built: a family, then its samples.
struct Out(Vec<Family>);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let kind = if kind == "counter" {
            Kind::Counter
        } else {
            Kind::Gauge
        };
        self.0.push(Family::new(name, kind, help));
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        match self.0.last_mut() {
            Some(f) if f.name == name => f.push(labels, v),
            _ => debug_assert!(false, "sample {name} outside its family"),
        }
    }
}

/// The sidecar's own families (`dbkeeper_*`, `database_health_status`), read from its state.
fn own_families(app: &Sidecar) -> Vec<Family> {
    let now = Utc::now();
    let (_, age, fresh) = app.freshness(now);
    let g = app.state.lock();
    let mut o = Out(Vec::with_capacity(40));

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

    // The seed's name for the same fact as `dbkeeper_engine_up`, so its dashboards keep
    // working: 1 when the engine answered the last health probe.
    o.family(
        "database_health_status",
        "gauge",
        "Database health status: whether the engine answered the last health probe (1) or not (0).",
    );
    for e in &app.engines {
        let up = g.engines.get(&e.kind()).is_some_and(|h| h.up);
        o.sample(
            "database_health_status",
            &[("engine", e.kind().name())],
            up as u8 as f64,
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
    if let Some(p) = app
        .pg_pitr
        .as_ref()
        .and_then(|p| p.lock().ok().map(|g| g.clone()))
    {
        o.family(
            "dbkeeper_postgres_pitr_up",
            "gauge",
            "Whether the PostgreSQL WAL archiver is streaming (1) or not (0).",
        );
        o.sample("dbkeeper_postgres_pitr_up", &[], p.running as u8 as f64);
        if let Some(t) = p.reach {
            o.family(
                "dbkeeper_postgres_pitr_newest_recoverable_timestamp_seconds",
                "gauge",
                "The newest point a PostgreSQL point-in-time recovery can reach (Unix time).",
            );
            o.sample(
                "dbkeeper_postgres_pitr_newest_recoverable_timestamp_seconds",
                &[],
                t.timestamp_micros() as f64 / 1e6,
            );
        }
        if let Some(lag) = p.slot_lag_bytes {
            o.family(
                "dbkeeper_postgres_slot_lag_bytes",
                "gauge",
                "WAL the server keeps for the archiver's replication slot (its flush position less the slot's restart point).",
            );
            o.sample("dbkeeper_postgres_slot_lag_bytes", &[], lag as f64);
        }
        o.family(
            "dbkeeper_postgres_pitr_gap",
            "gauge",
            "1 while the WAL archive has a gap no set has closed yet.",
        );
        o.sample(
            "dbkeeper_postgres_pitr_gap",
            &[],
            p.gap.is_some() as u8 as f64,
        );
        for (name, help, v) in [
            (
                "dbkeeper_postgres_pitr_segments_total",
                "Whole WAL segments published by this process.",
                p.segments_total,
            ),
            (
                "dbkeeper_postgres_pitr_bytes_total",
                "Stored bytes of the WAL published by this process (partial segments each time).",
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

    fn page(own: Vec<Family>, format: Format) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Page {
            own,
            rounds: Vec::new(),
        }));
        let mut out = String::new();
        match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        }
        .unwrap();
        out
    }

    fn families() -> Vec<Family> {
        let mut c = Family::new("x_runs_total", Kind::Counter, "Runs.");
        c.push(&[("a", "1"), ("b", "q\"\n")], 2.0);
        vec![
            c,
            Family::single("x_ratio", Kind::Gauge, "A ratio.", 1.5),
            Family::single("x_up", Kind::Gauge, "Up.", 1.0),
        ]
    }

    #[test]
    fn counters_keep_their_total_name_and_values_are_escaped_in_text() {
        assert_eq!(
            page(families(), Format::Text),
            "# HELP x_runs_total Runs.\n# TYPE x_runs_total counter\n\
             x_runs_total{a=\"1\",b=\"q\\\"\\n\"} 2\n\
             # HELP x_ratio A ratio.\n# TYPE x_ratio gauge\nx_ratio 1.5\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }

    #[test]
    fn openmetrics_declares_counters_without_total_and_ends_with_eof() {
        let p = page(families(), Format::OpenMetrics);
        assert!(
            p.starts_with("# HELP x_runs Runs.\n# TYPE x_runs counter\n"),
            "{p}"
        );
        assert!(p.contains("\nx_runs_total{a=\"1\","), "{p}");
        assert!(p.ends_with("x_up 1\n# EOF\n"), "{p}");
    }

    #[test]
    fn a_counter_without_total_is_a_gauge_under_its_own_name() {
        let f = Family::single("x_odd", Kind::Counter, "Odd.", 3.0);
        let p = page(vec![f], Format::Text);
        assert_eq!(p, "# HELP x_odd Odd.\n# TYPE x_odd gauge\nx_odd 3\n");
    }

    #[test]
    fn openmetrics_is_served_when_asked_for_first() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("text/plain, application/openmetrics-text;q=0.5")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }
}
