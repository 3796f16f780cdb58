//! Writing a set: a hidden temp directory, zstd-compressed artifacts hashed as they are
//! written, fsync, then an atomic rename that makes the set visible.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
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
        self.create_at_level(rel, threads, ZSTD_LEVEL)
    }

    /// As [`create`](Self::create), at zstd `level` instead of the default.
    pub fn create_at_level(&self, rel: &str, threads: u32, level: i32) -> Result<ArtifactWriter> {
        let rel_path = format!("{}/{rel}.zst", self.kind.name());
        let path = self.set_root.join(&rel_path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let sink = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            written: 0,
        };
        let mut enc =
            zstd::stream::write::Encoder::new(sink, level).map_err(|e| Error::io(&path, e))?;
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

    /// The directory of this engine's artifacts, for engines that lay out files themselves.
    pub fn dir(&self) -> PathBuf {
        self.set_root.join(self.kind.name())
    }
}

/// Counts and hashes the compressed bytes on their way to disk.
struct HashingWriter {
    inner: BufWriter<File>,
    hasher: Sha256,
    written: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One artifact being written. Write raw bytes to it; [`ArtifactWriter::finish`] completes the
/// zstd frame, fsyncs, and returns the manifest entry. Dropped unfinished, the file is left
/// incomplete inside the temp set, which is never published.
pub struct ArtifactWriter {
    enc: zstd::stream::write::Encoder<'static, HashingWriter>,
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
        let path = self.path;
        let sink = self.enc.finish().map_err(|e| Error::io(&path, e))?;
        let HashingWriter {
            inner,
            hasher,
            written,
        } = sink;
        let file = inner
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok(FileEntry {
            path: self.rel_path,
            size: written,
            sha256: hex::encode(hasher.finalize()),
            raw_size: self.raw,
        })
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
