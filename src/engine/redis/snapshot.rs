//! Backup: the replication snapshot, streamed, parsed and stored.

use std::io::{self, BufRead, Read};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::writer::EngineWriter;

use super::*;

/// The error a read returns once the job is cancelled. Not `Interrupted`: readers retry that
/// kind (it means EINTR), and would spin.
pub(super) fn cancelled() -> io::Error {
    io::Error::other("cancelled")
}

/// Reads the socket, retrying on the poll timeout so cancellation is noticed within `POLL`.
pub(super) struct PolledSocket<'a, 'c> {
    conn: &'a mut Conn<'c>,
    cancel: &'a CancellationToken,
}

impl Read for PolledSocket<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return Err(cancelled());
            }
            match self.conn.reader.read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if since.elapsed() >= SYNC_IDLE_LIMIT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no data from the server for {}s", SYNC_IDLE_LIMIT.as_secs()),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

/// Bytes the kernel queues before it wakes the snapshot's reader (`SO_RCVLOWAT`): one of the
/// server's 16 KiB writes, so that the reader takes each as it comes (see
/// `snapshot_pipeline`) without waking for a part of one.
pub(super) const SNAPSHOT_LOWAT: i32 = 16 << 10;
/// The snapshot socket's read timeout: with a low-water mark, how long the last bytes (fewer
/// than the mark) can wait before a read hands them out.
pub(super) const SNAPSHOT_POLL: Duration = Duration::from_millis(20);

/// Sets `SO_RCVLOWAT`: a blocking read returns once `bytes` are queued, or at its timeout with
/// what there is. No maintained crate wraps this option (nix, rustix and socket2 do not), hence
/// the one libc call.
#[allow(unsafe_code)]
pub(super) fn set_recv_lowat(s: &TcpStream, bytes: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = bytes;
    // SAFETY: the descriptor is open for the call's duration, and the option value points to a
    // live c_int of the given length.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The snapshot's bytes, without the framing: either `$<len>` bytes, or (diskless sync)
/// everything up to the 40-byte end mark announced by `$EOF:<mark>`.
pub(super) struct Payload<R> {
    inner: R,
    framing: Framing,
    /// Diskless framing only: `buf[pos..ready]` is payload not yet handed out, `buf[ready..end]`
    /// the held-back tail that may be the start of the end mark (which a direct read moves to
    /// `buf[0..]`).
    buf: Box<[u8]>,
    pos: usize,
    ready: usize,
    end: usize,
    done: bool,
}

pub(super) enum Framing {
    Length(u64),
    Mark([u8; 40]),
}

/// Bytes the diskless framing reads at once into its own buffer, for reads too small to take
/// the socket's bytes directly.
pub(super) const PAYLOAD_READ: usize = 64 << 10;
/// Reads at least this large (beyond the held-back tail) are filled from the socket directly.
pub(super) const PAYLOAD_DIRECT_MIN: usize = 4096;

pub(super) fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "snapshot cut short before its end mark",
    )
}

impl<R: Read> Payload<R> {
    fn new(inner: R, framing: Framing) -> Self {
        let buf = match framing {
            Framing::Length(_) => Box::default(),
            Framing::Mark(_) => vec![0; PAYLOAD_READ].into_boxed_slice(),
        };
        Payload {
            inner,
            framing,
            buf,
            pos: 0,
            ready: 0,
            end: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for Payload<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 {
                    return Ok(0);
                }
                let want = out.len().min(*left as usize);
                let n = self.inner.read(&mut out[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("snapshot cut short: {left} bytes missing"),
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Mark(mark) => loop {
                if self.pos < self.ready {
                    let n = out.len().min(self.ready - self.pos);
                    out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
                if self.done {
                    return Ok(0);
                }
                let held = self.end - self.ready;
                if out.len() >= held + PAYLOAD_DIRECT_MIN {
                    // A large read goes straight into `out`, after the held-back tail: no
                    // second copy of the snapshot.
                    out[..held].copy_from_slice(&self.buf[self.ready..self.end]);
                    let n = self.inner.read(&mut out[held..])?;
                    if n == 0 {
                        return Err(cut_short());
                    }
                    let total = held + n;
                    if let Some(at) = memchr::memmem::find(&out[..total], &mark[..]) {
                        (self.pos, self.ready, self.end, self.done) = (0, 0, 0, true);
                        return Ok(at);
                    }
                    let keep = total.min(mark.len() - 1);
                    self.buf[..keep].copy_from_slice(&out[total - keep..total]);
                    (self.pos, self.ready, self.end) = (0, 0, keep);
                    if total > keep {
                        return Ok(total - keep);
                    }
                    continue;
                }
                // A small read: keep the held-back tail (under 40 bytes), read more after it.
                self.buf.copy_within(self.ready..self.end, 0);
                self.pos = 0;
                let n = self.inner.read(&mut self.buf[held..])?;
                if n == 0 {
                    return Err(cut_short());
                }
                self.end = held + n;
                // Anything after the mark (an older master streams commands next) is not
                // part of the snapshot.
                if let Some(at) = memchr::memmem::find(&self.buf[..self.end], &mark[..]) {
                    self.ready = at;
                    self.end = at;
                    self.done = true;
                } else {
                    self.ready = self.end.saturating_sub(mark.len() - 1);
                }
            },
        }
    }
}

/// The snapshot artifact's zstd frames: each holds this much of the RDB, compressed in
/// blocks of [`SNAPSHOT_BLOCK`] as they arrive (see `FramedArtifactWriter`).
pub(super) const SNAPSHOT_FRAME: usize = 256 << 10;
pub(super) const SNAPSHOT_BLOCK: usize = 64 << 10;

/// Streams the snapshot on the calling thread: the socket is read as the server writes it,
/// every byte is parsed (key counts, structure, CRC64) and handed to the artifact, which
/// compresses, hashes and writes it.
///
/// One thread, in short bursts, because on a small host the server's fork needs a whole CPU
/// and its parent wakes up every 16 KiB to forward the fork's pipe to our socket. Each read
/// takes what the parent forwarded, and the work on it (under 0.2 ms) is done before the
/// parent's next wake-up, as `redis-cli --rdb` does with its 4 KiB reads and writes. The
/// earlier design, a second thread compressing 256 KiB at a time from a queue, held the CPU
/// for half a millisecond or more at a stretch: the parent, woken onto that CPU, waited, the
/// fork filled the pipe (64 KiB) and stopped, 1,200–1,800 times per GB against 150–400 with
/// redis-cli, and the parent was more often placed on the fork's own CPU instead. Measured in
/// the README.
pub(super) fn snapshot_pipeline<R: Read>(
    payload: R,
    mut artifact: crate::repo::writer::FramedArtifactWriter,
    artifact_path: &Path,
    cancel: &CancellationToken,
) -> Result<(crate::repo::manifest::FileEntry, u64, Snapshot)> {
    let mut tee = Tee {
        inner: payload,
        artifact: &mut artifact,
        disk: None,
        received: 0,
        start: Instant::now(),
        last_report: Instant::now(),
    };
    let opts = rdb::ParseOptions {
        decode_values: false,
        capture_payload: false,
    };
    // The header decides whether this build can parse the snapshot. A newer format (Redis 8.6
    // writes 13) is stored all the same, byte for byte: refusing to back up a newer server is
    // the one failure a backup tool must not have.
    let mut head = Vec::with_capacity(9);
    let head_read = (&mut tee).take(9).read_to_end(&mut head);
    let newer = match (&head_read, rdb::classify_header(&head)) {
        (Ok(_), rdb::HeaderClass::Newer(v)) => Some(v),
        _ => None,
    };
    let parsed = match (head_read, newer) {
        (Err(e), _) => Err(rdb::RdbError::Io {
            offset: 0,
            source: e,
        }),
        (Ok(_), Some(_)) => Ok(None),
        (Ok(_), None) => rdb::read(
            io::Cursor::new(&head[..]).chain(&mut tee),
            &opts,
            &mut CountOnly(cancel),
            false,
        )
        .map(Some),
    };
    // Whatever follows the RDB's own end inside the payload still belongs to the file (and
    // a newer format is all copied unparsed).
    let rest = match parsed {
        Ok(_) => io::copy(&mut tee, &mut io::sink()).map(|_| ()),
        Err(_) => Ok(()),
    };
    let (received, disk) = (tee.received, tee.disk.take());
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    // The first cause wins: the disk, then the connection, then the snapshot itself.
    if let Some(e) = disk {
        return Err(Error::io(artifact_path, e));
    }
    let summary = match parsed {
        Err(rdb::RdbError::Io { source, .. }) => {
            return Err(Error::engine(ENGINE, format!("snapshot: {source}")));
        }
        other => other?,
    };
    rest.map_err(|e| Error::engine(ENGINE, format!("snapshot: {e}")))?;
    let parsed = match (summary, newer) {
        (Some(s), _) => Snapshot::Parsed(s),
        (None, v) => Snapshot::Newer(v.unwrap_or_default()),
    };
    Ok((artifact.finish()?, received, parsed))
}

/// What the snapshot's stream turned out to be.
pub(super) enum Snapshot {
    /// Parsed as it streamed: structure, CRC64 and keys per db checked.
    Parsed(rdb::RdbSummary),
    /// An RDB of this version, newer than this build reads: stored unparsed.
    Newer(u32),
}

/// Hands everything read through it to the artifact. A failed write is kept apart, so that
/// it is reported as the disk's error and not as the snapshot's.
pub(super) struct Tee<'a, R> {
    inner: R,
    artifact: &'a mut crate::repo::writer::FramedArtifactWriter,
    disk: Option<io::Error>,
    received: u64,
    start: Instant,
    last_report: Instant,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.disk.is_some() {
            return Err(io::Error::other("the artifact could not be written"));
        }
        let n = self.inner.read(buf)?;
        if let Err(e) = self.artifact.write(&buf[..n]) {
            self.disk = Some(e);
            return Err(io::Error::other("the artifact could not be written"));
        }
        self.received += n as u64;
        if self.last_report.elapsed() >= PROGRESS_EVERY {
            self.last_report = Instant::now();
            info!(
                engine = ENGINE,
                bytes = self.received,
                mb_per_s = format!(
                    "{:.1}",
                    self.received as f64 / 1e6 / self.start.elapsed().as_secs_f64()
                ),
                "snapshot in progress"
            );
        }
        Ok(n)
    }
}

pub(super) struct CountOnly<'a>(pub(super) &'a CancellationToken);

impl rdb::Visitor for CountOnly<'_> {
    fn key(&mut self, _rec: &rdb::KeyRecord<'_>) -> Result<()> {
        if self.0.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        Ok(())
    }
}

pub(super) fn dump_blocking(
    cfg: &RedisConfig,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let start = Instant::now();
    let mut c = Conn::connect(cfg, CONNECT_TIMEOUT)?;
    c.auth()?;
    let info = String::from_utf8_lossy(&c.bulk(&[b"INFO", b"server"])?).into_owned();
    let server_version = info_field(&info, "redis_version")
        .unwrap_or("unknown")
        .to_owned();
    // CONFIG may be renamed or forbidden; the delay is then unknown, which is not an error.
    let delay = match c.call(&[b"CONFIG", b"GET", b"repl-diskless-sync-delay"])? {
        Reply::Array(Some(v)) => match v.get(1) {
            Some(Reply::Bulk(Some(b))) => String::from_utf8_lossy(b).parse::<u64>().ok(),
            _ => None,
        },
        _ => None,
    };
    if let Some(d) = delay.filter(|d| *d > 0) {
        warn!(
            engine = ENGINE,
            repl_diskless_sync_delay = d,
            "the server's repl-diskless-sync-delay adds {d} s to every snapshot; set it to 0"
        );
    }
    // Keys per db as the server counts them just before the snapshot: the manifest's counts
    // when the snapshot's format is newer than this build can parse.
    let info_keys = keyspace(&String::from_utf8_lossy(&c.bulk(&[b"INFO", b"keyspace"])?));
    // Announce that we understand the diskless `$EOF:` framing, as redis-cli does, and that we
    // want the snapshot only (Redis >= 7; older servers answer an error and stream commands
    // after the snapshot, which `Payload` leaves unread).
    c.call(&[b"REPLCONF", b"capa", b"eof"])?;
    if let Reply::Error(e) = c.call(&[b"REPLCONF", b"rdb-only", b"1"])? {
        debug!(engine = ENGINE, reply = %e, "REPLCONF rdb-only not supported");
    }
    c.send(&[&[b"SYNC"]])?;
    c.deadline = None;
    c.arm()?;
    let header = read_sync_header(&mut c, cancel)?;
    let framing = if let Some(mark) = header.strip_prefix(b"$EOF:") {
        let mark: [u8; 40] = mark
            .try_into()
            .map_err(|_| Error::engine(ENGINE, "SYNC: malformed end mark"))?;
        Framing::Mark(mark)
    } else if let Some(len) = header.strip_prefix(b"$") {
        let len = std::str::from_utf8(len)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| Error::engine(ENGINE, "SYNC: malformed length"))?;
        Framing::Length(len)
    } else if let Some(e) = header.strip_prefix(b"-") {
        return Err(Error::engine(
            ENGINE,
            format!(
                "the server refused the snapshot: {}",
                first_line(&String::from_utf8_lossy(e))
            ),
        ));
    } else {
        return Err(Error::engine(ENGINE, "SYNC: unexpected answer"));
    };
    info!(engine = ENGINE, url = %cfg.display, "snapshot transfer started");
    {
        let s = c.reader.get_ref().tcp();
        // Without the mark the snapshot still works, one wake-up per segment.
        if let Err(e) =
            set_recv_lowat(s, SNAPSHOT_LOWAT).and_then(|_| s.set_read_timeout(Some(SNAPSHOT_POLL)))
        {
            debug!(engine = ENGINE, error = %e, "socket low-water mark not set");
        }
    }

    // zstd level 1 on the reading thread compresses several times faster than a server
    // writes a snapshot; zstd's own threads would only add copies and wake-ups.
    let artifact = out.create_framed(
        DUMP_REL,
        SNAPSHOT_ZSTD_LEVEL,
        SNAPSHOT_FRAME,
        SNAPSHOT_BLOCK,
    )?;
    let artifact_path = out.dir().join(format!("{DUMP_REL}.zst"));
    let payload = Payload::new(
        PolledSocket {
            conn: &mut c,
            cancel,
        },
        framing,
    );
    let (file, bytes, parsed) = snapshot_pipeline(payload, artifact, &artifact_path, cancel)?;
    let elapsed = start.elapsed();
    info!(
        engine = ENGINE,
        bytes,
        elapsed_ms = elapsed.as_millis() as u64,
        mb_per_s = format!(
            "{:.1}",
            bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-3)
        ),
        "snapshot written"
    );
    let (counts, details) = match parsed {
        Snapshot::Parsed(summary) => (
            summary
                .keys_per_db
                .iter()
                .map(|(db, n)| (rdb::db_key(*db), *n))
                .collect::<Counts>(),
            serde_json::json!({
                "rdb_version": summary.version,
                "repl_diskless_sync_delay": delay,
            }),
        ),
        Snapshot::Newer(version) => {
            warn!(
                engine = ENGINE,
                rdb_version = version,
                server_version = %server_version,
                "the snapshot's RDB version {version} is newer than this build reads (up to {}): stored with its checksum, key counts from INFO keyspace, not deep-verifiable by this build",
                rdb::MAX_VERSION
            );
            (
                info_keys
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(db, n)| (rdb::db_key(*db), *n))
                    .collect::<Counts>(),
                serde_json::json!({
                    "rdb_version": version,
                    "repl_diskless_sync_delay": delay,
                    DEEP_VERIFIABLE: false,
                    "counts_from": "INFO keyspace",
                }),
            )
        }
    };
    Ok(EngineEntry {
        source: cfg.display.clone(),
        server_version,
        started_at,
        finished_at: Utc::now(),
        files: vec![file],
        counts,
        details,
    })
}

/// Skips the newlines the master sends while it prepares the snapshot and returns the
/// framing line (`$<len>` or `$EOF:<mark>`, or an error line).
pub(super) fn read_sync_header(c: &mut Conn<'_>, cancel: &CancellationToken) -> Result<Vec<u8>> {
    let mut idle = Duration::ZERO;
    let mut line = Vec::new();
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let r = c.reader.fill_buf().map(|b| b.to_vec());
        match r {
            Ok(b) if b.is_empty() => {
                return Err(c
                    .cfg
                    .unreachable("the server closed the connection during SYNC"));
            }
            Ok(b) => {
                idle = Duration::ZERO;
                let mut used = 0;
                for &byte in &b {
                    used += 1;
                    if byte == b'\n' {
                        if line.is_empty() {
                            continue;
                        }
                        c.reader.consume(used);
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                        return Ok(line);
                    }
                    line.push(byte);
                    if line.len() > MAX_LINE {
                        return Err(Error::engine(ENGINE, "SYNC: header line too long"));
                    }
                }
                c.reader.consume(used);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += POLL;
                if idle >= SYNC_IDLE_LIMIT {
                    return Err(c.cfg.unreachable(format!(
                        "no snapshot from the server after {}s",
                        SYNC_IDLE_LIMIT.as_secs()
                    )));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(c.io_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eof_framing_stops_at_the_mark() {
        let mark = [b'x'; 40];
        let mut mark2 = mark;
        mark2[0] = b'y';
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = body.clone();
        wire.extend_from_slice(&mark2);
        wire.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        // Small reads put the mark across read boundaries.
        struct Dribble(io::Cursor<Vec<u8>>);
        impl Read for Dribble {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(7);
                self.0.read(&mut b[..n])
            }
        }
        let mut p = Payload::new(Dribble(io::Cursor::new(wire)), Framing::Mark(mark2));
        let mut got = Vec::new();
        p.read_to_end(&mut got).unwrap();
        assert_eq!(got, body);

        // Whole-buffer reads with the mark across the first read's end, or just after it.
        for len in [
            PAYLOAD_READ - 41,
            PAYLOAD_READ - 20,
            PAYLOAD_READ - 1,
            PAYLOAD_READ + 3,
        ] {
            let body: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
            let mut wire = body.clone();
            wire.extend_from_slice(&mark2);
            wire.extend_from_slice(b"+PING\r\n");
            let mut p = Payload::new(io::Cursor::new(wire), Framing::Mark(mark2));
            let mut got = Vec::new();
            p.read_to_end(&mut got).unwrap();
            assert!(got == body, "body of {len} bytes: got {}", got.len());
        }

        let mut p = Payload::new(io::Cursor::new(body[..10].to_vec()), Framing::Mark(mark));
        assert!(
            p.read_to_end(&mut Vec::new()).is_err(),
            "no mark: cut short"
        );
        let mut p = Payload::new(io::Cursor::new(body.clone()), Framing::Length(100));
        let mut got = Vec::new();
        p.read_to_end(&mut got).unwrap();
        assert_eq!(got, body[..100]);
    }

    /// Whatever the sizes of the caller's reads and of the socket's deliveries, the diskless
    /// framing hands out exactly the bytes before the end mark: through its own buffer for
    /// small reads, straight into the caller's buffer for large ones, and mixing the two.
    #[test]
    fn eof_framing_is_exact_for_every_read_size() {
        struct Trickle {
            data: io::Cursor<Vec<u8>>,
            most: usize,
        }
        impl Read for Trickle {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(self.most);
                self.data.read(&mut b[..n])
            }
        }
        let mark = [b'm'; 40];
        for len in [0, 1, 39, 40, 41, 4095, 70_000, PAYLOAD_READ + 3] {
            let body: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
            let mut wire = body.clone();
            wire.extend_from_slice(&mark);
            wire.extend_from_slice(b"+after");
            for most in [1, 13, 4096, 1 << 20] {
                for reads in [&[7][..], &[5000], &[1 << 20], &[3, 9000, 40, 70_000, 1]] {
                    let mut p = Payload::new(
                        Trickle {
                            data: io::Cursor::new(wire.clone()),
                            most,
                        },
                        Framing::Mark(mark),
                    );
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 1 << 20];
                    for i in 0.. {
                        let size = reads[i % reads.len()];
                        let n = p.read(&mut buf[..size]).unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert!(
                        got == body,
                        "{len} bytes delivered {most} at a time, read {reads:?}: got {}",
                        got.len()
                    );
                }
            }
        }
    }
}
