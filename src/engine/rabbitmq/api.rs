//! The management API client: one lazily built reqwest client (rustls, ring), basic auth, and
//! the endpoints a definitions backup needs.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use super::{ENGINE, RabbitConfig};
use crate::error::{Error, Result};

/// A definitions export or import of a large broker (tens of thousands of queues) takes a
/// while; the server answers only when it is done.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) struct Api {
    cfg: Arc<RabbitConfig>,
    client: OnceLock<std::result::Result<Client, String>>,
}

/// The error text of reqwest with its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

impl Api {
    pub fn new(cfg: Arc<RabbitConfig>) -> Self {
        Api {
            cfg,
            client: OnceLock::new(),
        }
    }

    /// Built on first use; certificates are checked against the system trust store
    /// (`SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured).
    fn client(&self) -> Result<&Client> {
        let built = self.client.get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .build()
                .map_err(|e| chain(&e))
        });
        built
            .as_ref()
            .map_err(|e| self.refused(format!("TLS set-up: {e}")))
    }

    fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.cfg.api_display.clone(),
            message: message.into(),
        }
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::Refused {
            engine: ENGINE,
            url: self.cfg.api_display.clone(),
            message: message.into(),
        }
    }

    fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder> {
        let mut u = self.cfg.api_base.clone();
        {
            let mut p = u
                .path_segments_mut()
                .map_err(|_| Error::config("DBKEEPER_RABBITMQ_API_URL: not a base URL"))?;
            p.pop_if_empty();
            p.push("api");
            // Each segment is one name: a `/` in it (the default vhost) is sent as %2F.
            p.extend(segments);
        }
        Ok(self
            .client()?
            .request(method, u)
            .basic_auth(&self.cfg.api_user, Some(self.cfg.api_password.expose())))
    }

    async fn send(&self, rb: RequestBuilder, what: &str, timeout: Duration) -> Result<Response> {
        let resp = rb.timeout(timeout).send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() || e.is_request() {
                self.unreachable(format!("management API, {what}: {}", chain(&e)))
            } else {
                Error::engine(
                    ENGINE,
                    format!(
                        "management API at {}, {what}: {}",
                        self.cfg.api_display,
                        chain(&e)
                    ),
                )
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(self.status_error(status, what, &body))
    }

    fn status_error(&self, status: StatusCode, what: &str, body: &str) -> Error {
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return self.refused(format!(
                "management API, {what}: HTTP {status}: the credentials are refused or lack the administrator tag; check DBKEEPER_RABBITMQ_API_URL"
            ));
        }
        let reason = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.chars().take(200).collect());
        let reason = reason.replace('\n', " ");
        if status.is_server_error() && status != StatusCode::INTERNAL_SERVER_ERROR {
            return self.unreachable(format!("management API, {what}: HTTP {status}: {reason}"));
        }
        Error::engine(
            ENGINE,
            format!(
                "management API at {}, {what}: HTTP {status}: {reason}",
                self.cfg.api_display
            ),
        )
    }

    /// Reads a JSON answer to the end: a body cut short (the broker stopped mid-answer) is an
    /// error, never a shorter document.
    async fn json(&self, resp: Response, what: &str) -> Result<Value> {
        let bytes = resp.bytes().await.map_err(|e| {
            self.unreachable(format!(
                "management API, {what}: the answer was cut short: {}",
                chain(&e)
            ))
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::engine(
                ENGINE,
                format!(
                    "management API at {}, {what}: not a JSON answer ({e})",
                    self.cfg.api_display
                ),
            )
        })
    }

    /// `GET /api/definitions`: the whole broker's definitions.
    pub async fn definitions(&self) -> Result<Value> {
        let what = "reading definitions";
        let resp = self
            .send(
                self.request(Method::GET, &["definitions"])?,
                what,
                REQUEST_TIMEOUT,
            )
            .await?;
        let v = self.json(resp, what).await?;
        if !v.is_object() || v.get("vhosts").and_then(|x| x.as_array()).is_none() {
            return Err(Error::engine(
                ENGINE,
                format!(
                    "management API at {}: {what}: the answer is not a definitions document",
                    self.cfg.api_display
                ),
            ));
        }
        Ok(v)
    }

    /// `POST /api/definitions`: imports a definitions document.
    pub async fn import(&self, body: Vec<u8>) -> Result<()> {
        let rb = self
            .request(Method::POST, &["definitions"])?
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.send(rb, "importing definitions", REQUEST_TIMEOUT)
            .await?;
        Ok(())
    }

    /// `GET /api/health/checks/alarms`: 200 without alarms, 503 naming them.
    pub async fn check_alarms(&self, timeout: Duration) -> Result<()> {
        let what = "alarm check";
        let rb = self.request(Method::GET, &["health", "checks", "alarms"])?;
        let resp = rb
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(format!("management API, {what}: {}", chain(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        if status != StatusCode::SERVICE_UNAVAILABLE {
            let body = resp.text().await.unwrap_or_default();
            return Err(self.status_error(status, what, &body));
        }
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        let alarms: Vec<String> = v
            .get("alarms")
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .map(|x| {
                        let res = x.get("resource").and_then(|r| r.as_str()).unwrap_or("?");
                        let node = x.get("node").and_then(|r| r.as_str()).unwrap_or("?");
                        format!("{res} alarm on {node}")
                    })
                    .collect()
            })
            .unwrap_or_default();
        Err(Error::Unreachable {
            engine: ENGINE,
            url: self.cfg.display.clone(),
            message: if alarms.is_empty() {
                format!(
                    "resource alarm in effect: {}",
                    v.get("reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or("HTTP 503")
                )
            } else {
                format!(
                    "resource alarm in effect ({}); publishers are blocked",
                    alarms.join(", ")
                )
            },
        })
    }

    pub async fn put(&self, segments: &[&str], body: &Value) -> Result<()> {
        let what = format!("PUT {}", segments.join(" "));
        self.send(
            self.request(Method::PUT, segments)?.json(body),
            &what,
            REQUEST_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    pub async fn delete(&self, segments: &[&str]) -> Result<()> {
        let what = format!("deleting {}", segments.join(" "));
        self.send(
            self.request(Method::DELETE, segments)?,
            &what,
            REQUEST_TIMEOUT,
        )
        .await?;
        Ok(())
    }

    /// Like [`Api::delete`], with 404 (nothing to delete) as done.
    pub async fn delete_if_exists(&self, segments: &[&str]) -> Result<()> {
        let what = format!("deleting {}", segments.join(" "));
        let resp = self
            .request(Method::DELETE, segments)?
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(format!("management API, {what}: {}", chain(&e))))?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        let body = resp.text().await.unwrap_or_default();
        Err(self.status_error(status, &what, &body))
    }
}
