//! Rolling a restored set forward: its own oplog slice (which makes it consistent to its end),
//! then for a point-in-time restore the archived segments up to the target, nothing after it.

use std::time::Instant;

use mongodb::Client;
use mongodb::bson::RawDocumentBuf;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::bsonfile::DocReader;
use super::oplog::Applier;
use super::pitr::{OpTime, Plan, SegmentStore, entry_ts};
use super::{ENGINE, MongoEngine, OplogSlice};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Where a replay stands: entries at or before `at` are skipped (they are in the data
/// already, or a previous segment held them), entries after `to` end it.
struct Position {
    at: OpTime,
    to: OpTime,
    applied: u64,
}

impl Position {
    /// Applies `doc` when it falls in the window; `false` once past the target.
    async fn offer(&mut self, applier: &mut Applier, doc: &RawDocumentBuf) -> Result<bool> {
        let Some(ts) = entry_ts(doc) else {
            return Err(Error::engine(ENGINE, "an oplog entry has no ts"));
        };
        if ts > self.to {
            return Ok(false);
        }
        if ts > self.at {
            applier.apply(doc).await?;
            self.at = ts;
            self.applied += 1;
        }
        Ok(true)
    }
}

/// Replays the set's `oplog.bson` over the restored collections.
pub(super) async fn replay_slice(
    client: &Client,
    engine: &MongoEngine,
    set: &SetReader,
    entry: &EngineEntry,
    slice: &OplogSlice,
    cancel: &CancellationToken,
) -> Result<u64> {
    let f = entry
        .file(&slice.file)
        .ok_or_else(|| {
            Error::corrupt(
                set.id(),
                format!("mongodb: {} is not in the manifest", slice.file),
            )
        })?
        .clone();
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RawDocumentBuf>(256);
    let set2 = set.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        let r = set2.open_file(&f)?;
        let mut docs = DocReader::new(r);
        while let Some(d) = docs
            .next_doc()
            .map_err(|e| Error::corrupt(set2.id(), format!("{}: {e}", f.path)))?
        {
            if tx.blocking_send(d).is_err() {
                return Ok(());
            }
        }
        docs.into_inner().finish()
    });
    let mut applier = Applier::new(client.clone(), engine.cfg.filter.clone());
    let mut pos = Position {
        at: slice.start,
        to: slice.end,
        applied: 0,
    };
    let mut failed = None;
    while let Some(doc) = rx.recv().await {
        if cancel.is_cancelled() {
            failed = Some(Error::Interrupted(0));
            break;
        }
        match pos.offer(&mut applier, &doc).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(rx);
    let read = reader
        .await
        .map_err(|e| Error::engine(ENGINE, format!("oplog reader task failed: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    read?;
    applier.flush().await?;
    report_skipped(&applier);
    info!(
        engine = ENGINE,
        set = set.id(),
        entries = pos.applied,
        consistent_to = %slice.end,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "oplog slice replayed"
    );
    Ok(pos.applied)
}

/// Replays the plan's segments after its base set, up to its target.
pub(super) async fn replay_segments(
    client: &Client,
    engine: &MongoEngine,
    store: &SegmentStore,
    plan: &Plan,
    cancel: &CancellationToken,
) -> Result<u64> {
    let start = Instant::now();
    let mut applier = Applier::new(client.clone(), engine.cfg.filter.clone());
    let mut pos = Position {
        at: plan.base.end,
        to: plan.to,
        applied: 0,
    };
    'segments: for seg in &plan.segments {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let (s2, seg2) = (store.clone(), seg.clone());
        let raw = tokio::task::spawn_blocking(move || s2.read(&seg2))
            .await
            .map_err(|e| Error::engine("pitr", format!("segment task failed: {e}")))??;
        let mut docs = DocReader::new(&raw[..]);
        while let Some(doc) = docs
            .next_doc()
            .map_err(|e| Error::corrupt(seg.name(), e.to_string()))?
        {
            if !pos.offer(&mut applier, &doc).await? {
                break 'segments;
            }
        }
    }
    applier.flush().await?;
    report_skipped(&applier);
    info!(
        engine = ENGINE,
        base = %plan.base.set,
        segments = plan.segments.len(),
        entries = pos.applied,
        reached = %pos.at,
        target = %plan.to,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "oplog segments replayed"
    );
    Ok(pos.applied)
}

/// One line for entries on `system.*` collections that are not data (none on the servers
/// dbkeeper knows: their metadata changes come as DDL entries), so nothing is left out unsaid.
fn report_skipped(applier: &Applier) {
    let skipped = applier.skipped_system();
    if !skipped.is_empty() {
        let list: Vec<String> = skipped
            .iter()
            .map(|(ns, n)| format!("{ns} ({n})"))
            .collect();
        warn!(
            engine = ENGINE,
            "oplog entries on server metadata collections not replayed: {}",
            list.join(", ")
        );
    }
}
