//! Writing a set: a hidden temp directory, zstd-compressed artifacts hashed as they are
//! written, fsync, then an atomic rename that makes the set visible.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::manifest::{EngineEntry, FORMAT, FileEntry, Manifest, Tool};
use super::{MANIFEST, TMP_PREFIX, fsync_dir};
use crate::engine::EngineKind;
use crate::error::{Error, Result};

/// zstd level 2. On BSON it stores within 0.4% of level 3 (the CLI's default) for about 60% of
/// the CPU, and that CPU decides whether a dump keeps up with the server's cursor on a small
/// host: level 3 made a MongoDB dump 1.44x the time of a raw cursor drain on 2 cores, level 2
/// 1.03x. Level 1 saves little more time for 2% more bytes. Measured in the README.
const ZSTD_LEVEL: i32 = 2;
/// The job size of multithreaded compression.
const MT_JOB_BYTES: u32 = 2 << 20;

/// A set being written. Invisible (a `.tmp-` directory) until [`SetWriter::publish`]; dropped
/// unpublished, it removes its directory.
pub struct SetWriter {
    repo: PathBuf,
    id: String,
    tmp: PathBuf,
    started_at: DateTime<Utc>,
    engines: BTreeMap<EngineKind, EngineEntry>,
    published: bool,
}

impl SetWriter {
    pub(super) fn create(repo: &Path, id: String, started_at: DateTime<Utc>) -> Result<Self> {
        let tmp = repo.join(format!("{TMP_PREFIX}{id}"));
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(SetWriter {
            repo: repo.to_owned(),
            id,
            tmp,
            started_at,
            engines: BTreeMap::new(),
            published: false,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where an engine writes its artifacts (`<set>/<engine>/…`).
    pub fn engine_writer(&self, kind: EngineKind) -> Result<EngineWriter> {
        let dir = self.tmp.join(kind.name());
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(EngineWriter {
            set_root: Arc::from(self.tmp.as_path()),
            kind,
        })
    }

    pub fn add_engine(&mut self, kind: EngineKind, entry: EngineEntry) {
        self.engines.insert(kind, entry);
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Writes the manifest, fsyncs every directory of the set, renames it into view and
    /// fsyncs the repository directory. Artifact files were fsynced when finished.
    pub fn publish(mut self) -> Result<Manifest> {
        let manifest = Manifest {
            format: FORMAT,
            id: self.id.clone(),
            tool: Tool::current(),
            started_at: self.started_at,
            finished_at: Utc::now(),
            schema_version: None,
            engines: std::mem::take(&mut self.engines),
        };
        let path = self.tmp.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        f.write_all(&json)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        for kind in manifest.engines.keys() {
            sync_tree(&self.tmp.join(kind.name()))?;
        }
        fsync_dir(&self.tmp)?;
        let dest = self.repo.join(&self.id);
        if dest.exists() {
            return Err(Error::repo(
                &dest,
                "a set with this id already exists; refusing to replace it",
            ));
        }
        fs::rename(&self.tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        self.published = true;
        fsync_dir(&self.repo)?;
        Ok(manifest)
    }
}

impl Drop for SetWriter {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// fsyncs every directory below `dir` (files are synced as they finish).
fn sync_tree(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            sync_tree(&entry.path())?;
        }
    }
    fsync_dir(dir)
}

/// An engine's directory inside a set being written. Cheap to clone into worker threads.
#[derive(Clone)]
pub struct EngineWriter {
    set_root: Arc<Path>,
    kind: EngineKind,
}

impl EngineWriter {
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Creates `<engine>/<rel>.zst`, compressed with zstd on `threads` worker threads
    /// (0: compress on the writing thread). Parent directories are created.
    pub fn create(&self, rel: &str, threads: u32) -> Result<ArtifactWriter> {
        let (out, rel_path, path) = self.open(rel)?;
        let mut enc =
            zstd::stream::write::Encoder::new(out, ZSTD_LEVEL).map_err(|e| Error::io(&path, e))?;
        if threads > 0 {
            enc.multithread(threads).map_err(|e| Error::io(&path, e))?;
            // Each worker holds a job's input and output; the default job (four windows)
            // would cost tens of MB per artifact for no gain in ratio worth having.
            enc.set_parameter(zstd::stream::raw::CParameter::JobSize(MT_JOB_BYTES))
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(ArtifactWriter {
            enc,
            raw: 0,
            rel_path,
            path,
        })
    }

    /// Creates `<engine>/<rel>.zst`, compressed at zstd `level` in frames of `frame` bytes,
    /// each flushed every `block` bytes (see [`FramedArtifactWriter`]).
    pub fn create_framed(
        &self,
        rel: &str,
        level: i32,
        frame: usize,
        block: usize,
    ) -> Result<FramedArtifactWriter> {
        let (out, rel_path, path) = self.open(rel)?;
        let cctx = zstd::bulk::Compressor::new(level).map_err(|e| Error::io(&path, e))?;
        Ok(FramedArtifactWriter {
            cctx,
            out,
            frame: frame.max(1),
            block: block.clamp(1, frame.max(1)),
            in_frame: 0,
            in_block: 0,
            raw: 0,
            rel_path,
            path,
        })
    }

    fn open(&self, rel: &str) -> Result<(DirectWriter, String, PathBuf)> {
        let rel_path = format!("{}/{rel}.zst", self.kind.name());
        let path = self.set_root.join(&rel_path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let out = DirectWriter::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok((out, rel_path, path))
    }

    /// The directory of this engine's artifacts, for engines that lay out files themselves.
    pub fn dir(&self) -> PathBuf {
        self.set_root.join(self.kind.name())
    }
}

/// One artifact being written. Write raw bytes to it; [`ArtifactWriter::finish`] completes the
/// zstd frame, fsyncs, and returns the manifest entry. Dropped unfinished, the file is left
/// incomplete inside the temp set, which is never published.
pub struct ArtifactWriter {
    enc: zstd::stream::write::Encoder<'static, DirectWriter>,
    raw: u64,
    rel_path: String,
    path: PathBuf,
}

impl ArtifactWriter {
    /// Raw (uncompressed) bytes written so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw
    }

    pub fn finish(self) -> Result<FileEntry> {
        let out = self.enc.finish().map_err(|e| Error::io(&self.path, e))?;
        finish_file(out, self.rel_path, &self.path, self.raw)
    }
}

impl Write for ArtifactWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.enc.write(buf)?;
        self.raw += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.enc.flush()
    }
}

/// An artifact compressed in frames of a fixed size, each made of blocks that are compressed
/// as soon as their bytes arrive, straight into the file's write buffer. The file is an
/// ordinary concatenation of zstd frames, which `zstd -d` and every zstd library decode as one
/// stream.
///
/// For the Redis snapshot, where the CPU a backup takes is CPU the server's fork may not get.
/// Small blocks keep every burst of compression short (64 KiB is about 0.15 ms at level 1):
/// the server's parent, which forwards the fork's pipe to our socket, then finds the CPU free
/// when it wakes, instead of waiting for half a millisecond of compression while the fork
/// fills the pipe and stops. Frames bound the window zstd resets its tables for; within a
/// frame the blocks share one window, so flushing costs little ratio (on a 70 MB RDB of JSON
/// values at level 1, 256 KiB frames flushed every 64 KiB came out 0.2% larger than whole
/// 256 KiB frames, and 128 KiB frames 3% larger; base64 values 0.02%).
pub struct FramedArtifactWriter {
    cctx: zstd::bulk::Compressor<'static>,
    out: DirectWriter,
    frame: usize,
    block: usize,
    /// Bytes given to the open frame, and to its open block.
    in_frame: usize,
    in_block: usize,
    raw: u64,
    rel_path: String,
    path: PathBuf,
}

impl FramedArtifactWriter {
    /// Compresses `data` into the open frame, flushing a block (or ending the frame) at every
    /// boundary it crosses. Bytes short of the next boundary wait inside zstd.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as End;
        while !data.is_empty() {
            let to_block = (self.block - self.in_block).min(self.frame - self.in_frame);
            let take = data.len().min(to_block);
            let end = if take < to_block {
                End::ZSTD_e_continue
            } else if self.in_frame + take == self.frame {
                End::ZSTD_e_end
            } else {
                End::ZSTD_e_flush
            };
            self.out
                .compress_stream(self.cctx.context_mut(), &data[..take], end)?;
            (self.in_frame, self.in_block) = match end {
                End::ZSTD_e_continue => (self.in_frame + take, self.in_block + take),
                End::ZSTD_e_flush => (self.in_frame + take, 0),
                End::ZSTD_e_end => (0, 0),
            };
            self.raw += take as u64;
            data = &data[take..];
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<FileEntry> {
        if self.in_frame > 0 {
            use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective as End;
            self.out
                .compress_stream(self.cctx.context_mut(), &[], End::ZSTD_e_end)
                .map_err(|e| Error::io(&self.path, e))?;
        }
        finish_file(self.out, self.rel_path, &self.path, self.raw)
    }
}

/// Writes what is pending, fsyncs the file and describes it for the manifest.
fn finish_file(out: DirectWriter, rel_path: String, path: &Path, raw: u64) -> Result<FileEntry> {
    let (file, hasher, written) = out.finish().map_err(|e| Error::io(path, e))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(FileEntry {
        path: rel_path,
        size: written,
        sha256: hex::encode(hasher.finalize()),
        raw_size: raw,
    })
}

/// Bytes pending before the writer writes them out.
const DIRECT_BUF: usize = 1 << 20;
/// The alignment `O_DIRECT` asks of buffers, offsets and lengths: 4 KiB covers devices with
/// 512-byte and 4 KiB logical blocks alike.
const DIRECT_ALIGN: usize = 4096;
/// The write buffer: what may be pending, plus room to compress a [`DIRECT_BUF`]-sized piece
/// into it whatever its ratio (zstd's bound is the input plus 1/256 and a few bytes).
const DIRECT_AREA: usize = 2 * DIRECT_BUF + 4 * DIRECT_ALIGN;

/// A new file written with `O_DIRECT` where the filesystem allows it, in aligned blocks of
/// about 1 MiB; the last, partial block goes through the page cache. Everything written is
/// hashed (SHA-256) and counted on its way.
///
/// Artifacts are written once and not read back by this process, so the page cache only cost
/// CPU: copying a GB of snapshot into it took 0.2–1.1 s of kernel time on a 2-CPU VM, against
/// 0.1–0.2 s direct, and that time is taken from the database server sharing the host. It
/// also leaves the database's own cached pages in memory. Filesystems that refuse
/// `O_DIRECT` (at open or at a write) get ordinary buffered writes.
struct DirectWriter {
    file: File,
    /// `DIRECT_AREA + DIRECT_ALIGN` bytes, of which `buf[start..start + DIRECT_AREA]` is aligned.
    buf: Vec<u8>,
    start: usize,
    /// Bytes pending at `buf[start..]`.
    len: usize,
    direct: bool,
    hasher: Sha256,
    written: u64,
}

impl DirectWriter {
    fn create(path: &Path) -> io::Result<Self> {
        let open = |flags: i32| {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0)?, false),
            Err(e) => return Err(e),
        };
        let buf = vec![0u8; DIRECT_AREA + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Ok(DirectWriter {
            file,
            buf,
            start,
            len: 0,
            direct,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Writes the pending bytes: directly, as many as make whole blocks (and keeps the rest
    /// pending), or through the page cache, all of them. `all` writes the partial last block
    /// too, which ends direct I/O for the file.
    fn write_pending(&mut self, all: bool) -> io::Result<()> {
        let s = self.start;
        let mut done = 0;
        if self.direct {
            let blocks = self.len - self.len % DIRECT_ALIGN;
            while done < blocks {
                match self.file.write(&self.buf[s + done..s + blocks]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Refused, or unaligned after a short write: the page cache takes the rest.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    Err(e) => return Err(e),
                }
            }
            if done < blocks || (all && done < self.len) {
                self.buffered()?;
            }
        }
        if !self.direct {
            self.file.write_all(&self.buf[s + done..s + self.len])?;
            done = self.len;
        }
        self.buf.copy_within(s + done..s + self.len, s);
        self.len -= done;
        Ok(())
    }

    /// Turns `O_DIRECT` off for the rest of the file.
    fn buffered(&mut self) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        if self.direct {
            let flags = OFlag::from_bits_retain(fcntl(&self.file, FcntlArg::F_GETFL)?);
            fcntl(&self.file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
            self.direct = false;
        }
        Ok(())
    }

    /// Gives `data` to zstd's stream with `end` (continue, flush a block, or end the frame),
    /// and takes what it compresses straight into the buffer.
    fn compress_stream(
        &mut self,
        cctx: &mut zstd::zstd_safe::CCtx<'_>,
        data: &[u8],
        end: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective,
    ) -> io::Result<()> {
        use zstd::zstd_safe::{InBuffer, OutBuffer, zstd_sys::ZSTD_EndDirective as End};
        let mut src = InBuffer::around(data);
        loop {
            // What is pending is written at DIRECT_BUF, so at least that much room is left:
            // more than any one block compresses to.
            if self.len >= DIRECT_BUF {
                self.write_pending(false)?;
            }
            let at = self.start + self.len;
            let (left, n) = {
                let mut dst = OutBuffer::around(&mut self.buf[at..self.start + DIRECT_AREA]);
                let left = cctx
                    .compress_stream2(&mut dst, &mut src, end)
                    .map_err(|code| {
                        io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
                    })?;
                (left, dst.pos())
            };
            self.hasher.update(&self.buf[at..at + n]);
            self.written += n as u64;
            self.len += n;
            let taken = src.pos() == data.len();
            if taken && (left == 0 || matches!(end, End::ZSTD_e_continue)) {
                return Ok(());
            }
        }
    }

    /// Writes what is pending and returns the file (not yet synced), the hash of its
    /// content and its size.
    fn finish(mut self) -> io::Result<(File, Sha256, u64)> {
        self.write_pending(true)?;
        Ok((self.file, self.hasher, self.written))
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.len >= DIRECT_BUF {
            self.write_pending(false)?;
        }
        let n = data.len().min(DIRECT_AREA - self.len);
        let at = self.start + self.len;
        self.buf[at..at + n].copy_from_slice(&data[..n]);
        self.hasher.update(&data[..n]);
        self.written += n as u64;
        self.len += n;
        Ok(n)
    }

    /// Keeps a partial block pending: writing it would end direct I/O for the file. Callers
    /// that need the bytes on disk finish the file.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Writes `len` bytes in `piece`-sized writes (after `buffered_after` of them, O_DIRECT is
    /// turned off) and checks the file holds exactly those bytes.
    fn write_and_compare(len: usize, piece: usize, buffered_after: Option<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zst");
        let data = pattern(len);
        let mut w = DirectWriter::create(&path).unwrap();
        for (i, p) in data.chunks(piece).enumerate() {
            if buffered_after == Some(i) {
                w.buffered().unwrap();
            }
            w.write_all(p).unwrap();
        }
        w.flush().unwrap();
        let (f, hasher, size) = w.finish().unwrap();
        f.sync_all().unwrap();
        drop(f);
        let back = fs::read(&path).unwrap();
        assert_eq!(back.len(), len, "{len} bytes in pieces of {piece}");
        assert!(
            back == data,
            "{len} bytes in pieces of {piece}: content differs"
        );
        assert_eq!(size, len as u64);
        assert_eq!(hasher.finalize()[..], Sha256::digest(&back)[..]);
    }

    #[test]
    fn direct_writer_keeps_every_byte_whatever_the_sizes() {
        for len in [
            0,
            1,
            DIRECT_ALIGN - 1,
            DIRECT_ALIGN,
            DIRECT_BUF - 1,
            DIRECT_BUF,
            DIRECT_BUF + 1,
            3 * DIRECT_BUF + 17,
        ] {
            for piece in [1 << 20, 7000, 131_072] {
                if len > DIRECT_BUF && piece < 8192 {
                    continue; // the same paths as 131072, a thousand times slower
                }
                write_and_compare(len, piece, None);
            }
        }
    }

    #[test]
    fn direct_writer_can_fall_back_to_the_page_cache_midway() {
        write_and_compare(2 * DIRECT_BUF + 5, 100_000, Some(12));
        write_and_compare(DIRECT_BUF + 5, 100_000, Some(0));
    }

    #[test]
    fn direct_writer_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.zst");
        fs::write(&path, b"keep").unwrap();
        let e = DirectWriter::create(&path).err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"keep");
    }

    /// Pieces of every size, compressible or not, come back whole from the concatenated
    /// frames, every frame but the last holds exactly `frame` bytes, and the manifest entry
    /// describes the file as written.
    #[test]
    fn framed_artifacts_decode_as_one_stream() {
        let noise = pattern(5 << 20);
        let text: Vec<u8> = b"the same line again and again\n"
            .iter()
            .copied()
            .cycle()
            .take(3 << 20)
            .collect();
        for (frame, block) in [
            (256 << 10, 64 << 10),
            (256 << 10, 256 << 10),
            (1000, 300),
            (DIRECT_ALIGN, DIRECT_ALIGN),
        ] {
            let pieces: Vec<&[u8]> = vec![
                &noise[..1],
                &[],
                &noise[..DIRECT_BUF],
                &text[..DIRECT_BUF],
                &noise[7..DIRECT_BUF - 5],
                &text[..100],
                &noise[..block],
                &text[..frame],
                &noise[..],
                &text[..DIRECT_ALIGN],
                &noise[3..DIRECT_BUF + 9],
            ];
            let dir = tempfile::tempdir().unwrap();
            let w = EngineWriter {
                set_root: Arc::from(dir.path()),
                kind: EngineKind::Redis,
            };
            fs::create_dir_all(w.dir()).unwrap();
            let mut a = w.create_framed("dump.rdb", 1, frame, block).unwrap();
            let mut want = Vec::new();
            for p in &pieces {
                a.write(p).unwrap();
                want.extend_from_slice(p);
            }
            let entry = a.finish().unwrap();
            let file = fs::read(dir.path().join(&entry.path)).unwrap();
            assert_eq!(entry.size, file.len() as u64);
            assert_eq!(entry.raw_size, want.len() as u64);
            assert_eq!(entry.sha256, hex::encode(Sha256::digest(&file)));
            let back = zstd::stream::decode_all(&file[..]).unwrap();
            assert!(
                back == want,
                "frames of {frame} flushed every {block}: decoded {} bytes of {}",
                back.len(),
                want.len()
            );
            // Frame by frame: each decodes on its own and holds `frame` bytes, the last the rest.
            let mut rest = &file[..];
            let mut sizes = Vec::new();
            while !rest.is_empty() {
                let n = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
                sizes.push(zstd::stream::decode_all(&rest[..n]).unwrap().len());
                rest = &rest[n..];
            }
            let last = sizes.pop().unwrap();
            assert!(
                sizes.iter().all(|&n| n == frame),
                "frames of {frame}: {sizes:?}"
            );
            assert_eq!(sizes.len() * frame + last, want.len());
            assert!(last > 0 && last <= frame);
        }
    }
}
