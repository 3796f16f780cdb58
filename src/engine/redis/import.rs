//! `import` of a Redis `dump.rdb` taken by another tool (`redis-cli --rdb`, a copy of the
//! server's file): decoded in full first (every value, the checksum), then stored as a
//! snapshot is, so a restore or preseed cannot tell it from a set dbkeeper took.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::snapshot::{SNAPSHOT_BLOCK, SNAPSHOT_FRAME};
use super::{DUMP_REL, ENGINE, SNAPSHOT_ZSTD_LEVEL, rdb};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::writer::EngineWriter;

/// Whether `head` (a file's first bytes) starts an RDB.
pub fn is_rdb(head: &[u8]) -> bool {
    head.starts_with(b"REDIS")
}

/// Imports `src`, an RDB file. A file that does not decode is refused with one line naming
/// it and the byte offset, before anything is written.
pub fn import_rdb(
    src: &Path,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let open = || File::open(src).map_err(|e| Error::io(src, e));
    let len = open()?.metadata().map_err(|e| Error::io(src, e))?.len();
    let opts = rdb::ParseOptions {
        decode_values: true,
        capture_payload: false,
    };
    let summary = match rdb::classify_header(&head(src)?) {
        rdb::HeaderClass::NotRdb => {
            return Err(refused(src, "byte 0: not an RDB file (no REDIS header)"));
        }
        rdb::HeaderClass::Newer(v) => {
            return Err(refused(
                src,
                &format!(
                    "byte 5: RDB version {v} is newer than this build reads (up to {})",
                    rdb::MAX_VERSION
                ),
            ));
        }
        rdb::HeaderClass::Readable(_) => rdb::read(
            Cancelled {
                inner: BufReader::new(open()?),
                cancel,
            },
            &opts,
            &mut rdb::CountOnly,
            false,
        )
        .map_err(|e| {
            if cancel.is_cancelled() {
                return Error::Interrupted(0);
            }
            match e {
                // The trailer is the file's last 8 bytes.
                rdb::RdbError::Checksum { .. } => {
                    refused(src, &format!("byte {}: {e}", len.saturating_sub(8)))
                }
                e => refused(src, &e.to_string()),
            }
        })?,
    };
    // Stored exactly as the server's snapshot is stored.
    let mut artifact = out.create_framed(
        DUMP_REL,
        SNAPSHOT_ZSTD_LEVEL,
        SNAPSHOT_FRAME,
        SNAPSHOT_BLOCK,
    )?;
    let mut input = open()?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let n = input.read(&mut buf).map_err(|e| Error::io(src, e))?;
        if n == 0 {
            break;
        }
        artifact
            .write(&buf[..n])
            .map_err(|e| Error::io(out.dir().join(DUMP_REL), e))?;
    }
    let file = artifact.finish()?;
    if file.raw_size != len {
        return Err(refused(src, "the file changed while it was read"));
    }
    let counts: Counts = summary
        .keys_per_db
        .iter()
        .map(|(db, n)| (rdb::db_key(*db), *n))
        .collect();
    Ok(EngineEntry {
        source: src.display().to_string(),
        server_version: summary
            .redis_ver
            .clone()
            .unwrap_or_else(|| "unknown".into()),
        started_at,
        finished_at: Utc::now(),
        files: vec![file],
        counts,
        details: serde_json::json!({
            "rdb_version": summary.version,
            "imported_from": "rdb",
        }),
    })
}

/// The file's modification time (the default time of an imported set).
pub fn file_time(p: &Path) -> Result<DateTime<Utc>> {
    let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    Ok(m.modified().map_err(|e| Error::io(p, e))?.into())
}

fn head(src: &Path) -> Result<Vec<u8>> {
    let mut h = Vec::with_capacity(9);
    File::open(src)
        .and_then(|f| f.take(9).read_to_end(&mut h))
        .map_err(|e| Error::io(src, e))?;
    Ok(h)
}

fn refused(src: &Path, why: &str) -> Error {
    Error::engine(
        ENGINE,
        format!("{}: {why}; nothing imported", src.display()),
    )
}

struct Cancelled<'a, R> {
    inner: R,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for Cancelled<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(std::io::Error::other("cancelled"));
        }
        self.inner.read(buf)
    }
}
