//! Export: every collection of the selected database(s), paged with the server's
//! `max_batch_size` (smaller for wide vectors). A few pages are fetched while a blocking thread
//! parses and compresses the previous one, so memory holds a few pages whatever the size of
//! the collection.

use std::time::Instant;

use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{Api, Collection};
use super::format::{
    COLLECTION_FILE, CollectionFile, CollectionRef, Details, EMBEDDINGS_FILE, FORMAT, RECORDS_FILE,
    dir_name, write_page,
};
use super::{Databases, ENGINE, MARKER};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::{EngineEntry, FileEntry};
use crate::repo::writer::EngineWriter;

/// zstd worker threads for the embeddings artifact: one, so compression of float32 (the bulk
/// of the bytes) overlaps with JSON parsing on the writer thread.
const EMBEDDING_ZSTD_THREADS: u32 = 1;
/// Page reads in flight per collection.
const PAGES_IN_FLIGHT: usize = 3;
/// Upper bound on one page's JSON (about 12 bytes per float): wide vectors get pages smaller
/// than `max_batch_size`, so memory stays near `PAGES_IN_FLIGHT + 2` × this.
const PAGE_BYTES: usize = 24 << 20;
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn dump(
    api: &Api,
    databases: &[String],
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let server_version = api.version().await;
    let pre = api.preflight().await?;
    let batch = pre.max_batch_size;
    let mut files = Vec::new();
    let mut counts = Counts::new();
    let mut refs = Vec::new();
    let start = Instant::now();
    for db in databases {
        let collections = api.list_collections(db).await?;
        for c in collections.into_iter().filter(|c| c.name != MARKER) {
            let dir = dir_name(db, &c.name, refs.len());
            let (r, f) = dump_collection(api, db, c, dir, batch, &out, cancel).await?;
            counts.insert(r.key(), r.records);
            files.extend(f);
            refs.push(r);
        }
    }
    let total: u64 = counts.values().sum();
    info!(
        engine = ENGINE,
        collections = refs.len(),
        records = total,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "chroma export finished"
    );
    let details = Details {
        format: FORMAT,
        tenant: api.cfg.tenant.clone(),
        databases: match &api.cfg.databases {
            Databases::One(d) => d.clone(),
            Databases::All => "*".into(),
        },
        max_batch_size: batch,
        collections: refs,
    };
    Ok(EngineEntry {
        source: api.display().to_owned(),
        server_version,
        started_at,
        finished_at: Utc::now(),
        files,
        counts,
        details: serde_json::to_value(details).expect("details serialize"),
    })
}

/// What the writer thread hands back: records written, dimension, the two artifacts.
type Written = (u64, u64, FileEntry, FileEntry);

async fn dump_collection(
    api: &Api,
    db: &str,
    c: Collection,
    dir: String,
    batch: usize,
    out: &EngineWriter,
    cancel: &CancellationToken,
) -> Result<(CollectionRef, Vec<FileEntry>)> {
    let expected = api.count(db, &c.id).await?;
    let per_record = c.dimension.unwrap_or(0) as usize * 12 + 256;
    let batch = batch.min((PAGE_BYTES / per_record).max(1));
    info!(engine = ENGINE, database = db, collection = %c.name, records = expected, "exporting collection");
    let mut records = out.create(&format!("{dir}/{RECORDS_FILE}"), 0)?;
    let mut vectors = out.create(&format!("{dir}/{EMBEDDINGS_FILE}"), EMBEDDING_ZSTD_THREADS)?;

    // Pages go to the writer through a channel of one: one page being parsed, one waiting,
    // one being fetched.
    let (page_tx, mut page_rx) = mpsc::channel::<bytes::Bytes>(1);
    let (len_tx, mut len_rx) = mpsc::unbounded_channel::<usize>();
    let key = format!("{db}/{}", c.name);
    let writer = tokio::task::spawn_blocking(move || -> Result<Written> {
        let mut dim = None;
        let mut floats = Vec::new();
        let mut n = 0u64;
        while let Some(body) = page_rx.blocking_recv() {
            let got = write_page(&body, &mut dim, &mut records, &mut vectors, &mut floats)
                .map_err(|e| Error::engine(ENGINE, format!("{key}: {e}")))?;
            n += got as u64;
            if len_tx.send(got).is_err() {
                break;
            }
        }
        let fr = records.finish()?;
        let fv = vectors.finish()?;
        Ok((n, dim.unwrap_or(0) as u64, fr, fv))
    });

    let fetched = fetch_pages(api, db, &c, batch, expected, &page_tx, &mut len_rx, cancel).await;
    drop(page_tx);
    let written = writer
        .await
        .map_err(|e| Error::engine(ENGINE, format!("export writer failed: {e}")));
    // A fetch error explains a writer that stopped early better than the writer's own error.
    fetched?;
    let (n, dim, fr, fv) = written??;
    if n != expected {
        warn!(engine = ENGINE, collection = %c.name, counted = expected, exported = n, "the collection changed during the export");
    }
    let cf = CollectionFile {
        format: FORMAT,
        database: db.to_owned(),
        name: c.name.clone(),
        source_id: c.id.clone(),
        metadata: c.metadata,
        configuration: c.configuration_json,
        schema: c.schema,
        dimension: dim,
        records: n,
    };
    let mut w = out.create(&format!("{dir}/{COLLECTION_FILE}"), 0)?;
    serde_json::to_writer_pretty(&mut w, &cf)
        .map_err(|e| Error::engine(ENGINE, format!("{dir}/{COLLECTION_FILE}: {e}")))?;
    let fc = w.finish()?;
    Ok((
        CollectionRef {
            database: db.to_owned(),
            name: c.name,
            dir,
            records: n,
            dimension: dim,
        },
        vec![fc, fr, fv],
    ))
}

/// Fetches the pages of a collection, [`PAGES_IN_FLIGHT`] at a time (Chroma serves reads in
/// parallel, and offset pages are independent), and hands them to the writer in order. The
/// pages below the count taken at the start are requested ahead; after them, if the last
/// page was full (the collection grew), pages are read one by one until a short one.
#[allow(clippy::too_many_arguments)]
async fn fetch_pages(
    api: &Api,
    db: &str,
    c: &Collection,
    batch: usize,
    expected: u64,
    page_tx: &mpsc::Sender<bytes::Bytes>,
    len_rx: &mut mpsc::UnboundedReceiver<usize>,
    cancel: &CancellationToken,
) -> Result<()> {
    let start = Instant::now();
    let mut last_log = Instant::now();
    let mut next_offset = 0u64;
    let mut inflight = FuturesOrdered::new();
    let (mut sent, mut acked, mut done) = (0usize, 0usize, 0u64);
    let mut more = true;
    loop {
        while inflight.len() < PAGES_IN_FLIGHT
            && (next_offset < expected || (more && inflight.is_empty()))
        {
            inflight.push_back(api.get_page(db, &c.id, next_offset, batch));
            next_offset += batch as u64;
            more = false;
        }
        let Some(body) = inflight.next().await else {
            return Ok(());
        };
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        if page_tx.send(body?).await.is_err() {
            // The writer stopped; the caller reports its error.
            return Ok(());
        }
        sent += 1;
        while let Ok(len) = len_rx.try_recv() {
            acked += 1;
            done += len as u64;
        }
        if inflight.is_empty() && next_offset >= expected {
            // Everything asked for is sent: learn whether the last page was full.
            let mut last = batch;
            while acked < sent {
                let Some(len) = len_rx.recv().await else {
                    return Ok(());
                };
                acked += 1;
                done += len as u64;
                last = len;
            }
            if last < batch {
                return Ok(());
            }
            more = true;
        }
        if last_log.elapsed() >= PROGRESS_EVERY {
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            info!(
                engine = ENGINE,
                collection = %c.name,
                records = done,
                of = expected,
                records_per_s = (done as f64 / secs) as u64,
                "export progress"
            );
            last_log = Instant::now();
        }
    }
}
