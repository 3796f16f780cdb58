//! Flags and environment → one validated [`Config`], built once at start-up.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::GlobalArgs;
use crate::engine::{Engine, EngineKind, EngineOps, EngineOptions};
use crate::error::{Error, Result};
use crate::repo::retention::Policy;
use crate::secret::{self, Secret};

pub struct Config {
    pub repo: PathBuf,
    /// Configured engine URLs, in the order mongodb, redis, chroma.
    pub urls: Vec<(EngineKind, Secret)>,
    pub engine_options: EngineOptions,
    pub redis_data_dir: Option<PathBuf>,
    pub retention: Policy,
    pub lock_wait: Duration,
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
        let cfg = Config {
            repo: g.repo.clone(),
            urls,
            engine_options: EngineOptions {
                chroma_token,
                mongo_parallel: g.parallel,
                mongo_include: g.mongodb_include.clone(),
                mongo_exclude: g.mongodb_exclude.clone(),
                chroma_tenant: Some(g.chroma_tenant.clone()),
                chroma_database: Some(g.chroma_database.clone()),
                chroma_auth_header: Some(g.chroma_auth_header.clone()),
            },
            redis_data_dir: g.redis_data_dir.clone(),
            retention: Policy {
                keep_last: g.retention.keep_last,
                keep_daily: g.retention.keep_daily,
                keep_weekly: g.retention.keep_weekly,
                keep_monthly: g.retention.keep_monthly,
            },
            lock_wait: g.lock_wait,
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
                    match k {
                        EngineKind::Mongodb => "DBKEEPER_MONGODB_URI",
                        EngineKind::Redis => "DBKEEPER_REDIS_URL",
                        EngineKind::Chroma => "DBKEEPER_CHROMA_URL",
                    }
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
                "no engine configured: set DBKEEPER_MONGODB_URI, DBKEEPER_REDIS_URL or DBKEEPER_CHROMA_URL",
            ));
        }
        Ok(engines)
    }

    /// One line for the start-up banner: what is configured, URLs redacted.
    pub fn describe(&self) -> String {
        let engines: Vec<String> = self
            .urls
            .iter()
            .map(|(k, u)| format!("{k}={}", secret::redact_url(u.expose())))
            .collect();
        format!(
            "repo={} engines=[{}] retention=last:{},daily:{},weekly:{},monthly:{}",
            self.repo.display(),
            engines.join(" "),
            self.retention.keep_last,
            self.retention.keep_daily,
            self.retention.keep_weekly,
            self.retention.keep_monthly
        )
    }
}
