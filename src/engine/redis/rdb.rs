//! The offline RDB reader: streams a Redis snapshot, checks its structure, every value encoding
//! and the CRC64 trailer, and hands each key (with its raw serialized value) to a visitor.
//!
//! Written by hand because no maintained crate both streams (memory bounded by one value, not by
//! the file) and validates the compact encodings (ziplist, listpack, intset, zipmap, stream
//! listpacks) the way the server's deep sanitizer does; parsers on crates.io either load whole
//! files, panic on corrupt input, or stop at Redis 6 encodings.
//!
//! Shallow reads (`decode_values: false`) walk only the record structure and skip string bytes,
//! so they run at disk speed; deep reads also decode LZF and every packed encoding and reject
//! what the server's sanitizer rejects (empty collections, duplicate members, bad counts).
//! Either way every byte goes through the CRC64, and corrupt lengths fail at the end of the data
//! instead of becoming allocations.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::time::{Duration, Instant};

use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use tracing::info;

use crate::error::Error;

/// Set in the target while a restore runs, so an interrupted restore is never taken for data.
pub const MARKER_KEY: &[u8] = b"__dbkeeper:restore-in-progress";

/// The newest RDB format this reader understands: 12, written by Redis 7.4, 8.0, 8.2 and 8.4
/// (hashes with field expiration, cluster slot info). Redis 8.6 writes 13 and 8.8 writes 14
/// (new stream encodings, key metadata): this reader refuses to decode those, and the backup
/// stores them undecoded (see [`classify_header`]).
pub const MAX_VERSION: u32 = 12;

/// What the 9-byte header of an RDB says about this build's ability to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderClass {
    /// A version this reader decodes (1 to [`MAX_VERSION`]).
    Readable(u32),
    /// A well-formed header of a version newer than this build: the server that wrote it
    /// loads it, this build cannot decode its records.
    Newer(u32),
    /// Not an RDB header (too short, no `REDIS`, not 4 digits, version 0).
    NotRdb,
}

/// Classifies an RDB by its header (`REDIS0012`): the version ceiling as a testable function,
/// so a snapshot of a newer server is stored, not refused.
pub fn classify_header(head: &[u8]) -> HeaderClass {
    let version = head
        .get(..9)
        .filter(|h| h.starts_with(b"REDIS") && h[5..].iter().all(u8::is_ascii_digit))
        .and_then(|h| std::str::from_utf8(&h[5..]).ok())
        .and_then(|v| v.parse::<u32>().ok());
    match version {
        None | Some(0) => HeaderClass::NotRdb,
        Some(v) if v > MAX_VERSION => HeaderClass::Newer(v),
        Some(v) => HeaderClass::Readable(v),
    }
}

/// Why an RDB stream was rejected. Messages are one line and carry the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum RdbError {
    #[error("reading the RDB at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("RDB byte {offset}: {msg}")]
    Format { offset: u64, msg: String },
    #[error("RDB checksum mismatch: trailer says {stored:016x}, content hashes to {computed:016x}")]
    Checksum { stored: u64, computed: u64 },
    #[error("RDB byte {offset}: {msg}")]
    Unsupported { offset: u64, msg: String },
    /// An error the visitor returned; passed through unchanged.
    #[error(transparent)]
    Visitor(Error),
}

impl RdbError {
    /// Whether the bytes themselves are bad (as opposed to the reader or the visitor failing).
    pub fn is_corruption(&self) -> bool {
        matches!(self, RdbError::Format { .. } | RdbError::Checksum { .. })
    }

    /// The error a verify or restore of set `set` reports: bad bytes are a corrupt set, an
    /// unsupported encoding is an engine failure, visitor errors pass through.
    pub fn into_set_error(self, set: &str) -> Error {
        match self {
            RdbError::Visitor(e) => e,
            e @ (RdbError::Format { .. } | RdbError::Checksum { .. } | RdbError::Io { .. }) => {
                Error::corrupt(set, e.to_string())
            }
            e @ RdbError::Unsupported { .. } => Error::engine("redis", e.to_string()),
        }
    }
}

impl From<RdbError> for Error {
    fn from(e: RdbError) -> Self {
        match e {
            RdbError::Visitor(e) => e,
            e => Error::engine("redis", e.to_string()),
        }
    }
}

/// One key as it appears in the RDB.
pub struct KeyRecord<'a> {
    pub db: u64,
    pub key: &'a [u8],
    /// Absolute unix time in ms (EXPIRETIME_MS, or EXPIRETIME seconds × 1000).
    pub expire_ms: Option<i64>,
    /// The value exactly as stored in the RDB: type byte + encoded value. Empty unless
    /// [`ParseOptions::capture_payload`] is set.
    pub payload: &'a [u8],
}

pub trait Visitor {
    fn key(&mut self, rec: &KeyRecord<'_>) -> Result<(), Error>;
}

/// A visitor that only lets the parser count keys.
pub struct CountOnly;

impl Visitor for CountOnly {
    fn key(&mut self, _rec: &KeyRecord<'_>) -> Result<(), Error> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdbSummary {
    pub version: u32,
    pub keys_per_db: BTreeMap<u64, u64>,
    /// The `redis-ver` aux field, when the writer recorded one.
    pub redis_ver: Option<String>,
    /// False when the format predates checksums (< 5) or the writer disabled them (all zero).
    pub checksum_verified: bool,
    /// Bytes the RDB took, trailer included: where an AOF's commands start after its preamble.
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Walk every value encoding (deep verify): ziplists, listpacks, intsets, zipmaps, stream
    /// listpacks and LZF strings are decoded and checked; empty collections are rejected.
    pub decode_values: bool,
    /// Fill [`KeyRecord::payload`] (restore). When false the payload is empty.
    pub capture_payload: bool,
}

/// Streams an RDB from `r` (any Read: a socket, a zstd decoder), calling `visitor` per key.
/// Memory is bounded by the largest single value (only when capture_payload or decode needs it),
/// never by file size. Data after the checksum is an error.
pub fn parse<R: Read>(
    r: R,
    opts: &ParseOptions,
    visitor: &mut dyn Visitor,
) -> Result<RdbSummary, Error> {
    read(r, opts, visitor, false).map_err(Error::from)
}

/// Like [`parse`] with the typed error, and `stop_at_end`: return as soon as the RDB ends,
/// leaving whatever follows unread (an AOF with an RDB preamble).
pub fn read<R: Read>(
    r: R,
    opts: &ParseOptions,
    visitor: &mut dyn Visitor,
    stop_at_end: bool,
) -> Result<RdbSummary, RdbError> {
    Parser {
        inp: Input::new(r),
        opts: *opts,
        scratch: Vec::new(),
        unpacked: Vec::new(),
        key: Vec::new(),
    }
    .run(visitor, stop_at_end)
}

/// The DUMP/RESTORE serialization of one value: payload ++ rdb version (u16 LE) ++ CRC64 (LE)
/// of both.
///
/// The server refuses a payload whose version is newer than the RDB version it writes itself
/// ("DUMP payload version or checksum are wrong"), whatever the value's type: a set taken from
/// Redis 7.4+ (version 12) cannot be restored into Redis 7.2 or older this way, and that refusal
/// comes from the target server, not from here.
pub fn dump_payload(payload: &[u8], rdb_version: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.extend_from_slice(payload);
    out.extend_from_slice(&rdb_version.to_le_bytes());
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// dbkeeper's counts key for a db: "db0", "db1"…
pub fn db_key(db: u64) -> String {
    format!("db{db}")
}

/// The RDB trailer's CRC-64 (Jones polynomial, as Redis's `crc64.c`). crc-fast folds it with
/// carry-less multiplication; the table-driven `crc` crate took a tenth of a snapshot's CPU.
const CRC64: CrcAlgorithm = CrcAlgorithm::Crc64Redis;

fn crc64(bytes: &[u8]) -> u64 {
    crc_fast::checksum(CRC64, bytes)
}

const BUF_SIZE: usize = 1 << 20;
/// Reads of declared lengths grow in steps of this much, so a corrupt length costs at most
/// what the stream really holds.
const GROW_STEP: u64 = 1 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

mod op {
    pub const SLOT_INFO: u8 = 0xF4;
    pub const FUNCTION_PRE_GA: u8 = 0xF6;
    pub const FUNCTION2: u8 = 0xF5;
    pub const MODULE_AUX: u8 = 0xF7;
    pub const IDLE: u8 = 0xF8;
    pub const FREQ: u8 = 0xF9;
    pub const AUX: u8 = 0xFA;
    pub const RESIZEDB: u8 = 0xFB;
    pub const EXPIRETIME_MS: u8 = 0xFC;
    pub const EXPIRETIME: u8 = 0xFD;
    pub const SELECTDB: u8 = 0xFE;
    pub const EOF: u8 = 0xFF;
}

mod ty {
    pub const STRING: u8 = 0;
    pub const LIST: u8 = 1;
    pub const SET: u8 = 2;
    pub const ZSET: u8 = 3;
    pub const HASH: u8 = 4;
    pub const ZSET_2: u8 = 5;
    pub const MODULE_PRE_GA: u8 = 6;
    pub const MODULE_2: u8 = 7;
    pub const HASH_ZIPMAP: u8 = 9;
    pub const LIST_ZIPLIST: u8 = 10;
    pub const SET_INTSET: u8 = 11;
    pub const ZSET_ZIPLIST: u8 = 12;
    pub const HASH_ZIPLIST: u8 = 13;
    pub const LIST_QUICKLIST: u8 = 14;
    pub const STREAM_LISTPACKS: u8 = 15;
    pub const HASH_LISTPACK: u8 = 16;
    pub const ZSET_LISTPACK: u8 = 17;
    pub const LIST_QUICKLIST_2: u8 = 18;
    pub const STREAM_LISTPACKS_2: u8 = 19;
    pub const SET_LISTPACK: u8 = 20;
    pub const STREAM_LISTPACKS_3: u8 = 21;
    pub const HASH_METADATA_PRE_GA: u8 = 22;
    pub const HASH_LISTPACK_EX_PRE_GA: u8 = 23;
    pub const HASH_METADATA: u8 = 24;
    pub const HASH_LISTPACK_EX: u8 = 25;
}

type Res<T> = Result<T, RdbError>;

/// A buffered reader that hashes every byte it hands out and can record what it consumes
/// (the raw value bytes a restore needs).
struct Input<R> {
    r: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// `buf[crc_from..pos]` is consumed but not yet hashed.
    crc_from: usize,
    digest: CrcDigest,
    /// Stream offset of `buf[0]`.
    base: u64,
    capturing: bool,
    captured: Vec<u8>,
    last_progress: Instant,
}

impl<R: Read> Input<R> {
    fn new(r: R) -> Self {
        Input {
            r,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            pos: 0,
            end: 0,
            crc_from: 0,
            digest: CrcDigest::new(CRC64),
            base: 0,
            capturing: false,
            captured: Vec::new(),
            last_progress: Instant::now(),
        }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn err<T>(&self, msg: impl Into<String>) -> Res<T> {
        Err(RdbError::Format {
            offset: self.offset(),
            msg: msg.into(),
        })
    }

    /// Makes at least one unread byte available; false at end of stream.
    fn fill(&mut self) -> Res<bool> {
        if self.pos < self.end {
            return Ok(true);
        }
        self.digest.update(&self.buf[self.crc_from..self.end]);
        self.base += self.end as u64;
        self.pos = 0;
        self.end = 0;
        self.crc_from = 0;
        if self.last_progress.elapsed() >= PROGRESS_EVERY {
            self.last_progress = Instant::now();
            info!(engine = "redis", bytes = self.base, "reading RDB");
        }
        loop {
            match self.r.read(&mut self.buf) {
                Ok(n) => {
                    self.end = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(RdbError::Io {
                        offset: self.base,
                        source,
                    });
                }
            }
        }
    }

    fn need(&mut self) -> Res<()> {
        if self.fill()? {
            Ok(())
        } else {
            self.err("the data ends in the middle of the RDB (truncated?)")
        }
    }

    /// Consumes `n` available bytes.
    fn advance(&mut self, n: usize) {
        if self.capturing {
            self.captured
                .extend_from_slice(&self.buf[self.pos..self.pos + n]);
        }
        self.pos += n;
    }

    fn u8(&mut self) -> Res<u8> {
        self.need()?;
        let b = self.buf[self.pos];
        self.advance(1);
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let mut out = [0u8; N];
        let mut got = 0;
        while got < N {
            self.need()?;
            let k = (N - got).min(self.end - self.pos);
            out[got..got + k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
            self.advance(k);
            got += k;
        }
        Ok(out)
    }

    fn skip(&mut self, mut n: u64) -> Res<()> {
        while n > 0 {
            self.need()?;
            let k = n.min((self.end - self.pos) as u64) as usize;
            self.advance(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// Appends `n` bytes to `out`, growing it only as the bytes actually arrive.
    fn read_into(&mut self, mut n: u64, out: &mut Vec<u8>) -> Res<()> {
        while n > 0 {
            self.need()?;
            let k = n.min((self.end - self.pos) as u64) as usize;
            if out.capacity() - out.len() < k {
                out.reserve(k.max(n.min(GROW_STEP) as usize));
            }
            out.extend_from_slice(&self.buf[self.pos..self.pos + k]);
            self.advance(k);
            n -= k as u64;
        }
        Ok(())
    }

    /// The CRC of everything consumed so far.
    fn crc(&mut self) -> u64 {
        self.digest.update(&self.buf[self.crc_from..self.pos]);
        self.crc_from = self.pos;
        self.digest.finalize()
    }
}

/// How a string is stored: its length header decides whether its bytes can be skipped.
enum StrHead {
    Raw(u64),
    Int(i64),
    Lzf { clen: u64, ulen: u64 },
}

struct Parser<R> {
    inp: Input<R>,
    opts: ParseOptions,
    /// Holds a string value (a ziplist, listpack, compressed bytes) while it is checked.
    scratch: Vec<u8>,
    /// LZF output.
    unpacked: Vec<u8>,
    key: Vec<u8>,
}

impl<R: Read> Parser<R> {
    fn run(mut self, visitor: &mut dyn Visitor, stop_at_end: bool) -> Res<RdbSummary> {
        let started = Instant::now();
        let magic: [u8; 9] = self.inp.array().map_err(|e| match e {
            RdbError::Format { offset, .. } => RdbError::Format {
                offset,
                msg: "too short to be an RDB".into(),
            },
            e => e,
        })?;
        if &magic[..5] != b"REDIS" {
            return Err(RdbError::Format {
                offset: 0,
                msg: "not an RDB: it does not start with \"REDIS\"".into(),
            });
        }
        let version = std::str::from_utf8(&magic[5..])
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| RdbError::Format {
                offset: 5,
                msg: format!(
                    "not an RDB: version field {:?} is not 4 digits",
                    String::from_utf8_lossy(&magic[5..])
                ),
            })?;
        if version == 0 {
            return Err(RdbError::Format {
                offset: 5,
                msg: "RDB version 0 does not exist".into(),
            });
        }
        if version > MAX_VERSION {
            return Err(RdbError::Unsupported {
                offset: 5,
                msg: format!(
                    "RDB version {version} is newer than supported (up to {MAX_VERSION}, Redis 7.4 to 8.4); upgrade dbkeeper"
                ),
            });
        }

        let mut summary = RdbSummary {
            version,
            keys_per_db: BTreeMap::new(),
            redis_ver: None,
            checksum_verified: false,
            bytes: 0,
        };
        let mut db = 0u64;
        let mut expire_ms: Option<i64> = None;
        loop {
            let at = self.inp.offset();
            let t = self.inp.u8()?;
            match t {
                op::EOF => break,
                op::SELECTDB => db = self.len()?,
                op::RESIZEDB => {
                    self.len()?;
                    self.len()?;
                }
                // Cluster mode only: slot id, keys in the slot, keys with an expiry in it.
                op::SLOT_INFO => {
                    let at = self.inp.offset();
                    let slot = self.len()?;
                    self.len()?;
                    self.len()?;
                    if self.opts.decode_values && slot >= CLUSTER_SLOTS {
                        return Err(RdbError::Format {
                            offset: at,
                            msg: format!("slot info for slot {slot}, past the last cluster slot"),
                        });
                    }
                }
                op::EXPIRETIME => {
                    let s = i32::from_le_bytes(self.inp.array()?);
                    expire_ms = Some(i64::from(s) * 1000);
                }
                op::EXPIRETIME_MS => expire_ms = Some(i64::from_le_bytes(self.inp.array()?)),
                op::FREQ => {
                    self.inp.u8()?;
                }
                op::IDLE => {
                    self.len()?;
                }
                op::AUX => {
                    let mut name = Vec::new();
                    self.string(&mut name)?;
                    if name == b"redis-ver" {
                        let mut v = Vec::new();
                        self.string(&mut v)?;
                        summary.redis_ver = Some(String::from_utf8_lossy(&v).into_owned());
                    } else {
                        self.skip_string()?;
                    }
                }
                op::MODULE_AUX => {
                    let id = self.len()?;
                    let when_op = self.len()?;
                    if when_op != MODULE_OP_UINT {
                        return self.inp.err(format!(
                            "module aux data for {}: bad 'when' opcode {when_op}",
                            module_name(id)
                        ));
                    }
                    self.len()?;
                    self.skip_module_value(id)?;
                }
                op::FUNCTION_PRE_GA => {
                    self.skip_string()?; // name
                    self.skip_string()?; // engine
                    if self.len()? != 0 {
                        self.skip_string()?; // description
                    }
                    self.skip_string()?; // code
                }
                op::FUNCTION2 => self.skip_string()?,
                t => {
                    self.key_value(t, at, db, expire_ms.take(), visitor)?;
                    *summary.keys_per_db.entry(db).or_insert(0) += 1;
                }
            }
        }

        if version >= 5 {
            let computed = self.inp.crc();
            let stored = u64::from_le_bytes(self.inp.array()?);
            if stored != 0 {
                if stored != computed {
                    return Err(RdbError::Checksum { stored, computed });
                }
                summary.checksum_verified = true;
            }
        }
        summary.bytes = self.inp.offset();
        if !stop_at_end && self.inp.fill()? {
            return self
                .inp
                .err("unexpected data after the end of the RDB (appended garbage?)");
        }
        info!(
            engine = "redis",
            version,
            keys = summary.keys_per_db.values().sum::<u64>(),
            bytes = self.inp.offset(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            checksum_verified = summary.checksum_verified,
            "RDB read"
        );
        Ok(summary)
    }

    fn key_value(
        &mut self,
        t: u8,
        at: u64,
        db: u64,
        expire_ms: Option<i64>,
        visitor: &mut dyn Visitor,
    ) -> Res<()> {
        if !is_value_type(t) {
            return Err(RdbError::Format {
                offset: at,
                msg: format!("unknown record type {t}"),
            });
        }
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        self.string(&mut key)?;
        let capture = self.opts.capture_payload;
        if capture {
            self.inp.captured.clear();
            self.inp.captured.push(t);
            self.inp.capturing = true;
        }
        let value = self.value(t);
        self.inp.capturing = false;
        value.map_err(|e| match e {
            RdbError::Format { offset, msg } => RdbError::Format {
                offset,
                msg: format!("{msg} (key {}, db {db})", show_key(&key)),
            },
            e => e,
        })?;
        let payload = if capture {
            std::mem::take(&mut self.inp.captured)
        } else {
            Vec::new()
        };
        let rec = KeyRecord {
            db,
            key: &key,
            expire_ms,
            payload: &payload,
        };
        let res = visitor.key(&rec).map_err(RdbError::Visitor);
        self.inp.captured = payload;
        self.key = key;
        res
    }

    fn value(&mut self, t: u8) -> Res<()> {
        let deep = self.opts.decode_values;
        match t {
            ty::STRING => self.skip_string(),
            ty::LIST | ty::SET => {
                let n = self.collection_len()?;
                for _ in 0..n {
                    self.skip_string()?;
                }
                Ok(())
            }
            ty::HASH => {
                let n = self.collection_len()?;
                for _ in 0..n {
                    self.skip_string()?;
                    self.skip_string()?;
                }
                Ok(())
            }
            ty::ZSET => {
                let n = self.collection_len()?;
                for _ in 0..n {
                    self.skip_string()?;
                    self.double_string()?;
                }
                Ok(())
            }
            ty::ZSET_2 => {
                let n = self.collection_len()?;
                for _ in 0..n {
                    self.skip_string()?;
                    let score = f64::from_le_bytes(self.inp.array()?);
                    if deep && score.is_nan() {
                        return self.inp.err("sorted set score is NaN");
                    }
                }
                Ok(())
            }
            ty::HASH_ZIPMAP => self.blob(|b| {
                let n = zipmap(b)?;
                nonempty(n, "zipmap")
            }),
            ty::LIST_ZIPLIST => self.blob(|b| {
                let n = ziplist(b, &mut |_| Ok(()))?;
                nonempty(n, "ziplist")
            }),
            ty::HASH_ZIPLIST => self.blob(|b| keyed(b, ziplist, Keyed::Hash)),
            ty::ZSET_ZIPLIST => self.blob(|b| keyed(b, ziplist, Keyed::Zset)),
            ty::SET_INTSET => self.blob(|b| {
                let n = intset(b)?;
                nonempty(n, "intset")
            }),
            ty::HASH_LISTPACK => self.blob(|b| keyed(b, listpack, Keyed::Hash)),
            ty::HASH_METADATA | ty::HASH_METADATA_PRE_GA => self.hash_with_ttls(t),
            ty::HASH_LISTPACK_EX | ty::HASH_LISTPACK_EX_PRE_GA => {
                if t == ty::HASH_LISTPACK_EX {
                    // The hash's next field expiry; 0 when none. Informational only: the
                    // listpack's TTLs are absolute.
                    self.inp.skip(8)?;
                }
                self.blob(|b| keyed(b, listpack, Keyed::HashEx))
            }
            ty::ZSET_LISTPACK => self.blob(|b| keyed(b, listpack, Keyed::Zset)),
            ty::SET_LISTPACK => self.blob(|b| keyed(b, listpack, Keyed::Set)),
            ty::LIST_QUICKLIST => {
                let nodes = self.len()?;
                let mut total = 0usize;
                for _ in 0..nodes {
                    self.blob(|b| {
                        total += ziplist(b, &mut |_| Ok(()))?;
                        Ok(())
                    })?;
                }
                if deep && total == 0 {
                    return self.inp.err("empty list (a valid RDB never holds one)");
                }
                Ok(())
            }
            ty::LIST_QUICKLIST_2 => {
                let nodes = self.len()?;
                let mut total = 0usize;
                for _ in 0..nodes {
                    match self.len()? {
                        QUICKLIST_NODE_PLAIN => {
                            self.skip_string()?;
                            total += 1;
                        }
                        QUICKLIST_NODE_PACKED => self.blob(|b| {
                            total += listpack(b, &mut |_| Ok(()))?;
                            Ok(())
                        })?,
                        c => {
                            return self
                                .inp
                                .err(format!("unknown quicklist node container {c}"));
                        }
                    }
                }
                if deep && total == 0 {
                    return self.inp.err("empty list (a valid RDB never holds one)");
                }
                Ok(())
            }
            ty::STREAM_LISTPACKS | ty::STREAM_LISTPACKS_2 | ty::STREAM_LISTPACKS_3 => {
                self.stream(t)
            }
            ty::MODULE_2 | ty::MODULE_PRE_GA => {
                let at = self.inp.offset();
                let id = self.len()?;
                Err(RdbError::Unsupported {
                    offset: at,
                    msg: format!(
                        "value of module type {} (module id {id:#x}): module data cannot be checked without the module",
                        module_name(id)
                    ),
                })
            }
            t => self.inp.err(format!("unknown value type {t}")),
        }
    }

    /// A table-encoded hash with field expiration: [minExpire (GA only)] count, then per field
    /// TTL, field, value. A TTL of 0 means none; in the GA format the others are offsets from
    /// minExpire plus one, in the pre-GA format (7.4 release candidates) absolute times.
    fn hash_with_ttls(&mut self, t: u8) -> Res<()> {
        let deep = self.opts.decode_values;
        let min_expire = if t == ty::HASH_METADATA {
            let v = u64::from_le_bytes(self.inp.array()?);
            if deep && v > EXPIRE_TIME_INVALID {
                return self.inp.err(format!(
                    "hash with field TTLs: minimum expiry {v} is out of range"
                ));
            }
            v
        } else {
            0
        };
        let n = self.collection_len()?;
        for _ in 0..n {
            let ttl = self.len()?;
            let expire_at = match (ttl, t) {
                (0, _) => 0,
                (ttl, ty::HASH_METADATA) => ttl.wrapping_add(min_expire).wrapping_sub(1),
                (ttl, _) => ttl,
            };
            if deep && expire_at > EXPIRE_TIME_MAX {
                return self
                    .inp
                    .err(format!("hash field expiry {expire_at} is out of range"));
            }
            self.skip_string()?; // field
            self.skip_string()?; // value
        }
        Ok(())
    }

    fn stream(&mut self, t: u8) -> Res<()> {
        let deep = self.opts.decode_values;
        let nodes = self.len()?;
        let mut node_key = Vec::new();
        for _ in 0..nodes {
            node_key.clear();
            self.string(&mut node_key)?;
            if node_key.len() != 16 {
                return self.inp.err(format!(
                    "stream node key is {} bytes, not a 16-byte stream ID",
                    node_key.len()
                ));
            }
            self.blob(|b| {
                if listpack(b, &mut |_| Ok(()))? == 0 {
                    return Err("empty listpack inside a stream".into());
                }
                stream_listpack(b)
            })?;
        }
        let length = self.len()?;
        self.len()?; // last id ms
        self.len()?; // last id seq
        if t >= ty::STREAM_LISTPACKS_2 {
            for _ in 0..5 {
                // first id, max deleted id, entries added
                self.len()?;
            }
        }
        if deep && length > 0 && nodes == 0 {
            return self
                .inp
                .err("stream length inconsistent with its listpacks");
        }
        let groups = self.len()?;
        for _ in 0..groups {
            self.skip_string()?; // name
            self.len()?; // last id ms
            self.len()?; // last id seq
            if t >= ty::STREAM_LISTPACKS_2 {
                self.len()?; // entries read
            }
            let pel = self.len()?;
            for _ in 0..pel {
                self.inp.skip(16 + 8)?; // raw id, delivery time
                self.len()?; // delivery count
            }
            let consumers = self.len()?;
            for _ in 0..consumers {
                self.skip_string()?; // name
                self.inp.skip(8)?; // seen time
                if t >= ty::STREAM_LISTPACKS_3 {
                    self.inp.skip(8)?; // active time
                }
                let own = self.len()?;
                if deep && own > pel {
                    return self.inp.err(format!(
                        "stream consumer owns {own} pending entries, its group has only {pel}"
                    ));
                }
                self.inp.skip(own.saturating_mul(16))?;
            }
        }
        Ok(())
    }

    /// A length that must be a plain count.
    fn len(&mut self) -> Res<u64> {
        match self.head()? {
            StrHead::Raw(n) => Ok(n),
            _ => self.inp.err("expected a length, found an encoded value"),
        }
    }

    /// A collection's element count; empty ones never occur in a valid RDB.
    fn collection_len(&mut self) -> Res<u64> {
        let n = self.len()?;
        if n == 0 && self.opts.decode_values {
            return self
                .inp
                .err("empty collection (a valid RDB never holds one)");
        }
        Ok(n)
    }

    fn head(&mut self) -> Res<StrHead> {
        let b = self.inp.u8()?;
        Ok(match b >> 6 {
            0 => StrHead::Raw(u64::from(b & 0x3F)),
            1 => StrHead::Raw((u64::from(b & 0x3F) << 8) | u64::from(self.inp.u8()?)),
            2 => match b {
                0x80 => StrHead::Raw(u64::from(u32::from_be_bytes(self.inp.array()?))),
                0x81 => StrHead::Raw(u64::from_be_bytes(self.inp.array()?)),
                _ => return self.inp.err(format!("unknown length encoding {b:#04x}")),
            },
            _ => match b & 0x3F {
                0 => StrHead::Int(i64::from(self.inp.u8()? as i8)),
                1 => StrHead::Int(i64::from(i16::from_le_bytes(self.inp.array()?))),
                2 => StrHead::Int(i64::from(i32::from_le_bytes(self.inp.array()?))),
                3 => {
                    let clen = self.len()?;
                    let ulen = self.len()?;
                    // LZF expands at most ~88× (a 3-byte back reference yields 264 bytes): a
                    // larger claim is corrupt, and must not become a huge allocation.
                    if clen == 0 || ulen > clen.saturating_mul(90) {
                        return self.inp.err(format!(
                            "implausible LZF lengths: {clen} compressed, {ulen} uncompressed"
                        ));
                    }
                    StrHead::Lzf { clen, ulen }
                }
                e => return self.inp.err(format!("unknown string encoding {e}")),
            },
        })
    }

    /// Reads a whole string, decoded (integers as decimal, LZF uncompressed), into `out`.
    fn string(&mut self, out: &mut Vec<u8>) -> Res<()> {
        out.clear();
        match self.head()? {
            StrHead::Raw(n) => self.inp.read_into(n, out),
            StrHead::Int(v) => {
                out.extend_from_slice(v.to_string().as_bytes());
                Ok(())
            }
            StrHead::Lzf { clen, ulen } => {
                let mut packed = std::mem::take(&mut self.unpacked);
                packed.clear();
                let res = self.inp.read_into(clen, &mut packed).and_then(|_| {
                    let at = self.inp.offset();
                    unlzf(&packed, ulen, out).map_err(|msg| RdbError::Format { offset: at, msg })
                });
                self.unpacked = packed;
                res
            }
        }
    }

    /// Passes over a string; LZF content is decompressed (and so checked) in deep mode only.
    fn skip_string(&mut self) -> Res<()> {
        match self.head()? {
            StrHead::Raw(n) => self.inp.skip(n),
            StrHead::Int(_) => Ok(()),
            StrHead::Lzf { clen, ulen } => {
                if !self.opts.decode_values {
                    return self.inp.skip(clen);
                }
                let mut packed = std::mem::take(&mut self.scratch);
                let mut out = std::mem::take(&mut self.unpacked);
                packed.clear();
                let res = self.inp.read_into(clen, &mut packed).and_then(|_| {
                    let at = self.inp.offset();
                    unlzf(&packed, ulen, &mut out)
                        .map_err(|msg| RdbError::Format { offset: at, msg })
                });
                self.scratch = packed;
                self.unpacked = out;
                res
            }
        }
    }

    /// A string holding an encoded structure: checked by `check` in deep mode, skipped
    /// otherwise.
    fn blob(&mut self, check: impl FnOnce(&[u8]) -> Result<(), String>) -> Res<()> {
        if !self.opts.decode_values {
            return self.skip_string();
        }
        let start = self.inp.offset();
        let mut b = std::mem::take(&mut self.scratch);
        let res = self
            .string(&mut b)
            .and_then(|_| check(&b).map_err(|msg| RdbError::Format { offset: start, msg }));
        self.scratch = b;
        // One huge value should not pin its buffer for the rest of the file.
        if self.scratch.capacity() > 64 << 20 {
            self.scratch = Vec::new();
        }
        res
    }

    /// A zset (type 3) score: length byte, or 253/254/255 for nan/+inf/-inf.
    fn double_string(&mut self) -> Res<()> {
        let n = self.inp.u8()?;
        match n {
            253 if self.opts.decode_values => self.inp.err("sorted set score is NaN"),
            253..=255 => Ok(()),
            n if self.opts.decode_values => {
                let b: Vec<u8> = {
                    let mut v = Vec::with_capacity(usize::from(n));
                    self.inp.read_into(u64::from(n), &mut v)?;
                    v
                };
                match std::str::from_utf8(&b)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                {
                    Some(_) => Ok(()),
                    None => self.inp.err(format!(
                        "sorted set score {:?} is not a number",
                        String::from_utf8_lossy(&b)
                    )),
                }
            }
            n => self.inp.skip(u64::from(n)),
        }
    }

    /// Module data in the self-describing v2 format, up to its EOF opcode.
    fn skip_module_value(&mut self, id: u64) -> Res<()> {
        loop {
            match self.len()? {
                MODULE_OP_EOF => return Ok(()),
                MODULE_OP_SINT | MODULE_OP_UINT => {
                    self.len()?;
                }
                MODULE_OP_FLOAT => self.inp.skip(4)?,
                MODULE_OP_DOUBLE => self.inp.skip(8)?,
                MODULE_OP_STRING => self.skip_string()?,
                o => {
                    return self.inp.err(format!(
                        "module data for {}: unknown opcode {o}",
                        module_name(id)
                    ));
                }
            }
        }
    }
}

const MODULE_OP_EOF: u64 = 0;
const MODULE_OP_SINT: u64 = 1;
const MODULE_OP_UINT: u64 = 2;
const MODULE_OP_FLOAT: u64 = 3;
const MODULE_OP_DOUBLE: u64 = 4;
const MODULE_OP_STRING: u64 = 5;
/// Field expiry times are 48-bit milliseconds; one past the largest means "none".
const EXPIRE_TIME_MAX: u64 = (1 << 48) - 1;
const EXPIRE_TIME_INVALID: u64 = EXPIRE_TIME_MAX + 1;
const CLUSTER_SLOTS: u64 = 16384;
const QUICKLIST_NODE_PLAIN: u64 = 1;
const QUICKLIST_NODE_PACKED: u64 = 2;

fn is_value_type(t: u8) -> bool {
    t <= ty::HASH_LISTPACK_EX && t != 8
}

/// A module type id packs a 9-character name (6 bits each) and a 10-bit encoding version.
fn module_name(id: u64) -> String {
    const SET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let name: String = (0..9)
        .map(|j| SET[((id >> (64 - 6 * (j + 1))) & 63) as usize] as char)
        .collect();
    format!("'{name}' v{}", id & 1023)
}

fn show_key(key: &[u8]) -> String {
    let shown: String = String::from_utf8_lossy(&key[..key.len().min(64)]).into_owned();
    if key.len() > 64 {
        format!("{shown:?}…")
    } else {
        format!("{shown:?}")
    }
}

fn unlzf(packed: &[u8], ulen: u64, out: &mut Vec<u8>) -> Result<(), String> {
    let v = lzf::decompress(packed, ulen as usize)
        .map_err(|e| format!("LZF-compressed string does not decompress: {e}"))?;
    if v.len() as u64 != ulen {
        return Err(format!(
            "LZF-compressed string decompresses to {} bytes, header says {ulen}",
            v.len()
        ));
    }
    *out = v;
    Ok(())
}

fn nonempty(n: usize, what: &str) -> Result<(), String> {
    if n == 0 {
        Err(format!("empty {what} (a valid RDB never holds one)"))
    } else {
        Ok(())
    }
}

fn pairs(n: usize, what: &str) -> Result<(), String> {
    nonempty(n, what)?;
    if !n.is_multiple_of(2) {
        return Err(format!(
            "{what} of field/value pairs has an odd entry count {n}"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keyed {
    Hash,
    Zset,
    Set,
    /// A hash with field expiration: field, value, TTL triplets.
    HashEx,
}

type Walker = for<'b> fn(&'b [u8], &mut ElemFn<'_, 'b>) -> Result<usize, String>;

/// A hash, sorted set or set packed in a ziplist/listpack: besides the container itself, the
/// server's deep sanitizer rejects duplicate fields/members, odd pair counts and bad scores;
/// for hashes with field expiration also TTLs that are not integers, out of range or out of
/// order (fields with a TTL come first, earliest first; TTL 0, none, after them).
fn keyed(b: &[u8], walk: Walker, kind: Keyed) -> Result<(), String> {
    let (what, tuple) = match kind {
        Keyed::Hash => ("hash", 2),
        Keyed::Zset => ("sorted set", 2),
        Keyed::Set => ("set", 1),
        Keyed::HashEx => ("hash", 3),
    };
    // Sorting beats hashing here: packed collections are small (the server converts them to
    // real tables past a few hundred entries) and this keeps deep verify near disk speed.
    let mut names: Vec<Elem<'_>> = Vec::new();
    let mut i = 0usize;
    let mut last_ttl: i64 = -1;
    let n = walk(b, &mut |e| {
        let pos = i % tuple;
        i += 1;
        if pos == 0 {
            names.push(e);
        } else if pos == 2 {
            let ttl = e
                .int()
                .ok_or("hash field TTL in a packed hash is not an integer")?;
            if !(0..=EXPIRE_TIME_MAX as i64).contains(&ttl) {
                return Err(format!(
                    "hash field TTL {ttl} in a packed hash is out of range"
                ));
            }
            if ttl != 0 && (last_ttl == 0 || ttl < last_ttl) {
                return Err("hash field TTLs in a packed hash are out of order".into());
            }
            last_ttl = ttl;
        } else if kind == Keyed::Zset {
            let ok = match e {
                Elem::Int(_) => true,
                Elem::Str(s) => std::str::from_utf8(s)
                    .ok()
                    .and_then(|s| s.parse::<f64>().ok())
                    .is_some_and(|v| !v.is_nan()),
            };
            if !ok {
                return Err("sorted set score is not a number".into());
            }
        }
        Ok(())
    })?;
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("duplicate {what} member in a packed {what}"));
    }
    match kind {
        Keyed::Set => nonempty(n, what),
        Keyed::Hash | Keyed::Zset => pairs(n, what),
        Keyed::HashEx => {
            nonempty(n, what)?;
            if !n.is_multiple_of(3) {
                return Err(format!(
                    "hash of field/value/TTL triplets has {n} entries, not a multiple of 3"
                ));
            }
            Ok(())
        }
    }
}

/// One element of a ziplist or listpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Elem<'a> {
    Int(i64),
    Str(&'a [u8]),
}

impl Elem<'_> {
    /// Integers may also be stored as strings (listpacks store what did not fit an int encoding).
    fn int(&self) -> Option<i64> {
        match *self {
            Elem::Int(v) => Some(v),
            Elem::Str(s) => std::str::from_utf8(s).ok()?.parse().ok(),
        }
    }
}

type ElemFn<'f, 'b> = dyn FnMut(Elem<'b>) -> Result<(), String> + 'f;

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_int(b: &[u8]) -> i64 {
    let mut v = [0u8; 8];
    v[..b.len()].copy_from_slice(b);
    let shift = 64 - 8 * b.len() as u32;
    (i64::from_le_bytes(v) << shift) >> shift
}

/// Walks a ziplist the way the server's deep sanitizer does: header sizes, each entry's
/// prevlen against the previous entry, the tail offset, the count and the end marker.
/// Returns the entry count.
fn ziplist<'b>(b: &'b [u8], f: &mut ElemFn<'_, 'b>) -> Result<usize, String> {
    const HEADER: usize = 10;
    if b.len() < HEADER + 1 {
        return Err(format!(
            "ziplist of {} bytes is shorter than its header",
            b.len()
        ));
    }
    let zlbytes = le_u32(b, 0) as usize;
    let zltail = le_u32(b, 4) as usize;
    let zllen = u16::from_le_bytes([b[8], b[9]]);
    if zlbytes != b.len() {
        return Err(format!(
            "ziplist header says {zlbytes} bytes, it has {}",
            b.len()
        ));
    }
    let end = b.len() - 1;
    if b[end] != 0xFF {
        return Err("ziplist does not end with its 0xFF marker".into());
    }
    let mut p = HEADER;
    let mut prev_len = 0usize;
    let mut last = HEADER;
    let mut count = 0usize;
    while p < end {
        let start = p;
        let (prevlen, hl) = if b[p] < 254 {
            (usize::from(b[p]), 1)
        } else if b[p] == 254 {
            if p + 5 > end {
                return Err(format!("ziplist entry at {p} runs past the end"));
            }
            (le_u32(b, p + 1) as usize, 5)
        } else {
            return Err(format!("ziplist end marker at {p} before the end"));
        };
        if prevlen != prev_len {
            return Err(format!(
                "ziplist entry at {p} says the previous entry is {prevlen} bytes, it is {prev_len}"
            ));
        }
        p += hl;
        if p >= end {
            return Err(format!("ziplist entry at {start} runs past the end"));
        }
        let enc = b[p];
        let need = |p: usize, n: usize| -> Result<(), String> {
            if p + n > end {
                Err(format!("ziplist entry at {start} runs past the end"))
            } else {
                Ok(())
            }
        };
        let elem_end;
        let elem = match enc >> 6 {
            0 => {
                let n = usize::from(enc & 0x3F);
                need(p + 1, n)?;
                elem_end = p + 1 + n;
                Elem::Str(&b[p + 1..elem_end])
            }
            1 => {
                need(p + 1, 1)?;
                let n = (usize::from(enc & 0x3F) << 8) | usize::from(b[p + 1]);
                need(p + 2, n)?;
                elem_end = p + 2 + n;
                Elem::Str(&b[p + 2..elem_end])
            }
            2 => {
                need(p + 1, 4)?;
                let n = u32::from_be_bytes([b[p + 1], b[p + 2], b[p + 3], b[p + 4]]) as usize;
                need(p + 5, n)?;
                elem_end = p + 5 + n;
                Elem::Str(&b[p + 5..elem_end])
            }
            _ => {
                let n = match enc {
                    0xC0 => 2,
                    0xD0 => 4,
                    0xE0 => 8,
                    0xF0 => 3,
                    0xFE => 1,
                    0xF1..=0xFD => 0,
                    _ => return Err(format!("ziplist entry at {start}: bad encoding {enc:#04x}")),
                };
                need(p + 1, n)?;
                elem_end = p + 1 + n;
                if n == 0 {
                    Elem::Int(i64::from(enc & 0x0F) - 1)
                } else {
                    Elem::Int(le_int(&b[p + 1..elem_end]))
                }
            }
        };
        f(elem)?;
        last = start;
        prev_len = elem_end - start;
        p = elem_end;
        count += 1;
    }
    if zltail != last {
        return Err(format!(
            "ziplist tail offset {zltail} does not point at its last entry ({last})"
        ));
    }
    if zllen != u16::MAX && usize::from(zllen) != count {
        return Err(format!(
            "ziplist header counts {zllen} entries, it holds {count}"
        ));
    }
    Ok(count)
}

fn backlen_size(l: usize) -> usize {
    match l {
        0..=127 => 1,
        128..16383 => 2,
        16383..2097151 => 3,
        2097151..268435455 => 4,
        _ => 5,
    }
}

/// Walks a listpack: total size, each entry's encoding, length and back-length, the count and
/// the end marker. Returns the element count.
fn listpack<'b>(b: &'b [u8], f: &mut ElemFn<'_, 'b>) -> Result<usize, String> {
    const HEADER: usize = 6;
    if b.len() < HEADER + 1 {
        return Err(format!(
            "listpack of {} bytes is shorter than its header",
            b.len()
        ));
    }
    let total = le_u32(b, 0) as usize;
    let declared = u16::from_le_bytes([b[4], b[5]]);
    if total != b.len() {
        return Err(format!(
            "listpack header says {total} bytes, it has {}",
            b.len()
        ));
    }
    let end = b.len() - 1;
    if b[end] != 0xFF {
        return Err("listpack does not end with its 0xFF marker".into());
    }
    let mut p = HEADER;
    let mut count = 0usize;
    while p < end {
        let start = p;
        let enc = b[p];
        let need = |n: usize| -> Result<(), String> {
            if start + n > end {
                Err(format!("listpack entry at {start} runs past the end"))
            } else {
                Ok(())
            }
        };
        let (elem, l) = if enc & 0x80 == 0 {
            (Elem::Int(i64::from(enc & 0x7F)), 1)
        } else if enc & 0xC0 == 0x80 {
            let n = usize::from(enc & 0x3F);
            need(1 + n)?;
            (Elem::Str(&b[p + 1..p + 1 + n]), 1 + n)
        } else if enc & 0xE0 == 0xC0 {
            need(2)?;
            let v = (i64::from(enc & 0x1F) << 8) | i64::from(b[p + 1]);
            (Elem::Int(if v >= 1 << 12 { v - (1 << 13) } else { v }), 2)
        } else if enc & 0xF0 == 0xE0 {
            need(2)?;
            let n = (usize::from(enc & 0x0F) << 8) | usize::from(b[p + 1]);
            need(2 + n)?;
            (Elem::Str(&b[p + 2..p + 2 + n]), 2 + n)
        } else {
            match enc {
                0xF0 => {
                    need(5)?;
                    let n = le_u32(b, p + 1) as usize;
                    need(5usize.saturating_add(n))?;
                    (Elem::Str(&b[p + 5..p + 5 + n]), 5 + n)
                }
                0xF1..=0xF4 => {
                    let n = [2, 3, 4, 8][usize::from(enc - 0xF1)];
                    need(1 + n)?;
                    (Elem::Int(le_int(&b[p + 1..p + 1 + n])), 1 + n)
                }
                0xFF => return Err(format!("listpack end marker at {p} before the end")),
                _ => return Err(format!("listpack entry at {p}: bad encoding {enc:#04x}")),
            }
        };
        let bl = backlen_size(l);
        need(l + bl)?;
        let mut expect = [0u8; 5];
        for (i, slot) in expect[..bl].iter_mut().enumerate() {
            // Big-endian 7-bit groups; all but the first carry the continuation bit.
            let shift = 7 * (bl - 1 - i);
            *slot = ((l >> shift) & 0x7F) as u8 | if i > 0 { 0x80 } else { 0 };
        }
        if b[p + l..p + l + bl] != expect[..bl] {
            return Err(format!(
                "listpack entry at {start}: back-length does not match its size {l}"
            ));
        }
        f(elem)?;
        p += l + bl;
        count += 1;
    }
    if declared != u16::MAX && usize::from(declared) != count {
        return Err(format!(
            "listpack header counts {declared} entries, it holds {count}"
        ));
    }
    Ok(count)
}

/// An intset: element width, count, and strictly ascending members. Returns the count.
fn intset(b: &[u8]) -> Result<usize, String> {
    if b.len() < 8 {
        return Err(format!(
            "intset of {} bytes is shorter than its header",
            b.len()
        ));
    }
    let width = le_u32(b, 0) as usize;
    let n = le_u32(b, 4) as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err(format!("intset with bad element width {width}"));
    }
    if (b.len() - 8) as u64 != width as u64 * n as u64 {
        return Err(format!(
            "intset of {n} {width}-byte members should be {} bytes, it is {}",
            8 + width as u64 * n as u64,
            b.len()
        ));
    }
    let mut prev = None;
    for m in b[8..].chunks_exact(width) {
        let v = le_int(m);
        if prev.is_some_and(|p| p >= v) {
            return Err("intset members are not strictly ascending".into());
        }
        prev = Some(v);
    }
    Ok(n)
}

/// A zipmap (hashes before Redis 2.6). Returns the number of field/value pairs.
fn zipmap(b: &[u8]) -> Result<usize, String> {
    if b.len() < 2 {
        return Err(format!("zipmap of {} bytes is too short", b.len()));
    }
    let declared = b[0];
    let end = b.len() - 1;
    let mut p = 1;
    let mut pairs = 0usize;
    let len_at = |p: usize| -> Result<(usize, usize), String> {
        match b.get(p) {
            Some(&n) if n < 254 => Ok((usize::from(n), 1)),
            Some(254) if p + 5 <= end => Ok((le_u32(b, p + 1) as usize, 5)),
            _ => Err(format!("zipmap entry at {p} runs past the end")),
        }
    };
    while p < end && b[p] != 0xFF {
        let (klen, h) = len_at(p)?;
        p = p.saturating_add(h).saturating_add(klen);
        if p >= end {
            return Err("zipmap field runs past the end".into());
        }
        let (vlen, h) = len_at(p)?;
        p += h;
        let free = usize::from(*b.get(p).ok_or("zipmap value runs past the end")?);
        p = p
            .saturating_add(1)
            .saturating_add(vlen)
            .saturating_add(free);
        if p > end {
            return Err("zipmap value runs past the end".into());
        }
        pairs += 1;
    }
    if p != end || b[end] != 0xFF {
        return Err("zipmap does not end with its 0xFF marker".into());
    }
    if declared < 254 && usize::from(declared) != pairs {
        return Err(format!(
            "zipmap header counts {declared} pairs, it holds {pairs}"
        ));
    }
    Ok(pairs)
}

/// The entries of a stream node listpack: master entry (count, deleted, fields, 0), then per
/// entry flags, id deltas, fields (unless SAMEFIELDS), values and the back-count.
fn stream_listpack(b: &[u8]) -> Result<(), String> {
    let mut elems: Vec<Elem<'_>> = Vec::new();
    listpack(b, &mut |e| {
        elems.push(e);
        Ok(())
    })?;
    let mut cur = Cursor {
        elems: &elems,
        at: 0,
    };
    // Counts are bounded by the element count, so a corrupt one cannot make the loop spin.
    let plausible = 0..=elems.len() as i64;
    let count = cur.int("entry count")?;
    let deleted = cur.int("deleted count")?;
    let master_fields = cur.int("master field count")?;
    for v in [count, deleted, master_fields] {
        if !plausible.contains(&v) {
            return Err(format!(
                "stream listpack: implausible master entry count {v}"
            ));
        }
    }
    cur.any(master_fields, "master fields")?;
    if cur.int("master terminator")? != 0 {
        return Err("stream listpack: master entry terminator is not 0".into());
    }
    for _ in 0..count + deleted {
        let flags = cur.int("entry flags")?;
        cur.int("entry id")?;
        cur.int("entry id")?;
        let (fields, extra) = if flags & STREAM_ITEM_FLAG_SAMEFIELDS != 0 {
            (master_fields, 3)
        } else {
            let n = cur.int("field count")?;
            if !plausible.contains(&n) {
                return Err(format!("stream listpack: implausible field count {n}"));
            }
            cur.any(n, "fields")?;
            (n, n + 4)
        };
        cur.any(fields, "values")?;
        if cur.int("entry back-count")? != fields + extra {
            return Err("stream listpack: entry back-count does not match its fields".into());
        }
    }
    if cur.at != elems.len() {
        return Err("stream listpack: more entries than its master entry counts".into());
    }
    Ok(())
}

const STREAM_ITEM_FLAG_SAMEFIELDS: i64 = 2;

struct Cursor<'e, 'b> {
    elems: &'e [Elem<'b>],
    at: usize,
}

impl Cursor<'_, '_> {
    fn next(&mut self, what: &str) -> Result<Elem<'_>, String> {
        let e = *self
            .elems
            .get(self.at)
            .ok_or_else(|| format!("stream listpack: ends before its {what}"))?;
        self.at += 1;
        Ok(e)
    }

    fn int(&mut self, what: &str) -> Result<i64, String> {
        self.next(what)?
            .int()
            .ok_or_else(|| format!("stream listpack: {what} is not an integer"))
    }

    fn any(&mut self, n: i64, what: &str) -> Result<(), String> {
        for _ in 0..n {
            self.next(what)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use super::*;

    const DEEP: ParseOptions = ParseOptions {
        decode_values: true,
        capture_payload: false,
    };
    const SHALLOW: ParseOptions = ParseOptions {
        decode_values: false,
        capture_payload: false,
    };
    const CAPTURE: ParseOptions = ParseOptions {
        decode_values: true,
        capture_payload: true,
    };

    fn fixtures() -> Option<PathBuf> {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/redis-rdb"
        ));
        if dir.is_dir() {
            Some(dir.to_owned())
        } else {
            eprintln!(
                "skipped: {} is absent (the shared Redis fixtures are not checked out)",
                dir.display()
            );
            None
        }
    }

    fn counts(bytes: &[u8], opts: ParseOptions) -> Result<RdbSummary, RdbError> {
        read(bytes, &opts, &mut CountOnly, false)
    }

    /// (db, key, expiry, payload) per key.
    type Seen = (u64, Vec<u8>, Option<i64>, Vec<u8>);

    #[derive(Default)]
    struct Collect(Vec<Seen>);

    impl Visitor for Collect {
        fn key(&mut self, rec: &KeyRecord<'_>) -> Result<(), Error> {
            self.0.push((
                rec.db,
                rec.key.to_vec(),
                rec.expire_ms,
                rec.payload.to_vec(),
            ));
            Ok(())
        }
    }

    #[test]
    fn fixtures_count_what_the_server_loads() {
        let Some(dir) = fixtures() else { return };
        // As the fixtures README's table gives them (what redis-server 7.0 loads).
        for (file, db0) in [
            ("encodings.rdb", 13),
            ("hash-zipmap.rdb", 1),
            ("hash-ziplist.rdb", 1),
            ("list-quicklist.rdb", 2),
            ("zset-ziplist.rdb", 1),
            ("scriptbackup.rdb", 0),
        ] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            for opts in [DEEP, SHALLOW, CAPTURE] {
                let s = counts(&bytes, opts).unwrap_or_else(|e| panic!("{file}: {e}"));
                let expect: BTreeMap<u64, u64> = if db0 == 0 {
                    BTreeMap::new()
                } else {
                    [(0, db0)].into()
                };
                assert_eq!(s.keys_per_db, expect, "{file} {opts:?}");
            }
        }
    }

    #[test]
    fn fixtures_corrupt_files_are_rejected() {
        let Some(dir) = fixtures() else { return };
        for file in ["corrupt_empty_keys.rdb", "corrupt_ziplist.rdb"] {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let err = counts(&bytes, DEEP).expect_err(file);
            assert!(err.is_corruption(), "{file}: {err}");
            let msg = err.to_string();
            eprintln!("{file}: {msg}");
            assert!(
                !msg.contains('\n') && msg.contains("byte "),
                "{file}: {msg}"
            );
        }
        let bytes = std::fs::read(dir.join("corrupt_empty_keys.rdb")).unwrap();
        let err = counts(&bytes, DEEP).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn aof_preamble_is_read_up_to_the_rdb_end() {
        let Some(dir) = fixtures() else { return };
        let bytes = std::fs::read(dir.join("rdb-preamble.aof")).unwrap();
        let s = read(&bytes[..], &DEEP, &mut CountOnly, true).unwrap();
        assert!(s.version >= 9, "{s:?}");
        // The AOF tail is not RDB: a whole-file parse must say so.
        let err = counts(&bytes, DEEP).unwrap_err().to_string();
        assert!(err.contains("after the end of the RDB"), "{err}");
    }

    #[test]
    fn headers_are_classified_against_the_version_ceiling() {
        use HeaderClass::*;
        assert_eq!(classify_header(b"REDIS0012\xfe\x00"), Readable(12));
        assert_eq!(classify_header(b"REDIS0009"), Readable(9));
        assert_eq!(classify_header(b"REDIS0013"), Newer(13));
        assert_eq!(classify_header(b"REDIS0014\xfa"), Newer(14));
        assert_eq!(classify_header(b"REDIS9999"), Newer(9999));
        for bad in [
            &b"REDIS0000"[..],
            b"REDIS001",
            b"MONGO0013",
            b"REDIS00x3",
            b"",
        ] {
            assert_eq!(classify_header(bad), NotRdb, "{bad:?}");
        }
        assert_eq!(
            MAX_VERSION, 12,
            "update the README's v13 notes with the ceiling"
        );
    }

    #[test]
    fn header_errors_are_clear() {
        let err = counts(b"REDIS0013\xff", DEEP).unwrap_err().to_string();
        assert!(
            err.contains("RDB version 13 is newer than supported"),
            "{err}"
        );
        let err = counts(b"MONGO0009\xff", DEEP).unwrap_err().to_string();
        assert!(err.contains("not an RDB"), "{err}");
        let err = counts(b"RED", DEEP).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let err = counts(b"REDIS00x9\xff", DEEP).unwrap_err().to_string();
        assert!(err.contains("not 4 digits"), "{err}");
        // Version 4 had no checksum: the EOF opcode ends it.
        let s = counts(b"REDIS0004\xfe\x00\x00\x01k\x01v\xff", DEEP).unwrap();
        assert_eq!(s.keys_per_db, [(0, 1)].into());
        assert!(!s.checksum_verified);
    }

    /// A hand-made v9 RDB with a correct checksum around `body`.
    fn rdb9(body: &[u8]) -> Vec<u8> {
        let mut v = b"REDIS0009".to_vec();
        v.extend_from_slice(body);
        v.push(op::EOF);
        let crc = crc64(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    #[test]
    fn module_values_are_unsupported_and_named() {
        // id of module type "dbkeeper1" version 3.
        let name = b"dbkeeper1";
        const SET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut id = 0u64;
        for c in name {
            id = (id << 6) | SET.iter().position(|s| s == c).unwrap() as u64;
        }
        id = (id << 10) | 3;
        let mut body = vec![ty::MODULE_2, 1, b'k', 0x81];
        body.extend_from_slice(&id.to_be_bytes());
        body.push(0);
        let err = counts(&rdb9(&body), SHALLOW).unwrap_err();
        assert!(matches!(err, RdbError::Unsupported { .. }));
        assert!(err.to_string().contains("'dbkeeper1' v3"), "{err}");

        // Module aux data is self-describing and is skipped.
        let mut body = vec![op::MODULE_AUX, 0x81];
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&[2, 2, 2, 7, 5, 2, b'h', b'i', 4]);
        body.extend_from_slice(&1.5f64.to_le_bytes());
        body.extend_from_slice(&[0, ty::STRING, 1, b'k', 1, b'v']);
        let s = counts(&rdb9(&body), DEEP).unwrap();
        assert_eq!(s.keys_per_db, [(0, 1)].into());
    }

    #[test]
    fn functions_lru_lfu_and_expiry_opcodes() {
        let mut body = vec![op::FUNCTION2, 3, b'l', b'u', b'a'];
        body.extend_from_slice(&[
            op::FUNCTION_PRE_GA,
            1,
            b'n',
            3,
            b'L',
            b'U',
            b'A',
            1,
            1,
            b'd',
        ]);
        body.extend_from_slice(&[1, b'c']);
        body.extend_from_slice(&[op::SELECTDB, 2, op::RESIZEDB, 2, 1]);
        body.extend_from_slice(&[op::EXPIRETIME_MS]);
        body.extend_from_slice(&1_700_000_000_123i64.to_le_bytes());
        body.extend_from_slice(&[op::IDLE, 5, ty::STRING, 1, b'a', 0xC0, 7]);
        body.extend_from_slice(&[op::EXPIRETIME]);
        body.extend_from_slice(&1_700_000_000i32.to_le_bytes());
        body.extend_from_slice(&[op::FREQ, 9, ty::STRING, 1, b'b', 1, b'v']);
        body.extend_from_slice(&[ty::STRING, 1, b'c', 1, b'v']);
        let mut seen = Collect::default();
        let s = read(&rdb9(&body)[..], &CAPTURE, &mut seen, false).unwrap();
        assert_eq!(s.keys_per_db, [(2, 3)].into());
        assert!(s.checksum_verified);
        let got: Vec<_> = seen
            .0
            .iter()
            .map(|r| (r.1.clone(), r.2, r.3.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (b"a".to_vec(), Some(1_700_000_000_123), vec![0, 0xC0, 7]),
                (b"b".to_vec(), Some(1_700_000_000_000), vec![0, 1, b'v']),
                (b"c".to_vec(), None, vec![0, 1, b'v']),
            ]
        );
    }

    /// Redis 7.2's formats (not writable by the 7.0 test server): set listpack and stream v3,
    /// whose consumers carry an active time after their seen time.
    #[test]
    fn redis_7_2_set_listpack_and_stream_v3() {
        let lp = [13, 0, 0, 0, 2, 0, 0x81, b'a', 2, 0x81, b'b', 2, 0xFF];
        let mut body = vec![ty::SET_LISTPACK, 1, b's', lp.len() as u8];
        body.extend_from_slice(&lp);
        let stream = |t: u8| {
            let mut v = vec![t, 1, b'x', 0, 0, 0, 0];
            v.extend_from_slice(&[0, 0, 0, 0, 0]); // first id, max deleted id, entries added
            v.extend_from_slice(&[1, 1, b'g', 0, 0, 0, 0, 1, 1, b'c']); // group, no PEL, consumer
            v.extend_from_slice(&1_700_000_000_000i64.to_le_bytes()); // seen
            v.extend_from_slice(&1_700_000_000_000i64.to_le_bytes()); // active
            v.push(0); // consumer PEL
            v
        };
        body.extend_from_slice(&stream(ty::STREAM_LISTPACKS_3));
        let s = counts(&rdb9(&body), DEEP).unwrap();
        assert_eq!(s.keys_per_db, [(0, 2)].into());
        // The same bytes read as a v2 stream leave the active time unread: not an RDB.
        let mut body = stream(ty::STREAM_LISTPACKS_2);
        body.extend_from_slice(&[ty::STRING, 1, b'k', 1, b'v']);
        assert!(counts(&rdb9(&body), DEEP).is_err());
        // A packed set with a duplicate member.
        let dup = [13, 0, 0, 0, 2, 0, 0x81, b'a', 2, 0x81, b'a', 2, 0xFF];
        let mut body = vec![ty::SET_LISTPACK, 1, b's', dup.len() as u8];
        body.extend_from_slice(&dup);
        let err = counts(&rdb9(&body), DEEP).unwrap_err().to_string();
        assert!(
            err.contains("duplicate") && err.contains("key \"s\""),
            "{err}"
        );
        assert!(counts(&rdb9(&body), SHALLOW).is_ok());
    }

    /// Writes RDBs by hand, for formats the test server cannot produce.
    struct Writer(Vec<u8>);

    impl Writer {
        fn new(version: u32) -> Writer {
            Writer(format!("REDIS{version:04}").into_bytes())
        }

        fn byte(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }

        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }

        /// An RDB length in its shortest form.
        fn len(&mut self, n: u64) -> &mut Self {
            match n {
                0..64 => self.byte(n as u8),
                64..16384 => self.raw(&[0x40 | (n >> 8) as u8, n as u8]),
                16384..=0xFFFF_FFFF => self.byte(0x80).raw(&(n as u32).to_be_bytes()),
                _ => self.byte(0x81).raw(&n.to_be_bytes()),
            }
        }

        fn str(&mut self, s: &[u8]) -> &mut Self {
            self.len(s.len() as u64).raw(s)
        }

        fn aux(&mut self, k: &str, v: &str) -> &mut Self {
            self.byte(op::AUX).str(k.as_bytes()).str(v.as_bytes())
        }

        fn slot_info(&mut self, slot: u64, keys: u64, expires: u64) -> &mut Self {
            self.byte(op::SLOT_INFO).len(slot).len(keys).len(expires)
        }

        /// A key whose value bytes (after the type) are `value`; returns its DUMP payload.
        fn key(&mut self, t: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
            self.byte(t).str(key).raw(value);
            let mut payload = vec![t];
            payload.extend_from_slice(value);
            payload
        }

        fn finish(&mut self) -> Vec<u8> {
            self.byte(op::EOF);
            let crc = crc64(&self.0);
            self.raw(&crc.to_le_bytes());
            std::mem::take(&mut self.0)
        }
    }

    enum Lp<'a> {
        S(&'a [u8]),
        I(i64),
    }

    /// A listpack of short strings (< 64 bytes) and integers.
    fn lp(entries: &[Lp<'_>]) -> Vec<u8> {
        let mut body = Vec::new();
        for e in entries {
            let start = body.len();
            match e {
                Lp::S(s) => {
                    assert!(s.len() < 64);
                    body.push(0x80 | s.len() as u8);
                    body.extend_from_slice(s);
                }
                Lp::I(v @ 0..128) => body.push(*v as u8),
                Lp::I(v) => {
                    body.push(0xF4);
                    body.extend_from_slice(&v.to_le_bytes());
                }
            }
            body.push((body.len() - start) as u8);
        }
        let total = 6 + body.len() + 1;
        let mut v = (total as u32).to_le_bytes().to_vec();
        v.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        v.extend_from_slice(&body);
        v.push(0xFF);
        v
    }

    /// A length-prefixed string value holding `b`.
    fn blob_value(b: &[u8]) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.str(b);
        w.0
    }

    const T0: u64 = 1_800_000_000_000;

    /// The value of a GA table-encoded hash with field TTLs: minExpire, then ttl/field/value
    /// (ttl 0 = none, otherwise expiry - minExpire + 1).
    fn hash_metadata(min: u64, fields: &[(u64, &[u8], &[u8])]) -> Vec<u8> {
        let mut w = Writer(min.to_le_bytes().to_vec());
        w.len(fields.len() as u64);
        for (ttl, f, v) in fields {
            w.len(*ttl).str(f).str(v);
        }
        w.0
    }

    /// (db, key, payload) per key.
    type Expected = Vec<(u64, Vec<u8>, Vec<u8>)>;

    /// A Redis 7.4+ snapshot: every hash-with-field-TTL encoding, slot info, two dbs. Returns
    /// the RDB and the expected (db, key, payload) list.
    fn rdb12() -> (Vec<u8>, Expected) {
        let mut w = Writer::new(12);
        w.aux("redis-ver", "8.2.1").aux("redis-bits", "64");
        w.byte(op::SELECTDB).len(0).byte(op::RESIZEDB).len(5).len(0);
        w.slot_info(866, 4, 0);
        let mut keys = Vec::new();
        let v = hash_metadata(
            T0,
            &[
                (1, b"soon", b"1"),
                (0, b"kept", b"2"),
                (501, b"later", b"3"),
            ],
        );
        keys.push((0, b"hm".to_vec(), w.key(ty::HASH_METADATA, b"hm", &v)));
        let mut v = T0.to_le_bytes().to_vec();
        v.extend_from_slice(&blob_value(&lp(&[
            Lp::S(b"f1"),
            Lp::S(b"v1"),
            Lp::I(T0 as i64),
            Lp::S(b"f2"),
            Lp::I(7),
            Lp::I(T0 as i64 + 9),
            Lp::S(b"f3"),
            Lp::S(b"v3"),
            Lp::I(0),
        ])));
        keys.push((0, b"hl".to_vec(), w.key(ty::HASH_LISTPACK_EX, b"hl", &v)));
        // The 7.4 release candidates' formats: no minExpire, absolute TTLs.
        let mut w2 = Writer(Vec::new());
        w2.len(2)
            .len(T0)
            .str(b"a")
            .str(b"x")
            .len(0)
            .str(b"b")
            .str(b"y");
        keys.push((
            0,
            b"hm-rc".to_vec(),
            w.key(ty::HASH_METADATA_PRE_GA, b"hm-rc", &w2.0),
        ));
        let v = blob_value(&lp(&[Lp::S(b"f"), Lp::S(b"v"), Lp::I(T0 as i64)]));
        keys.push((
            0,
            b"hl-rc".to_vec(),
            w.key(ty::HASH_LISTPACK_EX_PRE_GA, b"hl-rc", &v),
        ));
        w.byte(op::SELECTDB).len(3).slot_info(16383, 1, 1);
        w.byte(op::EXPIRETIME_MS).raw(&(T0 as i64).to_le_bytes());
        keys.push((3, b"s".to_vec(), w.key(ty::STRING, b"s", &[1, b'v'])));
        (w.finish(), keys)
    }

    #[test]
    fn v12_hashes_with_field_ttls_and_slot_info() {
        let (rdb, expect) = rdb12();
        for opts in [DEEP, SHALLOW, CAPTURE] {
            let mut seen = Collect::default();
            let s = read(&rdb[..], &opts, &mut seen, false).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(s.version, 12);
            assert_eq!(s.keys_per_db, [(0, 4), (3, 1)].into(), "{opts:?}");
            assert_eq!(s.redis_ver.as_deref(), Some("8.2.1"));
            assert!(s.checksum_verified);
            let got: Vec<_> = seen
                .0
                .into_iter()
                .map(|(db, k, _, p)| (db, k, if opts.capture_payload { p } else { vec![] }))
                .collect();
            let want: Vec<_> = expect
                .iter()
                .map(|(db, k, p)| {
                    let p = if opts.capture_payload {
                        p.clone()
                    } else {
                        vec![]
                    };
                    (*db, k.clone(), p)
                })
                .collect();
            assert_eq!(got, want, "{opts:?}");
        }
        fuzz(&rdb, 1500, 0x5851_F42D_4C95_7F2D);
    }

    /// Replaces one key's value in an otherwise valid v12 RDB.
    fn rdb12_with(t: u8, value: &[u8]) -> Vec<u8> {
        let mut w = Writer::new(12);
        w.byte(op::SELECTDB).len(0);
        w.key(t, b"h", value);
        w.key(ty::STRING, b"next", &[1, b'v']);
        w.finish()
    }

    #[test]
    fn v12_corrupt_hashes_with_field_ttls() {
        let deep_err = |rdb: &[u8]| {
            let err = counts(rdb, DEEP).unwrap_err();
            assert!(err.is_corruption(), "{err}");
            let msg = err.to_string();
            assert!(!msg.contains('\n') && msg.contains("byte "), "{msg}");
            msg
        };
        // The table form declares 3 fields and holds 2: the EOF opcode is read as a TTL.
        let mut v = hash_metadata(T0, &[(1, b"a", b"1"), (0, b"b", b"2")]);
        v[8] = 3;
        let mut w = Writer::new(12);
        w.byte(op::SELECTDB).len(0).key(ty::HASH_METADATA, b"h", &v);
        let rdb = w.finish();
        for opts in [DEEP, SHALLOW, CAPTURE] {
            let err = counts(&rdb, opts).unwrap_err();
            assert!(err.is_corruption(), "{err}");
            assert!(err.to_string().contains("key \"h\""), "{err}");
        }
        // It declares 1 and holds 2: the second field's TTL is read as a record type.
        let mut v = hash_metadata(T0, &[(1, b"a", b"1"), (501, b"b", b"2")]);
        v[8] = 1;
        let msg = deep_err(&rdb12_with(ty::HASH_METADATA, &v));
        assert!(msg.contains("unknown record type"), "{msg}");
        // Zero fields, which the server never writes.
        let v = hash_metadata(T0, &[]);
        let msg = deep_err(&rdb12_with(ty::HASH_METADATA, &v));
        assert!(msg.contains("empty") && msg.contains("key \"h\""), "{msg}");
        // A TTL that ends the data: a 32-bit length with two of its four bytes.
        let mut w = Writer::new(12);
        w.byte(op::SELECTDB)
            .len(0)
            .byte(ty::HASH_METADATA)
            .str(b"h");
        w.raw(&T0.to_le_bytes()).len(1).raw(&[0x80, 0, 1]);
        for opts in [DEEP, SHALLOW, CAPTURE] {
            let err = counts(&w.0, opts).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{err}");
        }
        // A minExpire cut short.
        let mut w = Writer::new(12);
        w.byte(op::SELECTDB)
            .len(0)
            .byte(ty::HASH_LISTPACK_EX)
            .str(b"h");
        w.raw(&T0.to_le_bytes()[..5]);
        assert!(counts(&w.0, SHALLOW).unwrap_err().is_corruption());
        // A TTL past the 48-bit expiry range.
        let v = hash_metadata(T0, &[(1 << 48, b"a", b"1")]);
        let msg = deep_err(&rdb12_with(ty::HASH_METADATA, &v));
        assert!(msg.contains("out of range"), "{msg}");
        assert!(counts(&rdb12_with(ty::HASH_METADATA, &v), SHALLOW).is_ok());

        let lpex = |entries: &[Lp<'_>]| {
            let mut v = T0.to_le_bytes().to_vec();
            v.extend_from_slice(&blob_value(&lp(entries)));
            rdb12_with(ty::HASH_LISTPACK_EX, &v)
        };
        let good = [Lp::S(b"f"), Lp::S(b"v"), Lp::I(T0 as i64)];
        assert!(counts(&lpex(&good), DEEP).is_ok());
        // A listpack without its 0xFF terminator (the size header still matches).
        let mut b = lp(&good);
        let n = b.len();
        b[n - 1] = 0x01;
        let mut v = T0.to_le_bytes().to_vec();
        v.extend_from_slice(&blob_value(&b));
        let rdb = rdb12_with(ty::HASH_LISTPACK_EX, &v);
        assert!(deep_err(&rdb).contains("0xFF marker"));
        assert!(counts(&rdb, SHALLOW).is_ok());
        // Entry counts that are not field/value/TTL triplets.
        let msg = deep_err(&lpex(&[Lp::S(b"f"), Lp::S(b"v")]));
        assert!(msg.contains("multiple of 3"), "{msg}");
        // Duplicate fields, non-integer, negative and unordered TTLs.
        for (bad, what) in [
            (
                vec![
                    Lp::S(b"f"),
                    Lp::S(b"1"),
                    Lp::I(0),
                    Lp::S(b"f"),
                    Lp::S(b"2"),
                    Lp::I(0),
                ],
                "duplicate",
            ),
            (vec![Lp::S(b"f"), Lp::S(b"v"), Lp::S(b"soon")], "integer"),
            (vec![Lp::S(b"f"), Lp::S(b"v"), Lp::I(-5)], "out of range"),
            (
                vec![
                    Lp::S(b"a"),
                    Lp::S(b"v"),
                    Lp::I(0),
                    Lp::S(b"b"),
                    Lp::S(b"v"),
                    Lp::I(T0 as i64),
                ],
                "out of order",
            ),
            (
                vec![
                    Lp::S(b"a"),
                    Lp::S(b"v"),
                    Lp::I(T0 as i64 + 1),
                    Lp::S(b"b"),
                    Lp::S(b"v"),
                    Lp::I(T0 as i64),
                ],
                "out of order",
            ),
        ] {
            let msg = deep_err(&lpex(&bad));
            assert!(msg.contains(what), "{what}: {msg}");
        }
        // Slot info past the last slot.
        let mut w = Writer::new(12);
        w.slot_info(16384, 1, 0);
        let rdb = w.finish();
        assert!(deep_err(&rdb).contains("slot 16384"));
        // Type 26 (a stream format of version 13) is not one this reader knows.
        let msg = deep_err(&rdb12_with(26, &[0]));
        assert!(msg.contains("unknown record type 26"), "{msg}");
    }

    #[test]
    fn checksum_mismatch_and_disabled_checksum() {
        let mut v = rdb9(&[ty::STRING, 1, b'k', 1, b'v']);
        let n = v.len();
        v[n - 9 - 1] ^= 1; // inside the value
        let err = counts(&v, SHALLOW).unwrap_err();
        assert!(matches!(err, RdbError::Checksum { .. }), "{err}");
        let mut v = rdb9(&[ty::STRING, 1, b'k', 1, b'v']);
        let n = v.len();
        v[n - 8..].fill(0);
        assert!(!counts(&v, SHALLOW).unwrap().checksum_verified);
    }

    #[test]
    fn encodings_reject_bad_headers() {
        // A good listpack of ["a", 5] then variations.
        let good = [12, 0, 0, 0, 2, 0, 0x81, b'a', 2, 5, 1, 0xFF];
        assert_eq!(listpack(&good, &mut |_| Ok(())), Ok(2));
        let mut bad = good;
        bad[4] = 3;
        assert!(listpack(&bad, &mut |_| Ok(())).is_err());
        let mut bad = good;
        bad[8] = 3;
        assert!(listpack(&bad, &mut |_| Ok(())).is_err());
        assert!(listpack(&good[..11], &mut |_| Ok(())).is_err());
        // Packed sets, hashes and sorted sets: no duplicate members, numeric scores.
        let dup = [13, 0, 0, 0, 2, 0, 0x81, b'a', 2, 0x81, b'a', 2, 0xFF];
        assert_eq!(listpack(&dup, &mut |_| Ok(())), Ok(2));
        assert!(
            keyed(&dup, listpack, Keyed::Set)
                .unwrap_err()
                .contains("duplicate")
        );
        assert!(keyed(&dup, listpack, Keyed::Hash).is_ok());
        assert!(
            keyed(&dup, listpack, Keyed::Zset)
                .unwrap_err()
                .contains("score")
        );
        assert!(keyed(&good, listpack, Keyed::Zset).is_ok());
        // Intsets must be ascending and sized by their header.
        let mut is = vec![2, 0, 0, 0, 2, 0, 0, 0, 1, 0, 2, 0];
        assert_eq!(intset(&is), Ok(2));
        is.swap(8, 10);
        assert!(intset(&is).is_err());
        assert!(intset(&is[..11]).is_err());
        // A ziplist of ["ab"]: header, prevlen 0, 6-bit string.
        let zl = [15, 0, 0, 0, 10, 0, 0, 0, 1, 0, 0, 2, b'a', b'b', 0xFF];
        assert_eq!(ziplist(&zl, &mut |_| Ok(())), Ok(1));
        let mut bad = zl;
        bad[4] = 11;
        assert!(ziplist(&bad, &mut |_| Ok(())).is_err());
        let mut bad = zl;
        bad[10] = 3;
        assert!(ziplist(&bad, &mut |_| Ok(())).is_err());
        // Declared string lengths past the end, not a panic.
        let mut bad = zl;
        bad[11] = 0x3F;
        assert!(ziplist(&bad, &mut |_| Ok(())).is_err());
    }

    #[test]
    fn dump_payload_matches_the_documented_layout() {
        let d = dump_payload(&[0, 1, b'v'], 10);
        assert_eq!(&d[..5], &[0, 1, b'v', 10, 0]);
        assert_eq!(d.len(), 13);
        assert_eq!(db_key(3), "db3");
    }

    #[test]
    fn huge_declared_lengths_fail_at_the_data_end() {
        // A string claiming 2^62 bytes, and a list claiming 2^62 elements.
        let mut body = vec![ty::STRING, 1, b'k', 0x81];
        body.extend_from_slice(&(1u64 << 62).to_be_bytes());
        body.extend_from_slice(b"short");
        for opts in [DEEP, SHALLOW, CAPTURE] {
            let err = counts(&rdb9(&body), opts).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{err}");
        }
        let mut body = vec![ty::LIST, 1, b'k', 0x81];
        body.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert!(counts(&rdb9(&body), CAPTURE).is_err());
        // LZF claiming an absurd expansion.
        let mut body = vec![ty::STRING, 1, b'k', 0xC3, 2, 0x80];
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        body.extend_from_slice(&[0, 0]);
        let err = counts(&rdb9(&body), DEEP).unwrap_err().to_string();
        assert!(err.contains("implausible LZF"), "{err}");
    }

    /// Random single-byte mutations and truncations: always Ok or Err, never a panic or hang.
    fn fuzz(valid: &[u8], rounds: usize, seed: u64) {
        let mut x = seed | 1;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut ok, mut err) = (0, 0);
        for i in 0..rounds {
            let mut v = valid.to_vec();
            match rnd() % 4 {
                0 => v.truncate((rnd() % valid.len() as u64) as usize),
                1 => {
                    let at = (rnd() % v.len() as u64) as usize;
                    v[at] = rnd() as u8;
                }
                2 => {
                    let at = (rnd() % v.len() as u64) as usize;
                    v[at] ^= 1 << (rnd() % 8);
                }
                _ => {
                    // Also with the checksum disabled, so a mutation is judged by structure.
                    let n = v.len();
                    v[n - 8..].fill(0);
                    let at = 9 + (rnd() % (n as u64 - 17)) as usize;
                    v[at] = rnd() as u8;
                }
            }
            let opts = [DEEP, SHALLOW, CAPTURE][i % 3];
            match counts(&v, opts) {
                Ok(_) => ok += 1,
                Err(_) => err += 1,
            }
        }
        eprintln!("fuzz: {rounds} mutations, {ok} still parsed, {err} rejected");
        assert!(err > rounds / 2);
    }

    #[test]
    fn fuzz_fixture_mutations() {
        let Some(dir) = fixtures() else { return };
        let bytes = std::fs::read(dir.join("encodings.rdb")).unwrap();
        fuzz(&bytes, 2000, 0x9E37_79B9_7F4A_7C15);
    }

    /// Throughput on a large RDB named by DBKEEPER_RDB_BENCH (run in release, by hand):
    /// `DBKEEPER_RDB_BENCH=dump.rdb cargo test --release --lib rdb_throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, run by hand on a large RDB"]
    fn rdb_throughput() {
        let Some(path) = std::env::var_os("DBKEEPER_RDB_BENCH") else {
            eprintln!("skipped: DBKEEPER_RDB_BENCH names no RDB");
            return;
        };
        let size = std::fs::metadata(&path).unwrap().len() as f64 / 1e6;
        let t = Instant::now();
        io::copy(&mut std::fs::File::open(&path).unwrap(), &mut io::sink()).unwrap();
        let raw = size / t.elapsed().as_secs_f64();
        eprintln!("{size:.0} MB: plain read {raw:.0} MB/s");
        for (name, opts) in [("shallow", SHALLOW), ("deep", DEEP), ("capture", CAPTURE)] {
            let t = Instant::now();
            let s = read(
                std::fs::File::open(&path).unwrap(),
                &opts,
                &mut CountOnly,
                false,
            )
            .unwrap();
            let rate = size / t.elapsed().as_secs_f64();
            let keys: u64 = s.keys_per_db.values().sum();
            eprintln!("{name}: {keys} keys, {rate:.0} MB/s");
        }
    }

    // ---- against a real server ----

    struct Server {
        child: Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn on_path(bin: &str) -> bool {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
    }

    fn start_server() -> Option<Server> {
        if !on_path("redis-server") || !on_path("redis-cli") {
            eprintln!("skipped: redis-server or redis-cli is not on PATH");
            return None;
        }
        // A few attempts: another test may take the free port between our probe and the
        // server's bind, and a server still starting may reset a connection.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", "", "--appendonly", "no"])
                .args(["--enable-debug-command", "yes", "--databases", "16"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut server = Server { child, port, dir };
            for _ in 0..200 {
                if server.child.try_wait().unwrap().is_some() {
                    break;
                }
                if ping_ok(port) {
                    return Some(server);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("redis-server did not start and answer PING in 3 attempts");
    }

    /// One PING that reports failure instead of panicking (readiness polling).
    fn ping_ok(port: u16) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    #[derive(Debug, PartialEq)]
    enum Reply {
        Status(String),
        Error(String),
        Int(i64),
        Bulk(Option<Vec<u8>>),
        Array(Vec<Reply>),
    }

    /// A minimal RESP2 client: enough to fill a test server and read DUMPs.
    struct Conn {
        w: TcpStream,
        r: BufReader<TcpStream>,
    }

    impl Conn {
        fn open(port: u16) -> io::Result<Conn> {
            let w = TcpStream::connect(("127.0.0.1", port))?;
            let r = BufReader::new(w.try_clone()?);
            Ok(Conn { w, r })
        }

        fn send(&mut self, args: &[&[u8]]) {
            let mut m = format!("*{}\r\n", args.len()).into_bytes();
            for a in args {
                m.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
                m.extend_from_slice(a);
                m.extend_from_slice(b"\r\n");
            }
            self.w.write_all(&m).unwrap();
        }

        fn reply(&mut self) -> Reply {
            let mut line = Vec::new();
            self.r.read_until(b'\n', &mut line).unwrap();
            let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
            match line[0] {
                b'+' => Reply::Status(text),
                b'-' => Reply::Error(text),
                b':' => Reply::Int(text.parse().unwrap()),
                b'$' => {
                    let n: i64 = text.parse().unwrap();
                    if n < 0 {
                        return Reply::Bulk(None);
                    }
                    let mut b = vec![0; n as usize + 2];
                    self.r.read_exact(&mut b).unwrap();
                    b.truncate(n as usize);
                    Reply::Bulk(Some(b))
                }
                b'*' => {
                    let n: i64 = text.parse().unwrap();
                    Reply::Array((0..n.max(0)).map(|_| self.reply()).collect())
                }
                c => panic!("unexpected RESP type {c}"),
            }
        }

        fn cmd(&mut self, args: &[&[u8]]) -> Reply {
            self.send(args);
            self.reply()
        }

        /// Runs a command given as words; panics on an error reply.
        fn run(&mut self, words: &str) -> Reply {
            let args: Vec<&[u8]> = words.split(' ').map(str::as_bytes).collect();
            let r = self.cmd(&args);
            if let Reply::Error(e) = &r {
                panic!("{words}: {e}");
            }
            r
        }
    }

    fn fill(c: &mut Conn) {
        // db0: every type and encoding a Redis 7 server writes.
        c.run("SET str:small hello");
        c.run("SET str:int 12345");
        c.run("SET str:neg -7");
        c.run("SET str:bigint 12345678901234");
        let big: String = "compressible text, ".repeat(100 * 1024 / 19);
        c.cmd(&[b"SET", b"str:lzf", big.as_bytes()]);
        let long_key = "k".repeat(200);
        c.cmd(&[b"SET", long_key.as_bytes(), b"lzf-compressed key"]);
        let noise: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        c.cmd(&[b"SET", b"bin\x00\xff\r\nkey", &noise]);
        // Larger than the read buffer, so a value spans refills.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let huge: Vec<u8> = (0..3 * BUF_SIZE + 12345)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        c.cmd(&[b"SET", b"str:huge", &huge]);
        c.run("SET ttl:px v PX 3600000");
        c.run("SET ttl:ex v EX 7200");
        c.run("PEXPIREAT str:small 4102444800123");
        c.run("RPUSH list:small a b 1 2 -300 70000 99999999999");
        for chunk in 0..20 {
            let mut args: Vec<Vec<u8>> = vec![b"RPUSH".to_vec(), b"list:big".to_vec()];
            args.extend((0..100).map(|i| format!("element-{chunk}-{i}").into_bytes()));
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.cmd(&refs);
        }
        // Large elements become plain quicklist nodes past the packed threshold.
        c.run("DEBUG QUICKLIST-PACKED-THRESHOLD 100");
        c.cmd(&[
            b"RPUSH",
            b"list:plain",
            &noise[..1000],
            b"small",
            &noise[..2000],
        ]);
        c.run("SADD set:ints 1 2 3 -5 100000 5000000000");
        c.run("SADD set:small a b c");
        for chunk in 0..5 {
            let mut args: Vec<Vec<u8>> = vec![b"SADD".to_vec(), b"set:big".to_vec()];
            args.extend((0..100).map(|i| format!("member-{chunk}-{i}").into_bytes()));
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.cmd(&refs);
        }
        c.run("HSET hash:small f1 v1 f2 2 f3 -3");
        for chunk in 0..10 {
            let mut args: Vec<Vec<u8>> = vec![b"HSET".to_vec(), b"hash:big".to_vec()];
            for i in 0..100 {
                args.push(format!("field-{chunk}-{i}").into_bytes());
                args.push(format!("value-{i}").into_bytes());
            }
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.cmd(&refs);
        }
        c.run("ZADD zset:small 1 a 2.5 b -3 c inf d");
        for chunk in 0..5 {
            let mut args: Vec<Vec<u8>> = vec![b"ZADD".to_vec(), b"zset:big".to_vec()];
            for i in 0..100 {
                args.push(format!("{}.25", chunk * 100 + i).into_bytes());
                args.push(format!("member-{chunk}-{i}").into_bytes());
            }
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            c.cmd(&refs);
        }
        for i in 0..300 {
            if i % 7 == 0 {
                c.run(&format!("XADD stream * other {i} extra x"));
            } else {
                c.run(&format!("XADD stream * sensor {i} temp {}", i * 3));
            }
        }
        c.run("XGROUP CREATE stream g1 0");
        c.run("XGROUP CREATE stream g2 $");
        c.run("XREADGROUP GROUP g1 alice COUNT 10 STREAMS stream >");
        c.run("XREADGROUP GROUP g1 bob COUNT 5 STREAMS stream >");
        if let Reply::Array(entries) = c.run("XRANGE stream - + COUNT 3") {
            for e in entries {
                if let Reply::Array(parts) = e
                    && let Some(Reply::Bulk(Some(id))) = parts.first()
                {
                    c.cmd(&[b"XACK", b"stream", b"g1", id]);
                }
            }
        }
        if let Reply::Array(entries) = c.run("XRANGE stream + - COUNT 1") {
            assert!(entries.is_empty());
        }
        if let Reply::Array(entries) = c.run("XREVRANGE stream + - COUNT 5") {
            for e in entries {
                if let Reply::Array(parts) = e
                    && let Some(Reply::Bulk(Some(id))) = parts.first()
                {
                    c.cmd(&[b"XDEL", b"stream", id]);
                }
            }
        }
        c.run("XGROUP CREATE stream:empty g $ MKSTREAM");
        c.cmd(&[
            b"FUNCTION",
            b"LOAD",
            b"#!lua name=dbkeeperlib\nredis.register_function('f', function() return 1 end)",
        ]);
        // Other dbs.
        c.run("SELECT 1");
        c.run("SET a 1");
        c.run("RPUSH l x y");
        c.run("SELECT 5");
        for i in 0..50 {
            c.run(&format!("SET key{i} value{i} EX 1000"));
        }
        c.run("SELECT 0");
    }

    fn server_rdb(s: &Server) -> Vec<u8> {
        let path = s.dir.path().join("snapshot.rdb");
        let out = Command::new("redis-cli")
            .args(["-p", &s.port.to_string(), "--rdb"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(path).unwrap()
    }

    fn dbsizes(c: &mut Conn) -> BTreeMap<u64, u64> {
        let mut m = BTreeMap::new();
        for db in 0..16u64 {
            c.run(&format!("SELECT {db}"));
            if let Reply::Int(n) = c.run("DBSIZE")
                && n > 0
            {
                m.insert(db, n as u64);
            }
        }
        c.run("SELECT 0");
        m
    }

    #[test]
    fn server_snapshot_every_type() {
        let Some(server) = start_server() else { return };
        let mut c = Conn::open(server.port).unwrap();
        fill(&mut c);
        let expect = dbsizes(&mut c);
        assert_eq!(expect.len(), 3, "{expect:?}");
        let rdb = server_rdb(&server);

        for opts in [DEEP, SHALLOW, CAPTURE] {
            let s = counts(&rdb, opts).unwrap_or_else(|e| panic!("{opts:?}: {e}"));
            assert_eq!(s.keys_per_db, expect, "{opts:?}");
            assert!(s.checksum_verified);
            assert!(s.redis_ver.as_deref().is_some_and(|v| v.starts_with('7')));
        }

        // The captured payloads are exactly what DUMP serializes, and expiries are absolute.
        let mut seen = Collect::default();
        let s = read(&rdb[..], &CAPTURE, &mut seen, false).unwrap();
        let mut types = std::collections::BTreeSet::new();
        let mut by_key = HashMap::new();
        for (db, key, exp, payload) in &seen.0 {
            types.insert(payload[0]);
            if *db == 0 {
                by_key.insert(key.clone(), (*exp, payload.clone()));
            }
        }
        for t in [
            ty::STRING,
            ty::SET,
            ty::HASH,
            ty::ZSET_2,
            ty::SET_INTSET,
            ty::HASH_LISTPACK,
            ty::ZSET_LISTPACK,
            ty::LIST_QUICKLIST_2,
            ty::STREAM_LISTPACKS_2,
        ] {
            assert!(types.contains(&t), "no value of type {t} in {types:?}");
        }
        for (key, (_, payload)) in &by_key {
            let Reply::Bulk(Some(dump)) = c.cmd(&[b"DUMP", key]) else {
                panic!("DUMP {}", show_key(key));
            };
            assert_eq!(
                dump_payload(payload, s.version as u16),
                dump,
                "payload of {}",
                show_key(key)
            );
        }
        // list:plain is three quicklist nodes: plain, packed, plain.
        let plain = &by_key[&b"list:plain".to_vec()].1;
        assert_eq!(
            &plain[..3],
            &[ty::LIST_QUICKLIST_2, 3, QUICKLIST_NODE_PLAIN as u8]
        );
        assert_eq!(by_key[&b"str:small".to_vec()].0, Some(4102444800123));
        assert_eq!(by_key[&b"list:small".to_vec()].0, None);
        let Reply::Int(pexp) = c.run("PEXPIRETIME ttl:px") else {
            panic!()
        };
        assert_eq!(by_key[&b"ttl:px".to_vec()].0, Some(pexp));

        // Reads of any size give the same keys and payloads (a socket hands out small pieces).
        struct Trickle<'a>(&'a [u8], usize);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.1.min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        for piece in [1, 7, 4093] {
            let mut again = Collect::default();
            let s2 = read(Trickle(&rdb, piece), &CAPTURE, &mut again, false).unwrap();
            assert_eq!(s2, s);
            assert!(again.0 == seen.0, "reading {piece} bytes at a time");
        }

        // Damage: a flipped byte, truncation, garbage after the end.
        let mid = rdb.len() / 2;
        let mut flipped = rdb.clone();
        flipped[mid] ^= 0x20;
        for opts in [DEEP, SHALLOW] {
            assert!(counts(&flipped, opts).is_err());
            for cut in [10, mid, rdb.len() - 9, rdb.len() - 1] {
                let err = counts(&rdb[..cut], opts).unwrap_err();
                assert!(err.is_corruption(), "cut at {cut}: {err}");
            }
            let mut longer = rdb.clone();
            longer.extend_from_slice(b"garbage");
            let err = counts(&longer, opts).unwrap_err().to_string();
            assert!(err.contains("after the end"), "{err}");
        }
        // Through the crate error, one line with the offset.
        let err = parse(&rdb[..mid], &DEEP, &mut CountOnly)
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains('\n') && err.contains(&format!("byte {mid}")),
            "{err}"
        );

        // A visitor's error stops the parse and comes back unchanged.
        struct Stop;
        impl Visitor for Stop {
            fn key(&mut self, _: &KeyRecord<'_>) -> Result<(), Error> {
                Err(Error::Interrupted(15))
            }
        }
        assert!(matches!(
            parse(&rdb[..], &SHALLOW, &mut Stop),
            Err(Error::Interrupted(15))
        ));
    }

    #[test]
    fn server_snapshot_fuzzed() {
        let Some(server) = start_server() else { return };
        let mut c = Conn::open(server.port).unwrap();
        // A smaller data set than the full one, so 2000 rounds stay quick.
        c.run("RPUSH l a b 1 2 -300 70000");
        c.run("SADD s 1 2 3");
        c.run("SADD t a b");
        c.run("HSET h f1 v1 f2 2");
        c.run("ZADD z 1 a 2.5 b");
        c.run("SET n 123");
        c.run("SET ttl v PX 100000");
        for i in 0..20 {
            c.run(&format!("XADD x * f {i}"));
        }
        c.run("XGROUP CREATE x g 0");
        c.run("XREADGROUP GROUP g c COUNT 3 STREAMS x >");
        let rdb = server_rdb(&server);
        assert_eq!(counts(&rdb, DEEP).unwrap().keys_per_db, dbsizes(&mut c));
        fuzz(&rdb, 2000, 0xD1B5_4A32_D192_ED03);
    }
}
