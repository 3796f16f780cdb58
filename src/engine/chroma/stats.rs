//! Chroma's figures for `/metrics`: no exporter exists for Chroma, so the names follow the
//! Prometheus conventions under `chroma_`. One round costs a heartbeat, a version call, a
//! collection listing per database and one `count` per collection (a few at a time).

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};

use super::ChromaEngine;
use crate::error::{Error, Result};
use crate::stats::{Family, Kind};

/// Default of `DBKEEPER_STATS_MAX_COLLECTIONS`.
const MAX_COLLECTIONS: usize = 100;
/// `count` requests in flight at once.
const CONCURRENT_COUNTS: usize = 4;
/// The label of the sum of collections past the bound.
pub const OTHER: &str = "_other";

/// One database's collections and their record counts.
struct Database {
    name: String,
    records: Vec<(String, u64)>,
}

impl ChromaEngine {
    /// The whole round under `timeout`: a server that accepts and never answers is an error
    /// when the time is up, never a hang.
    pub(super) async fn gather_stats(&self, timeout: Duration) -> Result<Vec<Family>> {
        match tokio::time::timeout(timeout, self.gather(timeout)).await {
            Ok(r) => r,
            Err(_) => Err(self.api.unreachable(format!(
                "statistics not gathered within {:.1}s",
                timeout.as_secs_f64()
            ))),
        }
    }

    async fn gather(&self, timeout: Duration) -> Result<Vec<Family>> {
        let started = Instant::now();
        let probe = self.api.probe(timeout).await?;
        let heartbeat = started.elapsed();
        let mut dbs = Vec::new();
        let mut query = None;
        for db in self.databases().await? {
            let t = Instant::now();
            let colls = self.api.list_collections(&db).await?;
            query.get_or_insert(t.elapsed());
            let api = &self.api;
            let db_name = db.as_str();
            let records: Vec<(String, u64)> = futures_util::stream::iter(colls)
                .map(|c| async move { Ok::<_, Error>((c.name, api.count(db_name, &c.id).await?)) })
                .buffered(CONCURRENT_COUNTS)
                .try_collect()
                .await?;
            dbs.push(Database { name: db, records });
        }
        let max = self.max_collections.unwrap_or(MAX_COLLECTIONS);
        Ok(families(
            &self.api.cfg.tenant,
            probe.version.as_deref(),
            heartbeat,
            query,
            &dbs,
            max,
        ))
    }
}

fn families(
    tenant: &str,
    version: Option<&str>,
    heartbeat: Duration,
    query: Option<Duration>,
    dbs: &[Database],
    max: usize,
) -> Vec<Family> {
    let mut out = vec![Family::single(
        "chroma_heartbeat_duration_seconds",
        Kind::Gauge,
        "How long the server took to answer its heartbeat in the last round.",
        heartbeat.as_secs_f64(),
    )];
    let mut info = Family::new(
        "chroma_build_info",
        Kind::Gauge,
        "The server's version, as a label; always 1.",
    );
    info.push(&[("version", version.unwrap_or("unknown"))], 1.0);
    out.push(info);
    if let Some(q) = query {
        out.push(Family::single(
            "chroma_probe_query_duration_seconds",
            Kind::Gauge,
            "How long the probe query (listing the first database's collections) took.",
            q.as_secs_f64(),
        ));
    }
    let mut colls = Family::new(
        "chroma_collections",
        Kind::Gauge,
        "Collections per tenant and database.",
    );
    let mut records = Family::new(
        "chroma_collection_records",
        Kind::Gauge,
        format!(
            "Records per collection; past DBKEEPER_STATS_MAX_COLLECTIONS collections (largest first) the rest are summed as collection=\"{OTHER}\"."
        ),
    );
    // The largest collections keep their own figure across all databases; ties by name, so
    // the set of labelled series is stable from one round to the next.
    let mut all: Vec<(&str, &str, u64)> = dbs
        .iter()
        .flat_map(|d| {
            d.records
                .iter()
                .map(|(c, n)| (d.name.as_str(), c.as_str(), *n))
        })
        .collect();
    all.sort_by(|a, b| b.2.cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut other: Vec<(&str, u64)> = Vec::new();
    for (i, (db, coll, n)) in all.into_iter().enumerate() {
        if i < max {
            records.push(
                &[("tenant", tenant), ("database", db), ("collection", coll)],
                n as f64,
            );
        } else {
            match other.iter_mut().find(|(d, _)| *d == db) {
                Some((_, sum)) => *sum += n,
                None => other.push((db, n)),
            }
        }
    }
    for (db, sum) in other {
        records.push(
            &[("tenant", tenant), ("database", db), ("collection", OTHER)],
            sum as f64,
        );
    }
    for d in dbs {
        colls.push(
            &[("tenant", tenant), ("database", &d.name)],
            d.records.len() as f64,
        );
    }
    out.push(colls);
    out.push(records);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str, records: &[(&str, u64)]) -> Database {
        Database {
            name: name.into(),
            records: records.iter().map(|(c, n)| ((*c).into(), *n)).collect(),
        }
    }

    fn sample<'a>(f: &'a [Family], name: &str) -> &'a Family {
        f.iter().find(|f| f.name == name).unwrap()
    }

    fn labels(s: &crate::stats::Sample) -> Vec<(&str, &str)> {
        s.labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn the_largest_collections_keep_their_figure_and_the_rest_are_summed_per_database() {
        let dbs = [
            db("a", &[("small", 1), ("big", 100), ("mid", 10)]),
            db("b", &[("x", 50), ("y", 2), ("z", 3)]),
        ];
        let f = families("t", Some("1.5.9"), Duration::ZERO, None, &dbs, 3);
        let r = sample(&f, "chroma_collection_records");
        let got: Vec<(Vec<(&str, &str)>, f64)> =
            r.samples.iter().map(|s| (labels(s), s.value)).collect();
        let l = |d, c| vec![("tenant", "t"), ("database", d), ("collection", c)];
        assert_eq!(
            got,
            vec![
                (l("a", "big"), 100.0),
                (l("b", "x"), 50.0),
                (l("a", "mid"), 10.0),
                (l("b", OTHER), 5.0),
                (l("a", OTHER), 1.0),
            ]
        );
        let c = sample(&f, "chroma_collections");
        assert_eq!(
            c.samples.iter().map(|s| s.value).collect::<Vec<_>>(),
            [3.0, 3.0]
        );
        assert_eq!(
            labels(&sample(&f, "chroma_build_info").samples[0]),
            [("version", "1.5.9")]
        );
        // No query timing without a database to list.
        assert!(
            f.iter()
                .all(|f| f.name != "chroma_probe_query_duration_seconds")
        );
    }

    #[test]
    fn no_bound_is_reached_with_few_collections() {
        let dbs = [db("a", &[("c", 7)])];
        let f = families("t", None, Duration::ZERO, Some(Duration::ZERO), &dbs, 100);
        let r = sample(&f, "chroma_collection_records");
        assert_eq!(r.samples.len(), 1);
        assert_eq!(
            labels(&sample(&f, "chroma_build_info").samples[0]),
            [("version", "unknown")]
        );
    }
}
