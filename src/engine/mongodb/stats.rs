//! MongoDB's figures for `/metrics`: where percona/mongodb_exporter (its v0.x names, which most
//! dashboards use) has a name for a figure, that name, labels and unit; beside them the seed's
//! names (`mongodb_operations_total`, `mongodb_query_duration_seconds`, `mongodb_collection_*`).
//!
//! A round is `serverStatus`, `replSetGetStatus`, `listDatabases`, and per database `dbStats`
//! and `listCollections`, and per collection `$collStats` (the `collStats` command on a server
//! without the stage), one after the other on one connection. A command the server refuses or
//! does not know (not a member, no privilege) leaves its families out; only a server that does
//! not answer fails the round.

use std::time::{Duration, Instant};

use mongodb::Client;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;
use tracing::debug;

use super::{ENGINE, MongoEngine, Purpose};
use crate::error::{Error, Result};
use crate::stats::{Family, Kind};

/// Default of `DBKEEPER_STATS_MAX_COLLECTIONS`.
pub(super) const MAX_COLLECTIONS: usize = 100;
/// The collection label of the sum of a database's collections past the bound.
pub const OTHER: &str = "_other";
/// Share of the round's time for the queries; the rest is for shutting the client down.
const QUERY_SHARE: f64 = 0.8;
/// `$collStats` unknown: "Unrecognized pipeline stage name" (40324; 16436 before 3.6).
const UNKNOWN_STAGE: [i32; 2] = [40324, 16436];

/// `serverStatus` `opLatencies` sections and the `type` label percona gives them.
const LATENCIES: [(&str, &str); 3] = [
    ("reads", "read"),
    ("writes", "write"),
    ("commands", "command"),
];
/// `serverStatus` `opcounters` fields, which are also the `type` labels.
const OPCOUNTERS: [&str; 6] = ["insert", "query", "update", "delete", "getmore", "command"];

/// One collection's figures, from `$collStats` `storageStats` or `collStats`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Coll {
    pub db: String,
    pub name: String,
    pub count: f64,
    /// Uncompressed data bytes.
    pub size: f64,
    pub storage_size: f64,
    pub index_size: f64,
    pub indexes: f64,
}

impl MongoEngine {
    /// The whole round under `timeout`: the queries get most of it, the client's shutdown the
    /// rest, and an outer bound covers anything the driver does not bound itself.
    pub(super) async fn gather_stats(&self, timeout: Duration) -> Result<Vec<Family>> {
        let work = timeout.mul_f64(QUERY_SHARE);
        let deadline = Instant::now() + work;
        let round = self.with_client(Purpose::Probe(work), |client| async move {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.gather(&client)).await {
                Ok(r) => r,
                Err(_) => {
                    // A server that answered and then hung: end the client here, bounded by
                    // the rest of the round, since `with_client` leaves a probe's client whose
                    // server did not answer as it is.
                    let grace = timeout.saturating_sub(work);
                    let _ = tokio::time::timeout(grace, client.shutdown().immediate(true)).await;
                    Err(self.not_within(timeout))
                }
            }
        });
        match tokio::time::timeout(timeout, round).await {
            Ok(r) => r,
            Err(_) => Err(self.not_within(timeout)),
        }
    }

    fn not_within(&self, timeout: Duration) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.cfg.display.clone(),
            message: format!(
                "statistics not gathered within {:.1}s",
                timeout.as_secs_f64()
            ),
        }
    }

    async fn gather(&self, client: &Client) -> Result<Vec<Family>> {
        let mut out = Vec::new();
        // wiredTiger and locks are most of the reply and nothing here reads them.
        let status = doc! {"serverStatus": 1, "wiredTiger": 0, "locks": 0, "tcmalloc": 0};
        if let Some(ss) = self.command(client, "admin", status).await? {
            out.extend(server_families(&ss));
        }
        // Not a member (NoReplicationEnabled), not initiated, or not allowed: no set figures.
        if let Some(rs) = self
            .command(client, "admin", doc! {"replSetGetStatus": 1})
            .await?
        {
            out.extend(replset_families(&rs));
        }
        let Some(dbs) = self
            .command(client, "admin", doc! {"listDatabases": 1, "nameOnly": true})
            .await?
        else {
            return Ok(out);
        };
        let names: Vec<String> = dbs
            .get_array("databases")
            .map(|a| {
                a.iter()
                    .filter_map(Bson::as_document)
                    .filter_map(|d| d.get_str("name").ok().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut db_stats = Vec::new();
        let mut colls = Vec::new();
        let mut agg_stage = true;
        for db in &names {
            if let Some(s) = self.command(client, db, doc! {"dbStats": 1}).await? {
                db_stats.push((db.clone(), s));
            }
            for name in self.collection_names(client, db).await? {
                if let Some(c) = self.coll_stats(client, db, &name, &mut agg_stage).await? {
                    colls.push(c);
                }
            }
        }
        out.extend(db_families(&db_stats));
        let max = self.cfg.stats_max_collections.unwrap_or(MAX_COLLECTIONS);
        out.extend(collection_families(colls, max));
        Ok(out)
    }

    /// Runs one command; `None` when the server answered with an error (the command is not
    /// there, not allowed, not applicable), `Err` when it did not answer.
    async fn command(&self, client: &Client, db: &str, cmd: Document) -> Result<Option<Document>> {
        let what = cmd.keys().next().cloned().unwrap_or_default();
        match client.database(db).run_command(cmd).await {
            Ok(d) => Ok(Some(d)),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::Command(c) => {
                    debug!(engine = ENGINE, db, command = %what, code = c.code, error = %c.message, "statistics command refused");
                    Ok(None)
                }
                _ => Err(self.op_err(&format!("{what} on {db}"))(e)),
            },
        }
    }

    /// The collections of a database (not views: they hold no data of their own).
    async fn collection_names(&self, client: &Client, db: &str) -> Result<Vec<String>> {
        let cmd = doc! {
            "listCollections": 1,
            "nameOnly": true,
            "authorizedCollections": true,
            "filter": {"type": "collection"},
        };
        let Some(reply) = self.command(client, db, cmd).await? else {
            return Ok(Vec::new());
        };
        let batch = reply
            .get_document("cursor")
            .and_then(|c| c.get_array("firstBatch"))
            .map(|a| a.as_slice())
            .unwrap_or_default();
        let mut names: Vec<String> = batch
            .iter()
            .filter_map(Bson::as_document)
            .filter_map(|d| d.get_str("name").ok().map(str::to_owned))
            .collect();
        // A database with more names than fit one batch: all of them through a cursor.
        let more = reply
            .get_document("cursor")
            .and_then(|c| c.get_i64("id"))
            .is_ok_and(|id| id != 0);
        if more {
            names = client
                .database(db)
                .list_collection_names()
                .filter(doc! {"type": "collection"})
                .await
                .map_err(self.op_err(&format!("listCollections on {db}")))?;
        }
        Ok(names)
    }

    /// One collection's figures: `$collStats` while the server knows the stage, `collStats`
    /// once it has said it does not (`agg_stage` remembers that for the rest of the round).
    async fn coll_stats(
        &self,
        client: &Client,
        db: &str,
        name: &str,
        agg_stage: &mut bool,
    ) -> Result<Option<Coll>> {
        if *agg_stage {
            let cmd = doc! {
                "aggregate": name,
                "pipeline": [{"$collStats": {"storageStats": {}}}],
                "cursor": {},
            };
            match client.database(db).run_command(cmd).await {
                Ok(reply) => {
                    let first = reply
                        .get_document("cursor")
                        .and_then(|c| c.get_array("firstBatch"))
                        .ok()
                        .and_then(|b| b.first())
                        .and_then(Bson::as_document)
                        .and_then(|d| d.get_document("storageStats").ok());
                    return Ok(first.map(|s| Coll::parse(db, name, s)));
                }
                Err(e) => match e.kind.as_ref() {
                    ErrorKind::Command(c) if UNKNOWN_STAGE.contains(&c.code) => {
                        debug!(
                            engine = ENGINE,
                            "no $collStats stage; collStats from here on"
                        );
                        *agg_stage = false;
                    }
                    ErrorKind::Command(c) => {
                        debug!(engine = ENGINE, db, collection = name, code = c.code, error = %c.message, "$collStats refused");
                        return Ok(None);
                    }
                    _ => return Err(self.op_err(&format!("$collStats on {db}.{name}"))(e)),
                },
            }
        }
        Ok(self
            .command(client, db, doc! {"collStats": name})
            .await?
            .map(|s| Coll::parse(db, name, &s)))
    }
}

impl Coll {
    /// From `$collStats`' `storageStats` or a `collStats` reply (the same fields).
    pub(super) fn parse(db: &str, name: &str, s: &Document) -> Coll {
        let n = |k: &str| num(s.get(k)).unwrap_or(0.0);
        Coll {
            db: db.to_owned(),
            name: name.to_owned(),
            count: n("count"),
            size: n("size"),
            storage_size: n("storageSize"),
            index_size: n("totalIndexSize"),
            indexes: n("nindexes"),
        }
    }
}

/// A BSON number as `f64`; `None` for anything else.
fn num(v: Option<&Bson>) -> Option<f64> {
    match v? {
        Bson::Int32(i) => Some(*i as f64),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(f) => Some(*f),
        Bson::Boolean(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// The number at a dotted path of `d`.
fn at(d: &Document, path: &str) -> Option<f64> {
    let mut parts = path.split('.').peekable();
    let mut cur = d;
    while let Some(p) = parts.next() {
        if parts.peek().is_none() {
            return num(cur.get(p));
        }
        cur = cur.get_document(p).ok()?;
    }
    None
}

/// Families with at least one sample (a section the server did not send leaves none).
fn keep(out: &mut Vec<Family>, f: Family) {
    if !f.samples.is_empty() {
        out.push(f);
    }
}

/// Connections, operation counters and latencies, cursors, uptime, network and memory.
pub(super) fn server_families(ss: &Document) -> Vec<Family> {
    let mut out = Vec::new();

    let mut conns = Family::new(
        "mongodb_connections",
        Kind::Gauge,
        "Incoming connections by state: current, available (more the server would accept), active (4.0.7+), and total_created (connections accepted since start, also mongodb_connections_metrics_created_total).",
    );
    for (field, state) in [
        ("current", "current"),
        ("available", "available"),
        ("active", "active"),
        ("totalCreated", "total_created"),
    ] {
        if let Some(v) = at(ss, &format!("connections.{field}")) {
            conns.push(&[("state", state)], v);
        }
    }
    keep(&mut out, conns);
    if let Some(v) = at(ss, "connections.totalCreated") {
        out.push(Family::single(
            "mongodb_connections_metrics_created_total",
            Kind::Counter,
            "Incoming connections accepted since the server started.",
            v,
        ));
    }

    let mut ops = Family::new(
        "mongodb_op_counters_total",
        Kind::Counter,
        "Operations since the server started, by type (serverStatus opcounters).",
    );
    let mut seed_ops = Family::new(
        "mongodb_operations_total",
        Kind::Counter,
        "Operations since the server started, by type; the same figures as mongodb_op_counters_total.",
    );
    for t in OPCOUNTERS {
        if let Some(v) = at(ss, &format!("opcounters.{t}")) {
            ops.push(&[("type", t)], v);
            seed_ops.push(&[("type", t)], v);
        }
    }
    keep(&mut out, ops);
    keep(&mut out, seed_ops);
    let mut repl = Family::new(
        "mongodb_op_counters_repl_total",
        Kind::Counter,
        "Operations applied by replication since the server started, by type (serverStatus opcountersRepl).",
    );
    for t in OPCOUNTERS {
        if let Some(v) = at(ss, &format!("opcountersRepl.{t}")) {
            repl.push(&[("type", t)], v);
        }
    }
    keep(&mut out, repl);

    let mut latency = Family::new(
        "mongodb_mongod_op_latencies_latency_total",
        Kind::Counter,
        "Total time spent in operations since the server started, in MICROSECONDS as percona/mongodb_exporter reports it, by type (read, write, command); divide a rate by the rate of mongodb_mongod_op_latencies_ops_total and by 1e6 for mean seconds.",
    );
    let mut count = Family::new(
        "mongodb_mongod_op_latencies_ops_total",
        Kind::Counter,
        "Operations counted in mongodb_mongod_op_latencies_latency_total, by type.",
    );
    let mut mean = Family::new(
        "mongodb_query_duration_seconds",
        Kind::Gauge,
        "Mean seconds per operation since the server started, by type (serverStatus opLatencies total over count). Not a histogram: the server keeps no distribution; for a recent mean use rate(mongodb_mongod_op_latencies_latency_total[5m]) / rate(mongodb_mongod_op_latencies_ops_total[5m]) / 1e6.",
    );
    for (section, t) in LATENCIES {
        let micros = at(ss, &format!("opLatencies.{section}.latency"));
        let n = at(ss, &format!("opLatencies.{section}.ops"));
        if let (Some(micros), Some(n)) = (micros, n) {
            latency.push(&[("type", t)], micros);
            count.push(&[("type", t)], n);
            if n > 0.0 {
                mean.push(&[("type", t)], micros / n / 1e6);
            }
        }
    }
    keep(&mut out, latency);
    keep(&mut out, count);
    keep(&mut out, mean);

    let mut open = Family::new(
        "mongodb_mongod_metrics_cursor_open",
        Kind::Gauge,
        "Open cursors: total, noTimeout (opened with no idle timeout) and pinned.",
    );
    for state in ["total", "noTimeout", "pinned"] {
        if let Some(v) = at(ss, &format!("metrics.cursor.open.{state}")) {
            open.push(&[("state", state)], v);
        }
    }
    keep(&mut out, open);
    if let Some(v) = at(ss, "metrics.cursor.timedOut") {
        out.push(Family::single(
            "mongodb_mongod_metrics_cursor_timed_out_total",
            Kind::Counter,
            "Cursors that timed out since the server started.",
            v,
        ));
    }

    // uptimeMillis where the server sends it: `uptime` is whole seconds.
    let uptime = at(ss, "uptimeMillis")
        .map(|ms| ms / 1000.0)
        .or_else(|| at(ss, "uptime"));
    if let Some(v) = uptime {
        out.push(Family::single(
            "mongodb_instance_uptime_seconds",
            Kind::Gauge,
            "Seconds since the server process started; drops when it restarts.",
            v,
        ));
    }
    if let Ok(v) = ss.get_str("version") {
        let mut f = Family::new(
            "mongodb_version_info",
            Kind::Gauge,
            "The server's version, as the mongodb label; always 1.",
        );
        f.push(&[("mongodb", v)], 1.0);
        out.push(f);
    }

    let mut net = Family::new(
        "mongodb_network_bytes_total",
        Kind::Counter,
        "Network bytes since the server started: in_bytes received, out_bytes sent.",
    );
    for (field, state) in [("bytesIn", "in_bytes"), ("bytesOut", "out_bytes")] {
        if let Some(v) = at(ss, &format!("network.{field}")) {
            net.push(&[("state", state)], v);
        }
    }
    keep(&mut out, net);
    if let Some(v) = at(ss, "network.numRequests") {
        out.push(Family::single(
            "mongodb_network_metrics_num_requests_total",
            Kind::Counter,
            "Requests received since the server started.",
            v,
        ));
    }

    let mut mem = Family::new(
        "mongodb_memory",
        Kind::Gauge,
        "Memory of the server process in MEBIBYTES, as serverStatus mem and percona/mongodb_exporter report it: resident and virtual.",
    );
    for t in ["resident", "virtual"] {
        if let Some(v) = at(ss, &format!("mem.{t}")) {
            mem.push(&[("type", t)], v);
        }
    }
    keep(&mut out, mem);
    out
}

/// Member states and lag from `replSetGetStatus`. The lag, as percona computes it, is of
/// secondaries only: the primary's last applied operation time minus theirs, in seconds.
pub(super) fn replset_families(rs: &Document) -> Vec<Family> {
    let mut out = Vec::new();
    let Ok(set) = rs.get_str("set") else {
        return out;
    };
    let members: Vec<&Document> = rs
        .get_array("members")
        .map(|a| a.iter().filter_map(Bson::as_document).collect())
        .unwrap_or_default();
    if let Some(v) = num(rs.get("myState")) {
        let mut f = Family::new(
            "mongodb_mongod_replset_my_state",
            Kind::Gauge,
            "This member's replica-set state (1 PRIMARY, 2 SECONDARY, 7 ARBITER, …).",
        );
        f.push(&[("set", set)], v);
        out.push(f);
    }
    let mut n = Family::new(
        "mongodb_mongod_replset_number_of_members",
        Kind::Gauge,
        "Members in the replica set's configuration.",
    );
    n.push(&[("set", set)], members.len() as f64);
    out.push(n);
    let optime = |m: &Document| {
        m.get_datetime("optimeDate")
            .ok()
            .map(|d| d.timestamp_millis())
    };
    let primary = members
        .iter()
        .find(|m| m.get_str("stateStr") == Ok("PRIMARY") || num(m.get("state")) == Some(1.0))
        .and_then(|m| optime(m));
    let mut state = Family::new(
        "mongodb_mongod_replset_member_state",
        Kind::Gauge,
        "Each member's replica-set state as this member sees it (1 PRIMARY, 2 SECONDARY, 7 ARBITER, 8 DOWN, …).",
    );
    let mut health = Family::new(
        "mongodb_mongod_replset_member_health",
        Kind::Gauge,
        "1 when this member sees the member up, 0 when down.",
    );
    let mut lag = Family::new(
        "mongodb_mongod_replset_member_replication_lag",
        Kind::Gauge,
        "Seconds a secondary's last applied operation is behind the primary's (secondaries only).",
    );
    for m in &members {
        let Ok(name) = m.get_str("name") else {
            continue;
        };
        let labels = [("set", set), ("name", name)];
        if let Some(v) = num(m.get("state")) {
            state.push(&labels, v);
        }
        if let Some(v) = num(m.get("health")) {
            health.push(&labels, v);
        }
        let secondary =
            m.get_str("stateStr") == Ok("SECONDARY") || num(m.get("state")) == Some(2.0);
        if let (true, Some(p), Some(mine)) = (secondary, primary, optime(m)) {
            lag.push(&labels, (p - mine).max(0) as f64 / 1000.0);
        }
    }
    keep(&mut out, state);
    keep(&mut out, health);
    keep(&mut out, lag);
    out
}

/// Per-database figures from `dbStats`, under percona's names and ours.
pub(super) fn db_families(dbs: &[(String, Document)]) -> Vec<Family> {
    // (field, percona name or "", our name, help)
    const FIELDS: [(&str, &str, &str, &str); 6] = [
        (
            "dataSize",
            "mongodb_mongod_db_data_size_bytes",
            "mongodb_db_data_size_bytes",
            "Uncompressed bytes of the database's documents.",
        ),
        (
            "storageSize",
            "",
            "mongodb_db_storage_size_bytes",
            "Bytes allocated to the database's documents on disk.",
        ),
        (
            "indexSize",
            "mongodb_mongod_db_index_size_bytes",
            "mongodb_db_index_size_bytes",
            "Bytes of the database's indexes.",
        ),
        (
            "collections",
            "",
            "mongodb_db_collections",
            "Collections in the database.",
        ),
        (
            "indexes",
            "",
            "mongodb_db_indexes",
            "Indexes across the database's collections.",
        ),
        (
            "objects",
            "",
            "mongodb_db_documents",
            "Documents across the database's collections.",
        ),
    ];
    let mut out = Vec::new();
    for (field, percona, ours, help) in FIELDS {
        let mut p = Family::new(percona, Kind::Gauge, help);
        let mut o = Family::new(ours, Kind::Gauge, help);
        for (db, s) in dbs {
            if let Some(v) = num(s.get(field)) {
                p.push(&[("db", db)], v);
                o.push(&[("database", db)], v);
            }
        }
        if !percona.is_empty() {
            keep(&mut out, p);
        }
        keep(&mut out, o);
    }
    out
}

/// Per-collection figures: the `max` largest collections (by data size, then by name, so the
/// labelled set is stable between rounds) by name, the rest of each database summed as
/// `collection="_other"`.
pub(super) fn collection_families(mut colls: Vec<Coll>, max: usize) -> Vec<Family> {
    colls.sort_by(|a, b| {
        b.size
            .total_cmp(&a.size)
            .then_with(|| (&a.db, &a.name).cmp(&(&b.db, &b.name)))
    });
    let mut shown: Vec<Coll> = Vec::new();
    for (i, c) in colls.into_iter().enumerate() {
        if i < max {
            shown.push(c);
            continue;
        }
        match shown.iter_mut().find(|o| o.db == c.db && o.name == OTHER) {
            Some(o) => {
                o.count += c.count;
                o.size += c.size;
                o.storage_size += c.storage_size;
                o.index_size += c.index_size;
                o.indexes += c.indexes;
            }
            None => shown.push(Coll {
                name: OTHER.to_owned(),
                ..c
            }),
        }
    }
    let bound = format!(
        " Past DBKEEPER_STATS_MAX_COLLECTIONS collections (largest first) the rest of each database are summed as collection=\"{OTHER}\"."
    );
    type Get = fn(&Coll) -> f64;
    // (name, percona's label names?, help, figure). Not percona's `mongodb_mongod_db_coll_count`:
    // promtool refuses a gauge named `_count`; mongodb_collection_documents is that figure.
    let specs: [(&str, bool, &str, Get); 7] = [
        (
            "mongodb_collection_documents",
            false,
            "Documents per collection.",
            |c| c.count,
        ),
        (
            "mongodb_collection_size_bytes",
            false,
            "Uncompressed bytes of a collection's documents.",
            |c| c.size,
        ),
        (
            "mongodb_collection_index_size_bytes",
            false,
            "Bytes of a collection's indexes.",
            |c| c.index_size,
        ),
        (
            "mongodb_mongod_db_coll_size",
            true,
            "Uncompressed bytes of a collection's documents.",
            |c| c.size,
        ),
        (
            "mongodb_mongod_db_coll_storage_size",
            true,
            "Bytes allocated to a collection's documents on disk.",
            |c| c.storage_size,
        ),
        (
            "mongodb_mongod_db_coll_indexes",
            true,
            "Indexes per collection.",
            |c| c.indexes,
        ),
        (
            "mongodb_mongod_db_coll_indexes_size",
            true,
            "Bytes of a collection's indexes.",
            |c| c.index_size,
        ),
    ];
    let mut out = Vec::new();
    for (name, percona, help, get) in specs {
        let mut f = Family::new(name, Kind::Gauge, format!("{help}{bound}"));
        let (db_label, coll_label) = if percona {
            ("db", "coll")
        } else {
            ("database", "collection")
        };
        for c in &shown {
            f.push(&[(db_label, &c.db), (coll_label, &c.name)], get(c));
        }
        keep(&mut out, f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::DateTime;

    fn value(fams: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = fams.iter().find(|f| f.name == name)?;
        f.samples
            .iter()
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    }

    fn names(fams: &[Family]) -> Vec<&str> {
        fams.iter().map(|f| f.name.as_str()).collect()
    }

    /// A mongod 7.0 `serverStatus` as MongoDB's manual shows it, cut to the sections read.
    fn mongod_server_status() -> Document {
        doc! {
            "host": "db0:27017", "version": "7.0.12", "process": "mongod",
            "uptime": 86400.0, "uptimeMillis": 86_400_123_i64, "uptimeEstimate": 86400_i64,
            "connections": {"current": 12, "available": 838_848, "totalCreated": 1_024_i64,
                "rejected": 0, "active": 3, "threaded": 12},
            "network": {"bytesIn": 1_000_000_i64, "bytesOut": 2_000_000_i64, "numRequests": 5_000_i64},
            "opLatencies": {
                "reads": {"latency": 2_500_000_i64, "ops": 1_000_i64, "queryableEncryptionLatencyMicros": 0_i64},
                "writes": {"latency": 900_000_i64, "ops": 300_i64},
                "commands": {"latency": 40_000_i64, "ops": 0_i64},
                "transactions": {"latency": 0_i64, "ops": 0_i64},
            },
            "opcounters": {"insert": 300_i64, "query": 900_i64, "update": 7_i64,
                "delete": 1_i64, "getmore": 100_i64, "command": 4_000_i64},
            "opcountersRepl": {"insert": 0_i64, "query": 0_i64, "update": 0_i64,
                "delete": 0_i64, "getmore": 0_i64, "command": 0_i64},
            "mem": {"bits": 64, "resident": 180, "virtual": 1_500, "supported": true},
            "metrics": {"cursor": {"moreThanOneBatch": 0_i64, "timedOut": 2_i64, "totalOpened": 50_i64,
                "lifespan": {"lessThan1Second": 40_i64},
                "open": {"noTimeout": 0_i64, "pinned": 1_i64, "total": 4_i64}}},
            "ok": 1.0,
        }
    }

    #[test]
    fn server_status_of_mongod_gives_percona_and_seed_names() {
        let f = server_families(&mongod_server_status());
        let v = |n: &str, l: &[(&str, &str)]| value(&f, n, l);
        assert_eq!(
            v("mongodb_connections", &[("state", "current")]),
            Some(12.0)
        );
        assert_eq!(
            v("mongodb_connections", &[("state", "available")]),
            Some(838_848.0)
        );
        assert_eq!(v("mongodb_connections", &[("state", "active")]), Some(3.0));
        assert_eq!(
            v("mongodb_connections", &[("state", "total_created")]),
            Some(1024.0)
        );
        assert_eq!(
            v("mongodb_connections_metrics_created_total", &[]),
            Some(1024.0)
        );
        assert_eq!(
            v("mongodb_op_counters_total", &[("type", "query")]),
            Some(900.0)
        );
        assert_eq!(
            v("mongodb_operations_total", &[("type", "getmore")]),
            Some(100.0)
        );
        assert_eq!(
            v("mongodb_op_counters_repl_total", &[("type", "insert")]),
            Some(0.0)
        );
        assert_eq!(
            v(
                "mongodb_mongod_op_latencies_latency_total",
                &[("type", "read")]
            ),
            Some(2_500_000.0)
        );
        assert_eq!(
            v(
                "mongodb_mongod_op_latencies_ops_total",
                &[("type", "write")]
            ),
            Some(300.0)
        );
        // 2.5 s over 1000 reads; no mean of commands without any.
        assert_eq!(
            v("mongodb_query_duration_seconds", &[("type", "read")]),
            Some(0.0025)
        );
        assert_eq!(
            v("mongodb_query_duration_seconds", &[("type", "write")]),
            Some(0.003)
        );
        assert_eq!(
            v("mongodb_query_duration_seconds", &[("type", "command")]),
            None
        );
        assert_eq!(
            v("mongodb_mongod_metrics_cursor_open", &[("state", "total")]),
            Some(4.0)
        );
        assert_eq!(
            v("mongodb_mongod_metrics_cursor_open", &[("state", "pinned")]),
            Some(1.0)
        );
        assert_eq!(
            v("mongodb_mongod_metrics_cursor_timed_out_total", &[]),
            Some(2.0)
        );
        assert_eq!(v("mongodb_instance_uptime_seconds", &[]), Some(86_400.123));
        assert_eq!(
            v("mongodb_version_info", &[("mongodb", "7.0.12")]),
            Some(1.0)
        );
        assert_eq!(
            v("mongodb_network_bytes_total", &[("state", "in_bytes")]),
            Some(1e6)
        );
        assert_eq!(
            v("mongodb_network_metrics_num_requests_total", &[]),
            Some(5000.0)
        );
        assert_eq!(v("mongodb_memory", &[("type", "resident")]), Some(180.0));
        // Counters carry `_total`; nothing emits mongodb_up (the sidecar adds it).
        for fam in &f {
            assert_eq!(
                fam.kind == Kind::Counter,
                fam.name.ends_with("_total"),
                "{}",
                fam.name
            );
            assert_ne!(fam.name, "mongodb_up");
        }
    }

    #[test]
    fn missing_sections_leave_their_families_out() {
        // An old server: no opLatencies (before 3.2), no metrics.cursor.open, whole-second
        // uptime only, numbers as doubles.
        let f = server_families(&doc! {
            "uptime": 5.0,
            "connections": {"current": 1.0, "available": 99.0},
            "opcounters": {"insert": 1.0, "query": 2.0},
            "ok": 1.0,
        });
        assert_eq!(
            names(&f),
            [
                "mongodb_connections",
                "mongodb_op_counters_total",
                "mongodb_operations_total",
                "mongodb_instance_uptime_seconds"
            ]
        );
        assert_eq!(value(&f, "mongodb_instance_uptime_seconds", &[]), Some(5.0));
        assert!(server_families(&doc! {"ok": 1.0}).is_empty());
        // Wrong types are skipped, not a panic.
        let f = server_families(
            &doc! {"connections": "x", "opcounters": {"insert": "y"}, "uptime": []},
        );
        assert!(f.is_empty(), "{f:?}");
    }

    /// What secantusd-rs (the stand-in the integration tests run) answers: ints where mongod
    /// sends longs, `available` 0, whole-second `uptime` 0 in the first second, no
    /// `opcountersRepl`, `metrics.cursor` without `timedOut`, a one-member set.
    #[test]
    fn the_stand_ins_answers() {
        let ss = doc! {
            "host": "127.0.0.1:27991", "version": "8.2.11", "process": "mongod",
            "uptime": 0.0, "uptimeMillis": 28_i64, "uptimeEstimate": 0_i64,
            "connections": {"current": 3, "available": 0, "totalCreated": 3},
            "network": {"bytesIn": 3127_i64, "bytesOut": 3662_i64, "numRequests": 11_i64},
            "opLatencies": {"commands": {"latency": 485_i64, "ops": 5_i64},
                "reads": {"latency": 0_i64, "ops": 0_i64},
                "writes": {"latency": 16_499_i64, "ops": 5_i64},
                "transactions": {"latency": 0_i64, "ops": 0_i64}},
            "opcounters": {"insert": 5_i64, "query": 0_i64, "update": 0_i64, "delete": 0_i64,
                "getmore": 0_i64, "command": 6_i64},
            "mem": {"bits": 64, "resident": 28, "virtual": 2068, "supported": true},
            "metrics": {"cursor": {"open": {"total": 1_i64, "pinned": 0_i64, "noTimeout": 0_i64}}},
            "ok": 1.0,
        };
        let f = server_families(&ss);
        assert_eq!(
            value(&f, "mongodb_instance_uptime_seconds", &[]),
            Some(0.028)
        );
        assert_eq!(
            value(&f, "mongodb_connections", &[("state", "available")]),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "mongodb_query_duration_seconds", &[("type", "write")]),
            Some(16_499.0 / 5.0 / 1e6)
        );
        assert!(!names(&f).contains(&"mongodb_op_counters_repl_total"));
        assert!(!names(&f).contains(&"mongodb_mongod_metrics_cursor_timed_out_total"));
        let rs = doc! {
            "set": "secantus", "myState": 1, "term": 1_i64, "heartbeatIntervalMillis": 2000_i64,
            "members": [{
                "_id": 0, "name": "127.0.0.1:27991", "health": 1.0, "state": 1,
                "stateStr": "PRIMARY", "uptime": 0,
                "optimeDate": DateTime::from_millis(1_796_391_929_638),
                "configVersion": 1, "self": true,
            }],
            "ok": 1.0,
        };
        let f = replset_families(&rs);
        assert_eq!(
            names(&f),
            [
                "mongodb_mongod_replset_my_state",
                "mongodb_mongod_replset_number_of_members",
                "mongodb_mongod_replset_member_state",
                "mongodb_mongod_replset_member_health",
            ]
        );
        // $collStats storageStats of the stand-in.
        let storage = doc! {"size": 145, "count": 5, "avgObjSize": 29, "numOrphanDocs": 0,
        "storageSize": 145, "freeStorageSize": 0, "capped": false, "nindexes": 2,
        "indexBuilds": [], "totalIndexSize": 149, "indexSizes": {"_id_": 65, "y_1": 84},
        "totalSize": 294, "scaleFactor": 1};
        let c = Coll::parse("app", "orders", &storage);
        assert_eq!(
            (c.count, c.size, c.index_size, c.indexes),
            (5.0, 145.0, 149.0, 2.0)
        );
    }

    fn member(name: &str, state: i32, str_: &str, optime_ms: i64, me: bool) -> Document {
        let mut d = doc! {
            "_id": 0, "name": name, "health": 1.0, "state": state, "stateStr": str_,
            "uptime": 100, "optimeDate": DateTime::from_millis(optime_ms),
        };
        if me {
            d.insert("self", true);
        }
        d
    }

    #[test]
    fn replset_status_of_a_three_member_set() {
        let mut down = member("mongo-3:27017", 8, "(not reachable/healthy)", 0, false);
        down.insert("health", 0.0);
        let members = vec![
            Bson::Document(member(
                "mongo-1:27017",
                1,
                "PRIMARY",
                1_700_000_010_000,
                true,
            )),
            Bson::Document(member(
                "mongo-2:27017",
                2,
                "SECONDARY",
                1_700_000_000_500,
                false,
            )),
            Bson::Document(down),
        ];
        let rs = doc! {
            "set": "rs0", "myState": 1, "term": 3_i64, "heartbeatIntervalMillis": 2000_i64,
            "members": members,
            "ok": 1.0,
        };
        let f = replset_families(&rs);
        let m2 = [("set", "rs0"), ("name", "mongo-2:27017")];
        assert_eq!(
            value(&f, "mongodb_mongod_replset_member_replication_lag", &m2),
            Some(9.5)
        );
        // Lag of secondaries only: the primary and a down member have none.
        let lag = f
            .iter()
            .find(|f| f.name == "mongodb_mongod_replset_member_replication_lag")
            .unwrap();
        assert_eq!(lag.samples.len(), 1);
        let labels: Vec<&str> = lag.samples[0]
            .labels
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(labels, ["set", "name"]);
        assert_eq!(
            value(&f, "mongodb_mongod_replset_member_state", &m2),
            Some(2.0)
        );
        assert_eq!(
            value(
                &f,
                "mongodb_mongod_replset_member_health",
                &[("name", "mongo-3:27017")]
            ),
            Some(0.0)
        );
        assert_eq!(
            value(&f, "mongodb_mongod_replset_my_state", &[("set", "rs0")]),
            Some(1.0)
        );
        assert_eq!(
            value(&f, "mongodb_mongod_replset_number_of_members", &[]),
            Some(3.0)
        );
        // A secondary ahead of a stale view of the primary: no negative lag.
        let rs = doc! {"set": "rs0", "members": [
            member("a:1", 1, "PRIMARY", 1_000, false),
            member("b:1", 2, "SECONDARY", 2_000, true),
        ]};
        let f = replset_families(&rs);
        assert_eq!(
            value(
                &f,
                "mongodb_mongod_replset_member_replication_lag",
                &[("name", "b:1")]
            ),
            Some(0.0)
        );
        // Not a member: the error reply has no set, so nothing.
        let err = doc! {"ok": 0.0, "errmsg": "not running with --replSet", "code": 76};
        assert!(replset_families(&err).is_empty());
    }

    #[test]
    fn db_stats_under_both_label_schemes() {
        let app = doc! {"db": "app", "collections": 2, "views": 0, "objects": 8_i64,
        "avgObjSize": 29.0, "dataSize": 232.0, "storageSize": 4096.0, "indexes": 3,
        "indexSize": 188.0, "totalSize": 4284.0, "scaleFactor": 1, "ok": 1.0};
        let f = db_families(&[("app".into(), app)]);
        assert_eq!(
            value(&f, "mongodb_db_data_size_bytes", &[("database", "app")]),
            Some(232.0)
        );
        assert_eq!(
            value(&f, "mongodb_mongod_db_data_size_bytes", &[("db", "app")]),
            Some(232.0)
        );
        assert_eq!(
            value(&f, "mongodb_mongod_db_index_size_bytes", &[("db", "app")]),
            Some(188.0)
        );
        assert_eq!(
            value(&f, "mongodb_db_documents", &[("database", "app")]),
            Some(8.0)
        );
        assert_eq!(value(&f, "mongodb_db_collections", &[]), Some(2.0));
        assert!(!names(&f).iter().any(|n| n.is_empty()));
        assert!(db_families(&[]).is_empty());
    }

    fn coll(db: &str, name: &str, count: f64, size: f64) -> Coll {
        Coll {
            db: db.into(),
            name: name.into(),
            count,
            size,
            storage_size: size * 2.0,
            index_size: 10.0,
            indexes: 1.0,
        }
    }

    #[test]
    fn coll_stats_replies_parse_from_both_commands() {
        // mongod's collStats command and $collStats storageStats share these fields.
        let mongod = doc! {"ns": "app.orders", "size": 145_i64, "count": 5, "avgObjSize": 29,
        "storageSize": 16_384_i64, "freeStorageSize": 0, "capped": false, "nindexes": 2,
        "totalIndexSize": 40_960_i64, "indexSizes": {"_id_": 20_480, "y_1": 20_480},
        "totalSize": 57_344_i64, "scaleFactor": 1, "ok": 1.0};
        let c = Coll::parse("app", "orders", &mongod);
        assert_eq!(
            c,
            Coll {
                db: "app".into(),
                name: "orders".into(),
                count: 5.0,
                size: 145.0,
                storage_size: 16_384.0,
                index_size: 40_960.0,
                indexes: 2.0,
            }
        );
        // An empty or odd reply is zeros, not a panic.
        assert_eq!(Coll::parse("a", "b", &doc! {"size": "x"}).size, 0.0);
    }

    #[test]
    fn collections_past_the_bound_are_summed_per_database() {
        let colls = vec![
            coll("app", "small", 1.0, 10.0),
            coll("app", "big", 100.0, 1000.0),
            coll("app", "mid", 50.0, 500.0),
            coll("app", "tiny", 2.0, 5.0),
            coll("logs", "a", 7.0, 70.0),
            // Ties by size go by name, so the labelled set is stable.
            coll("app", "mid2", 50.0, 500.0),
        ];
        let f = collection_families(colls, 3);
        let docs = f
            .iter()
            .find(|f| f.name == "mongodb_collection_documents")
            .unwrap();
        let got: Vec<(String, String, f64)> = docs
            .samples
            .iter()
            .map(|s| (s.labels[0].1.clone(), s.labels[1].1.clone(), s.value))
            .collect();
        assert_eq!(
            got,
            [
                ("app".into(), "big".into(), 100.0),
                ("app".into(), "mid".into(), 50.0),
                ("app".into(), "mid2".into(), 50.0),
                ("logs".into(), OTHER.into(), 7.0),
                ("app".into(), OTHER.into(), 3.0),
            ]
        );
        assert_eq!(
            value(
                &f,
                "mongodb_mongod_db_coll_size",
                &[("db", "app"), ("coll", OTHER)]
            ),
            Some(15.0)
        );
        assert_eq!(
            value(
                &f,
                "mongodb_mongod_db_coll_indexes",
                &[("db", "app"), ("coll", OTHER)]
            ),
            Some(2.0)
        );
        assert!(docs.help.contains("_other"), "{}", docs.help);
        // Under the bound nothing is summed; no collections, no families.
        let f = collection_families(vec![coll("app", "x", 1.0, 1.0)], 100);
        assert!(!f[0].samples.iter().any(|s| s.labels[1].1 == OTHER));
        assert!(collection_families(Vec::new(), 3).is_empty());
    }
}
