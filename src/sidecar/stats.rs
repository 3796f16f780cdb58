//! Database statistics in the background: one loop per engine calls its `stats` hook every
//! `DBKEEPER_STATS_INTERVAL`, bounded by a timeout, and keeps the last round in memory for
//! `/metrics` and `/stats`. Scrapes read memory only, so N scrapers cost the databases nothing
//! and a hung database makes its figures stale, never a scrape slow. Also `dbkeeper stats`,
//! which prints the same figures as a table.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Sidecar;
use crate::config::Config;
use crate::engine::{Engine, EngineKind, EngineOps};
use crate::error::{Error, Result};
use crate::stats::Family;

/// A round never takes longer than this, whatever the interval.
const MAX_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one round may take: never longer than the interval, so rounds do not pile up.
pub fn round_timeout(interval: Duration) -> Duration {
    interval.min(MAX_TIMEOUT)
}

/// One engine's last round.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Whether the round succeeded (the engine's `*_up`).
    pub up: bool,
    pub gathered_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub error: Option<String>,
    /// Empty when the round failed: figures of a server that does not answer are not served
    /// as if they were current.
    pub families: Vec<Family>,
    /// Evictions and restarts seen between rounds, for `/alerts`.
    pub events: super::db_alerts::Events,
}

/// The last round of every engine. Rounds are shared (`Arc`) so a scrape holds the lock only
/// to copy pointers, never while it encodes.
#[derive(Default)]
pub struct Store(Mutex<BTreeMap<EngineKind, Arc<EngineStats>>>);

impl Store {
    pub fn snapshot(&self) -> Vec<(EngineKind, Arc<EngineStats>)> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    pub fn get(&self, kind: EngineKind) -> Option<Arc<EngineStats>> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&kind).cloned()
    }

    fn put(&self, kind: EngineKind, s: EngineStats) -> Option<Arc<EngineStats>> {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(kind, Arc::new(s))
    }
}

/// The name of the family the sidecar adds for an engine: `redis_up`, `mongodb_up`,
/// `chroma_up`.
pub fn up_name(kind: EngineKind) -> String {
    format!("{}_up", kind.name())
}

/// One round of `engine`, bounded by `timeout` even if the engine's own bound fails.
pub async fn gather(engine: &Engine, timeout: Duration) -> EngineStats {
    let started = Instant::now();
    let r = match tokio::time::timeout(timeout, engine.stats(timeout)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unreachable {
            engine: engine.kind().name(),
            url: engine.display_url().to_owned(),
            message: format!("no statistics within {:.1}s", timeout.as_secs_f64()),
        }),
    };
    let duration_seconds = started.elapsed().as_secs_f64();
    let gathered_at = Utc::now();
    match r {
        Ok(families) => EngineStats {
            up: true,
            gathered_at,
            duration_seconds,
            error: None,
            families,
            events: Default::default(),
        },
        Err(e) => EngineStats {
            up: false,
            gathered_at,
            duration_seconds,
            error: Some(format!("{e:#}")),
            families: Vec::new(),
            events: Default::default(),
        },
    }
}

impl Sidecar {
    /// Gathers the statistics of `self.engines[i]` every interval until the sidecar stops.
    /// One loop per engine: a slow engine delays only its own figures.
    pub(super) async fn stats_loop(self: Arc<Self>, i: usize) {
        let engine = &self.engines[i];
        let kind = engine.kind();
        let interval = self.cfg.stats_interval;
        let timeout = round_timeout(interval);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.root.cancelled() => return,
            }
            let mut s = tokio::select! {
                s = gather(engine, timeout) => s,
                _ = self.root.cancelled() => return,
            };
            let before = self
                .stats
                .get(kind)
                .map(|p| p.events.clone())
                .unwrap_or_default();
            s.events = before.next(kind, &s.families, s.gathered_at);
            let (up, error, ms) = (s.up, s.error.clone(), (s.duration_seconds * 1000.0) as u64);
            let was = self.stats.put(kind, s).map(|p| p.up);
            if was != Some(up) {
                match error {
                    None => info!(engine = %kind, elapsed_ms = ms, "statistics gathered"),
                    Some(e) => warn!(engine = %kind, error = %e, "statistics not gathered"),
                }
            }
        }
    }
}

/// The `/stats` body: by engine, whether the last round succeeded, when it ran, and its
/// families with labels as objects.
pub fn to_json(interval: Duration, rounds: &[(EngineKind, Arc<EngineStats>)]) -> Value {
    let engines: serde_json::Map<String, Value> = rounds
        .iter()
        .map(|(k, s)| {
            let families: Vec<Value> = s
                .families
                .iter()
                .map(|f| {
                    let samples: Vec<Value> = f
                        .samples
                        .iter()
                        .map(|x| {
                            let labels: serde_json::Map<String, Value> = x
                                .labels
                                .iter()
                                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                                .collect();
                            json!({ "labels": labels, "value": x.value })
                        })
                        .collect();
                    json!({
                        "name": f.name,
                        "kind": f.kind,
                        "help": f.help,
                        "samples": samples,
                    })
                })
                .collect();
            let mut v = json!({
                "up": s.up,
                "gathered_at": s.gathered_at,
                "duration_seconds": s.duration_seconds,
                "families": families,
            });
            if let Some(e) = &s.error {
                v["error"] = json!(e);
            }
            (k.name().to_owned(), v)
        })
        .collect();
    json!({
        "interval_seconds": interval.as_secs_f64(),
        "engines": engines,
    })
}

/// Where `dbkeeper stats` reads its figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A sidecar's `GET /stats` (this URL).
    Sidecar(String),
    /// One round of each configured engine, gathered by this process.
    Direct,
}

/// The sidecar's `/stats` URL: `self` (the default) is the local sidecar, found from
/// `DBKEEPER_LISTEN` as `dbkeeper health self` finds it; a base URL gets `/stats` appended.
pub fn sidecar_url(target: &str, env: crate::config::EnvLookup<'_>) -> Result<String> {
    let base = match target {
        "self" => crate::role::health::resolve_self("self", env)?
            .trim_end_matches("/health")
            .to_owned(),
        other => other.trim_end_matches('/').to_owned(),
    };
    let base = base.strip_suffix("/stats").unwrap_or(&base).to_owned();
    match url::Url::parse(&base) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(format!("{base}/stats")),
        _ => Err(Error::config(format!(
            "--sidecar {}: expected self or a URL such as http://dbkeeper:9216",
            crate::secret::redact_url(target)
        ))),
    }
}

/// `dbkeeper stats [--watch]`: the figures as a table, once or every interval until a signal.
pub async fn cli(
    cfg: &Config,
    source: Source,
    watch: bool,
    cancel: &CancellationToken,
) -> Result<()> {
    let engines = match source {
        Source::Direct => cfg.engines_required(&[])?,
        Source::Sidecar(_) => Vec::new(),
    };
    let clear = watch && std::io::stdout().is_terminal();
    loop {
        let body = match &source {
            Source::Sidecar(url) => fetch(url).await?,
            Source::Direct => {
                let timeout = round_timeout(cfg.stats_interval);
                let rounds = join_all(
                    engines
                        .iter()
                        .map(|e| async move { (e.kind(), Arc::new(gather(e, timeout).await)) }),
                )
                .await;
                to_json(cfg.stats_interval, &rounds)
            }
        };
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", table(&body, Utc::now()));
        if !watch {
            return Ok(());
        }
        println!();
        tokio::select! {
            _ = tokio::time::sleep(cfg.stats_interval) => {}
            _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
        }
    }
}

/// `GET url` as JSON.
async fn fetch(url: &str) -> Result<Value> {
    let shown = crate::secret::redact_url(url);
    let unreachable = |message: String| Error::Unreachable {
        engine: "sidecar",
        url: shown.clone(),
        message,
    };
    // reqwest is built without a default crypto provider; installing ours twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| unreachable(format!("HTTP client: {e}")))?;
    let resp = client.get(url).send().await.map_err(|e| {
        unreachable(format!(
            "no answer ({}); is the sidecar running here? --sidecar URL names another, --direct gathers from the engines",
            e.without_url()
        ))
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(unreachable(format!("answered {status}")));
    }
    resp.json()
        .await
        .map_err(|e| unreachable(format!("not a /stats answer: {}", e.without_url())))
}

/// The figures as text: a line per engine, then one row per sample.
pub fn table(body: &Value, now: DateTime<Utc>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(engines) = body["engines"].as_object() else {
        return "no statistics\n".into();
    };
    if engines.is_empty() {
        out.push_str("no statistics gathered yet\n");
    }
    for (name, e) in engines {
        let ago = e["gathered_at"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (now - t.with_timezone(&Utc)).num_milliseconds() as f64 / 1000.0)
            .map_or_else(|| "?".to_owned(), |s| format!("{:.1}s ago", s.max(0.0)));
        let took = e["duration_seconds"].as_f64().unwrap_or(0.0) * 1000.0;
        let state = if e["up"].as_bool() == Some(true) {
            "up".to_owned()
        } else {
            format!("DOWN ({})", e["error"].as_str().unwrap_or("no answer"))
        };
        let _ = writeln!(out, "{name}: {state}, gathered {ago} in {took:.0}ms");
        let mut rows = Vec::new();
        for f in e["families"].as_array().into_iter().flatten() {
            let fname = f["name"].as_str().unwrap_or("?");
            for s in f["samples"].as_array().into_iter().flatten() {
                let labels: Vec<String> = s["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                let value = s["value"]
                    .as_f64()
                    .map_or_else(|| "NaN".to_owned(), |v| format!("{v}"));
                rows.push((fname.to_owned(), labels.join(","), value));
            }
        }
        if rows.is_empty() {
            continue;
        }
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
        let _ = writeln!(out, "  {:w0$}  {:w1$}  VALUE", "METRIC", "LABELS");
        for (n, l, v) in rows {
            let _ = writeln!(out, "  {n:w0$}  {l:w1$}  {v}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Kind;

    fn round(up: bool) -> Arc<EngineStats> {
        let mut f = Family::new("redis_db_keys", Kind::Gauge, "Keys per db.");
        f.push(&[("db", "db0")], 5.0);
        Arc::new(EngineStats {
            up,
            gathered_at: "2026-01-02T03:04:05Z".parse().unwrap(),
            duration_seconds: 0.002,
            error: (!up).then(|| "redis unreachable".to_owned()),
            families: if up { vec![f] } else { Vec::new() },
            events: Default::default(),
        })
    }

    #[test]
    fn the_json_has_labels_as_objects_and_the_round_facts() {
        let v = to_json(Duration::from_secs(15), &[(EngineKind::Redis, round(true))]);
        assert_eq!(v["interval_seconds"], 15.0);
        let r = &v["engines"]["redis"];
        assert_eq!(r["up"], true);
        assert_eq!(r["gathered_at"], "2026-01-02T03:04:05Z");
        assert_eq!(r["families"][0]["kind"], "gauge");
        assert_eq!(r["families"][0]["samples"][0]["labels"]["db"], "db0");
        assert_eq!(r["families"][0]["samples"][0]["value"], 5.0);
        assert!(r.get("error").is_none());
    }

    #[test]
    fn the_table_has_a_line_per_engine_and_a_row_per_sample() {
        let now: DateTime<Utc> = "2026-01-02T03:04:07Z".parse().unwrap();
        let v = to_json(
            Duration::from_secs(15),
            &[
                (EngineKind::Redis, round(true)),
                (EngineKind::Chroma, round(false)),
            ],
        );
        let t = table(&v, now);
        assert!(t.contains("redis: up, gathered 2.0s ago in 2ms"), "{t}");
        assert!(t.contains("chroma: DOWN (redis unreachable)"), "{t}");
        let row = t.lines().find(|l| l.contains("redis_db_keys")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["redis_db_keys", "db=db0", "5"]
        );
    }

    #[test]
    fn the_round_timeout_stays_within_the_interval_and_ten_seconds() {
        assert_eq!(
            round_timeout(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            round_timeout(Duration::from_secs(15)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn sidecar_urls() {
        let env = |k: &str| (k == "DBKEEPER_LISTEN").then(|| "0.0.0.0:9300".to_owned());
        assert_eq!(
            sidecar_url("self", &env).unwrap(),
            "http://127.0.0.1:9300/stats"
        );
        assert_eq!(
            sidecar_url("http://dbkeeper:9216/", &env).unwrap(),
            "http://dbkeeper:9216/stats"
        );
        assert_eq!(
            sidecar_url("http://dbkeeper:9216/stats", &env).unwrap(),
            "http://dbkeeper:9216/stats"
        );
        assert!(sidecar_url("redis://x", &env).is_err());
    }
}
