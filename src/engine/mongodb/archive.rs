//! The oplog archiver of `DBKEEPER_MONGODB_PITR=on`: a tailable, awaitData cursor on
//! `local.oplog.rs`, from where the archive ends, cut into segments every flush interval (or
//! sooner, when a segment reaches its size limit) and published into the repository.
//!
//! Memory is bounded whatever the write rate: at most one segment's entries are held, and
//! the cursor's reader waits (a bounded channel) while a segment is being published.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{RawDocumentBuf, Timestamp, doc};
use mongodb::options::CursorType;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::pitr::{self, OpTime, RunKeys, SegmentStore};
use super::{ENGINE, MongoEngine, Purpose};
use crate::error::{Error, Result};

/// Raw bytes of entries at which a segment is published before its flush interval.
pub const SEGMENT_BYTES: usize = 2 << 20;
/// Entries in flight between the cursor and the segment being filled.
const QUEUE: usize = 256;
/// Entries per cursor batch: fewer round trips under a heavy write load.
const BATCH: u32 = 4096;

/// What the archiver reports to the sidecar (`/metrics`, `/alerts`, `/health`).
#[derive(Debug, Clone, Default)]
pub struct ArchiveStatus {
    pub running: bool,
    /// The newest entry archived: the newest point a restore can reach.
    pub newest: Option<OpTime>,
    /// Its write time as the server recorded it (`wall`), or the op time's second.
    pub newest_wall: Option<DateTime<Utc>>,
    /// Time from an entry's write to its segment's publication, for the newest segment's
    /// first entry (the one that waited longest).
    pub lag_seconds: f64,
    pub segments_total: u64,
    pub entries_total: u64,
    pub bytes_total: u64,
    /// The oplog rolled past the archive's end: `(archived up to, archiving resumed at)`.
    /// Cleared when a set consistent to a point after the gap exists.
    pub gap: Option<(OpTime, OpTime)>,
    pub last_error: Option<String>,
}

pub type SharedStatus = Arc<Mutex<ArchiveStatus>>;

/// Where archiving resumes: the end of the archive when the oplog still holds it; else (a
/// gap) the newest set's point when the oplog holds that; else the oplog's newest entry.
/// Returns the start and, for a gap, the position lost.
pub fn resume_point(
    archived: Option<OpTime>,
    newest_set: Option<OpTime>,
    oldest_in_oplog: Option<OpTime>,
    newest_in_oplog: Option<OpTime>,
) -> (OpTime, Option<OpTime>) {
    let holds = |p: OpTime| oldest_in_oplog.is_none_or(|o| o <= p);
    let top = newest_in_oplog.unwrap_or(OpTime::ZERO);
    match (archived, newest_set) {
        // A newer set than the archive: nothing between them is needed by a set older than
        // it that is not already archived, but the stretch up to it is, if still there.
        (Some(a), _) if holds(a) => (a, None),
        (Some(a), Some(s)) if s > a && holds(s) => (s, Some(a)),
        (Some(a), _) => (top, Some(a)),
        (None, Some(s)) if holds(s) => (s, None),
        (None, Some(s)) => (top, Some(s)),
        (None, None) => (top, None),
    }
}

impl MongoEngine {
    /// Archives the oplog until `cancel`: returns `Ok` when cancelled, an error when the server
    /// or the repository fails (the caller retries). `newest_set` is the point the newest
    /// MongoDB set is consistent to; `on_gap` is called when a gap is found (the caller takes
    /// a new set, which starts a new chain).
    pub async fn archive_oplog(
        &self,
        store: &SegmentStore,
        newest_set: Option<OpTime>,
        flush: Duration,
        status: &SharedStatus,
        on_gap: &(dyn Fn() + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<()> {
        // Not `with_client`: a stop must not wait on a dead server's session clean-up.
        let client = self.client(Purpose::Bulk).await?;
        let r = async {
            let hello = client
                .database("admin")
                .run_command(doc! {"hello": 1})
                .await
                .map_err(self.op_err("hello"))?;
            if hello.get_str("setName").is_err() {
                return Err(Error::engine(
                    ENGINE,
                    "DBKEEPER_MONGODB_PITR=on needs a replica set (a standalone server keeps no oplog): start mongod with --replSet",
                ));
            }
            let s2 = store.clone();
            let segments = tokio::task::spawn_blocking(move || s2.list())
                .await
                .map_err(|e| Error::engine("pitr", format!("listing task failed: {e}")))??;
            let archived = segments.iter().map(|s| s.last).max();
            let oldest = pitr::oplog_edge(&client, false)
                .await
                .map_err(self.op_err("reading the oplog"))?;
            let newest = pitr::oplog_edge(&client, true)
                .await
                .map_err(self.op_err("reading the oplog"))?;
            let (start, lost) = resume_point(archived, newest_set, oldest, newest);
            if let Some(lost) = lost {
                warn!(
                    engine = ENGINE,
                    archived_to = %lost,
                    oplog_starts = %oldest.unwrap_or(start),
                    resumes_at = %start,
                    "pitr gap: the oplog rolled past the archive's end; no point between them can be recovered. A new set starts a new chain"
                );
                if let Ok(mut g) = status.lock() {
                    g.gap = Some((lost, start));
                }
                on_gap();
            }
            let s2 = store.clone();
            let keys = tokio::task::spawn_blocking(move || s2.start_run(Utc::now()))
                .await
                .map_err(|e| Error::engine("pitr", format!("run task failed: {e}")))??;
            info!(engine = ENGINE, from = %start, run = %keys.run, flush_ms = flush.as_millis() as u64, "oplog archiving started");
            if let Ok(mut g) = status.lock() {
                g.running = true;
                g.newest.get_or_insert(start);
                g.last_error = None;
            }
            let r = self
                .tail(&client, store, keys, start, flush, status, cancel)
                .await;
            if let Ok(mut g) = status.lock() {
                g.running = false;
            }
            r
        }
        .await;
        let _ =
            tokio::time::timeout(Duration::from_secs(2), client.shutdown().immediate(true)).await;
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn tail(
        &self,
        client: &mongodb::Client,
        store: &SegmentStore,
        keys: RunKeys,
        start: OpTime,
        flush: Duration,
        status: &SharedStatus,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let keys = Arc::new(keys);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<RawDocumentBuf>(QUEUE);
        let reader_stop = cancel.child_token();
        let reader = {
            let client = client.clone();
            let stop = reader_stop.clone();
            let await_time =
                (flush / 2).clamp(Duration::from_millis(50), Duration::from_millis(500));
            async move {
                let mut after = start;
                loop {
                    let coll = client
                        .database(pitr::OPLOG_DB)
                        .collection::<RawDocumentBuf>(pitr::OPLOG_COLL);
                    let find = coll
                        .find(doc! {"ts": {"$gt": Timestamp::from(after)}})
                        .cursor_type(CursorType::TailableAwait)
                        .max_await_time(await_time)
                        .batch_size(BATCH);
                    let mut cur = tokio::select! {
                        c = find => c?,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    loop {
                        // An idle cursor is reopened from where it stands: some servers'
                        // tailable cursors stop seeing entries written after they opened, and
                        // a fresh query costs nothing on a quiet oplog.
                        let next = tokio::select! {
                            n = tokio::time::timeout(await_time + Duration::from_millis(100), cur.try_next()) => match n {
                                Ok(n) => n?,
                                Err(_) => break,
                            },
                            _ = stop.cancelled() => return Ok(()),
                        };
                        let Some(doc) = next else { break };
                        if let Some(ts) = pitr::entry_ts(&doc) {
                            after = after.max(ts);
                        }
                        if tx.send(doc).await.is_err() {
                            return Ok(());
                        }
                    }
                    // A tailable cursor dies when it found nothing at first (or the server
                    // dropped it): open another after a short pause.
                    tokio::select! {
                        _ = tokio::time::sleep(await_time / 4) => {}
                        _ = stop.cancelled() => return Ok(()),
                    }
                }
            }
        };
        let mut reader = tokio::spawn(async move {
            let r: mongodb::error::Result<()> = reader.await;
            r
        });

        let mut prev = start;
        let mut buf: Vec<u8> = Vec::with_capacity(SEGMENT_BYTES + (1 << 20));
        let mut count = 0u64;
        let mut last = start;
        let mut first_wall: Option<DateTime<Utc>> = None;
        let mut last_wall: Option<DateTime<Utc>> = None;
        let mut deadline: Option<Instant> = None;
        let result: Result<()> = loop {
            let wait = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            let got = tokio::select! {
                d = rx.recv() => Some(d),
                _ = tokio::time::sleep(wait) => None,
                _ = cancel.cancelled() => break Ok(()),
            };
            let mut due = got.is_none();
            match got {
                Some(Some(doc)) => {
                    let Some(ts) = pitr::entry_ts(&doc) else {
                        break Err(Error::engine(ENGINE, "an oplog entry has no ts"));
                    };
                    if ts <= last {
                        continue;
                    }
                    let wall = doc
                        .get_datetime("wall")
                        .ok()
                        .and_then(|w| DateTime::from_timestamp_millis(w.timestamp_millis()))
                        .unwrap_or_else(|| ts.time());
                    first_wall.get_or_insert(wall);
                    last_wall = Some(wall);
                    buf.extend_from_slice(doc.as_bytes());
                    count += 1;
                    last = ts;
                    // Due when the oldest pending entry was written `flush` ago (not read):
                    // an entry that reached us late waits no longer than it must.
                    deadline.get_or_insert_with(|| {
                        let waited = (Utc::now() - wall).to_std().unwrap_or_default();
                        Instant::now() + flush.saturating_sub(waited)
                    });
                    due |= buf.len() >= SEGMENT_BYTES;
                }
                Some(None) => {
                    // The reader ended: its error, awaited below, says why.
                    break Err(Error::engine(ENGINE, "the oplog reader stopped"));
                }
                None => {}
            }
            if !due || count == 0 {
                if count == 0 {
                    deadline = None;
                }
                continue;
            }
            let data = std::mem::replace(&mut buf, Vec::with_capacity(SEGMENT_BYTES + (1 << 20)));
            let (s2, k2, n) = (store.clone(), keys.clone(), count);
            let (p, l) = (prev, last);
            let published =
                tokio::task::spawn_blocking(move || s2.write(&k2, p, l, n, &data)).await;
            let seg = match published {
                Ok(Ok(seg)) => seg,
                // The entries are gone from memory but not from the oplog: the next start
                // resumes after the last published segment.
                Ok(Err(e)) => {
                    count = 0;
                    break Err(e);
                }
                Err(e) => {
                    count = 0;
                    break Err(Error::engine("pitr", format!("segment task failed: {e}")));
                }
            };
            let now = Utc::now();
            let lag = first_wall
                .map(|w| (now - w).num_milliseconds().max(0) as f64 / 1e3)
                .unwrap_or(0.0);
            debug!(engine = ENGINE, segment = %seg.name(), entries = n, lag_s = lag, "oplog segment published");
            if let Ok(mut g) = status.lock() {
                g.newest = Some(last);
                g.newest_wall = last_wall;
                g.lag_seconds = lag;
                g.segments_total += 1;
                g.entries_total += n;
                g.bytes_total += seg.size;
            }
            prev = last;
            count = 0;
            first_wall = None;
            deadline = None;
        };
        reader_stop.cancel();
        rx.close();
        // The reader stops at once unless a request to a dead server holds it: never wait
        // for that past a short grace.
        let reader_error = match tokio::time::timeout(Duration::from_millis(500), &mut reader).await
        {
            Ok(Ok(Err(e))) if !cancel.is_cancelled() => Some(e),
            Ok(_) => None,
            Err(_) => {
                reader.abort();
                None
            }
        };
        // What was read but not yet published is published now, whatever stopped the loop
        // (a stop, a lost server): those entries are whole and follow the last segment.
        if count > 0 {
            let s2 = store.clone();
            let data = buf;
            tokio::task::spawn_blocking(move || s2.write(&keys, prev, last, count, &data))
                .await
                .map_err(|e| Error::engine("pitr", format!("segment task failed: {e}")))??;
            if let Ok(mut g) = status.lock() {
                g.newest = Some(last);
                g.newest_wall = last_wall;
                g.segments_total += 1;
                g.entries_total += count;
            }
        }
        match reader_error {
            Some(e) if result.is_err() => Err(self.op_err("tailing the oplog")(e)),
            _ => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ot(t: u32) -> OpTime {
        OpTime { t, i: 1 }
    }

    #[test]
    fn archiving_resumes_where_it_can_and_reports_what_it_cannot() {
        // The oplog still holds the archive's end: no gap.
        assert_eq!(
            resume_point(Some(ot(50)), Some(ot(40)), Some(ot(10)), Some(ot(90))),
            (ot(50), None)
        );
        // Rolled past the archive, but a newer set's point is still there.
        assert_eq!(
            resume_point(Some(ot(50)), Some(ot(70)), Some(ot(60)), Some(ot(90))),
            (ot(70), Some(ot(50)))
        );
        // Rolled past both: from the top, with a gap.
        assert_eq!(
            resume_point(Some(ot(50)), Some(ot(40)), Some(ot(60)), Some(ot(90))),
            (ot(90), Some(ot(50)))
        );
        // First start after a set.
        assert_eq!(
            resume_point(None, Some(ot(40)), Some(ot(10)), Some(ot(90))),
            (ot(40), None)
        );
        // Nothing yet: from the top.
        assert_eq!(
            resume_point(None, None, Some(ot(10)), Some(ot(90))),
            (ot(90), None)
        );
    }
}
