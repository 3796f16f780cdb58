//! The dump: every selected collection's raw BSON batches straight into its zstd stream, and
//! its metadata file, in mongodump's layout; collections in parallel, largest first.

use std::io::{BufWriter, Write};
use std::sync::Arc;

use chrono::Utc;
use futures_util::{StreamExt, TryStreamExt, stream};
use mongodb::Client;
use mongodb::bson::{Document, RawBsonRef, RawDocumentBuf, doc};
use mongodb::raw_batch_cursor::RawBatch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::metadata::{Kind, Metadata};
use super::names::{escape, is_dumped_collection};
use super::pitr::{self, OpTime};
use super::{CONSISTENCY, CollectionEntry, Details, ENGINE, MongoEngine, OplogSlice, Progress};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::{EngineEntry, FileEntry};
use crate::repo::writer::EngineWriter;

/// Cursor batches aim at this many bytes (from the collection's average document size), so a
/// dump's memory stays near a few batches whatever the collection holds; the server caps a
/// batch at 16 MiB anyway.
const BATCH_BYTES: u64 = 8 * 1024 * 1024;

/// Collections at least this large (estimated) are compressed on zstd worker threads.
const MT_MIN_BYTES: u64 = 32 << 20;
/// The longest a dump waits for the server's next batch. The driver has no socket timeout, so
/// a stalled link (packets dropped, socket open) would otherwise hang the backup forever;
/// a batch takes milliseconds to seconds, so a silence this long means the link is dead.
/// The same limit as the Redis snapshot's.
pub(crate) const READ_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// zstd worker threads for a collection of about `bytes`: two for a large one, so compression
/// keeps up with the cursor (one thread of zstd does less than what the server sends);
/// none for a small one, which is compressed on its writer thread without multithreaded
/// mode's per-job buffers.
pub fn zstd_workers(bytes: u64) -> u32 {
    if bytes >= MT_MIN_BYTES { 2 } else { 0 }
}

/// The batch size of a collection that was not sampled: 8 MiB of 1 KiB documents, less for the
/// small documents most collections hold; the server caps a batch at 16 MiB whatever they are.
const UNSAMPLED_BATCH_DOCS: u32 = 8192;

/// One collection to dump.
struct Item {
    db: String,
    name: String,
    meta: Metadata,
    /// The collection the documents are read from (a timeseries collection's buckets).
    source: String,
    /// Estimated data size, to start the largest first.
    size: u64,
    /// Sizes the cursor's batches; 0 for the server's default.
    avg_obj_size: u64,
    zstd_workers: u32,
}

pub(super) async fn dump(
    engine: &MongoEngine,
    client: Client,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let build = client
        .database("admin")
        .run_command(doc! {"buildInfo": 1})
        .await
        .map_err(engine.op_err("buildInfo"))?;
    let server_version = build.get_str("version").unwrap_or("unknown").to_owned();
    // On a replica-set member the oplog makes the set consistent to one point: its position
    // now, before any collection is read, and at the end everything written in between.
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .map_err(engine.op_err("hello"))?;
    let oplog_start = if hello.get_str("setName").is_ok() {
        Some(
            pitr::oplog_edge(&client, true)
                .await
                .map_err(engine.op_err("reading the oplog"))?
                .unwrap_or(pitr::OpTime::ZERO),
        )
    } else {
        None
    };

    let mut items = Vec::new();
    for db in engine.user_databases(&client).await? {
        let database = client.database(&db);
        for entry in engine.list_collections(&database).await? {
            let Ok(name) = entry.get_str("name") else {
                continue;
            };
            if !is_dumped_collection(name) || !engine.cfg.filter.wants(&db, name) {
                continue;
            }
            let name = name.to_owned();
            let kind = entry
                .get_str("type")
                .ok()
                .and_then(Kind::parse)
                .unwrap_or(Kind::Collection);
            let indexes = if kind == Kind::View {
                Vec::new()
            } else {
                database
                    .run_cursor_command(doc! {"listIndexes": &name})
                    .await
                    .map_err(engine.op_err(&format!("listIndexes on {db}.{name}")))?
                    .try_collect::<Vec<Document>>()
                    .await
                    .map_err(engine.op_err(&format!("listIndexes on {db}.{name}")))?
            };
            let meta = Metadata::from_listing(&entry, indexes)
                .map_err(|e| Error::engine(ENGINE, format!("{db}: {e}")))?;
            let source = if kind == Kind::Timeseries {
                format!("system.buckets.{name}")
            } else {
                name.clone()
            };
            items.push(Item {
                db: db.clone(),
                name,
                meta,
                source,
                size: 0,
                avg_obj_size: 0,
                zstd_workers: 0,
            });
        }
    }
    // With several collections, sizes order them largest first (so the longest one does not
    // start last), size their cursor batches and decide how each is compressed. A lone
    // collection needs none of that: it gets batches of a fixed number of documents (which
    // the server caps at 16 MiB) and two zstd workers, without a sample query and a count
    // first.
    if items.iter().filter(|it| it.meta.kind != Kind::View).count() > 1 {
        // Futures collected before they become a stream: a stream over a borrowing closure is
        // not provably `Send` for every lifetime, which a spawned caller (the sidecar) needs.
        let futs: Vec<_> = items
            .iter()
            .map(|it| {
                let client = client.clone();
                async move {
                    if it.meta.kind == Kind::View {
                        return (0, 0);
                    }
                    let avg = sample_avg(&client, &it.db, &it.source).await;
                    (
                        avg,
                        estimated_count(&client, &it.db, &it.source).await * avg.max(1),
                    )
                }
            })
            .collect();
        let sizes: Vec<(u64, u64)> = stream::iter(futs)
            .buffered(engine.cfg.parallel)
            .collect()
            .await;
        for (it, (avg, size)) in items.iter_mut().zip(sizes) {
            it.avg_obj_size = avg;
            it.size = size;
            it.zstd_workers = zstd_workers(size);
        }
        items.sort_by_key(|it| std::cmp::Reverse(it.size));
    } else {
        for it in &mut items {
            it.zstd_workers = zstd_workers(u64::MAX);
        }
    }
    info!(
        engine = ENGINE,
        collections = items.len(),
        parallel = engine.cfg.parallel,
        "dump started"
    );

    let mut files = Vec::new();
    let mut details = Details {
        consistency: CONSISTENCY.to_owned(),
        collections: Vec::new(),
        oplog: None,
        authz: None,
    };
    // Metadata first: small, and it lets a restore create collections before any data.
    for it in &items {
        let base = format!("{}/{}", it.db, file_stem(it));
        let mut w = out.create(&format!("{base}.metadata.json"), 0)?;
        w.write_all(&it.meta.to_json())
            .map_err(|e| Error::io(out.dir().join(&base), e))?;
        let f = w.finish()?;
        details.collections.push(CollectionEntry {
            db: it.db.clone(),
            name: it.name.clone(),
            kind: it.meta.kind.name().to_owned(),
            metadata: f.path.clone(),
            data: None,
        });
        files.push(f);
    }

    let progress = Progress::new("dump");
    let stop = cancel.child_token();
    progress.spawn_ticker(stop.clone());
    let futs: Vec<_> = items
        .iter()
        .enumerate()
        .filter(|(_, it)| it.meta.kind != Kind::View)
        .map(|(i, it)| {
            let client = client.clone();
            let out = out.clone();
            let progress = Arc::clone(&progress);
            async move {
                dump_collection(engine, &client, &out, it, &progress, cancel)
                    .await
                    .map(|(f, n)| (i, f, n))
            }
        })
        .collect();
    let results: Vec<(usize, FileEntry, u64)> = stream::iter(futs)
        .buffer_unordered(engine.cfg.parallel)
        .try_collect()
        .await
        .inspect_err(|_| stop.cancel())?;
    stop.cancel();

    details.authz = Some(dump_authz(engine, &client, &out, &mut files).await?);
    if let Some(start) = oplog_start {
        let (f, slice) = dump_oplog(engine, &client, &out, start).await?;
        info!(
            engine = ENGINE,
            entries = slice.entries,
            start = %slice.start,
            end = %slice.end,
            "oplog recorded: the set is consistent to its end"
        );
        details.consistency = format!(
            "{POINT_IN_TIME} {} ({})",
            slice.end.time().to_rfc3339(),
            slice.end
        );
        details.oplog = Some(slice);
        files.push(f);
    }

    let mut counts = Counts::new();
    for (i, f, n) in results {
        let it = &items[i];
        counts.insert(format!("{}.{}", it.db, it.name), n);
        details.collections[i].data = Some(f.path.clone());
        files.push(f);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    details
        .collections
        .sort_by(|a, b| (&a.db, &a.name).cmp(&(&b.db, &b.name)));
    progress.finished();
    Ok(EngineEntry {
        source: engine.cfg.display.clone(),
        server_version,
        started_at,
        finished_at: Utc::now(),
        files,
        counts,
        details: serde_json::to_value(&details).expect("details serialize"),
    })
}

/// The escaped file stem: mongodump names a timeseries collection's data after its buckets.
fn file_stem(it: &Item) -> String {
    escape(&it.name)
}

fn data_stem(it: &Item) -> String {
    escape(&it.source)
}

/// Documents sampled to size cursor batches. `collStats` would say the average, but some
/// servers compute it by a scan; a few documents are enough to choose a batch size. (A
/// server's batch size cannot change after the first batch, so the cursor itself cannot be
/// the sample.)
const SAMPLE: i64 = 16;

/// Average size of the first few documents in natural order; 0 for an empty collection.
async fn sample_avg(client: &Client, db: &str, coll: &str) -> u64 {
    let c = client.database(db).collection::<RawDocumentBuf>(coll);
    let docs: Vec<RawDocumentBuf> = match c.find(doc! {}).limit(SAMPLE).await {
        Ok(cursor) => cursor.try_collect().await.unwrap_or_default(),
        Err(e) => {
            debug!(engine = ENGINE, db, coll, error = %e, "cannot sample documents");
            Vec::new()
        }
    };
    let bytes: usize = docs.iter().map(|d| d.as_bytes().len()).sum();
    (bytes / docs.len().max(1)) as u64
}

/// The `count` command's metadata estimate; 0 when the server will not say.
async fn estimated_count(client: &Client, db: &str, coll: &str) -> u64 {
    let c = client.database(db).collection::<RawDocumentBuf>(coll);
    c.estimated_document_count().await.unwrap_or(0)
}

/// Streams one collection: the async side pulls raw batches from the cursor, a blocking
/// thread writes each document's bytes as they came off the wire into the zstd stream.
/// At most one batch waits between them.
async fn dump_collection(
    engine: &MongoEngine,
    client: &Client,
    out: &EngineWriter,
    it: &Item,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(FileEntry, u64)> {
    let ns = format!("{}.{}", it.db, it.source);
    let coll = client
        .database(&it.db)
        .collection::<RawDocumentBuf>(&it.source);
    let mut find = coll.find(doc! {});
    let batch = match BATCH_BYTES.checked_div(it.avg_obj_size) {
        Some(n) => n.clamp(101, 100_000) as u32,
        None => UNSAMPLED_BATCH_DOCS,
    };
    find = find.batch_size(batch);
    let mut cursor = find
        .batch()
        .await
        .map_err(engine.op_err(&format!("find on {ns}")))?;
    let rel = format!("{}/{}.bson", it.db, data_stem(it));
    // Compressed on the writer thread itself, beside the network reads, unless the
    // collection is large enough to need more than one thread of zstd to keep up.
    let artifact = out.create(&rel, it.zstd_workers)?;
    let path = out.dir().join(&rel);
    // Two batches alive at most: one being compressed, the next arriving.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2));
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(RawBatch, tokio::sync::OwnedSemaphorePermit)>(1);
    let progress2 = Arc::clone(progress);
    let writer = tokio::task::spawn_blocking(move || -> Result<(FileEntry, u64)> {
        // Documents are often small: coalesce them before they reach the compressor.
        let mut w = BufWriter::with_capacity(1 << 20, artifact);
        let mut n = 0u64;
        while let Some((batch, _permit)) = rx.blocking_recv() {
            let docs = batch
                .doc_slices()
                .map_err(|e| Error::engine(ENGINE, format!("{ns}: bad batch: {e}")))?;
            let (mut bn, mut bytes) = (0u64, 0u64);
            for d in docs {
                let d = d.map_err(|e| Error::engine(ENGINE, format!("{ns}: bad batch: {e}")))?;
                let RawBsonRef::Document(doc) = d else {
                    return Err(Error::engine(
                        ENGINE,
                        format!("{ns}: the server sent a non-document in a batch"),
                    ));
                };
                w.write_all(doc.as_bytes())
                    .map_err(|e| Error::io(&path, e))?;
                bn += 1;
                bytes += doc.as_bytes().len() as u64;
            }
            n += bn;
            progress2.add(bn, bytes);
        }
        let artifact = w
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        Ok((artifact.finish()?, n))
    });
    let mut failed = None;
    loop {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let next = tokio::time::timeout(READ_IDLE_LIMIT, cursor.next()).await;
        let Ok(next) = next else {
            failed = Some(engine.idle_error(&format!("reading {}.{}", it.db, it.source)));
            break;
        };
        let Some(batch) = next else {
            break;
        };
        if cancel.is_cancelled() {
            failed = Some(Error::Interrupted(0));
            break;
        }
        match batch {
            Ok(b) => {
                if tx.send((b, permit)).await.is_err() {
                    // The writer stopped: its own error says why.
                    break;
                }
            }
            Err(e) => {
                failed = Some(engine.op_err(&format!("reading {}.{}", it.db, it.source))(
                    e,
                ));
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::engine(ENGINE, format!("writer task failed: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let (f, n) = written?;
    debug!(engine = ENGINE, db = %it.db, collection = %it.name, docs = n, raw_bytes = f.raw_size, "collection dumped");
    Ok((f, n))
}

/// What a set with an oplog slice promises.
const POINT_IN_TIME: &str = "point-in-time: the collections, then the oplog recorded while they were read, replayed on restore; the data as it was at";

/// The set's `oplog.bson`: every entry after `start` up to the newest now, from the member the
/// collections were read from. Fails when the oplog no longer holds `start` (it rolled over
/// during the dump): the set would not be consistent.
async fn dump_oplog(
    engine: &MongoEngine,
    client: &Client,
    out: &EngineWriter,
    start: OpTime,
) -> Result<(FileEntry, OplogSlice)> {
    let end = pitr::oplog_edge(client, true)
        .await
        .map_err(engine.op_err("reading the oplog"))?
        .unwrap_or(start);
    let oldest = pitr::oplog_edge(client, false)
        .await
        .map_err(engine.op_err("reading the oplog"))?;
    if start != OpTime::ZERO && oldest.is_some_and(|o| o > start) {
        return Err(Error::engine(
            ENGINE,
            format!(
                "the oplog rolled over during the dump (it starts at {}, the dump began at {start}); the set would not be consistent: enlarge the oplog (replSetResizeOplog) or dump at a quieter time",
                oldest.unwrap_or(start)
            ),
        ));
    }
    let artifact = out.create(OPLOG_FILE, 0)?;
    let path = out.dir().join(OPLOG_FILE);
    // Entries go to a blocking thread in batches: the writer may block (a bucket upload).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    let writer = tokio::task::spawn_blocking(move || -> Result<FileEntry> {
        let mut w = BufWriter::with_capacity(1 << 20, artifact);
        while let Some(chunk) = rx.blocking_recv() {
            w.write_all(&chunk).map_err(|e| Error::io(&path, e))?;
        }
        w.into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?
            .finish()
    });
    let filter = engine.cfg.filter.clone();
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut kept = 0u64;
    let mut cursor = pitr::range(client, start, end)
        .await
        .map_err(engine.op_err("reading the oplog"))?;
    let mut failed = None;
    loop {
        let Ok(next) = tokio::time::timeout(READ_IDLE_LIMIT, cursor.try_next()).await else {
            failed = Some(engine.idle_error("reading the oplog"));
            break;
        };
        match next {
            Ok(Some(d)) => {
                if keep_entry(&filter, &d) {
                    chunk.extend_from_slice(d.as_bytes());
                    kept += 1;
                }
                if chunk.len() >= 1 << 20 {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(1 << 20));
                    if tx.send(full).await.is_err() {
                        break;
                    }
                }
            }
            Ok(None) => {
                let _ = tx.send(chunk).await;
                break;
            }
            Err(e) => {
                failed = Some(engine.op_err("reading the oplog")(e));
                break;
            }
        }
    }
    drop(tx);
    let f = writer
        .await
        .map_err(|e| Error::engine(ENGINE, format!("oplog writer task failed: {e}")))?;
    if let Some(e) = failed {
        return Err(e);
    }
    let f = f?;
    let slice = OplogSlice {
        start,
        end,
        entries: kept,
        file: f.path.clone(),
    };
    Ok((f, slice))
}

/// The file of a set's oplog slice, beside the databases' directories.
pub(super) const OPLOG_FILE: &str = "oplog.bson";

/// Whether an oplog entry is kept: entries of databases the filter leaves out are not (their
/// data must not reach the set through the oplog); commands on `admin` (transactions) and
/// no-ops are, the replay filters what they hold.
pub(super) fn keep_entry(filter: &super::Filter, entry: &mongodb::bson::RawDocument) -> bool {
    let ns = entry.get_str("ns").unwrap_or("");
    let db = ns.split_once('.').map(|(d, _)| d).unwrap_or(ns);
    ns.is_empty() || ns == "admin.$cmd" || filter.wants_db(db)
}

/// Users (with their SCRAM credentials) and custom roles, in mongodump's files
/// `admin/system.users.bson` and `admin/system.roles.bson`; none written when there are none.
async fn dump_authz(
    engine: &MongoEngine,
    client: &Client,
    out: &EngineWriter,
    files: &mut Vec<FileEntry>,
) -> Result<super::AuthzEntry> {
    let a = super::users::read_authz(engine, client).await?;
    let mut entry = super::AuthzEntry {
        users: a.users.len() as u64,
        roles: a.roles.len() as u64,
        users_file: None,
        roles_file: None,
    };
    for (docs, rel, slot) in [
        (&a.users, "admin/system.users.bson", &mut entry.users_file),
        (&a.roles, "admin/system.roles.bson", &mut entry.roles_file),
    ] {
        if docs.is_empty() {
            continue;
        }
        let mut w = out.create(rel, 0)?;
        for d in docs {
            w.write_all(d.as_bytes())
                .map_err(|e| Error::io(out.dir().join(rel), e))?;
        }
        let f = w.finish()?;
        *slot = Some(f.path.clone());
        files.push(f);
    }
    if entry.users + entry.roles > 0 {
        info!(
            engine = ENGINE,
            users = entry.users,
            roles = entry.roles,
            "users and roles recorded"
        );
    }
    Ok(entry)
}
