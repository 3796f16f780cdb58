//! Export: every collection of the selected database(s), paged with the server's
//! `max_batch_size`. The next page is fetched while a blocking thread parses and compresses
//! the previous one, so memory holds at most a few pages whatever the collection's size.

use std::time::Instant;

use chrono::Utc;
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

/// Fetches pages until one comes back short. Page k+1 is requested while page k is being
/// written; when page k turns out short, page k+1 (empty unless the collection grew) is
/// dropped.
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
    let mut offset = 0u64;
    let mut done = 0u64;
    let mut body = api.get_page(db, &c.id, offset, batch).await?;
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        if page_tx.send(body).await.is_err() {
            // The writer stopped; its error is reported by the caller.
            return Ok(());
        }
        offset += batch as u64;
        // Wait for the oldest page's length while the next page is on its way.
        let next = api.get_page(db, &c.id, offset, batch);
        let (next, len) = tokio::join!(next, len_rx.recv());
        let Some(len) = len else {
            return Ok(());
        };
        done += len as u64;
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
        if len < batch {
            return Ok(());
        }
        body = next?;
    }
}
