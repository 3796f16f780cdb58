//! Redis: URL parsing, the readiness probe, snapshots over the replication protocol, restore
//! by pipelined `RESTORE`, pre-start preseed of a data directory, and offline deep verify.

pub mod rdb;
mod stats;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::net::ConnectError;
use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

const ENGINE: &str = "redis";
/// The artifact inside a set: `redis/dump.rdb.zst`.
const DUMP_REL: &str = "dump.rdb";
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
    /// The URL with its password replaced by `***`.
    pub display: String,
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
        let host = match u.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => return Err(bad("no host")),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let decode = |s: &str| -> Result<String> {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("user or password is not valid UTF-8 once decoded"))
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
            display,
        })
    }

    fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::Refused {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal RESP2 client on a std socket. Written by hand because the two paths that use it
// cannot use a client library: the health probe must start nothing heavy (no runtime, one
// round trip), and the snapshot reads the raw replication stream, which no client exposes.

#[derive(Debug)]
enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

const MAX_LINE: usize = 64 * 1024;
/// Replies this module reads are small (INFO, CONFIG GET); a bigger one is not ours.
const MAX_BULK: i64 = 64 << 20;
/// Nested arrays deeper than this are not a reply of the commands this module sends.
const MAX_DEPTH: usize = 32;

/// A plain or TLS connection; writes go through the `BufReader`, which buffers reads only.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// The client side of `rediss://`: rustls with the ring provider, trusting the system's CA
/// certificates (or the bundle `SSL_CERT_FILE` names, as OpenSSL tools do).
fn tls_client_config(cfg: &RedisConfig) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(cfg.refused(
            "rediss://: no trusted CA certificate found; set SSL_CERT_FILE to a PEM bundle",
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cfg.refused(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

fn tls_stream(cfg: &RedisConfig, tcp: TcpStream) -> Result<Stream> {
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| cfg.refused(format!("TLS: {} is not a valid server name: {e}", cfg.host)))?;
    let conn = rustls::ClientConnection::new(tls_client_config(cfg)?, name)
        .map_err(|e| cfg.refused(format!("TLS: {e}")))?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

struct Conn<'a> {
    cfg: &'a RedisConfig,
    reader: BufReader<Stream>,
    deadline: Option<Instant>,
}

fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl<'a> Conn<'a> {
    /// Connects within `timeout`; every later read or write must also finish by then.
    fn connect(cfg: &'a RedisConfig, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let s =
            crate::engine::net::connect(&cfg.host, cfg.port, deadline).map_err(|e| match e {
                ConnectError::Resolve(e) => {
                    cfg.unreachable(format!("cannot resolve {}: {e}", cfg.host))
                }
                ConnectError::Timeout => {
                    cfg.unreachable(format!("no connection within {timeout:?}"))
                }
                ConnectError::Refused(e) => cfg.unreachable(format!("cannot connect: {e}")),
                ConnectError::NoAddress => cfg.unreachable("no address to connect to"),
            })?;
        let stream = if cfg.tls {
            tls_stream(cfg, s)?
        } else {
            Stream::Plain(s)
        };
        let mut c = Conn {
            cfg,
            reader: BufReader::with_capacity(1 << 16, stream),
            deadline: Some(deadline),
        };
        c.arm()?;
        if let Stream::Tls(t) = c.reader.get_mut() {
            // Shake hands now: a plain port never answers a ClientHello, and that must read
            // as "wrong port", not as "not up yet".
            let t = &mut **t;
            let mut r = Ok(());
            while r.is_ok() && t.conn.is_handshaking() {
                r = t.conn.complete_io(&mut t.sock).map(|_| ());
            }
            if let Err(e) = r {
                return Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => cfg.refused(format!(
                        "no TLS handshake within {timeout:?}: is port {} a TLS port?",
                        cfg.port
                    )),
                    _ => c.io_error(e),
                });
            }
        }
        Ok(c)
    }

    /// Sets the socket timeouts to what is left before the deadline, or to the poll interval.
    fn arm(&mut self) -> Result<()> {
        let t = match self.deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.cfg.unreachable("no answer in time"));
                }
                left
            }
            None => POLL,
        };
        let s = self.reader.get_ref().tcp();
        s.set_read_timeout(Some(t))
            .and_then(|_| s.set_write_timeout(Some(t)))
            .map_err(|e| self.cfg.unreachable(format!("socket: {e}")))
    }

    fn io_error(&self, e: io::Error) -> Error {
        // A certificate or handshake failure: retrying will not help.
        if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return self.cfg.refused(format!("TLS: {tls}"));
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                self.cfg.unreachable("no answer in time")
            }
            io::ErrorKind::UnexpectedEof => {
                self.cfg.unreachable("the server closed the connection")
            }
            // What a TLS-only port does to plain text. Still retryable: a container proxy
            // resets connections the same way while the server behind it is starting.
            io::ErrorKind::ConnectionReset if !self.cfg.tls => self.cfg.unreachable(format!(
                "connection reset ({e}); if the server expects TLS, use rediss://"
            )),
            _ => self.cfg.unreachable(format!("connection lost: {e}")),
        }
    }

    /// Writes several commands at once (one round trip for all of them).
    fn send(&mut self, cmds: &[&[&[u8]]]) -> Result<()> {
        let mut buf = Vec::new();
        for c in cmds {
            encode(c, &mut buf);
        }
        self.arm()?;
        let w = self.reader.get_mut();
        w.write_all(&buf)
            .and_then(|_| w.flush())
            .map_err(|e| self.io_error(e))
    }

    fn call(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send(&[args])?;
        self.read_reply()
    }

    /// `AUTH` with the URL's credentials, if it has any.
    fn auth_command(&self) -> Option<Vec<Vec<u8>>> {
        let pass = self.cfg.password.as_ref()?;
        let mut v = vec![b"AUTH".to_vec()];
        if let Some(u) = &self.cfg.username {
            v.push(u.as_bytes().to_vec());
        }
        v.push(pass.expose().as_bytes().to_vec());
        Some(v)
    }

    fn auth(&mut self) -> Result<()> {
        if let Some(cmd) = self.auth_command() {
            let args: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
            let reply = self.call(&args)?;
            self.check_auth(reply)?;
        }
        Ok(())
    }

    fn check_auth(&self, reply: Reply) -> Result<()> {
        match reply {
            Reply::Error(e) => Err(self
                .cfg
                .refused(format!("authentication failed: {}", first_line(&e)))),
            _ => Ok(()),
        }
    }

    fn read_line(&mut self) -> Result<Vec<u8>> {
        self.arm()?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io_error(e))?;
        if n == 0 {
            return Err(self.cfg.unreachable("the server closed the connection"));
        }
        if !line.ends_with(b"\r\n") {
            return Err(self.not_redis());
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }

    fn not_redis(&self) -> Error {
        self.cfg
            .refused("not a Redis server (its answer is not the Redis protocol)")
    }

    fn read_reply(&mut self) -> Result<Reply> {
        self.read_reply_at(0)
    }

    /// One reply; `depth` counts the arrays around it, so that a hostile peer's `*1` repeated
    /// cannot recurse until the stack overflows.
    fn read_reply_at(&mut self, depth: usize) -> Result<Reply> {
        let line = self.read_line()?;
        let (kind, rest) = match line.split_first() {
            Some((k, r)) => (*k, r),
            None => return Err(self.not_redis()),
        };
        let text = || String::from_utf8_lossy(rest).into_owned();
        let int = |this: &Self| -> Result<i64> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| this.not_redis())
        };
        Ok(match kind {
            b'+' => Reply::Status(text()),
            b'-' => Reply::Error(text()),
            b':' => Reply::Int(int(self)?),
            b'$' => {
                let n = int(self)?;
                if n < 0 {
                    Reply::Bulk(None)
                } else if n > MAX_BULK {
                    return Err(self.cfg.refused(format!("reply of {n} bytes is too large")));
                } else {
                    // Grown as the bytes arrive: a `$67108864` header before a closed socket
                    // must not cost 64 MiB.
                    let want = n as u64 + 2;
                    let mut buf = Vec::new();
                    self.arm()?;
                    (&mut self.reader)
                        .take(want)
                        .read_to_end(&mut buf)
                        .map_err(|e| self.io_error(e))?;
                    if (buf.len() as u64) < want {
                        return Err(self.cfg.unreachable("the server closed the connection"));
                    }
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            b'*' => {
                let n = int(self)?;
                if n < 0 {
                    Reply::Array(None)
                } else if depth >= MAX_DEPTH {
                    return Err(self.not_redis());
                } else {
                    let mut v = Vec::new();
                    for _ in 0..n.min(1 << 20) {
                        v.push(self.read_reply_at(depth + 1)?);
                    }
                    Reply::Array(Some(v))
                }
            }
            _ => return Err(self.not_redis()),
        })
    }

    /// A bulk-string reply, or an error carrying the server's message.
    fn bulk(&mut self, args: &[&[u8]]) -> Result<Vec<u8>> {
        match self.call(args)? {
            Reply::Bulk(Some(b)) => Ok(b),
            Reply::Status(s) => Ok(s.into_bytes()),
            Reply::Error(e) => Err(server_error(args, &e)),
            other => Err(Error::engine(
                ENGINE,
                format!("{}: unexpected reply {other:?}", cmd_name(args)),
            )),
        }
    }

    /// Any non-error reply.
    fn ok(&mut self, args: &[&[u8]]) -> Result<Reply> {
        match self.call(args)? {
            Reply::Error(e) => Err(server_error(args, &e)),
            r => Ok(r),
        }
    }
}

fn cmd_name(args: &[&[u8]]) -> String {
    String::from_utf8_lossy(args.first().copied().unwrap_or(b"?")).into_owned()
}

fn server_error(args: &[&[u8]], msg: &str) -> Error {
    Error::engine(ENGINE, format!("{}: {}", cmd_name(args), first_line(msg)))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// `field:value` from an INFO section.
fn info_field<'t>(info: &'t str, field: &str) -> Option<&'t str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

// ---------------------------------------------------------------------------------------------
// Probe

/// One PING on the calling thread (the `dbkeeper-health` path: no runtime, no client
/// library). AUTH, PING and `INFO server` go out in one write, so a probe is one round trip.
pub fn probe_blocking(url: &Secret, timeout: Duration) -> Result<Probe> {
    let cfg = RedisConfig::parse(url)?;
    probe_cfg(&cfg, timeout)
}

fn probe_cfg(cfg: &RedisConfig, timeout: Duration) -> Result<Probe> {
    let mut c = Conn::connect(cfg, timeout)?;
    let auth = c.auth_command();
    let mut cmds: Vec<&[&[u8]]> = Vec::new();
    let auth_args: Vec<&[u8]> = auth.iter().flatten().map(Vec::as_slice).collect();
    if auth.is_some() {
        cmds.push(&auth_args);
    }
    cmds.push(&[b"PING"]);
    cmds.push(&[b"INFO", b"server"]);
    c.send(&cmds)?;
    if auth.is_some() {
        let r = c.read_reply()?;
        c.check_auth(r)?;
    }
    match c.read_reply()? {
        Reply::Status(s) if s.eq_ignore_ascii_case("PONG") => {}
        Reply::Error(e) => {
            let code = e.split_whitespace().next().unwrap_or("");
            return Err(match code {
                "LOADING" => cfg.unreachable("loading the dataset into memory"),
                "BUSY" | "MASTERDOWN" | "TRYAGAIN" => cfg.unreachable(first_line(&e)),
                "NOAUTH" => cfg.refused(
                    "the server requires a password; put it in the URL (redis://:PASSWORD@host)",
                ),
                _ => cfg.refused(first_line(&e).to_owned()),
            });
        }
        other => return Err(cfg.refused(format!("PING answered {other:?}"))),
    }
    let version = match c.read_reply()? {
        Reply::Bulk(Some(b)) => {
            info_field(&String::from_utf8_lossy(&b), "redis_version").map(str::to_owned)
        }
        // INFO may be renamed or forbidden by an ACL: the server is still up.
        _ => None,
    };
    Ok(Probe {
        version,
        detail: String::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// The engine

pub struct RedisEngine {
    cfg: RedisConfig,
}

impl RedisEngine {
    pub fn new(url: &Secret, _opts: &EngineOptions) -> Result<Self> {
        Ok(RedisEngine {
            cfg: RedisConfig::parse(url)?,
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

// ---------------------------------------------------------------------------------------------
// Dump: the replication snapshot, as `redis-cli --rdb` takes it

/// The error a read returns once the job is cancelled. Not `Interrupted`: readers retry that
/// kind (it means EINTR), and would spin.
fn cancelled() -> io::Error {
    io::Error::other("cancelled")
}

/// Reads the socket, retrying on the poll timeout so cancellation is noticed within `POLL`.
struct PolledSocket<'a, 'c> {
    conn: &'a mut Conn<'c>,
    cancel: &'a CancellationToken,
}

impl Read for PolledSocket<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            match self.conn.reader.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if since.elapsed() >= SYNC_IDLE_LIMIT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no data from the server for {}s", SYNC_IDLE_LIMIT.as_secs()),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// Bytes the kernel queues before it wakes the snapshot's reader (`SO_RCVLOWAT`): one of the
/// server's 16 KiB writes, so that the reader takes each as it comes (see
/// `snapshot_pipeline`) without waking for a part of one.
const SNAPSHOT_LOWAT: i32 = 16 << 10;
/// The snapshot socket's read timeout: with a low-water mark, how long the last bytes (fewer
/// than the mark) can wait before a read hands them out.
const SNAPSHOT_POLL: Duration = Duration::from_millis(20);

/// Sets `SO_RCVLOWAT`: a blocking read returns once `bytes` are queued, or at its timeout with
/// what there is. No maintained crate wraps this option (nix, rustix and socket2 do not), hence
/// the one libc call.
#[allow(unsafe_code)]
fn set_recv_lowat(s: &TcpStream, bytes: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = bytes;
    // SAFETY: the descriptor is open for the call's duration, and the option value points to a
    // live c_int of the given length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The snapshot's bytes, without the framing: either `$<len>` bytes, or (diskless sync)
/// everything up to the 40-byte end mark announced by `$EOF:<mark>`.
struct Payload<R> {
    inner: R,
    framing: Framing,
    /// Diskless framing only: `buf[pos..ready]` is payload not yet handed out, `buf[ready..end]`
    /// the held-back tail that may be the start of the end mark (which a direct read moves to
    /// `buf[0..]`).
    buf: Box<[u8]>,
    pos: usize,
    ready: usize,
    end: usize,
    done: bool,
}

enum Framing {
    Length(u64),
    Mark([u8; 40]),
}

/// Bytes the diskless framing reads at once into its own buffer, for reads too small to take
/// the socket's bytes directly.
const PAYLOAD_READ: usize = 64 << 10;
/// Reads at least this large (beyond the held-back tail) are filled from the socket directly.
const PAYLOAD_DIRECT_MIN: usize = 4096;

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "snapshot cut short before its end mark",
    )
}

impl<R: Read> Payload<R> {
    fn new(inner: R, framing: Framing) -> Self {
        let buf = match framing {
            Framing::Length(_) => Box::default(),
            Framing::Mark(_) => vec![0; PAYLOAD_READ].into_boxed_slice(),
        };
        Payload {
            inner,
            framing,
            buf,
            pos: 0,
            ready: 0,
            end: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for Payload<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = out.len().min(*left as usize);
                let n = self.inner.read(&mut out[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("snapshot cut short: {left} bytes missing"),
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Mark(mark) => loop {
                if self.pos < self.ready {
                    let n = out.len().min(self.ready - self.pos);
                    out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
                if self.done {
                    return Ok(0);
                }
                let held = self.end - self.ready;
                if out.len() >= held + PAYLOAD_DIRECT_MIN {
                    // A large read goes straight into `out`, after the held-back tail: no
                    // second copy of the snapshot.
                    out[..held].copy_from_slice(&self.buf[self.ready..self.end]);
                    let n = self.inner.read(&mut out[held..])?;
                    if n == 0 {
                        return Err(cut_short());
                    }
                    let total = held + n;
                    if let Some(at) = memchr::memmem::find(&out[..total], &mark[..]) {
                        (self.pos, self.ready, self.end, self.done) = (0, 0, 0, true);
                        return Ok(at);
                    }
                    let keep = total.min(mark.len() - 1);
                    self.buf[..keep].copy_from_slice(&out[total - keep..total]);
                    (self.pos, self.ready, self.end) = (0, 0, keep);
                    if total > keep {
                        return Ok(total - keep);
                    }
                    continue;
                }
                // A small read: keep the held-back tail (under 40 bytes), read more after it.
                self.buf.copy_within(self.ready..self.end, 0);
                self.pos = 0;
                let n = self.inner.read(&mut self.buf[held..])?;
                if n == 0 {
                    return Err(cut_short());
                }
                self.end = held + n;
                // Anything after the mark (an older master streams commands next) is not
                // part of the snapshot.
                if let Some(at) = memchr::memmem::find(&self.buf[..self.end], &mark[..]) {
                    self.ready = at;
                    self.end = at;
                    self.done = true;
                } else {
                    self.ready = self.end.saturating_sub(mark.len() - 1);
                }
            },
        }
    }
}

/// The snapshot artifact's zstd frames: each holds this much of the RDB, compressed in
/// blocks of [`SNAPSHOT_BLOCK`] as they arrive (see `FramedArtifactWriter`).
const SNAPSHOT_FRAME: usize = 256 << 10;
const SNAPSHOT_BLOCK: usize = 64 << 10;

/// Streams the snapshot on the calling thread: the socket is read as the server writes it,
/// every byte is parsed (key counts, structure, CRC64) and handed to the artifact, which
/// compresses, hashes and writes it.
///
/// One thread, in short bursts, because on a small host the server's fork needs a whole CPU
/// and its parent wakes up every 16 KiB to forward the fork's pipe to our socket. Each read
/// takes what the parent forwarded, and the work on it (under 0.2 ms) is done before the
/// parent's next wake-up, as `redis-cli --rdb` does with its 4 KiB reads and writes. The
/// earlier design, a second thread compressing 256 KiB at a time from a queue, held the CPU
/// for half a millisecond or more at a stretch: the parent, woken onto that CPU, waited, the
/// fork filled the pipe (64 KiB) and stopped, 1,200–1,800 times per GB against 150–400 with
/// redis-cli, and the parent was more often placed on the fork's own CPU instead. Measured in
/// the README.
fn snapshot_pipeline<R: Read>(
    payload: R,
    mut artifact: crate::repo::writer::FramedArtifactWriter,
    artifact_path: &Path,
    cancel: &CancellationToken,
) -> Result<(crate::repo::manifest::FileEntry, u64, rdb::RdbSummary)> {
    let mut tee = Tee {
        inner: payload,
        artifact: &mut artifact,
        disk: None,
        received: 0,
        start: Instant::now(),
        last_report: Instant::now(),
    };
    let opts = rdb::ParseOptions {
        decode_values: false,
        capture_payload: false,
    };
    let parsed = rdb::read(&mut tee, &opts, &mut CountOnly(cancel), false);
    // Whatever follows the RDB's own end inside the payload still belongs to the file.
    let rest = match parsed {
        Ok(_) => io::copy(&mut tee, &mut io::sink()).map(|_| ()),
        Err(_) => Ok(()),
    };
    let (received, disk) = (tee.received, tee.disk.take());
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    // The first cause wins: the disk, then the connection, then the snapshot itself.
    if let Some(e) = disk {
        return Err(Error::io(artifact_path, e));
    }
    let summary = match parsed {
        Err(rdb::RdbError::Io { source, .. }) => {
            return Err(Error::engine(ENGINE, format!("snapshot: {source}")));
        }
        other => other?,
    };
    rest.map_err(|e| Error::engine(ENGINE, format!("snapshot: {e}")))?;
    Ok((artifact.finish()?, received, summary))
}

/// Hands everything read through it to the artifact. A failed write is kept apart, so that
/// it is reported as the disk's error and not as the snapshot's.
struct Tee<'a, R> {
    inner: R,
    artifact: &'a mut crate::repo::writer::FramedArtifactWriter,
    disk: Option<io::Error>,
    received: u64,
    start: Instant,
    last_report: Instant,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.disk.is_some() {
            return Err(io::Error::other("the artifact could not be written"));
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.artifact.write(&buf[..n]) {
            self.disk = Some(e);
            return Err(io::Error::other("the artifact could not be written"));
        }
        self.received += n as u64;
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            info!(
                engine = ENGINE,
                bytes = self.received,
                mb_per_s = format!(
                    "{:.1}",
                    self.received as f64 / 1e6 / self.start.elapsed().as_secs_f64()
                ),
                "snapshot in progress"
            );
        }
        Ok(n)
    }
}

struct CountOnly<'a>(&'a CancellationToken);

impl rdb::Visitor for CountOnly<'_> {
    fn key(&mut self, _rec: &rdb::KeyRecord<'_>) -> Result<()> {
        if self.0.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        Ok(())
    }
}

fn dump_blocking(
    cfg: &RedisConfig,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let start = Instant::now();
    let mut c = Conn::connect(cfg, CONNECT_TIMEOUT)?;
    c.auth()?;
    let info = String::from_utf8_lossy(&c.bulk(&[b"INFO", b"server"])?).into_owned();
    let server_version = info_field(&info, "redis_version")
        .unwrap_or("unknown")
        .to_owned();
    // CONFIG may be renamed or forbidden; the delay is then unknown, which is not an error.
    let delay = match c.call(&[b"CONFIG", b"GET", b"repl-diskless-sync-delay"])? {
        Reply::Array(Some(v)) => match v.get(1) {
            Some(Reply::Bulk(Some(b))) => String::from_utf8_lossy(b).parse::<u64>().ok(),
            _ => None,
        },
        _ => None,
    };
    if let Some(d) = delay.filter(|d| *d > 0) {
        warn!(
            engine = ENGINE,
            repl_diskless_sync_delay = d,
            "the server's repl-diskless-sync-delay adds {d} s to every snapshot; set it to 0"
        );
    }
    // Announce that we understand the diskless `$EOF:` framing, as redis-cli does, and that we
    // want the snapshot only (Redis >= 7; older servers answer an error and stream commands
    // after the snapshot, which `Payload` leaves unread).
    c.call(&[b"REPLCONF", b"capa", b"eof"])?;
    if let Reply::Error(e) = c.call(&[b"REPLCONF", b"rdb-only", b"1"])? {
        debug!(engine = ENGINE, reply = %e, "REPLCONF rdb-only not supported");
    }
    c.send(&[&[b"SYNC"]])?;
    c.deadline = None;
    c.arm()?;
    let header = read_sync_header(&mut c, cancel)?;
    let framing = if let Some(mark) = header.strip_prefix(b"$EOF:") {
        let mark: [u8; 40] = mark
            .try_into()
            .map_err(|_| Error::engine(ENGINE, "SYNC: malformed end mark"))?;
        Framing::Mark(mark)
    } else if let Some(len) = header.strip_prefix(b"$") {
        let len = std::str::from_utf8(len)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::engine(ENGINE, "SYNC: malformed length"))?;
        Framing::Length(len)
    } else if let Some(e) = header.strip_prefix(b"-") {
        return Err(Error::engine(
            ENGINE,
            format!(
                "the server refused the snapshot: {}",
                first_line(&String::from_utf8_lossy(e))
            ),
        ));
    } else {
        return Err(Error::engine(ENGINE, "SYNC: unexpected answer"));
    };
    info!(engine = ENGINE, url = %cfg.display, "snapshot transfer started");
    {
        let s = c.reader.get_ref().tcp();
        // Without the mark the snapshot still works, one wake-up per segment.
        if let Err(e) =
            set_recv_lowat(s, SNAPSHOT_LOWAT).and_then(|_| s.set_read_timeout(Some(SNAPSHOT_POLL)))
        {
            debug!(engine = ENGINE, error = %e, "socket low-water mark not set");
        }
    }

    // zstd level 1 on the reading thread compresses several times faster than a server
    // writes a snapshot; zstd's own threads would only add copies and wake-ups.
    let artifact = out.create_framed(
        DUMP_REL,
        SNAPSHOT_ZSTD_LEVEL,
        SNAPSHOT_FRAME,
        SNAPSHOT_BLOCK,
    )?;
    let artifact_path = out.dir().join(format!("{DUMP_REL}.zst"));
    let payload = Payload::new(
        PolledSocket {
            conn: &mut c,
            cancel,
        },
        framing,
    );
    let (file, bytes, summary) = snapshot_pipeline(payload, artifact, &artifact_path, cancel)?;
    let elapsed = start.elapsed();
    info!(
        engine = ENGINE,
        bytes,
        elapsed_ms = elapsed.as_millis() as u64,
        mb_per_s = format!(
            "{:.1}",
            bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-3)
        ),
        "snapshot written"
    );
    let counts: Counts = summary
        .keys_per_db
        .iter()
        .map(|(db, n)| (rdb::db_key(*db), *n))
        .collect();
    Ok(EngineEntry {
        source: cfg.display.clone(),
        server_version,
        started_at,
        finished_at: Utc::now(),
        files: vec![file],
        counts,
        details: serde_json::json!({
            "rdb_version": summary.version,
            "repl_diskless_sync_delay": delay,
        }),
    })
}

/// Skips the newlines the master sends while it prepares the snapshot and returns the
/// framing line (`$<len>` or `$EOF:<mark>`, or an error line).
fn read_sync_header(c: &mut Conn<'_>, cancel: &CancellationToken) -> Result<Vec<u8>> {
    let mut idle = Duration::ZERO;
    let mut line = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let r = c.reader.fill_buf().map(|b| b.to_vec());
        match r {
            Ok(b) if b.is_empty() => {
                return Err(c
                    .cfg
                    .unreachable("the server closed the connection during SYNC"));
            }
            Ok(b) => {
                idle = Duration::ZERO;
                let mut used = 0;
                for &byte in &b {
                    used += 1;
                    if byte == b'\n' {
                        if line.is_empty() {
                            continue;
                        }
                        c.reader.consume(used);
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        return Ok(line);
                    }
                    line.push(byte);
                    if line.len() > MAX_LINE {
                        return Err(Error::engine(ENGINE, "SYNC: header line too long"));
                    }
                }
                c.reader.consume(used);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += POLL;
                if idle >= SYNC_IDLE_LIMIT {
                    return Err(c.cfg.unreachable(format!(
                        "no snapshot from the server after {}s",
                        SYNC_IDLE_LIMIT.as_secs()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(c.io_error(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restore: RESTORE … ABSTTL, pipelined

/// Maps a client-library error to ours, without the password (the library never prints it).
fn client_error(cfg: &RedisConfig, e: redis::RedisError) -> Error {
    if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
        return cfg.unreachable(e.to_string());
    }
    match e.kind() {
        redis::ErrorKind::AuthenticationFailed => {
            cfg.refused(format!("authentication failed: {e}"))
        }
        _ => Error::engine(ENGINE, e.to_string()),
    }
}

fn client(cfg: &RedisConfig) -> Result<redis::Connection> {
    // The client library builds its TLS config from the process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(p) = &cfg.password {
        settings = settings.set_password(p.expose());
    }
    if let Some(u) = &cfg.username {
        settings = settings.set_username(u);
    }
    let addr = if cfg.tls {
        redis::ConnectionAddr::TcpTls {
            host: cfg.host.clone(),
            port: cfg.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(cfg.host.clone(), cfg.port)
    };
    let info = redis::IntoConnectionInfo::into_connection_info(addr)
        .map_err(|e| client_error(cfg, e))?
        .set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(|e| client_error(cfg, e))?;
    client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| client_error(cfg, e))
}

/// Collects `RESTORE` commands into pipelines bounded by bytes and count.
struct Restorer<'a> {
    cfg: &'a RedisConfig,
    con: redis::Connection,
    cancel: &'a CancellationToken,
    rdb_version: u16,
    source_version: &'a str,
    pipe: redis::Pipeline,
    pipe_bytes: usize,
    pipe_keys: usize,
    /// The db the connection is in once the queued commands have run.
    db: Option<u64>,
    counts: BTreeMap<u64, u64>,
    expired: u64,
    bytes: u64,
    keys: u64,
    start: Instant,
    last_report: Instant,
}

impl Restorer<'_> {
    fn flush(&mut self) -> Result<()> {
        if self.pipe_keys == 0 {
            return Ok(());
        }
        let r: redis::RedisResult<()> = self.pipe.query(&mut self.con);
        self.pipe.clear();
        self.pipe_bytes = 0;
        self.pipe_keys = 0;
        r.map_err(|e| {
            let msg = e.to_string();
            if msg.contains("payload version") {
                Error::engine(
                    ENGINE,
                    format!(
                        "the target refuses this set's data (RDB version {}, written by Redis {}): restore into Redis {} or newer",
                        self.rdb_version, self.source_version, self.source_version
                    ),
                )
            } else if msg.contains("BUSYKEY") {
                Error::engine(
                    ENGINE,
                    format!("{msg}: the target was not empty; re-run with --force to replace its data"),
                )
            } else {
                client_error(self.cfg, e)
            }
        })
    }
}

impl rdb::Visitor for Restorer<'_> {
    fn key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        *self.counts.entry(rec.db).or_default() += 1;
        self.keys += 1;
        let ttl = match rec.expire_ms {
            Some(at) if at <= Utc::now().timestamp_millis() => {
                self.expired += 1;
                debug!(engine = ENGINE, db = rec.db, key = %String::from_utf8_lossy(rec.key), "skipping a key that has already expired");
                return Ok(());
            }
            Some(at) => at,
            None => 0,
        };
        if self.db != Some(rec.db) {
            self.pipe.cmd("SELECT").arg(rec.db).ignore();
            self.db = Some(rec.db);
        }
        let payload = rdb::dump_payload(rec.payload, self.rdb_version);
        self.pipe_bytes += payload.len() + rec.key.len();
        self.bytes += payload.len() as u64;
        let cmd = self.pipe.cmd("RESTORE").arg(rec.key).arg(ttl).arg(payload);
        if ttl > 0 {
            cmd.arg("ABSTTL");
        }
        cmd.ignore();
        self.pipe_keys += 1;
        if self.pipe_bytes >= BATCH_BYTES || self.pipe_keys >= BATCH_KEYS {
            self.flush()?;
        }
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            info!(
                engine = ENGINE,
                keys = self.keys,
                bytes = self.bytes,
                keys_per_s = (self.keys as f64 / secs) as u64,
                "restore in progress"
            );
        }
        Ok(())
    }
}

/// Reads the RDB version from the header (`REDIS0011`) without consuming it.
fn peek_rdb_version(r: &mut impl BufRead) -> io::Result<Option<u16>> {
    let head = r.fill_buf()?;
    Ok(head
        .get(..9)
        .filter(|h| h.starts_with(b"REDIS"))
        .and_then(|h| std::str::from_utf8(&h[5..9]).ok())
        .and_then(|v| v.parse().ok()))
}

fn restore_blocking(
    cfg: &RedisConfig,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let file = entry
        .file(&format!("redis/{DUMP_REL}.zst"))
        .ok_or_else(|| Error::corrupt(set.id(), "its redis part has no dump.rdb.zst"))?;
    let mut reader = BufReader::with_capacity(1 << 20, set.open_file(file)?);
    let rdb_version = peek_rdb_version(&mut reader)
        .map_err(|e| Error::corrupt(set.id(), format!("{}: {e}", file.path)))?
        .ok_or_else(|| Error::corrupt(set.id(), format!("{}: not an RDB file", file.path)))?;
    let mut r = Restorer {
        cfg,
        con: client(cfg)?,
        cancel,
        rdb_version,
        source_version: &entry.server_version,
        pipe: redis::pipe(),
        pipe_bytes: 0,
        pipe_keys: 0,
        db: None,
        counts: BTreeMap::new(),
        expired: 0,
        bytes: 0,
        keys: 0,
        start: Instant::now(),
        last_report: Instant::now(),
    };
    let opts = rdb::ParseOptions {
        decode_values: false,
        capture_payload: true,
    };
    let parsed = rdb::read(&mut reader, &opts, &mut r, false);
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    parsed.map_err(|e| e.into_set_error(set.id()))?;
    r.flush()?;
    reader.into_inner().finish().map_err(|e| {
        if cancel.is_cancelled() {
            Error::Interrupted(0)
        } else {
            e
        }
    })?;
    if r.expired > 0 {
        info!(
            engine = ENGINE,
            expired = r.expired,
            "keys whose expiry passed since the backup were not restored"
        );
    }
    info!(
        engine = ENGINE,
        keys = r.keys,
        bytes = r.bytes,
        elapsed_ms = r.start.elapsed().as_millis() as u64,
        "keys restored"
    );
    Ok(r.counts
        .iter()
        .map(|(db, n)| (rdb::db_key(*db), *n))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Offline: deep verify, and the data directory of a server that is not running

/// Passes reads through until the job is cancelled.
struct Cancellable<'a, R> {
    inner: R,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(cancelled());
        }
        self.inner.read(buf)
    }
}

pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let mut counts = Counts::new();
    for file in &entry.files {
        let mut reader = set.open_file(file)?;
        let opts = rdb::ParseOptions {
            decode_values: true,
            capture_payload: false,
        };
        let parsed = rdb::read(
            Cancellable {
                inner: &mut reader,
                cancel,
            },
            &opts,
            &mut CountOnly(cancel),
            false,
        );
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let summary = parsed.map_err(|e| e.into_set_error(set.id()))?;
        reader.finish()?;
        for (db, n) in summary.keys_per_db {
            *counts.entry(rdb::db_key(db)).or_default() += n;
        }
    }
    Ok(counts)
}

const RDB_NAME: &str = "dump.rdb";
const AOF_DIR: &str = "appendonlydir";
const AOF_BASE: &str = "appendonly.aof.1.base.rdb";
const AOF_INCR: &str = "appendonly.aof.1.incr.aof";
const AOF_MANIFEST: &str = "appendonly.aof.manifest";
const TMP_RDB: &str = ".dump.rdb.tmp-";
const TMP_AOF: &str = ".appendonlydir.tmp-";

fn dir_error(dir: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::config(format!(
            "DBKEEPER_REDIS_DATA_DIR {}: no such directory; mount the Redis data volume there",
            dir.display()
        ))
    } else {
        Error::io(dir, e)
    }
}

/// Whether a Redis data directory (server not running) holds an RDB or AOF. Our own temp
/// files never count as data; a half-published preseed (its AOF directory still a temp)
/// reports `Interrupted`.
pub fn data_dir_state(dir: &Path) -> Result<Emptiness> {
    let mut found = Vec::new();
    let mut half_done = false;
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with(TMP_AOF) {
            half_done = true;
        } else if name.starts_with('.') || name.starts_with("temp-") {
            // Ours, or the server's own unfinished saves (`temp-<pid>.rdb`), never loaded.
            continue;
        } else if path.is_file() && (name.ends_with(".rdb") || name.starts_with("appendonly.aof")) {
            found.push(name);
        } else if path.is_dir()
            && fs::read_dir(&path)
                .map_err(|e| Error::io(&path, e))?
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(".manifest"))
        {
            found.push(format!("{name}/"));
        }
    }
    Ok(if half_done {
        Emptiness::Interrupted
    } else if found.is_empty() {
        Emptiness::Empty
    } else {
        found.sort();
        Emptiness::HasData(format!("{} holds {}", dir.display(), found.join(", ")))
    })
}

fn fsync_path(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(p, e))
}

/// Gives `path` to the data directory's owner (the Redis image runs as uid 999).
fn chown_like(path: &Path, owner: (u32, u32)) -> Result<()> {
    use nix::unistd::{Gid, Uid, chown};
    if owner == (Uid::effective().as_raw(), Gid::effective().as_raw()) {
        return Ok(());
    }
    chown(
        path,
        Some(Uid::from_raw(owner.0)),
        Some(Gid::from_raw(owner.1)),
    )
    .map_err(|e| {
        Error::io(
            path,
            io::Error::other(format!(
                "cannot give it to uid {} gid {} (the data directory's owner): {e}",
                owner.0, owner.1
            )),
        )
    })
}

/// Writes the set's RDB into an empty data directory so the server loads it on start, with
/// `appendonly no` (from `dump.rdb`) or `appendonly yes` (from a multi-part AOF whose base is
/// the same RDB; Redis 7 ignores a lone `dump.rdb` when AOF is on). Everything is built under
/// temp names and renamed into place, so an interruption leaves only temps.
/// How often a restore written to the data directory hands its pages to write-back.
const WRITE_BACK_EVERY: u64 = 8 << 20;

/// Writes the stored file, decompressed, to `path` and fsyncs it; its checksum is checked
/// before this returns. A read (or checksum) failure is the set's, a write failure the disk's.
fn write_checked(
    set: &SetReader,
    file: &crate::repo::manifest::FileEntry,
    path: &Path,
) -> Result<u64> {
    let mut reader = set.open_file(file)?;
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    let mut flushed = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(reader.error(e)),
        };
        f.write_all(&buf[..n]).map_err(|e| Error::io(path, e))?;
        bytes += n as u64;
        // Start the write-back of what is written as the restore goes, so the final fsync
        // finds little left (and the page cache is not filled with a file Redis reads once).
        // Advice only: the fsync below is what makes the file durable.
        if bytes - flushed >= WRITE_BACK_EVERY {
            use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
            let _ = posix_fadvise(
                &f,
                flushed as i64,
                (bytes - flushed) as i64,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
            flushed = bytes;
        }
    }
    reader.finish()?;
    f.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

pub fn preseed_data_dir(dir: &Path, set: &SetReader, entry: &EngineEntry) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(|e| dir_error(dir, e))?;
    let owner = (meta.uid(), meta.gid());
    // Leftovers of an interrupted preseed.
    for e in fs::read_dir(dir).map_err(|e| dir_error(dir, e))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(TMP_RDB) {
            fs::remove_file(e.path()).map_err(|err| Error::io(e.path(), err))?;
        } else if name.starts_with(TMP_AOF) {
            fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    let file = entry
        .file(&format!("redis/{DUMP_REL}.zst"))
        .ok_or_else(|| Error::corrupt(set.id(), "its redis part has no dump.rdb.zst"))?;
    let pid = std::process::id();
    let tmp_rdb = dir.join(format!("{TMP_RDB}{pid}"));
    let tmp_aof = dir.join(format!("{TMP_AOF}{pid}"));
    let start = Instant::now();

    let bytes = match write_checked(set, file, &tmp_rdb) {
        Ok(n) => n,
        Err(e) => {
            // A set that fails its checksum leaves nothing behind for the next one tried.
            let _ = fs::remove_file(&tmp_rdb);
            return Err(e);
        }
    };
    chown_like(&tmp_rdb, owner)?;

    fs::create_dir(&tmp_aof).map_err(|e| Error::io(&tmp_aof, e))?;
    let base = tmp_aof.join(AOF_BASE);
    // A hard link costs no space; Redis replaces both names by rename, never in place.
    if fs::hard_link(&tmp_rdb, &base).is_err() {
        fs::copy(&tmp_rdb, &base).map_err(|e| Error::io(&base, e))?;
        fsync_path(&base)?;
    }
    let incr = tmp_aof.join(AOF_INCR);
    File::create(&incr)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(&incr, e))?;
    let manifest = tmp_aof.join(AOF_MANIFEST);
    let text = format!("file {AOF_BASE} seq 1 type b\nfile {AOF_INCR} seq 1 type i\n");
    File::create(&manifest)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|e| Error::io(&manifest, e))?;
    for p in [&base, &incr, &manifest, &tmp_aof] {
        chown_like(p, owner)?;
    }
    fsync_path(&tmp_aof)?;

    // dump.rdb first: while the AOF directory is still a temp, `data_dir_state` reports the
    // preseed as interrupted, so a crash between the renames is redone, not skipped.
    let rdb_path = dir.join(RDB_NAME);
    fs::rename(&tmp_rdb, &rdb_path).map_err(|e| Error::io(&rdb_path, e))?;
    fsync_path(dir)?;
    let aof_path = dir.join(AOF_DIR);
    if aof_path.exists() {
        // Only an interrupted earlier preseed gets here (data_dir_state said no data).
        fs::remove_dir_all(&aof_path).map_err(|e| Error::io(&aof_path, e))?;
    }
    fs::rename(&tmp_aof, &aof_path).map_err(|e| Error::io(&aof_path, e))?;
    fsync_path(dir)?;
    info!(
        engine = ENGINE,
        dir = %dir.display(),
        set = set.id(),
        bytes,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "data directory preseeded (dump.rdb and appendonlydir/)"
    );
    Ok(())
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
            let _ = s.write_all(&answer);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let _ = io::copy(&mut s, &mut io::sink());
        });
        let url = Secret::new(format!("redis://127.0.0.1:{port}"));
        let r = probe_blocking(&url, Duration::from_secs(10));
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

    #[test]
    fn eof_framing_stops_at_the_mark() {
        let mark = [b'x'; 40];
        let mut mark2 = mark;
        mark2[0] = b'y';
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = body.clone();
        wire.extend_from_slice(&mark2);
        wire.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        // Small reads put the mark across read boundaries.
        struct Dribble(io::Cursor<Vec<u8>>);
        impl Read for Dribble {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(7);
                self.0.read(&mut b[..n])
            }
        }
        let mut p = Payload::new(Dribble(io::Cursor::new(wire)), Framing::Mark(mark2));
        let mut got = Vec::new();
        p.read_to_end(&mut got).unwrap();
        assert_eq!(got, body);

        // Whole-buffer reads with the mark across the first read's end, or just after it.
        for len in [
            PAYLOAD_READ - 41,
            PAYLOAD_READ - 20,
            PAYLOAD_READ - 1,
            PAYLOAD_READ + 3,
        ] {
            let body: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
            let mut wire = body.clone();
            wire.extend_from_slice(&mark2);
            wire.extend_from_slice(b"+PING\r\n");
            let mut p = Payload::new(io::Cursor::new(wire), Framing::Mark(mark2));
            let mut got = Vec::new();
            p.read_to_end(&mut got).unwrap();
            assert!(got == body, "body of {len} bytes: got {}", got.len());
        }

        let mut p = Payload::new(io::Cursor::new(body[..10].to_vec()), Framing::Mark(mark));
        assert!(
            p.read_to_end(&mut Vec::new()).is_err(),
            "no mark: cut short"
        );
        let mut p = Payload::new(io::Cursor::new(body.clone()), Framing::Length(100));
        let mut got = Vec::new();
        p.read_to_end(&mut got).unwrap();
        assert_eq!(got, body[..100]);
    }

    /// A cancelled job's reads fail with an error the RDB reader does not retry (it retries
    /// EINTR): a deep verify stopped by a signal ends instead of spinning.
    #[test]
    fn a_cancelled_read_ends_the_parse() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rdb = b"REDIS0011\xfe\x00\x00\x01k\x01v";
            let opts = rdb::ParseOptions {
                decode_values: true,
                capture_payload: false,
            };
            let input = Cancellable {
                inner: &rdb[..],
                cancel: &cancel,
            };
            let r = rdb::read(input, &opts, &mut rdb::CountOnly, false);
            let _ = tx.send(r.is_err());
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "the parse of a cancelled read did not end with an error"
        );
    }

    /// Whatever the sizes of the caller's reads and of the socket's deliveries, the diskless
    /// framing hands out exactly the bytes before the end mark: through its own buffer for
    /// small reads, straight into the caller's buffer for large ones, and mixing the two.
    #[test]
    fn eof_framing_is_exact_for_every_read_size() {
        struct Trickle {
            data: io::Cursor<Vec<u8>>,
            most: usize,
        }
        impl Read for Trickle {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(self.most);
                self.data.read(&mut b[..n])
            }
        }
        let mark = [b'm'; 40];
        for len in [0, 1, 39, 40, 41, 4095, 70_000, PAYLOAD_READ + 3] {
            let body: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
            let mut wire = body.clone();
            wire.extend_from_slice(&mark);
            wire.extend_from_slice(b"+after");
            for most in [1, 13, 4096, 1 << 20] {
                for reads in [&[7][..], &[5000], &[1 << 20], &[3, 9000, 40, 70_000, 1]] {
                    let mut p = Payload::new(
                        Trickle {
                            data: io::Cursor::new(wire.clone()),
                            most,
                        },
                        Framing::Mark(mark),
                    );
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 1 << 20];
                    for i in 0.. {
                        let size = reads[i % reads.len()];
                        let n = p.read(&mut buf[..size]).unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert!(
                        got == body,
                        "{len} bytes delivered {most} at a time, read {reads:?}: got {}",
                        got.len()
                    );
                }
            }
        }
    }
}
