//! The HTTP side of the Chroma engine: one lazily built reqwest client (rustls with the ring
//! provider, system trust store), the auth header, error mapping, and the v2 endpoints we use.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use url::Url;

use super::{AuthHeader, ChromaConfig, ENGINE};
use crate::engine::Probe;
use crate::error::{Error, Result};

/// How long one data request (a page of a dump, a batch of a restore) may take. Large batches
/// of 1536-d vectors are tens of MB of JSON; the server's index build can be slow.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Collections and databases are listed in pages of this size.
const LIST_PAGE: usize = 100;

pub(crate) struct Api {
    pub cfg: ChromaConfig,
    display: String,
    client: OnceLock<std::result::Result<Client, String>>,
}

/// A collection as `GET …/collections` returns it. Settings are kept as the server's raw JSON
/// so a restore sends back exactly what was read (no float re-rounding).
#[derive(Debug, Deserialize)]
pub(crate) struct Collection {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
    #[serde(default)]
    pub configuration_json: Option<Box<RawValue>>,
    #[serde(default)]
    pub schema: Option<Box<RawValue>>,
    #[serde(default)]
    pub dimension: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PreFlight {
    pub max_batch_size: usize,
    #[serde(default)]
    pub supports_base64_encoding: bool,
}

#[derive(Serialize)]
struct CreateCollection<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    configuration: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a RawValue>,
}

impl Api {
    pub fn new(cfg: ChromaConfig, display: String) -> Self {
        Api {
            cfg,
            display,
            client: OnceLock::new(),
        }
    }

    /// Built on first use, so constructing an engine (config validation, `--help`) costs
    /// nothing. reqwest uses rustls with whichever provider is installed process-wide: we
    /// install ring (the crate is built without aws-lc), and certificates are checked by
    /// rustls-platform-verifier against the system trust store (`SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` are honoured, so a private CA needs no flag).
    fn client(&self) -> Result<&Client> {
        let built = self.client.get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut b = Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_max_idle_per_host(8);
            if self.cfg.base.scheme() == "http" {
                // No TLS will happen: skip loading the system trust store (the health probe
                // runs every few seconds).
                let provider = rustls::crypto::CryptoProvider::get_default()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
                if let Ok(tls) = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map(|c| {
                        c.with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth()
                    })
                {
                    b = b.tls_backend_preconfigured(tls);
                }
            }
            b.build().map_err(|e| chain(&e))
        });
        built.as_ref().map_err(|e| {
            self.refused(format!(
                "TLS set-up: {e} (point SSL_CERT_FILE or SSL_CERT_DIR at the CA certificates)"
            ))
        })
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.cfg.base.clone();
        {
            let mut p = u.path_segments_mut().expect("http(s) URLs have a path");
            p.pop_if_empty();
            p.extend(segments);
        }
        u
    }

    fn db_url(&self, db: &str, rest: &[&str]) -> Url {
        let mut segs = vec!["api", "v2", "tenants", &self.cfg.tenant, "databases", db];
        segs.extend_from_slice(rest);
        self.url(&segs)
    }

    fn request(&self, method: Method, url: Url) -> Result<RequestBuilder> {
        let mut rb = self.client()?.request(method, url);
        if let Some(token) = &self.cfg.token {
            rb = match self.cfg.header {
                AuthHeader::Bearer => rb.bearer_auth(token.expose()),
                AuthHeader::XChromaToken => {
                    let mut v = reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| {
                        Error::config("DBKEEPER_CHROMA_TOKEN holds characters an HTTP header cannot carry")
                    })?;
                    // Kept out of debug logs, as bearer_auth does for Authorization.
                    v.set_sensitive(true);
                    rb.header("X-Chroma-Token", v)
                }
            };
        }
        if let Some((user, pass)) = &self.cfg.basic {
            rb = rb.basic_auth(user, Some(pass.expose()));
        }
        Ok(rb)
    }

    pub fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }

    pub fn refused(&self, message: impl Into<String>) -> Error {
        Error::Refused {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> Error {
        if is_tls_failure(&e) {
            self.refused(format!("{what}: TLS: {}", chain(&e)))
        } else if e.is_connect() || e.is_timeout() || is_dropped_link(&e) {
            self.unreachable(format!("{what}: {}", chain(&e)))
        } else {
            Error::engine(ENGINE, format!("{what} at {}: {}", self.display, chain(&e)))
        }
    }

    /// Sends, and turns any non-2xx answer into an error: 401/403 are a refusal (retrying
    /// cannot fix a wrong token), the rest an engine failure carrying Chroma's own message.
    pub async fn send(&self, rb: RequestBuilder, what: &str) -> Result<Response> {
        let resp = rb
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(what, e))?;
        self.check(resp, what).await
    }

    async fn check(&self, resp: Response, what: &str) -> Result<Response> {
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
                "{what}: HTTP {status}: the server refused our credentials; check DBKEEPER_CHROMA_TOKEN and DBKEEPER_CHROMA_AUTH_HEADER"
            ));
        }
        Error::engine(
            ENGINE,
            format!(
                "{what} at {}: HTTP {}: {}",
                self.display,
                status.as_u16(),
                error_message(body)
            ),
        )
    }

    pub async fn get_json<T: for<'de> Deserialize<'de>>(&self, url: Url, what: &str) -> Result<T> {
        let resp = self.send(self.request(Method::GET, url)?, what).await?;
        let bytes = resp.bytes().await.map_err(|e| self.transport(what, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::engine(
                ENGINE,
                format!("{what} at {}: unexpected answer: {e}", self.display),
            )
        })
    }

    /// Heartbeat (v2, else v1 for servers older than 0.5.x's v2 API), then the version.
    /// Server errors (5xx) count as "not ready yet"; 404 on both heartbeats means whatever
    /// answers is not Chroma. With a token configured, an authenticated call checks it too.
    pub async fn probe(&self, timeout: Duration) -> Result<Probe> {
        let mut api = "v2";
        let mut status = self.probe_get(&["api", "v2", "heartbeat"], timeout).await?;
        if status == StatusCode::NOT_FOUND {
            api = "v1";
            status = self.probe_get(&["api", "v1", "heartbeat"], timeout).await?;
            if status == StatusCode::NOT_FOUND {
                return Err(
                    self.refused("not a Chroma server (no /api/v2/heartbeat or /api/v1/heartbeat)")
                );
            }
        }
        self.probe_status(status, "heartbeat")?;
        let version = self.probe_version(api, timeout).await;
        if self.cfg.token.is_some() || self.cfg.basic.is_some() {
            let st = self
                .probe_get(&["api", "v2", "auth", "identity"], timeout)
                .await?;
            // Servers without the identity endpoint cannot tell us; the first data call will.
            if st != StatusCode::NOT_FOUND {
                self.probe_status(st, "auth check")?;
            }
        }
        Ok(Probe {
            version,
            detail: format!("api={api}"),
        })
    }

    fn probe_status(&self, status: StatusCode, what: &str) -> Result<()> {
        if status.is_success() {
            Ok(())
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            // 5xx and 429 (a rate limit in front of the server) may pass: "not yet".
            Err(self.unreachable(format!("{what}: HTTP {status}")))
        } else {
            match self.status_error(status, what, "") {
                Error::Engine { .. } => Err(self.refused(format!("{what}: HTTP {status}"))),
                refused => Err(refused),
            }
        }
    }

    async fn probe_get(&self, segs: &[&str], timeout: Duration) -> Result<StatusCode> {
        let rb = self.request(Method::GET, self.url(segs))?.timeout(timeout);
        match rb.send().await {
            Ok(r) => Ok(r.status()),
            Err(e) if is_tls_failure(&e) => Err(self.refused(format!("TLS: {}", chain(&e)))),
            Err(e) if e.is_connect() || e.is_timeout() || is_dropped_link(&e) => {
                Err(self.unreachable(chain(&e)))
            }
            // Anything else (a TLS handshake with a plain-HTTP port, garbage instead of HTTP)
            // will not improve by waiting.
            Err(e) => Err(self.refused(chain(&e))),
        }
    }

    async fn probe_version(&self, api: &str, timeout: Duration) -> Option<String> {
        let rb = self
            .request(Method::GET, self.url(&["api", api, "version"]))
            .ok()?
            .timeout(timeout);
        let resp = rb.send().await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<String>().await.ok()
    }

    pub async fn preflight(&self) -> Result<PreFlight> {
        let p: PreFlight = self
            .get_json(
                self.url(&["api", "v2", "pre-flight-checks"]),
                "pre-flight checks",
            )
            .await?;
        if p.max_batch_size == 0 {
            return Err(Error::engine(
                ENGINE,
                format!("{}: the server reports max_batch_size 0", self.display),
            ));
        }
        Ok(p)
    }

    pub async fn version(&self) -> String {
        self.probe_version("v2", Duration::from_secs(10))
            .await
            .unwrap_or_else(|| "unknown".into())
    }

    pub async fn list_databases(&self) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Db {
            name: String,
        }
        let mut out = Vec::new();
        loop {
            let mut url = self.url(&["api", "v2", "tenants", &self.cfg.tenant, "databases"]);
            url.query_pairs_mut()
                .append_pair("limit", &LIST_PAGE.to_string())
                .append_pair("offset", &out.len().to_string());
            let page: Vec<Db> = self.get_json(url, "list databases").await?;
            let n = page.len();
            out.extend(page.into_iter().map(|d| d.name));
            if n < LIST_PAGE {
                return Ok(out);
            }
        }
    }

    pub async fn ensure_database(&self, db: &str) -> Result<()> {
        let url = self.url(&["api", "v2", "tenants", &self.cfg.tenant, "databases", db]);
        let resp = self
            .request(Method::GET, url)?
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport("get database", e))?;
        if resp.status().is_success() {
            return Ok(());
        }
        if resp.status() != StatusCode::NOT_FOUND {
            self.check(resp, "get database").await?;
            return Ok(());
        }
        #[derive(Serialize)]
        struct Create<'a> {
            name: &'a str,
        }
        let url = self.url(&["api", "v2", "tenants", &self.cfg.tenant, "databases"]);
        self.send(
            self.request(Method::POST, url)?.json(&Create { name: db }),
            &format!("create database {db}"),
        )
        .await?;
        Ok(())
    }

    pub async fn list_collections(&self, db: &str) -> Result<Vec<Collection>> {
        let mut out: Vec<Collection> = Vec::new();
        loop {
            let mut url = self.db_url(db, &["collections"]);
            url.query_pairs_mut()
                .append_pair("limit", &LIST_PAGE.to_string())
                .append_pair("offset", &out.len().to_string());
            let page: Vec<Collection> = self.get_json(url, "list collections").await?;
            let n = page.len();
            out.extend(page);
            if n < LIST_PAGE {
                return Ok(out);
            }
        }
    }

    pub async fn count(&self, db: &str, id: &str) -> Result<u64> {
        self.get_json(self.db_url(db, &["collections", id, "count"]), "count")
            .await
    }

    /// One page of records, as the server's raw JSON (parsed off the async threads).
    pub async fn get_page(
        &self,
        db: &str,
        id: &str,
        offset: u64,
        limit: usize,
    ) -> Result<bytes::Bytes> {
        let body = serde_json::json!({
            "limit": limit,
            "offset": offset,
            "include": ["embeddings", "documents", "metadatas", "uris"],
        });
        let what = "get records";
        let resp = self
            .send(
                self.request(Method::POST, self.db_url(db, &["collections", id, "get"]))?
                    .json(&body),
                what,
            )
            .await?;
        resp.bytes().await.map_err(|e| self.transport(what, e))
    }

    /// Creates a collection from exported settings. The 1.x `schema` is the complete
    /// description (it includes the configuration); servers that do not take it get the
    /// `configuration` instead.
    pub async fn create_collection(
        &self,
        db: &str,
        name: &str,
        metadata: Option<&RawValue>,
        configuration: Option<&RawValue>,
        schema: Option<&RawValue>,
    ) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let what = format!("create collection {name}");
        let url = self.db_url(db, &["collections"]);
        let (metadata, configuration, schema) = (
            not_null(metadata),
            not_null(configuration),
            not_null(schema),
        );
        if schema.is_some() {
            let body = CreateCollection {
                name,
                metadata,
                configuration: None,
                schema,
            };
            let resp = self
                .request(Method::POST, url.clone())?
                .json(&body)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await
                .map_err(|e| self.transport(&what, e))?;
            if resp.status().is_success() {
                let c: Created = resp.json().await.map_err(|e| self.transport(&what, e))?;
                return Ok(c.id);
            }
            if !(resp.status() == StatusCode::BAD_REQUEST
                || resp.status() == StatusCode::UNPROCESSABLE_ENTITY)
            {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                return Err(self.status_error(status, &what, &body));
            }
            tracing::debug!(
                engine = ENGINE,
                collection = name,
                "server refused the schema; creating from the configuration"
            );
        }
        let body = CreateCollection {
            name,
            metadata,
            configuration,
            schema: None,
        };
        let resp = self
            .send(self.request(Method::POST, url)?.json(&body), &what)
            .await?;
        let c: Created = resp.json().await.map_err(|e| self.transport(&what, e))?;
        Ok(c.id)
    }

    pub async fn create_marker(&self, db: &str, name: &str) -> Result<()> {
        let meta = RawValue::from_string(
            r#"{"dbkeeper":"a restore is in progress; if it stays, the next preseed wipes and redoes it"}"#
                .into(),
        )
        .expect("valid JSON");
        let url = self.db_url(db, &["collections"]);
        let body = serde_json::json!({"name": name, "metadata": meta, "get_or_create": true});
        self.send(
            self.request(Method::POST, url)?.json(&body),
            "create the restore marker",
        )
        .await?;
        Ok(())
    }

    pub async fn delete_collection(&self, db: &str, name: &str) -> Result<()> {
        self.send(
            self.request(Method::DELETE, self.db_url(db, &["collections", name]))?,
            &format!("delete collection {name}"),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_collection_if_exists(&self, db: &str, name: &str) -> Result<()> {
        let what = format!("delete collection {name}");
        let resp = self
            .request(Method::DELETE, self.db_url(db, &["collections", name]))?
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(&what, e))?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.check(resp, &what).await.map(|_| ())
    }

    /// The collection of that name, or `None` (migrations).
    pub async fn get_collection(&self, db: &str, name: &str) -> Result<Option<Collection>> {
        let what = format!("get collection {name}");
        let resp = self
            .request(Method::GET, self.db_url(db, &["collections", name]))?
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport(&what, e))?;
        // Chroma answers a missing collection with 404, some versions with 400/500 naming it.
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = resp.status();
        let body = resp.text().await.map_err(|e| self.transport(&what, e))?;
        if !status.is_success() {
            if body.contains("does not exist") || body.contains("NotFound") {
                return Ok(None);
            }
            return Err(self.status_error(status, &what, &body));
        }
        serde_json::from_str(&body).map(Some).map_err(|e| {
            Error::engine(
                ENGINE,
                format!("{what} at {}: unexpected answer: {e}", self.display),
            )
        })
    }

    /// `PUT …/collections/{id}` with `new_name`, `new_metadata`, `new_configuration` (migrations).
    pub async fn modify_collection(
        &self,
        db: &str,
        id: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<()> {
        self.send(
            self.request(Method::PUT, self.db_url(db, &["collections", id]))?
                .json(body),
            what,
        )
        .await?;
        Ok(())
    }

    /// Adds one batch whose JSON body was built by the restore's reader thread.
    pub async fn add_raw(&self, db: &str, id: &str, body: Vec<u8>) -> Result<()> {
        self.send(
            self.request(Method::POST, self.db_url(db, &["collections", id, "add"]))?
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
            "add records",
        )
        .await?;
        Ok(())
    }
}

fn not_null(v: Option<&RawValue>) -> Option<&RawValue> {
    v.filter(|r| r.get() != "null")
}

/// Chroma answers errors as `{"error": "...", "message": "..."}`; show the message, or the
/// start of whatever else came back.
fn error_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        message: Option<String>,
    }
    match serde_json::from_str::<E>(body) {
        Ok(E {
            error: Some(e),
            message: Some(m),
        }) => format!("{e}: {m}"),
        Ok(E {
            message: Some(m), ..
        }) => m,
        _ => {
            let t: String = body.trim().chars().take(200).collect();
            if t.is_empty() { "(no body)".into() } else { t }
        }
    }
}

/// Whether a request failed in the TLS handshake (a plain-HTTP port behind `https://`, an
/// untrusted certificate): reqwest files those under "connect", but waiting will not fix them.
fn is_tls_failure(e: &reqwest::Error) -> bool {
    use std::error::Error as _;
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = src {
        if s.is::<rustls::Error>() {
            return true;
        }
        // io::Error's own `source` skips the error it wraps (and tokio-rustls nests them).
        src = match s.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as _),
            None => s.source(),
        };
    }
    false
}

/// Whether the connection was reset or closed before an answer: a server (or Docker's port
/// proxy in front of a container that is not listening yet) that may answer on the next try,
/// so `wait` keeps waiting instead of failing at once.
fn is_dropped_link(e: &reqwest::Error) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind;
    let mut src: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            )
        {
            return true;
        }
        // hyper's IncompleteMessage and Canceled carry no io::Error.
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        src = s.source();
    }
    false
}

/// The error and its causes on one line. reqwest names the request URL, which never holds
/// credentials: they were moved out of the base URL when it was parsed.
fn chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}
