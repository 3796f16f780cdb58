//! PostgreSQL engine: readiness and health over the frontend/backend protocol (startup,
//! authentication, one query); a physical base backup over the replication protocol
//! (`basebackup`), its deep verify without a server (`verify`), and the pre-start preseed of
//! an empty PGDATA (`datadir`). A running server cannot load a physical backup: online
//! restore, wipe and the marker refuse, pointing at the preseed.

mod basebackup;
mod client;
mod datadir;
mod verify;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

use client::Conn;

pub(crate) const ENGINE: &str = "postgres";

/// Admin connections (is_empty) get this long to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the URL says: where, who, which database, and how TLS is used.
#[derive(Clone)]
pub(crate) struct PgConfig {
    host: String,
    port: u16,
    user: String,
    password: Option<Secret>,
    dbname: String,
    display: String,
    ssl: SslMode,
    /// Unless `sslmode=disable`.
    tls: Option<TlsSetup>,
}

/// The rustls side of a URL that may use TLS.
#[derive(Clone)]
struct TlsSetup {
    config: Arc<rustls::ClientConfig>,
    /// What the certificate is checked against, for messages: `None` when it is not checked.
    trust: Option<&'static str>,
}

/// libpq's `sslmode`: whether TLS is tried, insisted on, and whose certificate is believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain text only.
    Disable,
    /// Plain text first; TLS if the server refuses that.
    Allow,
    /// TLS if the server offers it, else plain text (libpq's default).
    Prefer,
    /// TLS or nothing; the certificate is checked only when `sslrootcert` names a CA.
    Require,
    /// TLS, the certificate signed by the CA of `sslrootcert`.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The URL's TLS parameters, before the files they name are read.
#[derive(Default)]
struct TlsParams {
    mode: Option<SslMode>,
    rootcert: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl TlsParams {
    /// The rustls configuration the parameters ask for (`None` for `disable`) and what the
    /// certificate is checked against, as libpq reads them: a root certificate makes every
    /// TLS mode check the chain; `sslrootcert=system` (the system's CAs, or `SSL_CERT_FILE`)
    /// only goes with `verify-full`, which without `sslrootcert` trusts the system's CAs too.
    /// The error is a configuration error's text.
    fn build(self) -> std::result::Result<(SslMode, Option<TlsSetup>), String> {
        use crate::engine::tls::{ClientCert, Verify, client_config, pem_roots, system_roots};
        let mode = self.mode.unwrap_or(SslMode::Prefer);
        if mode == SslMode::Disable {
            return Ok((mode, None));
        }
        let system = || {
            system_roots().ok_or_else(|| {
                "no trusted CA certificate found on the system; set SSL_CERT_FILE to a PEM bundle or sslrootcert=PATH".to_owned()
            })
        };
        let root = |p: &str| pem_roots(Path::new(p)).map_err(|e| format!("sslrootcert={e}"));
        let (verify, trust) = match (mode, self.rootcert.as_deref()) {
            (SslMode::VerifyFull, None | Some("system")) => (
                Verify::Full(system()?),
                Some("the system's CA certificates"),
            ),
            (_, Some("system")) => {
                return Err(format!(
                    "sslrootcert=system needs sslmode=verify-full, not {}: the system's CAs sign certificates for any host",
                    mode.name()
                ));
            }
            (SslMode::VerifyCa, None) => {
                return Err(
                    "sslmode=verify-ca needs sslrootcert=PATH, the CA certificate that signed the server's (or use verify-full, which can trust the system's CAs)"
                        .to_owned(),
                );
            }
            (SslMode::VerifyFull, Some(p)) => (Verify::Full(root(p)?), Some("sslrootcert")),
            (_, Some(p)) => (Verify::Chain(root(p)?), Some("sslrootcert")),
            (_, None) => (Verify::Nothing, None),
        };
        let cert = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                Some(ClientCert::load(c, k).map_err(|e| format!("sslcert/sslkey: {e}"))?)
            }
            (Some(_), None) => return Err("sslcert is set but sslkey is not; set both".into()),
            (None, Some(_)) => return Err("sslkey is set but sslcert is not; set both".into()),
        };
        let config = client_config(verify, cert).map_err(|e| format!("TLS: {e}"))?;
        Ok((mode, Some(TlsSetup { config, trust })))
    }
}

impl PgConfig {
    pub fn parse(url: &Secret) -> Result<Self> {
        let raw = url.expose();
        let display = redact_url(raw);
        let bad = |why: &str| Error::config(format!("{display}: {why}"));
        let u = url::Url::parse(raw).map_err(|e| bad(&format!("not a valid URL ({e})")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(bad("scheme is not postgres:// or postgresql://"));
        }
        let host = crate::engine::net::url_host(&u).ok_or_else(|| bad("no host"))?;
        let decode = |s: &str| -> Result<String> {
            crate::engine::net::url_decode(s)
                .ok_or_else(|| bad("user, password or database is not valid UTF-8 once decoded"))
        };
        let user = match u.username() {
            "" => "postgres".to_owned(),
            name => decode(name)?,
        };
        let password = match u.password() {
            None | Some("") => None,
            Some(p) => Some(Secret::new(decode(p)?)),
        };
        let dbname = match u.path().trim_start_matches('/') {
            "" => user.clone(),
            p => decode(p)?,
        };
        let mut tls = TlsParams::default();
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "sslmode" => {
                    tls.mode = Some(SslMode::parse(&v).ok_or_else(|| {
                        bad(&format!(
                            "sslmode={v}: not disable, allow, prefer, require, verify-ca or verify-full"
                        ))
                    })?);
                }
                "sslrootcert" => tls.rootcert = Some(v.into_owned()),
                "sslcert" => tls.cert = Some(PathBuf::from(v.as_ref())),
                "sslkey" => tls.key = Some(PathBuf::from(v.as_ref())),
                "connect_timeout" | "application_name" => {}
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        let (ssl, tls) = tls.build().map_err(|why| bad(&why))?;
        if tls.is_some() && rustls::pki_types::ServerName::try_from(host.as_str()).is_err() {
            return Err(bad(&format!(
                "{host} is not a host name TLS can check; use sslmode=disable or the server's DNS name"
            )));
        }
        Ok(PgConfig {
            host,
            port: u.port().unwrap_or(5432),
            user,
            password,
            dbname,
            display,
            ssl,
            tls,
        })
    }

    fn unreachable(&self, message: impl Into<String>) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::Refused {
            engine: ENGINE,
            url: self.display.clone(),
            message: message.into(),
        }
    }
}

pub struct PostgresEngine {
    cfg: PgConfig,
}

impl PostgresEngine {
    pub fn new(url: &Secret, _opts: &EngineOptions) -> Result<Self> {
        Ok(PostgresEngine {
            cfg: PgConfig::parse(url)?,
        })
    }

    /// One connection: startup, authentication, then `SELECT pg_is_in_recovery()`. The version
    /// comes with the startup answer (`server_version`), so a probe is three round trips.
    async fn check(&self, timeout: Duration) -> Result<(Probe, bool)> {
        let run = async {
            let mut c = Conn::connect(&self.cfg, timeout, false).await?;
            let rows = c.query("SELECT pg_is_in_recovery()").await?;
            let recovery =
                matches!(rows.first().and_then(|r| r.first()), Some(Some(v)) if v == "t");
            let version = c.params.get("server_version").map(|v| {
                // "15.14 (Debian 15.14-0+deb12u1)": the number is the version.
                v.split_whitespace().next().unwrap_or(v).to_owned()
            });
            c.terminate().await;
            Ok::<_, Error>((version, recovery))
        };
        let (version, recovery) = match tokio::time::timeout(timeout, run).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(self
                    .cfg
                    .unreachable(format!("no answer within {timeout:?}")));
            }
        };
        let role = if recovery { "standby" } else { "primary" };
        Ok((
            Probe {
                version,
                detail: format!("role={role}"),
            },
            recovery,
        ))
    }
}

/// Offline check of a set's PostgreSQL part.
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    verify::verify_deep(set, entry, cancel)
}

impl EngineOps for PostgresEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Postgres
    }
    fn display_url(&self) -> &str {
        &self.cfg.display
    }

    /// Health: a primary or a standby that answers a query is healthy.
    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        Ok(self.check(timeout).await?.0)
    }

    /// Readiness: a server still in recovery (a standby, or one replaying WAL after a
    /// preseed) is "not yet".
    async fn ready(&self, timeout: Duration) -> Result<Probe> {
        let (p, recovery) = self.check(timeout).await?;
        if recovery {
            return Err(self.cfg.unreachable(
                "in recovery (a standby, or still replaying WAL): not taking writes yet",
            ));
        }
        Ok(p)
    }

    /// Whether the server holds user data: databases besides `postgres` and the templates,
    /// or tables outside the system schemas of the database the URL names.
    async fn is_empty(&self) -> Result<Emptiness> {
        let mut c = Conn::connect(&self.cfg, CONNECT_TIMEOUT, false).await?;
        let dbs = c
            .query(
                "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres','template0','template1') ORDER BY 1",
            )
            .await?;
        let tables = c
            .query(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r','p','m') AND n.nspname NOT IN ('pg_catalog','information_schema') \
                 AND n.nspname NOT LIKE 'pg_toast%'",
            )
            .await?;
        c.terminate().await;
        let names: Vec<String> = dbs
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let ntables: u64 = tables
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(match (names.is_empty(), ntables) {
            (true, 0) => Emptiness::Empty,
            _ => Emptiness::HasData(format!(
                "databases [{}], {ntables} tables in {}",
                names.join(", "),
                self.cfg.dbname
            )),
        })
    }

    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        basebackup::dump(&self.cfg, out, cancel).await
    }

    async fn restore(
        &self,
        _set: &SetReader,
        _entry: &EngineEntry,
        _opts: &RestoreOptions,
        _cancel: &CancellationToken,
    ) -> Result<Counts> {
        Err(online_restore())
    }

    async fn wipe(&self) -> Result<()> {
        Err(online_restore())
    }

    async fn set_marker(&self, _on: bool) -> Result<()> {
        Err(online_restore())
    }
}

/// A running server cannot load a physical backup.
fn online_restore() -> Error {
    Error::config(
        "a running PostgreSQL server cannot load a physical backup; preseed its empty data directory before it starts (DBKEEPER_POSTGRES_DATA_DIR)",
    )
}

pub use datadir::{data_dir_state, preseed_data_dir};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_defaults_and_refusals() {
        let c = PgConfig::parse(&Secret::new("postgres://h")).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.dbname.as_str()),
            ("h", 5432, "postgres", "postgres")
        );
        let c = PgConfig::parse(&Secret::new(
            "postgresql://u:p%40ss@h:6000/app?sslmode=disable",
        ))
        .unwrap();
        assert_eq!(
            (c.port, c.user.as_str(), c.dbname.as_str()),
            (6000, "u", "app")
        );
        assert_eq!(c.password.unwrap().expose(), "p@ss");
        assert!(PgConfig::parse(&Secret::new("postgres://h/db?bogus=1")).is_err());
    }

    fn parse(url: &str) -> Result<PgConfig> {
        PgConfig::parse(&Secret::new(url))
    }

    fn refusal(url: &str) -> String {
        let e = parse(url).err().expect("refused");
        assert!(matches!(e, Error::Config(_)), "{e}");
        let e = e.to_string();
        assert!(!e.contains("secret") && !e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn sslmode_as_libpq_reads_it() {
        // libpq's default is prefer: TLS when offered.
        // What the certificate is checked against, when TLS is on at all.
        let trust = |c: &PgConfig| c.tls.as_ref().map(|t| t.trust);
        let c = parse("postgres://h").unwrap();
        assert_eq!((c.ssl, trust(&c)), (SslMode::Prefer, Some(None)));
        let c = parse("postgres://h?sslmode=disable").unwrap();
        assert_eq!((c.ssl, c.tls.is_some()), (SslMode::Disable, false));
        for (mode, want) in [("allow", SslMode::Allow), ("require", SslMode::Require)] {
            let c = parse(&format!("postgres://u:secret@h/?sslmode={mode}")).unwrap();
            assert_eq!((c.ssl, trust(&c)), (want, Some(None)));
        }
        let e = refusal("postgres://u:secret@h/?sslmode=verify");
        assert!(e.contains("sslmode=verify:"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        // Not a certificate: refused at start-up, naming the file.
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = refusal(&format!(
            "postgres://u:secret@h/?sslmode=verify-full&sslrootcert={}",
            ca.display()
        ));
        assert!(e.contains("sslrootcert=") && e.contains("ca.crt"), "{e}");
        let e = refusal(&format!(
            "postgres://u:secret@h/?sslmode=verify-ca&sslrootcert={}",
            dir.path().join("missing.crt").display()
        ));
        assert!(
            e.contains("missing.crt") && e.contains("cannot read"),
            "{e}"
        );
        // verify-ca without a CA of its own would take any certificate a public CA signed.
        let e = refusal("postgres://u:secret@h/?sslmode=verify-ca");
        assert!(e.contains("sslrootcert=PATH"), "{e}");
        let e = refusal("postgres://u:secret@h/?sslmode=require&sslrootcert=system");
        assert!(e.contains("verify-full"), "{e}");
        let e = refusal("postgres://u:secret@h/?sslmode=require&sslcert=/c.pem");
        assert!(e.contains("sslkey"), "{e}");
    }

    #[test]
    fn data_dir_with_pg_version_has_data() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(data_dir_state(d.path()).unwrap(), Emptiness::Empty);
        std::fs::write(d.path().join("PG_VERSION"), "15\n").unwrap();
        match data_dir_state(d.path()).unwrap() {
            Emptiness::HasData(w) => assert!(w.contains("PostgreSQL 15"), "{w}"),
            other => panic!("{other:?}"),
        }
        assert!(data_dir_state(&d.path().join("missing")).is_err());
    }
}
