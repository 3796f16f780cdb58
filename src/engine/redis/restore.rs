//! Online restore: `RESTORE … ABSTTL`, pipelined through the client library.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader};
use std::time::Instant;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

use super::*;

/// Maps a client-library error to ours, without the password (the library never prints it).
pub(super) fn client_error(cfg: &RedisConfig, e: redis::RedisError) -> Error {
    if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() || e.is_connection_dropped() {
        return cfg.unreachable(e.to_string());
    }
    match e.kind() {
        redis::ErrorKind::AuthenticationFailed => {
            cfg.refused(format!("authentication failed: {e}"))
        }
        _ => Error::engine(ENGINE, e.to_string()),
    }
}

pub(super) fn client(cfg: &RedisConfig) -> Result<redis::Connection> {
    // The client library builds its TLS config from the process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut settings = redis::RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(p) = &cfg.password {
        settings = settings.set_password(p.expose());
    }
    if let Some(u) = &cfg.username {
        settings = settings.set_username(u);
    }
    let addr = if cfg.tls {
        redis::ConnectionAddr::TcpTls {
            host: cfg.host.clone(),
            port: cfg.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(cfg.host.clone(), cfg.port)
    };
    let info = redis::IntoConnectionInfo::into_connection_info(addr)
        .map_err(|e| client_error(cfg, e))?
        .set_redis_settings(settings);
    let client = match (&cfg.client_auth, cfg.tls) {
        (Some(auth), true) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: auth.cert_pem.to_vec(),
                    client_key: auth.key_pem.to_vec(),
                }),
                // None: the system's roots (or SSL_CERT_FILE), as the probe trusts.
                root_cert: None,
            },
        ),
        _ => redis::Client::open(info),
    }
    .map_err(|e| client_error(cfg, e))?;
    client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| client_error(cfg, e))
}

/// Collects `RESTORE` commands into pipelines bounded by bytes and count.
pub(super) struct Restorer<'a> {
    cfg: &'a RedisConfig,
    con: redis::Connection,
    cancel: &'a CancellationToken,
    rdb_version: u16,
    source_version: &'a str,
    pipe: redis::Pipeline,
    pipe_bytes: usize,
    pipe_keys: usize,
    /// The db the connection is in once the queued commands have run.
    db: Option<u64>,
    counts: BTreeMap<u64, u64>,
    expired: u64,
    bytes: u64,
    keys: u64,
    start: Instant,
    last_report: Instant,
}

impl<'a> Restorer<'a> {
    /// A restorer on a new connection, for a caller that feeds it keys itself (an AOF's RDB
    /// part).
    pub(super) fn new(
        cfg: &'a RedisConfig,
        cancel: &'a CancellationToken,
        rdb_version: u16,
        source_version: &'a str,
    ) -> Result<Self> {
        Ok(Restorer {
            cfg,
            con: client(cfg)?,
            cancel,
            rdb_version,
            source_version,
            pipe: redis::pipe(),
            pipe_bytes: 0,
            pipe_keys: 0,
            db: None,
            counts: BTreeMap::new(),
            expired: 0,
            bytes: 0,
            keys: 0,
            start: Instant::now(),
            last_report: Instant::now(),
        })
    }

    /// Sends what is queued; afterwards the connection's db is not known.
    pub(super) fn flush_now(&mut self) -> Result<()> {
        self.flush()?;
        self.db = None;
        Ok(())
    }

    pub(super) fn connection(&mut self) -> &mut redis::Connection {
        &mut self.con
    }

    fn flush(&mut self) -> Result<()> {
        if self.pipe_keys == 0 {
            return Ok(());
        }
        let r: redis::RedisResult<()> = self.pipe.query(&mut self.con);
        self.pipe.clear();
        self.pipe_bytes = 0;
        self.pipe_keys = 0;
        r.map_err(|e| {
            let msg = e.to_string();
            if msg.contains("payload version") {
                Error::engine(
                    ENGINE,
                    format!(
                        "the target refuses this set's data (RDB version {}, written by Redis {}): restore into Redis {} or newer",
                        self.rdb_version, self.source_version, self.source_version
                    ),
                )
            } else if msg.contains("BUSYKEY") {
                Error::engine(
                    ENGINE,
                    format!("{msg}: the target was not empty; re-run with --force to replace its data"),
                )
            } else {
                client_error(self.cfg, e)
            }
        })
    }
}

impl rdb::Visitor for Restorer<'_> {
    fn key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        *self.counts.entry(rec.db).or_default() += 1;
        self.keys += 1;
        let ttl = match rec.expire_ms {
            Some(at) if at <= Utc::now().timestamp_millis() => {
                self.expired += 1;
                debug!(engine = ENGINE, db = rec.db, key = %String::from_utf8_lossy(rec.key), "skipping a key that has already expired");
                return Ok(());
            }
            Some(at) => at,
            None => 0,
        };
        if self.db != Some(rec.db) {
            self.pipe.cmd("SELECT").arg(rec.db).ignore();
            self.db = Some(rec.db);
        }
        let payload = rdb::dump_payload(rec.payload, self.rdb_version);
        self.pipe_bytes += payload.len() + rec.key.len();
        self.bytes += payload.len() as u64;
        let cmd = self.pipe.cmd("RESTORE").arg(rec.key).arg(ttl).arg(payload);
        if ttl > 0 {
            cmd.arg("ABSTTL");
        }
        cmd.ignore();
        self.pipe_keys += 1;
        if self.pipe_bytes >= BATCH_BYTES || self.pipe_keys >= BATCH_KEYS {
            self.flush()?;
        }
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            info!(
                engine = ENGINE,
                keys = self.keys,
                bytes = self.bytes,
                keys_per_s = (self.keys as f64 / secs) as u64,
                "restore in progress"
            );
        }
        Ok(())
    }
}

/// Reads the RDB version from the header (`REDIS0011`) without consuming it.
pub(super) fn peek_rdb_version(r: &mut impl BufRead) -> io::Result<Option<u16>> {
    let head = r.fill_buf()?;
    Ok(head
        .get(..9)
        .filter(|h| h.starts_with(b"REDIS"))
        .and_then(|h| std::str::from_utf8(&h[5..9]).ok())
        .and_then(|v| v.parse().ok()))
}

pub(super) fn restore_blocking(
    cfg: &RedisConfig,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    if super::aof::is_aof(entry) {
        return super::aof::replay(cfg, set, entry, cancel);
    }
    let file = entry
        .file(&format!("redis/{DUMP_REL}.zst"))
        .ok_or_else(|| Error::corrupt(set.id(), "its redis part has no dump.rdb.zst"))?;
    let mut reader = BufReader::with_capacity(1 << 20, set.open_file(file)?);
    let rdb_version = peek_rdb_version(&mut reader)
        .map_err(|e| Error::corrupt(set.id(), format!("{}: {e}", file.path)))?
        .ok_or_else(|| Error::corrupt(set.id(), format!("{}: not an RDB file", file.path)))?;
    if u32::from(rdb_version) > rdb::MAX_VERSION {
        // Online restore re-sends every key, which needs the records decoded; the server
        // that wrote this format loads the file itself.
        return Err(Error::engine(
            ENGINE,
            format!(
                "set {} holds RDB version {rdb_version} (Redis {}), newer than this build decodes key by key: preseed it through DBKEEPER_REDIS_DATA_DIR into a stopped server of that version, or upgrade dbkeeper",
                set.id(),
                entry.server_version
            ),
        ));
    }
    let mut r = Restorer::new(cfg, cancel, rdb_version, &entry.server_version)?;
    let opts = rdb::ParseOptions {
        decode_values: false,
        capture_payload: true,
    };
    let parsed = rdb::read(&mut reader, &opts, &mut r, false);
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    parsed.map_err(|e| e.into_set_error(set.id()))?;
    r.flush()?;
    reader.into_inner().finish().map_err(|e| {
        if cancel.is_cancelled() {
            Error::Interrupted(0)
        } else {
            e
        }
    })?;
    if r.expired > 0 {
        info!(
            engine = ENGINE,
            expired = r.expired,
            "keys whose expiry passed since the backup were not restored"
        );
    }
    info!(
        engine = ENGINE,
        keys = r.keys,
        bytes = r.bytes,
        elapsed_ms = r.start.elapsed().as_millis() as u64,
        "keys restored"
    );
    Ok(r.counts
        .iter()
        .map(|(db, n)| (rdb::db_key(*db), *n))
        .collect())
}
