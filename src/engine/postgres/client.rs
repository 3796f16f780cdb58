//! A frontend/backend protocol connection: TLS as `sslmode` asks (SSLRequest, then rustls on
//! the same socket), startup, authentication (trust, cleartext, md5, SCRAM-SHA-256), simple
//! queries. Message encoding and the SCRAM exchange come from `postgres-protocol`; the message
//! loop is ours (a few dozen lines over a tokio socket, where a full client library would
//! bring a connection pool and type system we do not use).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;

use super::{PgConfig, SslMode};
use crate::error::{Error, Result};

/// SSLRequest: length 8, then the code 1234 5679 that no protocol version uses.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A backend message larger than this is not PostgreSQL talking (its own limit for most
/// messages is 1 GB; ours is the CopyData chunks of a base backup, well under it).
const MAX_MESSAGE: usize = 1 << 30;

/// One backend message: its type byte and body.
pub(super) struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

/// A server error or notice: its fields by code (`C` SQLSTATE, `M` message, `S` severity).
#[derive(Debug, Clone)]
pub(super) struct ServerError {
    pub code: String,
    pub message: String,
}

impl ServerError {
    fn parse(body: &[u8]) -> ServerError {
        let mut code = String::new();
        let mut message = String::new();
        let mut rest = body;
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match field {
                b'C' => code = value,
                b'M' => message = value,
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        ServerError { code, message }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)
    }
}

/// The socket, plain or TLS: every message of a session goes through it, so health, `wait`
/// and the replication connection of a base backup all work over either.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// What one connection attempt puts on the wire first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// The startup message in plain text.
    Plain,
    /// SSLRequest; TLS if the server says 'S', refused if it says 'N'.
    Tls,
    /// SSLRequest; TLS if the server says 'S', plain text on the same socket if 'N'.
    TlsOrPlain,
}

/// How far a failed attempt got, which decides whether `allow` and `prefer` try again.
enum Failed {
    /// Before TLS, or without it.
    Plain(Error),
    /// The server answered 'N' to the SSLRequest of `Wire::Tls`.
    NoTls(Error),
    /// In the TLS handshake, or over TLS.
    Tls(Error),
}

impl From<Failed> for Error {
    fn from(f: Failed) -> Error {
        match f {
            Failed::Plain(e) | Failed::NoTls(e) | Failed::Tls(e) => e,
        }
    }
}

pub(super) struct Conn {
    io: BufReader<Stream>,
    pub params: BTreeMap<String, String>,
    cfg: PgConfig,
    /// Bytes `read_cancel_safe` has read past its last whole message.
    pending: BytesMut,
}

impl Conn {
    /// Connects, negotiates TLS as `sslmode` says, sends the startup message and
    /// authenticates, bounded by `timeout`. `replication` opens a physical replication
    /// connection (`replication=true`).
    pub async fn connect(cfg: &PgConfig, timeout: Duration, replication: bool) -> Result<Conn> {
        match tokio::time::timeout(timeout, Self::connect_inner(cfg, replication)).await {
            Ok(r) => r,
            Err(_) => Err(cfg.unreachable(format!(
                "no answer to the {} within {timeout:?} (is this a PostgreSQL port?)",
                if cfg.ssl == SslMode::Disable {
                    "startup message"
                } else {
                    "TLS request or the startup message"
                }
            ))),
        }
    }

    /// libpq's order of attempts: `allow` tries plain text first and TLS when the server
    /// refuses that; `prefer` takes TLS when offered and tries plain text again when the
    /// handshake, or the server over TLS, refuses.
    async fn connect_inner(cfg: &PgConfig, replication: bool) -> Result<Conn> {
        match cfg.ssl {
            SslMode::Disable => Ok(Self::attempt(cfg, replication, Wire::Plain).await?),
            SslMode::Allow => match Self::attempt(cfg, replication, Wire::Plain).await {
                Err(Failed::Plain(first @ Error::Refused { .. })) => {
                    tracing::debug!(engine = super::ENGINE, error = %first, "refused in plain text; trying TLS (sslmode=allow)");
                    match Self::attempt(cfg, replication, Wire::Tls).await {
                        Ok(c) => Ok(c),
                        Err(Failed::NoTls(_)) => Err(first),
                        Err(second) => {
                            Err(both(("in plain text", first), ("over TLS", second.into())))
                        }
                    }
                }
                r => Ok(r?),
            },
            SslMode::Prefer => match Self::attempt(cfg, replication, Wire::TlsOrPlain).await {
                Err(Failed::Tls(e @ Error::Refused { .. })) => {
                    tracing::debug!(engine = super::ENGINE, error = %e, "refused over TLS; trying plain text (sslmode=prefer)");
                    match Self::attempt(cfg, replication, Wire::Plain).await {
                        Ok(c) => Ok(c),
                        Err(second) => Err(both(("over TLS", e), ("in plain text", second.into()))),
                    }
                }
                r => Ok(r?),
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                Ok(Self::attempt(cfg, replication, Wire::Tls).await?)
            }
        }
    }

    async fn attempt(
        cfg: &PgConfig,
        replication: bool,
        wire: Wire,
    ) -> std::result::Result<Conn, Failed> {
        let mut tcp = TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|e| Failed::Plain(cfg.unreachable(format!("connect: {e}"))))?;
        let _ = tcp.set_nodelay(true);
        let stream = match wire {
            Wire::Plain => Stream::Plain(tcp),
            Wire::Tls | Wire::TlsOrPlain => {
                match negotiate(cfg, &mut tcp).await.map_err(Failed::Plain)? {
                    true => Stream::Tls(Box::new(handshake(cfg, tcp).await.map_err(Failed::Tls)?)),
                    false if wire == Wire::TlsOrPlain => Stream::Plain(tcp),
                    false => return Err(Failed::NoTls(no_tls(cfg))),
                }
            }
        };
        let tls = matches!(stream, Stream::Tls(_));
        let fail = |e| {
            if tls {
                Failed::Tls(e)
            } else {
                Failed::Plain(e)
            }
        };
        let mut c = Conn {
            io: BufReader::with_capacity(256 << 10, stream),
            params: BTreeMap::new(),
            cfg: cfg.clone(),
            pending: BytesMut::new(),
        };
        c.startup(replication).await.map_err(fail)?;
        Ok(c)
    }

    async fn startup(&mut self, replication: bool) -> Result<()> {
        let mut buf = BytesMut::new();
        let cfg = &self.cfg;
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("application_name", "dbkeeper"),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "true"));
        }
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| cfg.refused(format!("startup message: {e}")))?;
        self.send(&buf).await?;
        self.authenticate().await?;
        // ParameterStatus, BackendKeyData, then ReadyForQuery.
        loop {
            let m = self.read().await?;
            match m.tag {
                b'Z' => return Ok(()),
                b'S' => self.param(&m.body),
                b'E' => return Err(self.server_error(&m.body)),
                _ => {}
            }
        }
    }

    fn param(&mut self, body: &[u8]) {
        let mut parts = body.split(|&b| b == 0);
        if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
            self.params.insert(
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            );
        }
    }

    async fn authenticate(&mut self) -> Result<()> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.read_first().await?;
            match m.tag {
                b'R' => {}
                b'E' => return Err(self.server_error(&m.body)),
                // NegotiateProtocolVersion: a minor version or option we did not ask for.
                b'v' => continue,
                other => {
                    return Err(self.cfg.refused(format!(
                        "answered the startup message with {:?}: not a PostgreSQL server",
                        other as char
                    )));
                }
            }
            if m.body.len() < 4 {
                return Err(self.cfg.refused("short authentication message"));
            }
            let code = i32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
            let data = &m.body[4..];
            let mut buf = BytesMut::new();
            match code {
                0 => return Ok(()),
                3 => {
                    let pw = self.password()?;
                    frontend::password_message(pw.as_bytes(), &mut buf).map_err(|e| self.io(e))?;
                }
                5 => {
                    let pw = self.password()?;
                    let salt: [u8; 4] = data
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or_else(|| self.cfg.refused("md5 request without a salt"))?;
                    let hash = md5_hash(self.cfg.user.as_bytes(), pw.as_bytes(), salt);
                    frontend::password_message(hash.as_bytes(), &mut buf)
                        .map_err(|e| self.io(e))?;
                }
                10 => {
                    let offered: Vec<&[u8]> =
                        data.split(|&b| b == 0).filter(|s| !s.is_empty()).collect();
                    if !offered.contains(&SCRAM_SHA_256.as_bytes()) {
                        return Err(self.cfg.refused(format!(
                            "the server offers SASL mechanisms {:?}; only {SCRAM_SHA_256} is supported",
                            offered
                                .iter()
                                .map(|s| String::from_utf8_lossy(s))
                                .collect::<Vec<_>>()
                        )));
                    }
                    let pw = self.password()?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut buf)
                        .map_err(|e| self.io(e))?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.cfg.refused("SASL continue before SASL start"))?;
                    s.update(data)
                        .map_err(|e| self.cfg.refused(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut buf).map_err(|e| self.io(e))?;
                }
                12 => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.cfg.refused("SASL final before SASL start"))?;
                    s.finish(data).map_err(|e| {
                        self.cfg
                            .refused(format!("SCRAM: the server's signature is wrong: {e}"))
                    })?;
                    continue;
                }
                other => {
                    return Err(self.cfg.refused(format!(
                        "authentication method {other} is not supported (trust, password, md5 and scram-sha-256 are)"
                    )));
                }
            }
            self.send(&buf).await?;
        }
    }

    fn password(&self) -> Result<String> {
        match &self.cfg.password {
            Some(p) => Ok(p.expose().to_owned()),
            None => Err(self.cfg.refused(
                "the server asks for a password; put it in the URL (postgres://user:PASSWORD@host/db)",
            )),
        }
    }

    fn eof_or_io(&self, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            self.cfg
                .unreachable("the server closed the connection in the middle of a message")
        } else {
            self.io(e)
        }
    }

    fn io(&self, e: std::io::Error) -> Error {
        self.cfg.unreachable(e.to_string())
    }

    /// The error a server sent, classified: "not yet" states are `Unreachable`, the rest
    /// (credentials, unknown database, no pg_hba.conf entry) `Refused`.
    pub fn server_error(&self, body: &[u8]) -> Error {
        let e = ServerError::parse(body);
        classify(&self.cfg, &e)
    }

    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        // TLS holds written records until flushed.
        let w = self.io.get_mut();
        let r = match w.write_all(buf).await {
            Ok(()) => w.flush().await,
            Err(e) => Err(e),
        };
        r.map_err(|e| self.io(e))
    }

    /// The first answer of a connection: also tells a server of another protocol.
    async fn read_first(&mut self) -> Result<Msg> {
        let mut tag = [0u8; 1];
        match self.io.read_exact(&mut tag).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.cfg.unreachable(
                    "closed the connection on the startup message (shutting down, or not a PostgreSQL server)",
                ));
            }
            Err(e) => return Err(self.io(e)),
        }
        if !matches!(tag[0], b'R' | b'E' | b'v') {
            return Err(self.cfg.refused(format!(
                "answered the startup message with {:?}: not a PostgreSQL server",
                String::from_utf8_lossy(&tag)
            )));
        }
        self.read_body(tag[0]).await
    }

    /// As `read`, but cancel-safe: what a cancelled call read stays for the next, so the call
    /// can race a timer in `select!` (the WAL stream, which also sends while it waits).
    /// Once used, use only this on the connection.
    pub async fn read_cancel_safe(&mut self) -> Result<Msg> {
        loop {
            if self.pending.len() >= 5 {
                let len = u32::from_be_bytes([
                    self.pending[1],
                    self.pending[2],
                    self.pending[3],
                    self.pending[4],
                ]) as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(self.cfg.refused(format!(
                        "message {:?} of length {len}: not a PostgreSQL server",
                        self.pending[0] as char
                    )));
                }
                if self.pending.len() > len {
                    let m = self.pending.split_to(1 + len);
                    return Ok(Msg {
                        tag: m[0],
                        body: m[5..].to_vec(),
                    });
                }
            }
            let n = self
                .io
                .read_buf(&mut self.pending)
                .await
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(self.cfg.unreachable("the server closed the connection"));
            }
        }
    }

    pub async fn read(&mut self) -> Result<Msg> {
        let mut tag = [0u8; 1];
        self.io.read_exact(&mut tag).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.cfg.unreachable("the server closed the connection")
            } else {
                self.io(e)
            }
        })?;
        self.read_body(tag[0]).await
    }

    async fn read_body(&mut self, tag: u8) -> Result<Msg> {
        let mut len = [0u8; 4];
        self.io
            .read_exact(&mut len)
            .await
            .map_err(|e| self.eof_or_io(e))?;
        let len = u32::from_be_bytes(len) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(self.cfg.refused(format!(
                "message {:?} of length {len}: not a PostgreSQL server",
                tag as char
            )));
        }
        let mut body = vec![0u8; len - 4];
        self.io
            .read_exact(&mut body)
            .await
            .map_err(|e| self.eof_or_io(e))?;
        Ok(Msg { tag, body })
    }

    /// A simple query: the rows of its (last) result as text, NULL as `None`.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).map_err(|e| self.io(e))?;
        self.send(&buf).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let m = self.read().await?;
            match m.tag {
                b'T' => rows.clear(),
                b'D' => rows.push(
                    parse_row(&m.body)
                        .ok_or_else(|| self.cfg.refused("malformed DataRow from the server"))?,
                ),
                b'E' => err = Some(self.server_error(&m.body)),
                b'S' => self.param(&m.body),
                b'Z' => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn terminate(mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.send(&buf).await;
        // close_notify, so the server does not log a connection lost.
        let _ = self.io.get_mut().shutdown().await;
    }
}

fn no_tls(cfg: &PgConfig) -> Error {
    cfg.refused(format!(
        "the server does not accept TLS connections (it answered 'N' to the TLS request: ssl = off); sslmode={} needs them",
        cfg.ssl.name()
    ))
}

/// The error of a second attempt after a refused first, in one line: each can be the one that
/// says what is wrong (a wrong password over TLS, no pg_hba.conf entry in plain text).
fn both(first: (&str, Error), second: (&str, Error)) -> Error {
    match (first, second) {
        (
            (how1, Error::Refused { message: m1, .. }),
            (
                how2,
                Error::Refused {
                    engine,
                    url,
                    message: m2,
                },
            ),
        ) => Error::Refused {
            engine,
            url,
            message: format!("{how1}: {m1}; {how2}: {m2}"),
        },
        (_, (_, e)) => e,
    }
}

/// Sends SSLRequest and reads the one-byte answer: whether the server goes on in TLS. The
/// byte is read straight from the socket: whatever follows it belongs to the handshake, and
/// bytes the server sent before the handshake must not be read as if they came over TLS.
async fn negotiate(cfg: &PgConfig, tcp: &mut TcpStream) -> Result<bool> {
    let io = |e: std::io::Error| cfg.unreachable(format!("TLS request: {e}"));
    tcp.write_all(&SSL_REQUEST).await.map_err(io)?;
    let mut answer = [0u8; 1];
    match tcp.read_exact(&mut answer).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(cfg.unreachable(
                "closed the connection on the TLS request (shutting down, or not a PostgreSQL server)",
            ));
        }
        Err(e) => return Err(io(e)),
    }
    match answer[0] {
        b'S' => Ok(true),
        b'N' => Ok(false),
        // A server that fails before it looks at the request (e.g. too many connections)
        // answers with an error message.
        b'E' => {
            let mut len = [0u8; 4];
            tcp.read_exact(&mut len).await.map_err(io)?;
            let len = u32::from_be_bytes(len) as usize;
            if !(4..=1 << 16).contains(&len) {
                return Err(
                    cfg.refused("answered the TLS request with 'E': not a PostgreSQL server")
                );
            }
            let mut body = vec![0u8; len - 4];
            tcp.read_exact(&mut body).await.map_err(io)?;
            Err(classify(cfg, &ServerError::parse(&body)))
        }
        other => Err(cfg.refused(format!(
            "answered the TLS request with {:?}: not a PostgreSQL server",
            String::from_utf8_lossy(&[other])
        ))),
    }
}

/// The TLS handshake on the socket the server said 'S' on. A certificate the configuration
/// does not accept, or a handshake the server ends, is refused: retrying will not help.
async fn handshake(
    cfg: &PgConfig,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let Some(setup) = &cfg.tls else {
        return Err(cfg.refused("TLS is off (sslmode=disable)"));
    };
    // Checked to be valid when the URL was parsed.
    let name = rustls::pki_types::ServerName::try_from(cfg.host.clone())
        .map_err(|e| cfg.refused(format!("TLS: {}: {e}", cfg.host)))?;
    let connector = tokio_rustls::TlsConnector::from(setup.config.clone());
    connector.connect(name, tcp).await.map_err(|e| {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(
                tls @ rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                ),
            ) => cfg.refused(format!(
                "TLS: the server's certificate is not for host {} (sslmode=verify-full checks the name; verify-ca does not): {tls}",
                cfg.host
            )),
            Some(tls @ rustls::Error::InvalidCertificate(_)) => cfg.refused(format!(
                "TLS: the server's certificate does not verify against {} (sslmode={}): {tls}",
                setup.trust.unwrap_or("nothing"),
                cfg.ssl.name(),
            )),
            Some(tls) => cfg.refused(format!("TLS: {tls}")),
            None if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                cfg.unreachable("the server closed the connection in the TLS handshake")
            }
            None => cfg.unreachable(format!("TLS handshake: {e}")),
        }
    })
}

pub(super) fn classify(cfg: &PgConfig, e: &ServerError) -> Error {
    match e.code.as_str() {
        // cannot_connect_now (starting up, shutting down, in recovery), admin/crash shutdown,
        // too many connections.
        "57P03" | "57P01" | "57P02" | "53300" | "53000" => cfg.unreachable(e.to_string()),
        "28P01" => cfg.refused(format!("{e}: wrong password")),
        _ => cfg.refused(e.to_string()),
    }
}

fn parse_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body.get(at..at + 4)?.try_into().ok()?);
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let end = at + len as usize;
            row.push(Some(
                String::from_utf8_lossy(body.get(at..end)?).into_owned(),
            ));
            at = end;
        }
    }
    Some(row)
}
