//! MongoDB end to end against private `secantusd-rs` servers, with and without `--auth`, in
//! both topologies (single-node replica set as advertised, and `--standalone`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use mongodb::bson::{
    Binary, Bson, DateTime, Decimal128, Document, JavaScriptCodeWithScope, RawDocumentBuf, Regex,
    Timestamp, doc, oid::ObjectId, spec::BinarySubtype,
};
use serde_json::Value;

use crate::common::mongodb::{Mongo, PASSWORD};
use crate::common::{assert_code, code, dbkeeper, run, sets, stderr, stdout};

fn raw(d: Document) -> RawDocumentBuf {
    RawDocumentBuf::from_document(&d).unwrap()
}

/// Runs `dbkeeper ARGS` against one MongoDB URI and checks no output carries the password.
fn dbk(repo: &Path, uri: &str, args: &[&str]) -> Output {
    let o = run(dbkeeper(repo).env("DBKEEPER_MONGODB_URI", uri).args(args));
    no_password(&o);
    o
}

#[track_caller]
fn no_password(o: &Output) {
    for s in [stdout(o), stderr(o)] {
        assert!(!s.contains(PASSWORD), "password leaked:\n{s}");
        assert!(
            !s.contains(&crate::common::mongodb::enc(PASSWORD)),
            "encoded password leaked:\n{s}"
        );
    }
}

fn backup(m: &Mongo, repo: &Path, extra: &[&str]) -> String {
    let mut args = vec!["backup"];
    args.extend_from_slice(extra);
    let o = dbk(repo, &m.uri(), &args);
    assert_code(&o, 0);
    stdout(&o).trim().to_owned()
}

fn manifest(repo: &Path, id: &str) -> Value {
    serde_json::from_slice(&std::fs::read(repo.join(id).join("manifest.json")).unwrap()).unwrap()
}

/// Decompresses one stored file.
fn unzstd(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(std::fs::File::open(path).unwrap())
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// One document holding every BSON type MongoDB stores, with the awkward values.
fn every_type_docs() -> Vec<RawDocumentBuf> {
    let mut docs = Vec::new();
    let bin = |subtype: BinarySubtype, bytes: &[u8]| {
        Bson::Binary(Binary {
            subtype,
            bytes: bytes.to_vec(),
        })
    };
    let mut dec = [0u8; 16];
    dec[0] = 15;
    dec[14] = 0x3e; // 15 × 10^-1 = 1.5
    dec[15] = 0x30;
    let mut dec_nan = [0u8; 16];
    dec_nan[15] = 0x7c;
    docs.push(raw(doc! {
        "_id": ObjectId::new(),
        "i32": i32::MIN, "i64": i64::MAX, "neg_i64": -1_i64,
        "nan": f64::NAN, "negzero": -0.0_f64, "inf": f64::INFINITY, "ninf": f64::NEG_INFINITY,
        "tiny": f64::MIN_POSITIVE, "pi": std::f64::consts::PI,
        "dec": Decimal128::from_bytes(dec), "dec_nan": Decimal128::from_bytes(dec_nan),
        "str": "héllo wörld — 日本語 🎉", "empty": "",
        "before_1970": DateTime::from_millis(-2_208_988_800_000), "epoch": DateTime::from_millis(0),
        "bin_generic": bin(BinarySubtype::Generic, b"\x00\x01\xff"),
        "bin_function": bin(BinarySubtype::Function, b"fn"),
        "bin_old": bin(BinarySubtype::BinaryOld, b"old"),
        "uuid_old": bin(BinarySubtype::UuidOld, &[7; 16]),
        "uuid": bin(BinarySubtype::Uuid, &[0x12; 16]),
        "md5": bin(BinarySubtype::Md5, &[9; 16]),
        "encrypted": bin(BinarySubtype::Encrypted, b"enc"),
        "column": bin(BinarySubtype::Column, b"col"),
        "sensitive": bin(BinarySubtype::Sensitive, b"sens"),
        "user": bin(BinarySubtype::UserDefined(0x80), b"user"),
        "regex": Regex { pattern: "^a.*b$".into(), options: "imsx".into() },
        "code": Bson::JavaScriptCode("function() { return 1; }".into()),
        "code_scope": JavaScriptCodeWithScope { code: "x + y".into(), scope: doc! {"x": 1, "y": "z"} },
        "ts": Timestamp { time: 1_700_000_000, increment: 42 },
        "min": Bson::MinKey, "max": Bson::MaxKey, "null": Bson::Null, "t": true, "f": false,
        "arr": [1, "two", 3.0, {"four": 4}, [5]],
        "empty_doc": {}, "empty_arr": [],
    }));
    // Nested documents and arrays 50 levels deep.
    let mut nested = doc! {"leaf": "bottom"};
    for i in 0..50 {
        nested = if i % 2 == 0 {
            doc! {"d": nested}
        } else {
            doc! {"a": [Bson::Document(nested)]}
        };
    }
    docs.push(raw(doc! {"_id": "deep", "n": nested}));
    // A document just under the 16 MiB limit.
    let big = "x".repeat(16 * 1024 * 1024 - 1024);
    docs.push(raw(doc! {"_id": "big", "s": big}));
    for i in 0..100 {
        docs.push(raw(doc! {"_id": i, "v": format!("doc {i}")}));
    }
    docs
}

/// Collections, options and indexes of every user database, and their documents as sorted
/// raw bytes: what a round trip must preserve.
/// Per namespace: the `listCollections` entry, the index specs, the sorted documents.
type Snapshot = BTreeMap<String, (Document, Vec<Document>, Vec<Vec<u8>>)>;

fn snapshot(m: &Mongo) -> Snapshot {
    let mut out = BTreeMap::new();
    for db in m.databases() {
        for (name, mut spec) in m.collections(&db) {
            if name.starts_with("system.") {
                continue;
            }
            let is_view = spec.get_str("type") == Ok("view");
            spec.remove("idIndex");
            let indexes = if is_view {
                vec![]
            } else {
                m.indexes(&db, &name)
            };
            let docs = if is_view {
                vec![]
            } else {
                m.sorted_docs(&db, &name)
            };
            out.insert(format!("{db}.{name}"), (spec, indexes, docs));
        }
    }
    out
}

#[test]
fn every_bson_type_round_trips_byte_identically_with_auth() {
    let src = Mongo::start(true, false);
    let docs = every_type_docs();
    src.insert("types", "all", docs.clone());
    let repo = tempfile::tempdir().unwrap();
    let id = backup(&src, repo.path(), &[]);

    // The decompressed artifact is the documents, byte for byte, in mongodump's layout.
    let bson = unzstd(&repo.path().join(&id).join("mongodb/types/all.bson.zst"));
    let mut want: Vec<Vec<u8>> = docs.iter().map(|d| d.as_bytes().to_vec()).collect();
    want.sort();
    let mut got = Vec::new();
    let mut rest = &bson[..];
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        got.push(rest[..n].to_vec());
        rest = &rest[n..];
    }
    got.sort();
    assert!(got == want, "dumped bytes differ from inserted bytes");
    let m = manifest(repo.path(), &id);
    assert_eq!(m["engines"]["mongodb"]["counts"]["types.all"], 103);
    assert!(!m.to_string().contains(PASSWORD));

    let o = dbk(repo.path(), &src.uri(), &["verify", "--deep", &id]);
    assert_code(&o, 0);

    let dst = Mongo::start(true, true);
    let o = dbk(repo.path(), &dst.uri(), &["restore", &id]);
    assert_code(&o, 0);
    assert!(
        dst.sorted_docs("types", "all") == want,
        "restored bytes differ"
    );
}

/// 100 collections over 5 databases, awkward names, options, indexes and a view.
fn populate_many(m: &Mongo) {
    let dbs = ["app", "logs", "b\u{e9}ta", "x-y", "z_5"];
    let mut n = 0;
    for (di, db) in dbs.iter().enumerate() {
        for ci in 0..20 {
            let name = match (di, ci) {
                (0, 0) => "with.dots.in.name".to_owned(),
                (0, 1) => "caf\u{e9}s".to_owned(),
                (0, 2) => "slash/inside".to_owned(),
                (0, 3) => "sp ace%pct".to_owned(),
                (1, 0) => "empty".to_owned(),
                _ => format!("c{ci}"),
            };
            if (di, ci) == (1, 0) {
                m.command(db, doc! {"create": &name});
                continue;
            }
            let docs: Vec<RawDocumentBuf> = (0..(ci * 7 % 50 + 1))
                .map(|k| raw(doc! {"_id": k, "db": *db, "k": k as i64, "s": format!("v{k}")}))
                .collect();
            m.insert(db, &name, docs);
            n += 1;
        }
    }
    assert_eq!(n, 99);
    m.command(
        "app",
        doc! {"create": "capped", "capped": true, "size": 65536_i64, "max": 50_i64},
    );
    m.insert(
        "app",
        "capped",
        (0..60).map(|i| raw(doc! {"_id": i, "x": i})).collect(),
    );
    // One large enough to take several insert batches, in an order unlike its _ids.
    m.command(
        "app",
        doc! {"create": "capped_big", "capped": true, "size": 1_i64 << 30},
    );
    m.insert(
        "app",
        "capped_big",
        (0..40_000)
            .map(|i| raw(doc! {"_id": (i * 7919) % 40_000, "pad": "x".repeat(400)}))
            .collect(),
    );
    m.command(
        "app",
        doc! {"create": "validated", "validator": {"$jsonSchema": {"bsonType": "object", "required": ["a"]}},
        "validationLevel": "moderate", "validationAction": "error"},
    );
    m.insert(
        "app",
        "validated",
        vec![raw(doc! {"_id": 1, "a": 1}), raw(doc! {"_id": 2, "a": 2})],
    );
    m.command(
        "app",
        doc! {"create": "collated", "collation": {"locale": "fr", "strength": 2}},
    );
    m.insert("app", "collated", vec![raw(doc! {"_id": 1, "n": "Été"})]);
    m.command(
        "app",
        doc! {"create": "recent", "viewOn": "c5", "pipeline": [{"$match": {"k": {"$gt": 3}}}]},
    );
    // Every index kind the stand-in builds (it refuses text and hashed indexes).
    m.command(
        "app",
        doc! {"createIndexes": "c4", "indexes": [
            {"key": {"k": 1}, "name": "k_1", "unique": true},
            {"key": {"s": -1, "k": 1}, "name": "s_-1_k_1"},
            {"key": {"sparse": 1}, "name": "sparse_1", "sparse": true},
            {"key": {"p": 1}, "name": "partial", "partialFilterExpression": {"p": {"$gt": 5}}},
            {"key": {"when": 1}, "name": "ttl", "expireAfterSeconds": 3600},
            {"key": {"c": 1}, "name": "coll_idx", "collation": {"locale": "en", "strength": 1}},
            {"key": {"h": 1}, "name": "hidden", "hidden": true},
            {"key": {"loc": "2dsphere"}, "name": "geo"},
            {"key": {"pt": "2d"}, "name": "flat", "min": -10.0, "max": 10.0, "bits": 20},
            {"key": {"$**": 1}, "name": "wild", "wildcardProjection": {"s": 1}},
        ]},
    );
}

#[test]
fn hundred_collections_round_trip_with_options_indexes_and_views() {
    let src = Mongo::start(false, true);
    populate_many(&src);
    let want = snapshot(&src);
    assert!(want.len() >= 105, "{} namespaces", want.len());
    let repo = tempfile::tempdir().unwrap();
    let id = backup(&src, repo.path(), &["--parallel", "3"]);

    // Layout and escaping as mongodump writes them.
    let set = repo.path().join(&id).join("mongodb");
    for f in [
        "app/caf%C3%A9s.bson.zst",
        "app/caf%C3%A9s.metadata.json.zst",
        "app/slash%2Finside.bson.zst",
        "app/sp%20ace%25pct.bson.zst",
        "app/with.dots.in.name.bson.zst",
        "logs/empty.bson.zst",
        "app/recent.metadata.json.zst",
        "b\u{e9}ta/c3.bson.zst",
    ] {
        assert!(set.join(f).is_file(), "{f} missing");
    }
    assert!(
        !set.join("app/recent.bson.zst").exists(),
        "a view has no data file"
    );
    let m = manifest(repo.path(), &id);
    let counts = &m["engines"]["mongodb"]["counts"];
    assert_eq!(counts["app.slash/inside"], 15);
    assert_eq!(counts["logs.empty"], 0);
    assert_eq!(counts["app.capped"], 50);
    assert!(
        counts.get("app.recent").is_none(),
        "views hold no documents"
    );
    let details = &m["engines"]["mongodb"]["details"]["collections"];
    assert!(
        details
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "caf\u{e9}s" && c["db"] == "app")
    );

    let o = dbk(repo.path(), &src.uri(), &["verify", "--deep", &id]);
    assert_code(&o, 0);

    for standalone in [true, false] {
        let dst = Mongo::start(false, standalone);
        let o = dbk(
            repo.path(),
            &dst.uri(),
            &["restore", &id, "--parallel", "2"],
        );
        assert_code(&o, 0);
        let got = snapshot(&dst);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (ns, (spec, idx, docs)) in &want {
            let (gspec, gidx, gdocs) = &got[ns];
            assert_eq!(gspec, spec, "{ns}: options");
            assert_eq!(gidx, idx, "{ns}: indexes");
            assert!(gdocs == docs, "{ns}: documents differ");
        }
        // A capped collection keeps its insertion order (what it evicts next depends on it).
        for c in ["capped", "capped_big"] {
            assert!(
                dst.natural_docs("app", c) == src.natural_docs("app", c),
                "{c}: order"
            );
        }
        // The view is a view again, and answers.
        let v = dst.sorted_docs("app", "recent");
        assert_eq!(v.len(), want["app.c5"].2.len() - 4);
    }
}

/// The decompressed artifact decodes with PyPI pymongo's stock decoder to the same documents,
/// and the metadata files are Extended JSON in mongodump's shape.
#[test]
fn stock_bson_decoder_reads_the_artifact() {
    let Some(python) = python() else {
        panic!("pymongo's python not found (set DBKEEPER_TEST_PYTHON); run `bash .ci/run` once");
    };
    let src = Mongo::start(false, false);
    let docs = every_type_docs();
    src.insert("types", "all", docs);
    src.command(
        "types",
        doc! {"createIndexes": "all", "indexes": [{"key": {"i32": 1, "str": -1}, "name": "i32_1_str_-1", "sparse": true}]},
    );
    let repo = tempfile::tempdir().unwrap();
    let id = backup(&src, repo.path(), &[]);
    let out = tempfile::tempdir().unwrap();
    let set = repo.path().join(&id).join("mongodb/types");
    let bson_path = out.path().join("all.bson");
    let meta_path = out.path().join("all.metadata.json");
    std::fs::write(&bson_path, unzstd(&set.join("all.bson.zst"))).unwrap();
    std::fs::write(&meta_path, unzstd(&set.join("all.metadata.json.zst"))).unwrap();
    let script = r#"
import sys, json, bson
from bson.codec_options import CodecOptions
from bson.binary import UuidRepresentation
from bson import json_util
opts = CodecOptions(uuid_representation=UuidRepresentation.STANDARD, tz_aware=False)
data = open(sys.argv[1], 'rb').read()
raws, pos = [], 0
while pos < len(data):
    n = int.from_bytes(data[pos:pos+4], 'little'); raws.append(data[pos:pos+n]); pos += n
n = 0
with open(sys.argv[1], 'rb') as f:
    for i, doc in enumerate(bson.decode_file_iter(f, codec_options=opts)):
        assert bson.encode(doc, codec_options=opts) == raws[i], 'document %d differs' % i
        n += 1
meta = json_util.loads(open(sys.argv[2]).read())
assert list(meta.keys()) == ['options', 'indexes', 'uuid', 'collectionName', 'type'], list(meta.keys())
assert meta['collectionName'] == 'all' and meta['type'] == 'collection'
assert len(meta['uuid']) == 32
names = [i['name'] for i in meta['indexes']]
assert '_id_' in names and 'i32_1_str_-1' in names, names
idx = [i for i in meta['indexes'] if i['name'] == 'i32_1_str_-1'][0]
assert list(idx['key'].items()) == [('i32', 1), ('str', -1)] and idx['sparse'] is True, idx
raw = json.loads(open(sys.argv[2]).read())
assert raw['indexes'][0]['v'] == {'$numberInt': '2'}, raw['indexes'][0]
print('decoded', n)
"#;
    let o = std::process::Command::new(python)
        .args(["-c", script])
        .arg(&bson_path)
        .arg(&meta_path)
        .output()
        .unwrap();
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), "decoded 103");
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DBKEEPER_TEST_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let p = PathBuf::from(std::env::var_os("HOME")?).join(".cache/dbkeeper/venv/bin/python");
    p.exists().then_some(p)
}

#[test]
fn preseed_restores_an_empty_server_and_skips_a_non_empty_one() {
    let src = Mongo::start(true, false);
    src.insert(
        "app",
        "users",
        (0..500).map(|i| raw(doc! {"_id": i, "n": i})).collect(),
    );
    let repo = tempfile::tempdir().unwrap();

    // No backup and an empty target: a first start.
    let dst = Mongo::start(true, false);
    let o = dbk(repo.path(), &dst.uri(), &["preseed"]);
    assert_code(&o, 0);
    assert!(dst.databases().is_empty());

    let id = backup(&src, repo.path(), &[]);
    let o = dbk(repo.path(), &dst.uri(), &["preseed"]);
    assert_code(&o, 0);
    assert_eq!(
        dst.sorted_docs("app", "users"),
        src.sorted_docs("app", "users")
    );
    assert!(
        dst.collections("admin")
            .iter()
            .all(|(n, _)| n != "dbkeeper_restore_marker")
    );

    // Non-empty now: a second preseed skips and touches nothing.
    dst.insert("app", "users", vec![raw(doc! {"_id": "mine"})]);
    let before = snapshot(&dst);
    let o = dbk(repo.path(), &dst.uri(), &["preseed"]);
    assert_code(&o, 0);
    assert!(stderr(&o).contains("skipped"), "{}", stderr(&o));
    assert!(
        snapshot(&dst) == before,
        "a skipped preseed changed the target"
    );

    // restore refuses a non-empty target without --force, and changes nothing.
    let o = dbk(repo.path(), &dst.uri(), &["restore", &id]);
    assert_code(&o, 1);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert!(snapshot(&dst) == before);

    // --force drops what is there and restores the set.
    dst.insert("other", "junk", vec![raw(doc! {"_id": 1})]);
    let o = dbk(repo.path(), &dst.uri(), &["restore", &id, "--force"]);
    assert_code(&o, 0);
    assert_eq!(dst.databases(), vec!["app".to_owned()]);
    assert_eq!(
        dst.sorted_docs("app", "users"),
        src.sorted_docs("app", "users")
    );
}

#[test]
fn a_preseed_killed_half_way_is_redone() {
    let src = Mongo::start(false, true);
    // Enough data that the restore is still running when it is killed.
    for c in 0..4 {
        src.insert(
            "big",
            &format!("c{c}"),
            (0..60_000)
                .map(|i| raw(doc! {"_id": i, "pad": "p".repeat(200), "c": c}))
                .collect(),
        );
    }
    let repo = tempfile::tempdir().unwrap();
    backup(&src, repo.path(), &[]);
    let dst = Mongo::start(false, true);
    let mut child = dbkeeper(repo.path())
        .env("DBKEEPER_MONGODB_URI", dst.uri())
        .arg("preseed")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the marker is set and some data has arrived.
    let mid = crate::common::wait_until(Duration::from_secs(120), || {
        dst.collections("admin")
            .iter()
            .any(|(n, _)| n == "dbkeeper_restore_marker")
            && !dst.databases().is_empty()
    });
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(mid, "the preseed never reached the middle of its restore");
    assert!(
        dst.collections("admin")
            .iter()
            .any(|(n, _)| n == "dbkeeper_restore_marker"),
        "the killed preseed left no marker"
    );

    // The half-restored target is recognised, wiped and restored again.
    let o = dbk(repo.path(), &dst.uri(), &["preseed"]);
    assert_code(&o, 0);
    assert!(stderr(&o).contains("interrupted"), "{}", stderr(&o));
    for c in 0..4 {
        let name = format!("c{c}");
        assert!(dst.sorted_docs("big", &name) == src.sorted_docs("big", &name));
    }
    assert!(
        dst.collections("admin")
            .iter()
            .all(|(n, _)| n != "dbkeeper_restore_marker")
    );
}

#[test]
fn deep_verify_rejects_a_truncated_stream_that_checksums_accept() {
    let src = Mongo::start(false, true);
    src.insert(
        "app",
        "c",
        (0..100).map(|i| raw(doc! {"_id": i, "v": "x"})).collect(),
    );
    let repo = tempfile::tempdir().unwrap();
    let id = backup(&src, repo.path(), &[]);
    // Cut the stream mid-document and re-seal the manifest, as a bug in a writer would.
    let rel = "mongodb/app/c.bson.zst";
    let path = repo.path().join(&id).join(rel);
    let mut bson = unzstd(&path);
    bson.truncate(bson.len() - 7);
    let z = zstd::encode_all(&bson[..], 3).unwrap();
    std::fs::write(&path, &z).unwrap();
    let mpath = repo.path().join(&id).join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    for f in m["engines"]["mongodb"]["files"].as_array_mut().unwrap() {
        if f["path"] == rel {
            use sha2::Digest;
            f["size"] = z.len().into();
            f["raw_size"] = bson.len().into();
            f["sha256"] = hex::encode(sha2::Sha256::digest(&z)).into();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let _ = std::fs::remove_file(repo.path().join(&id).join("manifest.json.sha256"));

    let o = dbk(repo.path(), &src.uri(), &["verify", &id]);
    assert_code(&o, 0);
    let o = dbk(repo.path(), &src.uri(), &["verify", "--deep", &id]);
    assert_code(&o, 4);
    assert!(stderr(&o).contains("app/c.bson"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn namespace_filters_limit_the_dump() {
    let src = Mongo::start(false, true);
    for db in ["keep", "drop"] {
        for c in ["a", "b"] {
            src.insert(db, c, vec![raw(doc! {"_id": 1})]);
        }
    }
    let repo = tempfile::tempdir().unwrap();
    let id = backup(
        &src,
        repo.path(),
        &["--mongodb-include", "keep", "--mongodb-exclude", "keep.b"],
    );
    let m = manifest(repo.path(), &id);
    let counts: Vec<&String> = m["engines"]["mongodb"]["counts"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(counts, vec!["keep.a"]);

    // A partial restore from a full set: only the selected namespaces are checked for
    // emptiness, restored, and (with --force) dropped first; the rest of the target stays.
    let full = backup(&src, repo.path(), &[]);
    let dst = Mongo::start(false, true);
    dst.insert("unrelated", "x", vec![raw(doc! {"_id": "stays"})]);
    let o = dbk(
        repo.path(),
        &dst.uri(),
        &["restore", &full, "--mongodb-include", "keep"],
    );
    assert_code(&o, 0);
    assert_eq!(
        dst.databases(),
        vec!["keep".to_owned(), "unrelated".to_owned()]
    );
    assert_eq!(dst.sorted_docs("keep", "b").len(), 1);
    dst.insert("keep", "a", vec![raw(doc! {"_id": "extra"})]);
    dst.insert("keep", "b", vec![raw(doc! {"_id": "extra"})]);
    let o = dbk(
        repo.path(),
        &dst.uri(),
        &["restore", &full, "--mongodb-include", "keep.a"],
    );
    assert_code(&o, 1);
    let o = dbk(
        repo.path(),
        &dst.uri(),
        &["restore", &full, "--mongodb-include", "keep.a", "--force"],
    );
    assert_code(&o, 0);
    assert_eq!(dst.sorted_docs("keep", "a"), src.sorted_docs("keep", "a"));
    assert_eq!(
        dst.sorted_docs("keep", "b").len(),
        2,
        "keep.b was not selected"
    );
    assert_eq!(dst.sorted_docs("unrelated", "x").len(), 1);
}

// ---- readiness and health ----

#[test]
fn wait_and_health_in_both_topologies_with_and_without_auth() {
    let repo = tempfile::tempdir().unwrap();
    for (auth, standalone) in [(false, false), (false, true), (true, false), (true, true)] {
        let m = Mongo::start(auth, standalone);
        for discover in [false, true] {
            let uri = m.uri_with(discover);
            let o = dbk(repo.path(), &uri, &["wait", "--timeout", "30s"]);
            assert_code(&o, 0);
            let o = dbk(repo.path(), &uri, &["health", &uri]);
            assert_code(&o, 0);
            assert!(
                stdout(&o).starts_with("healthy: mongodb://"),
                "{}",
                stdout(&o)
            );
            let want = if standalone {
                "role=standalone"
            } else {
                "role=primary"
            };
            assert!(stdout(&o).contains(want), "{}", stdout(&o));
            let o = run(std::process::Command::new(crate::common::bin())
                .arg0_health()
                .arg(&uri));
            no_password(&o);
            assert_code(&o, 0);
        }
        if auth {
            // The URI from a Docker secret file, as the official images read theirs.
            let f = repo.path().join("mongodb-uri");
            std::fs::write(&f, format!("{}\n", m.uri())).unwrap();
            let o = run(dbkeeper(repo.path())
                .env("DBKEEPER_MONGODB_URI_FILE", &f)
                .args(["wait", "--timeout", "30s"]));
            no_password(&o);
            assert_code(&o, 0);
            // SCRAM-SHA-1 as well as the default SCRAM-SHA-256.
            let uri = format!("{}&authMechanism=SCRAM-SHA-1", m.uri());
            let o = dbk(repo.path(), &uri, &["health", &uri]);
            assert_code(&o, 0);
            let uri = format!("{}&authMechanism=SCRAM-SHA-256", m.uri());
            let o = dbk(repo.path(), &uri, &["health", &uri]);
            assert_code(&o, 0);
        }
    }
}

/// `dbkeeper-health` is the same binary called by another name.
trait Arg0Health {
    fn arg0_health(&mut self) -> &mut Self;
}

impl Arg0Health for std::process::Command {
    fn arg0_health(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        self.arg0("dbkeeper-health")
    }
}

#[test]
fn wrong_password_fails_fast_and_never_prints_it() {
    let m = Mongo::start(true, true);
    let repo = tempfile::tempdir().unwrap();
    let wrong = format!(
        "mongodb://root:{}@127.0.0.1:{}/?authSource=admin",
        crate::common::mongodb::enc(&format!("{PASSWORD}-wrong")),
        m.port
    );
    // A retrying wait would reach its deadline and exit 3; a wrong password is final.
    let o = dbk(repo.path(), &wrong, &["wait", "--timeout", "60s"]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).to_lowercase().contains("authentication"),
        "{}",
        stderr(&o)
    );
    let o = dbk(repo.path(), &wrong, &["health", &wrong]);
    assert_code(&o, 1);
    assert!(stdout(&o).starts_with("unhealthy:"), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().count(), 1);
    let o = dbk(repo.path(), &wrong, &["backup"]);
    assert_code(&o, 1);
    assert!(sets(repo.path()).is_empty());
    // No credentials at all against an --auth server: the dump is refused, not retried.
    let anon = format!("mongodb://127.0.0.1:{}/", m.port);
    let o = dbk(repo.path(), &anon, &["backup"]);
    assert_code(&o, 1);
}

#[test]
fn closed_port_and_non_mongodb_port() {
    let repo = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let uri = format!(
        "mongodb://root:{}@127.0.0.1:{port}/?directConnection=true",
        crate::common::mongodb::enc(PASSWORD)
    );
    let o = dbk(repo.path(), &uri, &["wait", "--timeout", "1s"]);
    assert_code(&o, 3);
    assert!(stderr(&o).contains("not ready"), "{}", stderr(&o));
    let o = dbk(repo.path(), &uri, &["health", &uri]);
    assert_code(&o, 1);
    assert!(stdout(&o).starts_with("unhealthy:"), "{}", stdout(&o));

    // Something that is not MongoDB answers on the port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            use std::io::Write;
            let mut s = s;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true");
    let o = dbk(repo.path(), &uri, &["health", "--timeout", "2s", &uri]);
    assert_code(&o, 1);
    assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    assert!(
        stdout(&o).contains("not a MongoDB server"),
        "{}",
        stdout(&o)
    );
    // It will not turn into one: wait gives up without waiting for its deadline.
    let o = dbk(repo.path(), &uri, &["wait", "--timeout", "60s"]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains("not a MongoDB server"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_malformed_uri_is_a_configuration_error() {
    let repo = tempfile::tempdir().unwrap();
    for uri in [
        // Not percent-encoded.
        format!("mongodb://root:{PASSWORD}@127.0.0.1:1/"),
        format!(
            "mongodb://root:{}@127.0.0.1:1/?directConnection=maybe",
            crate::common::mongodb::enc(PASSWORD)
        ),
    ] {
        let o = dbk(repo.path(), &uri, &["backup"]);
        assert_code(&o, 2);
        assert!(stderr(&o).contains("MongoDB URI"), "{}", stderr(&o));
        // The health probe stays 0/1 and one line, with the URL configured or given.
        for args in [
            vec!["health"],
            vec!["health", "--timeout", "2s", uri.as_str()],
        ] {
            let o = dbk(repo.path(), &uri, &args);
            assert_code(&o, 1);
            assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
            assert!(stdout(&o).starts_with("unhealthy:"), "{}", stdout(&o));
        }
    }
    let uri = format!(
        "mongodb://root:{}@127.0.0.1:1/?directConnection=maybe",
        crate::common::mongodb::enc(PASSWORD)
    );
    // From a Docker secret file too.
    let f = repo.path().join("uri");
    std::fs::write(&f, format!("{uri}\n")).unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_MONGODB_URI_FILE", &f)
        .arg("backup"));
    no_password(&o);
    assert_code(&o, 2);
}

#[test]
fn tls_options_in_the_uri_reach_the_driver() {
    let certs = tempfile::tempdir().unwrap();
    crate::common::make_certs(certs.path());
    let src = Mongo::start_tls(true, certs.path());
    let docs: Vec<RawDocumentBuf> = (0..500)
        .map(|i| raw(doc! {"_id": i, "v": format!("tls-{i}")}))
        .collect();
    src.insert("shop", "orders", docs);
    let repo = tempfile::tempdir().unwrap();
    let uri = src.uri();
    assert!(
        uri.contains("tls=true") && uri.contains("tlsCAFile="),
        "{uri}"
    );

    let o = dbk(repo.path(), &uri, &["wait", "--timeout", "30s"]);
    assert_code(&o, 0);
    let o = dbk(repo.path(), &uri, &["health", &uri]);
    assert_code(&o, 0);
    // Without the CA the server's certificate is not trusted: never healthy, no set.
    let untrusted = format!(
        "mongodb://{}:{}@127.0.0.1:{}/?directConnection=true&authSource=admin&tls=true\
         &serverSelectionTimeoutMS=2000",
        crate::common::mongodb::USER,
        crate::common::mongodb::enc(PASSWORD),
        src.port
    );
    let o = dbk(
        repo.path(),
        &untrusted,
        &["health", "--timeout", "3s", &untrusted],
    );
    assert_code(&o, 1);
    let o = dbk(repo.path(), &untrusted, &["backup"]);
    assert_ne!(code(&o), 0, "{}", stderr(&o));
    assert!(sets(repo.path()).is_empty());
    // Plain text to the TLS port is not MongoDB answering.
    let plain = format!(
        "mongodb://{}:{}@127.0.0.1:{}/?directConnection=true&authSource=admin",
        crate::common::mongodb::USER,
        crate::common::mongodb::enc(PASSWORD),
        src.port
    );
    let o = dbk(repo.path(), &plain, &["health", "--timeout", "3s", &plain]);
    assert_code(&o, 1);

    let id = backup(&src, repo.path(), &[]);
    let dst = Mongo::start_tls(true, certs.path());
    let o = dbk(repo.path(), &dst.uri(), &["restore", &id]);
    assert_code(&o, 0);
    assert_eq!(
        dst.sorted_docs("shop", "orders"),
        src.sorted_docs("shop", "orders")
    );
    assert_eq!(dst.sorted_docs("shop", "orders").len(), 500);
}
