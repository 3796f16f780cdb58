//! `dbkeeper wait`: one overall deadline, a timeout per attempt, backoff; gives up at once on
//! what retrying cannot fix.

use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::engine::{Engine, EngineOps, Probe};
use crate::error::{Error, Result};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MAX_ATTEMPT: Duration = Duration::from_secs(5);

/// Waits for every engine concurrently, under one deadline.
pub async fn wait_all(
    engines: &[Engine],
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Vec<Probe>> {
    let deadline = Instant::now() + timeout;
    try_join_all(engines.iter().map(|e| wait_one(e, deadline, cancel))).await
}

pub async fn wait_one(
    engine: &Engine,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Probe> {
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut announced = false;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let attempt = remaining.clamp(Duration::from_millis(200), MAX_ATTEMPT);
        match engine.ready(attempt).await {
            Ok(probe) => {
                info!(
                    engine = %engine.kind(),
                    url = engine.display_url(),
                    version = probe.version.as_deref().unwrap_or("?"),
                    detail = %probe.detail,
                    after_ms = start.elapsed().as_millis() as u64,
                    "ready"
                );
                return Ok(probe);
            }
            Err(e) if e.is_retryable() => {
                if !announced {
                    info!(engine = %engine.kind(), url = engine.display_url(), reason = %e, "waiting");
                    announced = true;
                } else {
                    debug!(engine = %engine.kind(), reason = %e, "not ready yet");
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(Error::Deadline {
                        engine: engine.kind().name(),
                        url: engine.display_url().to_owned(),
                        waited_s: start.elapsed().as_secs_f64(),
                        last: last_reason(&e),
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.min(remaining)) => {}
                    _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The engine error's own message, without the engine/URL prefix the deadline error repeats.
fn last_reason(e: &Error) -> String {
    match e {
        Error::Unreachable { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
