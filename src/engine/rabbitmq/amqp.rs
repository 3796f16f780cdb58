//! The AMQP 0-9-1 connection handshake, as far as a readiness check needs it: protocol header,
//! `Connection.Start` / `Start-Ok` (PLAIN), `Tune` / `Tune-Ok`, `Open` / `Open-Ok` on the
//! URL's virtual host, then `Close` / `Close-Ok`, so the broker logs an ordinary client that
//! came and left.
//!
//! Written by hand: the handshake is six method frames on channel 0, and the maintained codec
//! (`amq-protocol`, lapin's) brings the whole generated protocol with its parser and serializer
//! crates into a binary that runs in every container's healthcheck. Only what these frames
//! carry is encoded; every other frame is an error.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// `Connection` class and the methods of it we send or read.
const CONNECTION: u16 = 10;
const START: u16 = 10;
const START_OK: u16 = 11;
const TUNE: u16 = 30;
const TUNE_OK: u16 = 31;
const OPEN: u16 = 40;
const OPEN_OK: u16 = 41;
const CLOSE: u16 = 50;
const CLOSE_OK: u16 = 51;

const FRAME_METHOD: u8 = 1;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Before `Tune` the frame size is not agreed; the spec's minimum is 4096, RabbitMQ's `Start`
/// is well under it. A larger claim is not an AMQP peer.
const MAX_HANDSHAKE_FRAME: u32 = 128 * 1024;

/// What the broker said about itself in `Connection.Start`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub product: Option<String>,
    pub version: Option<String>,
    pub cluster_name: Option<String>,
}

/// How a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed or closed: the broker may be starting or gone; retrying may help.
    Io(io::Error),
    /// The peer answered, but not as an AMQP 0-9-1 broker.
    NotAmqp(String),
    /// The broker closed the connection with a reply code (403 ACCESS_REFUSED, 530 NOT_ALLOWED
    /// for a vhost, …) and text.
    Closed(u16, String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// Runs the handshake over `s` (a TCP or TLS stream with timeouts set) as `user` into `vhost`.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    user: &str,
    password: &str,
    vhost: &str,
    deadline: Instant,
) -> Result<ServerInfo, HandshakeError> {
    s.write_all(b"AMQP\x00\x00\x09\x01")?;
    s.flush()?;
    let start = read_method(s, deadline)?;
    let info = parse_start(&start)?;

    let mut caps = Vec::new();
    put_table_bool(&mut caps, "authentication_failure_close", true);
    let mut props = Vec::new();
    put_table_str(&mut props, "product", "dbkeeper");
    put_table_str(&mut props, "version", env!("CARGO_PKG_VERSION"));
    put_table_entry_table(&mut props, "capabilities", &caps);
    let mut args = Vec::new();
    put_table(&mut args, &props);
    put_shortstr(&mut args, "PLAIN")?;
    let mut response = Vec::with_capacity(user.len() + password.len() + 2);
    response.push(0);
    response.extend_from_slice(user.as_bytes());
    response.push(0);
    response.extend_from_slice(password.as_bytes());
    put_longstr(&mut args, &response);
    put_shortstr(&mut args, "en_US")?;
    write_method(s, START_OK, &args)?;

    let tune = read_method(s, deadline)?;
    let (channel_max, frame_max, _heartbeat) = parse_tune(&tune)?;
    let mut args = Vec::new();
    args.extend_from_slice(&channel_max.to_be_bytes());
    args.extend_from_slice(&frame_max.to_be_bytes());
    args.extend_from_slice(&0u16.to_be_bytes());
    write_method(s, TUNE_OK, &args)?;

    let mut args = Vec::new();
    put_shortstr(&mut args, vhost)?;
    put_shortstr(&mut args, "")?;
    args.push(0);
    write_method(s, OPEN, &args)?;
    let open_ok = read_method(s, deadline)?;
    expect(&open_ok, OPEN_OK, "Connection.Open-Ok")?;

    // Reply 200, no text, no failing class/method.
    let mut args = Vec::new();
    args.extend_from_slice(&200u16.to_be_bytes());
    put_shortstr(&mut args, "")?;
    args.extend_from_slice(&[0, 0, 0, 0]);
    write_method(s, CLOSE, &args)?;
    // The Close-Ok is a courtesy: the handshake already succeeded.
    let _ = read_method(s, deadline);
    Ok(info)
}

/// One method frame on channel 0: (method id, arguments). A `Connection.Close` from the
/// broker becomes `Closed` (after we answer it with `Close-Ok`); heartbeats are skipped.
fn read_method<S: Read + Write>(
    s: &mut S,
    deadline: Instant,
) -> Result<(u16, Vec<u8>), HandshakeError> {
    loop {
        if Instant::now() > deadline {
            return Err(HandshakeError::Io(io::ErrorKind::TimedOut.into()));
        }
        let mut head = [0u8; 7];
        read_exact(s, &mut head, true)?;
        if &head[..4] == b"AMQP" {
            // A broker that speaks another protocol version answers with its own header.
            return Err(HandshakeError::NotAmqp(format!(
                "the server asks for another AMQP protocol ({}-{}-{}), not 0-9-1",
                head[4], head[5], head[6]
            )));
        }
        let kind = head[0];
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
        if !matches!(kind, FRAME_METHOD | FRAME_HEARTBEAT) || size > MAX_HANDSHAKE_FRAME {
            return Err(not_amqp(&head));
        }
        let mut payload = vec![0u8; size as usize + 1];
        read_exact(s, &mut payload, false)?;
        if payload.pop() != Some(FRAME_END) {
            return Err(not_amqp(&head));
        }
        if kind == FRAME_HEARTBEAT {
            continue;
        }
        if payload.len() < 4 {
            return Err(HandshakeError::NotAmqp("a method frame too short".into()));
        }
        let class = u16::from_be_bytes([payload[0], payload[1]]);
        let method = u16::from_be_bytes([payload[2], payload[3]]);
        if class != CONNECTION {
            return Err(HandshakeError::NotAmqp(format!(
                "method {class}.{method} during the connection handshake"
            )));
        }
        let args = payload.split_off(4);
        if method == CLOSE {
            let mut c = Cursor::new(&args);
            let code = c.u16()?;
            let text = c.shortstr()?;
            let _ = write_method(s, CLOSE_OK, &[]);
            return Err(HandshakeError::Closed(code, text));
        }
        return Ok((method, args));
    }
}

fn not_amqp(head: &[u8]) -> HandshakeError {
    let shown: String = head
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    HandshakeError::NotAmqp(format!(
        "the server did not answer as an AMQP broker (it sent {shown:?})"
    ))
}

/// `read_exact`, with an end of stream as `UnexpectedEof` (the broker closed the socket: during
/// start-up, or after refusing a client that cannot be told why).
fn read_exact<S: Read>(s: &mut S, buf: &mut [u8], first: bool) -> Result<(), HandshakeError> {
    match s.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && first => {
            Err(HandshakeError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the broker closed the connection without a word",
            )))
        }
        Err(e) => Err(HandshakeError::Io(e)),
    }
}

fn write_method<S: Write>(s: &mut S, method: u16, args: &[u8]) -> io::Result<()> {
    let size = (args.len() + 4) as u32;
    let mut f = Vec::with_capacity(args.len() + 12);
    f.push(FRAME_METHOD);
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&size.to_be_bytes());
    f.extend_from_slice(&CONNECTION.to_be_bytes());
    f.extend_from_slice(&method.to_be_bytes());
    f.extend_from_slice(args);
    f.push(FRAME_END);
    s.write_all(&f)?;
    s.flush()
}

fn expect(m: &(u16, Vec<u8>), want: u16, name: &str) -> Result<(), HandshakeError> {
    if m.0 == want {
        Ok(())
    } else {
        Err(HandshakeError::NotAmqp(format!(
            "expected {name}, got method 10.{}",
            m.0
        )))
    }
}

fn parse_start(m: &(u16, Vec<u8>)) -> Result<ServerInfo, HandshakeError> {
    expect(m, START, "Connection.Start")?;
    let mut c = Cursor::new(&m.1);
    let (major, minor) = (c.u8()?, c.u8()?);
    if (major, minor) != (0, 9) {
        return Err(HandshakeError::NotAmqp(format!(
            "the server speaks AMQP {major}-{minor}, not 0-9-1"
        )));
    }
    let mut info = ServerInfo::default();
    let table = c.table()?;
    let mut t = Cursor::new(table);
    while !t.done() {
        let name = t.shortstr()?;
        let kind = t.u8()?;
        if kind == b'S' {
            let v = String::from_utf8_lossy(t.longstr()?).into_owned();
            match name.as_str() {
                "product" => info.product = Some(v),
                "version" => info.version = Some(v),
                "cluster_name" => info.cluster_name = Some(v),
                _ => {}
            }
        } else {
            t.skip_value(kind)?;
        }
    }
    let mechanisms = String::from_utf8_lossy(c.longstr()?).into_owned();
    if !mechanisms.split_whitespace().any(|m| m == "PLAIN") {
        return Err(HandshakeError::NotAmqp(format!(
            "the broker offers no PLAIN authentication (only {mechanisms})"
        )));
    }
    Ok(info)
}

fn parse_tune(m: &(u16, Vec<u8>)) -> Result<(u16, u32, u16), HandshakeError> {
    expect(m, TUNE, "Connection.Tune")?;
    let mut c = Cursor::new(&m.1);
    Ok((c.u16()?, c.u32()?, c.u16()?))
}

fn put_shortstr(out: &mut Vec<u8>, s: &str) -> io::Result<()> {
    let len = u8::try_from(s.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a name longer than 255 bytes cannot be sent",
        )
    })?;
    out.push(len);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_longstr(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_table(out: &mut Vec<u8>, entries: &[u8]) {
    put_longstr(out, entries);
}

fn put_key(out: &mut Vec<u8>, k: &str) {
    out.push(k.len() as u8);
    out.extend_from_slice(k.as_bytes());
}

fn put_table_str(out: &mut Vec<u8>, k: &str, v: &str) {
    put_key(out, k);
    out.push(b'S');
    put_longstr(out, v.as_bytes());
}

fn put_table_bool(out: &mut Vec<u8>, k: &str, v: bool) {
    put_key(out, k);
    out.push(b't');
    out.push(v as u8);
}

fn put_table_entry_table(out: &mut Vec<u8>, k: &str, entries: &[u8]) {
    put_key(out, k);
    out.push(b'F');
    put_table(out, entries);
}

/// A reader over a frame's arguments; running short is a malformed frame.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b }
    }
    fn done(&self) -> bool {
        self.b.is_empty()
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.b.len() < n {
            return Err(HandshakeError::NotAmqp(
                "a truncated field in a method frame".into(),
            ));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, HandshakeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HandshakeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, HandshakeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn shortstr(&mut self) -> Result<String, HandshakeError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn longstr(&mut self) -> Result<&'a [u8], HandshakeError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn table(&mut self) -> Result<&'a [u8], HandshakeError> {
        self.longstr()
    }
    /// Skips one field value of type `kind` (the 0-9-1 field types as RabbitMQ encodes them).
    fn skip_value(&mut self, kind: u8) -> Result<(), HandshakeError> {
        let n = match kind {
            b't' | b'b' | b'B' => 1,
            b's' | b'u' => 2,
            b'I' | b'i' | b'f' => 4,
            b'l' | b'd' | b'T' => 8,
            b'D' => 5,
            b'V' => 0,
            b'S' | b'x' | b'F' => {
                self.longstr()?;
                return Ok(());
            }
            b'A' => {
                let mut a = Cursor::new(self.longstr()?);
                while !a.done() {
                    let k = a.u8()?;
                    a.skip_value(k)?;
                }
                return Ok(());
            }
            other => {
                return Err(HandshakeError::NotAmqp(format!(
                    "an unknown field type {:?} in Connection.Start",
                    other as char
                )));
            }
        };
        self.take(n)?;
        Ok(())
    }
}

/// Timeouts for a blocking stream, from what is left of `deadline`.
pub fn remaining(deadline: Instant) -> Option<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    Some(left.max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ok_and_friends_encode_and_start_parses() {
        // A Connection.Start as RabbitMQ sends it (trimmed): 0-9, a table with a nested
        // table, a bool and strings, the mechanisms and locales.
        let mut caps = Vec::new();
        put_table_bool(&mut caps, "publisher_confirms", true);
        let mut props = Vec::new();
        put_table_entry_table(&mut props, "capabilities", &caps);
        put_table_str(&mut props, "product", "RabbitMQ");
        put_table_str(&mut props, "version", "3.10.8");
        let mut args = vec![0, 9];
        put_table(&mut args, &props);
        put_longstr(&mut args, b"AMQPLAIN PLAIN");
        put_longstr(&mut args, b"en_US");
        let info = parse_start(&(START, args)).unwrap();
        assert_eq!(info.product.as_deref(), Some("RabbitMQ"));
        assert_eq!(info.version.as_deref(), Some("3.10.8"));
    }

    #[test]
    fn other_protocols_are_not_amqp() {
        let mut http: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\r\n";
        let mut s = ReadWrite(&mut http, Vec::new());
        let e = handshake(
            &mut s,
            "u",
            "p",
            "/",
            Instant::now() + Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, HandshakeError::NotAmqp(_)), "{e:?}");
        let mut newer: &[u8] = b"AMQP\x00\x01\x00\x00";
        let mut s = ReadWrite(&mut newer, Vec::new());
        let e = handshake(
            &mut s,
            "u",
            "p",
            "/",
            Instant::now() + Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(e, HandshakeError::NotAmqp(_)), "{e:?}");
    }

    struct ReadWrite<'a>(&'a mut &'a [u8], Vec<u8>);
    impl Read for ReadWrite<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for ReadWrite<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
