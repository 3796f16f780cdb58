//! `dbkeeper health URL` and `dbkeeper-health`: one protocol-level probe, one line, exit 0 or 1.
//! This path runs every few seconds in every database container, so it sets up nothing it
//! does not need: no logging, and an async runtime only for engines whose client needs one.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use crate::cli::parse_duration;
use crate::config::{EnvLookup, process_env};
use crate::engine::{Engine, EngineKind, EngineOps, EngineOptions, Probe};
use crate::error::{Error, Result};
use crate::secret::{self, Secret, redact_url};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes one URL once. Redis is probed on the calling thread; the others on a
/// current-thread runtime built for this call.
pub fn probe_url(url: &Secret, opts: &EngineOptions, timeout: Duration) -> Result<Probe> {
    if EngineKind::from_url(url.expose())? == EngineKind::Redis {
        return crate::engine::redis::probe_blocking(url, timeout);
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

/// The configured URLs (`DBKEEPER_*_URL(_FILE)`), for a probe given no URL.
pub fn configured_urls(env: EnvLookup<'_>) -> Result<Vec<Secret>> {
    let mut urls = Vec::new();
    for name in [
        "DBKEEPER_MONGODB_URI",
        "DBKEEPER_REDIS_URL",
        "DBKEEPER_CHROMA_URL",
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
            urls.push(Secret::new(arg));
        }
    }
    if urls.is_empty() {
        urls = configured_urls(env)?;
    }
    if urls.is_empty() {
        return Err(Error::config(
            "no URL given and no DBKEEPER_MONGODB_URI / DBKEEPER_REDIS_URL / DBKEEPER_CHROMA_URL set",
        ));
    }
    let opts = EngineOptions {
        chroma_token: secret::resolve("DBKEEPER_CHROMA_TOKEN", None, env)?,
        chroma_tenant: env("DBKEEPER_CHROMA_TENANT"),
        chroma_database: env("DBKEEPER_CHROMA_DATABASE"),
        chroma_auth_header: env("DBKEEPER_CHROMA_AUTH_HEADER"),
        ..EngineOptions::default()
    };
    Ok(check(&urls, &opts, timeout))
}
