//! Command-line flags (clap derive), each with its `DBKEEPER_*` environment twin.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Parses a duration that carries its unit (`500ms`, `30s`, `5m`, `2h`, `1h30m`).
/// A bare number is rejected rather than guessed at.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration with a unit such as 30s, 5m or 2h ({e})"))
}

#[derive(Debug, Parser)]
#[command(
    name = "dbkeeper",
    version,
    about = "Wait for, preseed, back up and health-check MongoDB, Redis and Chroma",
    propagate_version = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every verb understands. Engine URLs are secrets (they may carry passwords): they are
/// read here without clap's `env` so `--help` never shows their values, and resolved with their
/// `_FILE` twins by `config`.
#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Backup repository: a directory or s3://bucket/prefix [env: DBKEEPER_REPO]
    #[arg(long, global = true, env = "DBKEEPER_REPO", default_value = "/backups")]
    pub repo: String,

    /// Off-host copy of every verified set: s3://bucket/prefix [env: DBKEEPER_REMOTE]
    #[arg(
        long = "remote-repo",
        global = true,
        env = "DBKEEPER_REMOTE",
        value_name = "URL"
    )]
    pub remote_repo: Option<String>,

    /// How long an object-storage lock lives unless its holder renews it
    #[arg(long, global = true, env = "DBKEEPER_LOCK_LEASE", default_value = "60s", value_parser = parse_duration)]
    pub lock_lease: Duration,

    /// MongoDB URI [env: DBKEEPER_MONGODB_URI, DBKEEPER_MONGODB_URI_FILE]
    #[arg(long, global = true, value_name = "URI")]
    pub mongodb_uri: Option<String>,

    /// Redis URL (redis:// or rediss://) [env: DBKEEPER_REDIS_URL, DBKEEPER_REDIS_URL_FILE]
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,

    /// Chroma URL (http:// or https://) [env: DBKEEPER_CHROMA_URL]
    #[arg(long, global = true, value_name = "URL")]
    pub chroma_url: Option<String>,

    /// PostgreSQL URL (postgres:// or postgresql://; TLS by ?sslmode=, sslrootcert=) [env: DBKEEPER_POSTGRES_URL, DBKEEPER_POSTGRES_URL_FILE]
    #[arg(long, global = true, value_name = "URL")]
    pub postgres_url: Option<String>,

    /// RabbitMQ URL (amqp:// or amqps://) [env: DBKEEPER_RABBITMQ_URL, DBKEEPER_RABBITMQ_URL_FILE]
    #[arg(long, global = true, value_name = "URL")]
    pub rabbitmq_url: Option<String>,

    /// RabbitMQ management API (default http://<the AMQP host>:15672 with the AMQP credentials) [env: DBKEEPER_RABBITMQ_API_URL, DBKEEPER_RABBITMQ_API_URL_FILE]
    #[arg(long, global = true, value_name = "URL")]
    pub rabbitmq_api_url: Option<String>,

    /// Chroma auth token [env: DBKEEPER_CHROMA_TOKEN, DBKEEPER_CHROMA_TOKEN_FILE]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub chroma_token: Option<String>,

    /// MongoDB collections dumped or restored in parallel (largest first)
    #[arg(long, global = true, env = "DBKEEPER_PARALLEL", value_name = "N")]
    pub parallel: Option<std::num::NonZeroUsize>,

    /// MongoDB namespaces to back up / restore / wipe: `db`, `db.coll` or `db.*`, comma-separated (default: all)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_MONGODB_INCLUDE",
        value_delimiter = ',',
        value_name = "NS"
    )]
    pub mongodb_include: Vec<String>,

    /// MongoDB namespaces to leave out (`db`, `db.coll` or `db.*`, comma-separated)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_MONGODB_EXCLUDE",
        value_delimiter = ',',
        value_name = "NS"
    )]
    pub mongodb_exclude: Vec<String>,

    /// MongoDB replica set: `init` initiates it when the server runs with `--replSet` but is not initiated yet
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_MONGODB_REPLSET",
        value_name = "NAME"
    )]
    pub mongodb_replset: Option<String>,

    /// Members for `replSetInitiate`, `host:port` comma-separated (default: the URI's host)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_MONGODB_REPLSET_MEMBERS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    pub mongodb_replset_members: Vec<String>,

    /// Where MongoDB dumps read: `secondaryPreferred` (default: backups spare the primary) or `primary`
    #[arg(long, global = true, env = "DBKEEPER_MONGODB_READ_PREFERENCE", default_value = "secondaryPreferred", value_parser = ["secondaryPreferred", "primary", "primaryPreferred", "secondary", "nearest"])]
    pub mongodb_read_preference: String,

    /// Archive the MongoDB oplog continuously for point-in-time recovery (sidecar): on or off
    #[arg(long, global = true, env = "DBKEEPER_MONGODB_PITR", default_value = "off", value_parser = ["on", "off"])]
    pub mongodb_pitr: String,

    /// Stream PostgreSQL's WAL over a replication slot into the repository for point-in-time recovery (sidecar): on or off
    #[arg(long, global = true, env = "DBKEEPER_POSTGRES_PITR", default_value = "off", value_parser = ["on", "off"])]
    pub postgres_pitr: String,

    /// The physical replication slot the WAL archiver streams from (created when missing)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_POSTGRES_SLOT",
        default_value = "dbkeeper"
    )]
    pub postgres_slot: String,

    /// Preseed PostgreSQL's empty data directory to this RFC 3339 time (the newest set before it and the archived WAL up to it)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_PRESEED_TO_TIME",
        value_name = "TIME"
    )]
    pub preseed_to_time: Option<String>,

    /// How often archived oplog is published as a segment (sooner when a segment is full)
    #[arg(long, global = true, env = "DBKEEPER_PITR_FLUSH", default_value = "1s", value_parser = parse_duration)]
    pub pitr_flush: Duration,

    /// File of `db.user=password` lines: passwords for MongoDB users a server will not recreate with their stored credentials
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_MONGODB_USER_PASSWORDS_FILE",
        value_name = "PATH"
    )]
    pub mongodb_user_passwords_file: Option<PathBuf>,
    /// Chroma tenant
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_CHROMA_TENANT",
        default_value = "default_tenant"
    )]
    pub chroma_tenant: String,

    /// Chroma database (`*`: every database of the tenant)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_CHROMA_DATABASE",
        default_value = "default_database"
    )]
    pub chroma_database: String,

    /// Header that carries the Chroma token
    #[arg(long, global = true, env = "DBKEEPER_CHROMA_AUTH_HEADER", default_value = "authorization", value_parser = ["authorization", "x-chroma-token"])]
    pub chroma_auth_header: String,

    /// Redis data directory for pre-start preseed (shared volume, server not running)
    #[arg(long, global = true, env = "DBKEEPER_REDIS_DATA_DIR")]
    pub redis_data_dir: Option<PathBuf>,

    /// PostgreSQL data directory (PGDATA) for pre-start preseed (shared volume, server not running)
    #[arg(long, global = true, env = "DBKEEPER_POSTGRES_DATA_DIR")]
    pub postgres_data_dir: Option<PathBuf>,

    /// Chroma persist directory for pre-start preseed of a data copy (server not running)
    #[arg(long, global = true, env = "DBKEEPER_CHROMA_DATA_DIR")]
    pub chroma_data_dir: Option<PathBuf>,

    /// Client certificate (PEM) for rediss:// servers with `tls-auth-clients yes`
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_REDIS_TLS_CERT_FILE",
        value_name = "PEM"
    )]
    pub redis_tls_cert_file: Option<PathBuf>,

    /// Private key (PEM) of the client certificate
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_REDIS_TLS_KEY_FILE",
        value_name = "PEM"
    )]
    pub redis_tls_key_file: Option<PathBuf>,

    /// How long a writer waits for the repository lock (0s: fail at once)
    #[arg(long, global = true, env = "DBKEEPER_LOCK_WAIT", default_value = "0s", value_parser = parse_duration)]
    pub lock_wait: Duration,

    /// How often the sidecar gathers database statistics for /metrics and /stats (1s to 1h)
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_STATS_INTERVAL",
        default_value = "15s",
        value_name = "DURATION"
    )]
    pub stats_interval: String,

    /// Collections with figures of their own in the statistics; the rest are summed into one
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_STATS_MAX_COLLECTIONS",
        default_value = "100",
        value_name = "N"
    )]
    pub stats_max_collections: String,

    /// Log format
    #[arg(long, global = true, env = "DBKEEPER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Log filter (tracing EnvFilter syntax, e.g. `info`, `dbkeeper=debug`)
    #[arg(
        long = "log",
        global = true,
        env = "DBKEEPER_LOG",
        default_value = "info"
    )]
    pub log_filter: String,

    #[command(flatten)]
    pub retention: RetentionArgs,

    #[command(flatten)]
    pub remote_retention: RemoteRetentionArgs,
}

/// The remote's own retention; each unset value is the local one.
#[derive(Debug, Args, Clone)]
pub struct RemoteRetentionArgs {
    /// Remote: keep the N newest good sets (default: DBKEEPER_KEEP_LAST)
    #[arg(long, global = true, env = "DBKEEPER_REMOTE_KEEP_LAST")]
    pub remote_keep_last: Option<u32>,
    /// Remote: daily sets kept (default: DBKEEPER_KEEP_DAILY)
    #[arg(long, global = true, env = "DBKEEPER_REMOTE_KEEP_DAILY")]
    pub remote_keep_daily: Option<u32>,
    /// Remote: weekly sets kept (default: DBKEEPER_KEEP_WEEKLY)
    #[arg(long, global = true, env = "DBKEEPER_REMOTE_KEEP_WEEKLY")]
    pub remote_keep_weekly: Option<u32>,
    /// Remote: monthly sets kept (default: DBKEEPER_KEEP_MONTHLY)
    #[arg(long, global = true, env = "DBKEEPER_REMOTE_KEEP_MONTHLY")]
    pub remote_keep_monthly: Option<u32>,
}

#[derive(Debug, Args, Clone)]
pub struct RetentionArgs {
    /// Keep the N newest good sets
    #[arg(long, global = true, env = "DBKEEPER_KEEP_LAST", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest good set of each of the last N days that have one
    #[arg(long, global = true, env = "DBKEEPER_KEEP_DAILY", default_value_t = 7)]
    pub keep_daily: u32,
    /// Keep the newest good set of each of the last N ISO weeks that have one
    #[arg(long, global = true, env = "DBKEEPER_KEEP_WEEKLY", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest good set of each of the last N months that have one
    #[arg(
        long,
        global = true,
        env = "DBKEEPER_KEEP_MONTHLY",
        default_value_t = 0
    )]
    pub keep_monthly: u32,
}

// Parsed once per process: the sidecar's larger arguments cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Wait until every engine answers at the protocol level
    Wait {
        /// Engine URLs (default: every configured engine)
        urls: Vec<String>,
        /// Overall deadline
        #[arg(long, env = "DBKEEPER_WAIT_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// One protocol-level probe (the same as `dbkeeper-health`)
    Health {
        /// Engine URL (default: every configured engine)
        url: Option<String>,
        /// Probe timeout (keep it below the healthcheck's own timeout)
        #[arg(long, env = "DBKEEPER_HEALTH_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Take one backup set of the configured engines
    Backup {
        /// Only these engines (comma-separated: mongodb,redis,chroma)
        #[arg(long, env = "DBKEEPER_ONLY", value_delimiter = ',')]
        only: Vec<String>,
    },
    /// List backup sets, newest first
    List {
        /// Machine-readable output on stdout
        #[arg(long, env = "DBKEEPER_LIST_JSON")]
        json: bool,
        /// The off-host copy (DBKEEPER_REMOTE) instead of the repository
        #[arg(long)]
        remote: bool,
        /// The point-in-time recovery windows (from, to) per engine instead of the sets
        #[arg(long)]
        pitr: bool,
        /// Verify every set's checksums now (and record it) before listing
        #[arg(long, conflicts_with = "pitr")]
        verify: bool,
    },
    /// Check the checksums of every set, the newest (`latest`) or one (with --deep decode every record)
    Verify {
        /// Set id, or `latest` (the newest set, good or not); default: every set
        id: Option<String>,
        /// Also decode every record and compare counts with the manifest
        #[arg(long, env = "DBKEEPER_VERIFY_DEEP")]
        deep: bool,
        /// The off-host copy (DBKEEPER_REMOTE) instead of the repository
        #[arg(long)]
        remote: bool,
        /// Machine-readable output on stdout (one object per set)
        #[arg(long)]
        json: bool,
    },
    /// Restore a set into the configured engines
    Restore {
        /// Set id, or `latest` (the newest set that verifies)
        #[arg(default_value = "latest")]
        id: String,
        /// Only these engines
        #[arg(long, env = "DBKEEPER_ONLY", value_delimiter = ',')]
        only: Vec<String>,
        /// Replace the data of a non-empty target
        #[arg(long, env = "DBKEEPER_FORCE")]
        force: bool,
        /// Point-in-time recovery (MongoDB): the newest set before this RFC 3339 time, rolled forward with the archived oplog up to it
        #[arg(long, value_name = "TIME", conflicts_with_all = ["to_oplog_ts", "id"])]
        to_time: Option<String>,
        /// Point-in-time recovery to an oplog position SECONDS:INCREMENT (inclusive)
        #[arg(long, value_name = "T:I", conflicts_with = "id")]
        to_oplog_ts: Option<String>,
        /// Migration files: a set newer than the newest of them is refused (a downgrade) unless --force
        #[arg(long, env = "DBKEEPER_MIGRATIONS", value_name = "DIR")]
        migrations: Option<PathBuf>,
    },
    /// Restore only into targets that are empty
    Preseed {
        /// Only these engines
        #[arg(long, env = "DBKEEPER_ONLY", value_delimiter = ',')]
        only: Vec<String>,
        /// Migration files: a set newer than the newest of them is refused (a downgrade)
        #[arg(long, env = "DBKEEPER_MIGRATIONS", value_name = "DIR")]
        migrations: Option<PathBuf>,
    },
    /// Apply the retention policy
    Prune {
        /// Say what would be deleted, delete nothing
        #[arg(long, env = "DBKEEPER_PRUNE_DRY_RUN")]
        dry_run: bool,
        /// The off-host copy (DBKEEPER_REMOTE) with its own policy (DBKEEPER_REMOTE_KEEP_*)
        #[arg(long)]
        remote: bool,
    },
    /// Copy every verified set the remote lacks to it (DBKEEPER_REMOTE), then apply its retention
    Sync,
    /// Copy this binary and its role names (dbkeeper-health, dbkeeper-init) into DIR
    Install {
        /// Target directory, usually a volume shared with the database containers
        dir: std::path::PathBuf,
        /// Before installing, hand the tree at PATH to UID:GID (what is not theirs already;
        /// symlinks are not followed, other filesystems not entered). Repeatable.
        #[arg(long, value_name = "PATH=UID:GID", value_parser = parse_own)]
        own: Vec<Own>,
    },
    /// Import another tool's backup (seed layout, mongodump, dump.rdb, AOF, Chroma copy) as one set
    Import {
        /// The backup to import; with --all, a directory of seed-layout sets
        path: PathBuf,
        /// The set's time (RFC 3339 or YYYY-MM-DD_HH-MM-SS); default: the source's own time
        #[arg(long, value_name = "TIME", conflicts_with = "all")]
        time: Option<String>,
        /// Import every seed-layout set under PATH, oldest first, skipping those already imported
        #[arg(long)]
        all: bool,
    },
    /// Write a set out in a stock layout: a mongodump directory, a dump.rdb or the seed layout
    Export {
        /// Set id, or `latest`
        id: String,
        /// Target directory (must be absent or empty)
        dir: PathBuf,
        /// mongodump, rdb or seed
        #[arg(long, value_parser = ["mongodump", "rdb", "seed"])]
        format: String,
    },
    /// The resident role: scheduled backups, verify, retention, health loop, HTTP API
    Sidecar(SidecarArgs),
    /// Restore a set into scratch servers, compare counts with the manifest, wipe them again
    TestRestore {
        /// Set id, or `latest` (the newest set that verifies)
        #[arg(default_value = "latest")]
        id: String,
        /// Scratch engine URLs (wiped before and after) [env: DBKEEPER_TEST_RESTORE_MONGODB_URI,
        /// DBKEEPER_TEST_RESTORE_REDIS_URL, DBKEEPER_TEST_RESTORE_CHROMA_URL, each with _FILE]
        #[arg(long, value_delimiter = ',', value_name = "URL")]
        into: Vec<String>,
        /// Test a point-in-time recovery (MongoDB) to this RFC 3339 time
        #[arg(long, value_name = "TIME", conflicts_with = "id")]
        to_time: Option<String>,
    },
    /// Database statistics as a table: from the local sidecar's GET /stats (or --sidecar URL), or with --direct gathered once from the engines
    Stats {
        /// Print them again every DBKEEPER_STATS_INTERVAL until interrupted
        #[arg(long)]
        watch: bool,
        /// The sidecar to ask: `self` (the one at DBKEEPER_LISTEN on this host) or its URL
        #[arg(
            long,
            value_name = "URL",
            default_value = "self",
            conflicts_with = "direct"
        )]
        sidecar: String,
        /// Gather from the configured engines instead of asking a sidecar
        #[arg(long)]
        direct: bool,
    },
    /// The compose init role: wait for every engine, then preseed the empty ones
    Init {
        /// Overall deadline for the engines to become ready
        #[arg(long, env = "DBKEEPER_WAIT_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        migrate: MigrateArgs,
    },
    /// Apply pending schema migrations (DBKEEPER_MIGRATIONS/<engine>/V<version>__<desc>.<ext>)
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
        /// Say what would be applied, change nothing
        #[arg(long)]
        dry_run: bool,
        /// Apply pending migrations up to this version only
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        #[command(flatten)]
        args: MigrateArgs,
    },
}

/// Where migrations are and how `migrate` (and `init`) treat what Flyway would refuse.
#[derive(Debug, Args, Clone)]
pub struct MigrateArgs {
    /// Migration files, one directory per engine (`mongodb/`, `redis/`, `chroma/`)
    #[arg(long, global = true, env = "DBKEEPER_MIGRATIONS", value_name = "DIR")]
    pub migrations: Option<PathBuf>,
    /// After a failed migration: restore the engine from its pre-migration set, or leave it (halt)
    #[arg(long, global = true, env = "DBKEEPER_MIGRATE_ON_FAILURE", default_value = "restore", value_parser = ["restore", "halt"])]
    pub on_failure: String,
    /// Apply pending migrations older than the newest applied one
    #[arg(long, global = true, env = "DBKEEPER_MIGRATE_OUT_OF_ORDER")]
    pub out_of_order: bool,
    /// Go on when an applied migration's file is gone
    #[arg(long, global = true, env = "DBKEEPER_MIGRATE_IGNORE_MISSING")]
    pub ignore_missing: bool,
    /// How long to wait for another migrator to finish
    #[arg(long, global = true, env = "DBKEEPER_MIGRATE_LOCK_WAIT", default_value = "10m", value_parser = parse_duration)]
    pub migrate_lock_wait: Duration,
}

#[derive(Debug, Subcommand)]
pub enum MigrateAction {
    /// Each migration's version, description, state and time applied
    Info,
    /// Accept the current files: record changed checksums, forget failed and missing migrations
    Repair,
    /// Adopt an existing database: record VERSION as applied, so only newer files run
    Baseline {
        #[arg(value_name = "VERSION")]
        baseline_version: String,
        /// What the baseline stands for
        #[arg(long, default_value = "baseline")]
        description: String,
    },
}

/// The sidecar's own settings. Secrets (the API token, scratch URLs) are read by `config`
/// without clap's `env`, so `--help` never shows them.
#[derive(Debug, Args, Clone)]
pub struct SidecarArgs {
    /// When to take a backup: 5-field cron, in UTC unless TZ names a zone
    #[arg(long, env = "DBKEEPER_SCHEDULE", default_value = "0 2 * * *")]
    pub schedule: String,
    /// HTTP API and metrics address
    #[arg(long, env = "DBKEEPER_LISTEN", default_value = "0.0.0.0:9216")]
    pub listen: String,
    /// How often every engine is probed
    #[arg(long, env = "DBKEEPER_HEALTH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Newest verified set older than this makes /health 503 (default: 2× the schedule interval)
    #[arg(long, env = "DBKEEPER_MAX_BACKUP_AGE", value_parser = parse_duration)]
    pub max_backup_age: Option<Duration>,
    /// Repository free space below this raises an alert (`10%`, or bytes such as `5GiB`)
    #[arg(long, env = "DBKEEPER_MIN_FREE", default_value = "10%")]
    pub min_free: String,
    /// Bearer token for POST/DELETE [env: DBKEEPER_API_TOKEN, DBKEEPER_API_TOKEN_FILE]
    #[arg(long, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// Webhook receiving a JSON POST after a failed run [env: DBKEEPER_NOTIFY_URL, _FILE]
    #[arg(long, value_name = "URL")]
    pub notify_url: Option<String>,
    /// Which runs notify
    #[arg(long, env = "DBKEEPER_NOTIFY_ON", default_value = "failure", value_parser = ["failure", "always"])]
    pub notify_on: String,
    /// How long a running job may take to stop after SIGTERM
    #[arg(long, env = "DBKEEPER_STOP_TIMEOUT", default_value = "8s", value_parser = parse_duration)]
    pub stop_timeout: Duration,
    /// When to run test-restore into the scratch servers (5-field cron; off when unset)
    #[arg(long, env = "DBKEEPER_TEST_RESTORE_SCHEDULE")]
    pub test_restore_schedule: Option<String>,
    /// Newest set on the remote older than this makes /health 503 (default: DBKEEPER_MAX_BACKUP_AGE)
    #[arg(long, env = "DBKEEPER_REMOTE_MAX_AGE", value_parser = parse_duration)]
    pub remote_max_age: Option<Duration>,
    /// Redis memory above this share of maxmemory raises redis_memory_high in /alerts
    #[arg(long, env = "DBKEEPER_ALERT_REDIS_MEMORY", default_value = "90%")]
    pub alert_redis_memory: String,
    /// MongoDB connections above this share of the server's limit raise mongodb_connections_high
    #[arg(
        long,
        env = "DBKEEPER_ALERT_MONGODB_CONNECTIONS",
        default_value = "80%"
    )]
    pub alert_mongodb_connections: String,
    /// A replica-set member further behind its primary than this raises replication_lag
    #[arg(long, env = "DBKEEPER_ALERT_REPLICATION_LAG", default_value = "10s", value_parser = parse_duration)]
    pub alert_replication_lag: Duration,
    /// WAL a PostgreSQL replication slot holds on the server beyond this raises postgres_slot_lagging (bytes such as 1GiB)
    #[arg(long, env = "DBKEEPER_ALERT_POSTGRES_SLOT_LAG", default_value = "1GiB")]
    pub alert_postgres_slot_lag: String,
    /// How long a Redis eviction or a database restart stays in /alerts
    #[arg(long, env = "DBKEEPER_ALERT_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub alert_window: Duration,
}

/// When clap refused a value that came from a `DBKEEPER_*` variable rather than from a flag,
/// the one line that names the variable the operator set, e.g.
/// `DBKEEPER_WAIT_TIMEOUT="10": "10" is not a duration with a unit such as 30s, 5m or 2h (…)`.
/// `None` for every other error (a bad flag keeps clap's own report and usage hint).
///
/// clap reports an environment value as if it were the flag (`invalid value '10' for
/// '--timeout <TIMEOUT>'`) and records no source in the error, so the failing argument is found
/// again here: by its rendering among the arguments of the subcommands actually called, then
/// taken as coming from its variable when the variable is set and the flag is not on the command
/// line (a flag wins over its variable in clap, so then the flag was the value refused).
pub fn env_value_error(err: &clap::Error, args: &[std::ffi::OsString]) -> Option<String> {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};

    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8
    ) {
        return None;
    }
    let rendered = match err.get(ContextKind::InvalidArg)? {
        ContextValue::String(s) => s.clone(),
        _ => return None,
    };
    // The chain of subcommands called: their own arguments (and the globals above them) are
    // the candidates; `--timeout` of `wait` and of `init` read different variables.
    let matches = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(args)
        .ok();
    // Built (recursively) so that an argument renders as clap rendered it in the error.
    let mut root = Cli::command();
    root.build();
    let mut chain = vec![root];
    let mut m = matches.as_ref();
    while let Some((name, sub)) = m.and_then(|m| m.subcommand()) {
        let next = chain.last()?.find_subcommand(name)?.clone();
        chain.push(next);
        m = Some(sub);
    }
    let arg = chain
        .iter()
        .rev()
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_env().is_some() && a.to_string() == rendered)?;
    let var = arg.get_env()?;
    let value = std::env::var_os(var)?;
    if on_command_line(arg, args) {
        return None;
    }
    let why = match err.kind() {
        ErrorKind::ValueValidation => std::error::Error::source(err)
            .map(|e| e.to_string())
            .unwrap_or_else(|| "malformed".into()),
        ErrorKind::InvalidUtf8 => "not valid UTF-8".into(),
        _ => match err.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(v)) => format!("expected one of: {}", v.join(", ")),
            _ => "not an accepted value".into(),
        },
    };
    Some(format!(
        "{}={:?}: invalid value for --{}: {why}",
        var.to_string_lossy(),
        value.to_string_lossy(),
        arg.get_long().unwrap_or(arg.get_id().as_str())
    ))
}

/// Whether `arg` was given as a flag (`--name`, `--name=v`, an alias, `-x`) before any `--`.
fn on_command_line(arg: &clap::Arg, args: &[std::ffi::OsString]) -> bool {
    let longs: Vec<&str> = arg
        .get_long_and_visible_aliases()
        .unwrap_or_default()
        .into_iter()
        .chain(arg.get_all_aliases().unwrap_or_default())
        .collect();
    let short = arg.get_short();
    args.iter()
        .skip(1)
        .map(|a| a.to_string_lossy())
        .take_while(|a| a != "--")
        .any(|a| {
            if let Some(long) = a.strip_prefix("--") {
                let name = long.split('=').next().unwrap_or(long);
                longs.contains(&name)
            } else if let (Some(s), Some(rest)) = (short, a.strip_prefix('-')) {
                rest.starts_with(s)
            } else {
                false
            }
        })
}

/// `--own PATH=UID:GID`: a tree handed to a numeric user and group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Own {
    pub path: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Parses `PATH=UID:GID` (absolute path, numeric ids: the image has no user database to look
/// names up in, and Compose's `user:` takes the same numbers).
pub fn parse_own(s: &str) -> std::result::Result<Own, String> {
    let bad = |why: &str| format!("{s:?} is not PATH=UID:GID ({why})");
    let (path, ids) = s.rsplit_once('=').ok_or_else(|| bad("no '='"))?;
    if !path.starts_with('/') {
        return Err(bad("the path must be absolute"));
    }
    let (uid, gid) = ids
        .split_once(':')
        .ok_or_else(|| bad("the owner must be numeric UID:GID"))?;
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| bad("the owner must be numeric UID:GID"))
    };
    Ok(Own {
        path: PathBuf::from(path),
        uid: num(uid)?,
        gid: num(gid)?,
    })
}
