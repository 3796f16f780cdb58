//! Chroma harness: private `chroma run` servers on loopback with temp data dirs, a Python
//! (chromadb client) runner for seeding and comparing, and a small HTTP stand-in that sits in
//! front of a real server to check auth headers, inject 500s, or play a non-Chroma server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::{free_port, server_binary, wait_until};

pub struct ChromaServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl ChromaServer {
    pub fn start() -> ChromaServer {
        ChromaServer::start_on(free_port())
    }

    /// A server on `port` (one that comes back where one went away).
    pub fn start_on(port: u16) -> ChromaServer {
        let bin = server_binary("DBKEEPER_TEST_CHROMA", "venv/bin/chroma", "chroma");
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(bin)
            .args([
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--path",
            ])
            .arg(dir.path().join("data"))
            .env("ANONYMIZED_TELEMETRY", "False")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chroma");
        let mut s = ChromaServer {
            child,
            port,
            _dir: dir,
        };
        let up = wait_until(Duration::from_secs(60), || {
            http_status(port, "/api/v2/heartbeat") == Some(200)
        });
        if !up {
            let _ = s.child.kill();
            let log = std::fs::read_to_string(s._dir.path().join("server.log")).unwrap_or_default();
            panic!("chroma did not start on port {port}:\n{log}");
        }
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ChromaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of one GET, or None when nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn python() -> PathBuf {
    server_binary("DBKEEPER_TEST_PYTHON", "venv/bin/python", "python3")
}

/// Runs a Python script (chromadb available) with `args`; panics with its output on failure.
pub fn py(script: &str, args: &[&str]) -> String {
    let out = py_output(script, args);
    assert!(
        out.status.success(),
        "python failed\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn py_output(script: &str, args: &[&str]) -> Output {
    Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .env("ANONYMIZED_TELEMETRY", "False")
        .output()
        .expect("run python")
}

/// Seeds a server. Argument: port, then a JSON spec
/// `[{"name", "space", "dim", "n", "seed", "metadata"?, "docs": bool, "meta": bool}]`.
/// Records: ids with non-ASCII, documents with non-ASCII, metadata of every scalar type;
/// every third record has neither document nor metadata.
pub const SEED: &str = r#"
import sys, json, numpy as np, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), settings=chromadb.Settings(anonymized_telemetry=False))
db = sys.argv[3] if len(sys.argv) > 3 else None
if db:
    ad = chromadb.AdminClient(chromadb.Settings(chroma_api_impl="chromadb.api.fastapi.FastAPI", chroma_server_host="127.0.0.1", chroma_server_http_port=int(sys.argv[1]), anonymized_telemetry=False))
    try: ad.create_database(db)
    except Exception: pass
    c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), database=db, settings=chromadb.Settings(anonymized_telemetry=False))
for spec in json.loads(sys.argv[2]):
    col = c.create_collection(spec["name"], metadata=spec.get("metadata"), configuration={"hnsw": {"space": spec["space"], "ef_construction": spec.get("efc", 100), "max_neighbors": spec.get("m", 16)}}, embedding_function=None)
    n, dim = spec["n"], spec["dim"]
    rng = np.random.default_rng(spec["seed"])
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    bs = c.get_max_batch_size()
    for s in range(0, n, bs):
        idx = range(s, min(n, s + bs))
        ids = [f"{spec['name']}-ü-{i:07d}" if i % 5 == 0 else f"{spec['name']}-{i:07d}" for i in idx]
        docs = [None if i % 3 == 0 else f"document {i} — ünïcödé 文書 \"q\"\n" for i in idx] if spec.get("docs", True) else None
        metas = [None if i % 3 == 0 else {"s": f"str{i % 7}", "i": i, "f": i / 7.0, "b": i % 2 == 0, "k": i % 10} for i in idx] if spec.get("meta", True) else None
        uris = [None if i % 4 else f"s3://bucket/{i}" for i in idx]
        if docs is not None and all(d is None for d in docs): docs = None
        if metas is not None and all(m is None for m in metas): metas = None
        col.add(ids=ids, embeddings=emb[s:s + len(ids)], documents=docs, metadatas=metas, uris=uris)
    print(spec["name"], col.count())
"#;

/// Compares two servers' default databases (or the database in argv[4]): collections, their
/// metadata and configuration, every record, `where` filters, and query recall against brute
/// force over the restored vectors. Embeddings bit-exact as float32 except in cosine
/// collections (1e-6). With argv[3] = a seed spec, also checks the target against the data
/// that was seeded. Prints "OK" or raises.
pub const COMPARE: &str = r#"
import sys, json, numpy as np, chromadb
db = sys.argv[4] if len(sys.argv) > 4 else "default_database"
S = lambda: chromadb.Settings(anonymized_telemetry=False)
a = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), database=db, settings=S())
b = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[2]), database=db, settings=S())
spec = {s["name"]: s for s in json.loads(sys.argv[3])} if len(sys.argv) > 3 and sys.argv[3] else {}
names = lambda c: sorted(x.name for x in c.list_collections())
assert names(a) == names(b), (names(a), names(b))
inc = ["embeddings", "documents", "metadatas", "uris"]
def everything(col):
    out = {"ids": [], "embeddings": [], "documents": [], "metadatas": [], "uris": []}
    bs, off = 1000, 0
    while True:
        g = col.get(include=inc, limit=bs, offset=off)
        for k in out: out[k].extend(g[k] if k == "ids" else list(g[k]))
        if len(g["ids"]) < bs: return out
        off += bs
for name in names(a):
    ca, cb = a.get_collection(name), b.get_collection(name)
    assert ca.metadata == cb.metadata, (name, ca.metadata, cb.metadata)
    ja, jb = ca.configuration_json, cb.configuration_json
    assert ja == jb, (name, ja, jb)
    space = ja["hnsw"]["space"] if ja.get("hnsw") else ja["spann"]["space"]
    ra, rb = everything(ca), everything(cb)
    assert ca.count() == cb.count() == len(ra["ids"]), name
    oa, ob = np.argsort(ra["ids"]), np.argsort(rb["ids"])
    for k in ["ids", "documents", "metadatas", "uris"]:
        va, vb = [ra[k][i] for i in oa], [rb[k][i] for i in ob]
        assert va == vb, (name, k, [(x, y) for x, y in zip(va, vb) if x != y][:3])
    if not len(oa): continue
    ea = np.array([ra["embeddings"][i] for i in oa], dtype=np.float64)
    eb = np.array([rb["embeddings"][i] for i in ob], dtype=np.float64)
    if space == "cosine":
        assert np.allclose(ea, eb, rtol=0, atol=1e-6), name
    else:
        assert np.array_equal(ea, eb), name
        if name in spec:
            s = spec[name]
            seeded = np.random.default_rng(s["seed"]).standard_normal((s["n"], s["dim"])).astype(np.float32)
            idx = [int(i.rsplit("-", 1)[1]) for i in sorted(rb["ids"])]
            assert np.array_equal(eb.astype(np.float32), seeded[idx]), name + ": not the seeded float32 values"
    if any(m for m in ra["metadatas"]):
        for where in [{"b": True}, {"i": {"$gt": 100}}, {"s": "str3"}, {"$and": [{"f": {"$lt": 50.5}}, {"k": {"$in": [1, 2, 3]}}]}]:
            ga = sorted(ca.get(where=where, include=[])["ids"])
            gb = sorted(cb.get(where=where, include=[])["ids"])
            assert ga == gb, (name, where, len(ga), len(gb))
    # Recall of the restored index against brute force over the restored vectors.
    eb32 = eb.astype(np.float32)
    ids_b = [rb["ids"][i] for i in ob]
    rng = np.random.default_rng(7)
    q = eb32[rng.choice(len(eb32), size=min(20, len(eb32)), replace=False)]
    k = min(10, len(eb32))
    res = cb.query(query_embeddings=q, n_results=k, include=[])
    hit = total = 0
    for qi, got in zip(q, res["ids"]):
        if space == "l2": d = ((eb32 - qi) ** 2).sum(1)
        elif space == "ip": d = -(eb32 @ qi)
        else: d = 1 - (eb32 @ qi) / (np.linalg.norm(eb32, axis=1) * np.linalg.norm(qi) + 1e-30)
        truth = {ids_b[i] for i in np.argsort(d, kind="stable")[:k]}
        hit += len(truth & set(got)); total += k
    assert hit / total >= 0.9, (name, hit / total)
print("OK")
"#;

/// What the stand-in in front of a real server does.
#[derive(Clone)]
pub enum Mode {
    /// Forward only requests carrying this header (name lower-case) with this value; 401
    /// otherwise.
    RequireHeader(&'static str, String),
    /// Forward the first `n` record reads (`…/get`), answer 500 to later ones.
    FailGetsAfter(usize),
    /// Answer 404 to everything: an HTTP server that is not Chroma.
    NotChroma,
}

/// A tiny HTTP/1.1 forwarder (one upstream connection per request, `Connection: close` both
/// ways): enough for reqwest and the Python client, and nothing more.
pub struct Proxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub gets: Arc<AtomicUsize>,
}

impl Proxy {
    pub fn start(upstream: u16, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let gets = Arc::new(AtomicUsize::new(0));
        let (stop2, gets2) = (stop.clone(), gets.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (mode, gets) = (mode.clone(), gets2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &mode, &gets);
                });
            }
        });
        Proxy { port, stop, gets }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(conn: TcpStream, upstream: u16, mode: &Mode, gets: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut conn = conn;
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let end = line == "\r\n";
        head.push(line);
        if end {
            break;
        }
    }
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let path = head[0].split_whitespace().nth(1).unwrap_or("").to_owned();
    let reply = |conn: &mut TcpStream, status: &str, body: &str| {
        write!(
            conn,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match mode {
        Mode::NotChroma => {
            reply(&mut conn, "404 Not Found", "")?;
            return conn.shutdown(Shutdown::Both);
        }
        Mode::RequireHeader(name, value) => {
            if header(name).as_deref() != Some(value.as_str()) {
                reply(
                    &mut conn,
                    "401 Unauthorized",
                    r#"{"error":"AuthError","message":"Unauthorized"}"#,
                )?;
                return conn.shutdown(Shutdown::Both);
            }
        }
        Mode::FailGetsAfter(n) => {
            if path.ends_with("/get") && gets.fetch_add(1, Ordering::SeqCst) >= *n {
                reply(
                    &mut conn,
                    "500 Internal Server Error",
                    r#"{"error":"InternalError","message":"injected by the test"}"#,
                )?;
                return conn.shutdown(Shutdown::Both);
            }
        }
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut req = Vec::new();
    req.extend_from_slice(head[0].as_bytes());
    for l in &head[1..head.len() - 1] {
        let name = l
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if name != "connection" && name != "keep-alive" {
            req.extend_from_slice(l.as_bytes());
        }
    }
    req.extend_from_slice(b"connection: close\r\n\r\n");
    req.extend_from_slice(&body);
    up.write_all(&req)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    // Tell the client this connection ends here, so it never reuses it.
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(resp.len());
    let head_text = String::from_utf8_lossy(&resp[..split]).into_owned();
    let mut out = Vec::new();
    for (i, l) in head_text.split("\r\n").enumerate() {
        if i > 0 && l.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n");
    out.extend_from_slice(resp[split.min(resp.len())..].get(2..).unwrap_or(b""));
    conn.write_all(&out)?;
    conn.flush()?;
    conn.shutdown(Shutdown::Both)
}

/// An HTTPS front for a real server (Python's `ssl` + `http.server`), with a certificate from
/// a private CA made by `openssl`: proves `https://` works and that the CA is what makes it.
pub struct TlsFront {
    child: Child,
    pub port: u16,
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
}

const TLS_FRONT: &str = r#"
import sys, ssl, http.client, http.server
up = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def fwd(self):
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else None
        c = http.client.HTTPConnection("127.0.0.1", up)
        c.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
        r = c.getresponse(); data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"): self.send_header(k, v)
        self.send_header("content-length", str(len(data))); self.end_headers(); self.wfile.write(data)
    do_GET = do_POST = do_DELETE = do_PUT = fwd
    def log_message(self, *a): pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[2], sys.argv[3])
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

impl TlsFront {
    pub fn start(upstream: u16) -> TlsFront {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=dbkeeper test CA",
        ]);
        std::fs::write(
            d.join("leaf.ext"),
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        let mut child = Command::new(python())
            .arg("-c")
            .arg(TLS_FRONT)
            .arg(upstream.to_string())
            .arg(d.join("leaf.pem"))
            .arg(d.join("leaf.key"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the TLS front");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the TLS front prints its port");
        TlsFront {
            child,
            port,
            ca: d.join("ca.pem"),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
