//! The blocking TCP connect the runtime-free probes share.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Instant;

/// Why no connection was made; each engine words it for its own URL.
pub(crate) enum ConnectError {
    /// The host name did not resolve.
    Resolve(io::Error),
    /// The deadline passed before any address accepted.
    Timeout,
    /// Every address refused; the last error.
    Refused(io::Error),
    /// The name resolved to no address.
    NoAddress,
}

/// Connects to the first address of `host:port` that accepts before `deadline`, with
/// `TCP_NODELAY` set (probes and commands are small requests waiting for answers).
pub(crate) fn connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, ConnectError> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(ConnectError::Resolve)?;
    let mut last = None;
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectError::Timeout);
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == io::ErrorKind::TimedOut => ConnectError::Timeout,
        Some(e) => ConnectError::Refused(e),
        None => ConnectError::NoAddress,
    })
}

/// A URL's host as a connect takes it (an IPv6 address without its brackets); `None` when
/// the URL has none or an empty one.
pub(crate) fn url_host(u: &url::Url) -> Option<String> {
    let host = match u.host()? {
        url::Host::Ipv6(a) => a.to_string(),
        h => h.to_string(),
    };
    (!host.is_empty()).then_some(host)
}

/// A percent-encoded URL part (user, password, path), decoded; `None` when it is not UTF-8.
pub(crate) fn url_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}
