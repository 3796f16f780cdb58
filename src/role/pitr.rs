//! Point-in-time recovery at the role level: which sets can start a recovery, the plan for
//! `restore --to-time`, `list --pitr`, and the segments retention deletes with their sets.

use chrono::{DateTime, Utc};
use serde_json::json;
use tracing::info;

use crate::engine::EngineKind;
use crate::engine::mongodb::pitr::{self, Base, OpTime, Plan, SegmentStore};
use crate::engine::mongodb::{Details, OplogSlice};
use crate::error::{Error, Result};
use crate::repo::{Repo, SetInfo};

/// A restore target: an instant (every entry written in that second or before) or an oplog
/// position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Time(DateTime<Utc>),
    OpTime(OpTime),
}

/// An RFC 3339 time.
pub fn parse_instant(s: &str) -> std::result::Result<DateTime<Utc>, chrono::ParseError> {
    DateTime::parse_from_rfc3339(s.trim()).map(|t| t.to_utc())
}

/// A PostgreSQL recovery target: a time given to the second takes every transaction of that
/// second, as `--to-time` does for MongoDB; a fraction is taken as given.
pub fn pg_target(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::Timelike;
    if t.nanosecond() == 0 {
        t + chrono::TimeDelta::microseconds(999_999)
    } else {
        t
    }
}

/// Plans a PostgreSQL recovery of an empty data directory to `to` and carries it out.
pub fn preseed_postgres_to_time(
    repo: &Repo,
    dir: &std::path::Path,
    to: DateTime<Utc>,
) -> Result<String> {
    let plan = crate::engine::postgres::pitr::plan(repo, pg_target(to))?;
    info!(
        base = %plan.base.set,
        segments = plan.chain.len(),
        target = %plan.to.to_rfc3339(),
        "point-in-time plan (PostgreSQL)"
    );
    crate::engine::postgres::pitr::preseed_to_time(repo, dir, &plan)?;
    Ok(plan.base.set)
}

impl Target {
    pub fn parse_time(s: &str) -> Result<Target> {
        parse_instant(s).map(Target::Time).map_err(|_| {
            Error::config(format!(
                "--to-time {s:?}: expected an RFC 3339 time such as 2026-12-04T10:31:07Z"
            ))
        })
    }

    pub fn op_time(self) -> Result<OpTime> {
        match self {
            Target::Time(t) => OpTime::end_of(t),
            Target::OpTime(o) => Ok(o),
        }
    }
}

/// The oplog slice of a set's MongoDB part, when it has one.
pub fn slice_of(info: &SetInfo) -> Option<OplogSlice> {
    let m = info.manifest.as_ref().ok()?;
    let entry = m.engines.get(&EngineKind::Mongodb)?;
    let details: Details = serde_json::from_value(entry.details.clone()).ok()?;
    details.oplog
}

/// The sets a recovery can start from: those whose MongoDB part is consistent to a point.
pub fn bases(sets: &[SetInfo]) -> Vec<Base> {
    sets.iter()
        .filter_map(|s| {
            slice_of(s).map(|slice| Base {
                set: s.id.clone(),
                end: slice.end,
            })
        })
        .collect()
}

/// Plans a recovery to `target` from the repository's sets and segments.
pub fn plan(repo: &Repo, target: Target) -> Result<Plan> {
    let to = target.op_time()?;
    let sets = repo.list()?;
    let store = SegmentStore::new(repo.clone());
    let segments = store.list()?;
    let plan = pitr::plan(&bases(&sets), &segments, to).map_err(|e| match e {
        Error::Repository { message, .. } => Error::repo(repo.display(), message),
        other => other,
    })?;
    info!(
        base = %plan.base.set,
        base_point = %plan.base.end,
        segments = plan.segments.len(),
        target = %to,
        "point-in-time plan"
    );
    check_segments(&store, &plan)?;
    Ok(plan)
}

/// Reads every segment of `plan` (checksum, decryption, entry count) before the target is
/// touched, so a corrupt or undecryptable segment stops the restore with nothing changed,
/// naming the segment and the newest point reachable before it.
fn check_segments(store: &SegmentStore, plan: &Plan) -> Result<()> {
    for (i, seg) in plan.segments.iter().enumerate() {
        store.read(seg).map_err(|e| match e {
            Error::Corrupt { set, message } => {
                let before = match i {
                    0 => plan.base.end,
                    _ => plan.segments[i - 1].last,
                };
                Error::corrupt(
                    set,
                    format!(
                        "{message}; the archive cannot recover past {before} ({}): restore to a point at or before it",
                        before.time().to_rfc3339()
                    ),
                )
            }
            other => other,
        })?;
        if (i + 1) % 1000 == 0 {
            info!(
                checked = i + 1,
                of = plan.segments.len(),
                "oplog segments checked"
            );
        }
    }
    Ok(())
}

/// `list --pitr`: each recoverable window, per starting set, newest first.
pub fn list(repo: &Repo, as_json: bool) -> Result<()> {
    use crate::engine::postgres::pitr as pg;
    let sets = repo.list()?;
    let segments = SegmentStore::new(repo.clone()).list()?;
    let windows = pitr::windows(&bases(&sets), &segments);
    let pg_windows = pg::windows(&pg::bases(&sets), &pg::WalStore::new(repo.clone()).list()?);
    if as_json {
        let mut items: Vec<_> = windows
            .iter()
            .map(|w| {
                json!({
                    "engine": "mongodb",
                    "set": w.set,
                    "from": w.from,
                    "to": w.to,
                    "from_ts": w.from_ts,
                    "to_ts": w.to_ts,
                    "segments": w.segments,
                })
            })
            .collect();
        items.extend(pg_windows.iter().map(|w| {
            json!({
                "engine": "postgres",
                "set": w.set,
                "from": w.from,
                "to": w.to,
                "segments": w.segments,
            })
        }));
        println!(
            "{}",
            serde_json::to_string_pretty(&items).expect("serializes")
        );
        return Ok(());
    }
    if windows.is_empty() && pg_windows.is_empty() {
        println!(
            "no recoverable window in {}: no MongoDB set with an oplog end point (a replica-set member's set) and no PostgreSQL set yet",
            repo.display()
        );
        return Ok(());
    }
    println!(
        "{:<8}  {:<20}  {:<25}  {:<25}  SEGMENTS",
        "ENGINE", "FROM SET", "FROM", "TO"
    );
    for w in windows {
        println!(
            "{:<8}  {:<20}  {:<25}  {:<25}  {}",
            "mongodb",
            w.set,
            w.from.to_rfc3339(),
            w.to.to_rfc3339(),
            w.segments
        );
    }
    for w in pg_windows {
        println!(
            "{:<8}  {:<20}  {:<25}  {:<25}  {}",
            "postgres",
            w.set,
            w.from.to_rfc3339(),
            w.to.to_rfc3339(),
            w.segments
        );
    }
    Ok(())
}

/// Deletes the segments no kept set needs (they end at or before the oldest kept set's point).
/// Called by retention after it deleted sets, under the writer lock.
/// `deleted`: sets retention deletes (a dry run has not deleted them yet).
pub fn prune_segments(
    repo: &Repo,
    deleted: &[String],
    dry_run: bool,
    print: bool,
) -> Result<usize> {
    let sets: Vec<SetInfo> = repo
        .list()?
        .into_iter()
        .filter(|s| !deleted.contains(&s.id))
        .collect();
    let wal = prune_wal(repo, &sets, dry_run, print)?;
    let store = SegmentStore::new(repo.clone());
    let segments = store.list()?;
    if segments.is_empty() {
        return Ok(wal);
    }
    let kept = bases(&sets);
    let doomed = pitr::unneeded(&kept, &segments);
    for s in &doomed {
        if dry_run {
            if print {
                println!("would delete oplog segment {}/{}", s.run, s.name());
            }
        } else {
            store.delete(s)?;
        }
    }
    if !dry_run && !doomed.is_empty() {
        info!(segments = doomed.len(), repo = %repo.display(), "oplog segments no kept set needs deleted by retention");
        if print {
            println!(
                "deleted {} oplog segment(s) no kept set needs",
                doomed.len()
            );
        }
    }
    Ok(doomed.len() + wal)
}

/// The PostgreSQL half of `prune_segments`: WAL no kept set needs, and partial segments a
/// longer piece replaced.
fn prune_wal(repo: &Repo, kept: &[SetInfo], dry_run: bool, print: bool) -> Result<usize> {
    use crate::engine::postgres::pitr as pg;
    let store = pg::WalStore::new(repo.clone());
    let pieces = store.list()?;
    if pieces.is_empty() {
        return Ok(0);
    }
    let doomed = pg::unneeded(&pg::bases(kept), &pieces);
    for p in &doomed {
        if dry_run {
            if print {
                println!("would delete {}", p.what());
            }
        } else {
            store.delete(p)?;
        }
    }
    if !dry_run && !doomed.is_empty() {
        info!(segments = doomed.len(), repo = %repo.display(), "WAL segments no kept set needs deleted by retention");
        if print {
            println!("deleted {} WAL segment(s) no kept set needs", doomed.len());
        }
    }
    Ok(doomed.len())
}
