//! `/alerts` conditions read from the databases' own statistics (the last round in memory, as
//! `/metrics` serves it), with thresholds from the environment: Redis memory near `maxmemory`,
//! Redis evicting keys, MongoDB connections near the server's limit, a replica-set member
//! lagging, and a database that restarted.
//!
//! Evictions and restarts are changes between two rounds (a counter that grew, an uptime that
//! went down), so the statistics loop notes when it saw one ([`Events`]) and the alert stays
//! up for `DBKEEPER_ALERT_WINDOW` after it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::engine::EngineKind;
use crate::stats::Family;

/// Where the database conditions start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Fraction of `maxmemory` (`DBKEEPER_ALERT_REDIS_MEMORY`, default 90%).
    pub redis_memory: f64,
    /// Fraction of MongoDB's connection limit (`DBKEEPER_ALERT_MONGODB_CONNECTIONS`, 80%).
    pub mongodb_connections: f64,
    /// Replication lag of a member (`DBKEEPER_ALERT_REPLICATION_LAG`, 10 s).
    pub replication_lag: Duration,
    /// How long an eviction or a restart stays an alert (`DBKEEPER_ALERT_WINDOW`, 5 min).
    pub window: Duration,
    /// WAL a PostgreSQL slot holds on the server (`DBKEEPER_ALERT_POSTGRES_SLOT_LAG`, 1 GiB).
    pub postgres_slot_lag: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            redis_memory: 0.9,
            mongodb_connections: 0.8,
            replication_lag: Duration::from_secs(10),
            window: Duration::from_secs(300),
            postgres_slot_lag: 1 << 30,
        }
    }
}

/// The server's uptime family, where the engine has one.
fn uptime_family(kind: EngineKind) -> Option<&'static str> {
    match kind {
        EngineKind::Redis => Some("redis_uptime_in_seconds"),
        EngineKind::Mongodb => Some("mongodb_instance_uptime_seconds"),
        _ => None,
    }
}

const EVICTED: &str = "redis_evicted_keys_total";

/// What the loop remembers across rounds: the last figures it compared, and when it last saw
/// an eviction or a restart. Carried over rounds that fail.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Events {
    pub uptime: Option<f64>,
    pub evicted: Option<f64>,
    pub evicted_at: Option<DateTime<Utc>>,
    pub restarted_at: Option<DateTime<Utc>>,
}

impl Events {
    /// The events after a round with `families` (empty when the round failed), at `now`.
    pub fn next(&self, kind: EngineKind, families: &[Family], now: DateTime<Utc>) -> Events {
        let mut e = self.clone();
        if families.is_empty() {
            return e;
        }
        let uptime = uptime_family(kind).and_then(|n| value(families, n, &[]));
        let evicted = value(families, EVICTED, &[]);
        // A restart resets the counters: an uptime below the last one is a restart, and the
        // eviction counter starts again from 0.
        let restarted = matches!((self.uptime, uptime), (Some(a), Some(b)) if b < a);
        if restarted {
            e.restarted_at = Some(now);
        } else if let (Some(a), Some(b)) = (self.evicted, evicted)
            && b > a
        {
            e.evicted_at = Some(now);
        }
        e.uptime = uptime.or(e.uptime);
        e.evicted = evicted.or(e.evicted);
        e
    }
}

/// The first sample of `name` whose labels include `want`.
fn value(families: &[Family], name: &str, want: &[(&str, &str)]) -> Option<f64> {
    families
        .iter()
        .filter(|f| f.name == name)
        .flat_map(|f| &f.samples)
        .find(|s| {
            want.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
}

fn percent(f: f64) -> String {
    format!("{:.0}%", f * 100.0)
}

/// The active database conditions of one engine's last successful round.
pub fn conditions(
    kind: EngineKind,
    families: &[Family],
    events: &Events,
    th: &Thresholds,
    now: DateTime<Utc>,
) -> Vec<Value> {
    let mut out = Vec::new();
    let engine = kind.name();
    let recent = |at: Option<DateTime<Utc>>| {
        at.is_some_and(|t| (now - t).to_std().unwrap_or_default() < th.window)
    };
    if let Some(t) = events.restarted_at.filter(|t| recent(Some(*t))) {
        out.push(json!({
            "alert": "database_restarted",
            "engine": engine,
            "message": format!("{engine} restarted (its uptime went down) at {}", t.to_rfc3339()),
        }));
    }
    match kind {
        EngineKind::Redis => {
            let used = value(families, "redis_memory_used_bytes", &[]);
            let max = value(families, "redis_memory_max_bytes", &[]);
            if let (Some(used), Some(max)) = (used, max)
                && max > 0.0
                && used / max > th.redis_memory
            {
                out.push(json!({
                    "alert": "redis_memory_high",
                    "engine": engine,
                    "message": format!(
                        "Redis uses {} of maxmemory ({}), above DBKEEPER_ALERT_REDIS_MEMORY ({})",
                        percent(used / max),
                        crate::role::list::human_bytes(max as u64),
                        percent(th.redis_memory)
                    ),
                }));
            }
            if let Some(t) = events.evicted_at.filter(|t| recent(Some(*t))) {
                out.push(json!({
                    "alert": "redis_evicting",
                    "engine": engine,
                    "message": format!(
                        "Redis evicted keys to stay under maxmemory (last seen {}; {} evicted since it started)",
                        t.to_rfc3339(),
                        events.evicted.unwrap_or_default()
                    ),
                }));
            }
        }
        EngineKind::Mongodb => {
            let current = value(families, "mongodb_connections", &[("state", "current")]);
            let available = value(families, "mongodb_connections", &[("state", "available")]);
            if let (Some(c), Some(a)) = (current, available)
                && c + a > 0.0
                && c / (c + a) > th.mongodb_connections
            {
                out.push(json!({
                    "alert": "mongodb_connections_high",
                    "engine": engine,
                    "message": format!(
                        "MongoDB has {c} connections of its limit {} ({}), above DBKEEPER_ALERT_MONGODB_CONNECTIONS ({})",
                        c + a,
                        percent(c / (c + a)),
                        percent(th.mongodb_connections)
                    ),
                }));
            }
            let lagging = families
                .iter()
                .filter(|f| f.name == "mongodb_mongod_replset_member_replication_lag")
                .flat_map(|f| &f.samples)
                .filter(|s| s.value > th.replication_lag.as_secs_f64());
            for s in lagging {
                let member = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "name")
                    .map_or("?", |(_, v)| v.as_str());
                out.push(json!({
                    "alert": "replication_lag",
                    "engine": engine,
                    "member": member,
                    "message": format!(
                        "replica-set member {member} is {:.0}s behind its primary, above DBKEEPER_ALERT_REPLICATION_LAG ({}s)",
                        s.value,
                        th.replication_lag.as_secs()
                    ),
                }));
            }
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Kind;

    fn fam(name: &str, samples: &[(&[(&str, &str)], f64)]) -> Family {
        let mut f = Family::new(name, Kind::Gauge, "");
        for (l, v) in samples {
            f.push(l, *v);
        }
        f
    }

    fn names(v: &[Value]) -> Vec<&str> {
        v.iter().map(|a| a["alert"].as_str().unwrap()).collect()
    }

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn redis_memory_above_the_threshold_and_only_with_a_maxmemory() {
        let th = Thresholds::default();
        let f = |used, max| {
            vec![
                fam("redis_memory_used_bytes", &[(&[], used)]),
                fam("redis_memory_max_bytes", &[(&[], max)]),
            ]
        };
        let none = Events::default();
        let c = |fs: &[Family]| conditions(EngineKind::Redis, fs, &none, &th, at(0));
        assert_eq!(names(&c(&f(95.0, 100.0))), ["redis_memory_high"]);
        assert!(
            c(&f(95.0, 100.0))[0]["message"]
                .as_str()
                .unwrap()
                .contains("95%")
        );
        assert!(c(&f(90.0, 100.0)).is_empty());
        // No maxmemory: no bound to be near.
        assert!(c(&f(1e9, 0.0)).is_empty());
    }

    #[test]
    fn evictions_and_restarts_are_seen_between_rounds_and_last_the_window() {
        let th = Thresholds::default();
        let round = |uptime, evicted| {
            vec![
                fam("redis_uptime_in_seconds", &[(&[], uptime)]),
                fam(EVICTED, &[(&[], evicted)]),
            ]
        };
        let e0 = Events::default().next(EngineKind::Redis, &round(100.0, 5.0), at(0));
        // A first round sees nothing: there is nothing to compare with.
        assert_eq!((e0.evicted_at, e0.restarted_at), (None, None));
        let e1 = e0.next(EngineKind::Redis, &round(115.0, 5.0), at(15));
        assert_eq!(e1.evicted_at, None);
        let e2 = e1.next(EngineKind::Redis, &round(130.0, 9.0), at(30));
        assert_eq!(e2.evicted_at, Some(at(30)));
        let fs = round(130.0, 9.0);
        assert_eq!(
            names(&conditions(EngineKind::Redis, &fs, &e2, &th, at(60))),
            ["redis_evicting"]
        );
        assert!(conditions(EngineKind::Redis, &fs, &e2, &th, at(30 + 300)).is_empty());
        // A failed round keeps what was seen.
        let e3 = e2.next(EngineKind::Redis, &[], at(45));
        assert_eq!(e3, e2);
        // Back with a lower uptime (and counters from 0): a restart, not an eviction.
        let e4 = e3.next(EngineKind::Redis, &round(3.0, 0.0), at(60));
        assert_eq!(e4.restarted_at, Some(at(60)));
        assert_eq!(e4.evicted_at, Some(at(30)));
        let after = e4.next(EngineKind::Redis, &round(18.0, 0.0), at(75));
        assert_eq!(after.restarted_at, Some(at(60)));
        let now = conditions(EngineKind::Redis, &round(18.0, 0.0), &after, &th, at(80));
        assert_eq!(names(&now), ["database_restarted", "redis_evicting"]);
    }

    #[test]
    fn mongodb_connections_and_replication_lag() {
        let th = Thresholds::default();
        let fs = vec![
            fam(
                "mongodb_connections",
                &[
                    (&[("state", "current")], 81.0),
                    (&[("state", "available")], 19.0),
                ],
            ),
            fam(
                "mongodb_mongod_replset_member_replication_lag",
                &[
                    (&[("set", "rs0"), ("name", "a:27017")], 0.0),
                    (&[("set", "rs0"), ("name", "b:27017")], 42.0),
                ],
            ),
        ];
        let c = conditions(EngineKind::Mongodb, &fs, &Events::default(), &th, at(0));
        assert_eq!(names(&c), ["mongodb_connections_high", "replication_lag"]);
        assert_eq!(c[1]["member"], "b:27017");
        let calm = Thresholds {
            mongodb_connections: 0.9,
            replication_lag: Duration::from_secs(60),
            ..th
        };
        assert!(conditions(EngineKind::Mongodb, &fs, &Events::default(), &calm, at(0)).is_empty());
    }
}
