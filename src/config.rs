//! Flags and environment → one validated [`Config`], built once at start-up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cli::GlobalArgs;
use crate::engine::{Engine, EngineKind, EngineOps, EngineOptions};
use crate::error::{Error, Result};
use crate::repo::crypt::Crypto;
use crate::repo::retention::Policy;
use crate::repo::{Repo, RepoSpec};
use crate::secret::{self, Secret};

pub struct Config {
    pub repo: RepoSpec,
    /// The off-host copy (`DBKEEPER_REMOTE`).
    pub remote: Option<RepoSpec>,
    pub remote_retention: Policy,
    /// age keys (`DBKEEPER_AGE_*`); `None` when sets are not encrypted.
    pub crypto: Option<Arc<Crypto>>,
    pub lock_lease: Duration,
    /// Configured engine URLs, in the order mongodb, redis, chroma.
    pub urls: Vec<(EngineKind, Secret)>,
    pub engine_options: EngineOptions,
    /// Data directories preseeded before their server starts (`DBKEEPER_<ENGINE>_DATA_DIR`).
    pub data_dirs: BTreeMap<EngineKind, PathBuf>,
    pub retention: Policy,
    pub lock_wait: Duration,
    /// Continuous oplog archiving for point-in-time recovery (`DBKEEPER_MONGODB_PITR=on`).
    pub mongo_pitr: bool,
    /// WAL streaming for point-in-time recovery (`DBKEEPER_POSTGRES_PITR=on`).
    pub postgres_pitr: bool,
    /// The replication slot it streams from (`DBKEEPER_POSTGRES_SLOT`).
    pub postgres_slot: String,
    /// A point-in-time preseed of PostgreSQL's data directory (`DBKEEPER_PRESEED_TO_TIME`).
    pub preseed_to_time: Option<DateTime<Utc>>,
    /// How often archived oplog is published (`DBKEEPER_PITR_FLUSH`).
    pub pitr_flush: Duration,
    /// How often the sidecar gathers database statistics (`DBKEEPER_STATS_INTERVAL`). The
    /// bound on labelled collections (`DBKEEPER_STATS_MAX_COLLECTIONS`) is an engine option.
    pub stats_interval: Duration,
}

/// Bounds of `DBKEEPER_STATS_INTERVAL`: below a second the rounds would cost the databases
/// more than the figures are worth; above an hour they are too stale to alert on.
const STATS_INTERVAL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(3600));
/// Bound of `DBKEEPER_STATS_MAX_COLLECTIONS`: each labelled collection is a series per family.
const STATS_MAX_COLLECTIONS: usize = 100_000;

/// `DBKEEPER_STATS_INTERVAL`: a duration with its unit, 1s to 1h.
pub fn parse_stats_interval(s: &str) -> Result<Duration> {
    let (lo, hi) = STATS_INTERVAL;
    let d = crate::cli::parse_duration(s)
        .map_err(|e| Error::config(format!("DBKEEPER_STATS_INTERVAL: {e}")))?;
    if d < lo || d > hi {
        return Err(Error::config(format!(
            "DBKEEPER_STATS_INTERVAL={s:?}: must be between 1s and 1h"
        )));
    }
    Ok(d)
}

/// `DBKEEPER_STATS_MAX_COLLECTIONS`: a count from 1 to 100000.
pub fn parse_stats_max_collections(s: &str) -> Result<usize> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=STATS_MAX_COLLECTIONS).contains(&n) => Ok(n),
        _ => Err(Error::config(format!(
            "DBKEEPER_STATS_MAX_COLLECTIONS={s:?}: expected a count from 1 to {STATS_MAX_COLLECTIONS}"
        ))),
    }
}

/// Where environment variables come from: the process, or a map in tests.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    pub fn from_args(g: &GlobalArgs, env: EnvLookup<'_>) -> Result<Config> {
        let mut urls = Vec::new();
        for (kind, name, flag) in [
            (EngineKind::Mongodb, "DBKEEPER_MONGODB_URI", &g.mongodb_uri),
            (EngineKind::Redis, "DBKEEPER_REDIS_URL", &g.redis_url),
            (EngineKind::Chroma, "DBKEEPER_CHROMA_URL", &g.chroma_url),
            (
                EngineKind::Postgres,
                "DBKEEPER_POSTGRES_URL",
                &g.postgres_url,
            ),
            (
                EngineKind::Rabbitmq,
                "DBKEEPER_RABBITMQ_URL",
                &g.rabbitmq_url,
            ),
        ] {
            if let Some(url) = secret::resolve(name, flag.clone(), env)? {
                let found = EngineKind::from_url(url.expose())
                    .map_err(|e| Error::config(format!("{name}: {e}")))?;
                if found != kind {
                    return Err(Error::config(format!(
                        "{name} must be a {kind} URL, got {}",
                        secret::redact_url(url.expose())
                    )));
                }
                urls.push((kind, url));
            }
        }
        let chroma_token = secret::resolve("DBKEEPER_CHROMA_TOKEN", g.chroma_token.clone(), env)?;
        let rabbitmq_api_url =
            secret::resolve("DBKEEPER_RABBITMQ_API_URL", g.rabbitmq_api_url.clone(), env)?;
        let data_dirs = [
            (EngineKind::Redis, &g.redis_data_dir),
            (EngineKind::Postgres, &g.postgres_data_dir),
            (EngineKind::Chroma, &g.chroma_data_dir),
        ]
        .into_iter()
        .filter_map(|(k, d)| Some((k, d.clone()?)))
        .collect();
        if !crate::engine::postgres::pitr::valid_slot_name(&g.postgres_slot) {
            return Err(Error::config(format!(
                "DBKEEPER_POSTGRES_SLOT={:?}: a slot name is 1 to 63 lower-case letters, digits and underscores",
                g.postgres_slot
            )));
        }
        let preseed_to_time = match g.preseed_to_time.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(crate::role::pitr::parse_instant(t).map_err(|_| {
                Error::config(format!(
                    "DBKEEPER_PRESEED_TO_TIME={t:?}: expected an RFC 3339 time such as 2026-12-04T10:31:07Z"
                ))
            })?),
        };
        let repo = RepoSpec::parse("DBKEEPER_REPO", &g.repo, env)?;
        let remote = match g
            .remote_repo
            .as_deref()
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            None => None,
            Some(r) => match RepoSpec::parse("DBKEEPER_REMOTE", r, env)? {
                s @ RepoSpec::S3(_) => Some(s),
                RepoSpec::Local(_) => {
                    return Err(Error::config(format!(
                        "DBKEEPER_REMOTE={r:?}: expected s3://bucket/prefix (the off-host copy lives on object storage)"
                    )));
                }
            },
        };
        if g.pitr_flush < Duration::from_millis(100) || g.pitr_flush > Duration::from_secs(3600) {
            return Err(Error::config(
                "DBKEEPER_PITR_FLUSH must be between 100ms and 1h",
            ));
        }
        let stats_interval = parse_stats_interval(&g.stats_interval)?;
        let stats_max_collections = parse_stats_max_collections(&g.stats_max_collections)?;
        if g.lock_lease < Duration::from_secs(3) {
            return Err(Error::config("DBKEEPER_LOCK_LEASE must be at least 3s"));
        }
        let local = Policy {
            keep_last: g.retention.keep_last,
            keep_daily: g.retention.keep_daily,
            keep_weekly: g.retention.keep_weekly,
            keep_monthly: g.retention.keep_monthly,
        };
        let r = &g.remote_retention;
        let cfg = Config {
            repo,
            remote,
            remote_retention: Policy {
                keep_last: r.remote_keep_last.unwrap_or(local.keep_last),
                keep_daily: r.remote_keep_daily.unwrap_or(local.keep_daily),
                keep_weekly: r.remote_keep_weekly.unwrap_or(local.keep_weekly),
                keep_monthly: r.remote_keep_monthly.unwrap_or(local.keep_monthly),
            },
            crypto: Crypto::from_env(env)?.map(Arc::new),
            lock_lease: g.lock_lease,
            urls,
            engine_options: EngineOptions {
                chroma_token,
                mongo_parallel: g.parallel,
                mongo_include: g.mongodb_include.clone(),
                mongo_exclude: g.mongodb_exclude.clone(),
                mongo_replset: g
                    .mongodb_replset
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned),
                mongo_replset_members: g
                    .mongodb_replset_members
                    .iter()
                    .map(|m| m.trim().to_owned())
                    .filter(|m| !m.is_empty())
                    .collect(),
                mongo_read_preference: Some(g.mongodb_read_preference.clone()),
                mongo_user_passwords_file: g.mongodb_user_passwords_file.clone(),
                chroma_tenant: Some(g.chroma_tenant.clone()),
                chroma_database: Some(g.chroma_database.clone()),
                chroma_auth_header: Some(g.chroma_auth_header.clone()),
                stats_max_collections: Some(stats_max_collections),
                redis_tls_cert_file: g.redis_tls_cert_file.clone(),
                redis_tls_key_file: g.redis_tls_key_file.clone(),
                rabbitmq_api_url,
            },
            data_dirs,
            retention: local,
            lock_wait: g.lock_wait,
            mongo_pitr: g.mongodb_pitr == "on",
            postgres_pitr: g.postgres_pitr == "on",
            postgres_slot: g.postgres_slot.clone(),
            preseed_to_time,
            pitr_flush: g.pitr_flush,
            stats_interval,
        };
        // Validate every URL now, so a typo fails at start-up with exit 2.
        cfg.engines(&[])?;
        Ok(cfg)
    }

    /// The configured engines, restricted to `only` when it is not empty.
    pub fn engines(&self, only: &[String]) -> Result<Vec<Engine>> {
        let only: Vec<EngineKind> = only
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| EngineKind::from_name(s))
            .collect::<Result<_>>()?;
        let mut out = Vec::new();
        for (kind, url) in &self.urls {
            if only.is_empty() || only.contains(kind) {
                out.push(Engine::from_url(url, &self.engine_options)?);
            }
        }
        for k in &only {
            if !out.iter().any(|e| e.kind() == *k) {
                return Err(Error::config(format!(
                    "--only names {k}, but no {k} URL is configured (set {})",
                    k.url_env()
                )));
            }
        }
        Ok(out)
    }

    /// Like [`Config::engines`], but an empty result is a configuration error: verbs that act
    /// on engines say what to set instead of silently doing nothing.
    pub fn engines_required(&self, only: &[String]) -> Result<Vec<Engine>> {
        let engines = self.engines(only)?;
        if engines.is_empty() {
            return Err(Error::config(
                "no engine configured: set DBKEEPER_MONGODB_URI, DBKEEPER_REDIS_URL, DBKEEPER_CHROMA_URL, DBKEEPER_POSTGRES_URL or DBKEEPER_RABBITMQ_URL",
            ));
        }
        Ok(engines)
    }

    /// What `preseed` and `init` act on: the engines with a URL, and the engines seeded
    /// through their data directory (`DBKEEPER_<ENGINE>_DATA_DIR`) without a URL. Those servers
    /// are not running, so the data directory is all the preseed needs. An empty result is a
    /// configuration error.
    pub fn preseed_targets(&self, only: &[String]) -> Result<(Vec<Engine>, Vec<EngineKind>)> {
        let named: Vec<EngineKind> = only
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| EngineKind::from_name(s))
            .collect::<Result<_>>()?;
        let has_url = |k: EngineKind| self.urls.iter().any(|(u, _)| *u == k);
        let dir_only: Vec<EngineKind> = self
            .data_dirs
            .keys()
            .copied()
            .filter(|k| !has_url(*k) && (named.is_empty() || named.contains(k)))
            .collect();
        if dir_only.is_empty() {
            return Ok((self.engines_required(only)?, dir_only));
        }
        let others: Vec<String> = named
            .iter()
            .filter(|k| !dir_only.contains(k))
            .map(|k| k.name().to_owned())
            .collect();
        // `engines(&[])` means "all": `--only redis` alone leaves no other engine.
        let engines = if !named.is_empty() && others.is_empty() {
            Vec::new()
        } else {
            self.engines(&others)?
        };
        Ok((engines, dir_only))
    }

    /// Opens the repository (one request to check a bucket).
    pub fn open_repo(&self) -> Result<Repo> {
        Ok(Repo::open(&self.repo, self.crypto.clone())?.with_lease(self.lock_lease))
    }

    /// Opens the off-host copy, when one is configured.
    pub fn open_remote(&self) -> Result<Option<Repo>> {
        self.remote
            .as_ref()
            .map(|r| Ok(Repo::open(r, self.crypto.clone())?.with_lease(self.lock_lease)))
            .transpose()
    }

    /// One line for the start-up banner: what is configured, URLs redacted.
    pub fn describe(&self) -> String {
        let engines: Vec<String> = self
            .urls
            .iter()
            .map(|(k, u)| format!("{k}={}", secret::redact_url(u.expose())))
            .collect();
        let policy = |p: &Policy| {
            format!(
                "last:{},daily:{},weekly:{},monthly:{}",
                p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly
            )
        };
        let mut line = format!(
            "repo={} engines=[{}] retention={}",
            self.repo.display(),
            engines.join(" "),
            policy(&self.retention)
        );
        if let Some(r) = &self.remote {
            line += &format!(
                " remote={} remote_retention={}",
                r.display(),
                policy(&self.remote_retention)
            );
        }
        line += &format!(
            " encryption={}",
            self.crypto
                .as_ref()
                .map_or_else(|| "off".to_owned(), |c| c.describe())
        );
        line
    }
}

/// Where the repository's free-space alert starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// Percent of the filesystem's size.
    Percent(f64),
    Bytes(u64),
}

impl MinFree {
    pub fn parse(s: &str) -> Result<MinFree> {
        let t = s.trim();
        let bad = || {
            Error::config(format!(
                "DBKEEPER_MIN_FREE={s:?}: expected a percentage such as 10% or a size such as 5GiB"
            ))
        };
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&v) {
                return Err(bad());
            }
            return Ok(MinFree::Percent(v));
        }
        parse_bytes(t).map(MinFree::Bytes).ok_or_else(bad)
    }

    /// Whether `free` of `total` bytes is below the threshold.
    pub fn is_low(&self, free: u64, total: u64) -> bool {
        match *self {
            MinFree::Percent(p) => total > 0 && (free as f64) * 100.0 < p * total as f64,
            MinFree::Bytes(b) => free < b,
        }
    }
}

/// A size such as `5GiB`, `512M` or `1000000`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    {
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

/// The scratch servers test-restore may wipe: `--into` URLs, else the
/// `DBKEEPER_TEST_RESTORE_*` variables. A scratch URL that is also a configured engine URL is
/// refused: wiping it would destroy the data the backups protect.
pub fn scratch_urls(cfg: &Config, into: &[String], env: EnvLookup<'_>) -> Result<Vec<Secret>> {
    let mut urls: Vec<Secret> = into
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| Secret::new(s.trim().to_owned()))
        .collect();
    if urls.is_empty() {
        for name in [
            "DBKEEPER_TEST_RESTORE_MONGODB_URI",
            "DBKEEPER_TEST_RESTORE_REDIS_URL",
            "DBKEEPER_TEST_RESTORE_CHROMA_URL",
        ] {
            if let Some(u) = secret::resolve(name, None, env)? {
                urls.push(u);
            }
        }
    }
    let mut kinds = Vec::new();
    for u in &urls {
        let kind = EngineKind::from_url(u.expose())?;
        if kinds.contains(&kind) {
            return Err(Error::config(format!(
                "two scratch {kind} URLs given; test-restore takes one per engine"
            )));
        }
        kinds.push(kind);
        if cfg
            .urls
            .iter()
            .any(|(_, p)| same_server(p.expose(), u.expose()))
        {
            return Err(Error::config(format!(
                "scratch URL {} is also a configured engine; test-restore wipes its target, so it must be a separate scratch server",
                secret::redact_url(u.expose())
            )));
        }
    }
    Ok(urls)
}

/// Whether two engine URLs point at the same server (scheme, host and port; the database
/// number or path does not make a Redis or MongoDB server a different one).
fn same_server(a: &str, b: &str) -> bool {
    fn key(raw: &str) -> Option<(EngineKind, String, u16)> {
        let u = url::Url::parse(raw).ok()?;
        let kind = EngineKind::from_url(raw).ok()?;
        let host = u.host_str()?.trim_matches(['[', ']']).to_ascii_lowercase();
        let host = match host.as_str() {
            "localhost" | "::1" => "127.0.0.1".to_owned(),
            _ => host,
        };
        let port = u.port_or_known_default().or(match kind {
            EngineKind::Redis => Some(6379),
            EngineKind::Mongodb => Some(27017),
            EngineKind::Postgres => Some(5432),
            EngineKind::Rabbitmq => Some(5672),
            EngineKind::Chroma => None,
        })?;
        Some((kind, host, port))
    }
    match (key(a), key(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod sidecar_tests {
    use super::*;

    #[test]
    fn min_free_parses_percent_and_sizes() {
        assert_eq!(MinFree::parse("10%").unwrap(), MinFree::Percent(10.0));
        assert_eq!(MinFree::parse("5GiB").unwrap(), MinFree::Bytes(5 << 30));
        assert_eq!(MinFree::parse("100").unwrap(), MinFree::Bytes(100));
        for bad in ["", "ten", "110%", "-1%", "5XB", "%"] {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert!(MinFree::Percent(10.0).is_low(9, 100));
        assert!(!MinFree::Percent(10.0).is_low(10, 100));
        assert!(MinFree::Bytes(10).is_low(9, 1000));
    }

    #[test]
    fn stats_settings_are_bounded() {
        assert_eq!(
            parse_stats_interval("15s").unwrap(),
            Duration::from_secs(15)
        );
        assert_eq!(
            parse_stats_interval("1h").unwrap(),
            Duration::from_secs(3600)
        );
        for bad in ["", "15", "fast", "500ms", "2h", "0s"] {
            let e = parse_stats_interval(bad).unwrap_err().to_string();
            assert!(e.contains("DBKEEPER_STATS_INTERVAL"), "{bad}: {e}");
        }
        assert_eq!(parse_stats_max_collections("100").unwrap(), 100);
        for bad in ["0", "-1", "many", "100001", ""] {
            assert!(parse_stats_max_collections(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn same_server_ignores_db_and_credentials() {
        assert!(same_server(
            "redis://:pw@127.0.0.1:6379/0",
            "redis://127.0.0.1/3"
        ));
        assert!(!same_server(
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6380"
        ));
        assert!(!same_server("redis://a:6379", "redis://b:6379"));
        assert!(same_server("redis://localhost", "rediss://127.0.0.1:6379"));
        assert!(same_server("mongodb://m/db", "mongodb://u:p@m:27017/"));
    }
}
