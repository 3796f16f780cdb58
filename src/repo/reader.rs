//! Reading a published set: its manifest, and artifacts decompressed while their checksum is
//! checked on the fly.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::MANIFEST;
use super::manifest::{FORMAT, FileEntry, Manifest};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct SetReader {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl SetReader {
    /// Reads and parses `dir/manifest.json`. A missing or unparseable manifest is a corrupt set.
    pub fn open(dir: &Path) -> Result<Self> {
        let id = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join(MANIFEST);
        let bytes = std::fs::read(&path)
            .map_err(|e| Error::corrupt(&id, format!("cannot read {MANIFEST}: {e}")))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(&id, format!("{MANIFEST} does not parse: {e}")))?;
        if manifest.format > FORMAT {
            return Err(Error::corrupt(
                &id,
                format!(
                    "manifest format {} is newer than this dbkeeper understands ({FORMAT}); upgrade dbkeeper",
                    manifest.format
                ),
            ));
        }
        if manifest.id != id {
            return Err(Error::corrupt(
                &id,
                format!("manifest names set {:?}, not its directory", manifest.id),
            ));
        }
        Ok(SetReader {
            dir: dir.to_owned(),
            manifest,
        })
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Opens a stored file for reading its decompressed bytes. The checksum and sizes are
    /// checked when the reader reaches the end; call [`VerifyingReader::finish`] to get the
    /// verdict (it drains whatever the caller did not read).
    pub fn open_file(&self, entry: &FileEntry) -> Result<VerifyingReader> {
        let path = self.dir.join(&entry.path);
        // Paths come from a manifest that may be hand-edited: stay inside the set.
        if entry.path.split('/').any(|c| c == ".." || c.is_empty()) || entry.path.starts_with('/') {
            return Err(Error::corrupt(
                self.id(),
                format!("manifest names an unsafe path {:?}", entry.path),
            ));
        }
        let file = File::open(&path)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        let hashing = HashingReader {
            inner: BufReader::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            read: 0,
        };
        let decoder =
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(1 << 17, hashing))
                .map_err(|e| Error::io(&path, e))?;
        Ok(VerifyingReader {
            decoder,
            raw: 0,
            entry: entry.clone(),
            set: self.id().to_owned(),
        })
    }

    /// Checks one file's size and checksum without decompressing it.
    pub fn check_file(&self, entry: &FileEntry) -> Result<()> {
        let path = self.dir.join(&entry.path);
        let mut file = File::open(&path)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        let mut hasher = Sha256::new();
        let n = io::copy(&mut file, &mut HashSink(&mut hasher))
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        if n != entry.size {
            return Err(Error::corrupt(
                self.id(),
                format!(
                    "{}: {n} bytes on disk, manifest says {}",
                    entry.path, entry.size
                ),
            ));
        }
        let got = hex::encode(hasher.finalize());
        if got != entry.sha256 {
            return Err(Error::corrupt(
                self.id(),
                format!("{}: checksum mismatch", entry.path),
            ));
        }
        Ok(())
    }
}

struct HashSink<'a>(&'a mut Sha256);

impl io::Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct HashingReader {
    inner: BufReader<File>,
    hasher: Sha256,
    read: u64,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Decompressed bytes of one stored file, checked against the manifest as they stream.
pub struct VerifyingReader {
    decoder: zstd::stream::read::Decoder<'static, BufReader<HashingReader>>,
    raw: u64,
    entry: FileEntry,
    set: String,
}

impl VerifyingReader {
    pub fn entry(&self) -> &FileEntry {
        &self.entry
    }

    /// Decompressed bytes read so far.
    pub fn raw_bytes(&self) -> u64 {
        self.raw
    }

    /// Reads to the end and compares sizes and the checksum with the manifest.
    pub fn finish(mut self) -> Result<()> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| self.corrupt(e.to_string()))?;
        let VerifyingReader {
            decoder,
            raw,
            entry,
            set,
        } = self;
        let corrupt = |msg: String| Error::corrupt(&set, format!("{}: {msg}", entry.path));
        let mut buffered = decoder.finish();
        // Bytes the decoder never asked for still belong to the file (trailing garbage).
        io::copy(&mut buffered, &mut io::sink()).map_err(|e| corrupt(e.to_string()))?;
        let hashing = buffered.into_inner();
        if hashing.read != entry.size {
            return Err(corrupt(format!(
                "{} bytes on disk, manifest says {}",
                hashing.read, entry.size
            )));
        }
        if hex::encode(hashing.hasher.finalize()) != entry.sha256 {
            return Err(corrupt("checksum mismatch".into()));
        }
        if raw != entry.raw_size {
            return Err(corrupt(format!(
                "{raw} bytes after decompression, manifest says {}",
                entry.raw_size
            )));
        }
        Ok(())
    }

    fn corrupt(&self, msg: String) -> Error {
        Error::corrupt(&self.set, format!("{}: {msg}", self.entry.path))
    }

    /// Wraps an I/O error from reading this file as a corruption of the set.
    pub fn error(&self, e: impl std::fmt::Display) -> Error {
        self.corrupt(e.to_string())
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.decoder.read(buf)?;
        self.raw += n as u64;
        Ok(n)
    }
}
