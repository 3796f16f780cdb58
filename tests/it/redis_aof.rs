//! Redis AOF sets: real append-only files (multi-part, with and without an RDB preamble;
//! the single-file fixture) imported through the library, then counted, deep-verified,
//! preseeded and replayed by the binary; and the refusals of broken sources.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::redis::RedisServer;
use crate::common::redis_aof::*;
use crate::common::*;

/// Writes every kind of change the key model follows: several dbs, expiring keys, deletes,
/// renames, moves, copies, collections filled and emptied, a transaction, a flushed db.
fn churn(s: &RedisServer, round: &str) {
    let r = |db: &str, args: &[&str]| {
        let mut v = vec!["-n", db];
        v.extend_from_slice(args);
        s.cli(&v);
    };
    let k = |name: &str| format!("{round}:{name}");
    r("0", &["SET", &k("plain"), "v"]);
    r("0", &["SET", &k("ttl"), "v", "EX", "3600"]);
    r("0", &["SET", &k("gone-soon"), "v", "PX", "50"]);
    r("0", &["SETEX", &k("setex"), "3600", "v"]);
    r("0", &["INCRBYFLOAT", &k("float"), "1.5"]);
    r("0", &["SET", &k("del"), "v"]);
    r("0", &["DEL", &k("del")]);
    r("0", &["SET", &k("getdel"), "v"]);
    r("0", &["GETDEL", &k("getdel")]);
    r("0", &["SET", &k("from"), "v"]);
    r("0", &["RENAME", &k("from"), &k("to")]);
    r("0", &["SET", &k("mv"), "v"]);
    r("0", &["MOVE", &k("mv"), "2"]);
    r("0", &["SET", &k("cp"), "v"]);
    r("0", &["COPY", &k("cp"), &k("cp2"), "DB", "1"]);
    r("0", &["SET", &k("expire"), "v"]);
    r("0", &["EXPIRE", &k("expire"), "3600"]);
    r("0", &["MSET", &k("m1"), "a", &k("m2"), "b"]);
    // Sets: filled, one emptied by SREM, one by SPOP (written as SREM), one kept.
    r("1", &["SADD", &k("set"), "a", "b", "c"]);
    r("1", &["SREM", &k("set"), "a"]);
    r("1", &["SADD", &k("set-empty"), "a", "b"]);
    r("1", &["SREM", &k("set-empty"), "a", "b"]);
    r("1", &["SADD", &k("spop"), "a", "b"]);
    r("1", &["SPOP", &k("spop"), "2"]);
    // Hashes.
    r("1", &["HSET", &k("h"), "f1", "1", "f2", "2"]);
    r("1", &["HINCRBYFLOAT", &k("h"), "f3", "0.5"]);
    r("1", &["HDEL", &k("h"), "f1"]);
    r("1", &["HSET", &k("h-empty"), "f1", "1"]);
    r("1", &["HDEL", &k("h-empty"), "f1"]);
    // Lists: popped, trimmed, LREM'd to nothing, moved.
    r("2", &["RPUSH", &k("l"), "a", "b", "c", "d"]);
    r("2", &["LPOP", &k("l")]);
    r("2", &["LTRIM", &k("l"), "0", "1"]);
    r("2", &["RPUSH", &k("l-trim"), "a", "b"]);
    r("2", &["LTRIM", &k("l-trim"), "5", "10"]);
    r("2", &["RPUSH", &k("l-rem"), "x", "x", "y"]);
    r("2", &["LREM", &k("l-rem"), "0", "x"]);
    r("2", &["LREM", &k("l-rem"), "1", "y"]);
    r("2", &["RPUSH", &k("l-move"), "only"]);
    r("2", &["LMOVE", &k("l-move"), &k("l-dst"), "LEFT", "RIGHT"]);
    r("2", &["RPUSH", &k("l-pop"), "a", "b"]);
    r("2", &["RPOP", &k("l-pop"), "2"]);
    // Sorted sets.
    r("2", &["ZADD", &k("z"), "1", "a", "2", "b", "3", "c"]);
    r("2", &["ZPOPMIN", &k("z")]);
    r("2", &["ZINCRBY", &k("z"), "5", "d"]);
    r("2", &["ZADD", &k("z-empty"), "1", "a", "2", "b"]);
    r("2", &["ZREMRANGEBYSCORE", &k("z-empty"), "-inf", "+inf"]);
    r("2", &["ZADD", &k("z-rem"), "1", "a"]);
    r("2", &["ZREM", &k("z-rem"), "a"]);
    // Geo (a sorted set) emptied; a HyperLogLog counted (PFCOUNT may be written too).
    r(
        "3",
        &[
            "GEOADD",
            &k("geo"),
            "13.36",
            "38.11",
            "palermo",
            "15.08",
            "37.50",
            "catania",
        ],
    );
    r("3", &["ZREM", &k("geo"), "palermo", "catania"]);
    r(
        "3",
        &["GEOADD", &k("geo-kept"), "13.36", "38.11", "palermo"],
    );
    r("3", &["PFADD", &k("hll"), "a", "b"]);
    r("3", &["PFCOUNT", &k("hll")]);
    // A stream, and a transaction.
    r("3", &["XADD", &k("stream"), "*", "f", "v"]);
    s.cli(&[
        "EVAL",
        "redis.call('SELECT', 3) redis.call('SET', KEYS[1], 'x') return 1",
        "1",
        &k("lua"),
    ]);
    // db4 gets keys, then is flushed; db5 and db6 are swapped.
    r("4", &["SET", &k("flushed"), "v"]);
    r("4", &["FLUSHDB"]);
    r("5", &["SET", &k("swap"), "v"]);
    r("0", &["SWAPDB", "5", "6"]);
}

fn transaction(s: &RedisServer) {
    // redis-cli runs one command per call: MULTI/EXEC need one connection.
    let mut c = s.client();
    let _: () = ::redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("tx:a")
        .arg("1")
        .cmd("DEL")
        .arg("tx:a")
        .cmd("SET")
        .arg("tx:b")
        .arg("2")
        .query(&mut c)
        .unwrap();
}

/// A real server's multi-part AOF: churn, a rewrite (the base then holds it all, as an RDB or
/// as commands), more churn (the incr file), a short-lived key left to expire.
fn make_aof(
    preamble: bool,
    dir: &Path,
) -> (RedisServer, String, std::collections::BTreeMap<String, u64>) {
    let s = aof_server(preamble, dir);
    churn(&s, "before");
    transaction(&s);
    rewrite(&s);
    churn(&s, "after");
    // db 0 swapped away while the replay's restore marker is in it.
    s.cli(&["SWAPDB", "0", "7"]);
    s.cli(&["SET", "after:in-new-db0", "v"]);
    // Members removed from collections the base holds (their members come from the base).
    s.cli(&["-n", "1", "SADD", "before:set", "z"]);
    s.cli(&["-n", "2", "DEL", "before:l"]);
    // The short-lived keys expire; the server writes their DEL.
    assert!(wait_until(Duration::from_secs(10), || {
        s.cli(&["EXISTS", "before:gone-soon", "after:gone-soon"]) == "0"
    }));
    let digest = s.digest();
    let sizes = dbsizes(&s);
    (s, digest, sizes)
}

fn set_counts(repo: &Path, id: &str) -> std::collections::BTreeMap<String, u64> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join(id).join("manifest.json")).unwrap())
            .unwrap();
    serde_json::from_value(m["engines"]["redis"]["counts"].clone()).unwrap()
}

fn details(repo: &Path, id: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join(id).join("manifest.json")).unwrap())
            .unwrap();
    m["engines"]["redis"]["details"].clone()
}

#[test]
fn aof_sets_count_verify_preseed_and_replay_like_the_server() {
    for preamble in [true, false] {
        let data_src = tempfile::tempdir().unwrap();
        let (src, digest, sizes) = make_aof(preamble, data_src.path());
        let dir = src.stop().join("appendonlydir");
        let incr_has_commands = std::fs::read_dir(&dir).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().ends_with(".incr.aof")
                && e.metadata().unwrap().len() > 0
        });
        assert!(
            incr_has_commands,
            "the incr file holds the writes after the rewrite"
        );

        let repo = tempfile::tempdir().unwrap();
        let id = import_set(repo.path(), &dir).unwrap();
        assert!(sizes.len() >= 5, "several dbs hold keys: {sizes:?}");
        assert_eq!(set_counts(repo.path(), &id), sizes, "preamble={preamble}");
        let d = details(repo.path(), &id);
        assert_eq!(d["format"], "aof");
        assert_eq!(d["counts_exact"], true, "{d}");

        // The same files loaded by the server count the same.
        let (_t, copy) = copy_dir(&dir);
        let loaded = RedisServer::on_dir(copy.parent().unwrap(), true);
        assert_eq!(dbsizes(&loaded), sizes, "preamble={preamble}");
        assert_eq!(loaded.digest(), digest);
        drop(loaded);

        let o = run(dbkeeper(repo.path()).args(["verify", "--deep"]));
        assert_code(&o, 0);

        // Preseed into an empty data dir; a server with appendonly yes has the same data.
        let data = tempfile::tempdir().unwrap();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_DATA_DIR", data.path())
            .arg("preseed"));
        assert_code(&o, 0);
        let names: Vec<String> = std::fs::read_dir(data.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["appendonlydir".to_string()], "{names:?}");
        let seeded = RedisServer::on_dir(data.path(), true);
        assert_eq!(seeded.digest(), digest, "preseed, preamble={preamble}");
        drop(seeded);
        // The directory now holds data: a second preseed leaves it alone.
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_DATA_DIR", data.path())
            .arg("preseed"));
        assert_code(&o, 0);
        assert!(stderr(&o).contains("holds data"), "{}", stderr(&o));

        // Online restore replays the commands.
        let dst = RedisServer::start();
        let o = run(dbkeeper(repo.path())
            .env("DBKEEPER_REDIS_URL", dst.url())
            .arg("restore"));
        assert_code(&o, 0);
        assert_eq!(dst.digest(), digest, "replay, preamble={preamble}");
        assert_eq!(dbsizes(&dst), sizes);
    }
}

#[test]
fn the_single_file_fixture_with_an_rdb_preamble_parses_and_loads() {
    let Some(fx) = shared_fixtures() else {
        eprintln!("skipped: the shared fixtures are not here");
        return;
    };
    let src = fx.join("redis-rdb/rdb-preamble.aof");
    let repo = tempfile::tempdir().unwrap();
    let id = import_set(repo.path(), &src).unwrap();
    let counts = set_counts(repo.path(), &id);
    assert_eq!(details(repo.path(), &id)["layout"], "single-file");

    let data = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", data.path())
        .arg("preseed"));
    assert_code(&o, 0);
    let s = RedisServer::on_dir(data.path(), true);
    assert_eq!(dbsizes(&s), counts);
    assert_eq!(s.cli(&["GET", "k3"]), "v3");
    assert_eq!(s.cli(&["GET", "k1"]), "v1");
}

/// Asserts a refused import: one line naming `file` and a byte offset, and no set or temp
/// left in the repository.
fn assert_refused(src: &Path, file: &str) -> String {
    let repo = tempfile::tempdir().unwrap();
    let e = import_set(repo.path(), src).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains(file) && e.contains("byte "), "{e}");
    assert!(sets(repo.path()).is_empty(), "{:?}", sets(repo.path()));
    assert!(temps(repo.path()).is_empty(), "{:?}", temps(repo.path()));
    e
}

#[test]
fn broken_aof_sources_are_refused_with_the_file_and_offset() {
    let data_src = tempfile::tempdir().unwrap();
    let s = aof_server(true, data_src.path());
    s.cli(&["SET", "a", "1"]);
    rewrite(&s);
    s.cli(&["SET", "b", "2"]);
    s.cli(&["SET", "c", "3"]);
    let dir = s.stop().join("appendonlydir");
    let incr = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".incr.aof"))
        .unwrap();

    // Cut mid-command.
    let (_t1, cut) = copy_dir(&dir);
    let bytes = std::fs::read(cut.join(&incr)).unwrap();
    std::fs::write(cut.join(&incr), &bytes[..bytes.len() - 3]).unwrap();
    let e = assert_refused(&cut, &incr);
    assert!(e.contains("truncated"), "{e}");

    // A bad bulk length.
    let (_t2, bad) = copy_dir(&dir);
    let text = String::from_utf8(bytes.clone())
        .unwrap()
        .replacen("$1\r\nb", "$x\r\nb", 1);
    std::fs::write(bad.join(&incr), text).unwrap();
    assert_refused(&bad, &incr);

    // The manifest names a file that is not there.
    let (_t3, missing) = copy_dir(&dir);
    std::fs::remove_file(missing.join(&incr)).unwrap();
    let e = assert_refused(&missing, "appendonly.aof.manifest");
    assert!(e.contains(&incr), "{e}");

    // Garbage.
    let junk = tempfile::tempdir().unwrap();
    let g = junk.path().join("appendonly.aof");
    std::fs::write(&g, noise(4096, 7)).unwrap();
    assert_refused(&g, "appendonly.aof");

    // A command the model does not know is refused, not guessed.
    let odd = junk.path().join("odd.aof");
    std::fs::write(
        &odd,
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n0\r\n*2\r\n$7\r\nSORTXYZ\r\n$1\r\nk\r\n",
    )
    .unwrap();
    let e = assert_refused(&odd, "odd.aof");
    assert!(e.contains("SORTXYZ") && e.contains("byte 23"), "{e}");
    // Nor are the commands whose effect on keys the model cannot replay safely: Redis 7.4's
    // hash-field expiry (a hash emptied by its fields expiring is gone: HEXPIRE is written as
    // HPEXPIREAT) and the *STORE commands. The good commands before them do not make a set.
    for (name, cmd) in [
        (
            "HPEXPIREAT",
            &["HPEXPIREAT", "h", "1", "FIELDS", "1", "f"][..],
        ),
        ("HPERSIST", &["HPERSIST", "h", "FIELDS", "1", "f"]),
        ("ZUNIONSTORE", &["ZUNIONSTORE", "d", "1", "z"]),
        (
            "GEORADIUS",
            &["GEORADIUS", "g", "0", "0", "1", "km", "STORE", "d"],
        ),
    ] {
        let mut bytes = Vec::new();
        for c in [&["SELECT", "0"][..], &["HSET", "h", "f", "v"], cmd] {
            bytes.extend_from_slice(format!("*{}\r\n", c.len()).as_bytes());
            for a in c {
                bytes.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
            }
        }
        let f = junk.path().join(format!("{name}.aof"));
        std::fs::write(&f, &bytes).unwrap();
        let e = assert_refused(&f, &format!("{name}.aof"));
        // SELECT 0 is 23 bytes, HSET h f v 35.
        assert!(
            e.contains(&format!("command {name}")) && e.contains("byte 58:"),
            "{e}"
        );
    }

    // The good copy imports; a corrupt stored file then fails deep verify.
    let repo = tempfile::tempdir().unwrap();
    let id = import_set(repo.path(), &dir).unwrap();
    assert_eq!(set_counts(repo.path(), &id).get("db0"), Some(&3));
    let stored = repo
        .path()
        .join(&id)
        .join(format!("redis/appendonlydir/{incr}.zst"));
    let z = Command::new("zstd")
        .args(["-q", "-d", "-c"])
        .arg(&stored)
        .output()
        .unwrap();
    let mut raw = z.stdout;
    raw.truncate(raw.len() - 3);
    let zz = Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -q -c > '{}'", stored.display()))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut zz.stdin.as_ref().unwrap(), &raw).unwrap();
    assert!(zz.wait_with_output().unwrap().status.success());
    // The manifest is made to agree with the cut file, so only the AOF reader can tell.
    let mpath = repo.path().join(&id).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let on_disk = std::fs::read(&stored).unwrap();
    let sha = Command::new("sha256sum").arg(&stored).output().unwrap();
    let sha = stdout(&sha).split_whitespace().next().unwrap().to_owned();
    for f in m["engines"]["redis"]["files"].as_array_mut().unwrap() {
        if f["path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{incr}.zst"))
        {
            f["sha256"] = sha.clone().into();
            f["size"] = on_disk.len().into();
            f["raw_size"] = raw.len().into();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let sum = Command::new("sha256sum")
        .arg("manifest.json")
        .current_dir(repo.path().join(&id))
        .output()
        .unwrap();
    std::fs::write(
        repo.path().join(&id).join("manifest.json.sha256"),
        &sum.stdout,
    )
    .unwrap();
    assert_code(&run(dbkeeper(repo.path()).arg("verify")), 0);
    let o = run(dbkeeper(repo.path()).args(["verify", "--deep"]));
    assert_code(&o, 4);
    let said = format!("{}{}", stdout(&o), stderr(&o));
    // Preseed checks every byte before anything is in place: the data dir stays empty.
    let data = tempfile::tempdir().unwrap();
    let p = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", data.path())
        .arg("preseed"));
    // The only set does not verify: it is skipped (as any corrupt set), nothing is written.
    assert_code(&p, 0);
    let said_p = stderr(&p);
    assert!(
        said_p.contains("does not verify") && said_p.contains(&incr),
        "{said_p}"
    );
    let left: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        said.contains(&incr) && said.contains("byte ") && said.contains("truncated"),
        "{said}"
    );
}

/// Members removed from a collection of the RDB part: the key stays counted and the set says
/// its counts are not exact (documented), rather than the import guessing.
#[test]
fn members_removed_from_an_rdb_collection_make_the_counts_inexact() {
    let data_src = tempfile::tempdir().unwrap();
    let s = aof_server(true, data_src.path());
    s.cli(&["SADD", "s", "a", "b"]);
    s.cli(&["SET", "k", "v"]);
    rewrite(&s);
    s.cli(&["SREM", "s", "a", "b"]);
    assert_eq!(s.cli(&["DBSIZE"]), "1");
    let dir = s.stop().join("appendonlydir");
    let repo = tempfile::tempdir().unwrap();
    let id = import_set(repo.path(), &dir).unwrap();
    assert_eq!(details(repo.path(), &id)["counts_exact"], false);
    assert_eq!(set_counts(repo.path(), &id).get("db0"), Some(&2));
    // Deep verify recomputes the same counts, and the set still preseeds what the server has.
    assert_code(&run(dbkeeper(repo.path()).args(["verify", "--deep"])), 0);
    let data = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .env("DBKEEPER_REDIS_DATA_DIR", data.path())
        .arg("preseed"));
    assert_code(&o, 0);
    let seeded = RedisServer::on_dir(data.path(), true);
    assert_eq!(seeded.cli(&["DBSIZE"]), "1");
}
