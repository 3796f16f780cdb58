//! RabbitMQ integration tests: the real binary against private brokers (Debian's
//! rabbitmq-server 3.10 with the management plugin), seeded and compared through the
//! management API.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::Digest;

use crate::common::rabbitmq::{RabbitServer, comparable};
use crate::common::{assert_code, dbkeeper, run, sets, stderr, stdout, temps};

fn dk(repo: &Path, b: &RabbitServer) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_RABBITMQ_URL", b.url())
        .env("DBKEEPER_RABBITMQ_API_URL", b.api_url());
    c
}

/// Every kind of definition: users with passwords and tags, vhosts, permissions, topic
/// permissions, a policy, a vhost limit (a parameter), a global parameter, classic durable
/// queues with arguments, exchanges of four types, queue and exchange-to-exchange bindings
/// (with arguments), in `orders` and in `/`.
fn seed(b: &RabbitServer) {
    let calls: Vec<(&str, String, Value)> = vec![
        ("PUT", "/api/vhosts/orders".into(), json!({})),
        (
            "PUT",
            "/api/users/app".into(),
            json!({"password": "app-pw", "tags": "monitoring"}),
        ),
        (
            "PUT",
            "/api/users/reader".into(),
            json!({"password": "reader-pw", "tags": ""}),
        ),
        (
            "PUT",
            "/api/permissions/orders/app".into(),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        ),
        (
            "PUT",
            "/api/permissions/orders/reader".into(),
            json!({"configure": "", "write": "", "read": "^q\\."}),
        ),
        (
            "PUT",
            "/api/topic-permissions/orders/app".into(),
            json!({"exchange": "amq.topic", "write": "^a\\.", "read": ".*"}),
        ),
        (
            "PUT",
            "/api/policies/orders/ttl".into(),
            json!({"pattern": "^q\\.ttl", "apply-to": "queues", "priority": 1, "definition": {"message-ttl": 60000}}),
        ),
        (
            "PUT",
            "/api/vhost-limits/orders/max-connections".into(),
            json!({"value": 50}),
        ),
        (
            "PUT",
            "/api/global-parameters/app-setting".into(),
            json!({"name": "app-setting", "value": {"a": 1}}),
        ),
        (
            "PUT",
            "/api/queues/orders/q.classic".into(),
            json!({"durable": true, "arguments": {"x-queue-type": "classic", "x-max-length": 100}}),
        ),
        (
            "PUT",
            "/api/queues/orders/q.ttl".into(),
            json!({"durable": true, "arguments": {"x-message-ttl": 5000}}),
        ),
        (
            "PUT",
            "/api/queues/%2F/q.root".into(),
            json!({"durable": true}),
        ),
        (
            "PUT",
            "/api/exchanges/orders/ex.topic".into(),
            json!({"type": "topic", "durable": true}),
        ),
        (
            "PUT",
            "/api/exchanges/orders/ex.fanout".into(),
            json!({"type": "fanout", "durable": true}),
        ),
        (
            "PUT",
            "/api/exchanges/orders/ex.headers".into(),
            json!({"type": "headers", "durable": true, "arguments": {"alternate-exchange": "ex.fanout"}}),
        ),
        (
            "PUT",
            "/api/exchanges/%2F/ex.root".into(),
            json!({"type": "direct", "durable": true}),
        ),
        (
            "POST",
            "/api/bindings/orders/e/ex.topic/q/q.classic".into(),
            json!({"routing_key": "a.#"}),
        ),
        (
            "POST",
            "/api/bindings/orders/e/ex.fanout/e/ex.topic".into(),
            json!({"routing_key": ""}),
        ),
        (
            "POST",
            "/api/bindings/orders/e/ex.headers/q/q.ttl".into(),
            json!({"routing_key": "", "arguments": {"x-match": "all", "k": "v"}}),
        ),
        (
            "POST",
            "/api/bindings/orders/e/amq.direct/q/q.classic".into(),
            json!({"routing_key": "k"}),
        ),
        (
            "POST",
            "/api/bindings/%2F/e/ex.root/q/q.root".into(),
            json!({"routing_key": "r"}),
        ),
    ];
    for (method, path, body) in calls {
        b.api_ok(method, &path, Some(&body));
    }
}

fn manifest(repo: &Path, set: &str) -> Value {
    serde_json::from_slice(&std::fs::read(repo.join(set).join("manifest.json")).unwrap()).unwrap()
}

/// Everything round-trips into a fresh broker (preseed), passwords included; a non-empty
/// target is refused with nothing changed, and `--force` replaces its definitions.
#[test]
fn definitions_round_trip_into_a_fresh_broker() {
    let (src, dst) = (RabbitServer::spawn(), RabbitServer::spawn());
    let (src, dst) = (src.wait_up(), dst.wait_up());
    seed(&src);
    let repo = tempfile::tempdir().unwrap();

    let o = run(dk(repo.path(), &src).arg("backup"));
    assert_code(&o, 0);
    let set = sets(repo.path()).pop().unwrap();
    let m = manifest(repo.path(), &set);
    let counts = &m["engines"]["rabbitmq"]["counts"];
    assert_eq!(counts["users"], 3, "{counts}");
    assert_eq!(counts["vhosts"], 2, "{counts}");
    // guest gets one on `orders` by creating it.
    assert_eq!(counts["permissions"], 4, "{counts}");
    assert_eq!(counts["topic_permissions"], 1, "{counts}");
    assert_eq!(counts["policies"], 1, "{counts}");
    assert_eq!(counts["parameters"], 1, "{counts}");
    assert_eq!(counts["global_parameters"], 1, "{counts}");
    assert_eq!(counts["queues"], 3, "{counts}");
    assert_eq!(counts["exchanges"], 4, "{counts}");
    assert_eq!(counts["bindings"], 5, "{counts}");
    assert_code(
        &run(dk(repo.path(), &src).args(["verify", "--deep", "latest"])),
        0,
    );

    // Preseed a fresh broker: everything arrives, compared through the management API.
    let o = run(dk(repo.path(), &dst).arg("preseed"));
    assert_code(&o, 0);
    assert_eq!(
        comparable(&src.definitions()),
        comparable(&dst.definitions())
    );
    // The marker is gone, and the users log in with their own passwords (hashes came along).
    assert!(!dst.definitions().to_string().contains("dbkeeper-restore"));
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_RABBITMQ_API_URL", dst.api_url())
        .args([
            "health",
            &format!("amqp://app:app-pw@127.0.0.1:{}/orders", dst.amqp_port),
        ]));
    assert_code(&o, 0);

    // A non-empty target: refused, nothing changed.
    dst.api_ok(
        "PUT",
        "/api/queues/%2F/extra",
        Some(&json!({"durable": true})),
    );
    dst.api_ok("PUT", "/api/vhosts/stray", Some(&json!({})));
    let before = dst.definitions();
    let o = run(dk(repo.path(), &dst).args(["restore", "latest"]));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(comparable(&before), comparable(&dst.definitions()));
    // preseed leaves it alone too.
    assert_code(&run(dk(repo.path(), &dst).arg("preseed")), 0);
    assert_eq!(comparable(&before), comparable(&dst.definitions()));

    // --force: the target's own objects go, the set's come back.
    let o = run(dk(repo.path(), &dst).args(["restore", "--force", "latest"]));
    assert_code(&o, 0);
    assert_eq!(
        comparable(&src.definitions()),
        comparable(&dst.definitions())
    );

    // A preseed interrupted half-way (the marker left behind, some objects in): wiped and
    // redone, not mistaken for data.
    dst.api_ok(
        "PUT",
        "/api/global-parameters/dbkeeper-restore-in-progress",
        Some(&json!({"name": "dbkeeper-restore-in-progress", "value": "x"})),
    );
    dst.api_ok(
        "PUT",
        "/api/queues/%2F/half",
        Some(&json!({"durable": true})),
    );
    let o = run(dk(repo.path(), &dst).arg("preseed"));
    assert_code(&o, 0);
    assert_eq!(
        comparable(&src.definitions()),
        comparable(&dst.definitions())
    );

    // A set whose binding names a queue it does not define fails deep verify (counts agree).
    corrupt_set(repo.path(), &set);
    let o = run(dk(repo.path(), &src).args(["verify", "--deep", "latest"]));
    assert_code(&o, 4);
    assert!(
        stdout(&o).contains("no queue \"q.classic\"")
            || stderr(&o).contains("no queue \"q.classic\""),
        "{}\n{}",
        stdout(&o),
        stderr(&o)
    );
}

/// Removes queue `q.classic` from the set's definitions (its bindings stay), rewriting the
/// artifact, its checksum and the queue count, so only the reference check can notice.
fn corrupt_set(repo: &Path, set: &str) {
    let dir = repo.join(set);
    let art = dir.join("rabbitmq/definitions.json.zst");
    let raw = zstd::decode_all(std::fs::File::open(&art).unwrap()).unwrap();
    let mut d: Value = serde_json::from_slice(&raw).unwrap();
    d["queues"]
        .as_array_mut()
        .unwrap()
        .retain(|q| q["name"] != "q.classic");
    let raw = serde_json::to_vec_pretty(&d).unwrap();
    let stored = zstd::encode_all(&raw[..], 3).unwrap();
    std::fs::write(&art, &stored).unwrap();
    let mut m = manifest(repo, set);
    let e = &mut m["engines"]["rabbitmq"];
    e["counts"]["queues"] = json!(2);
    e["files"][0]["size"] = json!(stored.len());
    e["files"][0]["raw_size"] = json!(raw.len());
    e["files"][0]["sha256"] = json!(hex::encode(sha2::Sha256::digest(&stored)));
    let bytes = serde_json::to_vec_pretty(&m).unwrap();
    std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
    std::fs::write(
        dir.join("manifest.json.sha256"),
        format!(
            "{}  manifest.json\n",
            hex::encode(sha2::Sha256::digest(&bytes))
        ),
    )
    .unwrap();
}

/// `wait` waits for the handshake of a broker still starting; `health` reports the version
/// and, once a memory alarm is set, unhealthy naming the alarm; bad credentials, an unknown
/// vhost and ports that speak other protocols fail with one line and their exit codes; a
/// broker whose answer is cut short, or that is gone, leaves no set.
#[test]
fn wait_health_alarms_and_bad_input() {
    let repo = tempfile::tempdir().unwrap();
    let broker = RabbitServer::spawn_with(true);
    let waiting = dk(repo.path(), &broker)
        .args(["wait", "--timeout", "120s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = waiting.wait_with_output().unwrap();
    assert_code(&o, 0);
    let broker = broker.wait_up();

    let o = run(dk(repo.path(), &broker).arg("health"));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("3.10"), "{}", stdout(&o));
    assert!(stdout(&o).contains("product=RabbitMQ"), "{}", stdout(&o));

    // amqps://: healthy with the CA trusted, refused (exit 1) without it.
    let tls_url = format!("amqps://guest:guest@127.0.0.1:{}", broker.tls_port.unwrap());
    let ca = broker.dir().join("ca.crt");
    let o = run(dk(repo.path(), &broker)
        .env("SSL_CERT_FILE", &ca)
        .args(["health", &tls_url]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("product=RabbitMQ"), "{}", stdout(&o));
    let empty_ca = broker.dir().join("none.pem");
    std::fs::write(
        &empty_ca,
        std::fs::read(broker.dir().join("server.crt")).unwrap(),
    )
    .unwrap();
    let o = run(dk(repo.path(), &broker)
        .env("SSL_CERT_FILE", &empty_ca)
        .env_remove("SSL_CERT_DIR")
        .args(["wait", "--timeout", "30s", &tls_url]));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));

    let port = broker.amqp_port;
    let bad = |url: String, timeout: &str| {
        let start = Instant::now();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_RABBITMQ_API_URL", broker.api_url())
            .args(["wait", "--timeout", timeout, &url]));
        (o, start.elapsed())
    };
    // Wrong password: refused at once (exit 1), never retried to the deadline, no password.
    let (o, took) = bad(format!("amqp://guest:wrong-pw@127.0.0.1:{port}"), "60s");
    assert_code(&o, 1);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(stderr(&o).contains("ACCESS_REFUSED"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("wrong-pw"), "{}", stderr(&o));
    // An unknown vhost: refused too.
    let (o, _) = bad(
        format!("amqp://guest:guest@127.0.0.1:{port}/nowhere"),
        "60s",
    );
    assert_code(&o, 1);
    assert!(stderr(&o).contains("nowhere"), "{}", stderr(&o));
    // An HTTP port waits for a request line that never comes: not ready (exit 3), with a hint.
    let (o, _) = bad(
        format!("amqp://guest:guest@127.0.0.1:{}", broker.api_port),
        "3s",
    );
    assert_code(&o, 3);
    assert!(stderr(&o).contains("AMQP listener"), "{}", stderr(&o));
    // A server that speaks first, in another protocol: refused at once.
    let banner = TcpListener::bind("127.0.0.1:0").unwrap();
    let banner_port = banner.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in banner.incoming().flatten() {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let (o, took) = bad(format!("amqp://guest:guest@127.0.0.1:{banner_port}"), "60s");
    assert_code(&o, 1);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert!(
        stderr(&o).contains("not answer as an AMQP broker"),
        "{}",
        stderr(&o)
    );
    // Management API credentials refused: health says so.
    let o = run(dbkeeper(repo.path())
        .env(
            "DBKEEPER_RABBITMQ_API_URL",
            format!("http://guest:nope@127.0.0.1:{}", broker.api_port),
        )
        .args(["health", &broker.url()]));
    assert_code(&o, 1);
    assert!(stdout(&o).contains("credentials"), "{}", stdout(&o));

    // A memory alarm: health is unhealthy and names it; wait still succeeds (it connects).
    let ctl = broker.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    assert!(ctl.status.success(), "{ctl:?}");
    let mut last = String::new();
    let alarmed = crate::common::wait_until(Duration::from_secs(30), || {
        let o = run(dk(repo.path(), &broker).arg("health"));
        last = stdout(&o);
        crate::common::code(&o) == 1 && last.contains("memory alarm")
    });
    assert!(alarmed, "{last}");
    assert_code(
        &run(dk(repo.path(), &broker).args(["wait", "--timeout", "10s"])),
        0,
    );
    // A backup still runs: the definitions are served under an alarm.
    let before = sets(repo.path()).len();
    assert_code(&run(dk(repo.path(), &broker).arg("backup")), 0);
    assert_eq!(sets(repo.path()).len(), before + 1);
    let ctl = broker.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert!(ctl.status.success(), "{ctl:?}");
    assert!(crate::common::wait_until(Duration::from_secs(30), || {
        crate::common::code(&run(dk(repo.path(), &broker).arg("health"))) == 0
    }));

    // The definitions answer cut short: the backup fails, no set, no temp left.
    let cut = cutting_proxy(broker.api_port);
    let o = run(dk(repo.path(), &broker)
        .env(
            "DBKEEPER_RABBITMQ_API_URL",
            format!("http://127.0.0.1:{cut}"),
        )
        .arg("backup"));
    assert_ne!(crate::common::code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        sets(repo.path()).len(),
        before + 1,
        "{:?}",
        sets(repo.path())
    );
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));

    // The broker gone: not reachable (exit 3), no set.
    let mut broker = broker;
    broker.kill();
    let o = run(dk(repo.path(), &broker).arg("backup"));
    assert_code(&o, 3);
    assert_eq!(
        sets(repo.path()).len(),
        before + 1,
        "{:?}",
        sets(repo.path())
    );
}

/// A proxy to the management API that forwards everything, except that the answer to
/// `GET /api/definitions` stops after its headers and a few bytes, as when a broker dies
/// mid-answer.
fn cutting_proxy(api_port: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = proxy_one(client, api_port);
            });
        }
    });
    port
}

fn proxy_one(mut client: TcpStream, api_port: u16) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let cut = req.starts_with(b"GET /api/definitions");
    // One request per connection, so the answer ends with it.
    let line_end = req.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
    req.splice(line_end..line_end, b"Connection: close\r\n".iter().copied());
    let mut server = TcpStream::connect(("127.0.0.1", api_port))?;
    server.write_all(&req)?;
    let mut resp = Vec::new();
    server.read_to_end(&mut resp)?;
    if cut {
        let head = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .unwrap_or(0);
        resp.truncate(head + 64);
    }
    client.write_all(&resp)?;
    client.shutdown(std::net::Shutdown::Both)
}
