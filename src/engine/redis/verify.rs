//! Offline deep verify: every record of the stored RDB decoded.

use std::io::{self, Read};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

use super::*;

/// Passes reads through until the job is cancelled.
pub(super) struct Cancellable<'a, R> {
    inner: R,
    cancel: &'a CancellationToken,
}

impl<'a, R> Cancellable<'a, R> {
    pub(super) fn new(inner: R, cancel: &'a CancellationToken) -> Self {
        Cancellable { inner, cancel }
    }
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(cancelled());
        }
        self.inner.read(buf)
    }
}

pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    if super::aof::is_aof(entry) {
        return super::aof::verify_aof(set, entry, cancel);
    }
    if entry.details.get(DEEP_VERIFIABLE) == Some(&serde_json::Value::Bool(false)) {
        // A format newer than this build decodes: every byte is still read and its checksum
        // checked; the counts are the server's own (INFO keyspace), taken at backup time.
        for file in &entry.files {
            let mut reader = set.open_file(file)?;
            io::copy(
                &mut Cancellable {
                    inner: &mut reader,
                    cancel,
                },
                &mut io::sink(),
            )
            .map_err(|e| {
                if cancel.is_cancelled() {
                    Error::Interrupted(0)
                } else {
                    reader.error(e)
                }
            })?;
            reader.finish()?;
        }
        warn!(
            engine = ENGINE,
            set = set.id(),
            rdb_version = entry.details.get("rdb_version").and_then(|v| v.as_u64()),
            "redis: not deep-verifiable by this build (RDB newer than version {}); checksums verified",
            rdb::MAX_VERSION
        );
        return Ok(entry.counts.clone());
    }
    let mut counts = Counts::new();
    for file in &entry.files {
        let mut reader = set.open_file(file)?;
        let opts = rdb::ParseOptions {
            decode_values: true,
            capture_payload: false,
        };
        let parsed = rdb::read(
            Cancellable {
                inner: &mut reader,
                cancel,
            },
            &opts,
            &mut CountOnly(cancel),
            false,
        );
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let summary = parsed.map_err(|e| e.into_set_error(set.id()))?;
        reader.finish()?;
        for (db, n) in summary.keys_per_db {
            *counts.entry(rdb::db_key(db)).or_default() += n;
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cancelled job's reads fail with an error the RDB reader does not retry (it retries
    /// EINTR): a deep verify stopped by a signal ends instead of spinning.
    #[test]
    fn a_cancelled_read_ends_the_parse() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rdb = b"REDIS0011\xfe\x00\x00\x01k\x01v";
            let opts = rdb::ParseOptions {
                decode_values: true,
                capture_payload: false,
            };
            let input = Cancellable {
                inner: &rdb[..],
                cancel: &cancel,
            };
            let r = rdb::read(input, &opts, &mut rdb::CountOnly, false);
            let _ = tx.send(r.is_err());
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "the parse of a cancelled read did not end with an error"
        );
    }
}
