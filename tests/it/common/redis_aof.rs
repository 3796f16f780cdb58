//! AOF sets: real append-only files written by a real `redis-server`, and a set made from
//! them through the library (the import verb is not needed to make one).

use std::path::{Path, PathBuf};
use std::time::Duration;

use dbkeeper::engine::EngineKind;
use dbkeeper::engine::redis::aof::import_aof;
use dbkeeper::repo::Repo;
use tokio_util::sync::CancellationToken;

use super::redis::{Opts, RedisServer};
use super::wait_until;

/// Makes and publishes a set whose Redis part is imported from `src`; its id.
pub fn import_set(repo: &Path, src: &Path) -> dbkeeper::error::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = Repo::local(repo)?;
        let lock = r.lock(Duration::from_secs(10)).await?;
        let mut w = r.begin_set(&lock, chrono::Utc::now())?;
        let out = w.engine_writer(EngineKind::Redis)?;
        let entry = import_aof(src, out, &CancellationToken::new())?;
        w.add_engine(EngineKind::Redis, entry);
        Ok(w.publish()?.id)
    })
}

/// A server writing a multi-part AOF into `dir` (`appendfsync always`, so a kill loses
/// nothing), with or without an RDB preamble in its rewritten base.
pub fn aof_server(preamble: bool, dir: &Path) -> RedisServer {
    RedisServer::start_with(Opts {
        appendonly: true,
        dir: Some(dir),
        extra: &[
            "--appendfsync",
            "always",
            "--aof-use-rdb-preamble",
            if preamble { "yes" } else { "no" },
        ],
        ..Opts::default()
    })
}

/// Rewrites the AOF and waits until the rewrite is done (a new base, an empty incr file).
pub fn rewrite(s: &RedisServer) {
    s.cli(&["BGREWRITEAOF"]);
    let done = wait_until(Duration::from_secs(30), || {
        let info = s.cli(&["INFO", "persistence"]);
        info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0")
    });
    assert!(done, "BGREWRITEAOF did not finish");
}

/// Keys per db as the server counts them (`DBSIZE` of dbs 0 to 15), empty dbs left out, in
/// the set's own form (`db0` → n).
pub fn dbsizes(s: &RedisServer) -> std::collections::BTreeMap<String, u64> {
    (0..16)
        .filter_map(|db| {
            let n: u64 = s.cli(&["-n", &db.to_string(), "DBSIZE"]).parse().unwrap();
            (n > 0).then(|| (format!("db{db}"), n))
        })
        .collect()
}

/// Copies a directory's files (not recursive) to a new temp dir.
pub fn copy_dir(from: &Path) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let to = t.path().join(from.file_name().unwrap());
    std::fs::create_dir(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    (t, to)
}
