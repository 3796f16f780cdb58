//! `import` and `export`: stock mongodump directories (plain, gzip, archive), `dump.rdb` files
//! and the seed's nightly layout read into ordinary sets that restore and preseed as native
//! ones; refusals that leave the repository untouched; exports read back by stock tools and
//! re-imported to identical sets.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::import::{
    SeedParts, content, copy_tree, gzip_copy, manifest, pymongo_docs, seed_set, write_archive,
};
use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::{assert_code, dbkeeper, run, sets, shared_fixtures, stderr, stdout, temps};

/// The stock dumps of the fixtures: each a mongodump directory.
const DUMPS: [&str; 9] = [
    "coll_with_index",
    "coll_with_ttl_index",
    "coll_without_index",
    "foodump",
    "specialcharacter",
    "indextestdump",
    "longindextestdump",
    "indexmetadata",
    "testdirs",
];

fn fixtures() -> Option<PathBuf> {
    let f = shared_fixtures().map(|p| p.join("mongodump"));
    if f.is_none() {
        eprintln!("skipped: ../shared/fixtures/ is absent (the other projects' dumps)");
    }
    f
}

fn import(repo: &Path, src: &Path, extra: &[&str]) -> Output {
    run(dbkeeper(repo).arg("import").arg(src).args(extra))
}

/// Imports and returns the new set's id.
#[track_caller]
fn imported(repo: &Path, src: &Path, extra: &[&str]) -> String {
    let o = import(repo, src, extra);
    assert_code(&o, 0);
    stdout(&o).trim().to_owned()
}

/// The last line of stderr: the error a refusal prints.
fn last_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or("").to_owned()
}

#[test]
fn stock_mongodumps_import_plain_gzip_and_archive_and_restore_equal_to_pymongo() {
    let Some(fx) = fixtures() else { return };
    for name in DUMPS {
        let dump = fx.join(name);
        let repo = tempfile::tempdir().unwrap();
        let id = imported(repo.path(), &dump, &["--time", "2026-01-01_00-00-00"]);
        assert_eq!(id, "2026-01-01_00-00-00");
        let m = manifest(repo.path(), &id);
        assert!(
            m["imported"]["source"].as_str().unwrap().ends_with(name),
            "{m}"
        );
        assert_eq!(m["imported"]["sha256"].as_str().unwrap().len(), 64);
        let want = pymongo_docs(&dump);
        // Counts come from the documents read.
        for (ns, docs) in &want {
            assert_eq!(
                m["engines"]["mongodb"]["counts"][ns].as_u64(),
                Some(docs.len() as u64),
                "{name}: {ns}: {m}"
            );
        }
        let plain = content(repo.path(), &id);

        // Restored, the server holds what pymongo reads from the fixture's files.
        let dst = Mongo::start(false, false);
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_MONGODB_URI", dst.uri())
            .args(["restore", &id]));
        assert_code(&o, 0);
        for (ns, docs) in &want {
            let (db, coll) = ns.split_once('.').unwrap();
            let mut docs = docs.clone();
            docs.sort();
            assert_eq!(dst.sorted_docs(db, coll), docs, "{name}: {ns}");
        }
        drop(dst);

        // The gzip and archive forms import to the same content.
        let work = tempfile::tempdir().unwrap();
        let gz = work.path().join("gz");
        gzip_copy(&dump, &gz);
        let archive = work.path().join("dump.archive");
        write_archive(&dump, &archive, false);
        let archive_gz = work.path().join("dump.archive.gz");
        write_archive(&dump, &archive_gz, true);
        for (i, src) in [&gz, &archive, &archive_gz].into_iter().enumerate() {
            let t = format!("2026-01-01_00-00-0{}", i + 1);
            let id = imported(repo.path(), src, &["--time", &t]);
            assert_eq!(
                content(repo.path(), &id),
                plain,
                "{name}: {}",
                src.display()
            );
        }
        assert!(temps(repo.path()).is_empty());
    }
}

#[test]
fn seed_layout_imports_as_one_set_and_preseeds_both_engines() {
    let Some(fx) = fixtures() else { return };
    let redis = RedisServer::start();
    redis.cli(&["DEBUG", "POPULATE", "500", "k"]);
    redis.cli(&["SELECT", "3"]);
    redis.cli(&["-n", "3", "SET", "other", "db"]);
    let want_digest = redis.digest();
    let backups = tempfile::tempdir().unwrap();
    let dump = fx.join("indextestdump");
    let set_dir = seed_set(
        backups.path(),
        "2025-06-01_03-00-00",
        &SeedParts {
            mongodump: Some(&dump),
            redis: Some(&redis),
            ..Default::default()
        },
    );
    let repo = tempfile::tempdir().unwrap();
    // The set time comes from the directory's name.
    let id = imported(repo.path(), &set_dir, &[]);
    assert_eq!(id, "2025-06-01_03-00-00");
    assert_eq!(sets(repo.path()), vec![id.clone()]);
    let m = manifest(repo.path(), &id);
    assert_eq!(m["engines"]["redis"]["counts"]["db0"], 500, "{m}");
    assert_eq!(m["engines"]["redis"]["counts"]["db3"], 1, "{m}");
    assert_eq!(
        m["engines"]["mongodb"]["counts"]["indextest.test_collection"],
        100
    );
    // The deep verify ran and was recorded.
    let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
    assert_code(&o, 0);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list[0]["status"], "ok", "{list}");

    // Both engines preseed from it, as from a native set.
    let mongo = Mongo::start(false, false);
    let data = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_MONGODB_URI", mongo.uri())
        .env("DBKEEPER_REDIS_URL", "redis://127.0.0.1:1")
        .env("DBKEEPER_REDIS_DATA_DIR", data.path())
        .arg("preseed"));
    assert_code(&o, 0);
    let want = pymongo_docs(&dump);
    let mut docs = want["indextest.test_collection"].clone();
    docs.sort();
    assert_eq!(mongo.sorted_docs("indextest", "test_collection"), docs);
    let names: Vec<String> = mongo
        .indexes("indextest", "test_collection")
        .iter()
        .map(|i| i.get_str("name").unwrap().to_owned())
        .collect();
    assert!(names.len() > 1, "secondary indexes restored: {names:?}");
    let s = RedisServer::on_dir(data.path(), false);
    assert_eq!(s.digest(), want_digest);
}

#[test]
fn import_all_twice_imports_once_and_list_shows_the_source() {
    let Some(fx) = fixtures() else { return };
    let redis = RedisServer::start();
    redis.cli(&["DEBUG", "POPULATE", "50"]);
    let backups = tempfile::tempdir().unwrap();
    seed_set(
        backups.path(),
        "2025-06-02_03-00-00",
        &SeedParts {
            mongodump: Some(&fx.join("foodump")),
            redis: Some(&redis),
            ..Default::default()
        },
    );
    // A partial set: Redis only. It imports what is there and says what was absent.
    seed_set(
        backups.path(),
        "2025-06-01_03-00-00",
        &SeedParts {
            redis: Some(&redis),
            ..Default::default()
        },
    );
    std::fs::write(backups.path().join("notes.txt"), "not a set").unwrap();
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .arg("import")
        .arg("--all")
        .arg(backups.path()));
    assert_code(&o, 0);
    // Oldest first.
    assert_eq!(
        stdout(&o).lines().collect::<Vec<_>>(),
        vec!["2025-06-01_03-00-00", "2025-06-02_03-00-00"]
    );
    assert!(stderr(&o).contains("MongoDB absent"), "{}", stderr(&o));
    let m = manifest(repo.path(), "2025-06-01_03-00-00");
    assert!(m["engines"].get("mongodb").is_none());

    let o = run(dbkeeper(repo.path())
        .arg("import")
        .arg("--all")
        .arg(backups.path()));
    assert_code(&o, 0);
    assert_eq!(stdout(&o).trim(), "", "the second run imports nothing");
    assert!(stderr(&o).contains("already imported"), "{}", stderr(&o));
    assert_eq!(sets(repo.path()).len(), 2);

    // A set changed since its import is not the same import: refused, its id being taken.
    let changed = backups.path().join("2025-06-01_03-00-00/redis/extra.txt");
    std::fs::write(&changed, "x").unwrap();
    let o = run(dbkeeper(repo.path())
        .arg("import")
        .arg("--all")
        .arg(backups.path()));
    assert_code(&o, 4);
    assert!(
        last_line(&o).contains("already holds set 2025-06-01_03-00-00"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(&changed).unwrap();

    let o = run(dbkeeper(repo.path()).arg("list"));
    assert_code(&o, 0);
    let src = std::fs::canonicalize(backups.path().join("2025-06-02_03-00-00")).unwrap();
    assert!(
        stdout(&o).contains(&format!("imported from {}", src.display())),
        "{}",
        stdout(&o)
    );
    let o = run(dbkeeper(repo.path()).args(["list", "--json"]));
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list[0]["imported"]["source"], src.display().to_string());
}

#[test]
fn sources_that_do_not_parse_are_refused_and_nothing_is_written() {
    let Some(fx) = fixtures() else { return };
    let work = tempfile::tempdir().unwrap();
    // A mongodump whose BSON file is cut off mid-document (bsondump's own test file).
    let dump = work.path().join("dump");
    copy_tree(&fx.join("foodump"), &dump);
    std::fs::copy(
        fx.join("bsondump/partial_file.bson"),
        dump.join("test/foo.bson"),
    )
    .unwrap();
    // An RDB whose checksum trailer does not match.
    let redis = RedisServer::start();
    redis.cli(&["DEBUG", "POPULATE", "20"]);
    let rdb = work.path().join("dump.rdb");
    redis.cli(&["--rdb", rdb.to_str().unwrap()]);
    let mut bytes = std::fs::read(&rdb).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&rdb, &bytes).unwrap();
    // A metadata file that is not JSON (an empty one means none, as in testdirs/).
    let badmeta = work.path().join("badmeta");
    copy_tree(&fx.join("foodump"), &badmeta);
    std::fs::write(badmeta.join("test/foo.metadata.json"), "{\"options\": {").unwrap();
    // An empty directory.
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    // An archive cut in the middle.
    let archive = work.path().join("cut.archive");
    write_archive(&fx.join("indextestdump"), &archive, false);
    let a = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &a[..a.len() / 2]).unwrap();

    // A single-file AOF cut in the middle of a command.
    let aof = work.path().join("appendonly.aof");
    std::fs::write(
        &aof,
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva",
    )
    .unwrap();
    // A SQLite file that is not Chroma's, where a persist directory's would be.
    let foreign = work.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let o = std::process::Command::new(crate::common::chroma::python())
        .args([
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('CREATE TABLE notes (body TEXT)'); c.commit()",
        ])
        .arg(foreign.join("chroma.sqlite3"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");

    let repo = tempfile::tempdir().unwrap();
    for (src, file, says) in [
        (&aof, aof.clone(), "byte 23"),
        (&foreign, foreign.join("chroma.sqlite3"), "not Chroma's"),
        (&dump, dump.join("test/foo.bson"), "at byte"),
        (&rdb, rdb.clone(), "checksum"),
        (&badmeta, badmeta.join("test/foo.metadata.json"), "not JSON"),
        (&empty, empty.clone(), "empty directory"),
        (&archive, archive.clone(), "byte"),
    ] {
        let o = import(repo.path(), src, &[]);
        assert_code(&o, 1);
        let line = last_line(&o);
        assert!(
            line.starts_with("dbkeeper: ")
                && line.contains(&file.display().to_string())
                && line.contains(says),
            "{}: {line}",
            src.display()
        );
        assert!(sets(repo.path()).is_empty(), "{}", src.display());
        assert!(temps(repo.path()).is_empty(), "{}", src.display());
    }
    // A path that is not there, and a bad --time: usage errors.
    assert_code(&import(repo.path(), &work.path().join("nope"), &[]), 2);
    assert_code(&import(repo.path(), &empty, &["--time", "yesterday"]), 2);
}

#[test]
fn exports_are_read_by_stock_tools_and_reimport_to_identical_sets() {
    let Some(fx) = fixtures() else { return };
    let redis = RedisServer::start();
    redis.cli(&["DEBUG", "POPULATE", "300"]);
    redis.cli(&["-n", "2", "HSET", "h", "a", "1", "b", "2"]);
    let digest = redis.digest();
    let backups = tempfile::tempdir().unwrap();
    let set_dir = seed_set(
        backups.path(),
        "2025-07-01_03-00-00",
        &SeedParts {
            mongodump: Some(&fx.join("specialcharacter")),
            redis: Some(&redis),
            ..Default::default()
        },
    );
    let repo = tempfile::tempdir().unwrap();
    let id = imported(repo.path(), &set_dir, &[]);
    let original = content(repo.path(), &id);
    let out = tempfile::tempdir().unwrap();

    // mongodump: pymongo reads the BSON under mongodump's escaped names.
    let md = out.path().join("md");
    let o = run(dbkeeper(repo.path())
        .args(["export", &id])
        .arg(&md)
        .args(["--format", "mongodump"]));
    assert_code(&o, 0);
    assert!(md.join("db1/caf%C3%A9s.bson").is_file());
    assert!(md.join("db1/caf%C3%A9s.metadata.json").is_file());
    assert_eq!(
        pymongo_docs(&md),
        pymongo_docs(&fx.join("specialcharacter"))
    );
    let back = imported(repo.path(), &md, &["--time", "2025-07-02_00-00-00"]);
    let again = content(repo.path(), &back);
    assert_eq!(
        again
            .iter()
            .filter(|(k, _)| k.starts_with("mongodb"))
            .collect::<Vec<_>>(),
        original
            .iter()
            .filter(|(k, _)| k.starts_with("mongodb"))
            .collect::<Vec<_>>()
    );

    // rdb: redis-check-rdb accepts it and a server loads the same data.
    let rd = out.path().join("rdb");
    let o = run(dbkeeper(repo.path())
        .args(["export", &id])
        .arg(&rd)
        .args(["--format", "rdb"]));
    assert_code(&o, 0);
    let check = std::process::Command::new("redis-check-rdb")
        .arg(rd.join("dump.rdb"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let s = RedisServer::on_dir(&rd, false);
    assert_eq!(s.digest(), digest);
    drop(s);
    let back = imported(
        repo.path(),
        &rd.join("dump.rdb"),
        &["--time", "2025-07-03T02:00:00+02:00"],
    );
    assert_eq!(back, "2025-07-03_00-00-00", "--time in RFC 3339, in UTC");
    let again = content(repo.path(), &back);
    assert_eq!(again["redis/dump.rdb.zst"], original["redis/dump.rdb.zst"]);
    assert_eq!(again["redis counts"], original["redis counts"]);

    // seed: the whole layout, re-imported to the same content.
    let sd = out.path().join("seed");
    let o = run(dbkeeper(repo.path())
        .args(["export", &id])
        .arg(&sd)
        .args(["--format", "seed"]));
    assert_code(&o, 0);
    assert!(sd.join(&id).join("redis/dump.rdb").is_file());
    assert!(stderr(&o).contains("chroma/ left out"), "{}", stderr(&o));
    let other = tempfile::tempdir().unwrap();
    let back = imported(other.path(), &sd.join(&id), &[]);
    assert_eq!(back, id);
    assert_eq!(content(other.path(), &back), original);

    // Never into a directory that holds something.
    let o = run(dbkeeper(repo.path())
        .args(["export", &id])
        .arg(&sd)
        .args(["--format", "seed"]));
    assert_code(&o, 2);
    assert!(
        last_line(&o).contains("not an empty directory"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_encrypted_repository_imports_sealed_and_exports_with_the_key() {
    let keys = tempfile::tempdir().unwrap();
    let (identity, public) = crate::common::age_key(keys.path(), "key.txt");
    let redis = RedisServer::start();
    redis.cli(&["DEBUG", "POPULATE", "100"]);
    let work = tempfile::tempdir().unwrap();
    let rdb = work.path().join("dump.rdb");
    redis.cli(&["--rdb", rdb.to_str().unwrap()]);
    // Without --time, a file's set is named after its modification time.
    let touch = std::process::Command::new("touch")
        .args(["-d", "2024-05-06 07:08:09 UTC"])
        .arg(&rdb)
        .output()
        .unwrap();
    assert!(touch.status.success());
    let repo = tempfile::tempdir().unwrap();
    let with_keys = |c: &mut std::process::Command| {
        c.env("DBKEEPER_AGE_RECIPIENTS", &public)
            .env("DBKEEPER_AGE_IDENTITY_FILE", &identity);
    };
    let mut c = dbkeeper(repo.path());
    with_keys(&mut c);
    let o = run(c.arg("import").arg(&rdb));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();
    assert_eq!(id, "2024-05-06_07-08-09");
    // Sealed: opaque artifact names, and the readable manifest keeps the import mark.
    let m = manifest(repo.path(), &id);
    assert!(m["encryption"].is_object(), "{m}");
    assert!(repo.path().join(&id).join("redis/0001.zst.age").is_file());
    assert_eq!(
        m["imported"]["source"],
        std::fs::canonicalize(&rdb).unwrap().display().to_string()
    );
    // Without the key there is nothing to export; with it, the file comes back byte for byte.
    let o = run(dbkeeper(repo.path())
        .args(["export", &id])
        .arg(work.path().join("nokey"))
        .args(["--format", "rdb"]));
    assert_code(&o, 1);
    assert!(!work.path().join("nokey").exists());
    assert!(!repo.path().join(&id).join("redis/dump.rdb.zst").exists());
    let mut c = dbkeeper(repo.path());
    with_keys(&mut c);
    let out = work.path().join("out");
    let o = run(c.args(["export", &id]).arg(&out).args(["--format", "rdb"]));
    assert_code(&o, 0);
    assert_eq!(
        std::fs::read(out.join("dump.rdb")).unwrap(),
        std::fs::read(&rdb).unwrap()
    );
}

#[test]
fn a_dump_with_an_oplog_replays_it_on_restore_from_the_directory_and_the_archive() {
    let Some(fx) = fixtures() else { return };
    let work = tempfile::tempdir().unwrap();
    let dump = work.path().join("dump");
    copy_tree(&fx.join("foodump"), &dump);
    // What `mongodump --oplog` adds: the entries written while the collections were read.
    crate::common::chroma::py(
        r#"
import sys, bson, datetime
from bson.timestamp import Timestamp
e = [{'ts': Timestamp(1700000000, i + 1), 't': bson.int64.Int64(1), 'v': bson.int64.Int64(2), 'op': 'i',
      'ns': 'test.foo', 'wall': datetime.datetime(2023, 11, 14), 'o': {'_id': 1000 + i, 'from': 'oplog'}}
     for i in range(3)]
open(sys.argv[1], 'wb').write(b''.join(bson.encode(x) for x in e))
"#,
        &[dump.join("oplog.bson").to_str().unwrap()],
    );
    let archive = work.path().join("dump.archive.gz");
    write_archive(&dump, &archive, true);
    let repo = tempfile::tempdir().unwrap();
    let a = imported(repo.path(), &dump, &["--time", "2026-02-01_00-00-00"]);
    let b = imported(repo.path(), &archive, &["--time", "2026-02-01_00-00-01"]);
    let m = manifest(repo.path(), &a);
    assert_eq!(
        m["engines"]["mongodb"]["details"]["oplog"]["entries"], 3,
        "{m}"
    );
    assert_eq!(content(repo.path(), &a), content(repo.path(), &b));
    let dst = Mongo::start(false, false);
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_MONGODB_URI", dst.uri())
        .args(["restore", &b]));
    assert_code(&o, 0);
    let docs = dst.sorted_docs("test", "foo");
    assert_eq!(
        docs.len(),
        pymongo_docs(&fx.join("foodump"))["test.foo"].len() + 3
    );
}

/// The seed's whole nightly set: a mongodump directory, the Redis server's `appendonlydir/`
/// (no `dump.rdb`: an AOF-only Redis) and a copy of Chroma's persist directory taken while the
/// server was stopped. It imports as one set with all three engines, and each preseeds from it:
/// MongoDB through its server, Redis and Chroma into their empty data directories, where
/// servers started on them read back what the sources held.
#[test]
fn seed_layout_with_aof_and_chroma_copy_imports_and_preseeds_all_three() {
    use crate::common::chroma::{COMPARE, SEED, py};
    use crate::common::chroma_dir::ChromaDirServer;
    use crate::common::redis_aof::{aof_server, dbsizes, rewrite};
    const SPEC: &str = r#"[{"name": "notes", "space": "l2", "dim": 8, "n": 120, "seed": 7, "metadata": {"k": 1}}]"#;
    let Some(fx) = fixtures() else { return };
    let work = tempfile::tempdir().unwrap();

    let aof_home = work.path().join("redis");
    std::fs::create_dir_all(&aof_home).unwrap();
    let redis = aof_server(true, &aof_home);
    redis.cli(&["DEBUG", "POPULATE", "300", "k"]);
    rewrite(&redis);
    redis.cli(&["SET", "after-rewrite", "1"]);
    redis.cli(&["DEL", "k:1"]);
    redis.cli(&["-n", "2", "HSET", "h", "f", "v"]);
    let want_sizes = dbsizes(&redis);
    let want_digest = redis.digest();
    drop(redis);

    let chroma_src = work.path().join("chroma-src");
    let chroma = ChromaDirServer::start(&chroma_src);
    py(SEED, &[&chroma.port.to_string(), SPEC]);
    chroma.stop();

    let dump = fx.join("coll_with_index");
    let backups = work.path().join("backups");
    let set_dir = seed_set(
        &backups,
        "2025-07-01_03-00-00",
        &SeedParts {
            mongodump: Some(&dump),
            aof_dir: Some(&aof_home.join("appendonlydir")),
            chroma_dir: Some(&chroma_src),
            ..Default::default()
        },
    );
    let repo = tempfile::tempdir().unwrap();
    let id = imported(repo.path(), &set_dir, &[]);
    assert_eq!(id, "2025-07-01_03-00-00");
    let m = manifest(repo.path(), &id);
    for e in ["mongodb", "redis", "chroma"] {
        assert!(m["engines"].get(e).is_some(), "{e} missing: {m}");
    }
    assert_eq!(m["engines"]["redis"]["details"]["format"], "aof", "{m}");
    assert_eq!(
        m["engines"]["chroma"]["details"]["format"], "data-copy",
        "{m}"
    );
    let counts: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(m["engines"]["redis"]["counts"].clone()).unwrap();
    assert_eq!(counts, want_sizes);
    assert_eq!(
        m["engines"]["chroma"]["counts"]["default_database/notes"], 120,
        "{m}"
    );

    let mongo = Mongo::start(false, false);
    let redis_data = tempfile::tempdir().unwrap();
    let chroma_data = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_MONGODB_URI", mongo.uri())
        .env("DBKEEPER_REDIS_DATA_DIR", redis_data.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", chroma_data.path())
        .arg("preseed"));
    assert_code(&o, 0);
    let mut want = pymongo_docs(&dump)["test.foo"].clone();
    want.sort();
    assert_eq!(mongo.sorted_docs("test", "foo"), want);
    let r = RedisServer::on_dir(redis_data.path(), true);
    assert_eq!(r.digest(), want_digest);
    drop(r);
    let a = ChromaDirServer::start(&chroma_src);
    let b = ChromaDirServer::start(chroma_data.path());
    let out = py(COMPARE, &[&a.port.to_string(), &b.port.to_string(), SPEC]);
    assert!(out.contains("OK"), "{out}");
}
