//! Writing a set: zstd-compressed (and, with age, encrypted) artifacts hashed as they are
//! stored, then the manifest last. A local set is written into a hidden temp directory,
//! fsynced and made visible by an atomic rename; on object storage the objects go under the
//! set's prefix and the manifest, written last, is what makes the set exist.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::crypt::SetSealer;
use super::kind::EngineKind;
use super::manifest::{
    Encryption, EngineEntry, FORMAT_PLAIN, FileEntry, Manifest, SEALED_MANIFEST, SET_IDENTITY, Tool,
};
use super::s3::{S3Store, S3Writer};
use super::{MANIFEST, MANIFEST_SUM, fsync_dir};
use crate::error::{Error, Result};

/// zstd level 2. On BSON it stores within 0.4% of level 3 (the CLI's default) for about 60% of
/// the CPU, and that CPU decides whether a dump keeps up with the server's cursor on a small
/// host: level 3 made a MongoDB dump 1.44x the time of a raw cursor drain on 2 cores, level 2
/// 1.03x. Level 1 saves little more time for 2% more bytes. Measured in the README.
const ZSTD_LEVEL: i32 = 2;
/// The job size of multithreaded compression.
const MT_JOB_BYTES: u32 = 2 << 20;

/// Where a set's files go while it is written.
#[derive(Debug)]
enum Target {
    /// `<repo>/.tmp-<id>`, renamed to `<repo>/<id>` when published.
    Local { repo: PathBuf, tmp: PathBuf },
    /// `<prefix>/<id>/…`; the set exists once `<id>/manifest.json` does. The ETags the store
    /// gave each object go to `<id>/.etags.json` just before the manifest (see
    /// [`super::ETAGS`]).
    S3 {
        store: S3Store,
        id: String,
        etags: Arc<Mutex<BTreeMap<String, String>>>,
    },
}

/// Creates `dir` and its missing parents inside the temp set `tmp`, never `tmp` itself or
/// anything above it: a repository removed or renamed under a running backup must fail the
/// backup, not be created again (perhaps on the container's own filesystem, not the volume).
fn create_within(tmp: &Path, dir: &Path) -> Result<()> {
    let rel = dir.strip_prefix(tmp).unwrap_or(Path::new(""));
    let mut p = tmp.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match fs::create_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(())
}

impl Target {
    fn path(&self, rel: &str) -> PathBuf {
        match self {
            Target::Local { tmp, .. } => tmp.join(rel),
            Target::S3 { store, id, .. } => PathBuf::from(format!("{}/{id}/{rel}", store.url())),
        }
    }

    /// Opens a new stored file, hashing what it stores.
    fn create(&self, rel: &str) -> Result<Plain> {
        match self {
            Target::Local { tmp, .. } => {
                let path = tmp.join(rel);
                if let Some(parent) = path.parent() {
                    create_within(tmp, parent)?;
                }
                let out = DirectWriter::create(&path).map_err(|e| Error::io(&path, e))?;
                Ok(Plain::Direct(out))
            }
            Target::S3 { store, id, etags } => Ok(Plain::S3(Box::new(S3Sink {
                out: store.writer(&format!("{id}/{rel}"))?,
                hasher: Sha256::new(),
                written: 0,
                rel: rel.to_owned(),
                etags: etags.clone(),
            }))),
        }
    }

    /// Stores a small file whole and describes it.
    fn put_small(&self, rel: &str, data: &[u8]) -> Result<FileEntry> {
        let mut out = self.create(rel)?;
        out.write_all(data)
            .map_err(|e| Error::io(self.path(rel), e))?;
        let (size, sha256) = out.finish(&self.path(rel))?;
        Ok(FileEntry {
            path: rel.to_owned(),
            stored: None,
            size,
            sha256,
            raw_size: data.len() as u64,
        })
    }
}

/// A set being written. Invisible until [`SetWriter::publish`]; dropped unpublished, it removes
/// what it wrote (what a crash leaves is removed by the next holder of the repository lock).
pub struct SetWriter {
    target: Arc<Target>,
    id: String,
    started_at: DateTime<Utc>,
    engines: BTreeMap<EngineKind, EngineEntry>,
    sealer: Option<Arc<SetSealer>>,
    /// Passphrase mode: the set's identity, sealed with the passphrase.
    identity_age: Option<Vec<u8>>,
    /// Numbers the opaque names of an encrypted set's files.
    seq: Arc<AtomicU32>,
    published: bool,
    /// Set by `import` (see [`Manifest::imported`]).
    imported: Option<super::manifest::Imported>,
}

impl SetWriter {
    pub(super) fn create_local(
        repo: &Path,
        id: String,
        started_at: DateTime<Utc>,
        keys: Option<(SetSealer, Option<Vec<u8>>)>,
    ) -> Result<Self> {
        let tmp = repo.join(format!("{}{id}", super::TMP_PREFIX));
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let target = Target::Local {
            repo: repo.to_owned(),
            tmp,
        };
        Ok(Self::new(target, id, started_at, keys))
    }

    pub(super) fn create_s3(
        store: &S3Store,
        id: String,
        started_at: DateTime<Utc>,
        keys: Option<(SetSealer, Option<Vec<u8>>)>,
    ) -> Self {
        let target = Target::S3 {
            store: store.clone(),
            id: id.clone(),
            etags: Arc::default(),
        };
        Self::new(target, id, started_at, keys)
    }

    fn new(
        target: Target,
        id: String,
        started_at: DateTime<Utc>,
        keys: Option<(SetSealer, Option<Vec<u8>>)>,
    ) -> Self {
        let (sealer, identity_age) = match keys {
            Some((s, i)) => (Some(Arc::new(s)), i),
            None => (None, None),
        };
        SetWriter {
            target: Arc::new(target),
            id,
            started_at,
            engines: BTreeMap::new(),
            sealer,
            identity_age,
            seq: Arc::new(AtomicU32::new(1)),
            published: false,
            imported: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the set is being written, for messages.
    pub fn location(&self) -> PathBuf {
        self.target.path("")
    }

    /// Where an engine writes its artifacts (`<set>/<engine>/…`).
    pub fn engine_writer(&self, kind: EngineKind) -> Result<EngineWriter> {
        if let Target::Local { tmp, .. } = &*self.target {
            create_within(tmp, &tmp.join(kind.name()))?;
        }
        Ok(EngineWriter {
            target: self.target.clone(),
            kind,
            sealer: self.sealer.clone(),
            seq: self.seq.clone(),
        })
    }

    pub fn add_engine(&mut self, kind: EngineKind, entry: EngineEntry) {
        self.engines.insert(kind, entry);
    }

    /// Marks the set as imported from another tool's backup (`import`).
    pub fn mark_imported(&mut self, imported: super::manifest::Imported) {
        self.imported = Some(imported);
    }

    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    /// Copies one stored file of another set byte for byte (an off-host copy), checking it
    /// against its manifest entry on the way.
    pub fn copy_file(&self, entry: &FileEntry, from: &mut dyn Read) -> Result<()> {
        let rel = entry.stored_path();
        let path = self.target.path(rel);
        let mut out = self.target.create(rel)?;
        io::copy(from, &mut out).map_err(|e| Error::io(&path, e))?;
        let (size, sha256) = out.finish(&path)?;
        if size != entry.size || sha256 != entry.sha256 {
            return Err(Error::corrupt(
                &self.id,
                format!("{rel}: the copy read {size} bytes that do not match the manifest"),
            ));
        }
        Ok(())
    }

    /// Writes the manifest (for an encrypted set: the sealed full manifest, the set's
    /// identity in passphrase mode, then the public manifest) and makes the set visible.
    pub fn publish(self) -> Result<Manifest> {
        self.publish_with_schema(None)
    }

    /// [`publish`](Self::publish), recording the engines' schema versions (migrations).
    pub fn publish_with_schema(
        mut self,
        schema: Option<super::manifest::Schema>,
    ) -> Result<Manifest> {
        let mut manifest = Manifest {
            format: FORMAT_PLAIN,
            id: self.id.clone(),
            tool: Tool::current(),
            started_at: self.started_at,
            finished_at: Utc::now(),
            schema_version: schema.as_ref().and_then(|s| s.summary()),
            schema,
            encryption: None,
            imported: self.imported.take(),
            engines: std::mem::take(&mut self.engines),
        };
        let public = match &self.sealer {
            None => manifest.clone(),
            Some(sealer) => {
                let identity = match &self.identity_age {
                    Some(bytes) => Some(self.target.put_small(SET_IDENTITY, bytes)?),
                    None => None,
                };
                let full = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
                let sealed = sealer.seal_bytes(&full)?;
                let mut sealed_entry = self.target.put_small(SEALED_MANIFEST, &sealed)?;
                sealed_entry.raw_size = full.len() as u64;
                let public = manifest.public(Encryption {
                    scheme: "age".into(),
                    recipients: sealer.fingerprints(),
                    manifest: sealed_entry,
                    identity,
                });
                manifest.format = public.format;
                manifest.encryption = public.encryption.clone();
                public
            }
        };
        let mut json = serde_json::to_vec_pretty(&public).expect("manifest serializes");
        json.push(b'\n');
        self.publish_manifest(&json)?;
        Ok(manifest)
    }

    /// Writes `manifest.json` as given (a copy's source bytes) and makes the set visible.
    pub fn publish_bytes(mut self, manifest: &[u8]) -> Result<()> {
        self.publish_manifest(manifest)
    }

    fn publish_manifest(&mut self, json: &[u8]) -> Result<()> {
        let sum = format!("{}  {MANIFEST}\n", hex::encode(Sha256::digest(json)));
        match &*self.target {
            Target::Local { repo, tmp } => {
                let path = tmp.join(MANIFEST_SUM);
                let mut f = File::create(&path).map_err(|e| Error::io(&path, e))?;
                f.write_all(sum.as_bytes())
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(&path, e))?;
                let path = tmp.join(MANIFEST);
                let mut f = File::create(&path).map_err(|e| {
                    if tmp.is_dir() {
                        Error::io(&path, e)
                    } else {
                        // Removed or renamed under us: a repository problem (exit 4).
                        Error::repo(
                            repo,
                            "the repository (or this backup's temp set in it) disappeared during the backup; nothing was published",
                        )
                    }
                })?;
                f.write_all(json)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(&path, e))?;
                sync_tree(tmp)?;
                let dest = repo.join(&self.id);
                if dest.exists() {
                    return Err(Error::repo(
                        &dest,
                        "a set with this id already exists; refusing to replace it",
                    ));
                }
                fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
                self.published = true;
                fsync_dir(repo)
            }
            Target::S3 { store, id, etags } => {
                let tags = etags.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let tags = serde_json::to_vec(&tags).expect("a map of strings serializes");
                store.put_small(&format!("{id}/{}", super::ETAGS), tags)?;
                store.put_small(&format!("{id}/{MANIFEST_SUM}"), sum.into_bytes())?;
                store.put_small(&format!("{id}/{MANIFEST}"), json.to_vec())?;
                self.published = true;
                Ok(())
            }
        }
    }
}

impl Drop for SetWriter {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        match &*self.target {
            Target::Local { tmp, .. } => {
                let _ = fs::remove_dir_all(tmp);
            }
            Target::S3 { store, id, .. } => {
                if let Err(e) = store.delete_prefix(id) {
                    warn!(set = %id, error = %e, "cannot remove the objects of an unpublished set; the next backup removes them");
                }
            }
        }
    }
}

/// fsyncs `dir` and every directory below it (files are synced as they finish).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            sync_tree(&entry.path())?;
        }
    }
    fsync_dir(dir)
}

/// An engine's part of a set being written. Cheap to clone into worker threads.
#[derive(Clone)]
pub struct EngineWriter {
    target: Arc<Target>,
    kind: EngineKind,
    sealer: Option<Arc<SetSealer>>,
    seq: Arc<AtomicU32>,
}

/// A stored file being opened: what it will be called in the manifest, and its bytes' sink.
struct Opened {
    out: Stored,
    path: String,
    stored: Option<String>,
    display: PathBuf,
}

impl EngineWriter {
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Creates `<engine>/<rel>.zst`, compressed with zstd on `threads` worker threads
    /// (0: compress on the writing thread). Parent directories are created.
    pub fn create(&self, rel: &str, threads: u32) -> Result<ArtifactWriter> {
        let o = self.open(rel)?;
        let path = o.display;
        let mut enc = zstd::stream::write::Encoder::new(o.out, ZSTD_LEVEL)
            .map_err(|e| Error::io(&path, e))?;
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
            rel_path: o.path,
            stored: o.stored,
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
        let o = self.open(rel)?;
        let cctx = zstd::bulk::Compressor::new(level).map_err(|e| Error::io(&o.display, e))?;
        Ok(FramedArtifactWriter {
            cctx,
            out: o.out,
            scratch: Vec::new(),
            frame: frame.max(1),
            block: block.clamp(1, frame.max(1)),
            in_frame: 0,
            in_block: 0,
            raw: 0,
            rel_path: o.path,
            stored: o.stored,
            path: o.display,
        })
    }

    /// Plain sets store `<engine>/<rel>.zst`; encrypted ones `<engine>/<n>.zst.age`, so that
    /// no stored name says which database or collection it holds.
    fn open(&self, rel: &str) -> Result<Opened> {
        let path = format!("{}/{rel}.zst", self.kind.name());
        let display = self.target.path(&path);
        let (out, stored) = match &self.sealer {
            None => (Stored::Plain(self.target.create(&path)?), None),
            Some(sealer) => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let name = format!("{}/{n:04}.zst.age", self.kind.name());
                let plain = self.target.create(&name)?;
                let sealed = sealer.seal(plain).map_err(|e| Error::io(&display, e))?;
                (Stored::Sealed(sealed), Some(name))
            }
        };
        Ok(Opened {
            out,
            path,
            stored,
            display,
        })
    }

    /// This engine's part of the set, for messages.
    pub fn dir(&self) -> PathBuf {
        self.target.path(self.kind.name())
    }
}

/// The sink of a stored file: a local file (see [`DirectWriter`]) or an object upload, each
/// hashing and counting the bytes as stored.
enum Plain {
    Direct(DirectWriter),
    S3(Box<S3Sink>),
}

struct S3Sink {
    out: S3Writer,
    hasher: Sha256,
    written: u64,
    rel: String,
    etags: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Plain {
    /// Makes the file durable (written and fsynced, or the upload completed) and returns its
    /// size and SHA-256.
    fn finish(self, path: &Path) -> Result<(u64, String)> {
        match self {
            Plain::Direct(out) => {
                let (file, hasher, written) = out.finish().map_err(|e| Error::io(path, e))?;
                file.sync_all().map_err(|e| Error::io(path, e))?;
                Ok((written, hex::encode(hasher.finalize())))
            }
            Plain::S3(sink) => {
                let S3Sink {
                    out,
                    hasher,
                    written,
                    rel,
                    etags,
                } = *sink;
                if let (_, Some(tag)) = out.finish_tagged()? {
                    etags
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(rel, tag);
                }
                Ok((written, hex::encode(hasher.finalize())))
            }
        }
    }
}

impl Write for Plain {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Plain::Direct(d) => d.write(data),
            Plain::S3(sink) => {
                let n = sink.out.write(data)?;
                sink.hasher.update(&data[..n]);
                sink.written += n as u64;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Plain::Direct(d) => d.flush(),
            Plain::S3(sink) => sink.out.flush(),
        }
    }
}

type Sealed = crate::repo::crypt::SealWriter<Plain>;

/// What an artifact's compressed bytes go into: the sink itself, or age encrypting into it.
enum Stored {
    Plain(Plain),
    Sealed(Sealed),
}

impl Stored {
    /// Ends encryption (its last chunk) and returns the sink.
    fn into_plain(self) -> io::Result<Plain> {
        match self {
            Stored::Plain(p) => Ok(p),
            Stored::Sealed(s) => s.finish(),
        }
    }

    /// Gives `data` to zstd's stream with `end`. A local plain file takes the compressed
    /// bytes straight into its write buffer; other sinks get them through `scratch`.
    fn compress_stream(
        &mut self,
        cctx: &mut zstd::zstd_safe::CCtx<'_>,
        data: &[u8],
        end: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        use zstd::zstd_safe::{InBuffer, OutBuffer, zstd_sys::ZSTD_EndDirective as End};
        if let Stored::Plain(Plain::Direct(d)) = self {
            return d.compress_stream(cctx, data, end);
        }
        if scratch.is_empty() {
            scratch.resize(zstd::zstd_safe::CCtx::out_size(), 0);
        }
        let mut src = InBuffer::around(data);
        loop {
            let (left, n) = {
                let mut dst = OutBuffer::around(&mut scratch[..]);
                let left = cctx
                    .compress_stream2(&mut dst, &mut src, end)
                    .map_err(|code| {
                        io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
                    })?;
                (left, dst.pos())
            };
            self.write_all(&scratch[..n])?;
            if src.pos() == data.len() && (left == 0 || matches!(end, End::ZSTD_e_continue)) {
                return Ok(());
            }
        }
    }
}

impl Write for Stored {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stored::Plain(p) => p.write(data),
            Stored::Sealed(s) => s.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stored::Plain(p) => p.flush(),
            Stored::Sealed(s) => s.flush(),
        }
    }
}

/// Ends an artifact: the last of the encryption, then the file itself.
fn finish_stored(
    out: Stored,
    rel_path: String,
    stored: Option<String>,
    path: &Path,
    raw: u64,
) -> Result<FileEntry> {
    let plain = out.into_plain().map_err(|e| Error::io(path, e))?;
    let (size, sha256) = plain.finish(path)?;
    Ok(FileEntry {
        path: rel_path,
        stored,
        size,
        sha256,
        raw_size: raw,
    })
}

/// One artifact being written. Write raw bytes to it; [`ArtifactWriter::finish`] completes the
/// zstd frame, fsyncs, and returns the manifest entry. Dropped unfinished, the file is left
/// incomplete inside the unpublished set, which is never published.
pub struct ArtifactWriter {
    enc: zstd::stream::write::Encoder<'static, Stored>,
    raw: u64,
    rel_path: String,
    stored: Option<String>,
    path: PathBuf,
}

impl ArtifactWriter {
    /// Raw (uncompressed) bytes written so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw
    }

    pub fn finish(self) -> Result<FileEntry> {
        let out = self.enc.finish().map_err(|e| Error::io(&self.path, e))?;
        finish_stored(out, self.rel_path, self.stored, &self.path, self.raw)
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
    out: Stored,
    /// Compressed bytes on their way to a sink that is not a local plain file.
    scratch: Vec<u8>,
    frame: usize,
    block: usize,
    /// Bytes given to the open frame, and to its open block.
    in_frame: usize,
    in_block: usize,
    raw: u64,
    rel_path: String,
    stored: Option<String>,
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
            self.out.compress_stream(
                self.cctx.context_mut(),
                &data[..take],
                end,
                &mut self.scratch,
            )?;
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
                .compress_stream(
                    self.cctx.context_mut(),
                    &[],
                    End::ZSTD_e_end,
                    &mut self.scratch,
                )
                .map_err(|e| Error::io(&self.path, e))?;
        }
        finish_stored(self.out, self.rel_path, self.stored, &self.path, self.raw)
    }
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

    use crate::testutil::noise as pattern;

    #[test]
    fn directories_are_created_inside_the_temp_set_only() {
        let root = tempfile::tempdir().unwrap();
        let tmp = root.path().join("repo/.tmp-x");
        fs::create_dir_all(&tmp).unwrap();
        create_within(&tmp, &tmp.join("mongodb/app")).unwrap();
        assert!(tmp.join("mongodb/app").is_dir());
        create_within(&tmp, &tmp.join("mongodb/app")).unwrap();
        // The repository renamed away under the backup: nothing is created again.
        fs::rename(root.path().join("repo"), root.path().join("gone")).unwrap();
        let e = create_within(&tmp, &tmp.join("redis")).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(!root.path().join("repo").exists());
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
                target: Arc::new(Target::Local {
                    repo: dir.path().to_owned(),
                    tmp: dir.path().to_owned(),
                }),
                kind: EngineKind::Redis,
                sealer: None,
                seq: Arc::new(AtomicU32::new(1)),
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
