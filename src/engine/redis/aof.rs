//! Append-only files: import (a Redis 7 `appendonlydir/` or an older single `appendonly.aof`),
//! deep verify, preseed and online replay of a set whose Redis part is an AOF.
//!
//! The reader is written by hand: RESP arrays of bulk strings are a few lines to parse, and no
//! maintained crate reads an AOF (with its RDB preamble, annotations and multi-part manifest)
//! as a stream while reporting byte offsets. The RDB part goes through [`rdb::read`].
//!
//! Counts come from a key-tracking model of the commands ([`Model`]): the commands Redis 7
//! writes to an AOF (after its own rewrites: SPOP → SREM, EXPIRE → PEXPIREAT, INCRBYFLOAT →
//! SET … KEEPTTL, blocking pops → plain pops) are applied to a model that knows every key, its
//! expiry, and the members of collections created by commands, so a collection emptied by its
//! last SREM/HDEL/ZREM/LPOP/LREM/LTRIM is gone exactly as in the server. A command the model
//! does not know refuses the import (its name and byte offset in the message). The members of
//! a collection loaded from the RDB part are not decoded: a command that removes members from
//! such a collection leaves the key counted and marks the counts `counts_exact: false`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::Path;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;
use crate::repo::writer::EngineWriter;

use super::datadir::{TMP_AOF, chown_like, dir_error, fsync_path, write_checked};
use super::{ENGINE, rdb};

/// `details.format` of an AOF set.
pub(super) const FORMAT_AOF: &str = "aof";
/// Where the files are stored in a set: `redis/appendonlydir/<name>.zst`.
const STORED_DIR: &str = "appendonlydir";
/// Redis's own limit on a bulk string (`proto-max-bulk-len`, 512 MB by default); a longer
/// length is a corrupt file, never an allocation.
const MAX_BULK: u64 = 512 << 20;
/// Arguments of one command; more is a corrupt count (Redis caps a multibulk at 1024 × 1024 ×
/// 1024 - 1, far more than any real command sent through an AOF).
const MAX_ARGS: u64 = 1 << 24;
/// The part of the stream kept after each read, so what the RDB reader buffered beyond the
/// preamble's end can be given back to the command reader (the RDB reader reads 1 MB at a time).
const KEEP_TAIL: usize = 4 << 20;

/// Whether the set's Redis part is an AOF.
pub(super) fn is_aof(entry: &EngineEntry) -> bool {
    entry.details.get("format").and_then(|v| v.as_str()) == Some(FORMAT_AOF)
}

// The source: a manifest, or one file.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Part {
    /// The file's name in the source (its stored name is `appendonlydir/<name>`).
    pub name: String,
    pub base: bool,
    pub seq: u64,
}

impl Part {
    fn stored(&self) -> String {
        format!("redis/{STORED_DIR}/{}.zst", self.name)
    }

    /// The name the server looks for with the default `appendfilename appendonly.aof`.
    fn server_name(&self, rdb: bool) -> String {
        if self.base {
            let ext = if rdb { "rdb" } else { "aof" };
            format!("appendonly.aof.{}.base.{ext}", self.seq)
        } else {
            format!("appendonly.aof.{}.incr.aof", self.seq)
        }
    }
}

/// Parses a Redis 7 AOF manifest: one `file <name> seq <n> type <b|i|h>` line per file, in
/// load order; history files (`type h`) are left for the server to delete and not loaded.
pub(super) fn parse_manifest(text: &str, path: &Path) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    let mut offset = 0usize;
    for line in text.split_inclusive('\n') {
        let here = offset;
        offset += line.len();
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let bad =
            |why: &str| Error::engine(ENGINE, format!("{}: byte {here}: {why}", path.display()));
        let words: Vec<&str> = l.split_whitespace().collect();
        if !words.len().is_multiple_of(2) {
            return Err(bad("not a `file <name> seq <n> type <b|i|h>` line"));
        }
        let mut name = None;
        let mut seq = None;
        let mut ty = None;
        for kv in words.chunks(2) {
            match kv[0] {
                "file" => name = Some(kv[1]),
                "seq" => seq = kv[1].parse::<u64>().ok(),
                "type" => ty = Some(kv[1]),
                // Fields of newer servers (e.g. `startoffset`) do not change what is loaded.
                _ => {}
            }
        }
        let (Some(name), Some(seq), Some(ty)) = (name, seq, ty) else {
            return Err(bad("a line lacks its file name, seq number or type"));
        };
        if name.contains('/') || name.starts_with('"') || name == "." || name == ".." {
            return Err(bad(&format!("file name {name:?} is not a plain file name")));
        }
        match ty {
            "h" => continue,
            "b" => {
                if parts.iter().any(|p: &Part| p.base) {
                    return Err(bad("a second base file"));
                }
                // The base loads first whatever its line's place.
                parts.insert(
                    0,
                    Part {
                        name: name.into(),
                        base: true,
                        seq,
                    },
                );
            }
            "i" => parts.push(Part {
                name: name.into(),
                base: false,
                seq,
            }),
            other => return Err(bad(&format!("unknown file type {other:?}"))),
        }
    }
    if parts.is_empty() {
        return Err(Error::engine(
            ENGINE,
            format!("{}: names no base or incr file", path.display()),
        ));
    }
    Ok(parts)
}

/// The files of an AOF source, in load order, with where each one is.
fn source_parts(src: &Path) -> Result<Vec<(Part, std::path::PathBuf)>> {
    let meta = fs::metadata(src).map_err(|e| Error::io(src, e))?;
    if meta.is_file() {
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "appendonly.aof".into());
        return Ok(vec![(
            Part {
                name,
                base: true,
                seq: 1,
            },
            src.to_owned(),
        )]);
    }
    let manifests: Vec<_> = fs::read_dir(src)
        .map_err(|e| Error::io(src, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "manifest"))
        .collect();
    let manifest = match manifests.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Error::engine(
                ENGINE,
                format!(
                    "{}: no *.manifest in it; give an appendonlydir/ of Redis 7 or a single appendonly.aof",
                    src.display()
                ),
            ));
        }
        _ => {
            return Err(Error::engine(
                ENGINE,
                format!("{}: more than one *.manifest in it", src.display()),
            ));
        }
    };
    let text = fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
    let parts = parse_manifest(&text, &manifest)?;
    parts
        .into_iter()
        .map(|p| {
            let path = src.join(&p.name);
            if !path.is_file() {
                return Err(Error::engine(
                    ENGINE,
                    format!(
                        "{}: byte {}: names {}, which is not in {}",
                        manifest.display(),
                        text.find(&p.name).unwrap_or(0),
                        p.name,
                        src.display()
                    ),
                ));
            }
            Ok((p, path))
        })
        .collect()
}

// The reader.

/// Why an AOF file was rejected; the caller adds the file's name.
#[derive(Debug)]
pub(super) enum AofError {
    Bad {
        offset: u64,
        msg: String,
    },
    Rdb(rdb::RdbError),
    Io(io::Error),
    /// The visitor's own error, passed through.
    Other(Error),
}

impl AofError {
    fn into_error(self, file: &str, set: Option<&str>) -> Error {
        let msg = match self {
            AofError::Other(e) => return e,
            AofError::Io(e) => format!("{file}: {e}"),
            AofError::Bad { offset, msg } => format!("{file}: byte {offset}: {msg}"),
            AofError::Rdb(rdb::RdbError::Visitor(e)) => return e,
            AofError::Rdb(e) => format!("{file}: RDB preamble: {e}"),
        };
        match set {
            Some(set) => Error::corrupt(set, msg),
            None => Error::engine(ENGINE, msg),
        }
    }
}

/// Hands bytes through, keeping the last [`KEEP_TAIL`] of them.
struct Tail<R> {
    inner: R,
    total: u64,
    kept: VecDeque<u8>,
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.total += n as u64;
        self.kept.extend(&buf[..n]);
        let excess = self.kept.len().saturating_sub(KEEP_TAIL);
        self.kept.drain(..excess);
        Ok(n)
    }
}

/// One command: its arguments and the byte offset where it starts.
pub(super) struct Command {
    pub args: Vec<Vec<u8>>,
    pub offset: u64,
}

/// What reading one file sees: the keys of its RDB part, then each command.
pub(super) trait AofVisitor {
    fn rdb_key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()>;
    fn rdb_summary(&mut self, _summary: &rdb::RdbSummary) -> Result<()> {
        Ok(())
    }
    fn command(&mut self, cmd: &Command) -> Result<()>;
}

struct RdbKeys<'a, V: AofVisitor + ?Sized>(&'a mut V);

impl<V: AofVisitor + ?Sized> rdb::Visitor for RdbKeys<'_, V> {
    fn key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        self.0.rdb_key(rec)
    }
}

/// Reads one AOF file: an optional RDB preamble, then RESP commands (and `#` annotation
/// lines). A file cut anywhere but between two commands is an error.
pub(super) fn read_file<R: Read>(
    r: R,
    rdb_opts: &rdb::ParseOptions,
    visitor: &mut (impl AofVisitor + ?Sized),
    cancel: &CancellationToken,
) -> std::result::Result<(), AofError> {
    let mut r = BufReader::with_capacity(1 << 16, r);
    let preamble = r.fill_buf().map_err(AofError::Io)?.starts_with(b"REDIS");
    let mut offset = 0u64;
    let mut rest: Box<dyn BufRead + '_> = if preamble {
        let mut tail = Tail {
            inner: r,
            total: 0,
            kept: VecDeque::new(),
        };
        let summary =
            rdb::read(&mut tail, rdb_opts, &mut RdbKeys(visitor), true).map_err(AofError::Rdb)?;
        visitor.rdb_summary(&summary).map_err(AofError::Other)?;
        let unread = (tail.total - summary.bytes) as usize;
        if unread > tail.kept.len() {
            return Err(AofError::Bad {
                offset: summary.bytes,
                msg: "the RDB preamble's end could not be found again".into(),
            });
        }
        offset = summary.bytes;
        let leftover: Vec<u8> = tail
            .kept
            .range(tail.kept.len() - unread..)
            .copied()
            .collect();
        Box::new(BufReader::new(io::Cursor::new(leftover).chain(tail.inner)))
    } else {
        Box::new(r)
    };
    let mut line = Vec::new();
    let mut n = 0u64;
    loop {
        n += 1;
        if n.is_multiple_of(1024) && cancel.is_cancelled() {
            return Err(AofError::Other(Error::Interrupted(0)));
        }
        let start = offset;
        line.clear();
        let got = read_line(&mut rest, &mut line, &mut offset, start)?;
        if !got {
            return Ok(());
        }
        let bad = |msg: String| AofError::Bad { offset: start, msg };
        match line.first() {
            // Annotations (`#TS:…` with aof-timestamp-enabled) are not commands.
            Some(b'#') => continue,
            Some(b'*') => {}
            _ => {
                return Err(bad(format!(
                    "expected a command (`*<count>`), found {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(20)])
                )));
            }
        }
        let count = number(&line[1..])
            .filter(|c| (1..=MAX_ARGS).contains(c))
            .ok_or_else(|| {
                bad(format!(
                    "bad argument count {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(24)])
                ))
            })?;
        let mut args = Vec::with_capacity(count.min(1024) as usize);
        for _ in 0..count {
            let at = offset;
            line.clear();
            if !read_line(&mut rest, &mut line, &mut offset, start)? {
                return Err(cut(start, offset));
            }
            let len = match line.first() {
                Some(b'$') => number(&line[1..]).filter(|l| *l <= MAX_BULK),
                _ => None,
            }
            .ok_or_else(|| AofError::Bad {
                offset: at,
                msg: format!(
                    "bad bulk length {:?}",
                    String::from_utf8_lossy(&line[..line.len().min(24)])
                ),
            })?;
            let mut arg = Vec::new();
            let got = (&mut rest)
                .take(len + 2)
                .read_to_end(&mut arg)
                .map_err(AofError::Io)?;
            offset += got as u64;
            if (got as u64) < len + 2 {
                return Err(cut(start, offset));
            }
            if !arg.ends_with(b"\r\n") {
                return Err(AofError::Bad {
                    offset: offset - 2,
                    msg: format!("a bulk string of {len} bytes is not followed by CRLF"),
                });
            }
            arg.truncate(len as usize);
            args.push(arg);
        }
        visitor
            .command(&Command {
                args,
                offset: start,
            })
            .map_err(AofError::Other)?;
    }
}

fn cut(start: u64, end: u64) -> AofError {
    AofError::Bad {
        offset: start,
        msg: format!(
            "the file ends at byte {end} in the middle of this command (truncated; dbkeeper does not load a cut last command as aof-load-truncated would)"
        ),
    }
}

/// Reads one `\r\n`-terminated line (without it). False at a clean end of file.
fn read_line(
    r: &mut dyn BufRead,
    line: &mut Vec<u8>,
    offset: &mut u64,
    start: u64,
) -> std::result::Result<bool, AofError> {
    // A header line is short; a longer one is garbage, not a reason to buffer the file.
    let got = r.take(64).read_until(b'\n', line).map_err(AofError::Io)?;
    *offset += got as u64;
    if got == 0 {
        return Ok(false);
    }
    if !line.ends_with(b"\r\n") {
        if got < 64 && !line.ends_with(b"\n") {
            return Err(cut(start, *offset));
        }
        return Err(AofError::Bad {
            offset: *offset - got as u64,
            msg: format!(
                "not a RESP line: {:?}",
                String::from_utf8_lossy(&line[..line.len().min(24)])
            ),
        });
    }
    line.truncate(line.len() - 2);
    Ok(true)
}

fn number(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

// The key-tracking model.

enum Val {
    /// A string, HyperLogLog or other value whose content does not decide its existence.
    Plain,
    /// A collection loaded from an RDB (or RESTORE): its members are not known.
    Opaque,
    List(VecDeque<Vec<u8>>),
    Set(HashSet<Vec<u8>>),
    Hash(HashSet<Vec<u8>>),
    Zset(HashMap<Vec<u8>, f64>),
    /// A stream exists until deleted, even empty.
    Stream,
}

impl Val {
    fn copy(&self) -> Val {
        match self {
            Val::Plain => Val::Plain,
            Val::Opaque => Val::Opaque,
            Val::List(l) => Val::List(l.clone()),
            Val::Set(s) => Val::Set(s.clone()),
            Val::Hash(h) => Val::Hash(h.clone()),
            Val::Zset(z) => Val::Zset(z.clone()),
            Val::Stream => Val::Stream,
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Val::List(l) => l.is_empty(),
            Val::Set(s) | Val::Hash(s) => s.is_empty(),
            Val::Zset(z) => z.is_empty(),
            _ => false,
        }
    }
}

struct Entry {
    val: Val,
    expire_ms: Option<i64>,
}

/// Every key of every db as the commands leave them.
pub(super) struct Model {
    dbs: BTreeMap<u64, HashMap<Vec<u8>, Entry>>,
    db: u64,
    /// False once a command needed members the model does not know.
    pub exact: bool,
    /// The command that made the counts inexact first, for the log.
    pub inexact_because: Option<String>,
    /// The file being read, for messages.
    pub file: String,
}

fn upper(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_ascii_uppercase()
}

impl Model {
    pub fn new() -> Model {
        Model {
            dbs: BTreeMap::new(),
            db: 0,
            exact: true,
            inexact_because: None,
            file: String::new(),
        }
    }

    /// Keys per db alive at `as_of_ms` (a key whose expiry has passed is not counted).
    pub fn counts(&self, as_of_ms: i64) -> Counts {
        self.dbs
            .iter()
            .map(|(db, keys)| {
                let n = keys
                    .values()
                    .filter(|e| e.expire_ms.is_none_or(|t| t > as_of_ms))
                    .count() as u64;
                (rdb::db_key(*db), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Starts a file: the server loads each file of an AOF with a new client, in db 0.
    pub fn begin(&mut self, file: String) {
        self.file = file;
        self.db = 0;
    }

    fn keys(&mut self) -> &mut HashMap<Vec<u8>, Entry> {
        self.dbs.entry(self.db).or_default()
    }

    fn inexact(&mut self, cmd: &str, offset: u64, file: &str) {
        if self.exact {
            self.exact = false;
            self.inexact_because = Some(format!(
                "{file}: byte {offset}: {cmd} removes members dbkeeper does not know (of a collection loaded from the RDB part, whose members are not decoded, or ranked by geohash)"
            ));
        }
    }

    /// The key's entry, created with `make` when absent.
    fn upsert(&mut self, key: &[u8], make: impl FnOnce() -> Val) -> &mut Entry {
        self.keys().entry(key.to_vec()).or_insert_with(|| Entry {
            val: make(),
            expire_ms: None,
        })
    }

    fn set_plain(&mut self, key: &[u8], keep_ttl: bool) {
        let e = self.upsert(key, || Val::Plain);
        e.val = Val::Plain;
        if !keep_ttl {
            e.expire_ms = None;
        }
    }

    /// Drops the key if its collection is now empty.
    fn drop_if_empty(&mut self, key: &[u8]) {
        if self.keys().get(key).is_some_and(|e| e.val.is_empty()) {
            self.keys().remove(key);
        }
    }

    fn apply(&mut self, cmd: &Command) -> Result<()> {
        let file = std::mem::take(&mut self.file);
        let r = self.apply_in(cmd, &file);
        self.file = file;
        r
    }

    fn apply_in(&mut self, cmd: &Command, file: &str) -> Result<()> {
        let a = &cmd.args;
        let name = upper(&a[0]);
        let arity_err = || {
            Error::engine(
                ENGINE,
                format!(
                    "{}: byte {}: {name} with {} arguments is not a command Redis writes to an AOF",
                    file,
                    cmd.offset,
                    a.len() - 1
                ),
            )
        };
        let need = |n: usize| {
            if a.len() < n {
                Err(arity_err())
            } else {
                Ok(())
            }
        };
        match name.as_str() {
            "SELECT" => {
                need(2)?;
                self.db = number(&a[1]).ok_or_else(arity_err)?;
            }
            "MULTI" | "EXEC" | "PING" => {}
            // Functions and scripts are not keys; scripts' effects are written as commands.
            "FUNCTION" | "SCRIPT" => {}
            // Strings and string-like values.
            "SET" => {
                need(3)?;
                let mut expire = None;
                let mut keep = false;
                let mut i = 3;
                while i < a.len() {
                    match upper(&a[i]).as_str() {
                        "KEEPTTL" => keep = true,
                        "PXAT" | "EXAT" | "PX" | "EX" => {
                            let opt = upper(&a[i]);
                            let v = a.get(i + 1).and_then(|v| int(v)).ok_or_else(arity_err)?;
                            expire = Some(match opt.as_str() {
                                "PXAT" => v,
                                "EXAT" => v.saturating_mul(1000),
                                // Relative times only in AOFs of old servers: from when the
                                // command ran, which the file does not say.
                                "PX" => Utc::now().timestamp_millis().saturating_add(v),
                                _ => Utc::now()
                                    .timestamp_millis()
                                    .saturating_add(v.saturating_mul(1000)),
                            });
                            i += 1;
                        }
                        _ => {}
                    }
                    i += 1;
                }
                self.set_plain(&a[1], keep);
                if expire.is_some() {
                    self.keys().get_mut(&a[1][..]).unwrap().expire_ms = expire;
                }
            }
            "SETEX" | "PSETEX" => {
                need(4)?;
                let v = int(&a[2]).ok_or_else(arity_err)?;
                let ms = if name == "SETEX" {
                    v.saturating_mul(1000)
                } else {
                    v
                };
                self.set_plain(&a[1], false);
                self.keys().get_mut(&a[1][..]).unwrap().expire_ms =
                    Some(Utc::now().timestamp_millis().saturating_add(ms));
            }
            "SETNX" | "GETSET" => {
                need(3)?;
                self.set_plain(&a[1], false);
            }
            "APPEND" | "SETRANGE" | "INCR" | "DECR" | "INCRBY" | "DECRBY" | "INCRBYFLOAT"
            | "SETBIT" | "BITFIELD" | "PFADD" => {
                need(2)?;
                self.upsert(&a[1], || Val::Plain);
            }
            // A count may refresh the HyperLogLog's cached cardinality; it creates nothing.
            "PFCOUNT" => need(2)?,
            "PFMERGE" => {
                need(2)?;
                self.upsert(&a[1], || Val::Plain);
            }
            "MSET" | "MSETNX" => {
                if a.len() < 3 || a.len().is_multiple_of(2) {
                    return Err(arity_err());
                }
                for kv in a[1..].chunks(2) {
                    self.set_plain(&kv[0], false);
                }
            }
            "BITOP" => {
                need(4)?;
                let any = a[3..].iter().any(|k| self.keys().contains_key(&k[..]));
                if any {
                    self.set_plain(&a[2], false);
                } else {
                    self.keys().remove(&a[2][..]);
                }
            }
            // Keys.
            "DEL" | "UNLINK" | "GETDEL" => {
                need(2)?;
                for k in &a[1..] {
                    self.keys().remove(&k[..]);
                }
            }
            "RENAME" | "RENAMENX" => {
                need(3)?;
                if let Some(e) = self.keys().remove(&a[1][..]) {
                    self.keys().insert(a[2].clone(), e);
                }
            }
            "MOVE" => {
                need(3)?;
                let to = number(&a[2]).ok_or_else(arity_err)?;
                if let Some(e) = self.keys().remove(&a[1][..]) {
                    self.dbs.entry(to).or_default().insert(a[1].clone(), e);
                }
            }
            "COPY" => {
                need(3)?;
                let mut to = self.db;
                let mut i = 3;
                while i < a.len() {
                    if upper(&a[i]) == "DB" {
                        to = a.get(i + 1).and_then(|v| number(v)).ok_or_else(arity_err)?;
                        i += 1;
                    }
                    i += 1;
                }
                let copy = self.keys().get(&a[1][..]).map(|e| Entry {
                    val: e.val.copy(),
                    expire_ms: e.expire_ms,
                });
                if let Some(e) = copy {
                    self.dbs.entry(to).or_default().insert(a[2].clone(), e);
                }
            }
            "SWAPDB" => {
                need(3)?;
                let x = number(&a[1]).ok_or_else(arity_err)?;
                let y = number(&a[2]).ok_or_else(arity_err)?;
                let dx = self.dbs.remove(&x).unwrap_or_default();
                let dy = self.dbs.remove(&y).unwrap_or_default();
                self.dbs.insert(x, dy);
                self.dbs.insert(y, dx);
            }
            "FLUSHDB" => {
                self.keys().clear();
            }
            "FLUSHALL" => self.dbs.clear(),
            "PEXPIREAT" | "EXPIREAT" | "PEXPIRE" | "EXPIRE" => {
                need(3)?;
                let v = int(&a[2]).ok_or_else(arity_err)?;
                let at = match name.as_str() {
                    "PEXPIREAT" => v,
                    "EXPIREAT" => v.saturating_mul(1000),
                    "PEXPIRE" => Utc::now().timestamp_millis().saturating_add(v),
                    _ => Utc::now()
                        .timestamp_millis()
                        .saturating_add(v.saturating_mul(1000)),
                };
                if let Some(e) = self.keys().get_mut(&a[1][..]) {
                    e.expire_ms = Some(at);
                }
            }
            "PERSIST" => {
                need(2)?;
                if let Some(e) = self.keys().get_mut(&a[1][..]) {
                    e.expire_ms = None;
                }
            }
            "RESTORE" => {
                need(4)?;
                let ttl = int(&a[2]).ok_or_else(arity_err)?;
                let abs = a[4..].iter().any(|o| upper(o) == "ABSTTL");
                let e = self.upsert(&a[1], || Val::Opaque);
                e.val = Val::Opaque;
                e.expire_ms = match (ttl, abs) {
                    (0, _) => None,
                    (t, true) => Some(t),
                    (t, false) => Some(Utc::now().timestamp_millis().saturating_add(t)),
                };
            }
            // Lists.
            "LPUSH" | "RPUSH" | "LPUSHX" | "RPUSHX" => {
                need(3)?;
                let e = self.upsert(&a[1], || Val::List(VecDeque::new()));
                if let Val::List(l) = &mut e.val {
                    for v in &a[2..] {
                        if name.starts_with('L') {
                            l.push_front(v.clone());
                        } else {
                            l.push_back(v.clone());
                        }
                    }
                }
            }
            "LINSERT" => {
                need(5)?;
                let before = upper(&a[2]) == "BEFORE";
                if let Some(Entry {
                    val: Val::List(l), ..
                }) = self.keys().get_mut(&a[1][..])
                    && let Some(i) = l.iter().position(|v| *v == a[3])
                {
                    l.insert(if before { i } else { i + 1 }, a[4].clone());
                }
            }
            "LSET" => need(4)?,
            "LPOP" | "RPOP" => {
                need(2)?;
                let count = match a.get(2) {
                    Some(c) => number(c).ok_or_else(arity_err)?,
                    None => 1,
                };
                match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::List(l)) => {
                        for _ in 0..count {
                            if name == "LPOP" {
                                l.pop_front();
                            } else {
                                l.pop_back();
                            }
                        }
                    }
                    Some(_) => self.inexact(&name, cmd.offset, file),
                    None => {}
                }
                self.drop_if_empty(&a[1]);
            }
            "LMOVE" | "RPOPLPUSH" => {
                need(3)?;
                let (from_left, to_left) = if name == "LMOVE" {
                    need(5)?;
                    (upper(&a[3]) == "LEFT", upper(&a[4]) == "LEFT")
                } else {
                    (false, true)
                };
                let moved = match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::List(l)) => {
                        if from_left {
                            l.pop_front()
                        } else {
                            l.pop_back()
                        }
                    }
                    Some(_) => {
                        self.inexact(&name, cmd.offset, file);
                        Some(Vec::new())
                    }
                    None => None,
                };
                self.drop_if_empty(&a[1]);
                if let Some(v) = moved {
                    let e = self.upsert(&a[2], || Val::List(VecDeque::new()));
                    if let Val::List(l) = &mut e.val {
                        if to_left {
                            l.push_front(v);
                        } else {
                            l.push_back(v);
                        }
                    }
                }
            }
            "LREM" => {
                need(4)?;
                let count = int(&a[2]).ok_or_else(arity_err)?;
                match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::List(l)) => lrem(l, count, &a[3]),
                    Some(_) => self.inexact(&name, cmd.offset, file),
                    None => {}
                }
                self.drop_if_empty(&a[1]);
            }
            "LTRIM" => {
                need(4)?;
                let start = int(&a[2]).ok_or_else(arity_err)?;
                let stop = int(&a[3]).ok_or_else(arity_err)?;
                match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::List(l)) => {
                        let (s, e) = range(l.len(), start, stop);
                        let kept: VecDeque<_> = l.drain(..).skip(s).take(e - s).collect();
                        *l = kept;
                    }
                    Some(_) => self.inexact(&name, cmd.offset, file),
                    None => {}
                }
                self.drop_if_empty(&a[1]);
            }
            // Sets and hashes.
            "SADD" => {
                need(3)?;
                let e = self.upsert(&a[1], || Val::Set(HashSet::new()));
                if let Val::Set(s) = &mut e.val {
                    s.extend(a[2..].iter().cloned());
                }
            }
            "HSET" | "HMSET" | "HSETNX" | "HINCRBY" | "HINCRBYFLOAT" => {
                need(4)?;
                let step = if name.starts_with("HINCR") || name == "HSETNX" {
                    a.len() - 2
                } else {
                    2
                };
                let e = self.upsert(&a[1], || Val::Hash(HashSet::new()));
                if let Val::Hash(h) = &mut e.val {
                    h.extend(a[2..].iter().step_by(step).cloned());
                }
            }
            "SREM" | "HDEL" | "ZREM" => {
                need(3)?;
                match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::Set(s) | Val::Hash(s)) => {
                        for m in &a[2..] {
                            s.remove(m);
                        }
                    }
                    Some(Val::Zset(z)) => {
                        for m in &a[2..] {
                            z.remove(m);
                        }
                    }
                    Some(_) => self.inexact(&name, cmd.offset, file),
                    None => {}
                }
                self.drop_if_empty(&a[1]);
            }
            "SPOP" => {
                // Redis 7 writes SREM; older servers wrote SPOP, whose members were random.
                need(2)?;
                let all = match (self.keys().get(&a[1][..]).map(|e| &e.val), a.get(2)) {
                    (Some(Val::Set(s)), Some(c)) => {
                        number(c).is_some_and(|c| c as usize >= s.len())
                    }
                    (Some(Val::Set(s)), None) => s.len() <= 1,
                    _ => false,
                };
                if all {
                    self.keys().remove(&a[1][..]);
                } else if self.keys().contains_key(&a[1][..]) {
                    self.inexact(&name, cmd.offset, file);
                }
            }
            "SMOVE" => {
                need(4)?;
                let had = match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::Set(s)) => s.remove(&a[3]),
                    Some(_) => {
                        self.inexact(&name, cmd.offset, file);
                        true
                    }
                    None => false,
                };
                self.drop_if_empty(&a[1]);
                if had {
                    let e = self.upsert(&a[2], || Val::Set(HashSet::new()));
                    if let Val::Set(s) = &mut e.val {
                        s.insert(a[3].clone());
                    }
                }
            }
            "SINTERSTORE" | "SUNIONSTORE" | "SDIFFSTORE" => {
                need(3)?;
                let mut srcs = Vec::new();
                let mut known = true;
                for k in &a[2..] {
                    match self.keys().get(&k[..]).map(|e| &e.val) {
                        Some(Val::Set(s)) => srcs.push(Some(s.clone())),
                        Some(_) => known = false,
                        None => srcs.push(None),
                    }
                }
                let result = if known {
                    Val::Set(set_algebra(&name, srcs))
                } else {
                    self.inexact(&name, cmd.offset, file);
                    Val::Opaque
                };
                self.keys().insert(
                    a[1].clone(),
                    Entry {
                        val: result,
                        expire_ms: None,
                    },
                );
                self.drop_if_empty(&a[1]);
            }
            // Sorted sets.
            "ZADD" => {
                need(4)?;
                let mut i = 2;
                let mut xx = false;
                while i < a.len() {
                    match upper(&a[i]).as_str() {
                        "XX" => xx = true,
                        "NX" | "GT" | "LT" | "CH" | "INCR" => {}
                        _ => break,
                    }
                    i += 1;
                }
                if !(a.len() - i).is_multiple_of(2) || i == a.len() {
                    return Err(arity_err());
                }
                if xx && !self.keys().contains_key(&a[1][..]) {
                    return Ok(());
                }
                let e = self.upsert(&a[1], || Val::Zset(HashMap::new()));
                if let Val::Zset(z) = &mut e.val {
                    for sm in a[i..].chunks(2) {
                        let score = parse_score(&sm[0]).unwrap_or(0.0);
                        if xx && !z.contains_key(&sm[1]) {
                            continue;
                        }
                        z.insert(sm[1].clone(), score);
                    }
                }
            }
            "GEOADD" => {
                // GEOADD key [NX|XX] [CH] lon lat member …: a sorted set; the score is the
                // geohash, which no count depends on (ZPOPMIN after GEOADD would).
                need(5)?;
                let mut i = 2;
                let mut xx = false;
                while i < a.len() && matches!(upper(&a[i]).as_str(), "NX" | "XX" | "CH") {
                    xx |= upper(&a[i]) == "XX";
                    i += 1;
                }
                if i == a.len() || !(a.len() - i).is_multiple_of(3) {
                    return Err(arity_err());
                }
                if xx {
                    // Only updates positions of members that exist.
                    return Ok(());
                }
                let e = self.upsert(&a[1], || Val::Zset(HashMap::new()));
                if let Val::Zset(z) = &mut e.val {
                    for t in a[i..].chunks(3) {
                        z.entry(t[2].clone()).or_insert(f64::NAN);
                    }
                }
            }
            "ZINCRBY" => {
                need(4)?;
                let by = parse_score(&a[2]).unwrap_or(0.0);
                let e = self.upsert(&a[1], || Val::Zset(HashMap::new()));
                if let Val::Zset(z) = &mut e.val {
                    *z.entry(a[3].clone()).or_default() += by;
                }
            }
            "ZPOPMIN" | "ZPOPMAX" | "ZREMRANGEBYRANK" | "ZREMRANGEBYSCORE" => {
                need(2)?;
                match self.keys().get_mut(&a[1][..]).map(|e| &mut e.val) {
                    Some(Val::Zset(z)) if z.values().any(|s| s.is_nan()) => {
                        // Members from GEOADD: their scores (geohashes) are not computed.
                        self.inexact(&name, cmd.offset, file)
                    }
                    Some(Val::Zset(z)) => zremove(z, &name, &a[2..]).ok_or_else(arity_err)?,
                    Some(_) => self.inexact(&name, cmd.offset, file),
                    None => {}
                }
                self.drop_if_empty(&a[1]);
            }
            // Streams: a stream stays when its entries are deleted.
            "XADD" => {
                need(3)?;
                let nomk = a[2..].iter().any(|o| upper(o) == "NOMKSTREAM");
                if !nomk {
                    let e = self.upsert(&a[1], || Val::Stream);
                    e.val = Val::Stream;
                }
            }
            "XGROUP" => {
                need(3)?;
                if upper(&a[1]) == "CREATE" && a.iter().any(|o| upper(o) == "MKSTREAM") {
                    self.upsert(&a[2], || Val::Stream);
                }
            }
            "XDEL" | "XTRIM" | "XSETID" | "XACK" | "XCLAIM" | "XAUTOCLAIM" => need(2)?,
            _ => {
                return Err(Error::engine(
                    ENGINE,
                    format!(
                        "{}: byte {}: command {name} is not one dbkeeper models (it cannot tell which keys it leaves); refusing rather than guessing the counts",
                        file, cmd.offset
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl AofVisitor for Model {
    fn rdb_key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        self.dbs.entry(rec.db).or_default().insert(
            rec.key.to_vec(),
            Entry {
                val: Val::Opaque,
                expire_ms: rec.expire_ms,
            },
        );
        Ok(())
    }

    fn command(&mut self, cmd: &Command) -> Result<()> {
        self.apply(cmd)
    }
}

/// `[start, end)` of Redis's inclusive, possibly negative `start stop` over `len` items.
fn range(len: usize, start: i64, stop: i64) -> (usize, usize) {
    let len_i = len as i64;
    let s = if start < 0 {
        (len_i + start).max(0)
    } else {
        start
    };
    let e = if stop < 0 {
        len_i + stop
    } else {
        stop.min(len_i - 1)
    };
    if s > e || s >= len_i {
        (0, 0)
    } else {
        (s as usize, e as usize + 1)
    }
}

fn lrem(l: &mut VecDeque<Vec<u8>>, count: i64, v: &[u8]) {
    let mut left = if count == 0 {
        usize::MAX
    } else {
        count.unsigned_abs() as usize
    };
    if count >= 0 {
        l.retain(|x| {
            if left > 0 && x == v {
                left -= 1;
                false
            } else {
                true
            }
        });
    } else {
        let mut kept: VecDeque<_> = VecDeque::with_capacity(l.len());
        while let Some(x) = l.pop_back() {
            if left > 0 && x == v {
                left -= 1;
            } else {
                kept.push_front(x);
            }
        }
        *l = kept;
    }
}

fn set_algebra(name: &str, srcs: Vec<Option<HashSet<Vec<u8>>>>) -> HashSet<Vec<u8>> {
    let mut it = srcs.into_iter();
    let first = it.next().flatten().unwrap_or_default();
    match name {
        "SUNIONSTORE" => it.flatten().fold(first, |mut acc, s| {
            acc.extend(s);
            acc
        }),
        "SINTERSTORE" => it.fold(first, |acc, s| match s {
            Some(s) => acc.intersection(&s).cloned().collect(),
            None => HashSet::new(),
        }),
        _ => it
            .flatten()
            .fold(first, |acc, s| acc.difference(&s).cloned().collect()),
    }
}

fn parse_score(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    match s.to_ascii_lowercase().as_str() {
        "inf" | "+inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// A score bound of ZREMRANGEBYSCORE: `(5` is exclusive.
fn bound(b: &[u8]) -> Option<(f64, bool)> {
    match b.strip_prefix(b"(") {
        Some(rest) => Some((parse_score(rest)?, true)),
        None => Some((parse_score(b)?, false)),
    }
}

/// Removes what ZPOPMIN/ZPOPMAX/ZREMRANGEBYRANK/ZREMRANGEBYSCORE remove. None: bad arguments.
fn zremove(z: &mut HashMap<Vec<u8>, f64>, name: &str, args: &[Vec<u8>]) -> Option<()> {
    let mut order: Vec<(f64, Vec<u8>)> = z.iter().map(|(m, s)| (*s, m.clone())).collect();
    order.sort_by(|x, y| x.0.total_cmp(&y.0).then_with(|| x.1.cmp(&y.1)));
    let gone: Vec<Vec<u8>> = match name {
        "ZPOPMIN" | "ZPOPMAX" => {
            let count = match args.first() {
                Some(c) => number(c)? as usize,
                None => 1,
            };
            if name == "ZPOPMAX" {
                order.reverse();
            }
            order.into_iter().take(count).map(|x| x.1).collect()
        }
        "ZREMRANGEBYRANK" => {
            let (s, e) = range(order.len(), int(args.first()?)?, int(args.get(1)?)?);
            order[s..e].iter().map(|x| x.1.clone()).collect()
        }
        _ => {
            let (min, min_ex) = bound(args.first()?)?;
            let (max, max_ex) = bound(args.get(1)?)?;
            order
                .into_iter()
                .filter(|(s, _)| {
                    (if min_ex { *s > min } else { *s >= min })
                        && (if max_ex { *s < max } else { *s <= max })
                })
                .map(|x| x.1)
                .collect()
        }
    };
    for m in gone {
        z.remove(&m);
    }
    Some(())
}

// Import.

/// Makes the Redis part of a set from an AOF source: `src` is a Redis 7 `appendonlydir/`
/// (read through its manifest) or a single `appendonly.aof` (possibly with an RDB preamble).
/// Every file is parsed while it is stored; any fault refuses the import with one line naming
/// the file and the byte offset, and the set writer (dropped unpublished) removes what was
/// written.
pub fn import_aof(
    src: &Path,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let started_at = Utc::now();
    let parts = source_parts(src)?;
    let mut model = Model::new();
    let mut files = Vec::new();
    let mut described = Vec::new();
    let mut rdb_version = None;
    // The writer's version is known only from an RDB part's `redis-ver` field.
    let mut server_version = String::from("unknown");
    for (part, path) in &parts {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut head = [0u8; 5];
        let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
        let has_rdb = &head[..n] == b"REDIS";
        f.rewind().map_err(|e| Error::io(path, e))?;
        let mut art = out.create(&format!("{STORED_DIR}/{}", part.name), 0)?;
        let tee = Tee {
            inner: f,
            out: &mut art,
            cancel,
        };
        model.begin(path.display().to_string());
        let mut v = Versioned {
            model: &mut model,
            version: None,
            redis_ver: None,
        };
        let r = read_file(tee, &DEEP, &mut v, cancel);
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        r.map_err(|e| e.into_error(&path.display().to_string(), None))?;
        if let Some(ver) = v.version {
            rdb_version = Some(ver);
        }
        if let Some(ver) = v.redis_ver {
            server_version = ver;
        }
        let raw = art.raw_bytes();
        files.push(art.finish()?);
        described.push(serde_json::json!({
            "path": part.stored(),
            "name": part.name,
            "type": if part.base { "base" } else { "incr" },
            "seq": part.seq,
            "rdb_preamble": has_rdb,
            "bytes": raw,
        }));
    }
    let as_of = Utc::now().timestamp_millis();
    let counts = model.counts(as_of);
    if let Some(why) = &model.inexact_because {
        warn!(engine = ENGINE, "counts are not exact: {why}");
    }
    info!(
        engine = ENGINE,
        source = %src.display(),
        files = parts.len(),
        keys = counts.values().sum::<u64>(),
        "AOF imported"
    );
    Ok(EngineEntry {
        source: src.display().to_string(),
        server_version,
        started_at,
        finished_at: Utc::now(),
        files,
        counts,
        details: serde_json::json!({
            "format": FORMAT_AOF,
            "layout": if src.is_file() { "single-file" } else { "multi-part" },
            "aof_files": described,
            "rdb_version": rdb_version,
            "counts_as_of_ms": as_of,
            "counts_exact": model.exact,
        }),
    })
}

const DEEP: rdb::ParseOptions = rdb::ParseOptions {
    decode_values: true,
    capture_payload: false,
};

/// Copies what is read into the artifact; reads fail once the job is cancelled (the RDB part
/// is read without looking at the token).
struct Tee<'a, R> {
    inner: R,
    out: &'a mut crate::repo::writer::ArtifactWriter,
    cancel: &'a CancellationToken,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other("interrupted"));
        }
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

struct Versioned<'a> {
    model: &'a mut Model,
    version: Option<u32>,
    redis_ver: Option<String>,
}

impl AofVisitor for Versioned<'_> {
    fn rdb_key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        self.model.rdb_key(rec)
    }
    fn rdb_summary(&mut self, s: &rdb::RdbSummary) -> Result<()> {
        self.version = Some(s.version);
        self.redis_ver = s.redis_ver.clone();
        Ok(())
    }
    fn command(&mut self, cmd: &Command) -> Result<()> {
        self.model.apply(cmd)
    }
}

// The set's side: its parts, deep verify, preseed.

/// The set's AOF files in load order, from `details.aof_files`.
pub(super) fn set_parts(set: &SetReader, entry: &EngineEntry) -> Result<Vec<(Part, bool)>> {
    let bad = |why: &str| Error::corrupt(set.id(), format!("its redis AOF part: {why}"));
    let list = entry
        .details
        .get("aof_files")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("details.aof_files is missing"))?;
    let mut parts = Vec::new();
    for f in list {
        let name = f
            .get("name")
            .and_then(|v| v.as_str())
            .filter(|n| !n.contains('/') && !n.is_empty() && *n != "." && *n != "..")
            .ok_or_else(|| bad("a file without a plain name"))?;
        let part = Part {
            name: name.into(),
            base: f.get("type").and_then(|v| v.as_str()) == Some("base"),
            seq: f.get("seq").and_then(|v| v.as_u64()).unwrap_or(1),
        };
        if entry.file(&part.stored()).is_none() {
            return Err(bad(&format!("{} is not among its files", part.stored())));
        }
        let preamble = f.get("rdb_preamble").and_then(|v| v.as_bool()) == Some(true);
        parts.push((part, preamble));
    }
    // A manifest may have no base (the server started AOF on an empty dataset); a base is
    // loaded first.
    if parts.is_empty() || parts.iter().skip(1).any(|p| p.0.base) {
        return Err(bad("it needs its files, the base (if any) first"));
    }
    Ok(parts)
}

fn as_of(entry: &EngineEntry) -> i64 {
    entry
        .details
        .get("counts_as_of_ms")
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| entry.finished_at.timestamp_millis())
}

/// Re-reads every stored AOF file (checksums, RDB records, commands) and recomputes the counts.
pub(super) fn verify_aof(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let mut model = Model::new();
    for (part, _) in set_parts(set, entry)? {
        let file = entry.file(&part.stored()).expect("checked by set_parts");
        let mut reader = set.open_file(file)?;
        model.begin(part.stored());
        let input = super::verify::Cancellable::new(&mut reader, cancel);
        let r = read_file(input, &DEEP, &mut model, cancel);
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        r.map_err(|e| e.into_error(&part.stored(), Some(set.id())))?;
        reader.finish()?;
    }
    Ok(model.counts(as_of(entry)))
}

/// Writes an AOF set into an empty data directory as `appendonlydir/` with the file names and
/// manifest of a server running with the default `appendfilename appendonly.aof`. The files are
/// written under a temp directory, each checked (checksum, and parsed again from disk), and
/// only then is the directory renamed into place.
pub(super) fn preseed_aof(dir: &Path, set: &SetReader, entry: &EngineEntry) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).map_err(|e| dir_error(dir, e))?;
    let owner = (meta.uid(), meta.gid());
    let parts = set_parts(set, entry)?;
    let tmp = dir.join(format!("{TMP_AOF}{}", std::process::id()));
    let start = std::time::Instant::now();
    let built = (|| -> Result<u64> {
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut manifest = String::new();
        let mut bytes = 0;
        let mut model = Model::new();
        let never = CancellationToken::new();
        for (part, preamble) in &parts {
            let file = entry.file(&part.stored()).expect("checked by set_parts");
            let name = part.server_name(*preamble);
            let path = tmp.join(&name);
            bytes += write_checked(set, file, &path)?;
            model.begin(part.stored());
            let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            read_file(f, &DEEP, &mut model, &never)
                .map_err(|e| e.into_error(&part.stored(), Some(set.id())))?;
            chown_like(&path, owner)?;
            manifest.push_str(&format!(
                "file {name} seq {} type {}\n",
                part.seq,
                if part.base { "b" } else { "i" }
            ));
        }
        if entry.details.get("counts_exact") != Some(&serde_json::Value::Bool(false)) {
            let counts = model.counts(as_of(entry));
            if counts != entry.counts {
                return Err(Error::corrupt(
                    set.id(),
                    format!(
                        "its AOF files give {counts:?}, its manifest says {:?}",
                        entry.counts
                    ),
                ));
            }
        }
        let mpath = tmp.join("appendonly.aof.manifest");
        File::create(&mpath)
            .and_then(|mut f| f.write_all(manifest.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(|e| Error::io(&mpath, e))?;
        chown_like(&mpath, owner)?;
        chown_like(&tmp, owner)?;
        fsync_path(&tmp)?;
        Ok(bytes)
    })();
    let bytes = match built {
        Ok(b) => b,
        Err(e) => {
            // A set that fails any check leaves nothing behind.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    super::datadir::install_aof_dir(dir, &tmp)?;
    info!(
        engine = ENGINE,
        dir = %dir.display(),
        set = set.id(),
        bytes,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "data directory preseeded (appendonlydir/ from an AOF set; start the server with appendonly yes)"
    );
    Ok(())
}

// Online restore: the RDB part through RESTORE, then every command replayed.

struct Replay<'a> {
    restorer: super::restore::Restorer<'a>,
    model: Model,
    pipe: redis::Pipeline,
    queued: usize,
    queued_bytes: usize,
    /// The db the connection is in once the queued commands have run.
    selected: Option<u64>,
    restoring_keys: bool,
    commands: u64,
    cancel: &'a CancellationToken,
    cfg: &'a super::RedisConfig,
}

impl Replay<'_> {
    fn flush(&mut self) -> Result<()> {
        if self.queued == 0 {
            return Ok(());
        }
        let r: redis::RedisResult<()> = self.pipe.query(self.restorer.connection());
        self.pipe.clear();
        self.queued = 0;
        self.queued_bytes = 0;
        r.map_err(|e| {
            if e.code().is_some() {
                Error::engine(
                    ENGINE,
                    format!("the target refused a replayed command: {e}"),
                )
            } else {
                super::restore::client_error(self.cfg, e)
            }
        })
    }
}

impl Replay<'_> {
    /// The restore marker lives in db 0 while the restore runs (see `set_marker`): a replayed
    /// FLUSHALL, FLUSHDB of db 0 or SWAPDB with db 0 would drop it or carry it into another db,
    /// so it is put back in db 0 (and deleted where a swap carried it) right after.
    fn keep_marker(&mut self, name: &str, db: u64, cmd: &Command) {
        let swapped = if name == "SWAPDB" {
            let x = number(&cmd.args[1]);
            let y = number(&cmd.args[2]);
            match (x, y) {
                (Some(0), Some(o)) | (Some(o), Some(0)) if o != 0 => Some(o),
                _ => return,
            }
        } else if name == "FLUSHALL" || (name == "FLUSHDB" && db == 0) {
            None
        } else {
            return;
        };
        if let Some(other) = swapped {
            self.pipe.cmd("SELECT").arg(other).ignore();
            self.pipe.cmd("DEL").arg(rdb::MARKER_KEY).ignore();
        }
        let now = Utc::now().to_rfc3339();
        self.pipe.cmd("SELECT").arg(0).ignore();
        self.pipe
            .cmd("SET")
            .arg(rdb::MARKER_KEY)
            .arg(now.as_bytes())
            .ignore();
        self.selected = Some(0);
    }
}

impl AofVisitor for Replay<'_> {
    fn rdb_key(&mut self, rec: &rdb::KeyRecord<'_>) -> Result<()> {
        self.model.rdb_key(rec)?;
        self.restoring_keys = true;
        rdb::Visitor::key(&mut self.restorer, rec)
    }

    fn command(&mut self, cmd: &Command) -> Result<()> {
        if self.restoring_keys {
            self.restorer.flush_now()?;
            self.restoring_keys = false;
            self.selected = None;
        }
        self.commands += 1;
        if self.commands.is_multiple_of(1024) && self.cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let name = upper(&cmd.args[0]);
        // The model checks the command first: nothing it refuses reaches the target.
        let db = self.model.db;
        self.model.apply(cmd)?;
        // The replay selects dbs itself; a transaction's commands are sent one by one (nothing
        // else writes to the target while it is restored).
        if matches!(name.as_str(), "SELECT" | "MULTI" | "EXEC") {
            return Ok(());
        }
        if self.selected != Some(db) {
            self.pipe.cmd("SELECT").arg(db).ignore();
            self.selected = Some(db);
        }
        let c = self.pipe.cmd(&name);
        for arg in &cmd.args[1..] {
            c.arg(&arg[..]);
            self.queued_bytes += arg.len();
        }
        c.ignore();
        self.queued += 1;
        self.keep_marker(&name, db, cmd);
        if self.queued >= super::BATCH_KEYS || self.queued_bytes >= super::BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

/// Restores an AOF set into a running server: the base's RDB part key by key through the
/// pipelined RESTORE path, then every command as the server would load it, pipelined.
pub(super) fn replay(
    cfg: &super::RedisConfig,
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let parts = set_parts(set, entry)?;
    let rdb_version = entry
        .details
        .get("rdb_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(u64::from(rdb::MAX_VERSION)) as u16;
    let mut r = Replay {
        restorer: super::restore::Restorer::new(cfg, cancel, rdb_version, &entry.server_version)?,
        model: Model::new(),
        pipe: redis::pipe(),
        queued: 0,
        queued_bytes: 0,
        selected: None,
        restoring_keys: false,
        commands: 0,
        cancel,
        cfg,
    };
    let start = std::time::Instant::now();
    let opts = rdb::ParseOptions {
        decode_values: false,
        capture_payload: true,
    };
    for (part, _) in &parts {
        let file = entry.file(&part.stored()).expect("checked by set_parts");
        let mut reader = set.open_file(file)?;
        r.model.begin(part.stored());
        r.selected = None;
        let res = read_file(&mut reader, &opts, &mut r, cancel);
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        res.map_err(|e| e.into_error(&part.stored(), Some(set.id())))?;
        reader.finish()?;
        if r.restoring_keys {
            r.restorer.flush_now()?;
            r.restoring_keys = false;
        }
        r.flush()?;
    }
    info!(
        engine = ENGINE,
        commands = r.commands,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "AOF replayed"
    );
    Ok(r.model.counts(as_of(entry)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(cmds: &[&[&str]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in cmds {
            out.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
            for a in *c {
                out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        }
        out
    }

    fn model_of(bytes: &[u8]) -> std::result::Result<Model, AofError> {
        let mut m = Model::new();
        m.begin("t.aof".into());
        read_file(bytes, &DEEP, &mut m, &CancellationToken::new())?;
        Ok(m)
    }

    fn counts(m: &Model) -> Vec<(String, u64)> {
        m.counts(Utc::now().timestamp_millis())
            .into_iter()
            .collect()
    }

    #[test]
    fn manifests_load_the_base_first_and_skip_history() {
        let text = "file appendonly.aof.2.incr.aof seq 2 type i\n\
                    file appendonly.aof.1.base.rdb seq 1 type b\n\
                    file appendonly.aof.0.base.aof seq 0 type h\n\
                    file appendonly.aof.3.incr.aof seq 3 type i startoffset 0\n";
        let parts = parse_manifest(text, Path::new("m")).unwrap();
        let names: Vec<_> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "appendonly.aof.1.base.rdb",
                "appendonly.aof.2.incr.aof",
                "appendonly.aof.3.incr.aof"
            ]
        );
        assert_eq!(parts[0].server_name(true), "appendonly.aof.1.base.rdb");
        for bad in [
            "file x seq 1\n",
            "file x seq 1 type q\n",
            "file ../x seq 1 type b\n",
            "file a seq 1 type b\nfile b seq 2 type b\n",
            "",
        ] {
            let e = parse_manifest(bad, Path::new("m")).unwrap_err().to_string();
            assert!(e.contains("m:") && !e.contains('\n'), "{bad:?}: {e}");
        }
    }

    /// Past expiries (relative to the count's time) do not count; a transaction, lowercase
    /// names, annotations and db switches are followed; each file starts in db 0.
    #[test]
    fn the_model_follows_expiry_dbs_and_transactions() {
        let past = (Utc::now().timestamp_millis() - 1000).to_string();
        let future = (Utc::now().timestamp_millis() + 3_600_000).to_string();
        let mut bytes = b"#TS:1700000000\r\n".to_vec();
        bytes.extend(resp(&[
            &["SELECT", "0"],
            &["set", "a", "1"],
            &["SET", "b", "1", "PXAT", &past],
            &["SET", "c", "1", "PXAT", &future],
            &["SET", "d", "1"],
            &["PEXPIREAT", "d", &past],
            &["MULTI"],
            &["SELECT", "3"],
            &["SADD", "s", "x", "y"],
            &["SMOVE", "s", "s2", "x"],
            &["SREM", "s", "y"],
            &["EXEC"],
            &["RPUSH", "l", "a", "b", "c"],
            &["LTRIM", "l", "-1", "-1"],
            &["LREM", "l", "-1", "c"],
            &["ZADD", "z", "1", "a", "2", "b"],
            &["ZREMRANGEBYRANK", "z", "0", "0"],
            &["ZPOPMAX", "z"],
            &["HSET", "h", "f", "v"],
        ]));
        let m = model_of(&bytes).unwrap();
        assert!(m.exact);
        assert_eq!(counts(&m), [("db0".to_string(), 2), ("db3".to_string(), 2)]);
    }

    #[test]
    fn removing_members_of_an_rdb_collection_marks_the_counts_inexact() {
        let mut m = Model::new();
        m.begin("t".into());
        m.rdb_key(&rdb::KeyRecord {
            db: 0,
            key: b"s",
            expire_ms: None,
            payload: b"",
        })
        .unwrap();
        let c = |args: &[&str]| Command {
            args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
            offset: 7,
        };
        m.apply(&c(&["SADD", "s", "x"])).unwrap();
        assert!(m.exact);
        m.apply(&c(&["SREM", "s", "x"])).unwrap();
        assert!(!m.exact);
        assert!(
            m.inexact_because
                .as_ref()
                .unwrap()
                .contains("t: byte 7: SREM")
        );
        let e = m
            .apply(&c(&["SORT", "s", "STORE", "d"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t: byte 7: command SORT"), "{e}");
        let e = m.apply(&c(&["SET", "k"])).unwrap_err().to_string();
        assert!(e.contains("SET with 1 arguments"), "{e}");
    }

    #[test]
    fn broken_files_fail_with_the_offset() {
        let good = resp(&[&["SET", "a", "1"], &["SET", "b", "2"]]);
        assert!(model_of(&good).is_ok());
        let second = 4 + 9 + 7 + 7;
        let cases: Vec<(Vec<u8>, u64, &str)> = vec![
            (good[..good.len() - 1].to_vec(), second, "truncated"),
            (good[..second as usize + 3].to_vec(), second, "truncated"),
            (
                good.iter().copied().chain(*b"*1\r\n").collect(),
                54,
                "truncated",
            ),
            (b"*2\r\n$3\r\nDEL\r\n$1\r\nkk\r\n".to_vec(), 18, "CRLF"),
            (b"*2\r\n$-1\r\n".to_vec(), 4, "bulk length"),
            (b"*0\r\n".to_vec(), 0, "argument count"),
            (b"hello\r\n".to_vec(), 0, "expected a command"),
            (vec![b'x'; 200], 0, "not a RESP line"),
            (b"REDIS0011\xfe\x00".to_vec(), 0, "RDB preamble"),
        ];
        for (bytes, offset, what) in cases {
            let e = model_of(&bytes).err().expect("refused");
            let msg = e.into_error("t.aof", None).to_string();
            assert!(msg.contains(what) && msg.contains("t.aof"), "{msg}");
            if what != "RDB preamble" {
                assert!(msg.contains(&format!("byte {offset}:")), "{msg}");
            }
        }
    }

    #[test]
    fn ranges_follow_redis() {
        assert_eq!(range(4, 0, 1), (0, 2));
        assert_eq!(range(4, -1, -1), (3, 4));
        assert_eq!(range(4, 5, 10), (0, 0));
        assert_eq!(range(4, 2, 1), (0, 0));
        assert_eq!(range(4, -10, 100), (0, 4));
    }
}
