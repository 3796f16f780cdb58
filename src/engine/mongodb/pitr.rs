//! Point-in-time recovery: the oplog archived continuously beside the sets, as segments.
//!
//! Layout: `pitr/mongodb/<run>/<prev>_<last>_<count>_<sha256>.bson.zst[.age]`. A run is one
//! archiver's life (its id is its start time, named like a set); in passphrase mode its
//! `identity.age` seals the run's key as a set's does. A segment holds the oplog entries after
//! `prev` up to and including `last`, as raw BSON documents one after another, compressed
//! with zstd and, with age configured, encrypted; the SHA-256 is of the stored bytes. Every
//! fact a restore plans with is in the name, so one listing plans a recovery: segments chain
//! when one's `prev` is the previous one's `last`, and a chain that does not link is a gap.
//! A segment is written under a temporary name and renamed (a directory) or put in one
//! request (a bucket), so a listed segment is always whole.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use mongodb::bson::{RawDocument, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::repo::backend::Backend;
use crate::repo::crypt::{Crypto, SetSealer};
use crate::repo::{Repo, TMP_PREFIX, fsync_dir, parse_set_name};

/// Where the segments live, relative to the repository.
pub const DIR: &str = "pitr/mongodb";
const IDENTITY: &str = "identity.age";
const SUFFIX: &str = ".bson.zst";
const AGE: &str = ".age";
/// zstd level of segments: small and frequent, written while the server is under its write
/// load, so speed matters more than a few percent of size.
const LEVEL: i32 = 1;

/// An oplog position: the `ts` of an entry (seconds, then an increment within the second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpTime {
    pub t: u32,
    pub i: u32,
}

impl OpTime {
    pub const ZERO: OpTime = OpTime { t: 0, i: 0 };

    /// The last position within second `time` (every entry written at or before it).
    pub fn end_of(time: DateTime<Utc>) -> Result<OpTime> {
        let t = u32::try_from(time.timestamp())
            .map_err(|_| Error::config(format!("{time}: outside the oplog's time range")))?;
        Ok(OpTime { t, i: u32::MAX })
    }

    /// `T:I`, as `--to-oplog-ts` takes it.
    pub fn parse(s: &str) -> Result<OpTime> {
        let bad = || {
            Error::config(format!(
                "{s:?}: expected an oplog timestamp SECONDS:INCREMENT"
            ))
        };
        let (t, i) = s.trim().split_once(':').ok_or_else(bad)?;
        Ok(OpTime {
            t: t.parse().map_err(|_| bad())?,
            i: i.parse().map_err(|_| bad())?,
        })
    }

    pub fn time(self) -> DateTime<Utc> {
        DateTime::from_timestamp(i64::from(self.t), 0).unwrap_or_default()
    }

    fn file_form(self) -> String {
        format!("{:010}.{:010}", self.t, self.i)
    }

    fn from_file_form(s: &str) -> Option<OpTime> {
        let (t, i) = s.split_once('.')?;
        Some(OpTime {
            t: t.parse().ok()?,
            i: i.parse().ok()?,
        })
    }
}

impl From<Timestamp> for OpTime {
    fn from(ts: Timestamp) -> Self {
        OpTime {
            t: ts.time,
            i: ts.increment,
        }
    }
}

impl From<OpTime> for Timestamp {
    fn from(o: OpTime) -> Self {
        Timestamp {
            time: o.t,
            increment: o.i,
        }
    }
}

impl fmt::Display for OpTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.t, self.i)
    }
}

/// The `ts` of an oplog entry.
pub fn entry_ts(entry: &RawDocument) -> Option<OpTime> {
    entry.get_timestamp("ts").ok().map(OpTime::from)
}

/// One published segment, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub run: String,
    /// The entry before this segment's first one (exclusive lower bound).
    pub prev: OpTime,
    /// Its last entry (inclusive upper bound).
    pub last: OpTime,
    pub count: u64,
    pub sha256: String,
    pub sealed: bool,
    pub size: u64,
}

impl Segment {
    pub fn name(&self) -> String {
        format!(
            "{}_{}_{}_{}{SUFFIX}{}",
            self.prev.file_form(),
            self.last.file_form(),
            self.count,
            self.sha256,
            if self.sealed { AGE } else { "" }
        )
    }

    /// How errors and `verify` name it.
    pub fn what(&self) -> String {
        format!("oplog segment {}/{}", self.run, self.name())
    }

    fn parse(run: &str, name: &str, size: u64) -> Option<Segment> {
        let (stem, sealed) = match name.strip_suffix(AGE) {
            Some(s) => (s, true),
            None => (name, false),
        };
        let stem = stem.strip_suffix(SUFFIX)?;
        let mut parts = stem.split('_');
        let prev = OpTime::from_file_form(parts.next()?)?;
        let last = OpTime::from_file_form(parts.next()?)?;
        let count = parts.next()?.parse().ok()?;
        let sha256 = parts.next()?.to_owned();
        if parts.next().is_some() || sha256.len() != 64 || last <= prev {
            return None;
        }
        Some(Segment {
            run: run.to_owned(),
            prev,
            last,
            count,
            sha256,
            sealed,
            size,
        })
    }
}

/// The segments of a repository.
#[derive(Debug, Clone)]
pub struct SegmentStore {
    repo: Repo,
    /// `pitr/<engine>` under the repository.
    dir: &'static str,
}

/// Keys of one archiver run: the sealer, when segments are encrypted.
pub struct RunKeys {
    pub run: String,
    sealer: Option<SetSealer>,
}

impl RunKeys {
    /// Whether the run's segments are encrypted.
    pub fn is_sealed(&self) -> bool {
        self.sealer.is_some()
    }
}

impl SegmentStore {
    pub fn new(repo: Repo) -> Self {
        Self::in_dir(repo, DIR)
    }

    /// The same layout of runs under another directory (another engine's continuous log).
    pub(crate) fn in_dir(repo: Repo, dir: &'static str) -> Self {
        SegmentStore { repo, dir }
    }

    pub fn display(&self) -> String {
        format!("{}/{}", self.repo.display(), self.dir)
    }

    /// Every published segment, ordered by `last`, then `prev`.
    pub fn list(&self) -> Result<Vec<Segment>> {
        let mut out: Vec<Segment> = self
            .list_files()?
            .into_iter()
            .filter_map(|(run, name, size)| Segment::parse(&run, &name, size))
            .collect();
        out.sort_by_key(|s| (s.last, s.prev));
        Ok(out)
    }

    /// Every file of every run: `(run, name, size)`, unordered.
    pub(crate) fn list_files(&self) -> Result<Vec<(String, String, u64)>> {
        let mut out = Vec::new();
        match self.repo.backend() {
            Backend::Local(root) => {
                let dir = root.join(self.dir);
                let runs = match std::fs::read_dir(&dir) {
                    Ok(r) => r,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(Error::io(&dir, e)),
                };
                for run in runs {
                    let run = run.map_err(|e| Error::io(&dir, e))?;
                    let name = run.file_name().to_string_lossy().into_owned();
                    if parse_set_name(&name).is_none() {
                        continue;
                    }
                    for f in std::fs::read_dir(run.path()).map_err(|e| Error::io(run.path(), e))? {
                        let f = f.map_err(|e| Error::io(run.path(), e))?;
                        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                        out.push((
                            name.clone(),
                            f.file_name().to_string_lossy().into_owned(),
                            size,
                        ));
                    }
                }
            }
            Backend::S3(store) => {
                let prefix = format!("{}/", self.dir);
                for (path, size) in store.list_files(self.dir)? {
                    let Some(rest) = path.strip_prefix(&prefix) else {
                        continue;
                    };
                    let Some((run, name)) = rest.split_once('/') else {
                        continue;
                    };
                    if parse_set_name(run).is_none() {
                        continue;
                    }
                    out.push((run.to_owned(), name.to_owned(), size));
                }
            }
        }
        Ok(out)
    }

    /// Starts a run: its directory, and in passphrase mode its sealed key. Removes the
    /// temporary files an interrupted run left.
    pub fn start_run(&self, now: DateTime<Utc>) -> Result<RunKeys> {
        let mut t = now;
        let taken: Vec<String> = self.list_files()?.into_iter().map(|f| f.0).collect();
        let run = loop {
            let id = crate::repo::set_name(t);
            if !taken.contains(&id) {
                break id;
            }
            t += chrono::TimeDelta::seconds(1);
        };
        let keys = match self.repo.crypto() {
            Some(c) if c.can_encrypt() => Some(c.new_set()?),
            Some(_) => {
                return Err(Error::config(
                    "DBKEEPER_AGE_IDENTITY_FILE is set without DBKEEPER_AGE_RECIPIENTS: the oplog cannot be archived encrypted; set the recipients",
                ));
            }
            None => None,
        };
        if let Backend::Local(root) = self.repo.backend() {
            remove_temps(&root.join(self.dir));
        }
        let (sealer, identity) = match keys {
            Some((s, id)) => (Some(s), id),
            None => (None, None),
        };
        if let Some(bytes) = identity {
            self.put(&format!("{}/{run}/{IDENTITY}", self.dir), &bytes)?;
        }
        Ok(RunKeys { run, sealer })
    }

    /// Compresses, seals and publishes `raw` (oplog entries after `prev`, up to `last`).
    pub fn write(
        &self,
        keys: &RunKeys,
        prev: OpTime,
        last: OpTime,
        count: u64,
        raw: &[u8],
    ) -> Result<Segment> {
        let stored = self.seal(keys, raw)?;
        let seg = Segment {
            run: keys.run.clone(),
            prev,
            last,
            count,
            sha256: hex::encode(Sha256::digest(&stored)),
            sealed: keys.sealer.is_some(),
            size: stored.len() as u64,
        };
        self.put(&self.rel(&seg.run, &seg.name()), &stored)?;
        Ok(seg)
    }

    /// `raw` compressed and, with age configured, encrypted: a segment's stored bytes.
    pub(crate) fn seal(&self, keys: &RunKeys, raw: &[u8]) -> Result<Vec<u8>> {
        let compressed = zstd::bulk::compress(raw, LEVEL)
            .map_err(|e| Error::engine("pitr", format!("compressing a segment: {e}")))?;
        match &keys.sealer {
            Some(s) => s.seal_bytes(&compressed),
            None => Ok(compressed),
        }
    }

    /// The path of `name` in `run`, relative to the repository.
    pub(crate) fn rel(&self, run: &str, name: &str) -> String {
        format!("{}/{run}/{name}", self.dir)
    }

    /// Writes a whole object: a temp file, fsync, rename, fsync of the directory; or one PUT.
    pub(crate) fn put(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        match self.repo.backend() {
            Backend::Local(root) => {
                let path = root.join(rel);
                let dir = path
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| root.clone());
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
                let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                f.write_all(bytes)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| Error::io(&tmp, e))?;
                drop(f);
                std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                fsync_dir(&dir)
            }
            Backend::S3(store) => store.put_small(rel, bytes.to_vec()),
        }
    }

    pub(crate) fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self.repo.backend() {
            Backend::Local(root) => match std::fs::read(root.join(rel)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(root.join(rel), e)),
            },
            Backend::S3(store) => store.read_all(rel),
        }
    }

    /// The entries of a segment, checked against its checksum and count: raw BSON documents
    /// one after another.
    pub fn read(&self, seg: &Segment) -> Result<Vec<u8>> {
        let what = seg.what();
        let corrupt = |m: String| Error::corrupt(&what, m);
        let stored = self.stored(seg)?;
        let raw = self.open(&seg.run, seg.sealed, &what, stored)?;
        let mut docs = super::bsonfile::DocReader::new(&raw[..]);
        while docs
            .next_doc()
            .map_err(|e| corrupt(e.to_string()))?
            .is_some()
        {}
        let n = docs.count();
        if n != seg.count {
            return Err(corrupt(format!(
                "holds {n} entries, its name says {}",
                seg.count
            )));
        }
        Ok(raw)
    }

    /// Decrypts (when `sealed`, with the run's key) and decompresses a segment's stored bytes.
    pub(crate) fn open(
        &self,
        run: &str,
        sealed: bool,
        what: &str,
        stored: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let compressed = if sealed {
            let crypto: &Crypto = self.repo.crypto().ok_or_else(|| {
                Error::Key(format!(
                    "{what} is encrypted; set DBKEEPER_AGE_IDENTITY_FILE or DBKEEPER_AGE_PASSPHRASE_FILE"
                ))
            })?;
            let identity = self.get(&self.rel(run, IDENTITY))?;
            let sealed_to: Vec<String> = if identity.is_some() {
                vec!["scrypt".into()]
            } else {
                Vec::new()
            };
            crypto
                .open_set(what, &sealed_to, identity.as_deref())?
                .open_bytes(&stored)?
        } else {
            stored
        };
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(&compressed[..])
            .and_then(|mut d| d.read_to_end(&mut raw))
            .map_err(|e| Error::corrupt(what, format!("zstd: {e}")))?;
        Ok(raw)
    }

    /// A segment's stored bytes, checked against the checksum in its name: what `verify`
    /// checks of a segment without `--deep`.
    pub fn stored(&self, seg: &Segment) -> Result<Vec<u8>> {
        let corrupt = |m: &str| Error::corrupt(seg.what(), m);
        let stored = self
            .get(&self.rel(&seg.run, &seg.name()))?
            .ok_or_else(|| corrupt("is listed but cannot be read"))?;
        if hex::encode(Sha256::digest(&stored)) != seg.sha256 {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(stored)
    }

    pub fn delete(&self, seg: &Segment) -> Result<()> {
        self.delete_rel(&self.rel(&seg.run, &seg.name()))
    }

    pub(crate) fn delete_rel(&self, rel: &str) -> Result<()> {
        match self.repo.backend() {
            Backend::Local(root) => {
                let p = root.join(rel);
                match std::fs::remove_file(&p) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::io(&p, e)),
                }
            }
            Backend::S3(store) => store.delete(rel),
        }
    }
}

fn remove_temps(dir: &std::path::Path) {
    let Ok(runs) = std::fs::read_dir(dir) else {
        return;
    };
    for run in runs.flatten() {
        let Ok(files) = std::fs::read_dir(run.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(f.path());
            }
        }
    }
}

/// `local.oplog.rs`, where a replica-set member records every write.
pub const OPLOG_DB: &str = "local";
pub const OPLOG_COLL: &str = "oplog.rs";

fn oplog(client: &mongodb::Client) -> mongodb::Collection<mongodb::bson::RawDocumentBuf> {
    client
        .database(OPLOG_DB)
        .collection::<mongodb::bson::RawDocumentBuf>(OPLOG_COLL)
}

/// The newest (`newest = true`) or oldest entry's position; `None` for an empty oplog.
///
/// The newest is what `hello` reports as this member's last write (`lastWrite.opTime`):
/// exact, and free, where a `$natural: -1` scan is not honoured by every server. The oldest
/// is the first entry in natural order.
pub async fn oplog_edge(
    client: &mongodb::Client,
    newest: bool,
) -> mongodb::error::Result<Option<OpTime>> {
    use futures_util::TryStreamExt;
    if newest {
        let hello = client
            .database("admin")
            .run_command(mongodb::bson::doc! {"hello": 1})
            .await?;
        if let Ok(ts) = hello
            .get_document("lastWrite")
            .and_then(|w| w.get_document("opTime"))
            .and_then(|o| o.get_timestamp("ts"))
        {
            // The last write may have left no entry (a transaction's commit on some
            // servers): the newest entry at or before it, from the last minute (a range the
            // server seeks to), is the point a restore can name.
            let mut cur = oplog(client)
                .find(mongodb::bson::doc! {"ts": {
                    "$gte": Timestamp { time: ts.time.saturating_sub(60), increment: 0 },
                    "$lte": ts,
                }})
                .sort(mongodb::bson::doc! {"ts": -1})
                .limit(1)
                .projection(mongodb::bson::doc! {"ts": 1})
                .await?;
            let entry = cur.try_next().await?.as_deref().and_then(entry_ts);
            return Ok(Some(entry.unwrap_or(ts.into())));
        }
    }
    let (sort, dir) = if newest { ("ts", -1) } else { ("$natural", 1) };
    let mut cur = oplog(client)
        .find(mongodb::bson::doc! {})
        .sort(mongodb::bson::doc! {sort: dir})
        .limit(1)
        .projection(mongodb::bson::doc! {"ts": 1})
        .await?;
    Ok(cur.try_next().await?.as_deref().and_then(entry_ts))
}

/// A cursor over the entries after `after` up to and including `upto`, in order.
pub async fn range(
    client: &mongodb::Client,
    after: OpTime,
    upto: OpTime,
) -> mongodb::error::Result<mongodb::Cursor<mongodb::bson::RawDocumentBuf>> {
    oplog(client)
        .find(mongodb::bson::doc! {"ts": {
            "$gt": Timestamp::from(after),
            "$lte": Timestamp::from(upto),
        }})
        .sort(mongodb::bson::doc! {"$natural": 1})
        .await
}

/// What a base set contributes to a recovery: its id and the point its data is consistent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub set: String,
    pub end: OpTime,
}

/// A recovery: a base set, then segments replayed in order up to `to` (inclusive).
#[derive(Debug, Clone)]
pub struct Plan {
    pub base: Base,
    pub segments: Vec<Segment>,
    pub to: OpTime,
}

/// The segments that continue from `from` without a gap, in order: the first holds `from`
/// (or starts exactly there), each next one starts where the previous ended.
pub fn chain_from(segments: &[Segment], from: OpTime) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut at = from;
    // A segment holds every entry after its `prev`, so one that starts at or before `at` and
    // ends after it continues the chain without a gap. Several runs may have archived the
    // same stretch (a restarted sidecar): the one reaching furthest is taken. The replay skips
    // entries at or before the position it has reached.
    while let Some(next) = segments
        .iter()
        .filter(|s| s.prev <= at && s.last > at)
        .max_by_key(|s| s.last)
    {
        at = next.last;
        out.push(next.clone());
    }
    out
}

/// The newest point reachable from `from`; `from` itself when nothing follows it.
pub fn reach(segments: &[Segment], from: OpTime) -> OpTime {
    chain_from(segments, from)
        .last()
        .map(|s| s.last)
        .unwrap_or(from)
}

/// Plans a recovery to `to`: the newest base set consistent to a point at or before it, whose
/// chain of segments reaches it. `bases` in any order.
pub fn plan(bases: &[Base], segments: &[Segment], to: OpTime) -> Result<Plan> {
    let mut sorted: Vec<&Base> = bases.iter().filter(|b| b.end <= to).collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.end));
    let Some(newest) = sorted.first() else {
        return Err(Error::repo(
            "pitr",
            match bases.iter().map(|b| b.end).min() {
                Some(first) => format!(
                    "no MongoDB set is consistent to a point at or before {}; the oldest is consistent to {} ({first})",
                    describe(to),
                    first.time().to_rfc3339()
                ),
                None => "holds no MongoDB set with an oplog end point to recover from (sets of a standalone server cannot be rolled forward)".to_owned(),
            },
        ));
    };
    let mut best_reach = None;
    for b in &sorted {
        let chain = chain_from(segments, b.end);
        let reached = chain.last().map(|s| s.last).unwrap_or(b.end);
        if reached >= to || (chain.is_empty() && b.end == to) {
            let segments = chain.into_iter().take_while_inclusive(|s| s.last < to);
            return Ok(Plan {
                base: (*b).clone(),
                segments,
                to,
            });
        }
        best_reach.get_or_insert((b.set.clone(), reached));
    }
    let (set, reached) = best_reach.unwrap_or((newest.set.clone(), newest.end));
    Err(Error::repo(
        "pitr",
        format!(
            "cannot recover to {}: the archived oplog after set {set} reaches {} ({reached}); a gap or a stopped archiver ends it there",
            describe(to),
            reached.time().to_rfc3339()
        ),
    ))
}

fn describe(o: OpTime) -> String {
    if o.i == u32::MAX {
        o.time().to_rfc3339()
    } else {
        format!("{o} ({})", o.time().to_rfc3339())
    }
}

trait TakeWhileInclusive: Iterator + Sized {
    /// Items while `f` holds, plus the first for which it does not.
    fn take_while_inclusive(self, f: impl FnMut(&Self::Item) -> bool) -> Vec<Self::Item>;
}

impl<I: Iterator> TakeWhileInclusive for I {
    fn take_while_inclusive(self, mut f: impl FnMut(&Self::Item) -> bool) -> Vec<Self::Item> {
        let mut out = Vec::new();
        for x in self {
            let more = f(&x);
            out.push(x);
            if !more {
                break;
            }
        }
        out
    }
}

/// A recoverable window: from a base set's point to the end of its chain.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub set: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub from_ts: String,
    pub to_ts: String,
    pub segments: usize,
}

/// The windows `list --pitr` shows: per base set, newest first; windows that the next older
/// set's window already contains whole are still shown (each set is a starting point).
pub fn windows(bases: &[Base], segments: &[Segment]) -> Vec<Window> {
    let mut sorted: Vec<&Base> = bases.iter().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.end));
    sorted
        .into_iter()
        .map(|b| {
            let chain = chain_from(segments, b.end);
            let to = chain.last().map(|s| s.last).unwrap_or(b.end);
            Window {
                set: b.set.clone(),
                from: b.end.time(),
                to: to.time(),
                from_ts: b.end.to_string(),
                to_ts: to.to_string(),
                segments: chain.len(),
            }
        })
        .collect()
}

/// Segments no kept base needs: those that end at or before the oldest kept base's point.
/// Without a kept base, none is deleted (they may be all that is left of recent writes).
pub fn unneeded(bases: &[Base], segments: &[Segment]) -> Vec<Segment> {
    let Some(oldest) = bases.iter().map(|b| b.end).min() else {
        return Vec::new();
    };
    segments
        .iter()
        .filter(|s| s.last <= oldest)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ot(t: u32, i: u32) -> OpTime {
        OpTime { t, i }
    }

    fn seg(prev: OpTime, last: OpTime) -> Segment {
        Segment {
            run: "2026-12-04_10-00-00".into(),
            prev,
            last,
            count: 1,
            sha256: "0".repeat(64),
            sealed: false,
            size: 1,
        }
    }

    #[test]
    fn names_round_trip_and_strays_are_not_segments() {
        let s = Segment {
            sealed: true,
            ..seg(ot(1_796_377_712, 11), ot(1_796_377_713, 2))
        };
        let n = s.name();
        assert!(n.ends_with(".bson.zst.age"), "{n}");
        assert_eq!(Segment::parse(&s.run, &n, 1), Some(s.clone()));
        for bad in [
            "x.bson.zst",
            ".tmp-0000000001.0000000000_0000000002.0000000000_1_00.bson.zst",
            &n.replace(".bson.zst", ".json"),
            // last not after prev
            &seg(ot(5, 0), ot(5, 0)).name(),
        ] {
            assert_eq!(Segment::parse("r", bad, 1), None, "{bad}");
        }
    }

    #[test]
    fn times_parse_and_bound_a_second() {
        assert_eq!(OpTime::parse("12:3").unwrap(), ot(12, 3));
        assert!(OpTime::parse("12").is_err());
        assert!(OpTime::parse("a:b").is_err());
        let t = DateTime::parse_from_rfc3339("2026-12-04T10:31:07Z")
            .unwrap()
            .to_utc();
        let e = OpTime::end_of(t).unwrap();
        assert!(ot(e.t, 5) <= e && ot(e.t + 1, 0) > e);
    }

    #[test]
    fn a_plan_takes_the_newest_base_before_the_target_and_its_chain() {
        let segs = vec![
            seg(ot(10, 0), ot(20, 0)),
            seg(ot(20, 0), ot(30, 0)),
            seg(ot(30, 0), ot(40, 0)),
        ];
        let bases = vec![
            Base {
                set: "a".into(),
                end: ot(15, 0),
            },
            Base {
                set: "b".into(),
                end: ot(25, 0),
            },
            Base {
                set: "c".into(),
                end: ot(45, 0),
            },
        ];
        let p = plan(&bases, &segs, ot(32, 0)).unwrap();
        assert_eq!(p.base.set, "b");
        assert_eq!(
            p.segments.iter().map(|s| s.last).collect::<Vec<_>>(),
            vec![ot(30, 0), ot(40, 0)]
        );
        // Inside a base's own point: no segment needed.
        let p = plan(&bases, &segs, ot(25, 0)).unwrap();
        assert_eq!((p.base.set.as_str(), p.segments.len()), ("b", 1));
        // Before every base.
        assert!(plan(&bases, &segs, ot(5, 0)).is_err());
        // After the archive's end.
        let e = plan(&bases[..2], &segs, ot(41, 0)).unwrap_err().to_string();
        assert!(e.contains("reaches"), "{e}");
    }

    #[test]
    fn a_gap_ends_a_chain_and_a_later_base_starts_another() {
        let segs = vec![
            seg(ot(10, 0), ot(20, 0)),
            // the archiver was down: entries after 20 up to 50 are lost
            seg(ot(50, 0), ot(60, 0)),
            seg(ot(60, 0), ot(70, 0)),
        ];
        let before = Base {
            set: "a".into(),
            end: ot(12, 0),
        };
        assert_eq!(reach(&segs, before.end), ot(20, 0));
        assert!(plan(std::slice::from_ref(&before), &segs, ot(65, 0)).is_err());
        let after = Base {
            set: "b".into(),
            end: ot(55, 0),
        };
        let p = plan(&[before.clone(), after], &segs, ot(65, 0)).unwrap();
        assert_eq!(p.base.set, "b");
        assert_eq!(p.segments.len(), 2);
        let w = windows(&[before], &segs);
        assert_eq!(w[0].to_ts, "20:0");
    }

    #[test]
    fn retention_keeps_what_the_oldest_kept_base_needs() {
        let segs = vec![
            seg(ot(10, 0), ot(20, 0)),
            seg(ot(20, 0), ot(30, 0)),
            seg(ot(30, 0), ot(40, 0)),
        ];
        let kept = vec![Base {
            set: "b".into(),
            end: ot(25, 0),
        }];
        let gone = unneeded(&kept, &segs);
        assert_eq!(gone, vec![segs[0].clone()]);
        assert!(unneeded(&[], &segs).is_empty());
    }
}
