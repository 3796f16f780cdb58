//! RabbitMQ engine: readiness is the AMQP 0-9-1 handshake with the configured credentials;
//! health adds the management API's alarm check; a backup is the broker's definitions (users,
//! vhosts, permissions, policies, parameters, queues, exchanges, bindings), restored into an
//! empty broker through the same API. Messages are not backed up (see the README).
//!
//! - `amqp`: the handshake, over TCP or rustls.
//! - `api`: the management API client.
//! - `defs`: the definitions document: counts, identity of objects, what a fresh broker holds
//!   by itself, and the offline check of a set.

mod amqp;
mod api;
pub mod defs;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::info;
use url::Url;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub use defs::verify_deep;

pub(crate) const ENGINE: &str = "rabbitmq";

/// The global parameter that marks a restore in progress.
pub const MARKER: &str = "dbkeeper-restore-in-progress";

/// The artifact of a set: the definitions as the management API exported them.
pub const DEFINITIONS_FILE: &str = "definitions.json";

/// Everything the engine needs, validated once; building it connects to nothing.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub user: String,
    pub password: Secret,
    pub vhost: String,
    /// The management API: scheme, host, port and any path prefix, without credentials.
    pub api_base: Url,
    pub api_user: String,
    pub api_password: Secret,
    display: String,
    api_display: String,
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

impl RabbitConfig {
    pub fn parse(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let display = redact_url(url.expose());
        let u = Url::parse(url.expose())
            .map_err(|e| Error::config(format!("{display}: not a valid AMQP URL ({e})")))?;
        let tls = match u.scheme() {
            "amqp" => false,
            "amqps" => true,
            _ => {
                return Err(Error::config(format!(
                    "{display}: a RabbitMQ URL is amqp(s)://user:password@host[:port][/vhost]"
                )));
            }
        };
        let host = match u.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']'),
            _ => {
                return Err(Error::config(format!(
                    "{display}: a RabbitMQ URL needs a host"
                )));
            }
        }
        .to_owned();
        if u.query().is_some() || u.fragment().is_some() {
            return Err(Error::config(format!(
                "{display}: query parameters (heartbeat, TLS options…) are not supported in a RabbitMQ URL"
            )));
        }
        let port = u.port().unwrap_or(if tls { 5671 } else { 5672 });
        // The AMQP URI spec's defaults: guest/guest, and the vhost is the path's one segment,
        // percent-decoded (`/%2F` and a missing path both mean `/`).
        let (user, password) = if u.username().is_empty() {
            ("guest".to_owned(), Secret::new("guest"))
        } else {
            (
                decode(u.username()),
                Secret::new(decode(u.password().unwrap_or(""))),
            )
        };
        let path = u.path().strip_prefix('/').unwrap_or(u.path());
        if path.contains('/') {
            return Err(Error::config(format!(
                "{display}: the path is one virtual host; write `/` inside a name as %2F"
            )));
        }
        let vhost = if path.is_empty() {
            "/".to_owned()
        } else {
            decode(path)
        };

        let (api_base, api_user, api_password, api_display) = match &opts.rabbitmq_api_url {
            None => {
                let h = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                let base = Url::parse(&format!("http://{h}:15672/")).map_err(|e| {
                    Error::config(format!("{display}: no management API URL follows ({e})"))
                })?;
                let shown = base.to_string();
                (base, user.clone(), password.clone(), shown)
            }
            Some(api) => {
                let shown = redact_url(api.expose());
                let mut base = Url::parse(api.expose()).map_err(|e| {
                    Error::config(format!(
                        "DBKEEPER_RABBITMQ_API_URL {shown}: not a valid URL ({e})"
                    ))
                })?;
                if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
                    return Err(Error::config(format!(
                        "DBKEEPER_RABBITMQ_API_URL {shown}: expected http(s)://host:port"
                    )));
                }
                let (au, ap) = if base.username().is_empty() {
                    (user.clone(), password.clone())
                } else {
                    (
                        decode(base.username()),
                        Secret::new(decode(base.password().unwrap_or(""))),
                    )
                };
                let _ = base.set_username("");
                let _ = base.set_password(None);
                if !base.path().ends_with('/') {
                    let p = format!("{}/", base.path());
                    base.set_path(&p);
                }
                (base, au, ap, shown)
            }
        };
        Ok(RabbitConfig {
            host,
            port,
            tls,
            user,
            password,
            vhost,
            api_base,
            api_user,
            api_password,
            display,
            api_display,
        })
    }

    fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::unreachable(ENGINE, &self.display, message)
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::refused(ENGINE, &self.display, message)
    }

    /// The handshake, blocking, under `timeout`.
    fn handshake(&self, timeout: Duration) -> Result<amqp::ServerInfo> {
        use super::net::{ConnectError, connect};
        let deadline = Instant::now() + timeout;
        let tcp = connect(&self.host, self.port, deadline).map_err(|e| match e {
            ConnectError::Resolve(e) => self.unreachable(format!("cannot resolve host: {e}")),
            ConnectError::Timeout => self.unreachable("connect timed out"),
            ConnectError::Refused(e) => self.unreachable(format!("connect: {e}")),
            ConnectError::NoAddress => self.unreachable("host resolves to no address"),
        })?;
        let _ = tcp.set_read_timeout(amqp::remaining(deadline));
        let _ = tcp.set_write_timeout(amqp::remaining(deadline));
        let mut stream: Box<dyn ReadWrite> = if self.tls {
            Box::new(self.tls_stream(tcp)?)
        } else {
            Box::new(tcp)
        };
        amqp::handshake(
            &mut stream,
            &self.user,
            self.password.expose(),
            &self.vhost,
            deadline,
        )
        .map_err(|e| self.handshake_error(e))
    }

    fn handshake_error(&self, e: amqp::HandshakeError) -> Error {
        use amqp::HandshakeError as H;
        match e {
            H::Io(e) => {
                if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return self.refused(format!("TLS: {tls}"));
                }
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        self.unreachable(
                            "no AMQP answer in time (is this port the broker's AMQP listener?)",
                        )
                    }
                    _ => self.unreachable(format!("AMQP handshake: {e}")),
                }
            }
            H::NotAmqp(why) => self.refused(why),
            // ACCESS_REFUSED (bad credentials) and NOT_ALLOWED (no such vhost, or no access to
            // it): retrying will not fix either.
            H::Closed(code @ (403 | 530), text) => self.refused(format!(
                "the broker refused the connection ({code} {text}); check the URL's user, password and vhost"
            )),
            H::Closed(code, text) => {
                self.unreachable(format!("the broker closed the connection ({code} {text})"))
            }
        }
    }

    fn tls_stream(
        &self,
        tcp: TcpStream,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        use crate::engine::tls::{Verify, client_config, system_roots};
        let roots = system_roots().ok_or_else(|| {
            self.refused(
                "amqps://: no trusted CA certificate found; set SSL_CERT_FILE to a PEM bundle",
            )
        })?;
        let config = client_config(Verify::Full(roots), None)
            .map_err(|e| self.refused(format!("TLS: {e}")))?;
        let name = rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
            self.refused(format!(
                "TLS: {} is not a valid server name: {e}",
                self.host
            ))
        })?;
        let conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| self.refused(format!("TLS: {e}")))?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

pub struct RabbitEngine {
    cfg: Arc<RabbitConfig>,
    /// Boxed: the engine enum stays small whichever engine it holds.
    api: Box<api::Api>,
}

impl RabbitEngine {
    pub fn new(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let cfg = Arc::new(RabbitConfig::parse(url, opts)?);
        Ok(RabbitEngine {
            api: Box::new(api::Api::new(cfg.clone())),
            cfg,
        })
    }

    pub fn config(&self) -> &RabbitConfig {
        &self.cfg
    }

    async fn handshake(&self, timeout: Duration) -> Result<amqp::ServerInfo> {
        let cfg = self.cfg.clone();
        tokio::task::spawn_blocking(move || cfg.handshake(timeout))
            .await
            .map_err(|e| Error::engine(ENGINE, format!("probe thread failed: {e}")))?
    }

    fn probe_of(info: amqp::ServerInfo) -> Probe {
        let mut detail = format!("product={}", info.product.as_deref().unwrap_or("unknown"));
        if let Some(c) = &info.cluster_name {
            detail.push_str(&format!(" cluster={c}"));
        }
        Probe {
            version: info.version,
            detail,
        }
    }
}

impl EngineOps for RabbitEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Rabbitmq
    }

    fn display_url(&self) -> &str {
        &self.cfg.display
    }

    /// The handshake, then the management API's alarm check: a broker in a memory or disk
    /// alarm blocks every publisher, so it is not healthy.
    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        let deadline = Instant::now() + timeout;
        let mut p = Self::probe_of(self.handshake(timeout).await?);
        let left = deadline.saturating_duration_since(Instant::now());
        self.api
            .check_alarms(left.max(Duration::from_millis(100)))
            .await?;
        p.detail.push_str(" alarms=none");
        Ok(p)
    }

    /// What `wait` waits for: the broker takes AMQP connections with our credentials.
    async fn ready(&self, timeout: Duration) -> Result<Probe> {
        Ok(Self::probe_of(self.handshake(timeout).await?))
    }

    /// A backup only reads the definitions, which a broker under an alarm still serves.
    async fn answers(&self, timeout: Duration) -> Result<Probe> {
        self.ready(timeout).await
    }

    async fn is_empty(&self) -> Result<Emptiness> {
        let d = self.api.definitions().await?;
        Ok(defs::emptiness(&d, &self.cfg.api_user))
    }

    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        let started_at = Utc::now();
        let mut d = self.api.definitions().await?;
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        defs::strip_internal(&mut d);
        let counts = defs::counts(&d).map_err(|e| Error::engine(ENGINE, e))?;
        let server_version = d
            .get("rabbitmq_version")
            .or_else(|| d.get("rabbit_version"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        let bytes = serde_json::to_vec_pretty(&d)
            .map_err(|e| Error::engine(ENGINE, format!("definitions: {e}")))?;
        let file = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut w = out.create(DEFINITIONS_FILE, 0)?;
            w.write_all(&bytes)
                .map_err(|e| Error::engine(ENGINE, format!("writing definitions: {e}")))?;
            w.finish()
        })
        .await
        .map_err(|e| Error::engine(ENGINE, format!("writer failed: {e}")))??;
        info!(engine = ENGINE, counts = ?counts, "rabbitmq definitions exported");
        Ok(EngineEntry {
            source: self.cfg.display.clone(),
            server_version,
            started_at,
            finished_at: Utc::now(),
            files: vec![file],
            counts,
            details: serde_json::json!({ "format": defs::FORMAT }),
        })
    }

    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        _opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        let (body, wanted) = {
            let (set, entry) = (set.clone(), entry.clone());
            tokio::task::spawn_blocking(move || defs::read_set(&set, &entry))
                .await
                .map_err(|e| Error::engine(ENGINE, format!("reader failed: {e}")))??
        };
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        self.api.import(body).await?;
        let now = self.api.definitions().await?;
        Ok(defs::found(&wanted, &now))
    }

    async fn wipe(&self) -> Result<()> {
        let d = self.api.definitions().await?;
        for name in defs::names(&d, "users", "name") {
            if name != self.cfg.api_user {
                self.api.delete(&["users", &name]).await?;
            }
        }
        for name in defs::names(&d, "vhosts", "name") {
            if name != "/" {
                self.api.delete(&["vhosts", &name]).await?;
            }
        }
        // What is left lives in `/` or is global.
        let d = self.api.definitions().await?;
        for item in defs::items(&d, "queues") {
            self.api
                .delete(&["queues", "/", defs::s(item, "name")])
                .await?;
        }
        for item in defs::items(&d, "exchanges") {
            let name = defs::s(item, "name");
            if !defs::is_builtin_exchange(name) {
                self.api.delete(&["exchanges", "/", name]).await?;
            }
        }
        for item in defs::items(&d, "policies") {
            self.api
                .delete(&["policies", "/", defs::s(item, "name")])
                .await?;
        }
        for item in defs::items(&d, "parameters") {
            self.api
                .delete(&[
                    "parameters",
                    defs::s(item, "component"),
                    "/",
                    defs::s(item, "name"),
                ])
                .await?;
        }
        for item in defs::items(&d, "topic_permissions") {
            self.api
                .delete(&["topic-permissions", "/", defs::s(item, "user")])
                .await?;
        }
        for name in defs::names(&d, "global_parameters", "name") {
            // The restore marker outlives a wipe: `restore --force` sets it first.
            if !defs::is_internal_global(&name) && name != MARKER {
                self.api.delete(&["global-parameters", &name]).await?;
            }
        }
        Ok(())
    }

    async fn set_marker(&self, on: bool) -> Result<()> {
        if on {
            let body = serde_json::json!({
                "name": MARKER,
                "value": format!("restore started {}", Utc::now().to_rfc3339()),
            });
            self.api.put(&["global-parameters", MARKER], &body).await
        } else {
            self.api
                .delete_if_exists(&["global-parameters", MARKER])
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<RabbitConfig> {
        RabbitConfig::parse(&Secret::new(url), &EngineOptions::default())
    }

    #[test]
    fn urls_parse_with_the_amqp_defaults() {
        let c = parse("amqp://rabbit").unwrap();
        assert_eq!((c.host.as_str(), c.port, c.tls), ("rabbit", 5672, false));
        assert_eq!((c.user.as_str(), c.password.expose()), ("guest", "guest"));
        assert_eq!(c.vhost, "/");
        assert_eq!(c.api_base.as_str(), "http://rabbit:15672/");
        let c = parse("amqps://app:p%40ss@mq:5000/%2F").unwrap();
        assert_eq!((c.port, c.tls, c.vhost.as_str()), (5000, true, "/"));
        assert_eq!((c.user.as_str(), c.password.expose()), ("app", "p@ss"));
        assert_eq!(
            (c.api_user.as_str(), c.api_password.expose()),
            ("app", "p@ss")
        );
        let c = parse("amqp://u:p@mq/orders").unwrap();
        assert_eq!(c.vhost, "orders");
        let o = EngineOptions {
            rabbitmq_api_url: Some(Secret::new("https://admin:s3@mgmt.example/rabbit")),
            ..EngineOptions::default()
        };
        let c = RabbitConfig::parse(&Secret::new("amqp://u:p@mq"), &o).unwrap();
        assert_eq!(c.api_base.as_str(), "https://mgmt.example/rabbit/");
        assert_eq!(
            (c.api_user.as_str(), c.api_password.expose()),
            ("admin", "s3")
        );
        assert!(!c.api_display.contains("s3"));
    }

    #[test]
    fn bad_urls_are_configuration_errors_without_the_password() {
        for bad in [
            "amqp://",
            "amqp://u:secret@h/a/b",
            "amqp://u:secret@h/?heartbeat=5",
            "redis://h",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        let o = EngineOptions {
            rabbitmq_api_url: Some(Secret::new("ftp://x:secret@h")),
            ..EngineOptions::default()
        };
        let e = RabbitConfig::parse(&Secret::new("amqp://h"), &o).unwrap_err();
        assert!(matches!(e, Error::Config(_)) && !e.to_string().contains("secret"));
    }
}
