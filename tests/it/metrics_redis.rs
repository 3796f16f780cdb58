//! Redis's statistics against Debian's `prometheus-redis-exporter` on the same server: every
//! family the issue names exists in both with the same type and label names, and the stable
//! ones have equal values, first from `EngineOps::stats` itself, then as the sidecar serves
//! them on `/metrics`. Also: the round's errors (a server that never answers, a password).

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dbkeeper::engine::redis::RedisEngine;
use dbkeeper::engine::{EngineOps, EngineOptions};
use dbkeeper::secret::Secret;
use dbkeeper::stats::{Family, Kind};
use serde::Deserialize;

use crate::common::chroma::python;
use crate::common::redis::{Opts, RedisServer};
use crate::common::{free_port, server_binary, wait_until};
use crate::metrics::{Sidecar, get_body as get};

/// The families the issue names, but `redis_up` (which the sidecar adds, not `stats`).
const FAMILIES: &[&str] = &[
    "redis_uptime_in_seconds",
    "redis_connected_clients",
    "redis_blocked_clients",
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_mem_fragmentation_ratio",
    "redis_db_keys",
    "redis_db_keys_expiring",
    "redis_commands_processed_total",
    "redis_commands_total",
    "redis_commands_duration_seconds_total",
    "redis_keyspace_hits_total",
    "redis_keyspace_misses_total",
    "redis_evicted_keys_total",
    "redis_expired_keys_total",
    "redis_connected_slaves",
    "redis_rdb_last_save_timestamp_seconds",
    "redis_rdb_changes_since_last_save",
    "redis_aof_enabled",
    "redis_net_input_bytes_total",
    "redis_net_output_bytes_total",
];

/// Families whose values do not move between two scrapes of an idle server.
const STABLE: &[&str] = &[
    "redis_db_keys",
    "redis_db_keys_expiring",
    "redis_memory_max_bytes",
    "redis_aof_enabled",
    "redis_connected_slaves",
];

/// One sample name of a page, as the Prometheus parser read it.
#[derive(Debug, Deserialize)]
struct Scraped {
    /// `gauge` or `counter` (of the family the sample belongs to).
    kind: String,
    labels: BTreeSet<String>,
    /// (labels, value), labels as sorted pairs.
    samples: Vec<(Vec<(String, String)>, f64)>,
}

type Page = BTreeMap<String, Scraped>;

/// Parses metric pages with the Prometheus project's own Python parser: by sample name, the
/// family's type, the label names and the samples. An OpenMetrics page (`# EOF`) goes to
/// that format's parser.
fn parse_pages(pages: &[&str]) -> Vec<Page> {
    let script = r##"
import json, sys
from prometheus_client.parser import text_string_to_metric_families as text
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
out = []
for path in sys.argv[1:]:
    page = open(path).read()
    parse = om if page.rstrip().endswith("# EOF") else text
    names = {}
    for fam in parse(page):
        for s in fam.samples:
            n = names.setdefault(s.name, {"kind": fam.type, "labels": [], "samples": []})
            n["labels"] = sorted(set(n["labels"]) | set(s.labels))
            n["samples"].append([sorted(s.labels.items()), s.value])
    out.append(names)
print(json.dumps(out))
"##;
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let path = dir.path().join(format!("page{i}"));
            std::fs::write(&path, p).unwrap();
            path
        })
        .collect();
    let o = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(&paths)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser rejected a page: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `stats()`'s families in the parser's shape, by sample name.
fn page_of(families: &[Family]) -> Page {
    families
        .iter()
        .map(|f| {
            let mut labels = BTreeSet::new();
            let samples = f
                .samples
                .iter()
                .map(|s| {
                    let mut l = s.labels.clone();
                    l.sort();
                    labels.extend(l.iter().map(|(k, _)| k.clone()));
                    (l, s.value)
                })
                .collect();
            let kind = match f.kind {
                Kind::Gauge => "gauge",
                Kind::Counter => "counter",
            };
            let scraped = Scraped {
                kind: kind.to_owned(),
                labels,
                samples,
            };
            (f.name.clone(), scraped)
        })
        .collect()
}

/// Ours against the exporter's: the issue's families exist in both with the same type and
/// label names, and so does every other family both have; the stable ones are equal.
fn compare(ours: &Page, exporter: &Page) {
    for name in FAMILIES {
        assert!(exporter.contains_key(*name), "the exporter has no {name}");
        assert!(ours.contains_key(*name), "we have no {name}");
    }
    for (name, o) in ours {
        let Some(e) = exporter.get(name) else {
            continue;
        };
        assert_eq!(o.kind, e.kind, "type of {name}");
        assert_eq!(o.labels, e.labels, "label names of {name}");
    }
    for name in STABLE {
        let sorted = |s: &Scraped| {
            let mut v = s.samples.clone();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(
            sorted(&ours[*name]),
            sorted(&exporter[*name]),
            "values of {name}"
        );
    }
    // The figures are really this server's (the exporter's zeros for empty dbs included).
    let db = |db: &str| {
        ours["redis_db_keys"]
            .samples
            .iter()
            .find(|(l, _)| l == &[("db".to_owned(), db.to_owned())])
            .map(|s| s.1)
    };
    assert_eq!(db("db0"), Some(5.0));
    assert_eq!(db("db3"), Some(3.0));
    assert_eq!(db("db1"), Some(0.0));
    assert_eq!(
        ours["redis_memory_max_bytes"].samples[0].1,
        64.0 * 1048576.0
    );
    assert_eq!(ours["redis_aof_enabled"].samples[0].1, 1.0);
    let get = ours["redis_commands_total"]
        .samples
        .iter()
        .find(|(l, _)| l == &[("cmd".to_owned(), "get".to_owned())])
        .map(|s| s.1);
    assert!(get >= Some(2.0), "{get:?}");
}

/// One server with keys in db0 and db3 (some with a TTL), `maxmemory` and the AOF on.
fn server() -> RedisServer {
    let r = RedisServer::start_with(Opts {
        appendonly: true,
        extra: &["--maxmemory", "64mb"],
        ..Opts::default()
    });
    for (db, key, ttl) in [
        ("0", "a", None),
        ("0", "b", None),
        ("0", "c", None),
        ("0", "d", Some("1000")),
        ("0", "e", Some("2000")),
        ("3", "x", None),
        ("3", "y", None),
        ("3", "z", Some("3000")),
    ] {
        let mut args = vec!["-n", db, "SET", key, "v"];
        if let Some(t) = ttl {
            args.extend(["EX", t]);
        }
        assert_eq!(r.cli(&args), "OK");
    }
    r.cli(&["GET", "a"]);
    r.cli(&["GET", "missing"]);
    r
}

/// Debian's `prometheus-redis-exporter` on a server, killed on drop.
struct Exporter {
    child: Child,
    port: u16,
}

impl Exporter {
    fn start(redis: &RedisServer) -> Exporter {
        let bin = server_binary(
            "DBKEEPER_TEST_REDIS_EXPORTER",
            "redis_exporter/redis_exporter",
            "prometheus-redis-exporter",
        );
        let port = free_port();
        let child = Command::new(bin)
            .args(["-redis.addr", &redis.url()])
            .args(["-web.listen-address", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus-redis-exporter");
        let e = Exporter { child, port };
        let up = wait_until(Duration::from_secs(30), || {
            get(port, "/metrics").is_ok_and(|p| p.contains("\nredis_up 1"))
        });
        assert!(up, "the exporter did not report redis_up 1");
        e
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stats(url: &str, timeout: Duration) -> dbkeeper::Result<Vec<Family>> {
    let e = RedisEngine::new(&Secret::new(url.to_owned()), &EngineOptions::default()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(e.stats(timeout))
}

#[test]
fn stats_name_type_and_label_as_the_exporter_does() {
    let r = server();
    let exporter = Exporter::start(&r);
    let ours = stats(&r.url(), Duration::from_secs(5)).unwrap();
    assert!(ours.iter().all(|f| f.name != "redis_up"));
    let scraped = get(exporter.port, "/metrics").unwrap();
    let pages = parse_pages(&[&scraped]);
    compare(&page_of(&ours), &pages[0]);
}

/// A sidecar on the Redis at `url`, and its first page with the Redis families on it.
fn sidecar_on(url: &str, repo: &std::path::Path) -> (Sidecar, String) {
    let sc = Sidecar::start(repo, &[("DBKEEPER_REDIS_URL", url)]);
    // The first round runs in the background after start; one interval is 1s.
    let mut page = String::new();
    let served = wait_until(Duration::from_secs(30), || {
        page = get(sc.port, "/metrics").unwrap_or_default();
        page.contains("\nredis_db_keys{")
    });
    assert!(
        served,
        "the sidecar serves no redis_db_keys within 30s (is the stats loop wired?)\n{page}\n{}",
        sc.log()
    );
    (sc, page)
}

#[test]
fn the_sidecar_serves_the_exporters_redis_families() {
    let r = server();
    let exporter = Exporter::start(&r);
    let repo = tempfile::tempdir().unwrap();
    let url = r.url();
    let (_sc, page) = sidecar_on(&url, repo.path());
    let scraped = get(exporter.port, "/metrics").unwrap();
    let pages = parse_pages(&[&page, &scraped]);
    assert!(
        pages[0].contains_key("redis_up"),
        "the sidecar has no redis_up"
    );
    compare(&pages[0], &pages[1]);
}

#[test]
fn a_server_that_never_answers_costs_the_timeout_and_no_more() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = std::thread::spawn(move || {
        // Accept and keep the connection open, never answering.
        let held = listener.incoming().next();
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
    });
    let started = Instant::now();
    let e = stats(
        &format!("redis://127.0.0.1:{port}"),
        Duration::from_millis(500),
    )
    .unwrap_err();
    let took = started.elapsed();
    assert!(e.is_retryable(), "{e}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop(hold);
}

#[test]
fn a_password_is_sent_and_a_missing_one_is_refused() {
    let r = RedisServer::with_password("s3cret-Stats");
    r.cli(&["SET", "k", "v"]);
    let fs = stats(&r.url(), Duration::from_secs(5)).unwrap();
    let keys = fs.iter().find(|f| f.name == "redis_db_keys").unwrap();
    assert!(keys.samples.iter().any(|s| s.value == 1.0));

    let e = stats(
        &format!("redis://127.0.0.1:{}", r.port),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    let e = stats(
        &format!("redis://:n0t-Th3-pass@127.0.0.1:{}", r.port),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(!format!("{e:#}").contains("n0t-Th3-pass"), "{e:#}");
}

/// No label or value of the page or of `/stats` carries the password or a key's name: keys are
/// counted per db, commands by name, never by key.
#[test]
fn no_label_carries_a_password_or_a_key_name() {
    let pw = "s3cret-Label-pw";
    let r = RedisServer::with_password(pw);
    for key in ["customer:4711:email", "session-token-abcdef"] {
        r.cli(&["SET", key, "v"]);
        r.cli(&["GET", key]);
    }
    r.cli(&["HSET", "profile-of-alice", "mail", "a@example.org"]);
    let repo = tempfile::tempdir().unwrap();
    let url = r.url();
    let (sc, page) = sidecar_on(&url, repo.path());
    let stats = get(sc.port, "/stats").unwrap();
    for text in [&page, &stats] {
        for secret in [
            pw,
            "customer:4711",
            "session-token",
            "profile-of-alice",
            "a@example.org",
        ] {
            assert!(!text.contains(secret), "{secret} is served:\n{text}");
        }
    }
    // The keys are there, counted.
    assert!(page.contains("redis_db_keys{db=\"db0\"} 3"), "{page}");
}
