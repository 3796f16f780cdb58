//! Redis migrations: the history hash and the `SET NX PX` lease in the URL's db, and command
//! lines sent as they are, on the db the last `SELECT` line named.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::files::{MigrationFile, Script};
use super::{Applied, HISTORY, StepError};
use crate::error::{Error, Result};
use crate::secret::{Secret, redact_url};

const ENGINE: &str = "redis";
const LOCK: &str = "dbkeeper_schema_lock";

/// Deletes or renews the lease only if it is still ours.
const UNLOCK: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

pub struct RedisTarget {
    client: redis::Client,
    display: String,
}

impl RedisTarget {
    pub fn connect(url: &Secret) -> Result<RedisTarget> {
        let display = redact_url(url.expose());
        // rediss:// needs a rustls provider; the crate is built with ring only.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = redis::Client::open(url.expose())
            .map_err(|e| Error::config(format!("{display}: {e}")))?;
        Ok(RedisTarget { client, display })
    }

    async fn with<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T> + Send + 'static,
    ) -> Result<T> {
        let client = self.client.clone();
        let display = self.display.clone();
        tokio::task::spawn_blocking(move || {
            let mut con = client
                .get_connection_with_timeout(Duration::from_secs(10))
                .map_err(|e| Error::engine(ENGINE, format!("{display} ({what}): {e}")))?;
            f(&mut con).map_err(|e| Error::engine(ENGINE, format!("{display} ({what}): {e}")))
        })
        .await
        .map_err(|e| Error::engine(ENGINE, format!("worker thread failed: {e}")))?
    }

    pub async fn history(&self) -> Result<Vec<Applied>> {
        let rows: Vec<(String, String)> = self
            .with("read the migration history", |c| {
                redis::cmd("HGETALL").arg(HISTORY).query(c)
            })
            .await?;
        rows.into_iter()
            .map(|(field, json)| {
                serde_json::from_str(&json).map_err(|e| {
                    Error::engine(
                        ENGINE,
                        format!(
                            "{HISTORY} field {field} is not a history row dbkeeper can read: {e}"
                        ),
                    )
                })
            })
            .collect()
    }

    pub async fn record(&self, a: &Applied) -> Result<()> {
        let json = serde_json::to_string(a).expect("history rows serialize");
        let field = a.version.clone();
        self.with("write the migration history", move |c| {
            redis::cmd("HSET")
                .arg(HISTORY)
                .arg(field)
                .arg(json)
                .query::<()>(c)
        })
        .await
    }

    pub async fn forget(&self, version: &str) -> Result<()> {
        let field = version.to_owned();
        self.with("write the migration history", move |c| {
            redis::cmd("HDEL").arg(HISTORY).arg(field).query::<()>(c)
        })
        .await
    }

    pub async fn lock(&self, owner: &str, lease: Duration) -> Result<bool> {
        let owner = owner.to_owned();
        let ms = lease.as_millis() as u64;
        self.with("take the migration lock", move |c| {
            let set: Option<String> = redis::cmd("SET")
                .arg(LOCK)
                .arg(&owner)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query(c)?;
            if set.is_some() {
                return Ok(true);
            }
            let renewed: i64 = redis::cmd("EVAL")
                .arg(RENEW)
                .arg(1)
                .arg(LOCK)
                .arg(&owner)
                .arg(ms)
                .query(c)?;
            Ok(renewed == 1)
        })
        .await
    }

    pub async fn retake(&self, owner: &str, lease: Duration) -> Result<()> {
        let owner = owner.to_owned();
        let ms = lease.as_millis() as u64;
        self.with("take the migration lock", move |c| {
            redis::cmd("SET")
                .arg(LOCK)
                .arg(&owner)
                .arg("PX")
                .arg(ms)
                .query::<()>(c)
        })
        .await
    }

    pub async fn unlock(&self, owner: &str) -> Result<()> {
        let owner = owner.to_owned();
        self.with("release the migration lock", move |c| {
            redis::cmd("EVAL")
                .arg(UNLOCK)
                .arg(1)
                .arg(LOCK)
                .arg(owner)
                .query::<()>(c)
        })
        .await
    }

    pub async fn apply(
        &self,
        file: &MigrationFile,
        cancel: &CancellationToken,
    ) -> std::result::Result<(), StepError> {
        let Script::Redis(lines) = &file.script else {
            unreachable!("a Redis target runs Redis files")
        };
        let lines = lines.clone();
        let client = self.client.clone();
        let cancel = cancel.clone();
        let work = tokio::task::spawn_blocking(move || -> std::result::Result<(), StepError> {
            let mut con = client
                .get_connection_with_timeout(Duration::from_secs(10))
                .map_err(|e| StepError {
                    at: "connect".into(),
                    command: String::new(),
                    message: e.to_string(),
                })?;
            for l in &lines {
                let fail = |message: String| StepError {
                    at: format!("line {}", l.line),
                    command: l.text(),
                    message,
                };
                if cancel.is_cancelled() {
                    return Err(fail("interrupted".into()));
                }
                let mut cmd = redis::Cmd::new();
                for a in &l.args {
                    cmd.arg(a.as_slice());
                }
                cmd.query::<redis::Value>(&mut con)
                    .map_err(|e| fail(e.to_string()))?;
            }
            Ok(())
        });
        work.await.map_err(|e| StepError {
            at: "worker".into(),
            command: String::new(),
            message: e.to_string(),
        })?
    }
}
