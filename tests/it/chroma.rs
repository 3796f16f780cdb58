//! Chroma integration tests: the real binary against private `chroma run` servers (chromadb
//! 1.5.x), seeded and compared through the Python client.

use std::path::Path;
use std::process::Command;

use crate::common::chroma::{COMPARE, ChromaServer, Mode, Proxy, SEED, TlsFront, py, py_output};
use crate::common::{assert_code, dbkeeper, free_port, run, sets, stderr, stdout, temps};

fn dk(repo: &Path, url: &str) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_CHROMA_URL", url);
    c
}

fn seed(server: &ChromaServer, spec: &str) {
    py(SEED, &[&server.port.to_string(), spec]);
}

fn compare(a: &ChromaServer, b: &ChromaServer, spec: &str) {
    let out = py(COMPARE, &[&a.port.to_string(), &b.port.to_string(), spec]);
    assert!(out.contains("OK"), "{out}");
}

fn collections(server: &ChromaServer, db: &str) -> Vec<String> {
    let script = r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), database=sys.argv[2], settings=chromadb.Settings(anonymized_telemetry=False))
print("\n".join(sorted(f"{x.name}={x.count()}" for x in c.list_collections())))
"#;
    py(script, &[&server.port.to_string(), db])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

fn manifest(repo: &Path, set: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo.join(set).join("manifest.json")).unwrap()).unwrap()
}

const SMALL: &str = r#"[{"name":"notes","space":"l2","dim":8,"n":40,"seed":1,"metadata":{"team":"a","v":2,"w":0.5,"on":true}},
{"name":"other","space":"ip","dim":4,"n":10,"seed":2,"docs":false}]"#;

/// Every kind of content and setting, 50k records in one collection, through backup,
/// deep verify and preseed into a fresh server; then equality, filters and recall.
#[test]
fn round_trip_keeps_every_record_and_setting() {
    let spec = r#"[
 {"name":"cos8","space":"cosine","dim":8,"n":500,"seed":11,"efc":150,"m":20,"metadata":{"s":"text ü","i":42,"f":0.1,"b":false}},
 {"name":"l2-384","space":"l2","dim":384,"n":700,"seed":12,"docs":false},
 {"name":"ip-1536","space":"ip","dim":1536,"n":300,"seed":13,"meta":false},
 {"name":"empty.one","space":"l2","dim":3,"n":0,"seed":14},
 {"name":"big","space":"l2","dim":16,"n":50000,"seed":15}
]"#;
    let src = ChromaServer::start();
    let dst = ChromaServer::start();
    seed(&src, spec);
    let repo = tempfile::tempdir().unwrap();

    let o = run(dk(repo.path(), &src.url()).arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();
    let m = manifest(repo.path(), &id);
    let counts = &m["engines"]["chroma"]["counts"];
    assert_eq!(counts["default_database/big"], 50000);
    assert_eq!(counts["default_database/empty.one"], 0);
    assert_eq!(counts["default_database/ip-1536"], 300);
    let details = &m["engines"]["chroma"]["details"];
    assert!(details["max_batch_size"].as_u64().unwrap() > 0);
    // Embeddings are raw float32: 50k × 16 × 4 bytes before compression.
    let files = m["engines"]["chroma"]["files"].as_array().unwrap();
    let emb = files
        .iter()
        .find(|f| f["path"] == "chroma/default_database/big/embeddings.f32.zst")
        .unwrap();
    assert_eq!(emb["raw_size"], 50000 * 16 * 4);

    assert_code(
        &run(dk(repo.path(), &src.url()).args(["verify", "--deep"])),
        0,
    );

    let o = run(dk(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    compare(&src, &dst, spec);

    // The documented Python snippet reads the set back without dbkeeper.
    read_back_with_python(&repo.path().join(&id), &dst);
}

/// Runs the snippet of docs/chroma-format.md against a set and checks what it prints against
/// the server the set was restored into.
fn read_back_with_python(set: &Path, server: &ChromaServer) {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/chroma-format.md"
    ))
    .unwrap();
    let snippet = doc
        .split("```python\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("a python block in docs/chroma-format.md");
    assert!(
        snippet.lines().count() <= 10,
        "the snippet should stay short"
    );
    let has_zstd = py_output("import zstandard", &[]).status.success();
    assert!(
        has_zstd,
        "the test venv lacks zstandard (bash .ci/install adds it)"
    );
    let script = format!(
        "import sys, os\nos.chdir(sys.argv[1])\n{snippet}\nfor name, recs, emb in collections():\n    print(name, len(recs), emb.shape[1] if len(recs) else 0, recs[0]['id'] if recs else '-')\n"
    );
    let out = py(&script, &[set.join("chroma").to_str().unwrap()]);
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    let want = collections(server, "default_database");
    assert_eq!(got.len(), want.len(), "{out}");
    for line in &got {
        let mut parts = line.split_whitespace();
        let (name, n, dim) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        assert!(want.contains(&format!("{name}={n}")), "{line} vs {want:?}");
        let want_dim = match name {
            "cos8" => "8",
            "l2-384" => "384",
            "ip-1536" => "1536",
            "big" => "16",
            _ => "0",
        };
        assert_eq!(dim, want_dim, "{line}");
    }
}

/// Preseed on empty, skip on non-empty, refusal without --force, --force, and an
/// interrupted preseed redone.
#[test]
fn preseed_and_restore_follow_the_emptiness_rules() {
    let src = ChromaServer::start();
    let dst = ChromaServer::start();
    let repo = tempfile::tempdir().unwrap();

    // No backup yet, empty target: a first start.
    let o = run(dk(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("first start"), "{}", stderr(&o));

    seed(&src, SMALL);
    assert_code(&run(dk(repo.path(), &src.url()).arg("backup")), 0);
    assert_code(&run(dk(repo.path(), &dst.url()).arg("preseed")), 0);
    compare(&src, &dst, SMALL);

    // Holds data now: skipped, unchanged.
    py(
        r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
c.get_collection("notes").delete(ids=["notes-0000001"])
"#,
        &[&dst.port.to_string()],
    );
    let before = collections(&dst, "default_database");
    let o = run(dk(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("preseed skipped"), "{}", stderr(&o));
    assert_eq!(collections(&dst, "default_database"), before);

    // restore refuses a non-empty target without --force and changes nothing.
    let o = run(dk(repo.path(), &dst.url()).arg("restore"));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(collections(&dst, "default_database"), before);
    assert_code(
        &run(dk(repo.path(), &dst.url()).args(["restore", "--force"])),
        0,
    );
    compare(&src, &dst, SMALL);

    // An interrupted preseed: the marker and part of the data. The next preseed must not
    // take that for "holds data": it wipes and restores again.
    py(
        r#"
import sys, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
c.delete_collection("other")
c.get_collection("notes").delete(ids=["notes-0000002", "notes-0000003"])
c.create_collection("dbkeeper.restore-in-progress")
"#,
        &[&dst.port.to_string()],
    );
    let o = run(dk(repo.path(), &dst.url()).arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    compare(&src, &dst, SMALL);
    assert!(
        !collections(&dst, "default_database")
            .iter()
            .any(|c| c.starts_with("dbkeeper.")),
        "the marker is cleared after a restore"
    );
}

/// wait/health/backup against a closed port, a server that is not Chroma, and the exit
/// codes each gives.
#[test]
fn unreachable_and_foreign_servers() {
    let repo = tempfile::tempdir().unwrap();
    let closed = format!("http://127.0.0.1:{}", free_port());

    let o = run(dbkeeper(repo.path()).args(["health", &closed]));
    assert_code(&o, 1);
    assert!(
        stdout(&o).starts_with("unhealthy: chroma at"),
        "{}",
        stdout(&o)
    );
    let o = run(dbkeeper(repo.path()).args(["wait", "--timeout", "1s", &closed]));
    assert_code(&o, 3);
    let o = run(dk(repo.path(), &closed).arg("backup"));
    assert_code(&o, 3);
    assert!(sets(repo.path()).is_empty());

    // The health link: exit 1 only, one line.
    let health = repo.path().join("dbkeeper-health");
    std::os::unix::fs::symlink(crate::common::bin(), &health).unwrap();
    let o = run(Command::new(&health).arg(&closed));
    assert_code(&o, 1);
    assert_eq!(stdout(&o).lines().count(), 1);

    let server = ChromaServer::start();
    let foreign = Proxy::start(server.port, Mode::NotChroma);
    let o = run(dbkeeper(repo.path()).args(["health", &foreign.url()]));
    assert_code(&o, 1);
    assert!(stdout(&o).contains("not a Chroma server"), "{}", stdout(&o));
    // Retrying cannot make it Chroma: wait fails at once with 1, not 3 at the deadline.
    let o = run(dbkeeper(repo.path()).args(["wait", "--timeout", "60s", &foreign.url()]));
    assert_code(&o, 1);

    let o = run(dbkeeper(repo.path()).args(["wait", "--timeout", "30s", &server.url()]));
    assert_code(&o, 0);
    let o = run(Command::new(&health).arg(server.url()));
    assert_code(&o, 0);
    assert!(
        stdout(&o).starts_with("healthy: http://127.0.0.1:"),
        "{}",
        stdout(&o)
    );
}

/// Chroma 1.x's single-node server has no token auth of its own (its Rust frontend ships a
/// no-op authenticator), so a stand-in in front of the real server checks the header: the
/// token must reach every request, in the header the operator chose.
#[test]
fn token_auth_in_either_header() {
    let server = ChromaServer::start();
    seed(&server, SMALL);
    let x_token = Proxy::start(
        server.port,
        Mode::RequireHeader("x-chroma-token", "s3cret".into()),
    );
    let bearer = Proxy::start(
        server.port,
        Mode::RequireHeader("authorization", "Bearer s3cret".into()),
    );
    let repo = tempfile::tempdir().unwrap();
    let with = |url: &str, token: &str, header: &str| {
        let mut c = dk(repo.path(), url);
        c.env("DBKEEPER_CHROMA_TOKEN", token)
            .env("DBKEEPER_CHROMA_AUTH_HEADER", header);
        c
    };

    assert_code(
        &run(with(&x_token.url(), "s3cret", "x-chroma-token").args(["wait", "--timeout", "20s"])),
        0,
    );
    assert_code(
        &run(with(&bearer.url(), "s3cret", "authorization").args(["health"])),
        0,
    );
    // Wrong token, or the right token in the wrong header: refused at once.
    let o = run(with(&bearer.url(), "nope", "authorization").args(["wait", "--timeout", "60s"]));
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("DBKEEPER_CHROMA_TOKEN"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("nope"),
        "the token leaked: {}",
        stderr(&o)
    );
    let o = run(with(&x_token.url(), "s3cret", "authorization").args(["health"]));
    assert_code(&o, 1);
    let o = run(with(&x_token.url(), "s3cret", "authorization").arg("backup"));
    assert_code(&o, 1);
    assert!(sets(repo.path()).is_empty());
    // No token at all against a server that wants one.
    let o = run(dk(repo.path(), &bearer.url()).arg("backup"));
    assert_code(&o, 1);
    // The token file variant.
    let tf = repo.path().join("token");
    std::fs::write(&tf, "s3cret\n").unwrap();
    let mut c = dk(repo.path(), &x_token.url());
    c.env("DBKEEPER_CHROMA_TOKEN_FILE", &tf)
        .env("DBKEEPER_CHROMA_AUTH_HEADER", "x-chroma-token")
        .arg("backup");
    assert_code(&run(&mut c), 0);

    // Every request of a restore carries the token too.
    let before = collections(&server, "default_database");
    let o = run(with(&bearer.url(), "s3cret", "authorization").args(["restore", "--force"]));
    assert_code(&o, 0);
    assert_eq!(collections(&server, "default_database"), before);
}

/// A server that fails part-way through the export: the backup fails and no set (nor a
/// temp dir) is left.
#[test]
fn server_error_mid_export_publishes_nothing() {
    let server = ChromaServer::start();
    seed(&server, SMALL);
    // Each small collection is one page read: the second read is the second collection's,
    // after the first collection's files were written.
    let flaky = Proxy::start(server.port, Mode::FailGetsAfter(1));
    let repo = tempfile::tempdir().unwrap();
    let o = run(dk(repo.path(), &flaky.url()).arg("backup"));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("HTTP 500"), "{}", stderr(&o));
    assert!(flaky.gets.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
    // Straight to the server, the same backup works.
    assert_code(&run(dk(repo.path(), &server.url()).arg("backup")), 0);
    assert_eq!(sets(repo.path()).len(), 1);
}

/// Artifacts that checksum well but do not decode, or that are cut short, are reported as a
/// corrupt set (exit 4), never a panic.
#[test]
fn deep_verify_reports_bad_artifacts() {
    let server = ChromaServer::start();
    seed(&server, SMALL);
    let repo = tempfile::tempdir().unwrap();
    let o = run(dk(repo.path(), &server.url()).arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();
    let set = repo.path().join(&id);
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&set, pristine.path());

    type Mutate = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let cases: Vec<(&str, Mutate)> = vec![
        // A record whose id is not a string.
        (
            "records.jsonl",
            Box::new(|raw: &[u8]| {
                let text = String::from_utf8(raw.to_vec()).unwrap();
                text.replacen("{\"id\":\"notes-", "{\"id\":7,\"x\":\"", 1)
                    .into_bytes()
            }),
        ),
        // The last record cut in half.
        (
            "records.jsonl",
            Box::new(|raw: &[u8]| raw[..raw.len() - 20].to_vec()),
        ),
        // One vector short.
        (
            "embeddings.f32",
            Box::new(|raw: &[u8]| raw[..raw.len() - 32].to_vec()),
        ),
        // Not JSON at all.
        (
            "collection.json",
            Box::new(|_: &[u8]| b"{not json".to_vec()),
        ),
    ];
    for (file, mutate) in cases {
        let rel = format!("chroma/default_database/notes/{file}.zst");
        rewrite_artifact(&set, &rel, |raw| mutate(raw));
        // Checksums agree (the manifest was updated); only decoding finds the damage.
        assert_code(&run(dk(repo.path(), &server.url()).arg("verify")), 0);
        let o = run(dk(repo.path(), &server.url()).args(["verify", "--deep"]));
        assert_code(&o, 4);
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        restore_dir(pristine.path(), &set);
    }

    // A truncated file on disk: the checksum catches it.
    let p = set.join("chroma/default_database/notes/embeddings.f32.zst");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let o = run(dk(repo.path(), &server.url()).args(["verify", "--deep"]));
    assert_code(&o, 4);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// Every database of a tenant (`DBKEEPER_CHROMA_DATABASE=*`), and restoring one database's
/// set into another database.
#[test]
fn every_database_of_a_tenant() {
    let src = ChromaServer::start();
    let dst = ChromaServer::start();
    seed(&src, SMALL);
    py(
        SEED,
        &[
            &src.port.to_string(),
            r#"[{"name":"second","space":"l2","dim":5,"n":25,"seed":3}]"#,
            "seconddb",
        ],
    );
    let repo = tempfile::tempdir().unwrap();
    let mut c = dk(repo.path(), &src.url());
    c.env("DBKEEPER_CHROMA_DATABASE", "*").arg("backup");
    let o = run(&mut c);
    assert_code(&o, 0);
    let m = manifest(repo.path(), stdout(&o).trim());
    assert_eq!(m["engines"]["chroma"]["counts"]["seconddb/second"], 25);
    assert_eq!(
        m["engines"]["chroma"]["counts"]["default_database/notes"],
        40
    );

    let mut c = dk(repo.path(), &dst.url());
    c.env("DBKEEPER_CHROMA_DATABASE", "*").arg("preseed");
    assert_code(&run(&mut c), 0);
    compare(&src, &dst, SMALL);
    assert_eq!(collections(&dst, "seconddb"), vec!["second=25".to_owned()]);
    let out = py(
        COMPARE,
        &[&src.port.to_string(), &dst.port.to_string(), "", "seconddb"],
    );
    assert!(out.contains("OK"));

    // A single-database set restored into a database of another name.
    let repo2 = tempfile::tempdir().unwrap();
    assert_code(&run(dk(repo2.path(), &src.url()).arg("backup")), 0);
    let mut c = dk(repo2.path(), &dst.url());
    c.env("DBKEEPER_CHROMA_DATABASE", "thirddb").arg("restore");
    assert_code(&run(&mut c), 0);
    assert_eq!(
        collections(&dst, "thirddb"),
        collections(&src, "default_database")
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in walk(from) {
        let rel = e.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&e, &dest).unwrap();
    }
}

fn restore_dir(from: &Path, to: &Path) {
    copy_dir(from, to);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Decompresses one artifact, changes it, recompresses it and updates the manifest's size,
/// checksum and raw size, so that only a deep verify can tell.
fn rewrite_artifact(set: &Path, rel: &str, f: impl Fn(&[u8]) -> Vec<u8>) {
    use sha2::Digest;
    let p = set.join(rel);
    let raw = zstd::decode_all(std::fs::File::open(&p).unwrap()).unwrap();
    let new_raw = f(&raw);
    let stored = zstd::encode_all(&new_raw[..], 3).unwrap();
    std::fs::write(&p, &stored).unwrap();
    let mpath = set.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for fe in m["engines"]["chroma"]["files"].as_array_mut().unwrap() {
        if fe["path"] == rel {
            fe["size"] = stored.len().into();
            fe["raw_size"] = new_raw.len().into();
            fe["sha256"] = hex::encode(sha2::Sha256::digest(&stored)).into();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    // Re-sealed as a writer's bug would: the manifest's own sum goes (a set without one is
    // read as sets were before it existed).
    let _ = std::fs::remove_file(set.join("manifest.json.sha256"));
}

/// `https://` with the server's CA in the trust store (`SSL_CERT_FILE`) works end to end;
/// without it the certificate is refused at once (exit 1, no waiting for a deadline).
#[test]
fn https_with_a_private_ca() {
    let server = ChromaServer::start();
    seed(&server, SMALL);
    let tls = TlsFront::start(server.port);
    let repo = tempfile::tempdir().unwrap();

    // The system store (or none at all) does not trust the test CA.
    let o = run(dbkeeper(repo.path()).args(["wait", "--timeout", "60s", &tls.url()]));
    assert_code(&o, 1);
    assert!(stderr(&o).contains("TLS"), "{}", stderr(&o));
    // A plain-HTTP server behind https:// is refused the same way.
    let o = run(dbkeeper(repo.path()).args([
        "wait",
        "--timeout",
        "60s",
        &format!("https://127.0.0.1:{}", server.port),
    ]));
    assert_code(&o, 1);

    let with_ca = |c: &mut Command| {
        c.env("SSL_CERT_FILE", &tls.ca);
    };
    let mut c = dbkeeper(repo.path());
    with_ca(&mut c);
    assert_code(&run(c.args(["health", &tls.url()])), 0);
    let mut c = dk(repo.path(), &tls.url());
    with_ca(&mut c);
    let o = run(c.arg("backup"));
    assert_code(&o, 0);
    let m = manifest(repo.path(), stdout(&o).trim());
    assert_eq!(
        m["engines"]["chroma"]["counts"]["default_database/notes"],
        40
    );
}
