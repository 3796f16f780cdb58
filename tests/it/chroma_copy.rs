//! Chroma data copies against real servers: a persist directory seeded through a running
//! `chroma run`, stopped and copied, stored with `import_data_copy`, then verified, preseeded
//! into an empty volume and exported, each read back by a server on the result.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dbkeeper::engine::EngineKind;
use dbkeeper::engine::chroma::datacopy::{export_data_copy, import_data_copy};
use dbkeeper::error::Error;
use dbkeeper::repo::Repo;
use dbkeeper::repo::manifest::EngineEntry;
use tokio_util::sync::CancellationToken;

use crate::common::chroma::{COMPARE, SEED, py, python};
use crate::common::chroma_dir::ChromaDirServer;
use crate::common::*;

const SPEC: &str = r#"[
 {"name": "docs-l2", "space": "l2", "dim": 16, "n": 700, "seed": 1, "metadata": {"team": "ü", "n": 3}},
 {"name": "cos-c", "space": "cosine", "dim": 8, "n": 150, "seed": 2, "meta": false},
 {"name": "empty-c", "space": "ip", "dim": 4, "n": 0, "seed": 3}
]"#;
const OTHER_SPEC: &str = r#"[{"name": "other-c", "space": "l2", "dim": 4, "n": 40, "seed": 4}]"#;

/// Stores `src` as a new set through the library (what `dbkeeper import` does); returns the
/// set id and the entry, or the refusal.
fn import_set(repo: &Path, src: &Path) -> Result<(String, EngineEntry), Error> {
    let r = Repo::local(repo)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let lock = rt.block_on(r.lock(Duration::from_secs(10)))?;
    let mut w = r.begin_set(&lock, chrono::Utc::now())?;
    let entry = import_data_copy(
        src,
        w.engine_writer(EngineKind::Chroma)?,
        &CancellationToken::new(),
    )?;
    w.add_engine(EngineKind::Chroma, entry.clone());
    let id = w.id().to_owned();
    w.publish()?;
    Ok((id, entry))
}

fn copy_dir(from: &Path, to: &Path) {
    let o = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn compare(a: &ChromaDirServer, b: &ChromaDirServer) {
    let out = py(COMPARE, &[&a.port.to_string(), &b.port.to_string(), SPEC]);
    assert!(out.contains("OK"), "{out}");
    let out = py(
        COMPARE,
        &[
            &a.port.to_string(),
            &b.port.to_string(),
            OTHER_SPEC,
            "otherdb",
        ],
    );
    assert!(out.contains("OK"), "{out}");
}

/// Seeds a persist directory through a running server, stops it, and copies the directory.
fn seeded_copy(root: &Path) -> std::path::PathBuf {
    let src = root.join("src");
    let s = ChromaDirServer::start(&src);
    py(SEED, &[&s.port.to_string(), SPEC]);
    py(SEED, &[&s.port.to_string(), OTHER_SPEC, "otherdb"]);
    s.stop();
    let copy = root.join("copy");
    copy_dir(&src, &copy);
    copy
}

#[test]
fn data_copy_verifies_preseeds_and_exports_equal() {
    let root = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let copy = seeded_copy(root.path());
    let before = std::fs::read(copy.join("chroma.sqlite3")).unwrap();

    let (id, entry) = import_set(repo.path(), &copy).unwrap();
    // Counts from SQLite equal what was seeded, keyed as a logical export keys them.
    let counts: Vec<(String, u64)> = entry.counts.clone().into_iter().collect();
    assert_eq!(
        counts,
        vec![
            ("default_database/cos-c".to_owned(), 150),
            ("default_database/docs-l2".to_owned(), 700),
            ("default_database/empty-c".to_owned(), 0),
            ("otherdb/other-c".to_owned(), 40),
        ]
    );
    assert_eq!(entry.details["format"], "data-copy");
    assert_eq!(entry.details["chroma"], "1.5.9");
    assert!(
        entry.server_version.contains("sysdb 10"),
        "{}",
        entry.server_version
    );
    // The source is read, never written.
    assert_eq!(std::fs::read(copy.join("chroma.sqlite3")).unwrap(), before);

    let o = run(dbkeeper(repo.path()).args(["verify", &id, "--deep"]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("ok"), "{}", stdout(&o));

    // Preseed into a volume an interrupted preseed left (its temp directory and a segment
    // directory moved into place), no URL: the server is not running yet. Redone whole.
    let vol = tempfile::tempdir().unwrap();
    let stale = "00000000-0000-0000-0000-0000000000aa";
    for d in [".dbkeeper-chroma-copy.tmp", stale] {
        std::fs::create_dir(vol.path().join(d)).unwrap();
        std::fs::write(vol.path().join(d).join("junk"), "partial").unwrap();
    }
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", vol.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("preseeded"), "{}", stderr(&o));
    assert!(
        names(vol.path()).iter().all(|n| !n.starts_with('.')),
        "temps left: {:?}",
        names(vol.path())
    );
    assert!(!vol.path().join(stale).exists(), "leftover kept");

    let a = ChromaDirServer::start(&root.path().join("src"));
    // A data copy is never loaded into a running server: refused before anything is touched.
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_URL", a.url())
        .args(["restore", &id, "--force"]));
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains("DBKEEPER_CHROMA_DATA_DIR"),
        "{}",
        stderr(&o)
    );

    let b = ChromaDirServer::start(vol.path());
    compare(&a, &b);
    b.stop();

    // A volume that holds data now is left alone.
    let sqlite = std::fs::read(vol.path().join("chroma.sqlite3")).unwrap();
    let listing = names(vol.path());
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", vol.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("holds data"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(vol.path().join("chroma.sqlite3")).unwrap(),
        sqlite
    );
    assert_eq!(names(vol.path()), listing);
    // So is one holding anything at all that is not ours.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("notes.txt"), "keep").unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", other.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("holds data"), "{}", stderr(&o));
    assert_eq!(names(other.path()), vec!["notes.txt"]);

    // Export round-trips: a server on the exported directory reads equal.
    let r = Repo::local(repo.path()).unwrap();
    let set = r.resolve(&id, Some(EngineKind::Chroma)).unwrap();
    let entry = set.manifest.engines[&EngineKind::Chroma].clone();
    let out = root.path().join("exported");
    export_data_copy(&set, &entry, &out).unwrap();
    let c = ChromaDirServer::start(&out);
    compare(&a, &c);
    drop(c);
    // Into a directory that is not empty: refused, untouched.
    let e = export_data_copy(&set, &entry, other.path()).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert_eq!(names(other.path()), vec!["notes.txt"]);

    // The online preseed (init) passes over a data copy, without failing, and leaves the
    // running, empty server as it is: the copy is the pre-start preseed's (chroma-preseed).
    let fresh = tempfile::tempdir().unwrap();
    let live = ChromaDirServer::start(fresh.path());
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_URL", live.url())
        .arg("preseed"));
    assert_code(&o, 0);
    let line = stderr(&o);
    assert!(
        line.contains("preseed left to the data directory") && line.contains(&id),
        "{line}"
    );
    assert!(!line.contains("preseeded"), "{line}");
    let listed = py(
        "import sys, chromadb; print(len(chromadb.HttpClient(host='127.0.0.1', port=int(sys.argv[1])).list_collections()))",
        &[&live.port.to_string()],
    );
    assert_eq!(listed.trim(), "0", "the running server was written to");
    drop(live);

    // A logical export is passed over by the data-directory preseed (chroma-preseed), which
    // writes nothing: the online preseed restores it once the server runs.
    let logical = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(logical.path())
        .env("DBKEEPER_CHROMA_URL", a.url())
        .arg("backup"));
    assert_code(&o, 0);
    let lid = stdout(&o).trim().to_owned();
    let empty = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(logical.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", empty.path())
        .arg("preseed"));
    assert_code(&o, 0);
    let line = stderr(&o);
    assert!(
        line.contains("preseed left to the running server") && line.contains(&lid),
        "{line}"
    );
    assert!(names(empty.path()).is_empty());
    // And a logical set cannot be exported as a directory.
    let lr = Repo::local(logical.path()).unwrap();
    let lset = lr.newest_good(Some(EngineKind::Chroma)).unwrap().unwrap();
    let lentry = lset.manifest.engines[&EngineKind::Chroma].clone();
    let e = export_data_copy(&lset, &lentry, &empty.path().join("x")).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
}

/// A persist directory made by chromadb's own client (no server), for the refusals.
fn python_persist_dir(dir: &Path) {
    let script = r#"
import sys, numpy as np, chromadb
c = chromadb.PersistentClient(path=sys.argv[1], settings=chromadb.Settings(anonymized_telemetry=False))
col = c.create_collection("refusals", embedding_function=None)
col.add(ids=[f"r{i}" for i in range(30)], embeddings=np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32), documents=[f"d{i}" for i in range(30)])
"#;
    py(script, &[dir.to_str().unwrap()]);
}

fn sqlite(db: &Path, sql: &str) {
    let o = Command::new(python())
        .args(["-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()"])
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[track_caller]
fn refused(repo: &Path, src: &Path, want: &str) -> Error {
    let e = import_set(repo, src).map(|(id, _)| id).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(want), "{msg}");
    assert!(!msg.contains('\n'), "more than one line: {msg}");
    assert!(sets(repo).is_empty(), "a set was written: {:?}", sets(repo));
    assert!(temps(repo).is_empty(), "temps left: {:?}", temps(repo));
    e
}

#[test]
fn data_copy_refusals_write_nothing() {
    let root = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    let good = root.path().join("good");
    python_persist_dir(&good);

    // A SQLite file that is not Chroma's.
    let foreign = root.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    sqlite(
        &foreign.join("chroma.sqlite3"),
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('x');",
    );
    let e = refused(repo.path(), &foreign, "not Chroma's");
    assert!(e.to_string().contains("foreign/chroma.sqlite3"), "{e}");
    assert!(matches!(e, Error::Engine { .. }), "{e}");

    // Garbage named chroma.sqlite3.
    let garbage = root.path().join("garbage");
    std::fs::create_dir(&garbage).unwrap();
    std::fs::write(garbage.join("chroma.sqlite3"), noise(8192, 5)).unwrap();
    let e = refused(repo.path(), &garbage, "not a SQLite database");
    assert!(e.to_string().contains("garbage/chroma.sqlite3"), "{e}");
    assert!(matches!(e, Error::Engine { .. }), "{e}");

    // No chroma.sqlite3 at all, and no directory at all.
    let bare = root.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    refused(repo.path(), &bare, "no chroma.sqlite3");
    refused(
        repo.path(),
        &root.path().join("absent"),
        "no such directory",
    );

    // A schema newer than chromadb 1.5.9 writes.
    let newer = root.path().join("newer");
    copy_dir(&good, &newer);
    sqlite(
        &newer.join("chroma.sqlite3"),
        "UPDATE migrations SET version = 11, filename = '00011-future.sqlite.sql' WHERE dir = 'sysdb' AND version = 10;",
    );
    let e = refused(
        repo.path(),
        &newer,
        "sysdb migration 11 is newer than chromadb 1.5.9",
    );
    assert!(matches!(e, Error::Engine { .. }), "{e}");

    // An HNSW segment file of a collection with records is missing.
    let partial = root.path().join("partial");
    copy_dir(&good, &partial);
    let seg = names(&partial)
        .into_iter()
        .find(|n| partial.join(n).is_dir())
        .expect("a segment directory");
    std::fs::remove_file(partial.join(&seg).join("header.bin")).unwrap();
    refused(repo.path(), &partial, &format!("segment {seg}/header.bin"));

    // The good one is stored; a set whose stored SQLite is damaged fails deep verification
    // and is skipped by the preseed, leaving the volume empty.
    let (id, _) = import_set(repo.path(), &good).unwrap();
    let o = run(dbkeeper(repo.path()).args(["verify", &id, "--deep"]));
    assert_code(&o, 0);
    // A copy with a `-wal` beside chroma.sqlite3 (taken from a crashed server): the WAL is
    // stored and applied when counting, the source files left as they were.
    let wal = root.path().join("wal");
    copy_dir(&good, &wal);
    let crashed_writer = r#"
import sys, os, sqlite3
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("DELETE FROM embeddings WHERE embedding_id = 'r7'")
os._exit(0)
"#;
    py(
        crashed_writer,
        &[wal.join("chroma.sqlite3").to_str().unwrap()],
    );
    let wal_bytes = std::fs::read(wal.join("chroma.sqlite3-wal")).unwrap();
    assert!(!wal_bytes.is_empty());
    let main_bytes = std::fs::read(wal.join("chroma.sqlite3")).unwrap();
    let (wal_id, wal_entry) = import_set(repo.path(), &wal).unwrap();
    assert_eq!(wal_entry.counts["default_database/refusals"], 29);
    assert!(
        wal_entry
            .files
            .iter()
            .any(|f| f.path == "chroma/data/chroma.sqlite3-wal.zst")
    );
    assert_eq!(
        std::fs::read(wal.join("chroma.sqlite3-wal")).unwrap(),
        wal_bytes
    );
    assert_eq!(
        std::fs::read(wal.join("chroma.sqlite3")).unwrap(),
        main_bytes
    );
    let o = run(dbkeeper(repo.path()).args(["verify", &wal_id, "--deep"]));
    assert_code(&o, 0);
    std::fs::remove_dir_all(repo.path().join(&wal_id)).unwrap();

    // A set whose manifest no longer lists a segment file that its SQLite names is corrupt
    // (the manifest edited consistently, its sum rewritten: only the deep check can tell).
    let (id2, _) = import_set(repo.path(), &good).unwrap();
    let drop_segment = r#"
import sys, json, hashlib, os
d, seg = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(d, "manifest.json")))
e = m["engines"]["chroma"]
e["files"] = [f for f in e["files"] if not f["path"].endswith(seg + "/header.bin.zst")]
e["details"]["files"] = [f for f in e["details"]["files"] if f != seg + "/header.bin"]
raw = json.dumps(m, indent=2).encode()
open(os.path.join(d, "manifest.json"), "wb").write(raw)
if os.path.exists(os.path.join(d, "manifest.json.sha256")):
    open(os.path.join(d, "manifest.json.sha256"), "w").write(hashlib.sha256(raw).hexdigest() + "  manifest.json\n")
"#;
    py(
        drop_segment,
        &[repo.path().join(&id2).to_str().unwrap(), &seg],
    );
    let o = run(dbkeeper(repo.path()).args(["verify", &id2]));
    assert_code(&o, 0);
    let o = run(dbkeeper(repo.path()).args(["verify", &id2, "--deep"]));
    assert_code(&o, 4);
    assert!(
        stdout(&o).contains(&format!("segment file {seg}/header.bin")),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let stored = repo.path().join(&id).join("chroma/data/chroma.sqlite3.zst");
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    let o = run(dbkeeper(repo.path()).args(["verify", &id, "--deep"]));
    assert_code(&o, 4);
    let vol = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_CHROMA_DATA_DIR", vol.path())
        .arg("preseed"));
    assert_code(&o, 0);
    assert!(stderr(&o).contains("does not verify"), "{}", stderr(&o));
    assert!(names(vol.path()).is_empty(), "{:?}", names(vol.path()));
}
