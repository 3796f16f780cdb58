//! The Chroma export format (documented for users in docs/chroma-format.md): per collection a
//! `collection.json`, a `records.jsonl` (one record per line, in the same order as the vectors)
//! and an `embeddings.f32` (raw little-endian float32, `dimension` values per record). Also the
//! offline deep verification of that format.
//!
//! Records travel as the server's raw JSON (ids, documents, metadata, uris are copied
//! verbatim, never re-encoded), and vectors as exact float32: JSON decimals are parsed straight
//! to `f32` (correctly rounded, no detour through `f64`) and sent back as base64 of the same
//! bytes when the server accepts it.

use std::io::{BufRead, BufReader, Read, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::ENGINE;
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Version of this layout, in the manifest's `details.format`.
pub const FORMAT: u32 = 1;
pub const COLLECTION_FILE: &str = "collection.json";
pub const RECORDS_FILE: &str = "records.jsonl";
pub const EMBEDDINGS_FILE: &str = "embeddings.f32";

/// Far above any embedding model; a larger value in a set is damage, not data.
pub const MAX_DIMENSION: u64 = 1 << 20;

/// `details` of the engine's manifest entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Details {
    pub format: u32,
    pub tenant: String,
    /// The database selection the dump was taken with (`*` for every database).
    pub databases: String,
    pub max_batch_size: usize,
    pub collections: Vec<CollectionRef>,
}

/// One collection of the dump, and where its files are (relative to the engine directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionRef {
    pub database: String,
    pub name: String,
    pub dir: String,
    pub records: u64,
    pub dimension: u64,
}

impl CollectionRef {
    /// The key of this collection in the manifest's counts.
    pub fn key(&self) -> String {
        count_key(&self.database, &self.name)
    }

    pub fn file(&self, name: &str) -> String {
        format!("{}/{}", self.dir, name)
    }
}

pub fn count_key(db: &str, name: &str) -> String {
    format!("{db}/{name}")
}

/// `collection.json`: the collection's settings exactly as the server described them.
#[derive(Debug, Serialize, Deserialize)]
pub struct CollectionFile {
    pub format: u32,
    pub database: String,
    pub name: String,
    /// The id it had on the source server (a restore gets a new one).
    pub source_id: String,
    pub metadata: Option<Box<RawValue>>,
    /// Chroma's `configuration_json`: distance space, HNSW/SPANN parameters, embedding function.
    pub configuration: Option<Box<RawValue>>,
    /// Chroma 1.x's `schema` (a superset of the configuration, with per-key index settings).
    pub schema: Option<Box<RawValue>>,
    pub dimension: u64,
    pub records: u64,
}

/// A directory name for a collection: Chroma names are `[a-zA-Z0-9._-]{3,512}`, safe in a
/// path but possibly too long for one path component; those get their ordinal instead.
pub fn dir_name(db: &str, name: &str, ordinal: usize) -> String {
    let safe = |s: &str| {
        !s.is_empty()
            && s.len() <= 200
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    let db = if safe(db) {
        db.to_owned()
    } else {
        format!("db-{}", hex::encode(sha2_prefix(db)))
    };
    let coll = if safe(name) {
        name.to_owned()
    } else {
        format!("collection-{ordinal:05}")
    };
    format!("{db}/{coll}")
}

fn sha2_prefix(s: &str) -> [u8; 8] {
    use sha2::Digest;
    let d = sha2::Sha256::digest(s.as_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// One line of `records.jsonl`, borrowing the raw JSON of each field.
#[derive(Debug, Deserialize)]
pub struct RecordLine<'a> {
    #[serde(borrow)]
    pub id: &'a RawValue,
    #[serde(borrow, default)]
    pub document: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub uri: Option<&'a RawValue>,
}

impl RecordLine<'_> {
    /// Checks each field has the type Chroma gives it: id a string, document and uri a
    /// string or null, metadata an object or null.
    pub fn check(&self) -> std::result::Result<(), String> {
        let starts = |r: &RawValue, c: u8| r.get().as_bytes().first() == Some(&c);
        if !starts(self.id, b'"') {
            return Err("id is not a string".into());
        }
        for (what, v) in [("document", self.document), ("uri", self.uri)] {
            if let Some(v) = v
                && v.get() != "null"
                && !starts(v, b'"')
            {
                return Err(format!("{what} is neither a string nor null"));
            }
        }
        if let Some(m) = self.metadata
            && m.get() != "null"
            && !starts(m, b'{')
        {
            return Err("metadata is neither an object nor null".into());
        }
        Ok(())
    }
}

/// A page of `POST …/get`, borrowing the response bytes.
#[derive(Debug, Deserialize)]
pub struct Page<'a> {
    #[serde(borrow)]
    pub ids: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    pub embeddings: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub documents: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    pub metadatas: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    pub uris: Option<Vec<&'a RawValue>>,
}

/// Writes one page: its lines to `records`, its vectors to `embeddings`. Returns the number of
/// records; `dim` is learned from the first vector and enforced on every later one.
pub fn write_page(
    body: &[u8],
    dim: &mut Option<usize>,
    records: &mut impl Write,
    embeddings: &mut impl Write,
    floats: &mut Vec<u8>,
) -> std::result::Result<usize, String> {
    let page: Page =
        serde_json::from_slice(body).map_err(|e| format!("unexpected get answer: {e}"))?;
    let n = page.ids.len();
    let field = |v: &Option<Vec<&RawValue>>, what: &str| -> std::result::Result<(), String> {
        match v {
            Some(v) if v.len() != n => Err(format!("{what}: {} values for {n} ids", v.len())),
            _ => Ok(()),
        }
    };
    field(&page.documents, "documents")?;
    field(&page.metadatas, "metadatas")?;
    field(&page.uris, "uris")?;
    floats.clear();
    let rows = match page.embeddings {
        Some(raw) if raw.get() != "null" => parse_vectors(raw.get(), dim, floats)?,
        _ if n == 0 => 0,
        _ => return Err("the server returned no embeddings".into()),
    };
    if rows != n {
        return Err(format!("{rows} embeddings for {n} ids"));
    }
    let mut line = Vec::with_capacity(256);
    for i in 0..n {
        line.clear();
        line.extend_from_slice(b"{\"id\":");
        push_raw(&mut line, Some(page.ids[i]));
        line.extend_from_slice(b",\"document\":");
        push_raw(&mut line, page.documents.as_ref().map(|v| v[i]));
        line.extend_from_slice(b",\"metadata\":");
        push_raw(&mut line, page.metadatas.as_ref().map(|v| v[i]));
        line.extend_from_slice(b",\"uri\":");
        push_raw(&mut line, page.uris.as_ref().map(|v| v[i]));
        line.extend_from_slice(b"}\n");
        records.write_all(&line).map_err(|e| e.to_string())?;
    }
    embeddings.write_all(floats).map_err(|e| e.to_string())?;
    Ok(n)
}

/// Appends a raw JSON value; a pretty-printed one (a newline inside) is compacted so that a
/// record stays on one line.
fn push_raw(out: &mut Vec<u8>, v: Option<&RawValue>) {
    match v {
        None => out.extend_from_slice(b"null"),
        Some(r) if !r.get().contains('\n') => out.extend_from_slice(r.get().as_bytes()),
        Some(r) => {
            let v: serde_json::Value = serde_json::from_str(r.get()).unwrap_or_default();
            serde_json::to_writer(&mut *out, &v).expect("writing to a Vec");
        }
    }
}

/// Parses `[[f, f, …], …]` into little-endian float32 bytes. Hand-written because serde_json
/// reads numbers as `f64` and casting to `f32` rounds twice; `str::parse::<f32>` rounds once,
/// so the bytes are exactly the server's float32 values. Returns the number of vectors.
pub fn parse_vectors(
    text: &str,
    dim: &mut Option<usize>,
    out: &mut Vec<u8>,
) -> std::result::Result<usize, String> {
    let b = text.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let bad = |i: usize, what: &str| format!("embeddings: {what} at byte {i}");
    skip_ws(&mut i);
    if b.get(i) != Some(&b'[') {
        return Err(bad(i, "expected '['"));
    }
    i += 1;
    let mut rows = 0usize;
    loop {
        skip_ws(&mut i);
        match b.get(i) {
            Some(b']') if rows == 0 => break,
            Some(b'[') => i += 1,
            _ => return Err(bad(i, "expected a vector")),
        }
        let mut n = 0usize;
        skip_ws(&mut i);
        if b.get(i) == Some(&b']') {
            i += 1;
        } else {
            loop {
                skip_ws(&mut i);
                let start = i;
                while i < b.len() && !matches!(b[i], b',' | b']') && !b[i].is_ascii_whitespace() {
                    i += 1;
                }
                let tok = std::str::from_utf8(&b[start..i]).map_err(|_| bad(start, "not UTF-8"))?;
                let v: f32 = tok
                    .parse()
                    .map_err(|_| bad(start, &format!("{tok:?} is not a number")))?;
                if !v.is_finite() {
                    return Err(bad(start, "non-finite value"));
                }
                out.extend_from_slice(&v.to_le_bytes());
                n += 1;
                skip_ws(&mut i);
                match b.get(i) {
                    Some(b',') => i += 1,
                    Some(b']') => {
                        i += 1;
                        break;
                    }
                    _ => return Err(bad(i, "expected ',' or ']'")),
                }
            }
        }
        match *dim {
            None => *dim = Some(n),
            Some(d) if d != n => {
                return Err(format!(
                    "embedding of dimension {n} in a collection of dimension {d}"
                ));
            }
            _ => {}
        }
        rows += 1;
        skip_ws(&mut i);
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b']') => break,
            _ => return Err(bad(i, "expected ',' or ']'")),
        }
    }
    Ok(rows)
}

/// Reads `records.jsonl` and `embeddings.f32` in step, one record at a time.
pub struct RecordReader<R1: Read, R2: Read> {
    lines: BufReader<R1>,
    vectors: R2,
    pub dim: usize,
    pub line: String,
    pub vector: Vec<u8>,
    pub read: u64,
    what: String,
}

impl<R1: Read, R2: Read> RecordReader<R1, R2> {
    pub fn new(records: R1, embeddings: R2, dim: usize, what: String) -> Self {
        RecordReader {
            lines: BufReader::with_capacity(1 << 20, records),
            vectors: embeddings,
            dim,
            line: String::new(),
            vector: vec![0u8; dim * 4],
            read: 0,
            what,
        }
    }

    /// Loads the next record into `line`/`vector`; `Ok(false)` at a clean end of both files.
    pub fn next_record(&mut self) -> std::result::Result<bool, String> {
        self.line.clear();
        let n = self
            .lines
            .read_line(&mut self.line)
            .map_err(|e| format!("{}: records: {e}", self.what))?;
        if n == 0 {
            let mut extra = [0u8; 1];
            return match self.vectors.read(&mut extra) {
                Ok(0) => Ok(false),
                Ok(_) => Err(format!(
                    "{}: more embeddings than records ({} records)",
                    self.what, self.read
                )),
                Err(e) => Err(format!("{}: embeddings: {e}", self.what)),
            };
        }
        if !self.line.ends_with('\n') {
            return Err(format!(
                "{}: record {} is truncated (no end of line)",
                self.what,
                self.read + 1
            ));
        }
        self.vectors.read_exact(&mut self.vector).map_err(|e| {
            format!(
                "{}: embedding of record {} is missing or short: {e}",
                self.what,
                self.read + 1
            )
        })?;
        self.read += 1;
        Ok(true)
    }

    /// The two underlying readers, to check their checksums once both are read to the end.
    pub fn into_inner(self) -> (R1, R2) {
        (self.lines.into_inner(), self.vectors)
    }

    pub fn record(&self) -> std::result::Result<RecordLine<'_>, String> {
        let r: RecordLine = serde_json::from_str(self.line.trim_end())
            .map_err(|e| format!("{}: record {} does not parse: {e}", self.what, self.read))?;
        r.check()
            .map_err(|e| format!("{}: record {}: {e}", self.what, self.read))?;
        Ok(r)
    }
}

/// Builds the JSON body of one `add` call from records read from the export.
pub struct BatchBuilder {
    base64: bool,
    ids: Vec<u8>,
    embeddings: Vec<u8>,
    documents: Vec<u8>,
    metadatas: Vec<u8>,
    uris: Vec<u8>,
    has: [bool; 3],
    pub len: usize,
}

impl BatchBuilder {
    pub fn new(base64: bool) -> Self {
        BatchBuilder {
            base64,
            ids: Vec::new(),
            embeddings: Vec::new(),
            documents: Vec::new(),
            metadatas: Vec::new(),
            uris: Vec::new(),
            has: [false; 3],
            len: 0,
        }
    }

    pub fn push(&mut self, r: &RecordLine<'_>, vector: &[u8]) {
        let sep = |v: &mut Vec<u8>, first: bool| {
            if !first {
                v.push(b',');
            }
        };
        let first = self.len == 0;
        sep(&mut self.ids, first);
        self.ids.extend_from_slice(r.id.get().as_bytes());
        sep(&mut self.embeddings, first);
        if self.base64 {
            self.embeddings.push(b'"');
            let mut s = String::new();
            base64::engine::general_purpose::STANDARD.encode_string(vector, &mut s);
            self.embeddings.extend_from_slice(s.as_bytes());
            self.embeddings.push(b'"');
        } else {
            // Rust prints the shortest decimal that parses back to the same f32.
            self.embeddings.push(b'[');
            for (k, c) in vector.chunks_exact(4).enumerate() {
                if k > 0 {
                    self.embeddings.push(b',');
                }
                let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                write!(self.embeddings, "{f:?}").expect("writing to a Vec");
            }
            self.embeddings.push(b']');
        }
        for (k, (buf, v)) in [
            (&mut self.documents, r.document),
            (&mut self.metadatas, r.metadata),
            (&mut self.uris, r.uri),
        ]
        .into_iter()
        .enumerate()
        {
            sep(buf, first);
            match v {
                Some(v) if v.get() != "null" => {
                    buf.extend_from_slice(v.get().as_bytes());
                    self.has[k] = true;
                }
                _ => buf.extend_from_slice(b"null"),
            }
        }
        self.len += 1;
    }

    /// The request body; the builder is empty again afterwards.
    pub fn take(&mut self) -> Vec<u8> {
        let mut body = Vec::with_capacity(
            self.ids.len()
                + self.embeddings.len()
                + self.documents.len()
                + self.metadatas.len()
                + self.uris.len()
                + 96,
        );
        body.extend_from_slice(b"{\"ids\":[");
        body.extend_from_slice(&self.ids);
        body.extend_from_slice(b"],\"embeddings\":[");
        body.extend_from_slice(&self.embeddings);
        body.push(b']');
        for (k, (name, buf)) in [
            ("documents", &self.documents),
            ("metadatas", &self.metadatas),
            ("uris", &self.uris),
        ]
        .into_iter()
        .enumerate()
        {
            // An all-null column is left out, as the Python client does.
            if self.has[k] {
                write!(body, ",\"{name}\":[").expect("writing to a Vec");
                body.extend_from_slice(buf);
                body.push(b']');
            }
        }
        body.push(b'}');
        for v in [
            &mut self.ids,
            &mut self.embeddings,
            &mut self.documents,
            &mut self.metadatas,
            &mut self.uris,
        ] {
            v.clear();
        }
        self.has = [false; 3];
        self.len = 0;
        body
    }
}

pub fn details_of(set: &SetReader, entry: &EngineEntry) -> Result<Details> {
    let d: Details = serde_json::from_value(entry.details.clone()).map_err(|e| {
        Error::corrupt(
            set.id(),
            format!("{ENGINE}: manifest details do not parse: {e}"),
        )
    })?;
    if d.format > FORMAT {
        return Err(Error::corrupt(
            set.id(),
            format!(
                "{ENGINE}: export format {} is newer than this dbkeeper understands ({FORMAT}); upgrade dbkeeper",
                d.format
            ),
        ));
    }
    Ok(d)
}

/// The manifest entry of one of a collection's files.
pub fn file_entry<'a>(
    set: &SetReader,
    entry: &'a EngineEntry,
    c: &CollectionRef,
    name: &str,
) -> Result<&'a crate::repo::manifest::FileEntry> {
    let path = format!("{ENGINE}/{}.zst", c.file(name));
    entry
        .file(&path)
        .ok_or_else(|| Error::corrupt(set.id(), format!("{ENGINE}: the manifest lists no {path}")))
}

/// Reads and checks a collection's `collection.json`.
pub fn read_collection_file(
    set: &SetReader,
    entry: &EngineEntry,
    c: &CollectionRef,
) -> Result<CollectionFile> {
    let fe = file_entry(set, entry, c, COLLECTION_FILE)?;
    let mut r = set.open_file(fe)?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|e| r.error(e))?;
    r.finish()?;
    let cf: CollectionFile = serde_json::from_slice(&buf)
        .map_err(|e| Error::corrupt(set.id(), format!("{}: does not parse: {e}", fe.path)))?;
    if cf.dimension > MAX_DIMENSION {
        return Err(Error::corrupt(
            set.id(),
            format!("{}: dimension {} is not plausible", fe.path, cf.dimension),
        ));
    }
    if cf.name != c.name || cf.records != c.records || cf.dimension != c.dimension {
        return Err(Error::corrupt(
            set.id(),
            format!(
                "{}: disagrees with the manifest about name, records or dimension",
                fe.path
            ),
        ));
    }
    Ok(cf)
}

/// Decodes every record of the Chroma part of a set, offline: each line parses with the
/// right field types, each record has exactly one vector of the collection's dimension, the
/// files end together, and the counts match; checksums are checked as the files stream.
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let details = details_of(set, entry)?;
    let corrupt = |msg: String| Error::corrupt(set.id(), format!("{ENGINE}: {msg}"));
    let mut counts = Counts::new();
    for c in &details.collections {
        let cf = read_collection_file(set, entry, c)?;
        let dim =
            usize::try_from(cf.dimension).map_err(|_| corrupt("dimension too large".into()))?;
        if dim == 0 && cf.records > 0 {
            return Err(corrupt(format!("{}: records without a dimension", c.key())));
        }
        let fr = file_entry(set, entry, c, RECORDS_FILE)?;
        let fv = file_entry(set, entry, c, EMBEDDINGS_FILE)?;
        if fv.raw_size != cf.records.saturating_mul(cf.dimension).saturating_mul(4) {
            return Err(corrupt(format!(
                "{}: {} bytes of embeddings, expected {} records × {} dimensions × 4",
                fv.path, fv.raw_size, cf.records, cf.dimension
            )));
        }
        let records = set.open_file(fr)?;
        let vectors = set.open_file(fv)?;
        let mut rr = RecordReader::new(records, vectors, dim, c.key());
        loop {
            if rr.read % 4096 == 0 && cancel.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
            if !rr.next_record().map_err(&corrupt)? {
                break;
            }
            rr.record().map_err(&corrupt)?;
            for f in rr.vector.chunks_exact(4) {
                if !f32::from_le_bytes([f[0], f[1], f[2], f[3]]).is_finite() {
                    return Err(corrupt(format!(
                        "{}: record {} has a non-finite embedding value",
                        c.key(),
                        rr.read
                    )));
                }
            }
        }
        let n = rr.read;
        let (lines, vectors) = rr.into_inner();
        lines.finish()?;
        vectors.finish()?;
        if n != cf.records {
            return Err(corrupt(format!(
                "{}: {n} records in the files, {} in collection.json",
                c.key(),
                cf.records
            )));
        }
        counts.insert(c.key(), n);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_parse_exactly_to_f32() {
        let mut dim = None;
        let mut out = Vec::new();
        let n = parse_vectors(
            "[[1.0,3.0000002,-0.1],[ 1e-3 , 2 ,16777217]]",
            &mut dim,
            &mut out,
        )
        .unwrap();
        assert_eq!((n, dim), (2, Some(3)));
        let f: Vec<f32> = out
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(f[1], "3.0000002".parse::<f32>().unwrap());
        assert_eq!(f[2], -0.1f32);
        assert_eq!(f[5], 16777216.0);
        assert_eq!(parse_vectors("[]", &mut None, &mut Vec::new()).unwrap(), 0);
    }

    #[test]
    fn bad_vectors_are_errors_not_panics() {
        for bad in [
            "",
            "[",
            "[[1,2]",
            "[[1,x]]",
            "[[1,2],[3]]",
            "[[1,,2]]",
            "{}",
            "[[1e99]]",
            "[[1 2]]",
        ] {
            let mut dim = None;
            assert!(
                parse_vectors(bad, &mut dim, &mut Vec::new()).is_err(),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn page_becomes_lines_and_floats() {
        let body = br#"{"ids":["a","\u00fc"],"embeddings":[[1.5,2],[3,4]],"documents":["d\n",null],"metadatas":[{"x":1.0,"b":true},null],"uris":null,"include":[]}"#;
        let (mut recs, mut vecs, mut tmp) = (Vec::new(), Vec::new(), Vec::new());
        let mut dim = None;
        let n = write_page(body, &mut dim, &mut recs, &mut vecs, &mut tmp).unwrap();
        assert_eq!(n, 2);
        let text = String::from_utf8(recs).unwrap();
        assert_eq!(
            text,
            "{\"id\":\"a\",\"document\":\"d\\n\",\"metadata\":{\"x\":1.0,\"b\":true},\"uri\":null}\n{\"id\":\"\\u00fc\",\"document\":null,\"metadata\":null,\"uri\":null}\n"
        );
        assert_eq!(vecs.len(), 16);
        let mut b = BatchBuilder::new(true);
        for line in text.lines() {
            let r: RecordLine = serde_json::from_str(line).unwrap();
            r.check().unwrap();
            b.push(&r, &vecs[..8]);
        }
        let body = String::from_utf8(b.take()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ids"][1], "ü");
        assert_eq!(v["embeddings"][0], "AADAPwAAAEA=");
        assert_eq!(v["documents"][1], serde_json::Value::Null);
        assert!(v.get("uris").is_none());
        assert_eq!(b.len, 0);
    }

    #[test]
    fn mismatched_pages_are_errors() {
        let mut sink = (Vec::new(), Vec::new(), Vec::new());
        for body in [
            &br#"{"ids":["a"],"embeddings":[[1],[2]]}"#[..],
            br#"{"ids":["a"],"embeddings":[[1]],"documents":[]}"#,
            br#"{"ids":["a"]}"#,
            b"not json",
        ] {
            assert!(write_page(body, &mut None, &mut sink.0, &mut sink.1, &mut sink.2).is_err());
        }
    }

    #[test]
    fn line_types_are_checked() {
        for bad in [
            r#"{"id":1,"document":null,"metadata":null,"uri":null}"#,
            r#"{"id":"a","document":3,"metadata":null,"uri":null}"#,
            r#"{"id":"a","document":null,"metadata":[1],"uri":null}"#,
        ] {
            let r: RecordLine = serde_json::from_str(bad).unwrap();
            assert!(r.check().is_err(), "{bad}");
        }
    }

    #[test]
    fn directory_names_stay_inside_one_component() {
        assert_eq!(
            dir_name("default_database", "docs", 0),
            "default_database/docs"
        );
        let long = "a".repeat(300);
        assert_eq!(dir_name("d1x", &long, 7), "d1x/collection-00007");
        assert!(dir_name("../x", "abc", 0).starts_with("db-"));
    }
}
