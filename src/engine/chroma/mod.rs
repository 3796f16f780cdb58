//! Chroma engine: readiness over the v2 HTTP API (v1 fallback), and a logical export/restore
//! of every collection of a tenant's database(s) that survives Chroma's on-disk format changes.
//!
//! - `api`: the HTTP client (auth header, TLS, error mapping) and the endpoints we use.
//! - `format`: the export format on disk (shared by dump, restore and deep verify).
//! - `dump`, `restore`: the two data paths, streamed one page/batch at a time.
//! - `datacopy`, `datadir`: data copies (a persist directory stored file by file) and their
//!   preseed into a stopped server's volume.

pub(crate) mod api;
pub mod datacopy;
mod datadir;
mod dump;
pub mod format;
mod restore;
mod stats;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use url::Url;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub use datadir::{data_dir_state, preseed_data_dir};

/// Deep verification of the Chroma part of a set: a data copy or a logical export.
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    if datacopy::is_data_copy(entry) {
        datacopy::verify_deep(set, entry, cancel)
    } else {
        format::verify_deep(set, entry, cancel)
    }
}

pub(crate) const ENGINE: &str = "chroma";

/// The collection that marks a restore in progress. Chroma names must start and end with an
/// alphanumeric character, so it cannot hide behind a leading underscore.
pub const MARKER: &str = "dbkeeper.restore-in-progress";

/// Where the marker lives when every database of a tenant is selected.
const MARKER_DATABASE: &str = "default_database";

/// Which databases of the tenant an engine covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Databases {
    One(String),
    /// `*`: every database of the tenant (restore recreates each by its name).
    All,
}

/// The header a token travels in; Chroma's token provider reads one or the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthHeader {
    /// `Authorization: Bearer <token>` (Chroma's default).
    Bearer,
    /// `X-Chroma-Token: <token>`.
    XChromaToken,
}

/// Everything the engine needs, validated once; building it connects to nothing.
#[derive(Debug, Clone)]
pub struct ChromaConfig {
    /// Scheme, host, port and any path prefix (a reverse proxy's), without credentials.
    pub base: Url,
    pub tenant: String,
    pub databases: Databases,
    pub token: Option<Secret>,
    pub header: AuthHeader,
    /// `user:password` from the URL, sent as HTTP basic auth (Chroma 0.4/0.5's basic provider).
    pub basic: Option<(String, Secret)>,
}

impl ChromaConfig {
    pub fn parse(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let display = redact_url(url.expose());
        let mut base = Url::parse(url.expose())
            .map_err(|e| Error::config(format!("{display}: not a valid Chroma URL ({e})")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(Error::config(format!(
                "{display}: a Chroma URL is http(s)://host[:port][/prefix]"
            )));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(Error::config(format!(
                "{display}: a Chroma URL takes no query or fragment (the token goes in DBKEEPER_CHROMA_TOKEN)"
            )));
        }
        let basic = if base.username().is_empty() {
            None
        } else {
            let user = percent_decode(base.username());
            let pass = Secret::new(percent_decode(base.password().unwrap_or("")));
            Some((user, pass))
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        // Endpoints are joined onto the path, so it must end with a slash.
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let tenant = opts
            .chroma_tenant
            .clone()
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| "default_tenant".into());
        let databases = match opts.chroma_database.as_deref().map(str::trim) {
            None | Some("") => Databases::One("default_database".into()),
            Some("*") => Databases::All,
            Some(d) => Databases::One(d.to_owned()),
        };
        let header = match opts
            .chroma_auth_header
            .as_deref()
            .map(|h| h.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") | Some("authorization") => AuthHeader::Bearer,
            Some("x-chroma-token") => AuthHeader::XChromaToken,
            Some(other) => {
                return Err(Error::config(format!(
                    "DBKEEPER_CHROMA_AUTH_HEADER={other:?}: expected authorization or x-chroma-token"
                )));
            }
        };
        Ok(ChromaConfig {
            base,
            tenant,
            databases,
            token: opts.chroma_token.clone(),
            header,
            basic,
        })
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub struct ChromaEngine {
    display: String,
    /// Boxed: the engine enum stays small whichever engine it holds.
    api: Box<api::Api>,
    /// `DBKEEPER_STATS_MAX_COLLECTIONS`.
    max_collections: Option<usize>,
}

impl ChromaEngine {
    pub fn new(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let cfg = ChromaConfig::parse(url, opts)?;
        let display = redact_url(url.expose());
        Ok(ChromaEngine {
            api: Box::new(api::Api::new(cfg, display.clone())),
            display,
            max_collections: opts.stats_max_collections,
        })
    }

    pub fn config(&self) -> &ChromaConfig {
        &self.api.cfg
    }

    /// The HTTP client, for the migrations' history, lock and operations.
    pub(crate) fn api(&self) -> &api::Api {
        &self.api
    }

    /// The databases to look at now: the configured one, or every one the tenant has.
    async fn databases(&self) -> Result<Vec<String>> {
        match &self.api.cfg.databases {
            Databases::One(d) => Ok(vec![d.clone()]),
            Databases::All => self.api.list_databases().await,
        }
    }

    fn marker_database(&self) -> &str {
        match &self.api.cfg.databases {
            Databases::One(d) => d,
            Databases::All => MARKER_DATABASE,
        }
    }
}

impl EngineOps for ChromaEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Chroma
    }

    fn display_url(&self) -> &str {
        &self.display
    }

    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        self.api.probe(timeout).await
    }

    async fn stats(&self, timeout: Duration) -> Result<Vec<crate::stats::Family>> {
        self.gather_stats(timeout).await
    }

    async fn is_empty(&self) -> Result<Emptiness> {
        let mut found: Vec<String> = Vec::new();
        let mut total = 0usize;
        let mut marked = false;
        for db in self.databases().await? {
            for c in self.api.list_collections(&db).await? {
                if c.name == MARKER {
                    marked = true;
                } else {
                    total += 1;
                    if found.len() < 3 {
                        found.push(format!("{db}/{}", c.name));
                    }
                }
            }
        }
        Ok(if marked {
            Emptiness::Interrupted
        } else if total == 0 {
            Emptiness::Empty
        } else {
            Emptiness::HasData(format!(
                "{total} collection{} ({}{})",
                if total == 1 { "" } else { "s" },
                found.join(", "),
                if total > found.len() { ", …" } else { "" }
            ))
        })
    }

    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        dump::dump(&self.api, &self.databases().await?, out, cancel).await
    }

    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        _opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        restore::restore(&self.api, set, entry, cancel).await
    }

    async fn wipe(&self) -> Result<()> {
        for db in self.databases().await? {
            for c in self.api.list_collections(&db).await? {
                // The restore marker outlives a wipe: `restore --force` sets it first.
                if c.name != MARKER {
                    self.api.delete_collection(&db, &c.name).await?;
                }
            }
        }
        Ok(())
    }

    async fn set_marker(&self, on: bool) -> Result<()> {
        let db = self.marker_database().to_owned();
        if on {
            self.api.ensure_database(&db).await?;
            self.api.create_marker(&db, MARKER).await
        } else {
            self.api.delete_collection_if_exists(&db, MARKER).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> EngineOptions {
        EngineOptions::default()
    }

    #[test]
    fn url_and_options_parse() {
        let c = ChromaConfig::parse(&Secret::new("http://chroma:8000"), &opts()).unwrap();
        assert_eq!(c.base.as_str(), "http://chroma:8000/");
        assert_eq!(c.tenant, "default_tenant");
        assert_eq!(c.databases, Databases::One("default_database".into()));
        assert_eq!(c.header, AuthHeader::Bearer);
        let o = EngineOptions {
            chroma_tenant: Some("t1".into()),
            chroma_database: Some("*".into()),
            chroma_auth_header: Some("X-Chroma-Token".into()),
            ..opts()
        };
        let c = ChromaConfig::parse(&Secret::new("https://u:p%40ss@h/prefix"), &o).unwrap();
        assert_eq!(c.base.as_str(), "https://h/prefix/");
        assert_eq!(c.databases, Databases::All);
        assert_eq!(c.header, AuthHeader::XChromaToken);
        let (u, p) = c.basic.unwrap();
        assert_eq!((u.as_str(), p.expose()), ("u", "p@ss"));
    }

    #[test]
    fn bad_urls_and_headers_are_configuration_errors() {
        for bad in ["http://", "http://h:8000/?token=x", "ftp://h"] {
            let e = ChromaConfig::parse(&Secret::new(bad), &opts()).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(!e.to_string().contains("token=x"));
        }
        let o = EngineOptions {
            chroma_auth_header: Some("cookie".into()),
            ..opts()
        };
        assert!(matches!(
            ChromaConfig::parse(&Secret::new("http://h"), &o),
            Err(Error::Config(_))
        ));
    }
}
