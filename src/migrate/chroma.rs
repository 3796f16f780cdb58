//! Chroma migrations: the history in a collection's metadata, a lease lock that is a collection
//! of its own (creating a name that exists fails, which makes taking it atomic), and the
//! collection operations (create, modify, delete) run in order.

use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::files::{ChromaOp, MigrationFile, Script};
use super::{Applied, HISTORY, StepError};
use crate::engine::EngineOptions;
use crate::engine::chroma::api::Api;
use crate::engine::chroma::{ChromaEngine, Databases};
use crate::error::{Error, Result};
use crate::secret::Secret;

const ENGINE: &str = "chroma";
const LOCK: &str = "dbkeeper_schema_lock";
/// The metadata key holding the history, one JSON array: Chroma metadata values are scalars,
/// and one key rewritten whole is right whether the server merges or replaces metadata.
const KEY: &str = "history";

pub struct ChromaTarget {
    engine: ChromaEngine,
    db: String,
}

fn raw(v: &impl serde::Serialize) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(v).expect("JSON values serialize")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl ChromaTarget {
    pub fn connect(url: &Secret, opts: &EngineOptions) -> Result<ChromaTarget> {
        let engine = ChromaEngine::new(url, opts)?;
        let db = match &engine.config().databases {
            Databases::One(d) => d.clone(),
            Databases::All => {
                return Err(Error::config(
                    "DBKEEPER_CHROMA_DATABASE=*: migrations keep their history in one database; name it",
                ));
            }
        };
        Ok(ChromaTarget { engine, db })
    }

    fn api(&self) -> &Api {
        self.engine.api()
    }

    pub async fn history(&self) -> Result<Vec<Applied>> {
        let Some(c) = self.api().get_collection(&self.db, HISTORY).await? else {
            return Ok(Vec::new());
        };
        let meta: Map<String, Value> = c
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m.get()).ok())
            .unwrap_or_default();
        match meta.get(KEY) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                Error::engine(
                    ENGINE,
                    format!("collection {HISTORY} holds a history dbkeeper cannot read: {e}"),
                )
            }),
            Some(_) => Err(Error::engine(
                ENGINE,
                format!("collection {HISTORY}: its `{KEY}` metadata is not a string"),
            )),
        }
    }

    async fn write(&self, rows: &[Applied]) -> Result<()> {
        let meta = json!({ KEY: serde_json::to_string(rows).expect("history rows serialize") });
        match self.api().get_collection(&self.db, HISTORY).await? {
            None => {
                self.api()
                    .create_collection(&self.db, HISTORY, Some(&raw(&meta)), None, None)
                    .await?;
            }
            Some(c) => {
                self.api()
                    .modify_collection(
                        &self.db,
                        &c.id,
                        &json!({ "new_metadata": meta }),
                        "write the migration history",
                    )
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn record(&self, a: &Applied) -> Result<()> {
        let mut rows = self.history().await?;
        rows.retain(|r| r.version != a.version);
        rows.push(a.clone());
        self.write(&rows).await
    }

    pub async fn forget(&self, version: &str) -> Result<()> {
        let mut rows = self.history().await?;
        rows.retain(|r| r.version != version);
        self.write(&rows).await
    }

    fn holder(c: &crate::engine::chroma::api::Collection) -> (String, i64) {
        let meta: Map<String, Value> = c
            .metadata
            .as_deref()
            .and_then(|m| serde_json::from_str(m.get()).ok())
            .unwrap_or_default();
        (
            meta.get("owner")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            meta.get("expires_at_ms")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        )
    }

    pub async fn lock(&self, owner: &str, lease: Duration) -> Result<bool> {
        let meta = json!({"owner": owner, "expires_at_ms": now_ms() + lease.as_millis() as i64});
        if let Some(c) = self.api().get_collection(&self.db, LOCK).await? {
            let (holder, expires) = Self::holder(&c);
            if holder == owner {
                self.api()
                    .modify_collection(
                        &self.db,
                        &c.id,
                        &json!({ "new_metadata": meta }),
                        "renew the migration lock",
                    )
                    .await?;
                return Ok(true);
            }
            if expires >= now_ms() {
                return Ok(false);
            }
            self.api()
                .delete_collection_if_exists(&self.db, LOCK)
                .await?;
        }
        // A name that exists is refused: whoever creates it holds the lock.
        match self
            .api()
            .create_collection(&self.db, LOCK, Some(&raw(&meta)), None, None)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match self.api().get_collection(&self.db, LOCK).await? {
                Some(c) => Ok(Self::holder(&c).0 == owner),
                None => Err(e),
            },
        }
    }

    pub async fn retake(&self, owner: &str, lease: Duration) -> Result<()> {
        self.api()
            .delete_collection_if_exists(&self.db, LOCK)
            .await?;
        if self.lock(owner, lease).await? {
            Ok(())
        } else {
            Err(Error::engine(
                "chroma",
                "another migrator took the migration lock while this one put the database back",
            ))
        }
    }

    pub async fn unlock(&self, owner: &str) -> Result<()> {
        if let Some(c) = self.api().get_collection(&self.db, LOCK).await?
            && Self::holder(&c).0 == owner
        {
            self.api()
                .delete_collection_if_exists(&self.db, LOCK)
                .await?;
        }
        Ok(())
    }

    pub async fn apply(
        &self,
        file: &MigrationFile,
        cancel: &CancellationToken,
    ) -> std::result::Result<(), StepError> {
        let Script::Chroma(ops) = &file.script else {
            unreachable!("a Chroma target runs Chroma files")
        };
        for (i, op) in ops.iter().enumerate() {
            let fail = |message: String| StepError {
                at: format!("item {}", i + 1),
                command: op.describe(),
                message,
            };
            if cancel.is_cancelled() {
                return Err(fail("interrupted".into()));
            }
            self.apply_one(op)
                .await
                .map_err(|e| fail(format!("{e:#}")))?;
        }
        Ok(())
    }

    async fn apply_one(&self, op: &ChromaOp) -> Result<()> {
        let api = self.api();
        match op {
            ChromaOp::Create {
                name,
                database,
                metadata,
                configuration,
                get_or_create,
            } => {
                let db = database.as_deref().unwrap_or(&self.db);
                if *get_or_create && api.get_collection(db, name).await?.is_some() {
                    return Ok(());
                }
                let metadata = metadata.as_ref().map(raw);
                let configuration = configuration.as_ref().map(raw);
                api.create_collection(
                    db,
                    name,
                    metadata.as_deref(),
                    configuration.as_deref(),
                    None,
                )
                .await?;
            }
            ChromaOp::Modify {
                name,
                database,
                new_name,
                metadata,
                configuration,
            } => {
                let db = database.as_deref().unwrap_or(&self.db);
                let c = api.get_collection(db, name).await?.ok_or_else(|| {
                    Error::engine(ENGINE, format!("no collection {name} in database {db}"))
                })?;
                let mut body = Map::new();
                if let Some(n) = new_name {
                    body.insert("new_name".into(), Value::String(n.clone()));
                }
                if let Some(m) = metadata {
                    body.insert("new_metadata".into(), Value::Object(m.clone()));
                }
                if let Some(c) = configuration {
                    body.insert("new_configuration".into(), c.clone());
                }
                api.modify_collection(
                    db,
                    &c.id,
                    &Value::Object(body),
                    &format!("modify collection {name}"),
                )
                .await?;
            }
            ChromaOp::Delete { name, database } => {
                let db = database.as_deref().unwrap_or(&self.db);
                api.delete_collection(db, name).await?;
            }
        }
        Ok(())
    }
}
