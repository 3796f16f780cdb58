//! Point-in-time recovery for PostgreSQL (`DBKEEPER_POSTGRES_PITR=on`): WAL streamed over a
//! physical replication slot into the repository, as `pg_receivewal` receives it, and a
//! preseed that unpacks the newest base backup before a target time with the WAL up to it.
//!
//! Layout: `pitr/postgres/<run>/<system>_<timeline>_<start>_<segsize>_<len>_<reach>_<sha256>.wal.zst[.age]`
//! (the runs, keys and atomic publication of MongoDB's oplog segments). A piece holds the
//! first `len` bytes of the WAL segment that starts at LSN `start`: `len == segsize` is the
//! whole segment; a shorter one is the segment so far, published every flush interval and
//! replaced by the next, longer one. `reach` (microseconds since the epoch) is the newest
//! moment at which everything the server had flushed was in the piece: every transaction
//! that ended before it is there. The slot only moves past WAL once it is published.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::Conn;
use super::wal::{WalScanner, XactEnd};
use super::{CONNECT_TIMEOUT, ENGINE, PgConfig, PostgresEngine};
use crate::engine::EngineKind;
use crate::engine::mongodb::pitr::{RunKeys, SegmentStore};
use crate::error::{Error, Result};
use crate::repo::{Repo, SetInfo};

/// Where the WAL lives, relative to the repository.
pub const DIR: &str = "pitr/postgres";
const SUFFIX: &str = ".wal.zst";
const AGE: &str = ".age";
/// The slot the archiver streams from, unless `DBKEEPER_POSTGRES_SLOT` names another.
pub const DEFAULT_SLOT: &str = "dbkeeper";
/// Seconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH: i64 = 946_684_800;

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The name PostgreSQL gives the WAL segment holding `lsn` on `timeline`.
pub fn wal_file_name(timeline: u32, lsn: u64, seg_size: u64) -> String {
    let segno = lsn / seg_size;
    let per_id = 0x1_0000_0000 / seg_size;
    format!("{timeline:08X}{:08X}{:08X}", segno / per_id, segno % per_id)
}

/// Microseconds since 2000-01-01, as the protocol counts time.
fn pg_now() -> i64 {
    let now = Utc::now();
    (now.timestamp() - PG_EPOCH) * 1_000_000 + i64::from(now.timestamp_subsec_micros())
}

/// One archived piece of a WAL segment, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalPiece {
    pub run: String,
    pub system: String,
    pub timeline: u32,
    /// The LSN the segment starts at.
    pub start: u64,
    pub seg_size: u64,
    /// Bytes of the segment held, from its start.
    pub len: u64,
    pub reach: DateTime<Utc>,
    pub sha256: String,
    pub sealed: bool,
    pub size: u64,
}

impl WalPiece {
    pub fn whole(&self) -> bool {
        self.len == self.seg_size
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    pub fn file_name(&self) -> String {
        wal_file_name(self.timeline, self.start, self.seg_size)
    }

    pub fn name(&self) -> String {
        format!(
            "{}_{:08X}_{:016X}_{}_{}_{}_{}{SUFFIX}{}",
            self.system,
            self.timeline,
            self.start,
            self.seg_size,
            self.len,
            self.reach.timestamp_micros(),
            self.sha256,
            if self.sealed { AGE } else { "" }
        )
    }

    /// How errors and `verify` name it.
    pub fn what(&self) -> String {
        if self.whole() {
            format!("WAL segment {}/{}", self.run, self.file_name())
        } else {
            format!(
                "WAL segment {}/{} (its first {} bytes)",
                self.run,
                self.file_name(),
                self.len
            )
        }
    }

    fn parse(run: &str, name: &str, size: u64) -> Option<WalPiece> {
        let (stem, sealed) = match name.strip_suffix(AGE) {
            Some(s) => (s, true),
            None => (name, false),
        };
        let stem = stem.strip_suffix(SUFFIX)?;
        let p: Vec<&str> = stem.split('_').collect();
        let [system, tli, start, seg_size, len, reach, sha256] = p[..] else {
            return None;
        };
        let seg_size: u64 = seg_size.parse().ok()?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let len: u64 = len.parse().ok()?;
        if system.is_empty()
            || !system.bytes().all(|b| b.is_ascii_digit())
            || sha256.len() != 64
            || !seg_size.is_power_of_two()
            || seg_size < 1 << 20
            || start % seg_size != 0
            || len == 0
            || len > seg_size
        {
            return None;
        }
        Some(WalPiece {
            run: run.to_owned(),
            system: system.to_owned(),
            timeline: u32::from_str_radix(tli, 16).ok()?,
            start,
            seg_size,
            len,
            reach: DateTime::from_timestamp_micros(reach.parse().ok()?)?,
            sha256: sha256.to_owned(),
            sealed,
            size,
        })
    }
}

/// The archived WAL of a repository.
#[derive(Debug, Clone)]
pub struct WalStore {
    segs: SegmentStore,
}

impl WalStore {
    pub fn new(repo: Repo) -> Self {
        WalStore {
            segs: SegmentStore::in_dir(repo, DIR),
        }
    }

    pub fn display(&self) -> String {
        self.segs.display()
    }

    /// Every piece, ordered by system, timeline, start, then length.
    pub fn list(&self) -> Result<Vec<WalPiece>> {
        let mut out: Vec<WalPiece> = self
            .segs
            .list_files()?
            .into_iter()
            .filter_map(|(run, name, size)| WalPiece::parse(&run, &name, size))
            .collect();
        out.sort_by(|a, b| {
            (&a.system, a.timeline, a.start, a.len).cmp(&(&b.system, b.timeline, b.start, b.len))
        });
        Ok(out)
    }

    pub fn start_run(&self, now: DateTime<Utc>) -> Result<RunKeys> {
        self.segs.start_run(now)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        keys: &RunKeys,
        system: &str,
        timeline: u32,
        start: u64,
        seg_size: u64,
        data: &[u8],
        reach: DateTime<Utc>,
    ) -> Result<WalPiece> {
        let stored = self.segs.seal(keys, data)?;
        let piece = WalPiece {
            run: keys.run.clone(),
            system: system.to_owned(),
            timeline,
            start,
            seg_size,
            len: data.len() as u64,
            reach,
            sha256: hex::encode(Sha256::digest(&stored)),
            sealed: keys.is_sealed(),
            size: stored.len() as u64,
        };
        self.segs
            .put(&self.segs.rel(&piece.run, &piece.name()), &stored)?;
        Ok(piece)
    }

    /// A piece's stored bytes, checked against the checksum in its name.
    pub fn stored(&self, piece: &WalPiece) -> Result<Vec<u8>> {
        let corrupt = |m: &str| Error::corrupt(piece.what(), m);
        let stored = self
            .segs
            .get(&self.segs.rel(&piece.run, &piece.name()))?
            .ok_or_else(|| corrupt("is listed but cannot be read"))?;
        if hex::encode(Sha256::digest(&stored)) != piece.sha256 {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(stored)
    }

    /// A piece's WAL bytes: checksum, decryption, and length checked.
    pub fn read(&self, piece: &WalPiece) -> Result<Vec<u8>> {
        let what = piece.what();
        let stored = self.stored(piece)?;
        let raw = self.segs.open(&piece.run, piece.sealed, &what, stored)?;
        if raw.len() as u64 != piece.len {
            return Err(Error::corrupt(
                &what,
                format!("holds {} bytes, its name says {}", raw.len(), piece.len),
            ));
        }
        Ok(raw)
    }

    pub fn delete(&self, piece: &WalPiece) -> Result<()> {
        self.segs
            .delete_rel(&self.segs.rel(&piece.run, &piece.name()))
    }
}

/// What the archiver reports to the sidecar (`/metrics`, `/alerts`).
#[derive(Debug, Clone, Default)]
pub struct WalStatus {
    pub running: bool,
    /// Every transaction that ended before this is archived: the newest point a recovery
    /// can reach.
    pub reach: Option<DateTime<Utc>>,
    /// The end of what is published (what the slot was told it may release).
    pub archived_lsn: Option<u64>,
    pub segments_total: u64,
    pub bytes_total: u64,
    /// WAL the slot no longer held when archiving resumed: `(archived up to, resumed at)`.
    pub gap: Option<(u64, u64)>,
    pub last_error: Option<String>,
    /// WAL the server keeps for the slot: its flush position less the slot's restart point.
    pub slot_lag_bytes: Option<u64>,
}

pub type SharedWalStatus = Arc<Mutex<WalStatus>>;

/// What a base set contributes: its server, timeline, and the LSN its data is consistent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBase {
    pub set: String,
    pub system: String,
    pub timeline: u32,
    pub end_lsn: u64,
    pub finished: DateTime<Utc>,
}

/// The sets a recovery can start from: those with a PostgreSQL base backup.
pub fn bases(sets: &[SetInfo]) -> Vec<PgBase> {
    sets.iter()
        .filter_map(|s| {
            let m = s.manifest.as_ref().ok()?;
            let e = m.engines.get(&EngineKind::Postgres)?;
            let d = &e.details;
            Some(PgBase {
                set: s.id.clone(),
                system: d.get("system_identifier")?.as_str()?.to_owned(),
                timeline: d.get("timeline")?.as_str()?.parse().ok()?,
                end_lsn: parse_lsn(d.get("end_lsn")?.as_str()?)?,
                finished: e.finished_at,
            })
        })
        .collect()
}

/// The pieces that continue a base without a gap: from the segment holding its end, the
/// longest piece of each segment, until a segment is missing or only partly archived.
pub fn chain(pieces: &[WalPiece], base: &PgBase) -> Vec<WalPiece> {
    let mut out: Vec<WalPiece> = Vec::new();
    let mut at: Option<u64> = None;
    loop {
        let best = pieces
            .iter()
            .filter(|p| p.system == base.system && p.timeline == base.timeline)
            .filter(|p| match at {
                None => p.start <= base.end_lsn && base.end_lsn < p.start + p.seg_size,
                Some(a) => p.start == a,
            })
            .max_by_key(|p| (p.len, p.reach));
        let Some(best) = best else { break };
        if at.is_none() && best.end() < base.end_lsn {
            // The archive of the base's last segment stops before the base's end.
            break;
        }
        at = Some(best.start + best.seg_size);
        out.push(best.clone());
        if !best.whole() {
            break;
        }
    }
    out
}

/// The newest point a chain reaches: its last piece's reach, or the base's own end.
pub fn reach(chain: &[WalPiece], base: &PgBase) -> DateTime<Utc> {
    chain
        .last()
        .map(|p| p.reach.max(base.finished))
        .unwrap_or(base.finished)
}

/// A recovery window of `list --pitr`.
#[derive(Debug, Clone)]
pub struct PgWindow {
    pub set: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub segments: usize,
}

pub fn windows(bases: &[PgBase], pieces: &[WalPiece]) -> Vec<PgWindow> {
    let mut sorted: Vec<&PgBase> = bases.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.finished));
    sorted
        .into_iter()
        .map(|b| {
            let c = chain(pieces, b);
            PgWindow {
                set: b.set.clone(),
                from: b.finished,
                to: reach(&c, b),
                segments: c.len(),
            }
        })
        .collect()
}

/// Pieces no kept base needs: those of servers and timelines no kept base is on, and those
/// wholly before the oldest kept base's end on its timeline; partial pieces a longer piece
/// of the same segment supersedes. Without a kept base, none is deleted.
pub fn unneeded(bases: &[PgBase], pieces: &[WalPiece]) -> Vec<WalPiece> {
    if bases.is_empty() {
        return Vec::new();
    }
    pieces
        .iter()
        .filter(|p| {
            let oldest = bases
                .iter()
                .filter(|b| b.system == p.system && b.timeline == p.timeline)
                .map(|b| b.end_lsn)
                .min();
            let before = match oldest {
                Some(end) => p.start + p.seg_size <= end - end % p.seg_size,
                // Another server's or timeline's WAL is kept while it is newer than every
                // base: a set of it may not be taken yet.
                None => bases.iter().all(|b| b.finished > p.reach),
            };
            let superseded = pieces.iter().any(|q| {
                q.system == p.system
                    && q.timeline == p.timeline
                    && q.start == p.start
                    && q.len > p.len
            });
            before || superseded
        })
        .cloned()
        .collect()
}

/// A recovery of an empty data directory to a point in time: the base set, the WAL pieces
/// after it, and where the server stops.
#[derive(Debug, Clone)]
pub struct PgPlan {
    pub base: PgBase,
    pub chain: Vec<WalPiece>,
    pub to: DateTime<Utc>,
}

/// Plans a recovery to `to`: the newest base finished at or before it whose archived WAL
/// reaches it.
pub fn plan(repo: &Repo, to: DateTime<Utc>) -> Result<PgPlan> {
    let sets = repo.list()?;
    let all = bases(&sets);
    let pieces = WalStore::new(repo.clone()).list()?;
    let mut sorted: Vec<&PgBase> = all.iter().filter(|b| b.finished <= to).collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.finished));
    let Some(newest) = sorted.first() else {
        // An encrypted set's details (its LSNs and timeline) are readable with the key only.
        if all.is_empty()
            && sets.iter().any(|s| {
                s.manifest.as_ref().is_ok_and(|m| {
                    m.encryption.is_some() && m.engines.contains_key(&EngineKind::Postgres)
                })
            })
        {
            return Err(Error::Key(format!(
                "{}: the PostgreSQL sets are encrypted and their positions in the WAL are readable with the key only; set DBKEEPER_AGE_IDENTITY_FILE or DBKEEPER_AGE_PASSPHRASE_FILE",
                repo.display()
            )));
        }
        return Err(Error::repo(
            repo.display(),
            match all.iter().map(|b| b.finished).min() {
                Some(first) => format!(
                    "no PostgreSQL set finished at or before {}; the oldest finished at {}",
                    to.to_rfc3339(),
                    first.to_rfc3339()
                ),
                None => "holds no PostgreSQL set to recover from".to_owned(),
            },
        ));
    };
    // The newest base's chain decides; an older base's chain runs into the same WAL.
    let c = chain(&pieces, newest);
    let reached = reach(&c, newest);
    if reached < to {
        return Err(Error::repo(
            repo.display(),
            format!(
                "cannot recover PostgreSQL to {}: the archived WAL after set {} reaches {}; a gap or a stopped archiver ends it there",
                to.to_rfc3339(),
                newest.set,
                reached.to_rfc3339()
            ),
        ));
    }
    Ok(PgPlan {
        base: (*newest).clone(),
        chain: c,
        to,
    })
}

/// Writes the plan's WAL into `pg_wal` (each segment whole, a partial one padded with zeros
/// as PostgreSQL expects) up to the segment holding the first transaction that ended after
/// the target, and the recovery settings: the server replays up to the target, stops there
/// and promotes. Every piece is read (checksum, decryption, length) before it is written.
/// Returns the last transaction end kept and the one the server stops before.
pub fn write_recovery(
    store: &WalStore,
    plan: &PgPlan,
    data_dir: &Path,
) -> Result<(Option<XactEnd>, Option<XactEnd>)> {
    let wal_dir = data_dir.join("pg_wal");
    let mut scanner = match plan.chain.first() {
        Some(p) => WalScanner::new(p.start),
        None => WalScanner::new(0),
    };
    let mut kept: Option<XactEnd> = None;
    let mut stop: Option<XactEnd> = None;
    for (i, piece) in plan.chain.iter().enumerate() {
        let raw = store.read(piece).map_err(|e| match e {
            Error::Corrupt { set, message } => Error::corrupt(
                set,
                format!(
                    "{message}; the archive cannot recover past {}",
                    plan.chain
                        .get(i.wrapping_sub(1))
                        .map(|p| p.reach)
                        .unwrap_or(plan.base.finished)
                        .to_rfc3339()
                ),
            ),
            other => other,
        })?;
        let path = wal_dir.join(piece.file_name());
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(&raw)
            .and_then(|()| f.set_len(piece.seg_size))
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        for x in scanner.feed(&raw) {
            if x.start < plan.base.end_lsn {
                continue;
            }
            if x.time > plan.to {
                stop = Some(x);
                break;
            }
            kept = Some(x);
        }
        if stop.is_some() {
            break;
        }
    }
    let target = match stop {
        Some(_) => format!(
            "recovery_target_time = '{}'\nrecovery_target_inclusive = on\n",
            plan.to.format("%Y-%m-%d %H:%M:%S%.6f+00")
        ),
        // No transaction ended after the target in what is archived, and the archive reaches
        // the target: the end of the WAL is the target.
        None => String::new(),
    };
    let conf = format!(
        "\n# Written by dbkeeper: point-in-time recovery to {} from set {} and its archived WAL.\n\
         # In effect only while the server recovers (recovery.signal); it promotes at the target.\n\
         restore_command = 'false'\n\
         recovery_target_timeline = 'current'\n\
         {target}recovery_target_action = 'promote'\n",
        plan.to.to_rfc3339(),
        plan.base.set
    );
    let auto = data_dir.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .map_err(|e| Error::io(&auto, e))?;
    f.write_all(conf.as_bytes())
        .map_err(|e| Error::io(&auto, e))?;
    let signal = data_dir.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(|e| Error::io(&signal, e))?;
    Ok((kept, stop))
}

/// Preseeds the empty data directory `dir` for a recovery to `plan.to`: the base set as a
/// plain preseed unpacks it (verified whole first), then the archived WAL after it and the
/// recovery settings, all in the temp directory that is moved into place only when complete.
pub fn preseed_to_time(repo: &Repo, dir: &Path, plan: &PgPlan) -> Result<()> {
    if let crate::engine::Emptiness::HasData(what) = super::data_dir_state(dir)? {
        return Err(Error::config(format!(
            "{what}; a point-in-time recovery needs an empty data directory (stop the server and empty it, or point DBKEEPER_POSTGRES_DATA_DIR at a new volume); nothing was changed"
        )));
    }
    let set = repo.resolve(&plan.base.set, Some(EngineKind::Postgres))?;
    set.require_key()?;
    let entry = set.manifest.engines[&EngineKind::Postgres].clone();
    let store = WalStore::new(repo.clone());
    let outcome = std::cell::Cell::new((None, None));
    super::datadir::preseed_with(
        dir,
        &set,
        &entry,
        Some(&|tmp: &Path| {
            outcome.set(write_recovery(&store, plan, tmp)?);
            Ok(())
        }),
    )?;
    let (kept, stop): (Option<XactEnd>, Option<XactEnd>) = outcome.get();
    let wal_to = plan.chain.last().map(|p| fmt_lsn(p.end()));
    match stop {
        Some(stop) => info!(
            engine = ENGINE,
            dir = %dir.display(),
            set = %plan.base.set,
            target = %plan.to.to_rfc3339(),
            last_kept = ?kept.map(|x| x.time.to_rfc3339()),
            stops_before = %stop.time.to_rfc3339(),
            stop_lsn = %fmt_lsn(stop.start),
            "PGDATA preseeded to a point in time; the server replays the WAL up to the target on start, stops there and promotes"
        ),
        None => info!(
            engine = ENGINE,
            dir = %dir.display(),
            set = %plan.base.set,
            target = %plan.to.to_rfc3339(),
            last_kept = ?kept.map(|x| x.time.to_rfc3339()),
            wal_to = ?wal_to,
            "PGDATA preseeded to a point in time; no transaction ended between the target and the archive's end, so the server replays all of it and promotes"
        ),
    }
    Ok(())
}

/// A replication connection's simple query, with a refusal that names what the role needs.
async fn repl_query(c: &mut Conn, cfg: &PgConfig, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
    c.query(sql).await.map_err(|e| match e {
        Error::Refused { message, .. } => Error::engine(
            ENGINE,
            format!(
                "{}: {sql}: {message}; the role needs the REPLICATION attribute and pg_hba.conf a `host replication` line",
                cfg.display
            ),
        ),
        other => other,
    })
}

fn cell(rows: &[Vec<Option<String>>], col: usize) -> Option<String> {
    rows.first()?.get(col)?.clone()
}

/// `SHOW wal_segment_size`: "16MB".
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    Some(match unit.trim() {
        "" | "B" => n,
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        _ => return None,
    })
}

/// What one look at the server tells: its flush position and the slot's restart point.
struct ServerPos {
    system: String,
    timeline: u32,
    flush: u64,
    restart: Option<u64>,
}

async fn look(c: &mut Conn, cfg: &PgConfig, slot: &str) -> Result<ServerPos> {
    let ident = repl_query(c, cfg, "IDENTIFY_SYSTEM").await?;
    let bad =
        |what: &str| Error::engine(ENGINE, format!("{}: IDENTIFY_SYSTEM: {what}", cfg.display));
    let system = cell(&ident, 0).ok_or_else(|| bad("no system identifier"))?;
    let timeline = cell(&ident, 1)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| bad("no timeline"))?;
    let flush = cell(&ident, 2)
        .and_then(|l| parse_lsn(&l))
        .ok_or_else(|| bad("no WAL position"))?;
    let slot_row = repl_query(c, cfg, &format!("READ_REPLICATION_SLOT {slot}")).await?;
    let restart = cell(&slot_row, 1).and_then(|l| parse_lsn(&l));
    Ok(ServerPos {
        system,
        timeline,
        flush,
        restart,
    })
}

fn copy_data(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 5);
    v.push(b'd');
    v.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A standby status update: received up to `write`, durable (published) up to `flush`.
fn status_update(write: u64, flush: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(34);
    p.push(b'r');
    p.extend_from_slice(&write.to_be_bytes());
    p.extend_from_slice(&flush.to_be_bytes());
    p.extend_from_slice(&0u64.to_be_bytes());
    p.extend_from_slice(&pg_now().to_be_bytes());
    p.push(0);
    copy_data(&p)
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

pub fn valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The segment being received.
struct Current {
    start: u64,
    data: Vec<u8>,
    /// The piece of it published last, deleted once a longer one is published.
    published: Option<WalPiece>,
}

impl PostgresEngine {
    /// Streams WAL into `store` until `cancel`: `Ok` when cancelled, an error when the server
    /// or the repository fails (the caller retries). `on_gap` is called when no base set is
    /// followed by the archive (none yet, or the slot lost WAL): the caller takes one.
    #[allow(clippy::too_many_arguments)]
    pub async fn archive_wal(
        &self,
        store: &WalStore,
        slot: &str,
        flush_every: Duration,
        status: &SharedWalStatus,
        bases: Vec<PgBase>,
        on_gap: &(dyn Fn() + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let mut probe = Conn::connect(cfg, CONNECT_TIMEOUT, true).await?;
        let mut pos = look(&mut probe, cfg, slot).await?;
        if pos.restart.is_none() {
            // A slot that does not exist yet: created with its WAL reserved from now on.
            repl_query(
                &mut probe,
                cfg,
                &format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"),
            )
            .await?;
            info!(engine = ENGINE, slot, "replication slot created");
            pos = look(&mut probe, cfg, slot).await?;
        }
        if let (Some(r), Ok(mut g)) = (pos.restart, status.lock()) {
            g.slot_lag_bytes = Some(pos.flush.saturating_sub(r));
        }
        let restart = pos.restart.ok_or_else(|| {
            Error::engine(
                ENGINE,
                format!("{}: slot {slot} has no restart position", cfg.display),
            )
        })?;
        let seg_size = repl_query(&mut probe, cfg, "SHOW wal_segment_size")
            .await?
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| parse_size(&s))
            .filter(|s| s.is_power_of_two() && *s >= 1 << 20)
            .ok_or_else(|| {
                Error::engine(
                    ENGINE,
                    format!("{}: no usable wal_segment_size", cfg.display),
                )
            })?;
        let (system, timeline) = (pos.system.clone(), pos.timeline);

        let s2 = store.clone();
        let pieces = tokio::task::spawn_blocking(move || s2.list())
            .await
            .map_err(|e| Error::engine(ENGINE, format!("listing the WAL archive: {e}")))??;
        let mine: Vec<&WalPiece> = pieces
            .iter()
            .filter(|p| p.system == system && p.timeline == timeline && p.seg_size == seg_size)
            .collect();
        let archived = mine.iter().map(|p| p.end()).max();
        let restart_seg = restart - restart % seg_size;
        let start = match archived {
            Some(end) if end - end % seg_size >= restart_seg && end <= pos.flush => {
                end - end % seg_size
            }
            Some(end) if end - end % seg_size < restart_seg => {
                warn!(
                    engine = ENGINE,
                    archived_to = %fmt_lsn(end),
                    resumed_at = %fmt_lsn(restart_seg),
                    "pitr: the slot no longer holds the WAL after the archive's end; points between them cannot be recovered. Taking a set now"
                );
                if let Ok(mut g) = status.lock() {
                    g.gap = Some((end, restart_seg));
                }
                restart_seg
            }
            _ => restart_seg,
        };
        // A base the archive continues: one on this timeline whose end is at or after where
        // the contiguous archive before `start` begins.
        let mut chain_start = start;
        while chain_start >= seg_size
            && mine
                .iter()
                .any(|p| p.start == chain_start - seg_size && p.whole())
        {
            chain_start -= seg_size;
        }
        if !bases
            .iter()
            .any(|b| b.system == system && b.timeline == timeline && b.end_lsn >= chain_start)
        {
            info!(
                engine = ENGINE,
                "pitr: no PostgreSQL set is followed by the archived WAL yet; taking one now"
            );
            on_gap();
        }

        let s2 = store.clone();
        let keys = tokio::task::spawn_blocking(move || s2.start_run(Utc::now()))
            .await
            .map_err(|e| Error::engine(ENGINE, format!("starting a WAL archive run: {e}")))??;
        let sink = Sink {
            store,
            keys: Arc::new(keys),
            system: system.clone(),
            timeline,
            seg_size,
            status,
        };

        let mut c = Conn::connect(cfg, CONNECT_TIMEOUT, true).await?;
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::query(
            &format!(
                "START_REPLICATION SLOT {slot} PHYSICAL {} TIMELINE {timeline}",
                fmt_lsn(start)
            ),
            &mut buf,
        )
        .map_err(|e| Error::engine(ENGINE, e.to_string()))?;
        c.send(&buf).await?;
        loop {
            let m = c.read_cancel_safe().await?;
            match m.tag {
                b'W' => break,
                b'E' => return Err(c.server_error(&m.body)),
                _ => {}
            }
        }
        info!(engine = ENGINE, slot, start = %fmt_lsn(start), timeline, run = %sink.keys.run, "pitr: streaming WAL");
        if let Ok(mut g) = status.lock() {
            g.running = true;
            g.last_error = None;
        }

        let mut cur = Current {
            start,
            data: Vec::with_capacity(seg_size as usize),
            published: mine
                .iter()
                .filter(|p| p.start == start)
                .max_by_key(|p| p.len)
                .map(|p| (*p).clone()),
        };
        let mut durable = start;
        // The newest moment known to be covered, and a position that, once received, makes
        // the moment of its look covered.
        let mut reach: Option<DateTime<Utc>> = None;
        let mut pending: Option<(u64, DateTime<Utc>)> = None;
        let mut last_publish = std::time::Instant::now();
        let mut tick = tokio::time::interval(flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result: Result<()> = loop {
            let m = tokio::select! {
                m = c.read_cancel_safe() => m?,
                _ = tick.tick() => {
                    let received = cur.start + cur.data.len() as u64;
                    // The server's flush position now: once it is received, every transaction
                    // that ended before this moment is in the archive.
                    let t0 = Utc::now();
                    let p = look(&mut probe, cfg, slot).await?;
                    pending = Some((p.flush, t0));
                    if let Some(r) = p.restart
                        && let Ok(mut g) = status.lock()
                    {
                        g.slot_lag_bytes = Some(p.flush.saturating_sub(r));
                    }
                    if received >= p.flush {
                        reach = Some(t0);
                        pending = None;
                    }
                    let published = cur.published.as_ref().filter(|p| p.start == cur.start);
                    let grew = cur.data.len() as u64 > published.map_or(0, |p| p.len);
                    // Idle: the same bytes again, now known to reach further, but not every tick.
                    let stale = !cur.data.is_empty()
                        && published.is_some_and(|p| Some(p.reach) < reach)
                        && last_publish.elapsed() >= flush_every * 10;
                    if grew || stale {
                        last_publish = std::time::Instant::now();
                        let piece = sink.publish(&mut cur, reach).await?;
                        durable = durable.max(piece.end());
                    }
                    c.send(&status_update(received, durable)).await?;
                    continue;
                }
                _ = cancel.cancelled() => break Ok(()),
            };
            match m.tag {
                b'd' => {
                    let body = &m.body;
                    match body.first() {
                        Some(b'w') => {
                            let (Some(data_start), Some(_wal_end)) =
                                (be_u64(body, 1), be_u64(body, 9))
                            else {
                                break Err(Error::engine(ENGINE, "a malformed XLogData message"));
                            };
                            let mut data = &body[25.min(body.len())..];
                            let received = cur.start + cur.data.len() as u64;
                            if data_start != received {
                                break Err(Error::engine(
                                    ENGINE,
                                    format!(
                                        "the server sent WAL from {} where {} was expected",
                                        fmt_lsn(data_start),
                                        fmt_lsn(received)
                                    ),
                                ));
                            }
                            while !data.is_empty() {
                                let room = (seg_size as usize) - cur.data.len();
                                let n = room.min(data.len());
                                cur.data.extend_from_slice(&data[..n]);
                                data = &data[n..];
                                let received = cur.start + cur.data.len() as u64;
                                if let Some((f, t0)) = pending
                                    && received >= f
                                {
                                    reach = Some(t0);
                                    pending = None;
                                }
                                if cur.data.len() as u64 == seg_size {
                                    let piece = sink.publish(&mut cur, reach).await?;
                                    durable = durable.max(piece.end());
                                    cur = Current {
                                        start: piece.end(),
                                        data: Vec::with_capacity(seg_size as usize),
                                        published: None,
                                    };
                                    if let Ok(mut g) = status.lock() {
                                        g.segments_total += 1;
                                    }
                                    c.send(&status_update(cur.start, durable)).await?;
                                }
                            }
                        }
                        // A keepalive that asks for an answer.
                        Some(b'k') if body.get(17) == Some(&1) => {
                            let received = cur.start + cur.data.len() as u64;
                            c.send(&status_update(received, durable)).await?;
                        }
                        _ => {}
                    }
                }
                // The server ended the stream: its timeline ended (it was promoted, or is a
                // standby whose primary changed). The next try follows the new timeline.
                b'c' => {
                    break Err(Error::engine(
                        ENGINE,
                        "the server ended the WAL stream (its timeline changed)",
                    ));
                }
                b'E' => break Err(c.server_error(&m.body)),
                _ => {}
            }
        };
        // What was received is published before a clean stop.
        if result.is_ok() && !cur.data.is_empty() {
            let published = cur.published.as_ref().filter(|p| p.start == cur.start);
            if cur.data.len() as u64 > published.map_or(0, |p| p.len) {
                let piece = sink.publish(&mut cur, reach).await?;
                durable = durable.max(piece.end());
                let received = cur.start + cur.data.len() as u64;
                let _ = c.send(&status_update(received, durable)).await;
            }
        }
        if let Ok(mut g) = status.lock() {
            g.running = false;
        }
        probe.terminate().await;
        c.terminate().await;
        result
    }
}

/// Where one archiver run publishes: its store and keys, and the server's segments.
struct Sink<'a> {
    store: &'a WalStore,
    keys: Arc<RunKeys>,
    system: String,
    timeline: u32,
    seg_size: u64,
    status: &'a SharedWalStatus,
}

impl Sink<'_> {
    /// Publishes what is held of the current segment, known to reach `reach` (the epoch when
    /// not known yet), then deletes the shorter piece it replaces.
    async fn publish(&self, cur: &mut Current, reach: Option<DateTime<Utc>>) -> Result<WalPiece> {
        let reach = reach.unwrap_or(DateTime::UNIX_EPOCH);
        let (s2, k2, sys, data, start) = (
            self.store.clone(),
            self.keys.clone(),
            self.system.clone(),
            cur.data.clone(),
            cur.start,
        );
        let (timeline, seg_size, status) = (self.timeline, self.seg_size, self.status);
        let old = cur.published.take().filter(|p| p.start == start);
        let piece = tokio::task::spawn_blocking(move || {
            let piece = s2.write(&k2, &sys, timeline, start, seg_size, &data, reach)?;
            if let Some(old) = old
                && old != piece
                && let Err(e) = s2.delete(&old)
            {
                warn!(engine = ENGINE, piece = %old.what(), error = %e, "pitr: cannot delete a replaced partial segment; retention removes it later");
            }
            Ok::<_, Error>(piece)
        })
        .await
        .map_err(|e| Error::engine(ENGINE, format!("publishing WAL: {e}")))??;
        cur.published = Some(piece.clone());
        debug!(engine = ENGINE, piece = %piece.what(), "pitr: WAL published");
        if let Ok(mut g) = status.lock() {
            g.archived_lsn = Some(piece.end());
            g.bytes_total += piece.size;
            if reach > DateTime::UNIX_EPOCH {
                g.reach = Some(reach);
            }
        }
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(start: u64, len: u64) -> WalPiece {
        WalPiece {
            run: "2026-12-05_03-00-00".into(),
            system: "7412345678901234567".into(),
            timeline: 1,
            start,
            seg_size: 16 << 20,
            len,
            reach: DateTime::from_timestamp_micros(1_796_443_200_123_456).unwrap(),
            sha256: "a".repeat(64),
            sealed: false,
            size: 10,
        }
    }

    const SEG: u64 = 16 << 20;

    #[test]
    fn lsn_and_file_names_as_postgres_writes_them() {
        assert_eq!(parse_lsn("0/3000028"), Some(0x3000028));
        assert_eq!(parse_lsn("1A/FF"), Some((0x1a << 32) | 0xff));
        assert_eq!(fmt_lsn(0x1_0300_0028), "1/3000028");
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(wal_file_name(1, 0x3000028, SEG), "000000010000000000000003");
        assert_eq!(
            wal_file_name(2, 0x1_FF00_0000, SEG),
            "0000000200000001000000FF"
        );
        assert_eq!(parse_size("16MB"), Some(SEG));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
    }

    #[test]
    fn names_round_trip_and_strays_are_not_pieces() {
        let p = WalPiece {
            sealed: true,
            ..piece(3 * SEG, 4096)
        };
        let n = p.name();
        assert!(n.ends_with(".wal.zst.age"), "{n}");
        assert_eq!(WalPiece::parse(&p.run, &n, 10), Some(p.clone()));
        for bad in [
            n.replace(".wal.zst", ".bson.zst"),
            piece(3 * SEG + 1, 10).name(),
            piece(3 * SEG, SEG + 1).name(),
            piece(3 * SEG, 0).name(),
            format!(".tmp-{n}"),
        ] {
            assert_eq!(WalPiece::parse("r", &bad, 1), None, "{bad}");
        }
    }

    fn base(end_lsn: u64) -> PgBase {
        PgBase {
            set: "2026-12-05_03-00-00".into(),
            system: "7412345678901234567".into(),
            timeline: 1,
            end_lsn,
            finished: DateTime::from_timestamp(1_796_443_000, 0).unwrap(),
        }
    }

    #[test]
    fn a_chain_takes_the_longest_piece_and_stops_at_a_gap_or_a_partial() {
        let pieces = vec![
            piece(2 * SEG, SEG),
            piece(3 * SEG, 100),
            piece(3 * SEG, SEG),
            piece(4 * SEG, 500),
            piece(6 * SEG, SEG),
        ];
        let c = chain(&pieces, &base(2 * SEG + 40));
        assert_eq!(
            c.iter().map(|p| (p.start / SEG, p.len)).collect::<Vec<_>>(),
            vec![(2, SEG), (3, SEG), (4, 500)]
        );
        // A base on another timeline or server has no chain here.
        let mut b = base(2 * SEG + 40);
        b.timeline = 2;
        assert!(chain(&pieces, &b).is_empty());
        // The archive of the base's segment stops before the base's end.
        assert!(chain(&[piece(2 * SEG, 10)], &base(2 * SEG + 40)).is_empty());
        // A gap after segment 4.
        let c = chain(&pieces[..3], &base(2 * SEG + 40));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn retention_keeps_what_a_kept_base_needs() {
        let pieces = vec![
            piece(SEG, SEG),
            piece(2 * SEG, SEG),
            piece(3 * SEG, 100),
            piece(3 * SEG, 200),
        ];
        let doomed = unneeded(&[base(2 * SEG + 40)], &pieces);
        assert_eq!(
            doomed
                .iter()
                .map(|p| (p.start / SEG, p.len))
                .collect::<Vec<_>>(),
            vec![(1, SEG), (3, 100)]
        );
        assert!(unneeded(&[], &pieces).is_empty());
    }
}
