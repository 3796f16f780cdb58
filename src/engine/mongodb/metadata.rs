//! `<coll>.metadata.json` in mongodump's shape: canonical Extended JSON of `options`, `indexes`
//! (each as `listIndexes` returns it: `v`, `key`, `name` and every option), `uuid` (hex),
//! `collectionName` and `type`.

use mongodb::bson::{Bson, Document, spec::BinarySubtype};

/// What a collection is, as `listCollections` says (`collection`, `view`, `timeseries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Collection,
    View,
    Timeseries,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "collection" => Some(Kind::Collection),
            "view" => Some(Kind::View),
            "timeseries" => Some(Kind::Timeseries),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Collection => "collection",
            Kind::View => "view",
            Kind::Timeseries => "timeseries",
        }
    }
}

/// One collection's metadata file.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub collection_name: Option<String>,
    pub kind: Kind,
    /// `create` options (capped, size, max, validator, validationLevel/Action, collation,
    /// timeseries, clusteredIndex, viewOn, pipeline, …).
    pub options: Document,
    /// Index specifications as `listIndexes` returns them, `_id_` included.
    pub indexes: Vec<Document>,
    pub uuid: Option<String>,
}

impl Metadata {
    /// Builds the metadata of one `listCollections` entry and its `listIndexes` result.
    pub fn from_listing(entry: &Document, indexes: Vec<Document>) -> Result<Metadata, String> {
        let name = entry
            .get_str("name")
            .map_err(|_| "listCollections entry without a name".to_owned())?;
        let kind = match entry.get_str("type") {
            Ok(t) => Kind::parse(t).ok_or_else(|| format!("{name}: unknown type {t:?}"))?,
            Err(_) => Kind::Collection,
        };
        let options = entry.get_document("options").cloned().unwrap_or_default();
        let uuid = entry
            .get_document("info")
            .ok()
            .and_then(|i| i.get("uuid"))
            .and_then(|u| match u {
                Bson::Binary(b) if b.subtype == BinarySubtype::Uuid => Some(hex::encode(&b.bytes)),
                _ => None,
            });
        Ok(Metadata {
            collection_name: Some(name.to_owned()),
            kind,
            options,
            indexes,
            uuid,
        })
    }

    /// The file's bytes: one line of canonical Extended JSON, as mongodump writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let mut doc = Document::new();
        doc.insert("options", self.options.clone());
        doc.insert(
            "indexes",
            Bson::Array(self.indexes.iter().cloned().map(Bson::Document).collect()),
        );
        if let Some(u) = &self.uuid {
            doc.insert("uuid", u.clone());
        }
        if let Some(n) = &self.collection_name {
            doc.insert("collectionName", n.clone());
        }
        doc.insert("type", self.kind.name());
        let value = Bson::Document(doc).into_canonical_extjson();
        serde_json::to_vec(&value).expect("JSON values serialize")
    }

    /// Parses a metadata file written by us or by any mongodump version (older ones lack
    /// `collectionName`, `type` and `uuid`, and may carry `ns` in index specs).
    pub fn parse(bytes: &[u8]) -> Result<Metadata, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let bson = Bson::try_from(value).map_err(|e| format!("not Extended JSON: {e}"))?;
        let Bson::Document(doc) = bson else {
            return Err("not a JSON object".into());
        };
        let options = match doc.get("options") {
            None | Some(Bson::Null) => Document::new(),
            Some(Bson::Document(d)) => d.clone(),
            Some(_) => return Err("`options` is not an object".into()),
        };
        let indexes = match doc.get("indexes") {
            None | Some(Bson::Null) => Vec::new(),
            Some(Bson::Array(a)) => a
                .iter()
                .map(|i| match i {
                    Bson::Document(d) if d.get_document("key").is_ok() => Ok(d.clone()),
                    _ => Err("an index without a `key` document".to_owned()),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`indexes` is not an array".into()),
        };
        let kind = match doc.get_str("type") {
            Ok(t) => Kind::parse(t).ok_or_else(|| format!("unknown type {t:?}"))?,
            Err(_) if options.contains_key("viewOn") => Kind::View,
            Err(_) => Kind::Collection,
        };
        Ok(Metadata {
            collection_name: doc.get_str("collectionName").ok().map(str::to_owned),
            kind,
            options,
            indexes,
            uuid: doc.get_str("uuid").ok().map(str::to_owned),
        })
    }

    /// Index specifications to build after the data: every index but `_id_` (created with the
    /// collection), without the `ns` field older servers put in (newer ones reject it).
    pub fn secondary_indexes(&self) -> Vec<Document> {
        self.indexes
            .iter()
            .filter(|i| i.get_str("name").ok() != Some("_id_"))
            .map(|i| {
                let mut i = i.clone();
                i.remove("ns");
                i
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{Binary, doc};

    #[test]
    fn writes_mongodumps_shape_and_reads_it_back() {
        let entry = doc! {
            "name": "events",
            "type": "collection",
            "options": {"capped": true, "size": 4096_i64, "validator": {"a": {"$gt": 1.5}}},
            "info": {"readOnly": false, "uuid": Binary{subtype: BinarySubtype::Uuid, bytes: vec![0xab; 16]}},
        };
        let indexes = vec![
            doc! {"v": 2, "key": {"_id": 1}, "name": "_id_"},
            doc! {"v": 2, "key": {"b": -1, "a": 1}, "name": "b_-1_a_1", "unique": true, "ns": "x.events"},
        ];
        let m = Metadata::from_listing(&entry, indexes).unwrap();
        let json = String::from_utf8(m.to_json()).unwrap();
        assert!(
            json.starts_with(r#"{"options":{"capped":true,"size":{"$numberLong":"4096"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""key":{"b":{"$numberInt":"-1"},"a":{"$numberInt":"1"}}"#),
            "{json}"
        );
        assert!(
            json.contains(&format!(r#""uuid":"{}""#, "ab".repeat(16))),
            "{json}"
        );
        assert!(
            json.ends_with(r#""collectionName":"events","type":"collection"}"#),
            "{json}"
        );
        let back = Metadata::parse(json.as_bytes()).unwrap();
        assert_eq!(back, m);
        let sec = back.secondary_indexes();
        assert_eq!(sec.len(), 1);
        assert!(!sec[0].contains_key("ns"));
    }

    #[test]
    fn views_are_recognised_without_a_type() {
        let m =
            Metadata::parse(br#"{"options":{"viewOn":"a","pipeline":[]},"indexes":[]}"#).unwrap();
        assert_eq!(m.kind, Kind::View);
        assert!(Metadata::parse(b"").is_err());
        assert!(Metadata::parse(b"[1]").is_err());
        assert!(Metadata::parse(br#"{"indexes":[{"name":"x"}]}"#).is_err());
    }

    /// Every metadata file written by the real mongodump parses (the shared fixtures of
    /// mongo-tools), and the one that is not JSON is rejected.
    #[test]
    fn parses_every_mongodump_fixture() {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/mongodump");
        if !root.is_dir() {
            eprintln!(
                "skipped: {} is absent (fixtures live beside the checkout)",
                root.display()
            );
            return;
        }
        let mut stack = vec![root];
        let mut parsed = 0;
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                if !name.ends_with(".metadata.json") {
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap();
                let r = Metadata::parse(&bytes);
                if p.ends_with("testdirs/db1/c3.metadata.json") {
                    assert!(r.is_err(), "{} should not parse", p.display());
                    continue;
                }
                let m = r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(
                    m.indexes.iter().any(|i| i.get_document("key").is_ok()) || m.indexes.is_empty()
                );
                parsed += 1;
            }
        }
        assert!(parsed >= 10, "only {parsed} metadata fixtures found");
        let ttl = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/mongodump/coll_with_ttl_index/test/foo.metadata.json"),
        )
        .unwrap();
        let m = Metadata::parse(&ttl).unwrap();
        assert_eq!(m.collection_name.as_deref(), Some("foo"));
        let sec = m.secondary_indexes();
        assert_eq!(sec.len(), 1);
        assert_eq!(sec[0].get_i32("expireAfterSeconds").unwrap(), 1000);
    }
}
