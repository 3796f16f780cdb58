//! `dbkeeper list`: sets, newest first, with status, when each was last verified, size and age.
//! A set is `ok` only when its last recorded verification passed (see `repo::verified`);
//! reading its manifest and sizing its files only tells a set that is `unverified` from one
//! that is visibly corrupt.

use chrono::{SecondsFormat, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::repo::verified::{self, Record};
use crate::repo::{Repo, SetInfo, VerifyLevel};

/// The cheap check: the manifest parses and every file is present at its recorded size.
fn files_present(info: &SetInfo) -> std::result::Result<(), String> {
    let m = info.manifest.as_ref().map_err(|e| e.clone())?;
    let sizes = info.place.sizes().map_err(|e| e.to_string())?;
    for f in m.stored_files() {
        let name = f.stored_path();
        match sizes.get(name) {
            Some(&n) if n == f.size => {}
            Some(&n) => return Err(format!("{name} is {n} bytes, expected {}", f.size)),
            None => return Err(format!("{name} is missing")),
        }
    }
    Ok(())
}

/// `ok` (the last verification passed and every file is still there at its size),
/// `unverified` (files present, checksums never checked), `failed verification: …` or
/// `corrupt: …`.
fn status(info: &SetInfo, record: Option<&Record>) -> String {
    if let Err(e) = files_present(info) {
        return format!("corrupt: {e}");
    }
    match record {
        None => "unverified".to_owned(),
        Some(r) if r.ok => "ok".to_owned(),
        Some(r) => format!(
            "failed verification: {}",
            r.error.as_deref().unwrap_or("unknown")
        ),
    }
}

fn verified_text(record: Option<&Record>) -> String {
    record.map_or_else(|| "never verified".to_owned(), Record::describe)
}

/// One set as `list --json` and the sidecar's `GET /backups` show it.
pub fn set_json(s: &SetInfo, now: chrono::DateTime<Utc>) -> serde_json::Value {
    let record = verified::read_for(&s.place, &s.id);
    let engines = s.manifest.as_ref().map(|m| {
        m.engines
            .iter()
            .map(|(k, e)| {
                (
                    k.name().to_owned(),
                    json!({
                        "server_version": e.server_version,
                        "records": e.total_records(),
                        "counts": e.counts,
                        "bytes": e.stored_bytes(),
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
    });
    json!({
        "id": s.id,
        "time": s.time,
        "age_seconds": (now - s.time).num_seconds(),
        "status": status(s, record.as_ref()),
        "verified": record.as_ref().map(|r| json!({
            "at": r.at.to_rfc3339_opts(SecondsFormat::Secs, true),
            "level": r.level,
            "ok": r.ok,
            "error": r.error,
        })),
        "verified_text": verified_text(record.as_ref()),
        "bytes": s.manifest.as_ref().map(|m| m.stored_bytes()).unwrap_or(0),
        "encrypted": s.manifest.as_ref().map(|m| m.encryption.is_some()).unwrap_or(false),
        "engines": engines.unwrap_or_default(),
        "imported": s.manifest.as_ref().ok().and_then(|m| m.imported.as_ref()).map(|i| json!({
            "source": i.source,
            "sha256": i.sha256,
        })),
    })
}

/// With `verify`, every set's checksums are checked (and recorded) first; a set that fails
/// then makes the exit code that of a corrupt set, after the listing.
pub async fn list(
    repo: Repo,
    as_json: bool,
    verify: bool,
    cancel: &CancellationToken,
) -> Result<()> {
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || {
        let bad = if verify {
            super::verify::verify_all(&repo, VerifyLevel::Checksums, &cancel, &mut |_| {})?
                .into_iter()
                .filter(|o| o.result.is_err())
                .map(|o| o.id)
                .collect()
        } else {
            Vec::new()
        };
        print(&repo, as_json)?;
        if bad.is_empty() {
            Ok(())
        } else {
            Err(Error::repo(
                repo.display(),
                format!("{} set(s) fail verification: {}", bad.len(), bad.join(", ")),
            ))
        }
    })
    .await
    .map_err(|e| Error::engine("list", format!("task failed: {e}")))?
}

fn print(repo: &Repo, as_json: bool) -> Result<()> {
    let sets = repo.list()?;
    let now = Utc::now();
    if as_json {
        let items: Vec<_> = sets.iter().map(|s| set_json(s, now)).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&items).expect("serializes")
        );
        return Ok(());
    }
    if sets.is_empty() {
        println!("no backup sets in {}", repo.display());
        return Ok(());
    }
    println!(
        "{:<20}  {:<10}  {:<41}  {:>10}  {:>10}  {:>8}  ENGINES",
        "ID", "STATUS", "VERIFIED", "RECORDS", "SIZE", "AGE"
    );
    for s in &sets {
        let record = repo.verification(&s.id);
        let st = status(s, record.as_ref());
        let (records, bytes, engines) = match &s.manifest {
            Ok(m) => (
                m.engines
                    .values()
                    .map(|e| e.total_records())
                    .sum::<u64>()
                    .to_string(),
                human_bytes(m.stored_bytes()),
                m.engines
                    .keys()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Err(_) => ("-".into(), "-".into(), "-".into()),
        };
        let short = match st.as_str() {
            "ok" | "unverified" => st.as_str(),
            s if s.starts_with("failed") => "BAD",
            _ => "CORRUPT",
        };
        println!(
            "{:<20}  {:<10}  {:<41}  {:>10}  {:>10}  {:>8}  {}",
            s.id,
            short,
            verified_text(record.as_ref()),
            records,
            bytes,
            human_age((now - s.time).num_seconds()),
            engines
        );
        if let Ok(Some(i)) = s.manifest.as_ref().map(|m| m.imported.as_ref()) {
            println!("  └ imported from {}", i.source);
        }
        if short != "ok" && short != "unverified" {
            println!("  └ {st}");
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(3600), "60m");
        assert_eq!(human_age(86400 * 3), "3d");
    }
}
