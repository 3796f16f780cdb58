//! A fault-injecting TCP proxy between dbkeeper and a real server: it forwards bytes both ways
//! and, on cue, closes the link, resets it, stalls it, slows it to a trickle, or answers an
//! HTTP request in the server's place. Plain threads and blocking sockets: a few connections
//! at a time, and the fault logic reads more clearly without a runtime.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the link does.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Once `n` bytes came from the server (all connections together), close every connection
    /// (FIN), and every later one as soon as it is accepted: the link is down.
    CutAfter(usize),
    /// The same, but with a reset (`SO_LINGER` 0) instead of a close; `ResetAfter(0)` resets
    /// each connection before the first byte of the handshake.
    ResetAfter(usize),
    /// Once `n` bytes came from the server, forward nothing more either way, and keep every
    /// socket open (later connections are accepted and never answered).
    StallAfter(usize),
    /// Forward the server's bytes `bytes` at a time with a pause of `every` between pieces.
    Trickle { bytes: usize, every: Duration },
    /// Answer `status` in the server's place to the first `times` HTTP requests whose request
    /// line contains `path` (the server never sees them); forward the rest.
    Http {
        status: u16,
        path: &'static str,
        times: usize,
    },
}

struct Shared {
    fault: Fault,
    down: AtomicUsize,
    tripped: AtomicBool,
    stop: AtomicBool,
    injected: AtomicUsize,
    socks: Mutex<Vec<TcpStream>>,
    rt: tokio::runtime::Runtime,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(upstream: u16, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            fault,
            down: AtomicUsize::new(0),
            tripped: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            injected: AtomicUsize::new(0),
            socks: Mutex::new(Vec::new()),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap(),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || handle(conn, upstream, sh));
            }
        });
        Proxy { port, shared }
    }

    /// Bytes forwarded from the server so far.
    pub fn down_bytes(&self) -> usize {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// HTTP answers given in the server's place.
    pub fn injected(&self) -> usize {
        match self.shared.fault {
            Fault::Http { times, .. } => self.shared.injected.load(Ordering::SeqCst).min(times),
            _ => 0,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self.shared.socks.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Closes a socket with a reset: `SO_LINGER` 0 then close. std has no stable setter for it;
/// tokio's is safe code, so the socket passes through tokio to be closed.
fn reset(sh: &Shared, s: TcpStream) {
    let _g = sh.rt.enter();
    let _ = s.set_nonblocking(true);
    if let Ok(t) = tokio::net::TcpStream::from_std(s) {
        let _ = t.set_zero_linger();
        drop(t);
    }
}

fn register(sh: &Shared, s: &TcpStream) {
    if let Ok(c) = s.try_clone() {
        sh.socks.lock().unwrap().push(c);
    }
}

/// Brings the link down for every registered socket.
fn trip(sh: &Shared) {
    if sh.tripped.swap(true, Ordering::SeqCst) {
        return;
    }
    let socks: Vec<TcpStream> = sh.socks.lock().unwrap().drain(..).collect();
    for s in socks {
        match sh.fault {
            Fault::CutAfter(_) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Fault::ResetAfter(_) => {
                // Wake the pumps (SHUT_RD sends nothing to the peer); they return without a
                // FIN, and the last close of the socket, with linger 0, sends the reset.
                let _ = s.shutdown(Shutdown::Read);
                reset(sh, s);
            }
            // A stall keeps the sockets open: put them back.
            _ => sh.socks.lock().unwrap().push(s),
        }
    }
}

fn handle(client: TcpStream, upstream: u16, sh: Arc<Shared>) {
    let down_limit = match sh.fault {
        Fault::CutAfter(n) | Fault::ResetAfter(n) | Fault::StallAfter(n) => Some(n),
        _ => None,
    };
    if down_limit.is_some() && (sh.tripped.load(Ordering::SeqCst) || down_limit == Some(0)) {
        match sh.fault {
            Fault::CutAfter(_) => {
                let _ = client.shutdown(Shutdown::Both);
            }
            Fault::ResetAfter(_) => reset(&sh, client),
            _ => {
                // Stalled: hold the socket open, answer nothing.
                sh.tripped.store(true, Ordering::SeqCst);
                // The registered copy keeps the socket open until the proxy is dropped.
                register(&sh, &client);
            }
        }
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    register(&sh, &client);
    register(&sh, &server);
    let (c2, s2, sh2) = (
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        sh.clone(),
    );
    // Client -> server.
    std::thread::spawn(move || match sh2.fault {
        Fault::Http { .. } => {
            let _ = http_up(c2, s2, &sh2);
        }
        _ => {
            let _ = pump_up(c2, s2, &sh2);
        }
    });
    let _ = pump_down(server, client, &sh, down_limit);
}

fn stalled(sh: &Shared) -> bool {
    matches!(sh.fault, Fault::StallAfter(_)) && sh.tripped.load(Ordering::SeqCst)
}

/// Waits while the link is stalled, until the proxy is dropped.
fn hold(sh: &Shared) {
    while !sh.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Passes an end of stream on, unless the link was brought down (then the fault decides).
fn end(sh: &Shared, to: &TcpStream) -> std::io::Result<()> {
    if sh.tripped.load(Ordering::SeqCst) {
        return Ok(());
    }
    to.shutdown(Shutdown::Write)
}

fn pump_up(mut from: TcpStream, mut to: TcpStream, sh: &Shared) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut buf)?;
        if stalled(sh) {
            hold(sh);
            return Ok(());
        }
        if n == 0 {
            return end(sh, &to);
        }
        to.write_all(&buf[..n])?;
    }
}

fn pump_down(
    mut from: TcpStream,
    mut to: TcpStream,
    sh: &Shared,
    limit: Option<usize>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = from.read(&mut buf)?;
        if stalled(sh) {
            hold(sh);
            return Ok(());
        }
        if n == 0 {
            return end(sh, &to);
        }
        let mut piece = &buf[..n];
        if let Some(limit) = limit {
            let before = sh.down.fetch_add(n, Ordering::SeqCst);
            if before + n >= limit {
                let allowed = limit.saturating_sub(before).min(n);
                to.write_all(&piece[..allowed])?;
                to.flush()?;
                trip(sh);
                if stalled(sh) {
                    hold(sh);
                }
                return Ok(());
            }
        } else {
            sh.down.fetch_add(n, Ordering::SeqCst);
        }
        if let Fault::Trickle { bytes, every } = sh.fault {
            while !piece.is_empty() {
                let k = bytes.min(piece.len());
                to.write_all(&piece[..k])?;
                piece = &piece[k..];
                std::thread::sleep(every);
            }
        } else {
            to.write_all(piece)?;
        }
    }
}

/// Client -> server for HTTP/1.1: reads each request (head and `content-length` body) and
/// either forwards it or answers it in the server's place. Clients here never pipeline, so an
/// answered request has no reply of the server's to interleave with.
fn http_up(from: TcpStream, mut to: TcpStream, sh: &Shared) -> std::io::Result<()> {
    let Fault::Http {
        status,
        path,
        times,
    } = sh.fault
    else {
        unreachable!()
    };
    let mut client_w = from.try_clone()?;
    let mut r = BufReader::new(from);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if r.read_until(b'\n', &mut line)? == 0 {
                return to.shutdown(Shutdown::Write);
            }
            let end = line == b"\r\n";
            head.extend_from_slice(&line);
            if end {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let len: usize = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let first = text.lines().next().unwrap_or("");
        if first.contains(path) && sh.injected.fetch_add(1, Ordering::SeqCst) < times {
            let reason = match status {
                429 => "Too Many Requests",
                500 => "Internal Server Error",
                503 => "Service Unavailable",
                _ => "Error",
            };
            let msg =
                format!(r#"{{"error":"Injected","message":"{status} injected by the test"}}"#);
            write!(
                client_w,
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{msg}",
                msg.len()
            )?;
            client_w.flush()?;
            continue;
        }
        to.write_all(&head)?;
        to.write_all(&body)?;
    }
}
