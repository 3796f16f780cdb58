//! `import` of a stock mongodump: a dump directory (plain or `--gzip`, with `oplog.bson` when
//! present) or a `mongodump --archive` file (plain or gzip). Every document is read and checked
//! and the set is written in the layout a dbkeeper dump has, so a restore or preseed cannot tell
//! the two apart. Counts come from the documents read, never from the metadata.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use chrono::Utc;
use mongodb::bson::{Document, RawDocumentBuf};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::bsonfile::{self, DocReader, StreamError};
use super::dump::OPLOG_FILE;
use super::metadata::{Kind, Metadata};
use super::names::{escape, is_dumped_collection, is_system_db, unescape};
use super::pitr::OpTime;
use super::{AuthzEntry, CollectionEntry, Details, ENGINE, OplogSlice};
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::{EngineEntry, FileEntry};
use crate::repo::writer::EngineWriter;

/// The first four bytes of a `mongodump --archive` file (0x8199e26d, little-endian).
pub const ARCHIVE_MAGIC: [u8; 4] = [0x6d, 0xe2, 0x99, 0x81];
/// The first two bytes of a gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// What ends the archive's prelude and each of its namespace blocks.
const TERMINATOR: [u8; 4] = [0xff; 4];

const CONSISTENCY: &str = "imported from a stock mongodump: as consistent as that dump was (with oplog.bson, replayed after the collections on restore)";

/// Whether `path` is a `mongodump --archive` file, plain or gzip (by its magic bytes).
pub fn is_archive(path: &Path) -> bool {
    let mut head = [0u8; 4];
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    if head == ARCHIVE_MAGIC {
        return true;
    }
    if head[..2] == GZIP_MAGIC {
        let Ok(f) = File::open(path) else {
            return false;
        };
        let mut d = flate2::read::MultiGzDecoder::new(f);
        return d.read_exact(&mut head).is_ok() && head == ARCHIVE_MAGIC;
    }
    false
}

/// What a dump directory's file names say: `(stem, kind, gzip)`.
fn classify(name: &str) -> Option<(&str, FileKind, bool)> {
    for (suffix, kind, gz) in [
        (".metadata.json.gz", FileKind::Metadata, true),
        (".metadata.json", FileKind::Metadata, false),
        (".bson.gz", FileKind::Data, true),
        (".bson", FileKind::Data, false),
    ] {
        if let Some(stem) = name.strip_suffix(suffix)
            && !stem.is_empty()
        {
            return Some((stem, kind, gz));
        }
    }
    None
}

/// A file of a dump directory and whether it is gzipped.
type DumpFile = (std::path::PathBuf, bool);

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Metadata,
    Data,
}

/// Whether `dir` looks like a mongodump directory: an `oplog.bson`, or a sub-directory holding
/// `.bson` or `.metadata.json` files (gzip or not).
pub fn looks_like_dump(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "oplog.bson" || name == "oplog.bson.gz" {
            return true;
        }
        e.path().is_dir()
            && std::fs::read_dir(e.path()).is_ok_and(|rd| {
                rd.flatten()
                    .any(|f| classify(&f.file_name().to_string_lossy()).is_some())
            })
    })
}

fn open_maybe_gz(path: &Path, gz: bool) -> Result<Box<dyn Read>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let r = BufReader::with_capacity(1 << 20, f);
    Ok(if gz {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    })
}

fn refused(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Error {
    Error::engine(ENGINE, format!("{what}: {why}; nothing imported"))
}

/// Index options today's servers accept (mongorestore's list); others (e.g. `safe` from
/// MongoDB 2.x dumps) make `createIndexes` fail.
const INDEX_OPTIONS: [&str; 26] = [
    "v",
    "key",
    "name",
    "ns",
    "background",
    "unique",
    "sparse",
    "expireAfterSeconds",
    "partialFilterExpression",
    "storageEngine",
    "weights",
    "default_language",
    "language_override",
    "textIndexVersion",
    "2dsphereIndexVersion",
    "bits",
    "min",
    "max",
    "bucketSize",
    "collation",
    "wildcardProjection",
    "hidden",
    "clustered",
    "prepareUnique",
    "coarsestIndexedLevel",
    "finestIndexedLevel",
];

/// Makes an old dump's index spec one a v:2 index accepts, as `mongorestore
/// --convertLegacyIndexes` does: key values that are not a non-zero number or a non-empty
/// string become 1, a Decimal128 direction becomes a double, unknown options are dropped.
/// Returns whether anything changed.
fn convert_legacy_index(index: &mut Document) -> bool {
    use mongodb::bson::Bson;
    let mut changed = false;
    if let Ok(key) = index.get_document_mut("key") {
        for (_, v) in key.iter_mut() {
            let fixed = match &*v {
                Bson::Int32(n) if *n != 0 => None,
                Bson::Int64(n) if *n != 0 => None,
                Bson::Double(n) if *n != 0.0 && n.is_finite() => None,
                Bson::String(s) if !s.is_empty() => None,
                Bson::Decimal128(d) => match d.to_string().parse::<f64>() {
                    Ok(n) if n != 0.0 && n.is_finite() => Some(Bson::Double(n)),
                    _ => Some(Bson::Int32(1)),
                },
                _ => Some(Bson::Int32(1)),
            };
            if let Some(f) = fixed {
                *v = f;
                changed = true;
            }
        }
    }
    let unknown: Vec<String> = index
        .keys()
        .filter(|k| !INDEX_OPTIONS.contains(&k.as_str()))
        .cloned()
        .collect();
    for k in &unknown {
        index.remove(k);
    }
    changed || !unknown.is_empty()
}

/// The set being filled: files, details and counts, as [`super::dump`] fills them.
struct Builder<'a> {
    out: &'a EngineWriter,
    cancel: &'a CancellationToken,
    files: Vec<FileEntry>,
    details: Details,
    counts: Counts,
}

impl<'a> Builder<'a> {
    fn new(out: &'a EngineWriter, cancel: &'a CancellationToken) -> Self {
        Builder {
            out,
            cancel,
            files: Vec::new(),
            details: Details {
                consistency: CONSISTENCY.to_owned(),
                collections: Vec::new(),
                oplog: None,
                authz: None,
            },
            counts: Counts::new(),
        }
    }

    /// Parses a metadata file's bytes (empty: none, as mongorestore reads it).
    fn metadata(what: &str, bytes: &[u8], db: &str, name: &str) -> Result<Metadata> {
        let mut meta = if bytes.iter().all(u8::is_ascii_whitespace) {
            Metadata {
                collection_name: None,
                kind: Kind::Collection,
                options: Document::new(),
                indexes: Vec::new(),
                uuid: None,
            }
        } else {
            Metadata::parse(bytes).map_err(|e| refused(what, format!("metadata: {e}")))?
        };
        if meta.collection_name.is_none() {
            meta.collection_name = Some(name.to_owned());
        }
        for index in &mut meta.indexes {
            if convert_legacy_index(index) {
                warn!(
                    engine = ENGINE,
                    db,
                    collection = name,
                    index = index.get_str("name").unwrap_or("?"),
                    "a legacy index spec (key values or options today's servers refuse) converted, as mongorestore --convertLegacyIndexes does"
                );
            }
        }
        Ok(meta)
    }

    /// Copies one BSON stream into the set, every document checked; returns the file and
    /// the number of documents. `what` names the source in errors.
    fn copy_docs(&self, what: &str, rel: &str, input: &mut dyn Read) -> Result<(FileEntry, u64)> {
        self.copy_docs_with(what, rel, input, &mut |_| {})
    }

    fn copy_docs_with(
        &self,
        what: &str,
        rel: &str,
        input: &mut dyn Read,
        on_doc: &mut dyn FnMut(&RawDocumentBuf),
    ) -> Result<(FileEntry, u64)> {
        let mut w = self.out.create(rel, 0)?;
        let mut docs = DocReader::new(input);
        let mut offset = 0u64;
        loop {
            let doc = match docs.next_doc() {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(StreamError::Invalid { index, why, .. }) => {
                    return Err(refused(
                        what,
                        format!("document #{index} at byte {offset}: {why}"),
                    ));
                }
                Err(StreamError::Io(e)) => {
                    return Err(refused(what, format!("at byte {offset}: {e}")));
                }
            };
            bsonfile::validate(&doc).map_err(|e| {
                refused(
                    what,
                    format!("document #{} at byte {offset}: {e}", docs.count() - 1),
                )
            })?;
            offset += doc.as_bytes().len() as u64;
            on_doc(&doc);
            w.write_all(doc.as_bytes())
                .map_err(|e| Error::io(self.out.dir().join(rel), e))?;
            if docs.count().is_multiple_of(4096) && self.cancel.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
        }
        let n = docs.count();
        Ok((w.finish()?, n))
    }

    fn add_collection(
        &mut self,
        db: &str,
        name: &str,
        meta: Metadata,
        data: Option<(FileEntry, u64)>,
    ) -> Result<()> {
        let base = format!("{db}/{}", escape(name));
        let mut w = self.out.create(&format!("{base}.metadata.json"), 0)?;
        w.write_all(&meta.to_json())
            .map_err(|e| Error::io(self.out.dir().join(&base), e))?;
        let mf = w.finish()?;
        let mut entry = CollectionEntry {
            db: db.to_owned(),
            name: name.to_owned(),
            kind: meta.kind.name().to_owned(),
            metadata: mf.path.clone(),
            data: None,
        };
        self.files.push(mf);
        if let Some((f, n)) = data {
            entry.data = Some(f.path.clone());
            self.counts.insert(format!("{db}.{name}"), n);
            self.files.push(f);
        }
        self.details.collections.push(entry);
        Ok(())
    }

    /// Users or roles (`admin.system.users` / `admin.system.roles`).
    fn add_authz(&mut self, what: &str, coll: &str, input: &mut dyn Read) -> Result<()> {
        let rel = format!("admin/{coll}.bson");
        let (f, n) = self.copy_docs(what, &rel, input)?;
        let a = self.details.authz.get_or_insert(AuthzEntry {
            users: 0,
            roles: 0,
            users_file: None,
            roles_file: None,
        });
        if coll == "system.users" {
            a.users = n;
            a.users_file = Some(f.path.clone());
        } else {
            a.roles = n;
            a.roles_file = Some(f.path.clone());
        }
        self.files.push(f);
        Ok(())
    }

    /// The dump's oplog: replayed after the collections on restore, as `mongorestore
    /// --oplogReplay` does. An empty one is left out.
    fn add_oplog(&mut self, what: &str, input: &mut dyn Read) -> Result<()> {
        let mut input = std::io::BufReader::new(input);
        if std::io::BufRead::fill_buf(&mut input)
            .map_err(|e| refused(what, e))?
            .is_empty()
        {
            info!(
                engine = ENGINE,
                file = what,
                "the dump's oplog is empty: left out"
            );
            return Ok(());
        }
        let input: &mut dyn Read = &mut input;
        // The slice's end is its newest entry's position.
        let mut last = OpTime::ZERO;
        let (f, n) = self.copy_docs_with(what, OPLOG_FILE, input, &mut |d| {
            if let Ok(ts) = d.get_timestamp("ts") {
                last = last.max(OpTime {
                    t: ts.time,
                    i: ts.increment,
                });
            }
        })?;
        self.details.oplog = Some(OplogSlice {
            start: OpTime::ZERO,
            end: last,
            entries: n,
            file: f.path.clone(),
        });
        self.files.push(f);
        Ok(())
    }

    fn finish(mut self, source: &Path, server_version: &str) -> EngineEntry {
        self.files.sort_by(|a, b| a.path.cmp(&b.path));
        self.details
            .collections
            .sort_by(|a, b| (&a.db, &a.name).cmp(&(&b.db, &b.name)));
        EngineEntry {
            source: source.display().to_string(),
            server_version: server_version.to_owned(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            files: self.files,
            counts: self.counts,
            details: serde_json::to_value(&self.details).expect("details serialize"),
        }
    }
}

/// Imports a mongodump directory. Files mongorestore would not read (stray files, nested
/// directories, `local`/`config`, the server's own `system.*` collections) are skipped, each
/// with a log line; a file it would read that does not parse refuses the import.
pub fn import_dir(
    src: &Path,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let mut b = Builder::new(&out, cancel);
    let mut dbs = Vec::new();
    let rd = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if path.is_dir() {
            dbs.push((name, path));
        } else if name == "oplog.bson" || name == "oplog.bson.gz" {
            let what = path.display().to_string();
            b.add_oplog(&what, &mut open_maybe_gz(&path, name.ends_with(".gz"))?)?;
        } else {
            warn!(engine = ENGINE, file = %path.display(), "not part of a mongodump: skipped");
        }
    }
    dbs.sort();
    for (db, dir) in dbs {
        if db == "local" || db == "config" {
            warn!(engine = ENGINE, db, "the server's own database: skipped");
            continue;
        }
        // (metadata, data) per collection name.
        let mut colls: BTreeMap<String, (Option<DumpFile>, Option<DumpFile>)> = BTreeMap::new();
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let file = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let parsed = if path.is_file() {
                classify(&file)
            } else {
                None
            };
            let Some((stem, kind, gz)) = parsed else {
                warn!(engine = ENGINE, file = %path.display(), "not part of a mongodump: skipped");
                continue;
            };
            let name = unescape(stem).map_err(|e| refused(path.display(), e))?;
            let slot = colls.entry(name).or_default();
            match kind {
                FileKind::Metadata => slot.0 = Some((path, gz)),
                FileKind::Data => slot.1 = Some((path, gz)),
            }
        }
        for (name, (meta, data)) in &colls {
            if cancel.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
            if db == "admin" && (name == "system.users" || name == "system.roles") {
                if let Some((p, gz)) = data {
                    b.add_authz(&p.display().to_string(), name, &mut open_maybe_gz(p, *gz)?)?;
                }
                continue;
            }
            if name.starts_with("system.buckets.") {
                // A timeseries collection's data: read with its collection below.
                continue;
            }
            // Of the server's databases a dump carries only users and roles (above).
            if !is_dumped_collection(name) || is_system_db(&db) {
                warn!(engine = ENGINE, db, collection = %name, "a server collection: skipped");
                continue;
            }
            let meta = match meta {
                Some((p, gz)) => {
                    let mut bytes = Vec::new();
                    open_maybe_gz(p, *gz)?
                        .read_to_end(&mut bytes)
                        .map_err(|e| refused(p.display(), e))?;
                    Builder::metadata(&p.display().to_string(), &bytes, &db, name)?
                }
                None => Builder::metadata("", b"", &db, name)?,
            };
            let data_of = if meta.kind == Kind::Timeseries {
                colls
                    .get(&format!("system.buckets.{name}"))
                    .and_then(|c| c.1.clone())
            } else {
                data.clone()
            };
            // mongodump shortens a name too long for a file name; the metadata keeps it whole.
            let name = match meta.collection_name.clone() {
                Some(full) if &full != name => {
                    info!(engine = ENGINE, db, file = %name, collection = %full, "collection named by its metadata");
                    full
                }
                _ => name.clone(),
            };
            let name = &name;
            let data = match (meta.kind, data_of) {
                (Kind::View, _) => None,
                (kind, Some((p, gz))) => {
                    let stem = if kind == Kind::Timeseries {
                        format!("system.buckets.{name}")
                    } else {
                        name.clone()
                    };
                    Some(b.copy_docs(
                        &p.display().to_string(),
                        &format!("{db}/{}.bson", escape(&stem)),
                        &mut open_maybe_gz(&p, gz)?,
                    )?)
                }
                (_, None) => {
                    // Metadata without data: an empty collection.
                    Some(b.copy_docs(
                        "",
                        &format!("{db}/{}.bson", escape(name)),
                        &mut std::io::empty(),
                    )?)
                }
            };
            b.add_collection(&db, name, meta, data)?;
        }
    }
    if b.details.collections.is_empty() && b.details.authz.is_none() {
        return Err(refused(
            src.display(),
            "holds no collection mongorestore would read",
        ));
    }
    Ok(b.finish(src, "unknown (mongodump)"))
}

/// Whether a collection of a dump is left out: the server's own (`system.*` but `system.js`,
/// and the `admin`, `local` and `config` databases, whose users and roles are read apart).
fn skipped(db: &str, name: &str) -> bool {
    is_system_db(db) || !is_dumped_collection(name)
}

/// Reads an exact number of bytes, or says where the archive ends.
fn read_exact_at(r: &mut dyn Read, buf: &mut [u8], what: &str, offset: u64) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            refused(what, format!("byte {offset}: the archive ends early"))
        } else {
            refused(what, format!("byte {offset}: {e}"))
        }
    })
}

/// One document of the archive, or the terminator (`None`).
fn archive_doc(r: &mut dyn Read, what: &str, offset: &mut u64) -> Result<Option<RawDocumentBuf>> {
    let mut len = [0u8; 4];
    read_exact_at(r, &mut len, what, *offset)?;
    if len == TERMINATOR {
        *offset += 4;
        return Ok(None);
    }
    let n = i32::from_le_bytes(len);
    if !(5..=bsonfile::MAX_DOC as i32).contains(&n) {
        return Err(refused(
            what,
            format!("byte {offset}: invalid document length {n}"),
        ));
    }
    let mut buf = len.to_vec();
    buf.resize(n as usize, 0);
    read_exact_at(r, &mut buf[4..], what, *offset)?;
    let doc = RawDocumentBuf::from_bytes(buf)
        .map_err(|e| refused(what, format!("byte {offset}: {e}")))?;
    bsonfile::validate(&doc).map_err(|e| refused(what, format!("byte {offset}: {e}")))?;
    *offset += n as u64;
    Ok(Some(doc))
}

/// Imports a `mongodump --archive` file (plain or gzip), in one pass. Its collections' blocks
/// are interleaved (mongodump writes a few collections at once), so each collection has its
/// own artifact open from its first block to its EOF header: memory is a zstd stream per
/// collection being written, as many as the dump wrote at once, never a collection's data.
pub fn import_archive(
    src: &Path,
    out: EngineWriter,
    cancel: &CancellationToken,
) -> Result<EngineEntry> {
    let what = src.display().to_string();
    let mut head = [0u8; 2];
    File::open(src)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| Error::io(src, e))?;
    let mut r = open_maybe_gz(src, head == GZIP_MAGIC)?;
    let mut offset = 0u64;
    let mut magic = [0u8; 4];
    read_exact_at(&mut r, &mut magic, &what, 0)?;
    if magic != ARCHIVE_MAGIC {
        return Err(refused(
            &what,
            "byte 0: not a mongodump archive (bad magic number)",
        ));
    }
    offset += 4;
    let header = archive_doc(&mut r, &what, &mut offset)?
        .ok_or_else(|| refused(&what, "byte 4: the archive has no header"))?;
    let server_version = header
        .get_str("server_version")
        .unwrap_or("unknown (mongodump)")
        .to_owned();
    let mut b = Builder::new(&out, cancel);
    // The prelude: one metadata document per collection, then the terminator.
    let mut metas: BTreeMap<(String, String), Metadata> = BTreeMap::new();
    while let Some(d) = archive_doc(&mut r, &what, &mut offset)? {
        let (Ok(db), Ok(coll)) = (d.get_str("db"), d.get_str("collection")) else {
            return Err(refused(
                &what,
                format!("byte {offset}: a collection entry without db or collection"),
            ));
        };
        let meta = Builder::metadata(
            &what,
            d.get_str("metadata").unwrap_or("").as_bytes(),
            db,
            coll,
        )?;
        metas.insert((db.to_owned(), coll.to_owned()), meta);
    }
    // The blocks: a namespace header, its documents, the terminator.
    struct Open {
        /// None for a namespace that is not imported: its documents are read and dropped.
        w: Option<crate::repo::writer::ArtifactWriter>,
        /// The oplog's file, created with its first entry: an empty oplog is left out.
        lazy: Option<String>,
        n: u64,
        last_ts: OpTime,
    }
    let mut open: BTreeMap<(String, String), Open> = BTreeMap::new();
    // A finished namespace: its file, documents and newest op time (none: not imported).
    type Done = Option<(FileEntry, u64, OpTime)>;
    let mut done: BTreeMap<(String, String), Done> = BTreeMap::new();
    loop {
        let mut probe = [0u8; 1];
        match r.read(&mut probe) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(refused(&what, format!("byte {offset}: {e}"))),
        }
        let mut chained = std::io::Cursor::new(probe).chain(&mut r);
        let h = archive_doc(&mut chained, &what, &mut offset)?.ok_or_else(|| {
            refused(
                &what,
                format!("byte {offset}: a terminator where a namespace header belongs"),
            )
        })?;
        let (Ok(db), Ok(coll)) = (h.get_str("db"), h.get_str("collection")) else {
            return Err(refused(
                &what,
                format!("byte {offset}: a namespace header without db or collection"),
            ));
        };
        let key = (db.to_owned(), coll.to_owned());
        let eof = h.get_bool("EOF").unwrap_or(false);
        let oplog = db.is_empty() && coll == "oplog";
        if !open.contains_key(&key) && !done.contains_key(&key) {
            let rel = if oplog {
                OPLOG_FILE.to_owned()
            } else {
                format!("{db}/{}.bson", escape(coll))
            };
            let authz = db == "admin" && (coll == "system.users" || coll == "system.roles");
            let name = coll.strip_prefix("system.buckets.").unwrap_or(coll);
            let w = if oplog {
                None
            } else if authz || !skipped(db, name) {
                Some(out.create(&rel, 0)?)
            } else {
                warn!(
                    engine = ENGINE,
                    db,
                    collection = coll,
                    "a server collection: skipped"
                );
                None
            };
            open.insert(
                key.clone(),
                Open {
                    w,
                    lazy: oplog.then(|| rel.clone()),
                    n: 0,
                    last_ts: OpTime::ZERO,
                },
            );
        }
        let Some(o) = open.get_mut(&key) else {
            return Err(refused(
                &what,
                format!("byte {offset}: {db}.{coll} continues after its end"),
            ));
        };
        while let Some(d) = archive_doc(&mut r, &what, &mut offset)? {
            if oplog && let Ok(ts) = d.get_timestamp("ts") {
                o.last_ts = o.last_ts.max(OpTime {
                    t: ts.time,
                    i: ts.increment,
                });
            }
            if let Some(rel) = o.lazy.take() {
                o.w = Some(out.create(&rel, 0)?);
            }
            if let Some(w) = &mut o.w {
                w.write_all(d.as_bytes())
                    .map_err(|e| Error::io(out.dir(), e))?;
            }
            o.n += 1;
            if o.n.is_multiple_of(4096) && cancel.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
        }
        if eof {
            let o = open.remove(&key).expect("opened above");
            let finished = match o.w {
                Some(w) => Some((w.finish()?, o.n, o.last_ts)),
                None => None,
            };
            done.insert(key, finished);
        }
    }
    if let Some((db, coll)) = open.keys().next() {
        return Err(refused(
            &what,
            format!("byte {offset}: the archive ends before {db}.{coll} does"),
        ));
    }
    for ((db, coll), (f, n, last)) in done.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))) {
        if db.is_empty() && coll == "oplog" {
            if n > 0 {
                b.details.oplog = Some(OplogSlice {
                    start: OpTime::ZERO,
                    end: last,
                    entries: n,
                    file: f.path.clone(),
                });
                b.files.push(f);
            }
            continue;
        }
        if db == "admin" && (coll == "system.users" || coll == "system.roles") {
            let a = b.details.authz.get_or_insert(AuthzEntry {
                users: 0,
                roles: 0,
                users_file: None,
                roles_file: None,
            });
            if coll == "system.users" {
                (a.users, a.users_file) = (n, Some(f.path.clone()));
            } else {
                (a.roles, a.roles_file) = (n, Some(f.path.clone()));
            }
            b.files.push(f);
            continue;
        }
        let name = coll
            .strip_prefix("system.buckets.")
            .unwrap_or(&coll)
            .to_owned();
        let meta = match metas.remove(&(db.clone(), name.clone())) {
            Some(m) => m,
            None => Builder::metadata("", b"", &db, &name)?,
        };
        b.add_collection(&db, &name, meta, Some((f, n)))?;
    }
    // Collections in the prelude without a block: views, and collections with no documents.
    for ((db, name), meta) in metas {
        if skipped(&db, &name) {
            continue;
        }
        let data = if meta.kind == Kind::View {
            None
        } else {
            Some(b.copy_docs(
                "",
                &format!("{db}/{}.bson", escape(&name)),
                &mut std::io::empty(),
            )?)
        };
        b.add_collection(&db, &name, meta, data)?;
    }
    if b.details.collections.is_empty() && b.details.authz.is_none() {
        return Err(refused(&what, "holds no collection"));
    }
    Ok(b.finish(src, &server_version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{Bson, doc};

    #[test]
    fn file_names_are_classified_as_mongodump_writes_them() {
        assert!(matches!(
            classify("c.bson"),
            Some(("c", FileKind::Data, false))
        ));
        assert!(matches!(
            classify("caf%C3%A9s.metadata.json.gz"),
            Some(("caf%C3%A9s", FileKind::Metadata, true))
        ));
        assert!(classify(".bson").is_none());
        assert!(classify("c2.txt").is_none());
    }

    #[test]
    fn legacy_index_specs_become_ones_a_v2_index_accepts() {
        let mut i = doc! {"v": 1, "key": {"a": 1.0, "b": true, "c": 0, "d": "", "e": "text", "f": -1}, "name": "x", "safe": true};
        assert!(convert_legacy_index(&mut i));
        assert_eq!(
            i,
            doc! {"v": 1, "key": {"a": 1.0, "b": 1, "c": 1, "d": 1, "e": "text", "f": -1}, "name": "x"}
        );
        let mut ok = doc! {"v": 2, "key": {"a": 1}, "name": "a_1", "unique": true};
        assert!(!convert_legacy_index(&mut ok));
        let mut dec = doc! {"key": {"c": Bson::Decimal128("-1".parse().unwrap())}};
        assert!(convert_legacy_index(&mut dec));
        assert_eq!(dec, doc! {"key": {"c": -1.0}});
    }
}
