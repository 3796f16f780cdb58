//! Versioned schema migrations: the files (`files`), the history each database keeps of them
//! and its lease lock (`mongodb`, `redis`, `chroma`), and the pure rules that decide what runs
//! (Flyway's: checksums, out-of-order, missing files, baseline).

pub mod chroma;
pub mod files;
pub mod mongodb;
pub mod redis;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineKind, EngineOptions};
use crate::error::{Error, Result};
use crate::secret::Secret;
use files::{MigrationFile, Version};

/// The name of the history (a MongoDB collection, a Redis hash).
pub const HISTORY: &str = "dbkeeper_schema_history";

/// One row of a database's history: the latest attempt at a version, or a baseline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    pub version: String,
    pub description: String,
    /// The file's name (empty for a baseline).
    #[serde(default)]
    pub file: String,
    pub sha256: String,
    pub applied_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub dbkeeper: String,
    pub success: bool,
    /// `migration` or `baseline`.
    pub kind: String,
    /// A failed migration whose database was restored from its pre-migration set: nothing
    /// of it remains, so it may be tried again.
    #[serde(default)]
    pub restored: bool,
    /// What failed: the file's item or line and the server's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pre-migration set taken before this run (none: the database held nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// The `error` of a migration recorded as started: still there, the migrator died mid-way.
pub const UNFINISHED: &str =
    "started and did not finish (the migrator was killed or lost the server)";

impl Applied {
    pub fn version(&self) -> Option<Version> {
        Version::parse(&self.version)
    }

    pub fn is_baseline(&self) -> bool {
        self.kind == "baseline"
    }

    pub fn for_file(f: &MigrationFile, started: DateTime<Utc>, success: bool) -> Applied {
        Applied {
            version: f.version.to_string(),
            description: f.description.clone(),
            file: f.name.clone(),
            sha256: f.sha256.clone(),
            applied_at: started,
            duration_ms: (Utc::now() - started).num_milliseconds().max(0) as u64,
            dbkeeper: env!("CARGO_PKG_VERSION").to_owned(),
            success,
            kind: "migration".into(),
            restored: false,
            error: None,
            snapshot: None,
        }
    }

    pub fn baseline(version: &Version, description: &str) -> Applied {
        Applied {
            version: version.to_string(),
            description: description.to_owned(),
            file: String::new(),
            sha256: String::new(),
            applied_at: Utc::now(),
            duration_ms: 0,
            dbkeeper: env!("CARGO_PKG_VERSION").to_owned(),
            success: true,
            kind: "baseline".into(),
            restored: false,
            error: None,
            snapshot: None,
        }
    }
}

/// A migration's state, as `migrate info` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Applied,
    Pending,
    Failed,
    ChecksumChanged,
    Missing,
    Baseline,
    /// A file at or below the baseline: never run.
    BelowBaseline,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Failed => "failed",
            State::ChecksumChanged => "checksum changed",
            State::Missing => "missing",
            State::Baseline => "baseline",
            State::BelowBaseline => "below baseline",
        }
    }
}

/// One line of `migrate info`.
#[derive(Debug, Clone)]
pub struct Row {
    pub version: Version,
    pub description: String,
    pub state: State,
    pub applied_at: Option<DateTime<Utc>>,
}

/// What the history and the files say, version by version, in version order.
pub fn info(files: &[MigrationFile], history: &[Applied]) -> Vec<Row> {
    let mut rows: BTreeMap<Version, Row> = BTreeMap::new();
    let baseline = baseline_of(history);
    for a in history {
        let Some(v) = a.version() else { continue };
        let state = if a.is_baseline() {
            State::Baseline
        } else if !a.success {
            State::Failed
        } else {
            match files.iter().find(|f| f.version == v) {
                None => State::Missing,
                Some(f) if f.sha256 != a.sha256 => State::ChecksumChanged,
                Some(_) => State::Applied,
            }
        };
        rows.insert(
            v.clone(),
            Row {
                version: v,
                description: a.description.clone(),
                state,
                applied_at: Some(a.applied_at),
            },
        );
    }
    for f in files {
        if rows.contains_key(&f.version) {
            continue;
        }
        let state = match &baseline {
            Some(b) if f.version <= *b => State::BelowBaseline,
            _ => State::Pending,
        };
        rows.insert(
            f.version.clone(),
            Row {
                version: f.version.clone(),
                description: f.description.clone(),
                state,
                applied_at: None,
            },
        );
    }
    rows.into_values().collect()
}

fn baseline_of(history: &[Applied]) -> Option<Version> {
    history
        .iter()
        .filter(|a| a.is_baseline())
        .filter_map(Applied::version)
        .max()
}

/// The newest version the database is at: its newest successful migration or baseline.
pub fn current(history: &[Applied]) -> Option<Version> {
    history
        .iter()
        .filter(|a| a.success)
        .filter_map(Applied::version)
        .max()
}

/// How `plan` treats what Flyway would refuse.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub out_of_order: bool,
    pub ignore_missing: bool,
    pub to: Option<Version>,
}

/// The files to apply, in order; or why nothing may run. Every problem of one kind is named
/// at once (each edited file, each missing one), so one run tells the operator everything.
pub fn plan<'a>(
    kind: EngineKind,
    files: &'a [MigrationFile],
    history: &[Applied],
    rules: &Rules,
) -> Result<Vec<&'a MigrationFile>> {
    let rows = info(files, history);
    let names = |state: State| -> Vec<String> {
        rows.iter()
            .filter(|r| r.state == state)
            .map(|r| {
                files
                    .iter()
                    .find(|f| f.version == r.version)
                    .map(|f| f.name.clone())
                    .or_else(|| {
                        history
                            .iter()
                            .find(|a| {
                                a.version().as_ref() == Some(&r.version) && !a.file.is_empty()
                            })
                            .map(|a| a.file.clone())
                    })
                    .unwrap_or_else(|| format!("V{}__{}", r.version, r.description))
            })
            .collect()
    };
    let changed = names(State::ChecksumChanged);
    if !changed.is_empty() {
        return Err(Error::engine(
            kind.name(),
            format!(
                "applied migration{} changed since {} ran: {}; review the change, then run `dbkeeper migrate repair` to accept it",
                plural(changed.len()),
                if changed.len() == 1 { "it" } else { "they" },
                changed.join(", ")
            ),
        ));
    }
    let halted: Vec<String> = history
        .iter()
        .filter(|a| !a.success && !a.restored)
        .map(|a| {
            if a.file.is_empty() {
                a.version.clone()
            } else {
                a.file.clone()
            }
        })
        .collect();
    if !halted.is_empty() {
        return Err(Error::engine(
            kind.name(),
            format!(
                "migration {} failed and the database was left as it was then; repair the database, then run `dbkeeper migrate repair`",
                halted.join(", ")
            ),
        ));
    }
    let missing = names(State::Missing);
    if !missing.is_empty() && !rules.ignore_missing {
        return Err(Error::engine(
            kind.name(),
            format!(
                "applied migration{} without a file: {}; restore the file{} or pass --ignore-missing",
                plural(missing.len()),
                missing.join(", "),
                plural(missing.len())
            ),
        ));
    }
    let newest = history
        .iter()
        .filter(|a| a.success && !a.is_baseline())
        .filter_map(Applied::version)
        .max();
    let pending: Vec<&MigrationFile> = rows
        .iter()
        .filter(|r| r.state == State::Pending || r.state == State::Failed)
        .filter_map(|r| files.iter().find(|f| f.version == r.version))
        .filter(|f| rules.to.as_ref().is_none_or(|to| f.version <= *to))
        .collect();
    if let Some(newest) = newest {
        let late: Vec<String> = pending
            .iter()
            .filter(|f| f.version < newest)
            .map(|f| f.name.clone())
            .collect();
        if !late.is_empty() && !rules.out_of_order {
            return Err(Error::engine(
                kind.name(),
                format!(
                    "migration{} {} older than the newest applied version {newest}: refused as out of order; pass --out-of-order to apply {}",
                    plural(late.len()),
                    late.join(", "),
                    if late.len() == 1 { "it" } else { "them" }
                ),
            ));
        }
    }
    Ok(pending)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Where a migration failed: the file's item or line, the command, the server's answer.
#[derive(Debug, Clone)]
pub struct StepError {
    pub at: String,
    pub command: String,
    pub message: String,
}

/// One database's history, lock and command runner.
pub enum Target {
    Mongo(mongodb::MongoTarget),
    Redis(Box<redis::RedisTarget>),
    Chroma(chroma::ChromaTarget),
}

macro_rules! each {
    ($self:expr, $t:ident => $body:expr) => {
        match $self {
            Target::Mongo($t) => $body,
            Target::Redis($t) => $body,
            Target::Chroma($t) => $body,
        }
    };
}

impl Target {
    pub async fn connect(kind: EngineKind, url: &Secret, opts: &EngineOptions) -> Result<Target> {
        Ok(match kind {
            EngineKind::Mongodb => Target::Mongo(mongodb::MongoTarget::connect(url).await?),
            EngineKind::Redis => Target::Redis(Box::new(redis::RedisTarget::connect(url)?)),
            EngineKind::Chroma => Target::Chroma(chroma::ChromaTarget::connect(url, opts)?),
            EngineKind::Postgres | EngineKind::Rabbitmq => {
                return Err(Error::config(format!("dbkeeper runs no {kind} migrations")));
            }
        })
    }

    pub async fn history(&self) -> Result<Vec<Applied>> {
        each!(self, t => t.history().await)
    }

    /// Closes the connection; call it before the process may exit.
    pub async fn close(&self) {
        if let Target::Mongo(t) = self {
            t.close().await;
        }
    }

    pub async fn record(&self, a: &Applied) -> Result<()> {
        each!(self, t => t.record(a).await)
    }

    pub async fn forget(&self, version: &str) -> Result<()> {
        each!(self, t => t.forget(version).await)
    }

    /// Takes or renews the lease; `false` while another owner holds it.
    pub async fn lock(&self, owner: &str, lease: Duration) -> Result<bool> {
        each!(self, t => t.lock(owner, lease).await)
    }

    pub async fn unlock(&self, owner: &str) -> Result<()> {
        each!(self, t => t.unlock(owner).await)
    }

    /// Makes `owner` the holder whoever holds it now. For a migrator that just put its
    /// database back from a pre-migration set: the set holds the lock as it was when the set
    /// was taken, often by an earlier, killed, migrator, and a wipe removes ours.
    pub async fn retake(&self, owner: &str, lease: Duration) -> Result<()> {
        each!(self, t => t.retake(owner, lease).await)
    }

    /// A baseline another tool left (golang-migrate's `schema_migrations`), for a database
    /// with no history of ours.
    pub async fn foreign_baseline(&self) -> Result<Option<Applied>> {
        match self {
            Target::Mongo(t) => t.foreign_baseline().await,
            Target::Redis(_) | Target::Chroma(_) => Ok(None),
        }
    }

    pub async fn apply(
        &self,
        file: &MigrationFile,
        cancel: &CancellationToken,
    ) -> std::result::Result<(), StepError> {
        each!(self, t => t.apply(file, cancel).await)
    }
}

/// The schema version a database is at, from its history; `None` when it has none or cannot
/// be read (a backup does not fail over it).
pub async fn schema_version(
    kind: EngineKind,
    url: &Secret,
    opts: &EngineOptions,
) -> Option<String> {
    let t = Target::connect(kind, url, opts).await.ok()?;
    let h = tokio::time::timeout(Duration::from_secs(10), t.history()).await;
    t.close().await;
    current(&h.ok()?.ok()?).map(|v| v.to_string())
}

/// The newest migration file of each engine with files under `dir` (`DBKEEPER_MIGRATIONS`):
/// the newest schema this deployment knows. An engine without files is not listed.
pub fn newest_files(dir: &Path) -> Result<BTreeMap<EngineKind, Version>> {
    if !dir.is_dir() {
        return Err(Error::config(format!(
            "DBKEEPER_MIGRATIONS={}: not a directory",
            dir.display()
        )));
    }
    let mut out = BTreeMap::new();
    for kind in EngineKind::ALL {
        if !dir.join(kind.name()).is_dir() {
            continue;
        }
        if let Some(f) = files::discover(dir, kind)?.pop() {
            out.insert(kind, f.version);
        }
    }
    Ok(out)
}

/// Why loading a set into `kind` would be a downgrade: the set records a schema version newer
/// than the newest migration file (`newest`), so the application would run on a schema its
/// migrations do not know. `None` when it is not (no files for the engine, or a set without a
/// version: taken before migrations, or of a database without a history).
pub fn downgrade(
    kind: EngineKind,
    set: &str,
    set_version: Option<&str>,
    newest: Option<&Version>,
) -> Option<String> {
    let (have, newest) = (set_version?, newest?);
    let newer = match Version::parse(have) {
        Some(v) => v > *newest,
        // Not ours to guess: a version we cannot compare is treated as newer.
        None => true,
    };
    newer.then(|| {
        format!(
            "set {set} holds {kind} at schema version {have}, newer than the newest migration file here ({newest}): refused as a downgrade"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use files::Script;

    fn file(v: &str, sha: &str) -> MigrationFile {
        MigrationFile {
            version: Version::parse(v).unwrap(),
            description: "d".into(),
            path: format!("V{v}__d.json").into(),
            name: format!("V{v}__d.json"),
            sha256: sha.into(),
            script: Script::Mongo(Vec::new()),
        }
    }

    fn applied(v: &str, sha: &str) -> Applied {
        Applied::for_file(&file(v, sha), Utc::now(), true)
    }

    const K: EngineKind = EngineKind::Mongodb;

    #[test]
    fn pending_is_what_history_lacks() {
        let files = [file("1", "a"), file("2", "b"), file("1.2.10", "c")];
        let p = plan(K, &files, &[], &Rules::default()).unwrap();
        let v: Vec<_> = p.iter().map(|f| f.version.as_str()).collect();
        assert_eq!(v, ["1", "1.2.10", "2"]);
        let h = [applied("1", "a"), applied("1.2.10", "c"), applied("2", "b")];
        assert!(plan(K, &files, &h, &Rules::default()).unwrap().is_empty());
        let to = Rules {
            to: Version::parse("1.5"),
            ..Rules::default()
        };
        assert_eq!(plan(K, &files, &[], &to).unwrap().len(), 2);
    }

    #[test]
    fn changed_missing_and_out_of_order_are_refused() {
        let files = [file("1", "a"), file("2", "b"), file("3", "c")];
        let e = plan(
            K,
            &files,
            &[applied("1", "x"), applied("2", "y")],
            &Rules::default(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("V1__d.json") && msg.contains("V2__d.json"),
            "{msg}"
        );
        assert_eq!(e.exit_code(), crate::ExitCode::Failed);

        let h = [applied("1", "a"), applied("3", "c")];
        let e = plan(K, &files, &h, &Rules::default()).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        let ok = Rules {
            out_of_order: true,
            ..Rules::default()
        };
        assert_eq!(plan(K, &files, &h, &ok).unwrap().len(), 1);

        let h = [applied("1", "a"), applied("2", "b"), applied("4", "d")];
        let e = plan(K, &files, &h, &ok).unwrap_err();
        assert!(e.to_string().contains("V4__d.json"), "{e}");
        let ig = Rules {
            ignore_missing: true,
            out_of_order: true,
            ..Rules::default()
        };
        assert_eq!(plan(K, &files, &h, &ig).unwrap().len(), 1);
    }

    #[test]
    fn a_set_newer_than_the_newest_file_is_a_downgrade() {
        let two = Version::parse("2").unwrap();
        assert!(downgrade(K, "s", Some("2"), Some(&two)).is_none());
        assert!(downgrade(K, "s", Some("1.9"), Some(&two)).is_none());
        assert!(downgrade(K, "s", None, Some(&two)).is_none());
        assert!(downgrade(K, "s", Some("9"), None).is_none());
        let msg = downgrade(K, "2026-01-02_03-04-05", Some("2.0.1"), Some(&two)).unwrap();
        assert!(
            msg.contains("2026-01-02_03-04-05")
                && msg.contains("2.0.1")
                && msg.contains("(2)")
                && msg.contains("downgrade"),
            "{msg}"
        );
        assert!(downgrade(K, "s", Some("x.y"), Some(&two)).is_some());
    }

    #[test]
    fn baseline_and_failures() {
        let files = [file("1", "a"), file("2", "b"), file("3", "c")];
        let b = Applied::baseline(&Version::parse("2").unwrap(), "adopted");
        let p = plan(K, &files, std::slice::from_ref(&b), &Rules::default()).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(current(&[b]).unwrap().as_str(), "2");

        let mut failed = Applied::for_file(&files[0], Utc::now(), false);
        assert!(plan(K, &files, std::slice::from_ref(&failed), &Rules::default()).is_err());
        failed.restored = true;
        assert_eq!(
            plan(K, &files, &[failed], &Rules::default()).unwrap().len(),
            3
        );
    }
}
