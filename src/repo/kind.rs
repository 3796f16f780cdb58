//! Which kind of database an engine is, and the counts a set records for it: the vocabulary
//! the manifest and the engines share, below both.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which kind of database an engine is. Also the name of its directory inside a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Mongodb,
    Redis,
    Chroma,
    Postgres,
    Rabbitmq,
}

impl EngineKind {
    pub const ALL: [EngineKind; 5] = [
        EngineKind::Mongodb,
        EngineKind::Redis,
        EngineKind::Chroma,
        EngineKind::Postgres,
        EngineKind::Rabbitmq,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Mongodb => "mongodb",
            EngineKind::Redis => "redis",
            EngineKind::Chroma => "chroma",
            EngineKind::Postgres => "postgres",
            EngineKind::Rabbitmq => "rabbitmq",
        }
    }

    /// The variable that holds this engine's URL.
    pub fn url_env(self) -> &'static str {
        match self {
            EngineKind::Mongodb => "DBKEEPER_MONGODB_URI",
            EngineKind::Redis => "DBKEEPER_REDIS_URL",
            EngineKind::Chroma => "DBKEEPER_CHROMA_URL",
            EngineKind::Postgres => "DBKEEPER_POSTGRES_URL",
            EngineKind::Rabbitmq => "DBKEEPER_RABBITMQ_URL",
        }
    }

    /// The variable that names this engine's data directory, for the engines preseeded
    /// through their files before the server starts.
    pub fn data_dir_env(self) -> Option<&'static str> {
        match self {
            EngineKind::Redis => Some("DBKEEPER_REDIS_DATA_DIR"),
            EngineKind::Chroma => Some("DBKEEPER_CHROMA_DATA_DIR"),
            EngineKind::Postgres => Some("DBKEEPER_POSTGRES_DATA_DIR"),
            EngineKind::Mongodb | EngineKind::Rabbitmq => None,
        }
    }

    pub fn from_name(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mongodb" | "mongo" => Ok(EngineKind::Mongodb),
            "redis" => Ok(EngineKind::Redis),
            "chroma" => Ok(EngineKind::Chroma),
            "postgres" | "postgresql" => Ok(EngineKind::Postgres),
            "rabbitmq" => Ok(EngineKind::Rabbitmq),
            other => Err(Error::config(format!(
                "unknown engine {other:?}; expected mongodb, redis, chroma, postgres or rabbitmq"
            ))),
        }
    }

    /// The engine a URL names, by its scheme.
    pub fn from_url(url: &str) -> Result<Self> {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("mongodb") | Some("mongodb+srv") => Ok(EngineKind::Mongodb),
            Some("redis") | Some("rediss") => Ok(EngineKind::Redis),
            Some("http") | Some("https") => Ok(EngineKind::Chroma),
            Some("postgres") | Some("postgresql") => Ok(EngineKind::Postgres),
            Some("amqp") | Some("amqps") => Ok(EngineKind::Rabbitmq),
            _ => Err(Error::config(format!(
                "{}: not an engine URL; expected mongodb://, redis://, rediss://, http(s)://, postgres:// or amqp(s)://",
                crate::secret::redact_url(url)
            ))),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Record counts by unit: keys per Redis db (`db0`), documents per MongoDB namespace
/// (`db.coll`), records per Chroma collection.
pub type Counts = BTreeMap<String, u64>;
