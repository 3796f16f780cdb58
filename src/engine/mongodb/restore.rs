//! The restore: collections created with their options, raw BSON inserted in unordered
//! batches by a few concurrent workers, indexes built after the data, views last.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{StreamExt, TryStreamExt, stream};
use mongodb::Client;
use mongodb::bson::{Bson, RawDocumentBuf, doc};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::bsonfile::DocReader;
use super::metadata::{Kind, Metadata};
use super::{CollectionEntry, ENGINE, MongoEngine, Progress, details_of};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Concurrent insert commands. The server's write path is the limit; a few writers keep it
/// busy while the next batch is decoded, more only queue.
pub(super) const INSERT_WORKERS: usize = 4;

/// Bytes per insert batch we assemble (the driver splits further at the server's
/// `maxMessageSizeBytes` / `maxWriteBatchSize`). Bounds memory to a few batches per worker.
const BATCH_BYTES: usize = 2 * 1024 * 1024;

/// Server error code for "namespace exists" (a collection made by an earlier partial run).
const NAMESPACE_EXISTS: i32 = 48;

struct Planned {
    entry: CollectionEntry,
    meta: Metadata,
}

struct Batch {
    slot: usize,
    docs: Vec<RawDocumentBuf>,
    bytes: u64,
    /// Set for a capped collection, whose natural order is its insertion order (and decides
    /// what it evicts): its batches go one at a time, in order, each inserted ordered.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

pub(super) async fn restore(
    engine: &MongoEngine,
    client: Client,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let details = details_of(set, entry)?;
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .map_err(engine.op_err("hello"))?;
    let max_batch = match hello.get("maxWriteBatchSize") {
        Some(Bson::Int32(n)) if *n > 0 => *n as usize,
        Some(Bson::Int64(n)) if *n > 0 => *n as usize,
        _ => 100_000,
    };
    let max_msg = match hello.get("maxMessageSizeBytes") {
        Some(Bson::Int32(n)) if *n > 0 => *n as usize,
        Some(Bson::Int64(n)) if *n > 0 => *n as usize,
        _ => 48_000_000,
    };
    // Leave room for the command document and the OP_MSG framing.
    let batch_bytes = BATCH_BYTES.min(max_msg.saturating_sub(64 * 1024)).max(1);

    // Metadata: read and parsed before anything is created, so a corrupt set changes nothing.
    let mut plan = Vec::new();
    for c in details.collections {
        if !engine.cfg.filter.wants(&c.db, &c.name) {
            continue;
        }
        let f = entry.file(&c.metadata).ok_or_else(|| {
            Error::corrupt(set.id(), format!("{} is not in the manifest", c.metadata))
        })?;
        let (set2, f2) = (set.clone(), f.clone());
        let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
            let mut r = set2.open_file(&f2)?;
            let mut b = Vec::new();
            r.read_to_end(&mut b).map_err(|e| r.error(e))?;
            r.finish()?;
            Ok(b)
        })
        .await
        .map_err(|e| Error::engine(ENGINE, format!("task failed: {e}")))??;
        let meta = Metadata::parse(&bytes)
            .map_err(|e| Error::corrupt(set.id(), format!("{}: {e}", c.metadata)))?;
        plan.push(Planned { entry: c, meta });
    }

    for p in plan.iter().filter(|p| p.meta.kind != Kind::View) {
        create(engine, &client, p).await?;
    }

    // Data, largest first.
    let mut data: Vec<(usize, &Planned)> = plan
        .iter()
        .filter(|p| p.entry.data.is_some())
        .enumerate()
        .collect();
    let size_of = |p: &Planned| {
        p.entry
            .data
            .as_deref()
            .and_then(|d| entry.file(d))
            .map(|f| f.raw_size)
            .unwrap_or(0)
    };
    data.sort_by_key(|(_, p)| std::cmp::Reverse(size_of(p)));
    let inserted: Arc<Vec<AtomicU64>> =
        Arc::new((0..data.len()).map(|_| AtomicU64::new(0)).collect());
    let targets: Arc<Vec<mongodb::Collection<RawDocumentBuf>>> = Arc::new({
        let mut v: Vec<_> = data.iter().map(|(slot, p)| (*slot, p)).collect::<Vec<_>>();
        v.sort_by_key(|(slot, _)| *slot);
        v.into_iter()
            .map(|(_, p)| {
                client
                    .database(&p.entry.db)
                    .collection::<RawDocumentBuf>(&data_collection(p))
            })
            .collect()
    });

    let progress = Progress::new("restore");
    let stop = cancel.child_token();
    progress.spawn_ticker(stop.clone());
    let (tx, rx) = mpsc::channel::<Batch>(INSERT_WORKERS);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..INSERT_WORKERS)
        .map(|_| {
            let rx = Arc::clone(&rx);
            let targets = Arc::clone(&targets);
            let inserted = Arc::clone(&inserted);
            let progress = Arc::clone(&progress);
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        b = async { rx.lock().await.recv().await } => b,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    let Some(b) = next else { return Ok(()) };
                    let coll = &targets[b.slot];
                    let n = b.docs.len() as u64;
                    let in_order = b.done.is_some();
                    let r = coll
                        .insert_many(b.docs)
                        .ordered(in_order)
                        .bypass_document_validation(true)
                        .await;
                    match r {
                        Ok(res) => {
                            let done = res.inserted_ids.len() as u64;
                            inserted[b.slot].fetch_add(done, Ordering::Relaxed);
                            progress.add(done, b.bytes);
                            if let Some(tx) = b.done {
                                let _ = tx.send(());
                            }
                            if done != n {
                                stop.cancel();
                                return Err(format!(
                                    "{}.{}: the server took {done} of {n} documents",
                                    coll.namespace().db,
                                    coll.namespace().coll
                                ));
                            }
                        }
                        Err(e) => {
                            stop.cancel();
                            return Err(format!(
                                "inserting into {}.{}: {}",
                                coll.namespace().db,
                                coll.namespace().coll,
                                super::driver_message(&e)
                            ));
                        }
                    }
                }
            })
        })
        .collect();

    let reader_stop = stop.clone();
    // Collected first: a stream over a borrowing closure is not provably `Send` for every
    // lifetime, which a spawned caller (the sidecar) needs.
    let reader_futs: Vec<_> = data
        .iter()
        .map(move |(slot, p)| {
            let tx = tx.clone();
            let set = set.clone();
            let f = p.entry.data.as_deref().and_then(|d| entry.file(d)).cloned();
            let stop = reader_stop.clone();
            let slot = *slot;
            let capped = p.meta.options.get_bool("capped").unwrap_or(false);
            async move {
                let f = f.ok_or_else(|| {
                    Error::corrupt(set.id(), "a data file is not in the manifest".to_owned())
                })?;
                tokio::task::spawn_blocking(move || -> Result<u64> {
                    let r = set.open_file(&f)?;
                    let mut docs = DocReader::new(r);
                    let mut batch = Vec::new();
                    let mut bytes = 0usize;
                    loop {
                        let doc = docs
                            .next_doc()
                            .map_err(|e| Error::corrupt(set.id(), format!("{}: {e}", f.path)))?;
                        let full = match &doc {
                            Some(d) => {
                                !batch.is_empty()
                                    && (batch.len() >= max_batch
                                        || bytes + d.as_bytes().len() > batch_bytes)
                            }
                            None => !batch.is_empty(),
                        };
                        if full {
                            let (done, inserted) = if capped {
                                let (t, r) = tokio::sync::oneshot::channel();
                                (Some(t), Some(r))
                            } else {
                                (None, None)
                            };
                            let b = Batch {
                                slot,
                                docs: std::mem::take(&mut batch),
                                bytes: bytes as u64,
                                done,
                            };
                            bytes = 0;
                            if stop.is_cancelled() || tx.blocking_send(b).is_err() {
                                return Err(Error::Interrupted(0));
                            }
                            // A failed insert drops the sender; the worker's error says why.
                            if let Some(r) = inserted
                                && r.blocking_recv().is_err()
                            {
                                return Err(Error::Interrupted(0));
                            }
                        }
                        match doc {
                            Some(d) => {
                                bytes += d.as_bytes().len();
                                batch.push(d);
                            }
                            None => break,
                        }
                    }
                    let n = docs.count();
                    docs.into_inner().finish()?;
                    Ok(n)
                })
                .await
                .map_err(|e| Error::engine(ENGINE, format!("reader task failed: {e}")))?
            }
        })
        .collect();
    let readers = stream::iter(reader_futs)
        .buffer_unordered(engine.cfg.parallel)
        .try_collect::<Vec<u64>>();

    let read = tokio::select! {
        r = readers => r,
        _ = cancel.cancelled() => Err(Error::Interrupted(0)),
    };
    if read.is_err() {
        stop.cancel();
    }
    let mut worker_err = None;
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => {
                worker_err.get_or_insert(msg);
            }
            Err(e) => {
                worker_err.get_or_insert(format!("insert task failed: {e}"));
            }
        }
    }
    stop.cancel();
    if let Some(msg) = worker_err {
        return Err(Error::engine(ENGINE, msg));
    }
    read?;
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    progress.finished();

    let mut counts = Counts::new();
    for (slot, p) in &data {
        counts.insert(p.entry.namespace(), inserted[*slot].load(Ordering::Relaxed));
    }
    for p in plan.iter().filter(|p| p.meta.kind != Kind::View) {
        build_indexes(engine, &client, p).await?;
    }
    for p in plan.iter().filter(|p| p.meta.kind == Kind::View) {
        create(engine, &client, p).await?;
    }
    info!(
        engine = ENGINE,
        collections = plan.len(),
        "indexes and views created"
    );
    Ok(counts)
}

/// A timeseries collection's documents are its buckets.
fn data_collection(p: &Planned) -> String {
    if p.meta.kind == Kind::Timeseries {
        format!("system.buckets.{}", p.entry.name)
    } else {
        p.entry.name.clone()
    }
}

/// `create` with the dumped options (capped, validator, collation, timeseries, clustered,
/// viewOn/pipeline, …). An existing collection is kept, as mongorestore does.
async fn create(engine: &MongoEngine, client: &Client, p: &Planned) -> Result<()> {
    let mut cmd = doc! {"create": &p.entry.name};
    for (k, v) in &p.meta.options {
        cmd.insert(k.clone(), v.clone());
    }
    // listCollections reports the bucket span a `granularity` implies; `create` takes either
    // a granularity or custom bucketing parameters, not both.
    if let Ok(ts) = cmd.get_document_mut("timeseries")
        && ts.contains_key("granularity")
    {
        ts.remove("bucketMaxSpanSeconds");
        ts.remove("bucketRoundingSeconds");
    }
    match client.database(&p.entry.db).run_command(cmd).await {
        Ok(_) => Ok(()),
        Err(e) if command_code(&e) == Some(NAMESPACE_EXISTS) => {
            debug!(engine = ENGINE, ns = %p.entry.namespace(), "collection exists; kept");
            Ok(())
        }
        Err(e) => Err(engine.op_err(&format!("creating {}", p.entry.namespace()))(
            e,
        )),
    }
}

async fn build_indexes(engine: &MongoEngine, client: &Client, p: &Planned) -> Result<()> {
    let specs = p.meta.secondary_indexes();
    if specs.is_empty() {
        return Ok(());
    }
    let n = specs.len();
    let cmd = doc! {
        "createIndexes": &p.entry.name,
        "indexes": specs.into_iter().map(Bson::Document).collect::<Vec<_>>(),
    };
    client
        .database(&p.entry.db)
        .run_command(cmd)
        .await
        .map_err(engine.op_err(&format!("creating indexes on {}", p.entry.namespace())))?;
    debug!(engine = ENGINE, ns = %p.entry.namespace(), indexes = n, "indexes built");
    Ok(())
}

fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}
