//! Reading a published set: its manifest (for an encrypted set, the sealed full manifest when
//! a key opens it), and artifacts decrypted and decompressed while their checksum is checked
//! on the fly.

use std::io::{self, BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::backend::SetPlace;
use super::crypt::{self, Crypto, Payload, SEALED_CHUNK, SetOpener};
use super::manifest::{FORMAT, FileEntry, Manifest};
use super::{MANIFEST, MANIFEST_SUM};
use crate::error::{Error, Result};

#[derive(Clone)]
pub struct SetReader {
    pub place: SetPlace,
    /// The full manifest; for an encrypted set that no configured key opens, the public one
    /// (stored names, sizes and checksums only).
    pub manifest: Manifest,
    /// `manifest.json` as stored, for a byte-exact copy.
    pub raw_manifest: Vec<u8>,
    opener: Option<SetOpener>,
    /// Why an encrypted set cannot be opened here.
    key_error: Option<String>,
}

impl std::fmt::Debug for SetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetReader")
            .field("place", &self.place)
            .field("id", &self.manifest.id)
            .field("sealed", &self.is_sealed())
            .field("key_error", &self.key_error)
            .finish()
    }
}

impl SetReader {
    /// Reads and parses the set's `manifest.json`. A missing or unparseable manifest is a
    /// corrupt set. An encrypted set whose key is missing or wrong still opens (listing and
    /// checksums need no key); reading its data then fails with [`Error::Key`].
    pub fn open(place: SetPlace, id: &str, crypto: Option<&Crypto>) -> Result<Self> {
        let raw = place
            .read_small(MANIFEST)
            .map_err(|e| Error::corrupt(id, format!("cannot read {MANIFEST}: {e}")))?
            .ok_or_else(|| Error::corrupt(id, format!("cannot read {MANIFEST}: not found")))?;
        Self::from_raw(place, id, raw, crypto)
    }

    /// Like [`SetReader::open`], with `manifest.json` already read.
    pub fn from_raw(
        place: SetPlace,
        id: &str,
        raw: Vec<u8>,
        crypto: Option<&Crypto>,
    ) -> Result<Self> {
        check_sum(&place, id, &raw)?;
        let public = parse(id, &raw)?;
        let Some(enc) = public.encryption.clone() else {
            return Ok(SetReader {
                place,
                manifest: public,
                raw_manifest: raw,
                opener: None,
                key_error: None,
            });
        };
        // The sealed files must match the public manifest whether or not we can open them.
        let sealed = read_checked(&place, id, &enc.manifest)?;
        let identity = match &enc.identity {
            Some(f) => Some(read_checked(&place, id, f)?),
            None => None,
        };
        let opened = match crypto.filter(|c| c.can_decrypt()) {
            None => Err(crypt::no_key_error(id, &enc.recipients).to_string()),
            Some(c) => c
                .open_set(id, &enc.recipients, identity.as_deref())
                .and_then(|o| Ok((o.open_bytes(&sealed)?, o)))
                .map_err(|e| e.to_string()),
        };
        let (full, opener) = match opened {
            Ok(x) => x,
            Err(why) => {
                return Ok(SetReader {
                    place,
                    manifest: public,
                    raw_manifest: raw,
                    opener: None,
                    key_error: Some(why),
                });
            }
        };
        let mut full = parse(id, &full)?;
        let same = full.engines.len() == public.engines.len()
            && full.engines.iter().all(|(k, e)| {
                public.engines.get(k).is_some_and(|p| {
                    p.files.len() == e.files.len()
                        && p.files.iter().zip(&e.files).all(|(a, b)| {
                            a.path == b.stored_path() && a.sha256 == b.sha256 && a.size == b.size
                        })
                })
            });
        if !same {
            return Err(Error::corrupt(
                id,
                "the sealed manifest does not describe the same files as manifest.json",
            ));
        }
        full.format = public.format;
        full.encryption = public.encryption;
        Ok(SetReader {
            place,
            manifest: full,
            raw_manifest: raw,
            opener: Some(opener),
            key_error: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Whether the set is encrypted.
    pub fn is_sealed(&self) -> bool {
        self.manifest.encryption.is_some()
    }

    /// Fails, naming the set and its recipients, when the set is encrypted and no configured
    /// key opens it. Restores call this before they touch their target.
    pub fn require_key(&self) -> Result<()> {
        match &self.key_error {
            Some(why) => Err(Error::Key(why.clone())),
            None => Ok(()),
        }
    }

    /// Where the set is, for messages.
    pub fn location(&self) -> String {
        self.place.display()
    }

    /// Opens a stored file for reading its decompressed bytes. The checksum and sizes are
    /// checked when the reader reaches the end; call [`VerifyingReader::finish`] to get the
    /// verdict (it drains whatever the caller did not read).
    pub fn open_file(&self, entry: &FileEntry) -> Result<VerifyingReader> {
        self.require_key()?;
        let rel = checked_path(self.id(), entry.stored_path())?;
        let raw = self
            .place
            .open(rel)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        let state = Arc::new(Mutex::new((Sha256::new(), 0u64)));
        let mut hashing = HashingReader {
            inner: BufReader::with_capacity(1 << 20, raw),
            state: state.clone(),
        };
        // Each stage a step ahead on a thread of its own, as `age -d | zstd -d` runs in two
        // processes: reading (a GET's network reads, or the file) with the SHA-256, then
        // decrypting in place, beside the decompression and whatever consumes the bytes. The
        // buffers pass from stage to stage and back, never copied. A local plain file needs
        // no such thread.
        let source: Box<dyn BufRead + Send> = match (&self.opener, entry.stored.is_some()) {
            (Some(opener), true) => {
                // The header is read here, so a wrong key fails the open, before any output.
                let payload = opener
                    .open_header(&mut hashing)
                    .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
                let read = ReadAhead::spawn(Box::new(hashing), OPEN_AHEAD_CHUNK);
                Box::new(Opened::spawn(read, payload))
            }
            _ if matches!(self.place, SetPlace::S3 { .. }) => Box::new(BufReader::with_capacity(
                1 << 17,
                ReadAhead::spawn(Box::new(hashing), READ_AHEAD_CHUNK),
            )),
            _ => Box::new(BufReader::with_capacity(1 << 17, hashing)),
        };
        let decoder = zstd::stream::read::Decoder::with_buffer(source)
            .map_err(|e| Error::io(self.place.path(rel), e))?;
        Ok(VerifyingReader {
            decoder,
            raw: 0,
            state,
            entry: entry.clone(),
            set: self.id().to_owned(),
        })
    }

    /// Checks one stored file's size and checksum without decrypting or decompressing it.
    pub fn check_file(&self, entry: &FileEntry) -> Result<()> {
        let rel = checked_path(self.id(), entry.stored_path())?;
        let mut r = self
            .place
            .open(rel)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        let (n, sha) = hash_all(&mut r)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))?;
        compare(self.id(), entry, n, &sha)
    }

    /// Streams a stored file as stored (encrypted, compressed), for a copy.
    pub fn open_stored(&self, entry: &FileEntry) -> Result<Box<dyn Read + Send>> {
        let rel = checked_path(self.id(), entry.stored_path())?;
        self.place
            .open(rel)
            .map_err(|e| Error::corrupt(self.id(), format!("{}: {e}", entry.path)))
    }
}

/// Checks `manifest.json` against `manifest.json.sha256` where the set has one.
fn check_sum(place: &SetPlace, id: &str, raw: &[u8]) -> Result<()> {
    let Some(sum) = place
        .read_small(MANIFEST_SUM)
        .map_err(|e| Error::corrupt(id, format!("cannot read {MANIFEST_SUM}: {e}")))?
    else {
        return Ok(());
    };
    let want = format!("{}  {MANIFEST}\n", hex::encode(Sha256::digest(raw)));
    if sum != want.as_bytes() {
        return Err(Error::corrupt(
            id,
            format!("{MANIFEST} does not match {MANIFEST_SUM}: the manifest or its sum is damaged"),
        ));
    }
    Ok(())
}

pub(crate) fn parse(id: &str, bytes: &[u8]) -> Result<Manifest> {
    let manifest: Manifest = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(id, format!("{MANIFEST} does not parse: {e}")))?;
    if manifest.format > FORMAT {
        return Err(Error::corrupt(
            id,
            format!(
                "manifest format {} is newer than this dbkeeper understands ({FORMAT}); upgrade dbkeeper",
                manifest.format
            ),
        ));
    }
    if manifest.id != id {
        return Err(Error::corrupt(
            id,
            format!("manifest names set {:?}, not its directory", manifest.id),
        ));
    }
    Ok(manifest)
}

/// Paths come from a manifest that may be hand-edited: stay inside the set.
fn checked_path<'a>(id: &str, rel: &'a str) -> Result<&'a str> {
    if rel.split('/').any(|c| c == ".." || c.is_empty()) || rel.starts_with('/') {
        return Err(Error::corrupt(
            id,
            format!("manifest names an unsafe path {rel:?}"),
        ));
    }
    Ok(rel)
}

/// A small stored file whole, checked against its entry.
fn read_checked(place: &SetPlace, id: &str, entry: &FileEntry) -> Result<Vec<u8>> {
    let rel = checked_path(id, &entry.path)?;
    let bytes = place
        .read_small(rel)?
        .ok_or_else(|| Error::corrupt(id, format!("{rel}: missing")))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    compare(id, entry, bytes.len() as u64, &sha)?;
    Ok(bytes)
}

fn compare(id: &str, entry: &FileEntry, size: u64, sha256: &str) -> Result<()> {
    if size != entry.size {
        return Err(Error::corrupt(
            id,
            format!(
                "{}: {size} bytes stored, manifest says {}",
                entry.path, entry.size
            ),
        ));
    }
    if sha256 != entry.sha256 {
        return Err(Error::corrupt(
            id,
            format!("{}: checksum mismatch", entry.path),
        ));
    }
    Ok(())
}

fn hash_all(r: &mut dyn Read) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                hasher.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((n, hex::encode(hasher.finalize())))
}

/// Reads a source on a thread of its own, up to [`READ_AHEAD`] chunks ahead of the reader.
/// Written by hand: the crates that do this (e.g. `readahead`) are unmaintained, and the
/// whole of it is a bounded channel and a recycled buffer.
struct ReadAhead {
    full: Receiver<io::Result<Vec<u8>>>,
    empty: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    /// The source failed: every later read fails too, never a clean end.
    failed: bool,
}

/// Chunks in flight, and their size: memory stays at a few MiB per open file.
const READ_AHEAD: usize = 3;
const READ_AHEAD_CHUNK: usize = 1 << 20;
/// An encrypted file's chunks: whole sealed age chunks (about 1 MiB), so that each buffer
/// opens in place.
const OPEN_AHEAD_CHUNK: usize = 16 * SEALED_CHUNK;

impl ReadAhead {
    /// Every chunk but the last of the source holds exactly `chunk` bytes.
    fn spawn(mut src: Box<dyn Read + Send>, chunk: usize) -> ReadAhead {
        let (full_tx, full) = sync_channel(READ_AHEAD);
        let (empty, empty_rx) = sync_channel::<Vec<u8>>(READ_AHEAD + 2);
        std::thread::spawn(move || {
            loop {
                let mut buf = empty_rx.try_recv().unwrap_or_default();
                buf.resize(chunk, 0);
                let mut n = 0;
                let r = loop {
                    if n == buf.len() {
                        break Ok(());
                    }
                    match src.read(&mut buf[n..]) {
                        Ok(0) => break Ok(()),
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(n);
                let last = n < chunk;
                let sent = match r {
                    Ok(()) if n == 0 => break,
                    Ok(()) => full_tx.send(Ok(buf)),
                    Err(e) => {
                        // What was read before the error still goes first.
                        if n > 0 && full_tx.send(Ok(buf)).is_err() {
                            break;
                        }
                        let _ = full_tx.send(Err(e));
                        break;
                    }
                };
                if sent.is_err() || last {
                    break;
                }
            }
        });
        ReadAhead {
            full,
            empty,
            cur: Vec::new(),
            pos: 0,
            failed: false,
        }
    }

    /// The next chunk whole, `None` once the source is read to its end.
    fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.failed {
            return Err(io::Error::other("the stored file could not be read"));
        }
        match self.full.recv() {
            Ok(Ok(chunk)) => Ok(Some(chunk)),
            Ok(Err(e)) => {
                self.failed = true;
                Err(e)
            }
            // The thread is done: everything was read.
            Err(_) => Ok(None),
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.cur.len() {
            let Some(next) = self.next_chunk()? else {
                return Ok(0);
            };
            let old = std::mem::replace(&mut self.cur, next);
            let _ = self.empty.try_send(old);
            self.pos = 0;
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The plaintext of an encrypted file: a thread opens [`ReadAhead`]'s buffers in place, one
/// behind the reading (whether a buffer holds the final chunk is known when the next one
/// arrives, or the end does), and the reader hands out each chunk's plaintext where it lies
/// in the buffer, then gives the buffer back to the reading thread.
struct Opened {
    full: Receiver<io::Result<Vec<u8>>>,
    recycle: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    /// Where the current chunk starts in `cur`, the next byte to hand out, and the end of
    /// the chunk's plaintext.
    chunk: usize,
    pos: usize,
    end: usize,
    /// Decryption or the source failed: every later read fails too, never a clean end.
    failed: bool,
}

impl Opened {
    fn spawn(mut read: ReadAhead, mut payload: Payload) -> Opened {
        let recycle = read.empty.clone();
        let (tx, full) = sync_channel(2);
        std::thread::spawn(move || {
            let mut held: Option<Vec<u8>> = None;
            loop {
                let next = match read.next_chunk() {
                    Ok(next) => next,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let last = next.is_none();
                let mut buf = held.take().unwrap_or_default();
                if let Err(e) = payload.open_in_place(&mut buf, last) {
                    let _ = tx.send(Err(e));
                    return;
                }
                if !buf.is_empty() && tx.send(Ok(buf)).is_err() {
                    return;
                }
                match next {
                    Some(chunk) => held = Some(chunk),
                    None => return,
                }
            }
        });
        Opened {
            full,
            recycle,
            cur: Vec::new(),
            chunk: 0,
            pos: 0,
            end: 0,
            failed: false,
        }
    }
}

impl BufRead for Opened {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.failed {
            return Err(io::Error::other("the stored file could not be decrypted"));
        }
        while self.pos == self.end {
            if self.chunk + SEALED_CHUNK < self.cur.len() {
                self.chunk += SEALED_CHUNK;
            } else {
                let next = match self.full.recv() {
                    Ok(Ok(buf)) => buf,
                    Ok(Err(e)) => {
                        self.failed = true;
                        return Err(e);
                    }
                    // The thread is done: the final chunk was opened.
                    Err(_) => return Ok(&[]),
                };
                let old = std::mem::replace(&mut self.cur, next);
                let _ = self.recycle.try_send(old);
                self.chunk = 0;
            }
            let r = crypt::plaintext(self.cur.len(), self.chunk);
            (self.pos, self.end) = (r.start, r.end);
        }
        Ok(&self.cur[self.pos..self.end])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
    }
}

impl Read for Opened {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = out.len().min(avail.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Hashes and counts the stored bytes as they are read. The state is shared so that the
/// verdict can be read after the decrypting and decompressing layers above are drained.
struct HashingReader {
    inner: BufReader<Box<dyn Read + Send>>,
    state: Arc<Mutex<(Sha256, u64)>>,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0.update(&buf[..n]);
        s.1 += n as u64;
        Ok(n)
    }
}

/// Decompressed bytes of one stored file, checked against the manifest as they stream.
pub struct VerifyingReader {
    decoder: zstd::stream::read::Decoder<'static, Box<dyn BufRead + Send>>,
    raw: u64,
    state: Arc<Mutex<(Sha256, u64)>>,
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
            state,
            entry,
            set,
        } = self;
        let corrupt = |msg: String| Error::corrupt(&set, format!("{}: {msg}", entry.path));
        let mut buffered = decoder.finish();
        // Bytes the decoder never asked for still belong to the file (trailing garbage); for
        // an encrypted file this also reads and authenticates its last chunk.
        io::copy(&mut buffered, &mut io::sink()).map_err(|e| corrupt(e.to_string()))?;
        drop(buffered);
        let (hasher, read) = {
            let s = state.lock().unwrap_or_else(|p| p.into_inner());
            (s.0.clone(), s.1)
        };
        if read != entry.size {
            return Err(corrupt(format!(
                "{read} bytes stored, manifest says {}",
                entry.size
            )));
        }
        if hex::encode(hasher.finalize()) != entry.sha256 {
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

/// The path of a stored file, for callers that name it in messages.
pub fn describe(place: &SetPlace, entry: &FileEntry) -> PathBuf {
    place.path(entry.stored_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that yields `data` in reads of uneven sizes, then fails if asked to.
    struct Uneven {
        data: Vec<u8>,
        at: usize,
        fail_at_end: bool,
    }

    impl Read for Uneven {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return if self.fail_at_end {
                    Err(io::Error::other("connection reset"))
                } else {
                    Ok(0)
                };
            }
            let n = buf.len().min(self.data.len() - self.at).min(70_001);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn read_ahead_keeps_every_byte_and_every_error() {
        for len in [
            0,
            1,
            READ_AHEAD_CHUNK - 1,
            READ_AHEAD_CHUNK,
            READ_AHEAD_CHUNK + 1,
            7 * READ_AHEAD_CHUNK / 2,
        ] {
            let data = crate::testutil::noise(len);
            for fail in [false, true] {
                let src = Uneven {
                    data: data.clone(),
                    at: 0,
                    fail_at_end: fail,
                };
                let mut r = ReadAhead::spawn(Box::new(src), READ_AHEAD_CHUNK);
                let mut got = Vec::new();
                let mut buf = vec![0; 12_345];
                let end = loop {
                    match r.read(&mut buf) {
                        Ok(0) => break Ok(()),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e) => break Err(e),
                    }
                };
                assert!(got == data, "{len} bytes: got {} back", got.len());
                assert_eq!(end.is_err(), fail, "{len} bytes");
                if fail {
                    // Never a clean end after a failure.
                    assert!(r.read(&mut buf).is_err());
                }
            }
        }
    }

    use crate::repo::crypt::tests::{
        Chunks, LENGTHS, crafted, payload_offset, sample, scrypt_opener, scrypt_seal, seal,
        x25519_pair,
    };
    use crate::repo::crypt::{CHUNK, TAG};

    /// A sealed file through the stages as `open_file` runs them (source in uneven reads,
    /// header, read-ahead in `stage`-byte buffers, decryption in place), read the way zstd
    /// reads: `fill_buf` and `consume` in pieces.
    fn staged(opener: &SetOpener, sealed: &[u8], stage: usize) -> io::Result<Vec<u8>> {
        let mut src = Uneven {
            data: sealed.to_vec(),
            at: 0,
            fail_at_end: false,
        };
        let payload = opener.open_header(&mut src)?;
        let mut r = Opened::spawn(ReadAhead::spawn(Box::new(src), stage), payload);
        let mut out = Vec::new();
        loop {
            let got = r.fill_buf()?;
            if got.is_empty() {
                break;
            }
            let n = got.len().min(40_000);
            out.extend_from_slice(&got[..n]);
            r.consume(n);
        }
        // The end stays the end.
        assert!(r.fill_buf()?.is_empty());
        Ok(out)
    }

    /// Buffers of one chunk, two, and the production size.
    const STAGES: [usize; 3] = [SEALED_CHUNK, 2 * SEALED_CHUNK, OPEN_AHEAD_CHUNK];

    #[test]
    fn staged_decryption_matches_the_crate() {
        let (opener, sealer, identity) = x25519_pair();
        let (s_opener, s_identity) = scrypt_opener("pw");
        for len in LENGTHS {
            let data = sample(len);
            let sealed = seal(&sealer, &data);
            let mut theirs = Vec::new();
            age::Decryptor::new(&sealed[..])
                .unwrap()
                .decrypt(std::iter::once(identity.as_ref() as &dyn age::Identity))
                .unwrap()
                .read_to_end(&mut theirs)
                .unwrap();
            assert!(theirs == data);
            for stage in STAGES {
                let ours = staged(&opener, &sealed, stage).unwrap();
                assert!(ours == theirs, "{len} bytes in {stage}-byte stages");
            }
            if len == 65536 || len == 131073 {
                let sealed = scrypt_seal("pw", &data);
                let mut theirs = Vec::new();
                age::Decryptor::new(&sealed[..])
                    .unwrap()
                    .decrypt(std::iter::once(s_identity.as_ref() as &dyn age::Identity))
                    .unwrap()
                    .read_to_end(&mut theirs)
                    .unwrap();
                for stage in STAGES {
                    assert!(staged(&s_opener, &sealed, stage).unwrap() == theirs);
                }
            }
        }
    }

    #[test]
    fn staged_decryption_fails_cleanly_on_damage() {
        let (opener, sealer, _) = x25519_pair();
        let data = sample(3 * CHUNK + 7);
        let sealed = seal(&sealer, &data);
        let at = payload_offset(&sealed);
        let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
        for chunk in 0..4 {
            let mut v = sealed.clone();
            let i = (at + chunk * SEALED_CHUNK + 3).min(sealed.len() - 1);
            v[i] ^= 0x80;
            bad.push((format!("bit flipped in chunk {chunk}"), v));
        }
        for keep in [
            0,
            1,
            TAG,
            SEALED_CHUNK,
            2 * SEALED_CHUNK,
            3 * SEALED_CHUNK,
            3 * SEALED_CHUNK + TAG,
        ] {
            bad.push((
                format!("payload cut to {keep}"),
                sealed[..at + keep].to_vec(),
            ));
        }
        for extra in [1, SEALED_CHUNK] {
            let mut v = sealed.clone();
            v.extend(sample(extra));
            bad.push((format!("{extra} bytes after the final chunk"), v));
        }
        let full = &data[..CHUNK];
        let cases: Vec<(&str, Chunks)> = vec![
            (
                "final flag on a non-final chunk",
                vec![(0, true, full), (1, false, full), (2, true, b"x")],
            ),
            (
                "a chunk after the final one",
                vec![(0, false, full), (1, true, full), (2, true, b"x")],
            ),
            ("no final chunk", vec![(0, false, full), (1, false, full)]),
            (
                "an empty final chunk after a full one",
                vec![(0, false, full), (1, true, b"")],
            ),
        ];
        for (what, chunks) in cases {
            bad.push((what.into(), crafted(&opener, &sealed, &chunks)));
        }
        for (what, v) in &bad {
            for stage in STAGES {
                assert!(
                    staged(&opener, v, stage).is_err(),
                    "{what}, {stage}-byte stages: no error"
                );
            }
        }
        // A wrong key fails at the header.
        let (other, _, _) = x25519_pair();
        assert!(staged(&other, &sealed, OPEN_AHEAD_CHUNK).is_err());
        // A source that fails after the whole file never ends cleanly.
        let mut src = Uneven {
            data: sealed.clone(),
            at: 0,
            fail_at_end: true,
        };
        let payload = opener.open_header(&mut src).unwrap();
        let mut r = Opened::spawn(ReadAhead::spawn(Box::new(src), SEALED_CHUNK), payload);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert!(r.fill_buf().is_err());
    }
}
