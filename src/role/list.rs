//! `dbkeeper list`: sets, newest first, with status, size and age.

use chrono::Utc;
use serde_json::json;

use crate::error::Result;
use crate::repo::{Repo, SetInfo};

/// A cheap status: the manifest parses and every file is present at its recorded size.
/// (`verify` checks the checksums.)
fn status(info: &SetInfo) -> String {
    match &info.manifest {
        Err(e) => format!("corrupt: {e}"),
        Ok(m) => {
            let sizes = match info.place.sizes() {
                Ok(s) => s,
                Err(e) => return format!("corrupt: {e}"),
            };
            for f in m.stored_files() {
                let name = f.stored_path();
                match sizes.get(name) {
                    Some(&n) if n == f.size => {}
                    Some(&n) => {
                        return format!("corrupt: {name} is {n} bytes, expected {}", f.size);
                    }
                    None => return format!("corrupt: {name} is missing"),
                }
            }
            "ok".to_owned()
        }
    }
}

/// One set as `list --json` and the sidecar's `GET /backups` show it.
pub fn set_json(s: &SetInfo, now: chrono::DateTime<Utc>) -> serde_json::Value {
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
        "status": status(s),
        "bytes": s.manifest.as_ref().map(|m| m.stored_bytes()).unwrap_or(0),
        "encrypted": s.manifest.as_ref().map(|m| m.encryption.is_some()).unwrap_or(false),
        "engines": engines.unwrap_or_default(),
    })
}

pub fn list(repo: &Repo, as_json: bool) -> Result<()> {
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
        "{:<20}  {:<8}  {:>10}  {:>10}  {:>8}  ENGINES",
        "ID", "STATUS", "RECORDS", "SIZE", "AGE"
    );
    for s in &sets {
        let st = status(s);
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
        let short = if st == "ok" { "ok" } else { "CORRUPT" };
        println!(
            "{:<20}  {:<8}  {:>10}  {:>10}  {:>8}  {}",
            s.id,
            short,
            records,
            bytes,
            human_age((now - s.time).num_seconds()),
            engines
        );
        if st != "ok" {
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
