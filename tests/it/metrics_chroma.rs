//! Chroma's statistics (`EngineOps::stats`) against a real Chroma server: records per
//! collection with the bound on labelled collections, collections per database, the version;
//! and a server that accepts and never answers costs no more than the timeout.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use dbkeeper::engine::chroma::ChromaEngine;
use dbkeeper::engine::{EngineOps, EngineOptions};
use dbkeeper::secret::Secret;
use dbkeeper::stats::Family;

use crate::common::chroma::{ChromaServer, py};

fn stats(url: &str, max: usize, timeout: Duration) -> dbkeeper::Result<Vec<Family>> {
    let opts = EngineOptions {
        stats_max_collections: Some(max),
        ..EngineOptions::default()
    };
    let e = ChromaEngine::new(&Secret::new(url.to_owned()), &opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(e.stats(timeout))
}

fn samples(f: &[Family], name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    f.iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no {name} in {f:?}"))
        .samples
        .iter()
        .map(|s| (s.labels.clone(), s.value))
        .collect()
}

fn labels(db: &str, coll: &str) -> Vec<(String, String)> {
    [
        ("tenant", "default_tenant"),
        ("database", db),
        ("collection", coll),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

#[test]
fn records_per_collection_are_counted_and_bounded() {
    let server = ChromaServer::start();
    py(
        r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), settings=chromadb.Settings(anonymized_telemetry=False))
for name, n in [("big", 30), ("mid", 12), ("small", 2), ("empty", 0)]:
    col = c.create_collection(name)
    if n:
        col.add(ids=[f"{name}-{i}" for i in range(n)], embeddings=[[float(i), 1.0, 2.0] for i in range(n)])
"#,
        &[&server.port.to_string()],
    );
    let f = stats(&server.url(), 2, Duration::from_secs(10)).unwrap();
    assert_eq!(
        samples(&f, "chroma_collection_records"),
        vec![
            (labels("default_database", "big"), 30.0),
            (labels("default_database", "mid"), 12.0),
            (labels("default_database", "_other"), 2.0),
        ]
    );
    let colls = samples(&f, "chroma_collections");
    assert_eq!(colls.len(), 1);
    assert_eq!(colls[0].1, 4.0);
    let info = samples(&f, "chroma_build_info");
    let version = &info[0].0[0];
    assert_eq!(version.0, "version");
    assert!(version.1.starts_with("1."), "{version:?}");
    for name in [
        "chroma_heartbeat_duration_seconds",
        "chroma_probe_query_duration_seconds",
    ] {
        let s = samples(&f, name);
        assert!(s[0].1 > 0.0 && s[0].1 < 10.0, "{name}: {s:?}");
    }
    // Unbounded, every collection has its own figure.
    let f = stats(&server.url(), 100, Duration::from_secs(10)).unwrap();
    assert_eq!(samples(&f, "chroma_collection_records").len(), 4);
}

#[test]
fn a_server_that_never_answers_costs_the_timeout_and_no_more() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        // Accept and keep the connections open, never answering.
        let mut held = Vec::new();
        for c in listener.incoming().take(4) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let started = Instant::now();
    let r = stats(
        &format!("http://127.0.0.1:{port}"),
        100,
        Duration::from_millis(500),
    );
    let took = started.elapsed();
    let e = r.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    drop(hold);
}
