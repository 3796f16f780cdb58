//! MongoDB server harness: a private `secantusd-rs` (the wire-compatible stand-in) on a free
//! loopback port with its own storage directory, optionally with SCRAM authentication and
//! optionally without its replica-set advertisement; stopped on drop.

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mongodb::Client;
use mongodb::bson::{Document, RawDocumentBuf, doc};
use tokio::runtime::Runtime;

use super::{free_port, server_binary, wait_until};

pub const USER: &str = "root";
/// Distinctive, so a test can prove it never reaches any output.
pub const PASSWORD: &str = "pw-Zq7#x!k2";

pub struct Mongo {
    child: Child,
    pub port: u16,
    pub auth: bool,
    pub standalone: bool,
    /// The CA that signed the server's certificate, when it listens with TLS only.
    pub tls_ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
    // Dropped before the runtime its background tasks live on.
    client: Client,
    rt: Runtime,
}

pub fn secantusd() -> PathBuf {
    server_binary(
        "DBKEEPER_TEST_SECANTUSD",
        "secantus/bin/secantusd-rs",
        "secantusd-rs",
    )
}

impl Mongo {
    pub fn start(auth: bool, standalone: bool) -> Mongo {
        Mongo::start_with(auth, standalone, None, &[])
    }

    /// A standalone server on `port` (a server that comes back where one went away).
    pub fn start_on(port: u16) -> Mongo {
        Mongo::start_at(port, false, true, None, &[])
    }

    /// A replica-set member started with extra server flags (`--oplog-max-entries 200`).
    pub fn start_args(args: &[&str]) -> Mongo {
        Mongo::start_with(false, false, None, args)
    }

    /// A server that speaks TLS only, with the certificates `make_certs` wrote to `certs`.
    pub fn start_tls(auth: bool, certs: &Path) -> Mongo {
        Mongo::start_with(auth, true, Some(certs), &[])
    }

    fn start_with(auth: bool, standalone: bool, certs: Option<&Path>, extra: &[&str]) -> Mongo {
        Mongo::start_at(free_port(), auth, standalone, certs, extra)
    }

    fn start_at(
        port: u16,
        auth: bool,
        standalone: bool,
        certs: Option<&Path>,
        extra: &[&str],
    ) -> Mongo {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(secantusd());
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.path().join("data"))
            .args(["--log-file-max", "16MB", "--log-level", "WARNING"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.args(extra);
        if auth {
            cmd.arg("--auth");
        }
        if standalone {
            cmd.arg("--standalone");
        }
        if let Some(certs) = certs {
            cmd.arg("--tls-cert-file")
                .arg(certs.join("server.crt"))
                .arg("--tls-key-file")
                .arg(certs.join("server.key"));
        }
        let tls_ca = certs.map(|c| c.join("ca.crt"));
        let tls_q: String = tls_params(tls_ca.as_deref())
            .iter()
            .map(|p| format!("&{p}"))
            .collect();
        let child = cmd.spawn().expect("start secantusd-rs");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let up = wait_until(Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "secantusd-rs did not listen on {port}");
        // The localhost exception lets the first user be created without credentials.
        let anon = format!("mongodb://127.0.0.1:{port}/?directConnection=true{tls_q}");
        let client = rt.block_on(async {
            let c = Client::with_uri_str(&anon).await.unwrap();
            if auth {
                c.database("admin")
                    .run_command(doc! {"createUser": USER, "pwd": PASSWORD, "roles": ["root"]})
                    .await
                    .expect("createUser through the localhost exception");
                Client::with_uri_str(format!(
                    "mongodb://{USER}:{}@127.0.0.1:{port}/?directConnection=true&authSource=admin{tls_q}",
                    enc(PASSWORD)
                ))
                .await
                .unwrap()
            } else {
                c
            }
        });
        let m = Mongo {
            child,
            port,
            auth,
            standalone,
            tls_ca,
            _dir: dir,
            client,
            rt,
        };
        m.block(async {
            m.client
                .database("admin")
                .run_command(doc! {"ping": 1})
                .await
                .expect("ping")
        });
        m
    }

    /// The URI dbkeeper is given: credentials when auth is on; `directConnection=true`
    /// unless `discover` asks for the driver's replica-set discovery.
    pub fn uri_with(&self, discover: bool) -> String {
        let creds = if self.auth {
            format!("{USER}:{}@", enc(PASSWORD))
        } else {
            String::new()
        };
        let mut q = Vec::new();
        if !discover {
            q.push("directConnection=true".to_owned());
        }
        if self.auth {
            q.push("authSource=admin".to_owned());
        }
        q.extend(tls_params(self.tls_ca.as_deref()));
        format!("mongodb://{creds}127.0.0.1:{}/?{}", self.port, q.join("&"))
    }

    pub fn uri(&self) -> String {
        self.uri_with(false)
    }

    pub fn block<F: IntoFuture>(&self, f: F) -> F::Output {
        self.rt.block_on(f.into_future())
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn command(&self, db: &str, cmd: Document) -> Document {
        self.block(async { self.client.database(db).run_command(cmd).await })
            .unwrap_or_else(|e| panic!("command on {db}: {e}"))
    }

    pub fn insert(&self, db: &str, coll: &str, docs: Vec<RawDocumentBuf>) {
        let c = self.client.database(db).collection::<RawDocumentBuf>(coll);
        for chunk in docs.chunks(10_000) {
            self.block(async { c.insert_many(chunk.to_vec()).await })
                .unwrap_or_else(|e| panic!("insert into {db}.{coll}: {e}"));
        }
    }

    /// Every document of a collection as raw bytes, sorted: equality that ignores order only.
    pub fn sorted_docs(&self, db: &str, coll: &str) -> Vec<Vec<u8>> {
        let mut v = self.natural_docs(db, coll);
        v.sort();
        v
    }

    /// Every document of a collection as raw bytes, in natural order.
    pub fn natural_docs(&self, db: &str, coll: &str) -> Vec<Vec<u8>> {
        use futures_util::TryStreamExt;
        let c = self.client.database(db).collection::<RawDocumentBuf>(coll);
        self.block(async {
            c.find(doc! {})
                .await
                .unwrap()
                .map_ok(|d| d.into_bytes())
                .try_collect()
                .await
                .unwrap()
        })
    }

    /// User databases (not admin/local/config).
    pub fn databases(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .block(async { self.client.list_database_names().await })
            .unwrap()
            .into_iter()
            .filter(|d| !["admin", "local", "config"].contains(&d.as_str()))
            .collect();
        v.sort();
        v
    }

    /// `listCollections` entries of a database by name, without the per-instance `info.uuid`.
    pub fn collections(&self, db: &str) -> Vec<(String, Document)> {
        use futures_util::TryStreamExt;
        let d = self.client.database(db);
        let mut v: Vec<(String, Document)> = self
            .block(async {
                d.run_cursor_command(doc! {"listCollections": 1})
                    .await
                    .unwrap()
                    .try_collect::<Vec<Document>>()
                    .await
                    .unwrap()
            })
            .into_iter()
            .map(|mut c| {
                c.remove("info");
                (c.get_str("name").unwrap().to_owned(), c)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Index specifications of a collection, sorted by name.
    pub fn indexes(&self, db: &str, coll: &str) -> Vec<Document> {
        use futures_util::TryStreamExt;
        let d = self.client.database(db);
        let mut v: Vec<Document> = self.block(async {
            d.run_cursor_command(doc! {"listIndexes": coll})
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap()
        });
        v.sort_by(|a, b| a.get_str("name").unwrap().cmp(b.get_str("name").unwrap()));
        v
    }
}

/// `tls=true` and `tlsCAFile=…` for a TLS server, nothing otherwise.
fn tls_params(ca: Option<&Path>) -> Vec<String> {
    ca.map(|ca| {
        vec![
            "tls=true".to_owned(),
            format!("tlsCAFile={}", enc(&ca.to_string_lossy())),
        ]
    })
    .unwrap_or_default()
}

/// Percent-encodes a password (or a path) for a URI.
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Drop for Mongo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
