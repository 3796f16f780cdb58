//! Redis: the URL and the engine contract. One file per part, as MongoDB and Chroma:
//! `client` (the RESP client), `probe` (readiness), `snapshot` (backup over the replication
//! protocol), `restore` (pipelined `RESTORE`), `verify` (offline deep verify), `datadir` (the
//! data directory of a stopped server: its state and the pre-start preseed), `rdb` (the RDB
//! reader), `aof` (sets imported from append-only files: their reader, key model, verify,
//! preseed and replay) and `stats` (metrics).

pub mod aof;
mod client;
mod datadir;
pub mod import;
mod probe;
pub mod rdb;
mod restore;
mod snapshot;
mod stats;
mod verify;

pub use datadir::{data_dir_state, preseed_data_dir};
pub use probe::probe_blocking;
pub use verify::verify_deep;

use client::*;
use probe::*;
use restore::*;
use snapshot::*;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

const ENGINE: &str = "redis";
/// The artifact inside a set: `redis/dump.rdb.zst`.
const DUMP_REL: &str = "dump.rdb";
/// The manifest field (in the Redis entry's `details`) that is `false` when the snapshot's
/// RDB format is newer than this build decodes: checksums verify it, records are not decoded.
const DEEP_VERIFIABLE: &str = "deep_verifiable";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket read timeout of long jobs: how often a blocked read wakes up to look at the
/// cancellation token.
const POLL: Duration = Duration::from_millis(500);
/// The master sends a newline every second while it prepares the snapshot, so a longer
/// silence means the link is dead.
const SYNC_IDLE_LIMIT: Duration = Duration::from_secs(120);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// zstd level of the snapshot. Level 1, not the dumps' 2: the server has already compressed
/// every compressible string with LZF (`rdbcompression yes`), level 3 shrinks an RDB by only
/// ~8% more for 1.6x the CPU, and that CPU is taken from the server's fork while it streams,
/// which keeps the fork (and its copy-on-write memory) alive longer. Measured in the README.
const SNAPSHOT_ZSTD_LEVEL: i32 = 1;
/// A restore pipeline is flushed when it holds this many payload bytes or commands: enough to
/// hide the round trip, small enough that memory stays bounded.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_KEYS: usize = 1000;

/// Where and how to reach one Redis server, from `redis://[user[:pass]@]host[:port][/db]`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The db named in the URL. Backups and restores cover every db; this one is only
    /// remembered so the URL round-trips.
    pub db: u64,
    pub tls: bool,
    /// The client certificate presented on `rediss://`, when one is configured.
    pub client_auth: Option<ClientAuth>,
    /// The URL with its password replaced by `***`.
    pub display: String,
}

/// A client certificate chain and its key, as PEM (what both the probe's rustls config and the
/// client library take). `Debug` never shows the key.
#[derive(Clone)]
pub struct ClientAuth {
    pub cert_pem: std::sync::Arc<Vec<u8>>,
    pub key_pem: std::sync::Arc<Vec<u8>>,
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientAuth(***)")
    }
}

impl ClientAuth {
    /// Reads and checks `DBKEEPER_REDIS_TLS_CERT_FILE` / `_KEY_FILE`: both or neither, each
    /// readable PEM holding a certificate / a private key. Any fault is a configuration error.
    pub fn load(opts: &EngineOptions) -> Result<Option<ClientAuth>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        const CERT: &str = "DBKEEPER_REDIS_TLS_CERT_FILE";
        const KEY: &str = "DBKEEPER_REDIS_TLS_KEY_FILE";
        let (cert, key) = match (&opts.redis_tls_cert_file, &opts.redis_tls_key_file) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            (Some(_), None) => {
                return Err(Error::config(format!(
                    "{CERT} is set but {KEY} is not; set both"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::config(format!(
                    "{KEY} is set but {CERT} is not; set both"
                )));
            }
        };
        let read = |name: &str, p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| Error::config(format!("{name} {}: cannot read it: {e}", p.display())))
        };
        let cert_pem = read(CERT, cert)?;
        let key_pem = read(KEY, key)?;
        let certs =
            CertificateDer::pem_slice_iter(&cert_pem).collect::<std::result::Result<Vec<_>, _>>();
        if !matches!(&certs, Ok(c) if !c.is_empty()) {
            return Err(Error::config(format!(
                "{CERT} {}: no PEM certificate in it",
                cert.display()
            )));
        }
        if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
            return Err(Error::config(format!(
                "{KEY} {}: no PEM private key in it",
                key.display()
            )));
        }
        Ok(Some(ClientAuth {
            cert_pem: std::sync::Arc::new(cert_pem),
            key_pem: std::sync::Arc::new(key_pem),
        }))
    }
}

impl RedisConfig {
    pub fn parse(url: &Secret) -> Result<Self> {
        let raw = url.expose();
        let display = redact_url(raw);
        let bad = |why: &str| Error::config(format!("{display}: {why}"));
        let u = url::Url::parse(raw).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            other => {
                return Err(bad(&format!(
                    "scheme {other}:// is not redis:// or rediss://"
                )));
            }
        };
        let host = crate::engine::net::url_host(&u).ok_or_else(|| bad("no host"))?;
        let decode = |s: &str| -> Result<String> {
            crate::engine::net::url_decode(s)
                .ok_or_else(|| bad("user or password is not valid UTF-8 once decoded"))
        };
        let username = match u.username() {
            "" => None,
            name => Some(decode(name)?),
        };
        let password = match u.password() {
            None | Some("") => None,
            Some(p) => Some(Secret::new(decode(p)?)),
        };
        let db = match u.path().trim_matches('/') {
            "" => 0,
            p => p
                .parse::<u64>()
                .map_err(|_| bad(&format!("path /{p} is not a db number")))?,
        };
        Ok(RedisConfig {
            host,
            port: u.port().unwrap_or(6379),
            username,
            password,
            db,
            tls,
            client_auth: None,
            display,
        })
    }

    /// The URL with the engine options that concern it (the client certificate).
    pub fn with_options(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let mut cfg = Self::parse(url)?;
        cfg.client_auth = ClientAuth::load(opts)?;
        Ok(cfg)
    }

    fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::unreachable(ENGINE, &self.display, message)
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::refused(ENGINE, &self.display, message)
    }
}

// The engine

pub struct RedisEngine {
    cfg: RedisConfig,
}

impl RedisEngine {
    pub fn new(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        Ok(RedisEngine {
            cfg: RedisConfig::with_options(url, opts)?,
        })
    }

    /// Runs `f` on a blocking thread with an authenticated connection.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Conn<'_>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let cfg = self.cfg.clone();
        blocking(move || {
            let mut c = Conn::connect(&cfg, CONNECT_TIMEOUT)?;
            c.auth()?;
            // Admin commands may take long (FLUSHALL of a big dataset): no deadline now.
            c.deadline = None;
            let s = c.reader.get_ref().tcp();
            let _ = s
                .set_read_timeout(None)
                .and_then(|_| s.set_write_timeout(None));
            f(&mut c)
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::engine(ENGINE, format!("worker thread failed: {e}")))?
}

/// Keys per db from `INFO keyspace` (`db3:keys=12,expires=0,avg_ttl=0`).
fn keyspace(info: &str) -> BTreeMap<u64, u64> {
    info.lines()
        .filter_map(|l| {
            let (db, rest) = l.trim().split_once(':')?;
            let db = db.strip_prefix("db")?.parse().ok()?;
            let keys = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("keys="))?
                .parse()
                .ok()?;
            Some((db, keys))
        })
        .collect()
}

impl EngineOps for RedisEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Redis
    }

    fn display_url(&self) -> &str {
        &self.cfg.display
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        let cfg = self.cfg.clone();
        blocking(move || probe_cfg(&cfg, timeout)).await
    }

    async fn is_empty(&self) -> Result<Emptiness> {
        self.with_conn(|c| {
            let info = String::from_utf8_lossy(&c.bulk(&[b"INFO", b"keyspace"])?).into_owned();
            let dbs = keyspace(&info);
            if dbs.get(&0).copied().unwrap_or(0) > 0 {
                c.ok(&[b"SELECT", b"0"])?;
                if let Reply::Int(1..) = c.ok(&[b"EXISTS", rdb::MARKER_KEY])? {
                    return Ok(Emptiness::Interrupted);
                }
            }
            let held: Vec<String> = dbs
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(db, n)| format!("{n} keys in db{db}"))
                .collect();
            Ok(if held.is_empty() {
                Emptiness::Empty
            } else {
                Emptiness::HasData(held.join(", "))
            })
        })
        .await
    }

    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        let cfg = self.cfg.clone();
        let cancel = cancel.clone();
        blocking(move || dump_blocking(&cfg, out, &cancel)).await
    }

    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        _opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        let cfg = self.cfg.clone();
        let set = set.clone();
        let entry = entry.clone();
        let cancel = cancel.clone();
        blocking(move || restore_blocking(&cfg, &set, &entry, &cancel)).await
    }

    async fn wipe(&self) -> Result<()> {
        self.with_conn(|c| {
            // FLUSHALL SYNC exists since 6.2; older servers flush synchronously anyway.
            match c.call(&[b"FLUSHALL", b"SYNC"])? {
                Reply::Error(_) => c.ok(&[b"FLUSHALL"]).map(|_| ()),
                _ => Ok(()),
            }
        })
        .await?;
        info!(engine = ENGINE, url = %self.cfg.display, "flushed every db");
        Ok(())
    }

    async fn set_marker(&self, on: bool) -> Result<()> {
        self.with_conn(move |c| {
            c.ok(&[b"SELECT", b"0"])?;
            if on {
                let now = Utc::now().to_rfc3339();
                c.ok(&[b"SET", rdb::MARKER_KEY, now.as_bytes()])?;
            } else {
                c.ok(&[b"DEL", rdb::MARKER_KEY])?;
            }
            Ok(())
        })
        .await
    }

    async fn stats(&self, timeout: Duration) -> Result<Vec<crate::stats::Family>> {
        self.gather_stats(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> Result<RedisConfig> {
        RedisConfig::parse(&Secret::new(url))
    }

    /// Serves `answer` to one probe on a loopback socket and returns the probe's outcome.
    fn probe_answered(answer: Vec<u8>) -> Result<Probe> {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = std::io::Write::write_all(&mut s, &answer);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        });
        let url = Secret::new(format!("redis://127.0.0.1:{port}"));
        let r = probe_blocking(&url, &Default::default(), Duration::from_secs(10));
        server.join().unwrap();
        r
    }

    /// Nested one-element arrays recursed once per `*1`, so a hostile peer could overflow the
    /// stack (an abort, not an error: found by reading, a fuzzer cannot report it); a bulk
    /// header promising more than arrives reserved the whole promise up front (found by fuzzing) (the allocation bound itself is checked by
    /// the fault suite's counting allocator).
    #[test]
    fn hostile_replies_fail_cleanly() {
        let deep = probe_answered(b"*1\r\n".repeat(200_000)).unwrap_err();
        assert!(deep.to_string().contains("not a Redis server"), "{deep}");
        let short = probe_answered(b"$67108864\r\nabc".to_vec()).unwrap_err();
        assert!(short.to_string().contains("closed"), "{short}");
        let nested_ok = probe_answered(b"+PONG\r\n*2\r\n*1\r\n:1\r\n$1\r\nx\r\n".to_vec());
        assert!(nested_ok.is_ok(), "{nested_ok:?}");
    }

    #[test]
    fn urls_parse() {
        let c = cfg("redis://app:p%40ss@cache:6380/3").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.db, c.tls),
            ("cache", 6380, 3, false)
        );
        assert_eq!(c.username.as_deref(), Some("app"));
        assert_eq!(c.password.as_ref().unwrap().expose(), "p@ss");
        assert!(!c.display.contains("p%40ss") && !format!("{c:?}").contains("p@ss"));
        let c = cfg("redis://:secret@localhost").unwrap();
        assert_eq!((c.username.as_deref(), c.port, c.db), (None, 6379, 0));
        assert!(cfg("rediss://h").unwrap().tls);
        assert!(cfg("redis://[::1]:7000").unwrap().host == "::1");
        for bad in ["redis://h/x", "redis://", "http://h", "redis://h:99999"] {
            let e = cfg(bad).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn keyspace_lines() {
        let ks = keyspace(
            "# Keyspace\r\ndb0:keys=5,expires=1,avg_ttl=3\r\ndb12:keys=7,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(ks, BTreeMap::from([(0, 5), (12, 7)]));
    }
}
