//! Harness for `import`/`export`: stock backups built the way other tools build them (a
//! gzip copy of a mongodump directory, a `mongodump --archive` file, the seed's nightly
//! layout), pymongo's reading of BSON files, and a set's content read back decompressed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::chroma::py;
use super::redis::RedisServer;

/// Copies a directory tree (files writable, whatever the source's modes).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let dest = to.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::write(&dest, std::fs::read(&p).unwrap()).unwrap();
        }
    }
}

/// `mongodump --gzip`'s shape: a copy of `dump` with every `.bson` and `.metadata.json`
/// gzipped by the `gzip` tool (stray files left as they are).
pub fn gzip_copy(dump: &Path, to: &Path) {
    copy_tree(dump, to);
    let o = Command::new("sh")
        .arg("-c")
        .arg(r"find . -type f \( -name '*.bson' -o -name '*.metadata.json' \) -exec gzip -n {} +")
        .current_dir(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "gzip: {o:?}");
}

/// Writes `mongodump --archive`'s format from a dump directory (the format's BNF: magic,
/// header, collection metadata, terminator, then per namespace a header, its documents and a
/// terminator, and an EOF header). Collections are split over two interleaved blocks each,
/// as a concurrent mongodump writes them. With `gzip`, the whole file is gzipped.
pub fn write_archive(dump: &Path, out: &Path, gzip: bool) {
    let script = r#"
import sys, os, bson, gzip, urllib.parse
root, out, gz = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
TERM = b'\xff\xff\xff\xff'
def docs(path):
    data = open(path, 'rb').read()
    pos, v = 0, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos+4], 'little'); v.append(data[pos:pos+n]); pos += n
    return v
colls = {}
for db in sorted(os.listdir(root)):
    d = os.path.join(root, db)
    if not os.path.isdir(d):
        continue
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        if not os.path.isfile(p):
            continue
        for suf, k in (('.metadata.json', 'meta'), ('.bson', 'data')):
            if f.endswith(suf):
                name = urllib.parse.unquote(f[:-len(suf)])
                colls.setdefault((db, name), {})[k] = p
buf = bytearray(b'\x6d\xe2\x99\x81')
buf += bson.encode({'concurrent_collections': 4, 'version': '0.1', 'server_version': '7.0.0', 'tool_version': '100.9.4'})
for (db, name), c in sorted(colls.items()):
    meta = open(c['meta']).read() if 'meta' in c else ''
    buf += bson.encode({'db': db, 'collection': name, 'metadata': meta, 'size': 0, 'type': 'collection'})
buf += TERM
streams = {k: docs(c['data']) for k, c in sorted(colls.items()) if 'data' in c}
op = os.path.join(root, 'oplog.bson')
if os.path.isfile(op):
    streams[('', 'oplog')] = docs(op)
halves = [(k, v[:len(v)//2]) for k, v in streams.items()] + [(k, v[len(v)//2:]) for k, v in streams.items()]
for (db, name), part in halves:
    buf += bson.encode({'db': db, 'collection': name, 'EOF': False, 'CRC': bson.int64.Int64(0)})
    for d in part:
        buf += d
    buf += TERM
for (db, name) in streams:
    buf += bson.encode({'db': db, 'collection': name, 'EOF': True, 'CRC': bson.int64.Int64(0)})
    buf += TERM
data = gzip.compress(bytes(buf)) if gz else bytes(buf)
open(out, 'wb').write(data)
print(len(data))
"#;
    py(
        script,
        &[
            dump.to_str().unwrap(),
            out.to_str().unwrap(),
            if gzip { "1" } else { "0" },
        ],
    );
}

/// What pymongo decodes from a dump directory's `.bson` files (plain): per `db.collection`
/// (file names unescaped as mongorestore does), each document re-encoded by pymongo, which
/// must give back the file's bytes. Files in nested directories are not mongodump's.
pub fn pymongo_docs(dump: &Path) -> BTreeMap<String, Vec<Vec<u8>>> {
    let script = r#"
import sys, os, bson, json, urllib.parse
from bson.codec_options import CodecOptions
from bson.binary import UuidRepresentation
opts = CodecOptions(uuid_representation=UuidRepresentation.STANDARD, document_class=bson.son.SON)
root = sys.argv[1]
out = {}
for db in sorted(os.listdir(root)):
    d = os.path.join(root, db)
    if not os.path.isdir(d):
        continue
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        if not (os.path.isfile(p) and f.endswith('.bson')):
            continue
        data = open(p, 'rb').read()
        docs = bson.decode_all(data, codec_options=opts)
        raws = [bson.encode(x, codec_options=opts).hex() for x in docs]
        assert ''.join(raws) == data.hex(), p
        out[db + '.' + urllib.parse.unquote(f[:-5])] = raws
print(json.dumps(out))
"#;
    let o = py(script, &[dump.to_str().unwrap()]);
    let v: BTreeMap<String, Vec<String>> = serde_json::from_str(o.trim()).unwrap();
    v.into_iter()
        .map(|(k, docs)| (k, docs.iter().map(|h| hex::decode(h).unwrap()).collect()))
        .collect()
}

/// A plain set's manifest.
pub fn manifest(repo: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo.join(id).join("manifest.json")).unwrap()).unwrap()
}

/// A plain set's content: every file's path and decompressed bytes, per engine, with the
/// counts. Two sets with equal content restore the same data.
pub fn content(repo: &Path, id: &str) -> BTreeMap<String, Vec<u8>> {
    let m = manifest(repo, id);
    let mut out = BTreeMap::new();
    for (engine, e) in m["engines"].as_object().unwrap() {
        out.insert(
            format!("{engine} counts"),
            e["counts"].to_string().into_bytes(),
        );
        for f in e["files"].as_array().unwrap() {
            let path = f["path"].as_str().unwrap();
            let bytes = std::fs::read(repo.join(id).join(path)).unwrap();
            out.insert(path.to_owned(), zstd::decode_all(&bytes[..]).unwrap());
        }
    }
    out
}

/// Which engines a seed-layout set gets. The Chroma and AOF parts are filled by their own
/// harness (a Chroma persist directory copied while its server is stopped; the server's
/// `appendonlydir/`): extend here.
#[derive(Default)]
pub struct SeedParts<'a> {
    /// A mongodump directory copied to `mongodb/mongodb_backup/`.
    pub mongodump: Option<&'a Path>,
    /// A server whose `redis-cli --rdb` goes to `redis/dump.rdb`.
    pub redis: Option<&'a RedisServer>,
    /// A Chroma persist directory copied to `chroma/`.
    pub chroma_dir: Option<&'a Path>,
    /// An `appendonlydir/` copied to `redis/appendonlydir/`.
    pub aof_dir: Option<&'a Path>,
}

/// Builds `<backups>/<name>/` as the seed's nightly script does.
pub fn seed_set(backups: &Path, name: &str, parts: &SeedParts<'_>) -> PathBuf {
    let root = backups.join(name);
    std::fs::create_dir_all(&root).unwrap();
    if let Some(dump) = parts.mongodump {
        copy_tree(dump, &root.join("mongodb/mongodb_backup"));
    }
    if let Some(r) = parts.redis {
        std::fs::create_dir_all(root.join("redis")).unwrap();
        let rdb = root.join("redis/dump.rdb");
        r.cli(&["--rdb", rdb.to_str().unwrap()]);
        assert!(rdb.is_file(), "redis-cli --rdb wrote nothing");
    }
    if let Some(dir) = parts.aof_dir {
        copy_tree(dir, &root.join("redis/appendonlydir"));
    }
    if let Some(dir) = parts.chroma_dir {
        copy_tree(dir, &root.join("chroma"));
    }
    root
}
