//! A minimal RESP2 client on a std socket, plain or TLS.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::engine::net::ConnectError;
use crate::error::{Error, Result};

use super::*;

// A minimal RESP2 client on a std socket. Written by hand because the two paths that use it
// cannot use a client library: the health probe must start nothing heavy (no runtime, one
// round trip), and the snapshot reads the raw replication stream, which no client exposes.

#[derive(Debug)]
pub(super) enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

pub(super) const MAX_LINE: usize = 64 * 1024;
/// Replies this module reads are small (INFO, CONFIG GET); a bigger one is not ours.
pub(super) const MAX_BULK: i64 = 64 << 20;
/// Nested arrays deeper than this are not a reply of the commands this module sends.
const MAX_DEPTH: usize = 32;

/// A plain or TLS connection; writes go through the `BufReader`, which buffers reads only.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    pub(super) fn tcp(&self) -> &TcpStream {
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
pub(super) fn tls_client_config(cfg: &RedisConfig) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use crate::engine::tls::{ClientCert, Verify, client_config, system_roots};
    let roots = system_roots().ok_or_else(|| {
        cfg.refused("rediss://: no trusted CA certificate found; set SSL_CERT_FILE to a PEM bundle")
    })?;
    let cert = match &cfg.client_auth {
        None => None,
        // Both parse: `ClientAuth::load` checked them at start-up.
        Some(auth) => Some(ClientCert::from_pem(&auth.cert_pem, &auth.key_pem).map_err(
            |(which, why)| {
                let name = [
                    "DBKEEPER_REDIS_TLS_CERT_FILE",
                    "DBKEEPER_REDIS_TLS_KEY_FILE",
                ];
                Error::config(format!("{}: {why}", name[usize::from(which)]))
            },
        )?),
    };
    client_config(Verify::Full(roots), cert)
        .map_err(|e| Error::config(format!("DBKEEPER_REDIS_TLS_CERT_FILE / _KEY_FILE: {e}")))
}

pub(super) fn tls_stream(cfg: &RedisConfig, tcp: TcpStream) -> Result<Stream> {
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| cfg.refused(format!("TLS: {} is not a valid server name: {e}", cfg.host)))?;
    let conn = rustls::ClientConnection::new(tls_client_config(cfg)?, name)
        .map_err(|e| cfg.refused(format!("TLS: {e}")))?;
    Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
}

pub(super) struct Conn<'a> {
    pub(super) cfg: &'a RedisConfig,
    pub(super) reader: BufReader<Stream>,
    pub(super) deadline: Option<Instant>,
}

pub(super) fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl<'a> Conn<'a> {
    /// Connects within `timeout`; every later read or write must also finish by then.
    pub(super) fn connect(cfg: &'a RedisConfig, timeout: Duration) -> Result<Self> {
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
    pub(super) fn arm(&mut self) -> Result<()> {
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

    pub(super) fn io_error(&self, e: io::Error) -> Error {
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
    pub(super) fn send(&mut self, cmds: &[&[&[u8]]]) -> Result<()> {
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

    pub(super) fn call(&mut self, args: &[&[u8]]) -> Result<Reply> {
        self.send(&[args])?;
        self.read_reply()
    }

    /// `AUTH` with the URL's credentials, if it has any.
    pub(super) fn auth_command(&self) -> Option<Vec<Vec<u8>>> {
        let pass = self.cfg.password.as_ref()?;
        let mut v = vec![b"AUTH".to_vec()];
        if let Some(u) = &self.cfg.username {
            v.push(u.as_bytes().to_vec());
        }
        v.push(pass.expose().as_bytes().to_vec());
        Some(v)
    }

    pub(super) fn auth(&mut self) -> Result<()> {
        if let Some(cmd) = self.auth_command() {
            let args: Vec<&[u8]> = cmd.iter().map(Vec::as_slice).collect();
            let reply = self.call(&args)?;
            self.check_auth(reply)?;
        }
        Ok(())
    }

    pub(super) fn check_auth(&self, reply: Reply) -> Result<()> {
        match reply {
            Reply::Error(e) => Err(self
                .cfg
                .refused(format!("authentication failed: {}", first_line(&e)))),
            _ => Ok(()),
        }
    }

    pub(super) fn read_line(&mut self) -> Result<Vec<u8>> {
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

    pub(super) fn not_redis(&self) -> Error {
        self.cfg
            .refused("not a Redis server (its answer is not the Redis protocol)")
    }

    pub(super) fn read_reply(&mut self) -> Result<Reply> {
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
    pub(super) fn bulk(&mut self, args: &[&[u8]]) -> Result<Vec<u8>> {
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
    pub(super) fn ok(&mut self, args: &[&[u8]]) -> Result<Reply> {
        match self.call(args)? {
            Reply::Error(e) => Err(server_error(args, &e)),
            r => Ok(r),
        }
    }
}

pub(super) fn cmd_name(args: &[&[u8]]) -> String {
    String::from_utf8_lossy(args.first().copied().unwrap_or(b"?")).into_owned()
}

pub(super) fn server_error(args: &[&[u8]], msg: &str) -> Error {
    Error::engine(ENGINE, format!("{}: {}", cmd_name(args), first_line(msg)))
}

pub(super) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// `field:value` from an INFO section.
pub(super) fn info_field<'t>(info: &'t str, field: &str) -> Option<&'t str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}
