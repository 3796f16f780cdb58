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
        let mut buf = Vec::with_capacity(len);
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
    for elem in doc.iter() {
        let (_key, value) = elem.map_err(|e| e.to_string())?;
        validate_value(value)?;
    }
    Ok(())
}

fn validate_value(value: RawBsonRef<'_>) -> Result<(), String> {
    match value {
        RawBsonRef::Document(d) => validate(d),
        RawBsonRef::Array(a) => {
            for v in a.into_iter() {
                validate_value(v.map_err(|e| e.to_string())?)?;
            }
            Ok(())
        }
        RawBsonRef::JavaScriptCodeWithScope(c) => validate(c.scope),
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
