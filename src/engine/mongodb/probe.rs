//! The `dbkeeper-health` probe for the common case (one host, no credentials, no TLS): one
//! `hello` in an `OP_MSG` over a plain socket, on the calling thread (and, for a replica-set
//! member, `replSetGetStatus` for its state and lag).
//!
//! Written by hand, not with the driver, because the driver's client (a runtime, topology
//! monitors, a pool) nearly doubles a probe's memory and start-up for one command, and this
//! runs every few seconds in every database container. Anything else (credentials, TLS, SRV,
//! several hosts, a load balancer) goes through the driver.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, Document, doc};
use mongodb::options::{HostInfo, ServerAddress, Tls};

use super::{ENGINE, MongoConfig};
use crate::engine::Probe;
use crate::engine::net::ConnectError;
use crate::error::{Error, Result};

const OP_MSG: i32 = 2013;
const DEFAULT_PORT: u16 = 27017;
/// Larger than any `hello` reply; a length beyond it means the peer is not a MongoDB server.
const MAX_REPLY: usize = 16 << 20;
/// `CommandNotFound`: a server older than 4.4.2 knows `hello` as `isMaster`.
const COMMAND_NOT_FOUND: i32 = 59;

/// The host and port to probe by hand, or `None` when the URI needs the driver.
pub(super) fn plain_target(cfg: &MongoConfig) -> Option<(String, u16)> {
    let c = &cfg.conn;
    if c.credential.is_some()
        || matches!(c.tls, Some(Tls::Enabled(_)))
        || c.load_balanced == Some(true)
    {
        return None;
    }
    match &c.host_info {
        HostInfo::HostIdentifiers(hosts) => match hosts.as_slice() {
            [ServerAddress::Tcp { host, port }] => {
                Some((host.clone(), port.unwrap_or(DEFAULT_PORT)))
            }
            _ => None,
        },
        _ => None,
    }
}

/// Connects and asks `hello` within `timeout`, and describes the member the way the driver
/// path does.
pub(super) fn probe_plain(
    cfg: &MongoConfig,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Probe> {
    let deadline = Instant::now() + timeout;
    let unreachable = |message: String| Error::Unreachable {
        engine: ENGINE,
        url: cfg.display.clone(),
        message,
    };
    let refused = |message: String| Error::Refused {
        engine: ENGINE,
        url: cfg.display.clone(),
        message,
    };
    let mut s = crate::engine::net::connect(host, port, deadline).map_err(|e| match e {
        ConnectError::Resolve(e) => unreachable(format!("cannot resolve {host}: {e}")),
        ConnectError::Timeout => unreachable(format!("no connection within {timeout:?}")),
        ConnectError::Refused(e) => unreachable(format!("cannot connect: {e}")),
        ConnectError::NoAddress => unreachable("no address to connect to".into()),
    })?;
    let mut exchange = |command: &str| -> Result<Document> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(unreachable(format!("no answer within {timeout:?}")));
        }
        s.set_read_timeout(Some(left))
            .and_then(|_| s.set_write_timeout(Some(left)))
            .map_err(|e| unreachable(format!("socket: {e}")))?;
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                unreachable(format!("no answer within {timeout:?}"))
            }
            std::io::ErrorKind::UnexpectedEof => {
                unreachable("the server closed the connection".into())
            }
            _ => unreachable(format!("connection lost: {e}")),
        };
        s.write_all(&op_msg(1, &doc! {command: 1, "$db": "admin"}))
            .map_err(io)?;
        let mut header = [0u8; 16];
        s.read_exact(&mut header).map_err(io)?;
        let (len, op) = (le_i32(&header[0..4]), le_i32(&header[12..16]));
        if op != OP_MSG || len < 21 || len as usize > MAX_REPLY {
            return Err(refused(format!(
                "not a MongoDB server: it answered {:?}",
                String::from_utf8_lossy(&header).trim_end()
            )));
        }
        let mut body = vec![0u8; len as usize - 16];
        s.read_exact(&mut body).map_err(io)?;
        reply_document(&body).ok_or_else(|| {
            refused("not a MongoDB server: an OP_MSG reply without a document".into())
        })
    };
    let mut hello = exchange("hello")?;
    if command_error(&hello).is_some_and(|(code, _)| code == COMMAND_NOT_FOUND) {
        hello = exchange("isMaster")?;
    }
    if let Some((code, msg)) = command_error(&hello) {
        return Err(unreachable(format!("hello failed ({code}): {msg}")));
    }
    // A member's state beyond what `hello` says, and its lag; refused without credentials
    // on a server with auth, then `hello` alone decides.
    let status = if hello.contains_key("setName") {
        exchange("replSetGetStatus")
            .ok()
            .and_then(|reply| super::replset::Status::parse(&reply))
    } else {
        None
    };
    super::replset::health(&hello, status.as_ref()).map_err(unreachable)
}

fn le_i32(b: &[u8]) -> i32 {
    i32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// An `OP_MSG` with one body section: header, flag bits, section kind 0, the document.
fn op_msg(request_id: i32, command: &Document) -> Vec<u8> {
    let mut body = Vec::new();
    command
        .to_writer(&mut body)
        .expect("a small document serializes");
    let len = 16 + 4 + 1 + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as i32).to_le_bytes());
    m.extend_from_slice(&request_id.to_le_bytes());
    m.extend_from_slice(&0i32.to_le_bytes());
    m.extend_from_slice(&OP_MSG.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.push(0);
    m.extend_from_slice(&body);
    m
}

/// The body section's document of an `OP_MSG` reply (after the header).
fn reply_document(body: &[u8]) -> Option<Document> {
    let (flags, rest) = body.split_at_checked(4)?;
    // checksumPresent: a CRC-32C trails the sections.
    let rest = if le_i32(flags) & 1 != 0 {
        rest.get(..rest.len().checked_sub(4)?)?
    } else {
        rest
    };
    let (&kind, doc) = rest.split_first()?;
    if kind != 0 {
        return None;
    }
    Document::from_reader(doc).ok()
}

/// `(code, message)` of a reply whose `ok` is not 1.
fn command_error(reply: &Document) -> Option<(i32, String)> {
    let ok = match reply.get("ok") {
        Some(Bson::Double(v)) => *v == 1.0,
        Some(Bson::Int32(v)) => *v == 1,
        Some(Bson::Int64(v)) => *v == 1,
        Some(Bson::Boolean(v)) => *v,
        _ => false,
    };
    if ok {
        return None;
    }
    let code = match reply.get("code") {
        Some(Bson::Int32(c)) => *c,
        Some(Bson::Int64(c)) => *c as i32,
        Some(Bson::Double(c)) => *c as i32,
        _ => 0,
    };
    let msg = reply.get_str("errmsg").unwrap_or("no message").to_owned();
    Some((code, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_msg_round_trips_through_the_reply_parser() {
        let m = op_msg(7, &doc! {"hello": 1, "$db": "admin"});
        assert_eq!(le_i32(&m[0..4]) as usize, m.len());
        assert_eq!(le_i32(&m[12..16]), OP_MSG);
        let d = reply_document(&m[16..]).unwrap();
        assert_eq!(d.get_i32("hello").unwrap(), 1);
        // With the checksum flag, the last four bytes are not part of the document.
        let mut body = m[16..].to_vec();
        body[0] = 1;
        body.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(reply_document(&body).unwrap(), d);
        assert!(reply_document(&[0, 0, 0, 0, 1, 5, 0, 0, 0, 0]).is_none());
        assert!(reply_document(&[0, 0]).is_none());
    }

    #[test]
    fn command_errors_are_read_from_ok_and_code() {
        assert_eq!(command_error(&doc! {"ok": 1.0}), None);
        assert_eq!(
            command_error(&doc! {"ok": 0.0, "code": 59, "errmsg": "no such command: 'hello'"}),
            Some((59, "no such command: 'hello'".into()))
        );
    }
}
