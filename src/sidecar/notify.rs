//! Webhook notifications: one JSON POST per finished run, with a timeout and a few retries,
//! sent from its own task so a slow receiver never holds up a run.

use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use super::state::{Job, JobStatus};
use crate::secret::{Secret, redact_url};

const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The body a receiver gets. `event` is `<kind>_<status>`, e.g. `backup_failed`.
pub fn payload(job: &Job) -> Value {
    let kind = job.kind.name();
    let status = serde_json::to_value(job.status).unwrap_or(Value::Null);
    json!({
        "event": format!("{kind}_{}", status.as_str().unwrap_or("unknown")),
        "source": "dbkeeper",
        "job": job.id,
        "kind": kind,
        "status": status,
        "trigger": job.trigger,
        "set": job.set,
        "error": job.error,
        "engines": job.engines,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "ok": job.status == JobStatus::Succeeded,
    })
}

/// POSTs `body` to `url`, retrying on a network error or a 5xx answer.
pub async fn send(url: Secret, body: Value) {
    let shown = redact_url(url.expose());
    // reqwest is built without a default crypto provider; installing ours twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            warn!(url = %shown, error = %e, "notification not sent: cannot build an HTTP client");
            return;
        }
    };
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let outcome = client.post(url.expose()).json(&body).send().await;
        match outcome {
            Ok(r) if r.status().is_success() => {
                info!(url = %shown, status = r.status().as_u16(), event = %body["event"], "notification sent");
                return;
            }
            Ok(r) if r.status().is_client_error() => {
                // Retrying the same body cannot fix a 4xx.
                warn!(url = %shown, status = r.status().as_u16(), "notification refused by the receiver");
                return;
            }
            Ok(r) => {
                warn!(url = %shown, status = r.status().as_u16(), attempt, "notification failed")
            }
            Err(e) => {
                // reqwest's error may contain the URL; print only its kind.
                let why = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                warn!(url = %shown, attempt, error = why, "notification failed")
            }
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    warn!(url = %shown, attempts = ATTEMPTS, "notification given up");
}
