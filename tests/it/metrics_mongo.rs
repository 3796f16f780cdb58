//! MongoDB's statistics against the stand-in (`secantusd-rs`): `EngineOps::stats` gives the
//! families percona's exporter and the seed name, with the figures the test wrote (documents
//! per collection, the rest past DBKEEPER_STATS_MAX_COLLECTIONS summed as `_other`), counters
//! that grow with writes, replica-set figures only from a member, and a bounded round against
//! a server that never answers; then the same through a running sidecar's `/metrics`.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use dbkeeper::engine::mongodb::MongoEngine;
use dbkeeper::engine::{EngineOps, EngineOptions};
use dbkeeper::secret::Secret;
use dbkeeper::stats::{Family, Kind};
use mongodb::bson::{Document, doc};

use crate::common::mongodb::{Mongo, PASSWORD, USER, enc};
use crate::common::wait_until;
use crate::metrics::{Sidecar, get_body as get};

fn stats(url: &str, max: Option<usize>, timeout: Duration) -> dbkeeper::Result<Vec<Family>> {
    let opts = EngineOptions {
        stats_max_collections: max,
        ..EngineOptions::default()
    };
    let e = MongoEngine::new(&Secret::new(url.to_owned()), &opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(e.stats(timeout))
}

fn family<'a>(fs: &'a [Family], name: &str) -> &'a Family {
    fs.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", names(fs)))
}

fn names(fs: &[Family]) -> Vec<&str> {
    fs.iter().map(|f| f.name.as_str()).collect()
}

fn label<'a>(s: &'a dbkeeper::stats::Sample, key: &str) -> Option<&'a str> {
    s.labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(fs: &[Family], name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = family(fs, name);
    let found: Vec<f64> = f
        .samples
        .iter()
        .filter(|s| labels.iter().all(|(k, v)| label(s, k) == Some(v)))
        .map(|s| s.value)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {:?}", f.samples);
    found[0]
}

/// `mongodb_collection_documents` as database → collection → documents.
fn documents(fs: &[Family]) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for s in &family(fs, "mongodb_collection_documents").samples {
        let db = label(s, "database").unwrap().to_owned();
        let coll = label(s, "collection").unwrap().to_owned();
        assert!(
            out.entry(db).or_default().insert(coll, s.value).is_none(),
            "a collection twice: {s:?}"
        );
    }
    out
}

fn insert(m: &Mongo, db: &str, coll: &str, n: usize) {
    let docs: Vec<Document> = (0..n)
        .map(|i| doc! {"i": i as i64, "pad": "x".repeat(40 * (i + 1))})
        .collect();
    let r = m.command(db, doc! {"insert": coll, "documents": docs});
    assert_eq!(r.get_i32("n").ok(), Some(n as i32), "{r}");
}

/// `shop.orders` 5, `shop.users` 3, `logs.c0..c5` 1..6 documents.
fn fill(m: &Mongo) {
    insert(m, "shop", "orders", 5);
    insert(m, "shop", "users", 3);
    m.command(
        "shop",
        doc! {"createIndexes": "orders", "indexes": [{"key": {"i": 1}, "name": "i_1"}]},
    );
    for i in 0..6 {
        insert(m, "logs", &format!("c{i}"), i + 1);
    }
}

#[test]
fn a_members_figures_under_percona_and_seed_names() {
    let m = Mongo::start(false, false);
    fill(&m);
    // Uptime is whole seconds on some servers: past the first.
    std::thread::sleep(Duration::from_millis(1100));
    let fs = stats(&m.uri(), None, Duration::from_secs(5)).unwrap();
    assert!(
        !names(&fs).contains(&"mongodb_up"),
        "the sidecar adds mongodb_up"
    );
    for f in &fs {
        assert_eq!(
            f.kind == Kind::Counter,
            f.name.ends_with("_total"),
            "{}",
            f.name
        );
        assert!(!f.samples.is_empty(), "{} has no samples", f.name);
    }
    assert!(value(&fs, "mongodb_connections", &[("state", "current")]) >= 1.0);
    value(&fs, "mongodb_connections", &[("state", "available")]);
    assert!(value(&fs, "mongodb_instance_uptime_seconds", &[]) > 0.0);
    // mongod counts inserted documents, the stand-in insert commands: at least the eight.
    assert!(value(&fs, "mongodb_op_counters_total", &[("type", "insert")]) >= 8.0);
    assert_eq!(
        value(&fs, "mongodb_op_counters_total", &[("type", "insert")]),
        value(&fs, "mongodb_operations_total", &[("type", "insert")])
    );
    assert!(
        value(
            &fs,
            "mongodb_mongod_op_latencies_ops_total",
            &[("type", "write")]
        ) >= 8.0
    );
    value(
        &fs,
        "mongodb_mongod_op_latencies_latency_total",
        &[("type", "command")],
    );
    assert!(value(&fs, "mongodb_query_duration_seconds", &[("type", "write")]) > 0.0);
    value(
        &fs,
        "mongodb_mongod_metrics_cursor_open",
        &[("state", "total")],
    );
    // The stand-in is a one-member set "secantus": a PRIMARY, so no lag of its own.
    let me = format!("127.0.0.1:{}", m.port);
    let member = [("set", "secantus"), ("name", me.as_str())];
    assert_eq!(
        value(&fs, "mongodb_mongod_replset_member_state", &member),
        1.0
    );
    assert_eq!(
        value(&fs, "mongodb_mongod_replset_member_health", &member),
        1.0
    );
    assert!(!names(&fs).contains(&"mongodb_mongod_replset_member_replication_lag"));

    // Under the default bound, every collection by name with its documents.
    let docs = documents(&fs);
    assert_eq!(docs["shop"]["orders"], 5.0);
    assert_eq!(docs["shop"]["users"], 3.0);
    for i in 0..6 {
        assert_eq!(docs["logs"][&format!("c{i}")], (i + 1) as f64);
    }
    assert!(!docs.values().any(|c| c.contains_key("_other")), "{docs:?}");
    let shop = [("database", "shop"), ("collection", "orders")];
    assert!(value(&fs, "mongodb_collection_size_bytes", &shop) > 0.0);
    assert!(value(&fs, "mongodb_collection_index_size_bytes", &shop) > 0.0);
    assert_eq!(
        value(
            &fs,
            "mongodb_mongod_db_coll_size",
            &[("db", "shop"), ("coll", "orders")]
        ),
        value(&fs, "mongodb_collection_size_bytes", &shop)
    );
    assert_eq!(
        value(
            &fs,
            "mongodb_mongod_db_coll_indexes",
            &[("db", "shop"), ("coll", "orders")]
        ),
        2.0
    );
    assert_eq!(
        value(&fs, "mongodb_db_documents", &[("database", "shop")]),
        8.0
    );
    assert_eq!(
        value(&fs, "mongodb_db_collections", &[("database", "logs")]),
        6.0
    );
    assert!(value(&fs, "mongodb_mongod_db_data_size_bytes", &[("db", "logs")]) > 0.0);

    // Writes move the counters.
    insert(&m, "shop", "orders", 10);
    let after = stats(&m.uri(), None, Duration::from_secs(5)).unwrap();
    let grew = |name: &str, t: &str| {
        value(&after, name, &[("type", t)]) > value(&fs, name, &[("type", t)])
    };
    assert!(grew("mongodb_op_counters_total", "insert"));
    assert!(grew("mongodb_operations_total", "insert"));
    assert!(grew("mongodb_mongod_op_latencies_ops_total", "write"));
    assert_eq!(documents(&after)["shop"]["orders"], 15.0);
}

#[test]
fn collections_past_the_bound_are_summed_per_database() {
    let m = Mongo::start(false, true);
    fill(&m);
    let fs = stats(&m.uri(), Some(3), Duration::from_secs(5)).unwrap();
    let docs = documents(&fs);
    let named: usize = docs
        .values()
        .map(|c| c.keys().filter(|k| *k != "_other").count())
        .sum();
    assert_eq!(named, 3, "{docs:?}");
    // Every document is still counted, in its database's own or `_other` figure.
    let total = |db: &str| docs.get(db).map_or(0.0, |c| c.values().sum::<f64>());
    assert_eq!(total("shop"), 8.0, "{docs:?}");
    assert_eq!(total("logs"), 21.0, "{docs:?}");
    assert!(docs["logs"].contains_key("_other"), "{docs:?}");
    // The largest by size (the padding grows with the document number) has its own figure.
    assert!(docs["logs"].contains_key("c5"), "{docs:?}");
    let help = &family(&fs, "mongodb_collection_documents").help;
    assert!(help.contains("_other"), "{help}");
    // A standalone server: no replica-set figures, and not an error.
    assert!(
        !names(&fs).iter().any(|n| n.contains("replset")),
        "{:?}",
        names(&fs)
    );
    assert!(value(&fs, "mongodb_connections", &[("state", "current")]) >= 1.0);
}

#[test]
fn credentials_are_used_and_a_wrong_password_is_refused() {
    let m = Mongo::start(true, false);
    insert(&m, "shop", "orders", 2);
    let fs = stats(&m.uri(), None, Duration::from_secs(5)).unwrap();
    assert_eq!(documents(&fs)["shop"]["orders"], 2.0);
    let bad = format!(
        "mongodb://{USER}:{}@127.0.0.1:{}/?directConnection=true&authSource=admin",
        enc("n0t-Th3-pass"),
        m.port
    );
    let e = stats(&bad, None, Duration::from_secs(5)).unwrap_err();
    assert!(!e.is_retryable(), "{e:#}");
    let msg = format!("{e:#}");
    assert!(
        !msg.contains("n0t-Th3-pass") && !msg.contains(PASSWORD),
        "{msg}"
    );
}

#[test]
fn a_server_that_never_answers_costs_the_timeout_and_no_more() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        // Accept every connection and keep it open, never answering.
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match listener.accept() {
                Ok((s, _)) => held.push(s),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        drop(held);
    });
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let e = stats(
        &format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        None,
        timeout,
    )
    .unwrap_err();
    let took = started.elapsed();
    assert!(e.is_retryable(), "{e:#}");
    assert!(took < timeout + Duration::from_millis(700), "{took:?}");
    hold.join().unwrap();
}

#[test]
fn the_sidecar_serves_the_mongodb_families() {
    let m = Mongo::start(false, false);
    fill(&m);
    let repo = tempfile::tempdir().unwrap();
    let uri = m.uri();
    let sc = Sidecar::start(
        repo.path(),
        &[
            ("DBKEEPER_MONGODB_URI", &uri),
            ("DBKEEPER_STATS_MAX_COLLECTIONS", "2"),
        ],
    );
    let port = sc.port;
    let mut page = String::new();
    let served = wait_until(Duration::from_secs(30), || {
        page = get(port, "/metrics").unwrap_or_default();
        page.contains("\nmongodb_connections{")
    });
    assert!(
        served,
        "no mongodb_connections in 30s\n{page}\n{}",
        sc.log()
    );
    for want in [
        "mongodb_up 1",
        "mongodb_connections{state=\"current\"}",
        "mongodb_instance_uptime_seconds ",
        "mongodb_op_counters_total{type=\"insert\"}",
        "collection=\"_other\"",
    ] {
        assert!(page.contains(want), "no {want}:\n{page}");
    }
    // Prometheus's own linter accepts the page.
    crate::metrics::promtool_check(&page, false);
}
