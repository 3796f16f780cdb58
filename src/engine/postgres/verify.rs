//! Deep verify of a base backup without a server, as `pg_verifybackup` does it: every file
//! of every archive against the server's backup manifest (size and CRC32C), every manifest
//! file present, and the WAL segments of the backup's range present in `pg_wal/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::basebackup::MANIFEST_REL;
use crate::engine::Counts;
use crate::error::{Error, Result};
use crate::repo::manifest::{EngineEntry, FileEntry};
use crate::repo::reader::SetReader;

#[derive(Deserialize)]
struct BackupManifest {
    #[serde(rename = "Files")]
    files: Vec<ManifestFile>,
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
}

#[derive(Deserialize)]
struct ManifestFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Deserialize)]
struct WalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Reads one stored file whole (the backup manifest: kilobytes per thousand files).
fn read_all(set: &SetReader, f: &FileEntry) -> Result<Vec<u8>> {
    let mut r = set.open_file(f)?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|e| r.error(e))?;
    r.finish()?;
    Ok(buf)
}

pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    let corrupt = |m: String| Error::corrupt(set.id(), format!("postgres: {m}"));
    let manifest_path = format!("postgres/{MANIFEST_REL}.zst");
    let mf = entry
        .file(&manifest_path)
        .ok_or_else(|| corrupt("no backup_manifest in the set".into()))?;
    let bm: BackupManifest = serde_json::from_slice(&read_all(set, mf)?)
        .map_err(|e| corrupt(format!("backup_manifest does not parse: {e}")))?;
    let mut expected: BTreeMap<String, &ManifestFile> = BTreeMap::new();
    for f in &bm.files {
        let path = f.path.clone().ok_or_else(|| {
            corrupt("backup_manifest names a file by Encoded-Path; not supported".into())
        })?;
        expected.insert(path, f);
    }
    let mut seen = BTreeSet::new();
    let mut wal: BTreeMap<String, u64> = BTreeMap::new();
    let mut counts = Counts::new();
    let mut buf = vec![0u8; 256 << 10];
    for file in entry.files.iter().filter(|f| f.path != manifest_path) {
        let archive = file
            .path
            .strip_prefix("postgres/")
            .and_then(|p| p.strip_suffix(".zst"))
            .ok_or_else(|| corrupt(format!("unexpected file {}", file.path)))?
            .to_owned();
        // Tablespace archives are `<oid>.tar`; the manifest names their files under
        // pg_tblspc/<oid>/.
        let prefix = match archive.strip_suffix(".tar") {
            Some("base") => String::new(),
            Some(oid) if oid.bytes().all(|b| b.is_ascii_digit()) => format!("pg_tblspc/{oid}/"),
            _ => return Err(corrupt(format!("unexpected archive {archive}"))),
        };
        let reader = set.open_file(file)?;
        let mut tar = tar::Archive::new(reader);
        let mut n = 0u64;
        let entries = tar
            .entries()
            .map_err(|e| corrupt(format!("{archive}: {e}")))?;
        for e in entries {
            if cancel.is_cancelled() {
                return Err(Error::Interrupted(0));
            }
            let mut e = e.map_err(|e| corrupt(format!("{archive}: {e}")))?;
            if !e.header().entry_type().is_file() {
                continue;
            }
            n += 1;
            let name = format!(
                "{prefix}{}",
                String::from_utf8_lossy(&e.path_bytes()).trim_start_matches("./")
            );
            let mut digest = CrcDigest::new(CrcAlgorithm::Crc32Iscsi);
            let mut size = 0u64;
            loop {
                let k = e
                    .read(&mut buf)
                    .map_err(|err| corrupt(format!("{archive}: {name}: {err}")))?;
                if k == 0 {
                    break;
                }
                digest.update(&buf[..k]);
                size += k as u64;
            }
            // WAL is checked by its range, below (pg_verifybackup too leaves pg_wal/ out of
            // the file check).
            if let Some(seg) = name.strip_prefix("pg_wal/") {
                if seg.len() == 24 && seg.bytes().all(|b| b.is_ascii_hexdigit()) {
                    wal.insert(seg.to_owned(), size);
                }
                continue;
            }
            let Some(want) = expected.get(&name) else {
                return Err(corrupt(format!(
                    "{archive}: {name} is not in backup_manifest"
                )));
            };
            if want.size != size {
                return Err(corrupt(format!(
                    "{name}: {size} bytes, backup_manifest says {}",
                    want.size
                )));
            }
            match (want.algorithm.as_deref(), want.checksum.as_deref()) {
                (None | Some("NONE"), _) => {}
                (Some("CRC32C"), Some(sum)) => {
                    // PostgreSQL writes the CRC's bytes in memory order (little-endian).
                    let got = hex::encode((digest.finalize() as u32).to_le_bytes());
                    if !got.eq_ignore_ascii_case(sum) {
                        return Err(corrupt(format!(
                            "{name}: CRC32C {got}, backup_manifest says {sum}"
                        )));
                    }
                }
                (Some(other), _) => {
                    return Err(corrupt(format!(
                        "{name}: checksum algorithm {other} is not checked (CRC32C is)"
                    )));
                }
            }
            seen.insert(name);
        }
        let mut inner = tar.into_inner();
        std::io::copy(&mut inner, &mut std::io::sink()).map_err(|e| inner.error(e))?;
        inner.finish()?;
        counts.insert(archive, n);
    }
    if let Some(missing) = expected
        .keys()
        .find(|k| !k.starts_with("pg_wal/") && !seen.contains(*k))
    {
        return Err(corrupt(format!(
            "{missing} is in backup_manifest but in no archive"
        )));
    }
    check_wal(&bm.wal_ranges, &wal).map_err(corrupt)?;
    Ok(counts)
}

/// Every segment of each WAL range is in `pg_wal/`, whole (all segments one size).
fn check_wal(ranges: &[WalRange], wal: &BTreeMap<String, u64>) -> std::result::Result<(), String> {
    let seg_size = match wal.values().next() {
        Some(&s) if s.is_power_of_two() && wal.values().all(|&v| v == s) => s,
        Some(_) => return Err("the WAL segments in pg_wal/ differ in size".into()),
        None => return Err("no WAL in pg_wal/: the backup cannot be made consistent".into()),
    };
    let per_log = 0x1_0000_0000u64 / seg_size;
    for r in ranges {
        let (Some(start), Some(end)) = (parse_lsn(&r.start), parse_lsn(&r.end)) else {
            return Err(format!("WAL range {}..{} does not parse", r.start, r.end));
        };
        let last = end.saturating_sub(1).max(start) / seg_size;
        for seg in start / seg_size..=last {
            let name = format!(
                "{:08X}{:08X}{:08X}",
                r.timeline,
                seg / per_log,
                seg % per_log
            );
            if !wal.contains_key(&name) {
                return Err(format!(
                    "WAL segment {name} of the range {}..{} is missing",
                    r.start, r.end
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: &str, end: &str) -> WalRange {
        WalRange {
            timeline: 1,
            start: start.into(),
            end: end.into(),
        }
    }

    #[test]
    fn wal_range_needs_every_segment() {
        let seg = 16u64 << 20;
        let mut wal = BTreeMap::new();
        wal.insert("000000010000000000000002".to_owned(), seg);
        wal.insert("000000010000000000000003".to_owned(), seg);
        assert_eq!(parse_lsn("0/2000028"), Some(0x2000028));
        assert!(check_wal(&[range("0/2000028", "0/3000100")], &wal).is_ok());
        // An end exactly on a boundary needs no segment after it.
        assert!(check_wal(&[range("0/2000028", "0/4000000")], &wal).is_ok());
        let e = check_wal(&[range("0/2000028", "0/4000100")], &wal).unwrap_err();
        assert!(e.contains("000000010000000000000004"), "{e}");
        assert!(check_wal(&[range("0/2000028", "0/3000100")], &BTreeMap::new()).is_err());
        let mut torn = wal.clone();
        torn.insert("000000010000000000000004".to_owned(), 100);
        assert!(check_wal(&[range("0/2000028", "0/3000100")], &torn).is_err());
    }
}
