//! The sidecar's settings (`DBKEEPER_SCHEDULE`, `DBKEEPER_LISTEN`, alert thresholds, …),
//! validated once at start-up on top of the shared [`Config`].

use std::time::Duration;

use crate::cli::SidecarArgs;
use crate::config::{Config, EnvLookup, MinFree, scratch_urls};
use crate::error::{Error, Result};
use crate::schedule::Schedule;
use crate::secret::{self, Secret};

/// The sidecar's settings, validated.
pub struct SidecarConfig {
    pub schedule: Schedule,
    pub listen: std::net::SocketAddr,
    pub health_interval: Duration,
    pub max_backup_age: Duration,
    pub min_free: MinFree,
    pub api_token: Option<Secret>,
    pub notify_url: Option<Secret>,
    pub notify_always: bool,
    pub stop_timeout: Duration,
    pub test_restore: Option<Schedule>,
    pub scratch: Vec<Secret>,
    /// The newest set on the remote may be this old before `/health` fails.
    pub remote_max_age: Duration,
    /// Where `/alerts`' database conditions start.
    pub db_alerts: super::db_alerts::Thresholds,
}

impl SidecarConfig {
    pub fn from_args(cfg: &Config, a: &SidecarArgs, env: EnvLookup<'_>) -> Result<SidecarConfig> {
        let tz = env("TZ");
        let schedule = Schedule::parse("DBKEEPER_SCHEDULE", &a.schedule, tz.as_deref())?;
        let listen = a.listen.parse().map_err(|_| {
            Error::config(format!(
                "DBKEEPER_LISTEN={:?}: expected an address such as 0.0.0.0:9216",
                a.listen
            ))
        })?;
        if a.health_interval.is_zero() {
            return Err(Error::config("DBKEEPER_HEALTH_INTERVAL must be above 0s"));
        }
        let max_backup_age = match a.max_backup_age {
            Some(d) if d.is_zero() => {
                return Err(Error::config("DBKEEPER_MAX_BACKUP_AGE must be above 0s"));
            }
            Some(d) => d,
            None => schedule.interval(chrono::Utc::now()) * 2,
        };
        let test_restore = a
            .test_restore_schedule
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|s| Schedule::parse("DBKEEPER_TEST_RESTORE_SCHEDULE", s, tz.as_deref()))
            .transpose()?;
        let scratch = scratch_urls(cfg, &[], env)?;
        if test_restore.is_some() && scratch.is_empty() {
            return Err(Error::config(
                "DBKEEPER_TEST_RESTORE_SCHEDULE is set but no scratch server is: set DBKEEPER_TEST_RESTORE_REDIS_URL (or _MONGODB_URI, _CHROMA_URL)",
            ));
        }
        let notify_url = secret::resolve("DBKEEPER_NOTIFY_URL", a.notify_url.clone(), env)?;
        if let Some(u) = &notify_url {
            match url::Url::parse(u.expose()) {
                Ok(p) if p.scheme() == "http" || p.scheme() == "https" => {}
                _ => {
                    return Err(Error::config(format!(
                        "DBKEEPER_NOTIFY_URL={}: expected an http:// or https:// URL",
                        secret::redact_url(u.expose())
                    )));
                }
            }
        }
        Ok(SidecarConfig {
            schedule,
            listen,
            health_interval: a.health_interval,
            max_backup_age,
            min_free: MinFree::parse(&a.min_free)?,
            api_token: secret::resolve("DBKEEPER_API_TOKEN", a.api_token.clone(), env)?,
            notify_url,
            notify_always: a.notify_on == "always",
            stop_timeout: a.stop_timeout,
            test_restore,
            scratch,
            remote_max_age: match a.remote_max_age {
                Some(d) if d.is_zero() => {
                    return Err(Error::config("DBKEEPER_REMOTE_MAX_AGE must be above 0s"));
                }
                Some(d) => d,
                None => max_backup_age,
            },
            db_alerts: super::db_alerts::Thresholds {
                redis_memory: alert_fraction("DBKEEPER_ALERT_REDIS_MEMORY", &a.alert_redis_memory)?,
                mongodb_connections: alert_fraction(
                    "DBKEEPER_ALERT_MONGODB_CONNECTIONS",
                    &a.alert_mongodb_connections,
                )?,
                replication_lag: a.alert_replication_lag,
                window: match a.alert_window {
                    d if d.is_zero() => {
                        return Err(Error::config("DBKEEPER_ALERT_WINDOW must be above 0s"));
                    }
                    d => d,
                },
                postgres_slot_lag: crate::config::parse_bytes(&a.alert_postgres_slot_lag)
                    .filter(|b| *b > 0)
                    .ok_or_else(|| {
                        Error::config(format!(
                            "DBKEEPER_ALERT_POSTGRES_SLOT_LAG={:?}: expected a size above 0 such as 1GiB or 512MiB",
                            a.alert_postgres_slot_lag
                        ))
                    })?,
            },
        })
    }

    /// One line for the start-up banner; secrets are only said to be set.
    pub fn describe(&self) -> String {
        format!(
            "schedule={:?} tz={} listen={} health_interval={} max_backup_age={} min_free={:?} api_token={} notify={} stop_timeout={} test_restore={}",
            self.schedule.expr(),
            self.schedule.tz(),
            self.listen,
            humantime::format_duration(self.health_interval),
            humantime::format_duration(self.max_backup_age),
            self.min_free,
            if self.api_token.is_some() {
                "set"
            } else {
                "none"
            },
            match &self.notify_url {
                Some(u) => format!(
                    "{}({})",
                    secret::redact_url(u.expose()),
                    if self.notify_always {
                        "always"
                    } else {
                        "failure"
                    }
                ),
                None => "none".into(),
            },
            humantime::format_duration(self.stop_timeout),
            match &self.test_restore {
                Some(s) => format!(
                    "{:?}->[{}]",
                    s.expr(),
                    self.scratch
                        .iter()
                        .map(|u| secret::redact_url(u.expose()))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                None => "off".into(),
            }
        )
    }
}

/// A threshold of an `/alerts` condition: a percentage above 0 and at most 100, as a fraction.
fn alert_fraction(name: &str, s: &str) -> Result<f64> {
    s.trim()
        .strip_suffix('%')
        .and_then(|p| p.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0 && *v <= 100.0)
        .map(|v| v / 100.0)
        .ok_or_else(|| Error::config(format!("{name}={s:?}: expected a percentage such as 90%")))
}
