//! `dbkeeper verify`: checksums, and with `--deep` every record decoded and counted; of every
//! set (the default), of the newest set (`latest`), or of one set. Each verification is
//! recorded beside the sets (`repo::verified`), so `list` can say when a set was last checked.

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::engine::mongodb::pitr::SegmentStore;
use crate::error::{Error, Result};
use crate::repo::{Repo, VerifyLevel, VerifyReport, verified};

/// One set's verdict.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub id: String,
    pub result: std::result::Result<VerifyReport, String>,
}

impl Outcome {
    fn line(&self, level: VerifyLevel) -> String {
        match &self.result {
            Ok(r) => format!(
                "{}  ok   {} ({} files, {} bytes, {} records)",
                self.id,
                verified::level_name(level),
                r.files,
                r.bytes,
                r.records
            ),
            Err(e) => format!("{}  BAD  {e}", self.id),
        }
    }

    fn json(&self, level: VerifyLevel) -> serde_json::Value {
        match &self.result {
            Ok(r) => json!({
                "id": self.id, "ok": true, "level": verified::level_name(level),
                "files": r.files, "bytes": r.bytes, "records": r.records,
            }),
            Err(e) => json!({
                "id": self.id, "ok": false, "level": verified::level_name(level), "error": e,
            }),
        }
    }
}

/// Verifies every set of `repo`, newest first, recording each verdict; `on_each` sees each
/// one as it is reached. Stops only when interrupted.
pub fn verify_all(
    repo: &Repo,
    level: VerifyLevel,
    cancel: &CancellationToken,
    on_each: &mut dyn FnMut(&Outcome),
) -> Result<Vec<Outcome>> {
    let mut out = Vec::new();
    for info in repo.list()? {
        let o = verify_one(repo, &info.id, info.reader(), level, cancel)?;
        on_each(&o);
        out.push(o);
    }
    Ok(out)
}

fn verify_one(
    repo: &Repo,
    id: &str,
    reader: Result<crate::repo::reader::SetReader>,
    level: VerifyLevel,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    let result = match reader {
        Err(e) => {
            // The manifest cannot be read: the set is as bad as one whose checksums differ.
            let msg = format!("{e:#}");
            repo.record(id, level, Err(msg.clone()));
            Err(msg)
        }
        Ok(set) => match repo.verify_recorded(&set, level, cancel) {
            Ok(r) => Ok(r),
            // No key to decode an encrypted set (exit 1): this host cannot judge any set.
            Err(e @ (Error::Interrupted(_) | Error::Key(_))) => return Err(e),
            Err(e) => Err(format!("{e:#}")),
        },
    };
    Ok(Outcome {
        id: id.to_owned(),
        result,
    })
}

/// `id`: `None` for every set, `latest` for the newest set (good or not: this is where a
/// corrupt newest set is reported, where `restore latest` would pass it over), or a set id.
pub async fn verify(
    repo: Repo,
    id: Option<String>,
    deep: bool,
    as_json: bool,
    cancel: &CancellationToken,
) -> Result<()> {
    let level = if deep {
        crate::engine::DEEP
    } else {
        VerifyLevel::Checksums
    };
    let cancel = cancel.clone();
    tokio::task::spawn_blocking(move || run(&repo, id.as_deref(), level, as_json, &cancel))
        .await
        .map_err(|e| Error::engine("verify", format!("task failed: {e}")))?
}

/// Checks every archived oplog segment (`verify` with no id): its checksum, and with `--deep`
/// its decryption, decompression and entry count. The bad ones come back as outcomes named
/// after the segment; the good ones are counted and summed into one line.
fn verify_segments(
    repo: &Repo,
    level: VerifyLevel,
    cancel: &CancellationToken,
    as_json: bool,
) -> Result<(usize, Vec<Outcome>)> {
    let store = SegmentStore::new(repo.clone());
    let segments = store.list()?;
    let mut bad = Vec::new();
    let (mut bytes, mut records) = (0, 0);
    for seg in &segments {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let checked = if level.is_deep() {
            store.read(seg).map(|_| ())
        } else {
            store.stored(seg).map(|_| ())
        };
        match checked {
            Ok(()) => {
                bytes += seg.size;
                records += if level.is_deep() { seg.count } else { 0 };
            }
            // No key for an encrypted segment: this host cannot judge any of them.
            Err(e @ (Error::Interrupted(_) | Error::Key(_))) => return Err(e),
            Err(e) => bad.push(Outcome {
                id: seg.what(),
                result: Err(format!("{e:#}")),
            }),
        }
    }
    let (wal_total, wal_bad) = verify_wal(repo, level, cancel, as_json)?;
    let good = segments.len() - bad.len();
    bad.extend(wal_bad);
    if good > 0 && !as_json {
        println!(
            "{}",
            Outcome {
                id: "pitr".into(),
                result: Ok(VerifyReport {
                    id: "pitr".into(),
                    files: good,
                    bytes,
                    records,
                }),
            }
            .line(level)
            .replacen("files", "oplog segments", 1)
        );
    }
    Ok((segments.len() + wal_total, bad))
}

/// PostgreSQL's archived WAL: every piece's checksum; with `--deep` decrypted,
/// decompressed and its length checked.
fn verify_wal(
    repo: &Repo,
    level: VerifyLevel,
    cancel: &CancellationToken,
    as_json: bool,
) -> Result<(usize, Vec<Outcome>)> {
    let store = crate::engine::postgres::pitr::WalStore::new(repo.clone());
    let pieces = store.list()?;
    let mut bad = Vec::new();
    let mut bytes = 0;
    for p in &pieces {
        if cancel.is_cancelled() {
            return Err(Error::Interrupted(0));
        }
        let checked = if level.is_deep() {
            store.read(p).map(|_| ())
        } else {
            store.stored(p).map(|_| ())
        };
        match checked {
            Ok(()) => bytes += p.size,
            Err(e @ (Error::Interrupted(_) | Error::Key(_))) => return Err(e),
            Err(e) => bad.push(Outcome {
                id: p.what(),
                result: Err(format!("{e:#}")),
            }),
        }
    }
    let good = pieces.len() - bad.len();
    if good > 0 && !as_json {
        println!(
            "{}",
            Outcome {
                id: "pitr-postgres".into(),
                result: Ok(VerifyReport {
                    id: "pitr-postgres".into(),
                    files: good,
                    bytes,
                    records: 0,
                }),
            }
            .line(level)
            .replacen("files", "WAL segments", 1)
        );
    }
    Ok((pieces.len(), bad))
}

fn run(
    repo: &Repo,
    id: Option<&str>,
    level: VerifyLevel,
    as_json: bool,
    cancel: &CancellationToken,
) -> Result<()> {
    let mut print = |o: &Outcome| {
        if !as_json {
            println!("{}", o.line(level));
        }
    };
    // Segments are checked only with every set; `total` counts them, `bad_segments` holds the
    // ones that fail.
    let mut segments = (0, Vec::new());
    let outcomes = match id {
        None => {
            let all = verify_all(repo, level, cancel, &mut print)?;
            segments = verify_segments(repo, level, cancel, as_json)?;
            for o in &segments.1 {
                print(o);
            }
            all
        }
        Some("latest") => {
            let Some(newest) = repo.list()?.into_iter().next() else {
                return Err(Error::repo(repo.display(), "holds no set"));
            };
            let o = verify_one(repo, &newest.id, newest.reader(), level, cancel)?;
            print(&o);
            vec![o]
        }
        Some(id) => {
            // Resolves (and refuses a malformed or missing id) as before.
            let set = repo.resolve(id, None);
            let set = match set {
                Err(e @ (Error::Config(_) | Error::Repository { .. })) => return Err(e),
                other => other,
            };
            let o = verify_one(repo, id, set, level, cancel)?;
            print(&o);
            vec![o]
        }
    };
    let (segment_total, bad_segments) = segments;
    if as_json {
        let items: Vec<_> = outcomes
            .iter()
            .chain(&bad_segments)
            .map(|o| o.json(level))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&items).expect("serializes")
        );
    }
    let bad: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    if !bad_segments.is_empty() {
        let names = |v: &mut dyn Iterator<Item = &Outcome>| {
            v.map(|o| o.id.as_str()).collect::<Vec<_>>().join(", ")
        };
        return Err(Error::repo(
            repo.display(),
            format!(
                "{} of {} sets and {} of {segment_total} archived log segments (oplog, WAL) fail verification: {}",
                bad.len(),
                outcomes.len(),
                bad_segments.len(),
                names(&mut bad.iter().copied().chain(&bad_segments)),
            ),
        ));
    }
    match (id, bad.as_slice()) {
        (_, []) => {
            if id.is_none() && outcomes.is_empty() && segment_total == 0 && !as_json {
                println!("no backup sets in {}", repo.display());
            }
            Ok(())
        }
        (Some("latest"), [o]) => Err(Error::corrupt(
            &o.id,
            format!(
                "the newest set fails verification: {}; restore and preseed use the newest good set instead",
                o.result.as_ref().err().map(String::as_str).unwrap_or("")
            ),
        )),
        (Some(_), [o]) => Err(Error::corrupt(
            &o.id,
            format!(
                "fails verification: {}",
                o.result.as_ref().err().map(String::as_str).unwrap_or("")
            ),
        )),
        (_, bad) => Err(Error::repo(
            repo.display(),
            format!(
                "{} of {} sets fail verification: {}",
                bad.len(),
                outcomes.len(),
                bad.iter()
                    .map(|o| o.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
