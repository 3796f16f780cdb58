//! Restore: recreate each collection with its exported settings, then add its records in
//! batches of at most the target's `max_batch_size`. A blocking thread reads and checks the
//! export and builds request bodies; two concurrent writers send them (the server's index build
//! is the limit, so more writers buy nothing).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{TryStreamExt, stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::api::Api;
use super::format::{
    BatchBuilder, EMBEDDINGS_FILE, RECORDS_FILE, RecordReader, details_of, file_entry,
    read_collection_file,
};
use super::{Databases, ENGINE};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Concurrent `add` requests per collection. Chroma's single-node server builds its index
/// as it adds; on a small host more writers measured slower (3 writers: 36 s, 1 writer: 24 s
/// for 10k × 384-d), so two: one request in flight while the next is being sent.
const WRITERS: usize = 2;
/// Upper bound on one request body (base64 float32 is ~5.4 bytes per value): wide vectors get
/// batches smaller than `max_batch_size`, so memory stays near `2 × WRITERS + 1` × this.
const BATCH_BYTES: usize = 24 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub(super) async fn restore(
    api: &Api,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    super::datacopy::refuse_online(set, entry)?;
    let details = details_of(set, entry)?;
    let pre = api.preflight().await?;
    let batch = pre.max_batch_size;
    let mut counts = Counts::new();
    let start = Instant::now();
    for c in &details.collections {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        // One database selected: everything goes there (a set may be restored into another
        // database than it came from). Every database: each goes back to its own.
        let db = match &api.cfg.databases {
            Databases::One(d) => d.clone(),
            Databases::All => c.database.clone(),
        };
        let cf = {
            let (set, entry, c) = (set.clone(), entry.clone(), c.clone());
            tokio::task::spawn_blocking(move || read_collection_file(&set, &entry, &c))
                .await
                .map_err(|e| Error::engine(ENGINE, format!("restore reader failed: {e}")))??
        };
        if cf.dimension == 0 && cf.records > 0 {
            return Err(Error::corrupt(
                set.id(),
                format!("{ENGINE}: {}: records without a dimension", c.key()),
            ));
        }
        api.ensure_database(&db).await?;
        let id = api
            .create_collection(
                &db,
                &c.name,
                cf.metadata.as_deref(),
                cf.configuration.as_deref(),
                cf.schema.as_deref(),
            )
            .await?;
        info!(engine = ENGINE, database = %db, collection = %c.name, records = cf.records, "restoring collection");

        let (tx, rx) = mpsc::channel::<(Vec<u8>, usize)>(WRITERS);
        let reader = {
            let (set, entry, c) = (set.clone(), entry.clone(), c.clone());
            let dim = cf.dimension as usize;
            let base64 = pre.supports_base64_encoding;
            let batch = batch.min((BATCH_BYTES / (dim * 6 + 512)).max(1));
            tokio::task::spawn_blocking(move || -> Result<u64> {
                let corrupt = |m: String| Error::corrupt(set.id(), format!("{ENGINE}: {m}"));
                let records = set.open_file(file_entry(&set, &entry, &c, RECORDS_FILE)?)?;
                let vectors = set.open_file(file_entry(&set, &entry, &c, EMBEDDINGS_FILE)?)?;
                let mut rr = RecordReader::new(records, vectors, dim, c.key());
                let mut b = BatchBuilder::new(base64);
                while rr.next_record().map_err(corrupt)? {
                    let r = rr.record().map_err(corrupt)?;
                    b.push(&r, &rr.vector);
                    if b.len >= batch {
                        let n = b.len;
                        if tx.blocking_send((b.take(), n)).is_err() {
                            return Ok(rr.read);
                        }
                    }
                }
                if b.len > 0 {
                    let n = b.len;
                    if tx.blocking_send((b.take(), n)).is_err() {
                        return Ok(rr.read);
                    }
                }
                let n = rr.read;
                let (lines, vectors) = rr.into_inner();
                // Checksums are verified at the end of each file: a corrupt artifact fails
                // the restore (and leaves the marker) even though its records were sent.
                lines.finish()?;
                vectors.finish()?;
                Ok(n)
            })
        };

        let added = AtomicU64::new(0);
        let last_log = Mutex::new(Instant::now());
        let t0 = Instant::now();
        let batches = stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (Ok::<_, Error>(item), rx))
        });
        let write = batches.try_for_each_concurrent(WRITERS, |(body, n)| {
            let (db, id, added, last_log, c) = (&db, &id, &added, &last_log, &c);
            async move {
                api.add_raw(db, id, body).await?;
                let done = added.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                let mut last = last_log.lock().expect("not poisoned");
                if last.elapsed() >= PROGRESS_EVERY {
                    *last = Instant::now();
                    info!(
                        engine = ENGINE,
                        collection = %c.name,
                        records = done,
                        of = cf.records,
                        records_per_s = (done as f64 / t0.elapsed().as_secs_f64().max(1e-3)) as u64,
                        "restore progress"
                    );
                }
                Ok(())
            }
        });
        let written = tokio::select! {
            r = write => r,
            _ = cancel.cancelled() => Err(Error::Interrupted(0)),
        };
        let read = reader
            .await
            .map_err(|e| Error::engine(ENGINE, format!("restore reader failed: {e}")));
        written?;
        let read = read??;
        if read != cf.records {
            return Err(Error::corrupt(
                set.id(),
                format!(
                    "{ENGINE}: {}: {read} records in the files, {} in collection.json",
                    c.key(),
                    cf.records
                ),
            ));
        }
        // What the server holds now, not what we sent: duplicates or rejected records
        // show up as a count mismatch against the manifest.
        let n = api.count(&db, &id).await?;
        counts.insert(c.key(), n);
    }
    let total: u64 = counts.values().sum();
    info!(
        engine = ENGINE,
        collections = counts.len(),
        records = total,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "chroma import finished"
    );
    Ok(counts)
}
