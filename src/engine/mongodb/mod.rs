//! The MongoDB engine: `hello`/`ping` probe, emptiness and the restore marker, a streaming
//! dump in mongodump's directory layout, a parallel raw-BSON restore, and offline deep verify.
//!
//! Manifest `details` (see [`Details`]): the consistency given, and one entry per collection
//! or view with its true database and collection names (file names are escaped) and the set
//! paths of its metadata and data files.

pub(crate) mod bsonfile;
mod dump;
pub use dump::zstd_workers;
mod archive;
pub mod import;
mod metadata;
mod names;
pub mod oplog;
pub use archive::{ArchiveStatus, SharedStatus};
pub mod pitr;
mod probe;
mod replay;
mod replset;
mod restore;
mod stats;
pub mod users;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ConnectionString};
use mongodb::{Client, Database};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Counts, Emptiness, EngineKind, EngineOps, EngineOptions, Probe, RestoreOptions};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;
use crate::secret::{Secret, redact_url};

pub use names::Filter;

const ENGINE: &str = "mongodb";

/// Where an in-progress restore is recorded: a collection of `admin`, which `is_empty` does not
/// count as data and `wipe` never drops.
const MARKER_DB: &str = "admin";
const MARKER_COLL: &str = "dbkeeper_restore_marker";

/// Collections dumped or restored at once when not configured.
pub const DEFAULT_PARALLEL: usize = 4;

/// How often long dumps and restores log their progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a finished operation waits for its client to end its sessions and close.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);
/// A wipe waits for the server to apply no write for this long (see `settle_writes`)...
const SETTLE_QUIET: Duration = Duration::from_millis(500);
/// ...but no longer than this.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);

/// The engine's typed configuration, from the URI and [`EngineOptions`].
#[derive(Clone)]
pub struct MongoConfig {
    /// Parsed (and so validated) at construction; resolved (SRV, TLS files) when connecting.
    /// Boxed: it is large, and engines live in one enum.
    conn: Box<ConnectionString>,
    display: String,
    pub parallel: usize,
    pub filter: Filter,
    /// The replica set `init` initiates or checks, and `wait` expects.
    pub replset: Option<String>,
    /// Members `init` initiates the set with; empty: the URI's hosts.
    pub replset_members: Vec<String>,
    /// Where dumps read (`secondaryPreferred` unless configured or named in the URI).
    pub read_preference: Option<String>,
    /// Passwords for users a server will not recreate from their stored credentials.
    pub user_passwords: Option<std::path::PathBuf>,
    /// Collections with figures of their own in `stats` (default 100).
    pub stats_max_collections: Option<usize>,
}

impl MongoConfig {
    pub fn new(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        let display = redact_url(url.expose());
        let conn = ConnectionString::parse(url.expose()).map_err(|e| {
            Error::config(format!(
                "{display}: not a valid MongoDB URI: {}",
                driver_message(&e)
            ))
        })?;
        replset::validate(opts.mongo_replset.as_deref(), &opts.mongo_replset_members)?;
        let parallel = opts
            .mongo_parallel
            .map(|n| n.get())
            .unwrap_or(DEFAULT_PARALLEL);
        Ok(MongoConfig {
            conn: Box::new(conn),
            display,
            parallel,
            filter: Filter::new(&opts.mongo_include, &opts.mongo_exclude)?,
            replset: opts.mongo_replset.clone(),
            replset_members: opts.mongo_replset_members.clone(),
            read_preference: opts.mongo_read_preference.clone(),
            user_passwords: opts.mongo_user_passwords_file.clone(),
            stats_max_collections: opts.stats_max_collections,
        })
    }

    /// The database credentials are checked against (`authSource`, else the URI's database,
    /// else `admin`), or `None` without credentials.
    fn auth_db(&self) -> Option<String> {
        let cred = self.conn.credential.as_ref()?;
        cred.username.as_ref()?;
        Some(
            cred.source
                .clone()
                .or_else(|| self.conn.default_database.clone())
                .unwrap_or_else(|| "admin".into()),
        )
    }
}

/// The driver's message for an error, without the labels and source chains it appends.
fn driver_message(e: &mongodb::error::Error) -> String {
    match e.kind.as_ref() {
        ErrorKind::InvalidArgument { message, .. }
        | ErrorKind::Authentication { message, .. }
        | ErrorKind::ServerSelection { message, .. }
        | ErrorKind::InvalidResponse { message, .. }
        | ErrorKind::DnsResolve { message, .. }
        | ErrorKind::InvalidTlsConfig { message, .. } => one_line(message),
        ErrorKind::Command(c) => format!("{} ({}): {}", c.code_name, c.code, one_line(&c.message)),
        ErrorKind::InsertMany(im) => {
            let errs = im.write_errors.as_deref().unwrap_or_default();
            match (errs.first(), &im.write_concern_error) {
                (Some(first), _) => format!(
                    "{} documents refused, the first (#{}) with code {}: {}",
                    errs.len(),
                    first.index,
                    first.code,
                    one_line(&first.message)
                ),
                (None, Some(wc)) => format!("write concern: {}", one_line(&wc.message)),
                (None, None) => one_line(&e.to_string()),
            }
        }
        _ => one_line(&e.to_string()),
    }
}

/// The per-server error inside a server-selection timeout (`… Error: Kind: <cause>, labels:
/// …`), which is what an operator needs; the whole topology dump when there is none.
fn selection_cause(message: &str) -> String {
    let causes: Vec<&str> = message
        .split("Error: Kind: ")
        .skip(1)
        .map(|rest| rest.split(", labels:").next().unwrap_or(rest).trim())
        .collect();
    if causes.is_empty() {
        one_line(message)
    } else {
        one_line(&causes.join("; "))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub struct MongoEngine {
    cfg: MongoConfig,
}

/// What a client is for: probes get one short-lived connection; dumps and restores a pool.
#[derive(Clone, Copy)]
enum Purpose {
    Probe(Duration),
    /// A probe of the URI's first host alone, by direct connection (replica-set set-up).
    Member(Duration),
    Bulk,
}

impl MongoEngine {
    /// Validates the URI; connects to nothing.
    pub fn new(url: &Secret, opts: &EngineOptions) -> Result<Self> {
        Ok(MongoEngine {
            cfg: MongoConfig::new(url, opts)?,
        })
    }

    pub fn config(&self) -> &MongoConfig {
        &self.cfg
    }

    /// The health probe on the calling thread, without a runtime or the driver, when the URI
    /// allows it (one host, no credentials, no TLS); `None` when it needs the driver's
    /// [`probe`](EngineOps::probe).
    pub fn probe_plain(&self, timeout: Duration) -> Option<Result<Probe>> {
        let (host, port) = probe::plain_target(&self.cfg)?;
        Some(probe::probe_plain(&self.cfg, &host, port, timeout))
    }

    async fn client(&self, purpose: Purpose) -> Result<Client> {
        let mut o = ClientOptions::parse(*self.cfg.conn.clone())
            .await
            .map_err(|e| self.classify(e))?;
        o.app_name.get_or_insert_with(|| "dbkeeper".into());
        match purpose {
            Purpose::Probe(t) | Purpose::Member(t) => {
                replset::direct(
                    &mut o,
                    &self.cfg.conn,
                    matches!(purpose, Purpose::Member(_)),
                );
                o.server_selection_timeout = Some(t);
                o.connect_timeout = Some(t);
                o.max_pool_size = Some(1);
                o.min_pool_size = Some(0);
                o.retry_reads = Some(false);
                o.retry_writes = Some(false);
            }
            Purpose::Bulk => {
                o.server_selection_timeout
                    .get_or_insert(Duration::from_secs(10));
                let want = (self.cfg.parallel + restore::INSERT_WORKERS + 2) as u32;
                o.max_pool_size = Some(o.max_pool_size.unwrap_or(want).max(want));
            }
        }
        Client::with_options(o).map_err(|e| self.classify(e))
    }

    /// The secondary a dump reads from, when the read preference allows one and the set has
    /// one; `None` reads through `client` (the primary, or the one server of a direct URI).
    async fn dump_member(&self, client: &Client) -> Result<Option<String>> {
        let pref = self
            .cfg
            .read_preference
            .as_deref()
            .unwrap_or("secondaryPreferred");
        if pref == "primary" || self.cfg.conn.read_preference.is_some() {
            return Ok(None);
        }
        let hello = client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
            .map_err(self.op_err("hello"))?;
        let primary = hello.get_str("primary").unwrap_or_default().to_owned();
        let me = hello.get_str("me").unwrap_or_default();
        let hosts: Vec<String> = hello
            .get_array("hosts")
            .map(|a| {
                a.iter()
                    .filter_map(|h| h.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // A direct URI to one member reads that member, whatever it is.
        if self.cfg.conn.direct_connection == Some(true) || hosts.len() < 2 {
            return Ok(None);
        }
        let secondary = hosts.into_iter().find(|h| *h != primary && !h.is_empty());
        match secondary {
            Some(h) => {
                info!(engine = ENGINE, member = %h, read_preference = pref, "dump reads from a secondary");
                Ok(Some(h))
            }
            None => {
                debug!(
                    engine = ENGINE,
                    me, "no secondary to read from; the dump reads the primary"
                );
                Ok(None)
            }
        }
    }

    /// A client connected directly to one member, reading from it whatever its state.
    async fn pinned_client(&self, member: &str) -> Result<Client> {
        let mut o = ClientOptions::parse(*self.cfg.conn.clone())
            .await
            .map_err(|e| self.classify(e))?;
        o.app_name.get_or_insert_with(|| "dbkeeper".into());
        o.hosts =
            vec![mongodb::options::ServerAddress::parse(member).map_err(|e| self.classify(e))?];
        o.direct_connection = Some(true);
        o.repl_set_name = None;
        o.selection_criteria = Some(mongodb::options::SelectionCriteria::ReadPreference(
            mongodb::options::ReadPreference::SecondaryPreferred {
                options: Default::default(),
            },
        ));
        o.server_selection_timeout
            .get_or_insert(Duration::from_secs(10));
        let want = (self.cfg.parallel + 2) as u32;
        o.max_pool_size = Some(o.max_pool_size.unwrap_or(want).max(want));
        Client::with_options(o).map_err(|e| self.classify(e))
    }

    /// Runs `f` with a fresh client and shuts the client down before returning, whatever `f`
    /// returned. A client that is merely dropped leaves its session clean-up running as a
    /// task; if the process exits meanwhile, the runtime tears the connection pool down under
    /// that task and the driver panics ("pool worker gone", as in
    /// mongodb/mongo-rust-driver#674). Everything `f` spawned must be joined before it returns.
    async fn with_client<T, F, Fut>(&self, purpose: Purpose, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let client = self.client(purpose).await?;
        let r = f(client.clone()).await;
        let (limit, immediate) = match purpose {
            // A probe that failed because the server did not answer has no session to end,
            // and shutting its client down waits on the monitor: the probe's time is better
            // spent reporting. A probe the server answered and we refused (another set name,
            // a standalone) has a session, and a client dropped with one ends it in a task
            // the exiting process tears down mid-flight: shut that one down too.
            Purpose::Probe(_) | Purpose::Member(_) if matches!(&r, Err(e) if e.is_retryable()) => {
                return r;
            }
            Purpose::Probe(t) | Purpose::Member(t) => (t, true),
            Purpose::Bulk => (SHUTDOWN_LIMIT, false),
        };
        if tokio::time::timeout(limit, client.shutdown().immediate(immediate))
            .await
            .is_err()
        {
            debug!(
                engine = ENGINE,
                "client shutdown did not finish in {limit:?}"
            );
        }
        r
    }

    /// Sorts a driver error into what the roles act on: unreachable (retry may help),
    /// refused (bad credentials, not a MongoDB server), or a failed operation.
    fn classify(&self, e: mongodb::error::Error) -> Error {
        let url = self.cfg.display.clone();
        let msg = driver_message(&e);
        match e.kind.as_ref() {
            ErrorKind::Authentication { .. } => Error::Refused {
                engine: ENGINE,
                url,
                message: format!("authentication failed: {msg}; check the user and password"),
            },
            // AuthenticationFailed, Unauthorized
            ErrorKind::Command(c) if c.code == 18 || c.code == 13 => Error::Refused {
                engine: ENGINE,
                url,
                message: format!("{msg}; check the user, password and its roles"),
            },
            ErrorKind::InvalidTlsConfig { .. } | ErrorKind::InvalidArgument { .. } => {
                Error::Refused {
                    engine: ENGINE,
                    url,
                    message: msg,
                }
            }
            ErrorKind::InvalidResponse { .. } => Error::Refused {
                engine: ENGINE,
                url,
                message: format!("{msg} (is this a MongoDB server?)"),
            },
            ErrorKind::ServerSelection { message, .. } => {
                let inner = selection_cause(message);
                // A port that answers but not in MongoDB's wire protocol will not start to.
                if inner.contains("invalid reply") || inner.contains("wire protocol") {
                    return Error::Refused {
                        engine: ENGINE,
                        url,
                        message: format!("not a MongoDB server: {inner}"),
                    };
                }
                Error::Unreachable {
                    engine: ENGINE,
                    url,
                    message: format!("no server answered: {inner}"),
                }
            }
            ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. }
            | ErrorKind::DnsResolve { .. } => Error::Unreachable {
                engine: ENGINE,
                url,
                message: msg,
            },
            _ => Error::Engine {
                engine: ENGINE,
                message: format!("{url}: {msg}"),
            },
        }
    }

    /// A read that got no answer within the dump's idle limit: the link is dead (exit 3).
    pub(crate) fn idle_error(&self, what: &str) -> Error {
        Error::Unreachable {
            engine: ENGINE,
            url: self.cfg.display.clone(),
            message: format!(
                "{what}: no data from the server for {}s",
                dump::READ_IDLE_LIMIT.as_secs()
            ),
        }
    }

    /// Wraps a failed operation with what was being done.
    fn op_err(&self, what: &str) -> impl Fn(mongodb::error::Error) -> Error + '_ {
        let what = what.to_owned();
        move |e| match self.classify(e) {
            Error::Engine { engine, message } => Error::Engine {
                engine,
                message: format!("{what}: {message}"),
            },
            other => other,
        }
    }

    /// Databases other than the server's own, in the filter.
    async fn user_databases(&self, client: &Client) -> Result<Vec<String>> {
        let names = client
            .list_database_names()
            .await
            .map_err(self.op_err("listDatabases"))?;
        Ok(names
            .into_iter()
            .filter(|d| self.cfg.filter.wants_db(d))
            .collect())
    }

    /// The full `listCollections` entries of a database, as the server sends them.
    async fn list_collections(&self, db: &Database) -> Result<Vec<Document>> {
        use futures_util::TryStreamExt;
        db.run_cursor_command(doc! {"listCollections": 1, "nameOnly": false})
            .await
            .map_err(self.op_err(&format!("listCollections on {}", db.name())))?
            .try_collect()
            .await
            .map_err(self.op_err(&format!("listCollections on {}", db.name())))
    }
}

/// Recreates the set's users and roles; what could not be is reported in one line, and the
/// restore goes on (the data is there; the operator recreates those users).
async fn restore_authz(
    engine: &MongoEngine,
    client: &Client,
    set: &SetReader,
    entry: &EngineEntry,
    a: &AuthzEntry,
    passwords: &users::Passwords,
) -> Result<()> {
    fn read(
        set: &SetReader,
        entry: &EngineEntry,
        path: &Option<String>,
    ) -> Result<Vec<mongodb::bson::RawDocumentBuf>> {
        let Some(path) = path else {
            return Ok(Vec::new());
        };
        let f = entry.file(path).ok_or_else(|| {
            Error::corrupt(set.id(), format!("mongodb: {path} is not in the manifest"))
        })?;
        let mut docs = bsonfile::DocReader::new(set.open_file(f)?);
        let mut out = Vec::new();
        while let Some(d) = docs
            .next_doc()
            .map_err(|e| Error::corrupt(set.id(), format!("{path}: {e}")))?
        {
            out.push(d);
        }
        docs.into_inner().finish()?;
        Ok(out)
    }
    let (set2, entry2, a2) = (set.clone(), entry.clone(), a.clone());
    let (users_docs, roles_docs) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((
            read(&set2, &entry2, &a2.users_file)?,
            read(&set2, &entry2, &a2.roles_file)?,
        ))
    })
    .await
    .map_err(|e| Error::engine(ENGINE, format!("users task failed: {e}")))??;
    if users_docs.is_empty() && roles_docs.is_empty() {
        return Ok(());
    }
    let report = users::restore_authz(engine, client, &users_docs, &roles_docs, passwords).await?;
    match report.failures() {
        None => info!(engine = ENGINE, "{report}"),
        Some(f) => tracing::warn!(
            engine = ENGINE,
            failed = %f,
            "{report}; create those users yourself (db.createUser) or add their passwords to {} and restore again",
            users::PASSWORDS_FILE_VAR
        ),
    }
    Ok(())
}

/// `details` of the manifest entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Details {
    /// What the dump promises about concurrent writes.
    pub consistency: String,
    pub collections: Vec<CollectionEntry>,
    /// On a replica-set member: the oplog recorded during the dump, replayed after the
    /// collections on restore, which makes the data that of one point, `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oplog: Option<OplogSlice>,
    /// Users and custom roles, stored as mongodump stores `admin.system.users` and
    /// `admin.system.roles`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authz: Option<AuthzEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuthzEntry {
    pub users: u64,
    pub roles: u64,
    /// Set paths of the two files (absent when there is nothing to store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_file: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OplogSlice {
    /// The newest entry when the dump began (exclusive).
    pub start: pitr::OpTime,
    /// The newest entry when it ended: the point the set is consistent to.
    pub end: pitr::OpTime,
    pub entries: u64,
    /// Set path of `oplog.bson.zst`.
    pub file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CollectionEntry {
    pub db: String,
    pub name: String,
    /// `collection`, `view` or `timeseries`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Set path of `<coll>.metadata.json.zst`.
    pub metadata: String,
    /// Set path of the `.bson.zst` data; none for views.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl CollectionEntry {
    pub fn namespace(&self) -> String {
        format!("{}.{}", self.db, self.name)
    }
}

pub const CONSISTENCY: &str = "per-collection: each collection is read by one cursor from start to end; writes made during the dump to a collection not yet finished may or may not be included (no point-in-time snapshot across collections)";

fn details_of(set: &SetReader, entry: &EngineEntry) -> Result<Details> {
    serde_json::from_value(entry.details.clone()).map_err(|e| {
        Error::corrupt(
            set.id(),
            format!("mongodb: manifest details do not parse: {e}"),
        )
    })
}

/// Counts documents and bytes across workers and logs the rate at a steady interval.
pub(crate) struct Progress {
    what: &'static str,
    docs: AtomicU64,
    bytes: AtomicU64,
    start: Instant,
}

impl Progress {
    fn new(what: &'static str) -> Arc<Self> {
        Arc::new(Progress {
            what,
            docs: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            start: Instant::now(),
        })
    }

    fn add(&self, docs: u64, bytes: u64) {
        self.docs.fetch_add(docs, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn log(&self) {
        self.log_as("in progress");
    }

    fn finished(&self) {
        self.log_as("finished");
    }

    fn log_as(&self, state: &str) {
        let docs = self.docs.load(Ordering::Relaxed);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        info!(
            engine = ENGINE,
            docs,
            bytes,
            docs_per_s = (docs as f64 / secs) as u64,
            mb_per_s = format!("{:.1}", bytes as f64 / secs / 1e6),
            "{} {state}",
            self.what
        );
    }

    /// Logs every [`PROGRESS_EVERY`] until `stop` fires.
    fn spawn_ticker(self: &Arc<Self>, stop: CancellationToken) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => me.log(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
}

/// Decodes every document of every data file offline, checks each metadata file parses, and
/// returns the documents per namespace.
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let details = details_of(set, entry)?;
    let mut counts = Counts::new();
    let mut seen = std::collections::BTreeSet::new();
    for c in &details.collections {
        let file = |path: &str| {
            entry.file(path).ok_or_else(|| {
                Error::corrupt(
                    set.id(),
                    format!("mongodb: {} is listed in details but not in files", path),
                )
            })
        };
        let mf = file(&c.metadata)?;
        seen.insert(mf.path.clone());
        let mut r = set.open_file(mf)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut bytes).map_err(|e| r.error(e))?;
        r.finish()?;
        metadata::Metadata::parse(&bytes)
            .map_err(|e| Error::corrupt(set.id(), format!("{}: {e}", mf.path)))?;
        let Some(data) = &c.data else { continue };
        let df = file(data)?;
        seen.insert(df.path.clone());
        let n = verify_stream(set, df, cancel)?;
        counts.insert(c.namespace(), n);
    }
    // Files no collection claims still get their checksum checked.
    for f in &entry.files {
        if !seen.contains(&f.path) {
            set.check_file(f)?;
        }
    }
    Ok(counts)
}

fn verify_stream(
    set: &SetReader,
    f: &crate::repo::manifest::FileEntry,
    cancel: &CancellationToken,
) -> Result<u64> {
    let r = set.open_file(f)?;
    let mut docs = bsonfile::DocReader::new(r);
    loop {
        let doc = match docs.next_doc() {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => return Err(Error::corrupt(set.id(), format!("{}: {e}", f.path))),
        };
        bsonfile::validate(&doc).map_err(|e| {
            Error::corrupt(
                set.id(),
                format!("{}: document #{}: {e}", f.path, docs.count() - 1),
            )
        })?;
        if docs.count() % 4096 == 0 && cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
    }
    let n = docs.count();
    docs.into_inner().finish()?;
    Ok(n)
}

impl EngineOps for MongoEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Mongodb
    }

    fn display_url(&self) -> &str {
        &self.cfg.display
    }

    /// `hello`, then `ping` against the credentials' database when the URI has credentials
    /// (the connection authenticates first, so a wrong password fails here, not later). A
    /// replica-set member is healthy as PRIMARY, SECONDARY or ARBITER.
    async fn probe(&self, timeout: Duration) -> Result<Probe> {
        self.with_client(Purpose::Probe(timeout), |client| self.probe_with(client))
            .await
    }

    /// A writable primary is reachable (see [`replset::readiness`]).
    async fn ready(&self, timeout: Duration) -> Result<Probe> {
        self.with_client(Purpose::Probe(timeout), |client| self.ready_with(client))
            .await
    }

    /// With `DBKEEPER_MONGODB_REPLSET`: initiates the set when the server is not initiated yet.
    async fn prepare(&self, deadline: Instant, cancel: &CancellationToken) -> Result<()> {
        self.prepare_replset(deadline, cancel).await
    }

    async fn is_empty(&self) -> Result<Emptiness> {
        self.with_client(Purpose::Bulk, |client| self.is_empty_with(client))
            .await
    }

    async fn dump(&self, out: EngineWriter, cancel: &CancellationToken) -> Result<EngineEntry> {
        self.with_client(Purpose::Bulk, |client| async move {
            match self.dump_member(&client).await? {
                None => dump::dump(self, client, out, cancel).await,
                Some(member) => {
                    // Collections and oplog from one member: a slice read elsewhere could
                    // start after the data it must roll forward.
                    let pinned = self.pinned_client(&member).await?;
                    let r = dump::dump(self, pinned.clone(), out, cancel).await;
                    let _ = tokio::time::timeout(SHUTDOWN_LIMIT, pinned.shutdown()).await;
                    r
                }
            }
        })
        .await
    }

    async fn restore(
        &self,
        set: &SetReader,
        entry: &EngineEntry,
        opts: &RestoreOptions,
        cancel: &CancellationToken,
    ) -> Result<Counts> {
        self.with_client(Purpose::Bulk, |client| async move {
            let details = details_of(set, entry)?;
            // Read before anything is restored: a bad file changes nothing.
            let passwords = users::Passwords::load(self.cfg.user_passwords.as_deref())?;
            let counts = restore::restore(self, client.clone(), set, entry, cancel).await?;
            if let Some(a) = &details.authz {
                restore_authz(self, &client, set, entry, a, &passwords).await?;
            }
            // The slice makes the data that of the set's end point; the segments then roll
            // it forward to the target.
            if let Some(slice) = &details.oplog {
                replay::replay_slice(&client, self, set, entry, slice, cancel).await?;
            }
            if let Some((store, plan)) = &opts.mongo_pitr {
                replay::replay_segments(&client, self, store, plan, cancel).await?;
            }
            Ok(counts)
        })
        .await
    }

    /// Only the namespaces the filter selects are restored.
    fn expected_counts(&self, entry: &EngineEntry) -> Counts {
        entry
            .counts
            .iter()
            .filter(|(ns, _)| {
                let (db, coll) = ns.split_once('.').unwrap_or((ns.as_str(), ""));
                self.cfg.filter.wants(db, coll)
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Drops every database the filter selects whole, and the selected collections of the
    /// others. `admin`, `local` and `config` (users, the marker) are never touched.
    async fn wipe(&self) -> Result<()> {
        self.with_client(Purpose::Bulk, |client| self.wipe_with(client))
            .await
    }

    async fn set_marker(&self, on: bool) -> Result<()> {
        self.with_client(Purpose::Bulk, |client| self.set_marker_with(client, on))
            .await
    }

    /// `serverStatus`, `replSetGetStatus`, `dbStats` and `$collStats` under percona's names
    /// and the seed's (see [`stats`]), on one connection to this server, within `timeout`.
    async fn stats(&self, timeout: Duration) -> Result<Vec<crate::stats::Family>> {
        self.gather_stats(timeout).await
    }
}

impl MongoEngine {
    async fn probe_with(&self, client: Client) -> Result<Probe> {
        let hello = self.hello_with(&client).await?;
        let status = if hello.contains_key("setName") {
            self.status_with(&client).await
        } else {
            None
        };
        replset::health(&hello, status.as_ref()).map_err(|message| Error::Unreachable {
            engine: ENGINE,
            url: self.cfg.display.clone(),
            message,
        })
    }

    /// `hello`, and `ping` on the credentials' database when there are credentials.
    async fn hello_with(&self, client: &Client) -> Result<Document> {
        let hello = client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
            .map_err(|e| self.classify(e))?;
        if let Some(db) = self.cfg.auth_db() {
            client
                .database(&db)
                .run_command(doc! {"ping": 1})
                .await
                .map_err(|e| self.classify(e))?;
        }
        Ok(hello)
    }

    async fn is_empty_with(&self, client: Client) -> Result<Emptiness> {
        let marker = client
            .database(MARKER_DB)
            .list_collection_names()
            .filter(doc! {"name": MARKER_COLL})
            .await
            .map_err(self.op_err("listCollections on admin"))?;
        if !marker.is_empty() {
            return Ok(Emptiness::Interrupted);
        }
        let mut holding = Vec::new();
        for db in self.user_databases(&client).await? {
            if self.cfg.filter.is_all() {
                holding.push(db);
                continue;
            }
            let colls = self.list_collections(&client.database(&db)).await?;
            if colls.iter().any(|c| {
                c.get_str("name")
                    .is_ok_and(|n| names::is_dumped_collection(n) && self.cfg.filter.wants(&db, n))
            }) {
                holding.push(db);
            }
        }
        Ok(if holding.is_empty() {
            Emptiness::Empty
        } else {
            Emptiness::HasData(format!("databases {}", holding.join(", ")))
        })
    }

    async fn wipe_with(&self, client: Client) -> Result<()> {
        self.settle_writes(&client).await;
        for db in self.user_databases(&client).await? {
            let database = client.database(&db);
            if self.cfg.filter.wants_whole_db(&db) {
                database
                    .drop()
                    .await
                    .map_err(self.op_err(&format!("dropDatabase {db}")))?;
                info!(engine = ENGINE, db, "dropped database");
                continue;
            }
            for c in self.list_collections(&database).await? {
                let Ok(name) = c.get_str("name") else {
                    continue;
                };
                if names::is_dumped_collection(name) && self.cfg.filter.wants(&db, name) {
                    database
                        .run_command(doc! {"drop": name})
                        .await
                        .map_err(self.op_err(&format!("drop {db}.{name}")))?;
                    info!(engine = ENGINE, db, collection = name, "dropped collection");
                }
            }
        }
        Ok(())
    }

    /// Waits, before a wipe, until the server has applied no write for [`SETTLE_QUIET`]. A
    /// restore killed mid-way leaves insert batches in the server's socket buffers, which the
    /// server goes on applying after the client died; dropped before they land, they recreate
    /// collections under the next restore and collide with it (found by the fault suite). The
    /// server's `opcounters` tell when they have drained. A user without `serverStatus`, or a
    /// target that never goes quiet (an application still writing), waits at most
    /// [`SETTLE_LIMIT`].
    async fn settle_writes(&self, client: &Client) {
        async fn writes(client: &Client) -> Option<i64> {
            let ss = client
                .database("admin")
                .run_command(doc! {"serverStatus": 1, "repl": 0, "metrics": 0, "locks": 0})
                .await
                .ok()?;
            let ops = ss.get_document("opcounters").ok()?;
            let n = |k: &str| match ops.get(k) {
                Some(Bson::Int32(v)) => i64::from(*v),
                Some(Bson::Int64(v)) => *v,
                Some(Bson::Double(v)) => *v as i64,
                _ => 0,
            };
            Some(n("insert") + n("update") + n("delete"))
        }
        let deadline = Instant::now() + SETTLE_LIMIT;
        let Some(mut last) = writes(client).await else {
            return;
        };
        loop {
            tokio::time::sleep(SETTLE_QUIET).await;
            let Some(now) = writes(client).await else {
                return;
            };
            if now == last {
                return;
            }
            if Instant::now() >= deadline {
                info!(
                    engine = ENGINE,
                    "the server is still applying writes; wiping anyway"
                );
                return;
            }
            debug!(
                engine = ENGINE,
                writes = now - last,
                "waiting for writes to drain before the wipe"
            );
            last = now;
        }
    }

    async fn set_marker_with(&self, client: Client, on: bool) -> Result<()> {
        let coll = client
            .database(MARKER_DB)
            .collection::<Document>(MARKER_COLL);
        if on {
            coll.replace_one(
                doc! {"_id": "restore"},
                doc! {
                    "_id": "restore",
                    "started_at": Bson::DateTime(mongodb::bson::DateTime::now()),
                    "tool": format!("dbkeeper {}", env!("CARGO_PKG_VERSION")),
                },
            )
            .upsert(true)
            .await
            .map_err(self.op_err("writing the restore marker"))?;
        } else {
            coll.drop()
                .await
                .map_err(self.op_err("removing the restore marker"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_errors_are_cut_to_their_cause() {
        let m = "Server selection timeout: No available servers. Topology: { Type: Unknown, Servers: [ { Address: h:1, Type: Unknown, Error: Kind: I/O error: Connection refused (os error 111), labels: {\"RetryableError\"}, source: None, server response: None } ] }";
        assert_eq!(
            selection_cause(m),
            "I/O error: Connection refused (os error 111)"
        );
        assert_eq!(selection_cause("no servers"), "no servers");
    }

    #[test]
    fn construction_validates_without_connecting() {
        let opts = EngineOptions::default();
        let e =
            MongoEngine::new(&Secret::new("mongodb://u:p%40ss@db:1/?authSource=x"), &opts).unwrap();
        assert_eq!(e.display_url(), "mongodb://u:***@db:1/?authSource=x");
        assert_eq!(e.cfg.auth_db().as_deref(), Some("x"));
        let e = MongoEngine::new(&Secret::new("mongodb://db:1/app"), &opts).unwrap();
        assert_eq!(e.cfg.auth_db(), None);
        let e = MongoEngine::new(&Secret::new("mongodb://u:p@db:1/app"), &opts).unwrap();
        assert_eq!(e.cfg.auth_db().as_deref(), Some("app"));
        for bad in [
            "mongodb://u:p@s@db/",
            "mongodb://db:1/?w=1&directConnection=maybe",
            "mongodb://",
        ] {
            let err = MongoEngine::new(&Secret::new(bad), &opts).err().expect(bad);
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
        }
        let bad_filter = EngineOptions {
            mongo_include: vec![".x".into()],
            ..EngineOptions::default()
        };
        assert!(MongoEngine::new(&Secret::new("mongodb://db"), &bad_filter).is_err());
    }
}
