//! The compression baseline of `benches/run`: writes one file through the artifact writer a
//! MongoDB dump uses (zstd level 3 on the workers a collection of that size gets, sha256 of the
//! output, fsync), with no server in the way, so its throughput compares with `zstd -3 -T2` of
//! the same bytes. The set is never published: dropping it removes its temp directory.
//! usage: compress_artifact FILE REPO_DIR

use std::time::{Duration, Instant};

use dbkeeper::engine::EngineKind;
use dbkeeper::engine::mongodb::zstd_workers;
use dbkeeper::repo::Repo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, repo] = &args[..] else {
        return Err("usage: compress_artifact FILE REPO_DIR".into());
    };
    let repo = Repo::local(repo.as_ref())?;
    let lock = repo.lock(Duration::ZERO).await?;
    let set = repo.begin_set(&lock, chrono::Utc::now())?;
    let out = set.engine_writer(EngineKind::Mongodb)?;
    let mut input = std::fs::File::open(file)?;
    let bytes = input.metadata()?.len();
    let start = Instant::now();
    let mut w = out.create("bench/orders.bson", zstd_workers(bytes))?;
    std::io::copy(&mut input, &mut w)?;
    let f = w.finish()?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} bytes -> {} bytes in {secs:.3} s ({:.1} MB/s)",
        f.raw_size,
        f.size,
        f.raw_size as f64 / 1e6 / secs
    );
    Ok(())
}
