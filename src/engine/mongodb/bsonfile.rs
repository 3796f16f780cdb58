//! Reading a `.bson` dump stream (documents back to back, as mongodump writes them): framing by
//! the length prefix, and full structural validation for deep verify.
//!
//! Hand-written because the bson crate decodes one document from a reader but has no
//! streaming reader that tells a clean end of stream from a cut-off document.

use std::io::{self, Read};

use mongodb::bson::{RawBsonRef, RawDocument, RawDocumentBuf};

/// The largest document MongoDB stores is 16 MiB; mongodump's reader allows 16 KiB of slack for
/// internal documents (oplog entries). Anything bigger is a corrupt length prefix.
pub const MAX_DOC: usize = 16 * 1024 * 1024 + 16 * 1024;

/// Smallest valid document: a 4-byte length and the terminating NUL.
const MIN_DOC: usize = 5;

/// What a document's buffer starts with; a bigger document grows it as its bytes arrive.
const PREALLOC: usize = 64 * 1024;

/// The deepest nesting [`validate`] walks: five times MongoDB's `maxBSONDepth` (200), and
/// twice what bsondump's own test file holds (501). Each level costs a stack frame: a
/// 16 MiB document of two million levels would overflow the stack and abort the process.
pub const MAX_DEPTH: usize = 1000;

/// Why a stream stopped being readable.
#[derive(Debug)]
pub enum StreamError {
    Io(io::Error),
    /// The bytes are not a valid BSON document (which one, and why).
    Invalid {
        index: u64,
        offset: u64,
        why: String,
    },
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Io(e) => write!(f, "{e}"),
            StreamError::Invalid { index, offset, why } => {
                write!(f, "document #{index} at byte {offset}: {why}")
            }
        }
    }
}

/// Yields the documents of a `.bson` stream one at a time, checking only their framing
/// (length prefix and trailing NUL); the server or [`validate`] checks the rest.
pub struct DocReader<R> {
    inner: R,
    index: u64,
    offset: u64,
}

impl<R: Read> DocReader<R> {
    pub fn new(inner: R) -> Self {
        DocReader {
            inner,
            index: 0,
            offset: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Documents read so far.
    pub fn count(&self) -> u64 {
        self.index
    }

    fn invalid(&self, why: impl Into<String>) -> StreamError {
        StreamError::Invalid {
            index: self.index,
            offset: self.offset,
            why: why.into(),
        }
    }

    /// The next document, `Ok(None)` at a clean end of stream.
    pub fn next_doc(&mut self) -> Result<Option<RawDocumentBuf>, StreamError> {
        let mut len_buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut len_buf[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(self.invalid("stream ends inside a length prefix")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
        let len = i32::from_le_bytes(len_buf);
        if len < MIN_DOC as i32 {
            return Err(self.invalid(format!("invalid document length {len}")));
        }
        let len = len as usize;
        if len > MAX_DOC {
            return Err(self.invalid(format!(
                "document length {len} exceeds the BSON maximum of {MAX_DOC}"
            )));
        }
        // Capacity grows as the bytes arrive: a corrupt prefix claiming 16 MiB in front of a
        // few bytes must not cost 16 MiB.
        let mut buf = Vec::with_capacity(len.min(PREALLOC));
        buf.extend_from_slice(&len_buf);
        let want = (len - 4) as u64;
        let n = (&mut self.inner)
            .take(want)
            .read_to_end(&mut buf)
            .map_err(StreamError::Io)?;
        if (n as u64) < want {
            return Err(self.invalid(format!(
                "stream ends {} bytes into a {len}-byte document",
                n + 4
            )));
        }
        let doc = RawDocumentBuf::from_bytes(buf).map_err(|e| self.invalid(e.to_string()))?;
        self.index += 1;
        self.offset += len as u64;
        Ok(Some(doc))
    }
}

/// Walks every element of a document, nested documents and arrays included, so that every
/// length, type byte, key and string is checked. Depth is bounded by the document's size.
pub fn validate(doc: &RawDocument) -> Result<(), String> {
    validate_at(doc, 1)
}

fn validate_at(doc: &RawDocument, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    for elem in doc.iter() {
        let (_key, value) = elem.map_err(|e| e.to_string())?;
        validate_value(value, depth)?;
    }
    Ok(())
}

fn validate_value(value: RawBsonRef<'_>, depth: usize) -> Result<(), String> {
    match value {
        RawBsonRef::Document(d) => validate_at(d, depth + 1),
        RawBsonRef::Array(a) => {
            if depth + 1 > MAX_DEPTH {
                return Err(format!("nested deeper than {MAX_DEPTH} levels"));
            }
            for v in a.into_iter() {
                validate_value(v.map_err(|e| e.to_string())?, depth + 1)?;
            }
            Ok(())
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => validate_at(c.scope, depth + 1),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::rawdoc;

    fn stream(docs: &[RawDocumentBuf]) -> Vec<u8> {
        docs.iter().flat_map(|d| d.as_bytes().to_vec()).collect()
    }

    #[test]
    fn reads_back_to_back_documents() {
        let docs = vec![rawdoc! {"a": 1}, rawdoc! {"b": "é", "c": {"d": [1, 2]}}];
        let bytes = stream(&docs);
        let mut r = DocReader::new(&bytes[..]);
        let mut got = Vec::new();
        while let Some(d) = r.next_doc().unwrap() {
            validate(&d).unwrap();
            got.push(d);
        }
        assert_eq!(got, docs);
        assert_eq!(r.count(), 2);
    }

    #[test]
    fn truncation_is_an_error_not_an_end() {
        let bytes = stream(&[rawdoc! {"a": 1}, rawdoc! {"b": 2}]);
        for cut in [bytes.len() - 1, bytes.len() - 10, 2] {
            let mut r = DocReader::new(&bytes[..cut]);
            let mut result = Ok(Some(RawDocumentBuf::new()));
            while let Ok(Some(_)) = result {
                result = r.next_doc();
            }
            assert!(result.is_err(), "cut at {cut} went unnoticed");
        }
    }

    #[test]
    fn bad_lengths_and_bodies_are_rejected() {
        let mut r = DocReader::new(&[1u8, 0, 0, 0, 0][..]);
        assert!(r.next_doc().is_err());
        let mut r = DocReader::new(&[0xff, 0xff, 0xff, 0x7f, 0][..]);
        assert!(r.next_doc().unwrap_err().to_string().contains("exceeds"));
        // A valid frame whose element has an unknown type byte.
        let bad = [12u8, 0, 0, 0, 0xAA, b'a', 0, 1, 0, 0, 0, 0];
        let mut r = DocReader::new(&bad[..]);
        let doc = r.next_doc().unwrap().unwrap();
        assert!(validate(&doc).is_err());
    }

    /// A document nested `levels` deep: `{"a": {"a": … {} … }}`, built as bytes (the bson
    /// crate's builders recurse too).
    fn nested(levels: usize) -> Vec<u8> {
        // Level d (0 = outermost): length, type 0x03, key "a\0", level d+1, closing NUL; the
        // innermost is the empty document.
        let mut doc = Vec::with_capacity(levels * 8 + 5);
        for d in 0..levels {
            doc.extend_from_slice(&((8 * (levels - d) + 5) as u32).to_le_bytes());
            doc.extend_from_slice(&[3, b'a', 0]);
        }
        doc.extend_from_slice(&[5, 0, 0, 0, 0]);
        doc.resize(doc.len() + levels, 0);
        doc
    }

    /// Found while writing the fuzzing (a stack overflow aborts, so the fuzzer could not report
    /// it): a 2-million-level document (16 MiB) overflowed the stack of the recursive walk.
    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let ok = nested(MAX_DEPTH - 1);
        let mut r = DocReader::new(&ok[..]);
        validate(&r.next_doc().unwrap().unwrap()).unwrap();
        let deep = nested(1_000_000);
        let mut r = DocReader::new(&deep[..]);
        let err = validate(&r.next_doc().unwrap().unwrap()).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
    }

    /// Reads a whole stream the way deep verify does: every document framed and validated.
    fn decode_all(bytes: &[u8]) -> Result<u64, String> {
        let mut r = DocReader::new(bytes);
        while let Some(d) = r.next_doc().map_err(|e| e.to_string())? {
            validate(&d).map_err(|e| format!("document #{}: {e}", r.count() - 1))?;
        }
        Ok(r.count())
    }

    /// The BSON files mongo-tools tests bsondump with: the good ones count as the stock
    /// decoder counts them, the broken ones are rejected with an error, never a panic.
    #[test]
    fn bsondump_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/mongodump/bsondump");
        if !dir.is_dir() {
            eprintln!(
                "skipped: {} is absent (fixtures live beside the checkout)",
                dir.display()
            );
            return;
        }
        let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
        for (file, want) in [
            ("all_types.bson", 20),
            ("all_in_one_doc.bson", 1),
            ("deep_nested.bson", 1),
            ("sample.bson", 4),
            ("broken_array.bson", 20),
        ] {
            assert_eq!(decode_all(&read(file)), Ok(want), "{file}");
        }
        for file in [
            "bad_cstring.bson",
            "bad_type.bson",
            "invalid_field_name.bson",
            "partial_file.bson",
            "random_bytes.bson",
        ] {
            let err = decode_all(&read(file)).expect_err(file);
            assert!(!err.is_empty(), "{file}");
        }
    }
}
