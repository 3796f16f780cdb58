//! The physical base backup over the replication protocol, as `pg_basebackup -X fetch
//! --manifest-checksums=CRC32C` takes it on PostgreSQL 15: IDENTIFY_SYSTEM, a temporary
//! physical slot (so the WAL from the backup's start cannot be recycled while it runs), then
//! `BASE_BACKUP` with the WAL and the server's backup manifest. Each archive the server sends
//! (`base.tar`, one per tablespace) is streamed through zstd into the set as it arrives; the
//! manifest is stored as `backup_manifest`. Nothing is staged on disk.

use std::io::Write;

use bytes::BytesMut;
use chrono::Utc;
use postgres_protocol::message::frontend;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::client::Conn;
use super::{CONNECT_TIMEOUT, ENGINE, PgConfig};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::writer::{ArtifactWriter, EngineWriter};

/// The stored name of the server's backup manifest (`postgres/backup_manifest.zst`).
pub(crate) const MANIFEST_REL: &str = "backup_manifest";
/// zstd worker threads per archive.
const ZSTD_THREADS: u32 = 2;

/// Counts the members of a tar stream as its bytes pass: headers are 512-byte blocks that
/// give the size of the data blocks after them. Written by hand: the `tar` crate reads from
/// a `Read`, and the stream here arrives in pushed chunks we do not want to buffer.
#[derive(Default)]
pub(crate) struct TarCounter {
    /// Bytes of data (with padding) still to skip before the next header.
    skip: u64,
    header: Vec<u8>,
    pub files: u64,
    done: bool,
}

impl TarCounter {
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            if self.skip > 0 {
                let n = (self.skip as usize).min(data.len());
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (512 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < 512 {
                continue;
            }
            let h = std::mem::take(&mut self.header);
            if h.iter().all(|&b| b == 0) {
                self.done = true;
                break;
            }
            let size = parse_octal(&h[124..136]);
            if h[156] == b'0' || h[156] == 0 {
                self.files += 1;
            }
            self.skip = size.div_ceil(512) * 512;
        }
    }
}

fn parse_octal(f: &[u8]) -> u64 {
    f.iter()
        .skip_while(|&&b| b == b' ' || b == 0)
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .fold(0u64, |a, &b| a * 8 + u64::from(b - b'0'))
}

fn bad(cfg: &PgConfig, what: impl Into<String>) -> Error {
    Error::engine(ENGINE, format!("{}: {}", cfg.display, what.into()))
}

fn col(rows: &[Vec<Option<String>>], row: usize, col: usize) -> Option<String> {
    rows.get(row)?.get(col)?.clone()
}

pub(crate) async fn dump(
    cfg: &PgConfig,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    // Database sizes, from an ordinary connection (a physical replication connection runs no SQL).
    let mut sql = Conn::connect(cfg, CONNECT_TIMEOUT, false).await?;
    let sizes = sql
        .query(
            "SELECT datname, pg_database_size(oid) FROM pg_database WHERE datallowconn ORDER BY 1",
        )
        .await?;
    sql.terminate().await;
    let mut databases = serde_json::Map::new();
    for r in &sizes {
        if let (Some(Some(name)), Some(Some(size))) = (r.first(), r.get(1)) {
            databases.insert(name.clone(), json!(size.parse::<u64>().unwrap_or(0)));
        }
    }

    let mut c = Conn::connect(cfg, CONNECT_TIMEOUT, true)
        .await
        .map_err(|e| match e {
            Error::Refused {
                engine,
                url,
                message,
            } => Error::Refused {
                engine,
                url,
                message: format!(
                    "replication connection refused: {message}; the role needs the REPLICATION attribute and pg_hba.conf a `host replication <role> ...` line"
                ),
            },
            other => other,
        })?;
    let server_version = c
        .params
        .get("server_version")
        .map(|v| v.split_whitespace().next().unwrap_or(v).to_owned())
        .unwrap_or_default();
    let ident = c.query("IDENTIFY_SYSTEM").await.map_err(|e| match e {
        Error::Refused { message, .. } => bad(cfg, format!(
            "IDENTIFY_SYSTEM refused: {message}; the role needs the REPLICATION attribute and pg_hba.conf a `host replication` line"
        )),
        other => other,
    })?;
    let system_id = col(&ident, 0, 0).ok_or_else(|| bad(cfg, "IDENTIFY_SYSTEM: no answer"))?;
    // Unique per backup: containers all run as pid 1, and two of them may back up one server.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let slot = format!("dbkeeper_{}_{nanos}", std::process::id());
    c.query(&format!(
        "CREATE_REPLICATION_SLOT {slot} TEMPORARY PHYSICAL RESERVE_WAL"
    ))
    .await?;

    let mut buf = BytesMut::new();
    frontend::query(
        "BASE_BACKUP (LABEL 'dbkeeper', CHECKPOINT 'fast', WAL true, WAIT true, \
         MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')",
        &mut buf,
    )
    .map_err(|e| bad(cfg, e.to_string()))?;
    c.send(&buf).await?;

    // Result sets: start position, tablespaces; then the copy stream; then the end position;
    // then one CommandComplete and ReadyForQuery.
    let mut results: Vec<Vec<Vec<Option<String>>>> = Vec::new();
    let mut files = Vec::new();
    let mut counts = Counts::new();
    let mut archive: Option<(String, ArtifactWriter, TarCounter)> = None;
    let mut manifest: Option<ArtifactWriter> = None;
    let mut in_manifest = false;
    let close = |a: Option<(String, ArtifactWriter, TarCounter)>,
                 files: &mut Vec<_>,
                 counts: &mut Counts|
     -> Result<()> {
        if let Some((name, w, t)) = a {
            files.push(w.finish()?);
            counts.insert(name, t.files);
        }
        Ok(())
    };
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let m = tokio::select! {
            m = c.read() => m?,
            _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
        };
        match m.tag {
            // The walsender ends each result set without a CommandComplete: a RowDescription
            // starts the next one.
            b'T' => results.push(Vec::new()),
            b'D' => match results.last_mut() {
                Some(r) => r.push(parse_text_row(&m.body)),
                None => return Err(bad(cfg, "a row before its description")),
            },
            b'E' => return Err(c.server_error(&m.body)),
            b'Z' => break,
            b'd' => {
                let (&kind, payload) = m
                    .body
                    .split_first()
                    .ok_or_else(|| bad(cfg, "empty CopyData"))?;
                match kind {
                    b'n' => {
                        close(archive.take(), &mut files, &mut counts)?;
                        let name = payload.split(|&b| b == 0).next().unwrap_or_default();
                        let name = String::from_utf8_lossy(name).into_owned();
                        if name.is_empty() || name.contains('/') || name.starts_with('.') {
                            return Err(bad(cfg, format!("archive name {name:?}")));
                        }
                        let w = out.create(&name, ZSTD_THREADS)?;
                        archive = Some((name, w, TarCounter::default()));
                    }
                    b'm' => {
                        close(archive.take(), &mut files, &mut counts)?;
                        manifest = Some(out.create(MANIFEST_REL, 0)?);
                        in_manifest = true;
                    }
                    b'd' => {
                        let path = out.dir();
                        if in_manifest {
                            if let Some(w) = manifest.as_mut() {
                                w.write_all(payload).map_err(|e| Error::io(&path, e))?;
                            }
                        } else if let Some((_, w, t)) = archive.as_mut() {
                            t.push(payload);
                            w.write_all(payload).map_err(|e| Error::io(&path, e))?;
                        } else {
                            return Err(bad(cfg, "archive data before any archive"));
                        }
                    }
                    b'p' => {}
                    other => {
                        return Err(bad(
                            cfg,
                            format!("unknown copy message {:?}", other as char),
                        ));
                    }
                }
            }
            b'c' => close(archive.take(), &mut files, &mut counts)?,
            _ => {}
        }
    }
    let Some(manifest) = manifest else {
        return Err(bad(cfg, "the server sent no backup manifest"));
    };
    files.push(manifest.finish()?);
    c.terminate().await;
    let start = results
        .first()
        .and_then(|r| r.first())
        .cloned()
        .unwrap_or_default();
    let end = results
        .last()
        .and_then(|r| r.first())
        .cloned()
        .unwrap_or_default();
    let start_lsn = start.first().cloned().flatten().unwrap_or_default();
    let end_lsn = end.first().cloned().flatten().unwrap_or_default();
    let timeline = end.get(1).cloned().flatten().unwrap_or_default();
    if start_lsn.is_empty() || end_lsn.is_empty() || counts.is_empty() {
        return Err(bad(
            cfg,
            "the base backup ended without its start and end positions",
        ));
    }
    let major = server_version
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    info!(engine = ENGINE, start_lsn = %start_lsn, end_lsn = %end_lsn, archives = counts.len(), "base backup finished");
    Ok(EngineEntry {
        source: cfg.display.clone(),
        server_version: server_version.clone(),
        started_at,
        finished_at: Utc::now(),
        files,
        counts,
        details: json!({
            "format": "basebackup-tar",
            "major": major,
            "system_identifier": system_id,
            "timeline": timeline,
            "start_lsn": start_lsn,
            "end_lsn": end_lsn,
            "database_bytes": databases,
            "counts_are": "files per archive",
        }),
    })
}

fn parse_text_row(body: &[u8]) -> Vec<Option<String>> {
    let mut row = Vec::new();
    let Some(n) = body.get(..2) else { return row };
    let n = u16::from_be_bytes([n[0], n[1]]) as usize;
    let mut at = 2;
    for _ in 0..n {
        let Some(l) = body.get(at..at + 4) else { break };
        let len = i32::from_be_bytes([l[0], l[1], l[2], l[3]]);
        at += 4;
        if len < 0 {
            row.push(None);
            continue;
        }
        let end = at + len as usize;
        row.push(
            body.get(at..end)
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        );
        at = end;
    }
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_counter_counts_regular_files_across_chunks() {
        let mut b = tar::Builder::new(Vec::new());
        for (name, len) in [("a", 0usize), ("dir/b", 700), ("c", 512)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(len as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, &vec![7u8; len][..]).unwrap();
        }
        let bytes = b.into_inner().unwrap();
        for chunk in [1usize, 100, 511, 4096] {
            let mut t = TarCounter::default();
            for c in bytes.chunks(chunk) {
                t.push(c);
            }
            assert_eq!(t.files, 3, "chunks of {chunk}");
        }
    }
}
