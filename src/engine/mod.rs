//! The engine contract (probe, emptiness, dump, restore, deep verify) and the closed enum that
//! dispatches it to MongoDB, Redis, Chroma, PostgreSQL and RabbitMQ.

pub mod chroma;
pub mod mongodb;
pub(crate) mod net;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;
pub(crate) mod tls;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::repo::{Decode, VerifyLevel};
use crate::secret::Secret;

pub use crate::repo::kind::{Counts, EngineKind};

/// Decodes every record of this engine's part of a set, offline, and returns the counts
/// it found (compared with the manifest by the caller). Checksums are checked as it reads.
pub fn verify_deep(
    kind: EngineKind,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    match kind {
        EngineKind::Mongodb => mongodb::verify_deep(set, entry, cancel),
        EngineKind::Redis => redis::verify_deep(set, entry, cancel),
        EngineKind::Chroma => chroma::verify_deep(set, entry, cancel),
        EngineKind::Postgres => postgres::verify_deep(set, entry, cancel),
        EngineKind::Rabbitmq => rabbitmq::verify_deep(set, entry, cancel),
    }
}

/// The engines' decoders, for a deep verify of a set ([`DEEP`]).
pub struct Decoders;

impl Decode for Decoders {
    fn counts(
        &self,
        kind: EngineKind,
        set: &SetReader,
        entry: &EngineEntry,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        verify_deep(kind, set, entry, cancel)
    }
}

/// A deep verify: every record decoded by its engine's reader, counts against the manifest.
pub const DEEP: VerifyLevel = VerifyLevel::Deep(&Decoders);

/// Whether a data directory (the server stopped) may be preseeded.
pub fn data_dir_state(kind: EngineKind, dir: &std::path::Path) -> Result<Emptiness> {
    match kind {
        EngineKind::Redis => redis::data_dir_state(dir),
        EngineKind::Chroma => chroma::data_dir_state(dir),
        EngineKind::Postgres => postgres::data_dir_state(dir),
        EngineKind::Mongodb | EngineKind::Rabbitmq => Err(no_data_dir(kind)),
    }
}

/// Writes `entry` of `set` into an empty data directory, to temp names first, so that a
/// set that does not verify leaves nothing behind (`Error::Corrupt`: the caller tries the
/// next set).
pub fn preseed_data_dir(
    kind: EngineKind,
    dir: &std::path::Path,
    set: &SetReader,
    entry: &EngineEntry,
) -> Result<()> {
    match kind {
        EngineKind::Redis => redis::preseed_data_dir(dir, set, entry),
        EngineKind::Chroma => chroma::preseed_data_dir(dir, set, entry),
        EngineKind::Postgres => postgres::preseed_data_dir(dir, set, entry),
        EngineKind::Mongodb | EngineKind::Rabbitmq => Err(no_data_dir(kind)),
    }
}

/// Whether `entry` (a set's part for `kind`) can be loaded into a running server: a Chroma
/// data copy and a PostgreSQL base backup are physical, loaded only into the stopped server's
/// data directory.
pub fn loads_online(kind: EngineKind, entry: &EngineEntry) -> bool {
    match kind {
        EngineKind::Chroma => !chroma::datacopy::is_data_copy(entry),
        EngineKind::Postgres => false,
        EngineKind::Mongodb | EngineKind::Redis | EngineKind::Rabbitmq => true,
    }
}

/// Whether `entry` can be written into the stopped server's data directory: not a logical
/// Chroma export, which only a running server can load.
pub fn loads_into_data_dir(kind: EngineKind, entry: &EngineEntry) -> bool {
    match kind {
        EngineKind::Chroma => chroma::datacopy::is_data_copy(entry),
        EngineKind::Redis | EngineKind::Postgres => true,
        EngineKind::Mongodb | EngineKind::Rabbitmq => false,
    }
}

fn no_data_dir(kind: EngineKind) -> Error {
    Error::config(format!("{kind} has no data-directory preseed"))
}

/// What a successful probe learned.
#[derive(Debug, Clone)]
pub struct Probe {
    pub version: Option<String>,
    /// Extra facts for the health line (e.g. `role=master`).
    pub detail: String,
}

/// Whether a target may be preseeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emptiness {
    Empty,
    /// Holds data; the string says what (e.g. "12 keys in db0").
    HasData(String),
    /// A restore started and did not finish: wipe and restore again.
    Interrupted,
}

/// Options of a restore that are not the engine's own configuration.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// The target is known to be empty or wiped; restore may assume no collisions.
    pub force: bool,
    /// MongoDB point-in-time recovery: the archived oplog replayed after the set, up to a
    /// target (`restore --to-time`).
    pub mongo_pitr: Option<(mongodb::pitr::SegmentStore, mongodb::pitr::Plan)>,
}

/// Per-engine settings that do not come from the URL.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub chroma_token: Option<Secret>,
    /// MongoDB collections dumped or restored at once (default 4).
    pub mongo_parallel: Option<std::num::NonZeroUsize>,
    /// MongoDB namespaces to include / exclude (`db`, `db.coll`, `db.*`); empty: all.
    pub mongo_include: Vec<String>,
    pub mongo_exclude: Vec<String>,
    /// The replica set `init` initiates or checks (`DBKEEPER_MONGODB_REPLSET`).
    pub mongo_replset: Option<String>,
    /// `host:port` members for `replSetInitiate`; empty: the URI's host.
    pub mongo_replset_members: Vec<String>,
    /// Read preference of dumps (`secondaryPreferred` unless configured).
    pub mongo_read_preference: Option<String>,
    /// Passwords for users the server will not recreate from their stored credentials.
    pub mongo_user_passwords_file: Option<std::path::PathBuf>,
    /// Chroma tenant (default `default_tenant`).
    pub chroma_tenant: Option<String>,
    /// Chroma database (default `default_database`; `*`: every database of the tenant).
    pub chroma_database: Option<String>,
    /// Header the Chroma token travels in: `authorization` (Bearer, the default) or
    /// `x-chroma-token`.
    pub chroma_auth_header: Option<String>,
    /// Collections with figures of their own in `stats` (`DBKEEPER_STATS_MAX_COLLECTIONS`,
    /// default 100); the rest are summed into one.
    pub stats_max_collections: Option<usize>,
    /// Client certificate and key (PEM) for `rediss://` (`DBKEEPER_REDIS_TLS_{CERT,KEY}_FILE`).
    pub redis_tls_cert_file: Option<std::path::PathBuf>,
    pub redis_tls_key_file: Option<std::path::PathBuf>,
    /// The RabbitMQ management API (`DBKEEPER_RABBITMQ_API_URL`); default
    /// `http://<the AMQP host>:15672` with the AMQP credentials.
    pub rabbitmq_api_url: Option<Secret>,
}

/// The contract every engine implements. Roles are generic over it (through [`Engine`]);
/// nothing outside `engine/` matches on the kind of database to decide what to do.
#[allow(async_fn_in_trait)]
pub trait EngineOps {
    fn kind(&self) -> EngineKind;

    /// The URL with any password replaced by `***`.
    fn display_url(&self) -> &str;

    /// One protocol-level readiness check, bounded by `timeout`. `Error::Unreachable` when
    /// retrying may help, `Error::Refused` when it cannot (bad credentials, wrong protocol).
    async fn probe(&self, timeout: Duration) -> Result<Probe>;

    /// What `wait` and `init` wait for: the engine takes writes (MongoDB: a writable primary
    /// is reachable, and the server is the configured replica set). Same errors as `probe`,
    /// which by default it is; `probe` is the health check of this one server.
    async fn ready(&self, timeout: Duration) -> Result<Probe> {
        self.probe(timeout).await
    }

    /// What `backup` checks before it creates anything: the server answers and a dump can
    /// start. Default: `probe`. (RabbitMQ: the handshake without the alarm check, since a
    /// broker under a memory or disk alarm still serves its definitions.)
    async fn answers(&self, timeout: Duration) -> Result<Probe> {
        self.probe(timeout).await
    }

    /// `init`'s step before it waits for readiness: what must be done once to the server for
    /// it to become ready at all (MongoDB: initiate the configured replica set). Waits for the
    /// server to answer, under `deadline`. Default: nothing.
    async fn prepare(&self, _deadline: Instant, _cancel: &CancellationToken) -> Result<()> {
        Ok(())
    }

    /// Whether the server holds data, ignoring our own in-progress marker.
    async fn is_empty(&self) -> Result<Emptiness>;

    /// Writes one consistent dump into `out` and describes it for the manifest.
    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry>;

    /// Loads `entry` from `set` into the server, which the caller made empty.
    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts>;

    /// The counts a restore of `entry` must return: all of them, unless the engine is
    /// configured to restore part of a set (a namespace filter).
    fn expected_counts(&self, entry: &EngineEntry) -> Counts {
        entry.counts.clone()
    }

    /// Removes every user record (what `--force` and an interrupted preseed need), leaving the
    /// restore marker as it was where the engine keeps it apart (Redis's `FLUSHALL` takes it
    /// with everything else, at once).
    async fn wipe(&self) -> Result<()>;

    /// Sets (`true`) or clears the "restore in progress" marker that `is_empty` reports as
    /// [`Emptiness::Interrupted`].
    async fn set_marker(&self, on: bool) -> Result<()>;

    /// The server's statistics as metric families (see [`crate::stats`]), gathered in one
    /// bounded round of queries under `timeout`. The sidecar calls it once per
    /// `DBKEEPER_STATS_INTERVAL` and serves the result from memory. `Err` when the server did
    /// not answer; the caller then reports the engine's `*_up` as 0. Default: none.
    async fn stats(&self, _timeout: Duration) -> Result<Vec<crate::stats::Family>> {
        Ok(Vec::new())
    }
}

/// The configured engine, chosen at run time from its URL.
pub enum Engine {
    Mongodb(mongodb::MongoEngine),
    Redis(redis::RedisEngine),
    Chroma(chroma::ChromaEngine),
    Postgres(postgres::PostgresEngine),
    Rabbitmq(rabbitmq::RabbitEngine),
}

macro_rules! dispatch {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            Engine::Mongodb($e) => $body,
            Engine::Redis($e) => $body,
            Engine::Chroma($e) => $body,
            Engine::Postgres($e) => $body,
            Engine::Rabbitmq($e) => $body,
        }
    };
}

impl Engine {
    /// Builds the engine a URL names. Validates the URL; connects to nothing.
    pub fn from_url(url: &Secret, opts: &EngineOptions) -> Result<Engine> {
        Ok(match EngineKind::from_url(url.expose())? {
            EngineKind::Mongodb => Engine::Mongodb(mongodb::MongoEngine::new(url, opts)?),
            EngineKind::Redis => Engine::Redis(redis::RedisEngine::new(url, opts)?),
            EngineKind::Chroma => Engine::Chroma(chroma::ChromaEngine::new(url, opts)?),
            EngineKind::Postgres => Engine::Postgres(postgres::PostgresEngine::new(url, opts)?),
            EngineKind::Rabbitmq => Engine::Rabbitmq(rabbitmq::RabbitEngine::new(url, opts)?),
        })
    }
}

impl EngineOps for Engine {
    fn kind(&self) -> EngineKind {
        dispatch!(self, e => e.kind())
    }
    fn display_url(&self) -> &str {
        dispatch!(self, e => e.display_url())
    }
    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        dispatch!(self, e => e.probe(timeout).await)
    }
    async fn ready(&self, timeout: Duration) -> Result<Probe> {
        dispatch!(self, e => e.ready(timeout).await)
    }
    async fn answers(&self, timeout: Duration) -> Result<Probe> {
        dispatch!(self, e => e.answers(timeout).await)
    }
    async fn prepare(&self, deadline: Instant, cancel: &CancellationToken) -> Result<()> {
        dispatch!(self, e => e.prepare(deadline, cancel).await)
    }
    async fn is_empty(&self) -> Result<Emptiness> {
        dispatch!(self, e => e.is_empty().await)
    }
    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        dispatch!(self, e => e.dump(out, cancel).await)
    }
    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        dispatch!(self, e => e.restore(set, entry, opts, cancel).await)
    }
    fn expected_counts(&self, entry: &EngineEntry) -> Counts {
        dispatch!(self, e => e.expected_counts(entry))
    }
    async fn wipe(&self) -> Result<()> {
        dispatch!(self, e => e.wipe().await)
    }
    async fn set_marker(&self, on: bool) -> Result<()> {
        dispatch!(self, e => e.set_marker(on).await)
    }

    async fn stats(&self, timeout: Duration) -> Result<Vec<crate::stats::Family>> {
        dispatch!(self, e => e.stats(timeout).await)
    }
}
