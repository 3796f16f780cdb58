//! `dbkeeper health URL` and `dbkeeper-health`: one protocol-level probe, one line, exit 0 or 1.
//! This path runs every few seconds in every database container, so it sets up nothing it
//! does not need: no logging, and an async runtime only for engines whose client needs one.
//!
//! The sidecar's own healthcheck reads its `GET /health`: the target `self` means
//! `http://127.0.0.1:<port of DBKEEPER_LISTEN>/health`, and any `http(s)://…/health` URL is
//! read as a sidecar's (a bare `http://host:port` stays a Chroma server).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use crate::cli::parse_duration;
use crate::config::{EnvLookup, process_env};
use crate::engine::{Engine, EngineKind, EngineOps, EngineOptions, Probe};
use crate::error::{Error, Result};
use crate::secret::{self, Secret, redact_url};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes one URL once. Redis, and MongoDB at one host without credentials or TLS, are probed
/// on the calling thread; the others on a current-thread runtime built for this call.
pub fn probe_url(url: &Secret, opts: &EngineOptions, timeout: Duration) -> Result<Probe> {
    if is_sidecar_url(url.expose()) {
        return probe_sidecar(url.expose(), timeout);
    }
    match EngineKind::from_url(url.expose())? {
        EngineKind::Redis => return crate::engine::redis::probe_blocking(url, opts, timeout),
        EngineKind::Mongodb => {
            let engine = crate::engine::mongodb::MongoEngine::new(url, opts)?;
            if let Some(r) = engine.probe_plain(timeout) {
                return r;
            }
        }
        EngineKind::Chroma | EngineKind::Postgres | EngineKind::Rabbitmq => {}
    }
    let engine = Engine::from_url(url, opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::engine(engine.kind().name(), format!("runtime: {e}")))?;
    rt.block_on(async {
        match tokio::time::timeout(timeout, engine.probe(timeout)).await {
            Ok(r) => r,
            Err(_) => Err(Error::Unreachable {
                engine: engine.kind().name(),
                url: engine.display_url().to_owned(),
                message: format!("no answer within {timeout:?}"),
            }),
        }
    })
}

/// Probes each URL and prints one line per URL on stdout. Returns whether all are healthy.
pub fn check(urls: &[Secret], opts: &EngineOptions, timeout: Duration) -> bool {
    let mut healthy = true;
    for url in urls {
        let start = Instant::now();
        match probe_url(url, opts, timeout) {
            Ok(p) => println!(
                "healthy: {} {} {:.1}ms{}{}",
                redact_url(url.expose()),
                p.version.as_deref().unwrap_or(""),
                start.elapsed().as_secs_f64() * 1000.0,
                if p.detail.is_empty() { "" } else { " " },
                p.detail
            ),
            Err(e) => {
                healthy = false;
                println!("unhealthy: {e}");
            }
        }
    }
    healthy
}

/// `self` → the local sidecar's `/health`, from `DBKEEPER_LISTEN` (default `0.0.0.0:9216`;
/// an unspecified address is reached on loopback). Other targets are returned unchanged.
pub fn resolve_self(target: &str, env: EnvLookup<'_>) -> Result<String> {
    if target != "self" {
        return Ok(target.to_owned());
    }
    let listen = env("DBKEEPER_LISTEN").unwrap_or_else(|| "0.0.0.0:9216".into());
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        Error::config(format!(
            "DBKEEPER_LISTEN={listen:?}: expected an address such as 0.0.0.0:9216"
        ))
    })?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => "127.0.0.1".to_owned(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V4(v) => v.to_string(),
        std::net::IpAddr::V6(v) => format!("[{v}]"),
    };
    Ok(format!("http://{ip}:{}/health", addr.port()))
}

/// Whether a URL names a dbkeeper sidecar's health endpoint rather than a Chroma server.
pub fn is_sidecar_url(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https") && u.path().trim_end_matches('/') == "/health"
        }
        Err(_) => false,
    }
}

/// One `GET /health` over plain HTTP/1.0 on the calling thread. Written by hand: on this path
/// an HTTP client and a runtime would cost more than the request itself.
fn probe_sidecar(url: &str, timeout: Duration) -> Result<Probe> {
    use crate::engine::net::ConnectError;
    use std::io::{Read, Write};
    let shown = redact_url(url);
    let unreachable = |message: String| Error::Unreachable {
        engine: "sidecar",
        url: shown.clone(),
        message,
    };
    let u = url::Url::parse(url).map_err(|e| Error::config(format!("{shown}: {e}")))?;
    if u.scheme() != "http" {
        return Err(Error::config(format!(
            "{shown}: the sidecar serves plain http only"
        )));
    }
    let host = u
        .host_str()
        .ok_or_else(|| Error::config(format!("{shown}: no host")))?;
    let port = u.port().unwrap_or(80);
    let deadline = Instant::now() + timeout;
    let mut stream = crate::engine::net::connect(host.trim_matches(['[', ']']), port, deadline)
        .map_err(|e| match e {
            ConnectError::Resolve(e) => unreachable(format!("cannot resolve: {e}")),
            ConnectError::Timeout => unreachable(format!("no connection within {timeout:?}")),
            ConnectError::Refused(e) => unreachable(e.to_string()),
            ConnectError::NoAddress => unreachable("no address".into()),
        })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    write!(
        stream,
        "GET {} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n",
        u.path()
    )
    .map_err(|e| unreachable(e.to_string()))?;
    let mut buf = Vec::new();
    stream
        .take(256 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| unreachable(e.to_string()))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| unreachable("not an HTTP answer".into()))?;
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    match code {
        200 => Ok(Probe {
            version: None,
            detail: format!(
                "sidecar newest_verified={}",
                json["backup"]["newest_verified"].as_str().unwrap_or("none")
            ),
        }),
        503 => {
            let reasons: Vec<String> = json["reasons"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Err(Error::engine(
                "sidecar",
                format!("unhealthy at {shown}: {}", reasons.join("; ")),
            ))
        }
        other => Err(Error::engine(
            "sidecar",
            format!("{shown} answered HTTP {other}; is this a dbkeeper sidecar?"),
        )),
    }
}

/// The configured URLs (`DBKEEPER_*_URL(_FILE)`), for a probe given no URL.
pub fn configured_urls(env: EnvLookup<'_>) -> Result<Vec<Secret>> {
    let mut urls = Vec::new();
    for name in [
        "DBKEEPER_MONGODB_URI",
        "DBKEEPER_REDIS_URL",
        "DBKEEPER_CHROMA_URL",
        "DBKEEPER_POSTGRES_URL",
        "DBKEEPER_RABBITMQ_URL",
    ] {
        if let Some(u) = secret::resolve(name, None, env)? {
            urls.push(u);
        }
    }
    Ok(urls)
}

/// The whole of `dbkeeper-health [--timeout D] [URL…]`. Returns 0 or 1: Docker reserves 2,
/// so even a bad flag is "unhealthy".
pub fn healthcheck_main(args: &[OsString]) -> i32 {
    match parse_and_check(args, &process_env) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            println!("unhealthy: {e}");
            1
        }
    }
}

fn parse_and_check(args: &[OsString], env: EnvLookup<'_>) -> Result<bool> {
    let mut timeout = match env("DBKEEPER_HEALTH_TIMEOUT") {
        Some(v) => parse_duration(&v)
            .map_err(|e| Error::config(format!("DBKEEPER_HEALTH_TIMEOUT: {e}")))?,
        None => DEFAULT_TIMEOUT,
    };
    let mut urls = Vec::new();
    let mut it = args.iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = it.next() {
        if arg == "--timeout" || arg == "-t" {
            let v = it
                .next()
                .ok_or_else(|| Error::config("--timeout needs a value such as 2s"))?;
            timeout = parse_duration(&v).map_err(Error::config)?;
        } else if let Some(v) = arg.strip_prefix("--timeout=") {
            timeout = parse_duration(v).map_err(Error::config)?;
        } else if arg == "--help" || arg == "-h" {
            println!(
                "usage: dbkeeper-health [--timeout 3s] [URL…]  (default: the configured DBKEEPER_* URLs)"
            );
            return Ok(true);
        } else if arg.starts_with('-') {
            return Err(Error::config(format!("unknown flag {arg}")));
        } else {
            urls.push(Secret::new(resolve_self(&arg, env)?));
        }
    }
    if urls.is_empty() {
        urls = configured_urls(env)?;
    }
    if urls.is_empty() {
        return Err(Error::config(
            "no URL given and no DBKEEPER_MONGODB_URI / DBKEEPER_REDIS_URL / DBKEEPER_CHROMA_URL / DBKEEPER_POSTGRES_URL / DBKEEPER_RABBITMQ_URL set",
        ));
    }
    let opts = EngineOptions {
        chroma_token: secret::resolve("DBKEEPER_CHROMA_TOKEN", None, env)?,
        chroma_tenant: env("DBKEEPER_CHROMA_TENANT"),
        chroma_database: env("DBKEEPER_CHROMA_DATABASE"),
        chroma_auth_header: env("DBKEEPER_CHROMA_AUTH_HEADER"),
        redis_tls_cert_file: env("DBKEEPER_REDIS_TLS_CERT_FILE").map(Into::into),
        redis_tls_key_file: env("DBKEEPER_REDIS_TLS_KEY_FILE").map(Into::into),
        rabbitmq_api_url: secret::resolve("DBKEEPER_RABBITMQ_API_URL", None, env)?,
        ..EngineOptions::default()
    };
    Ok(check(&urls, &opts, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_names_the_local_sidecar() {
        let none = |_: &str| None;
        assert_eq!(
            resolve_self("self", &none).unwrap(),
            "http://127.0.0.1:9216/health"
        );
        let listen = |k: &str| (k == "DBKEEPER_LISTEN").then(|| "10.1.2.3:8080".to_owned());
        assert_eq!(
            resolve_self("self", &listen).unwrap(),
            "http://10.1.2.3:8080/health"
        );
        let v6 = |k: &str| (k == "DBKEEPER_LISTEN").then(|| "[::]:9216".to_owned());
        assert_eq!(
            resolve_self("self", &v6).unwrap(),
            "http://[::1]:9216/health"
        );
        assert_eq!(resolve_self("redis://h", &none).unwrap(), "redis://h");
        assert!(is_sidecar_url("http://sidecar:9216/health"));
        assert!(!is_sidecar_url("http://chroma:8000"));
        assert!(!is_sidecar_url("redis://h/health"));
    }
}
