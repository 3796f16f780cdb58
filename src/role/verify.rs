//! `dbkeeper verify`: checksums, and with `--deep` every record decoded and counted.

use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::{Error, Result};
use crate::repo::{self, Repo, VerifyLevel, VerifyReport};

pub async fn verify(
    repo: Repo,
    id: String,
    deep: bool,
    cancel: &CancellationToken,
) -> Result<VerifyReport> {
    let level = if deep {
        VerifyLevel::Deep
    } else {
        VerifyLevel::Checksums
    };
    let cancel = cancel.clone();
    let start = Instant::now();
    let report = tokio::task::spawn_blocking(move || {
        let set = repo.resolve(&id, None)?;
        repo::verify(&set, level, &cancel)
    })
    .await
    .map_err(|e| Error::engine("verify", format!("task failed: {e}")))??;
    info!(
        set = %report.id,
        files = report.files,
        bytes = report.bytes,
        records = report.records,
        deep,
        elapsed_ms = start.elapsed().as_millis() as u64,
        "set verifies"
    );
    println!(
        "ok: set {} verifies{} ({} files, {} bytes, {} records)",
        report.id,
        if deep { " deeply" } else { "" },
        report.files,
        report.bytes,
        report.records
    );
    Ok(report)
}
