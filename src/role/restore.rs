//! `dbkeeper restore` and `dbkeeper preseed`: load a set into the engines, guarded by the
//! emptiness rules, the in-progress marker and the schema (no set newer than the migrations).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::engine::{Emptiness, Engine, EngineKind, EngineOps, RestoreOptions};
use crate::error::{Error, Result};
use crate::migrate::files::Version;
use crate::repo::reader::SetReader;

/// The newest migration file of each engine (`DBKEEPER_MIGRATIONS`): a set whose schema
/// version is newer is a downgrade, refused. Empty (nothing refused) when migrations are not
/// configured.
#[derive(Debug, Clone, Default)]
pub struct SchemaGuard {
    newest: BTreeMap<EngineKind, Version>,
}

impl SchemaGuard {
    pub fn load(dir: Option<&Path>) -> Result<SchemaGuard> {
        Ok(SchemaGuard {
            newest: match dir {
                Some(d) => crate::migrate::newest_files(d)?,
                None => BTreeMap::new(),
            },
        })
    }

    /// Why loading `set` into `kind` would be a downgrade, if it would.
    fn check(&self, kind: EngineKind, set: &SetReader) -> Option<String> {
        let have = set
            .manifest
            .schema
            .as_ref()
            .and_then(|s| s.versions.get(&kind));
        crate::migrate::downgrade(
            kind,
            set.id(),
            have.map(String::as_str),
            self.newest.get(&kind),
        )
    }

    /// Preseed has no override: the application would start on a schema it does not know,
    /// and an older set is the operator's choice to make, by id.
    fn refuse_preseed(&self, kind: EngineKind, set: &SetReader) -> Result<()> {
        match self.check(kind, set) {
            None => Ok(()),
            Some(why) => Err(Error::engine(
                kind.name(),
                format!(
                    "{why}; nothing was changed. Deploy the migrations that go with it, or load an older set with `dbkeeper restore ID`"
                ),
            )),
        }
    }
}

/// What preseed did for one engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Restored {
        set: String,
        records: u64,
    },
    SkippedHasData(String),
    FirstStart,
    /// A server that loads its backups only from its data directory before it starts
    /// (PostgreSQL): a running one is left as it is.
    DataDirOnly,
    /// The newest good set's part is physical (a Chroma data copy): left to the pre-start
    /// preseed of the data directory; the running server is left as it is.
    LeftToDataDir(String),
    /// The newest set's part is logical (a Chroma export over the API): left to the online
    /// preseed; the data directory is left as it is.
    LeftToServer(String),
}

impl Outcome {
    /// The one line that says what preseed did for `kind` (`dir`: the data directory it was
    /// given, if any).
    fn log(&self, kind: EngineKind, dir: Option<&Path>) {
        let dir = dir.map(|d| d.display().to_string());
        match self {
            Outcome::Restored { set, records } => {
                info!(engine = %kind, set, records, dir, "preseeded")
            }
            Outcome::SkippedHasData(what) => {
                info!(engine = %kind, holds = %what, "preseed skipped: target holds data")
            }
            Outcome::FirstStart => {
                info!(engine = %kind, "no backup yet and the target is empty: first start")
            }
            Outcome::DataDirOnly => {
                info!(engine = %kind, "preseed left to the data directory: a running server cannot load a physical backup (DBKEEPER_POSTGRES_DATA_DIR, before the server starts)")
            }
            Outcome::LeftToDataDir(set) => {
                info!(engine = %kind, set, "preseed left to the data directory: the newest good set holds a data copy, which only a preseed of the stopped server's volume loads (DBKEEPER_CHROMA_DATA_DIR, the chroma-preseed container); the running server is left as it is")
            }
            Outcome::LeftToServer(set) => {
                info!(engine = %kind, set, dir, "preseed left to the running server: the newest set holds a logical export, which the online preseed restores over the API (DBKEEPER_CHROMA_URL); the data directory is left as it is")
            }
        }
    }
}

/// Restores `id` into every engine. A non-empty target is refused unless `force`. With a
/// point-in-time `plan`, `id` is its base set and MongoDB is rolled forward to its target.
pub async fn restore(
    cfg: &Config,
    engines: &[Engine],
    id: &str,
    force: bool,
    plan: Option<crate::engine::mongodb::pitr::Plan>,
    guard: &SchemaGuard,
    cancel: &CancellationToken,
) -> Result<()> {
    // Check every target before touching any, so a refusal changes nothing anywhere.
    let mut states = Vec::new();
    for e in engines {
        let state = e.is_empty().await?;
        if let Emptiness::HasData(what) = &state
            && !force
        {
            return Err(Error::NotEmpty {
                engine: e.kind().name(),
                url: e.display_url().to_owned(),
                what: what.clone(),
            });
        }
        states.push(state);
    }
    // Every set found, and openable with the configured keys, before any target is touched.
    let mut found = Vec::new();
    for e in engines {
        let set = super::find_set(cfg, id, Some(e.kind())).await?;
        set.require_key()?;
        if let Some(why) = guard.check(e.kind(), &set) {
            if !force {
                return Err(Error::engine(
                    e.kind().name(),
                    format!(
                        "{why}; nothing was changed. Deploy the migrations that go with it, or re-run with --force"
                    ),
                ));
            }
            warn!(engine = %e.kind(), set = set.id(), "{why}; restoring anyway (--force)");
        }
        refuse_data_copy(e.kind(), &set)?;
        found.push(set);
    }
    for ((e, state), set) in engines.iter().zip(states).zip(found) {
        if state != Emptiness::Empty {
            info!(engine = %e.kind(), state = ?state, "wiping the target before restoring");
            // Marked before anything is dropped: a restore killed mid-wipe leaves a target the
            // next preseed redoes, not half of the old data passing for "holds data".
            e.set_marker(true).await?;
            e.wipe().await?;
        }
        let mut opts = RestoreOptions {
            force,
            mongo_pitr: None,
        };
        if let (EngineKind::Mongodb, Some(p)) = (e.kind(), &plan) {
            let store = crate::engine::mongodb::pitr::SegmentStore::new(cfg.open_repo()?);
            opts.mongo_pitr = Some((store, p.clone()));
        }
        restore_into(e, &set, &opts, cancel).await?;
    }
    Ok(())
}

/// Restores into every engine whose target is empty; skips the others.
pub async fn preseed(
    cfg: &Config,
    engines: &[Engine],
    guard: &SchemaGuard,
    cancel: &CancellationToken,
) -> Result<Vec<(EngineKind, Outcome)>> {
    let mut outcomes = Vec::new();
    for e in engines {
        let outcome = if let Some(dir) = cfg.data_dirs.get(&e.kind()) {
            preseed_dir(cfg, e.kind(), dir, guard).await?
        } else if e.kind() == EngineKind::Postgres {
            Outcome::DataDirOnly
        } else {
            preseed_one(cfg, e, guard, cancel).await?
        };
        outcome.log(e.kind(), cfg.data_dirs.get(&e.kind()).map(|d| d.as_path()));
        outcomes.push((e.kind(), outcome));
    }
    Ok(outcomes)
}

/// Preseeds an engine's data directory (`DBKEEPER_<ENGINE>_DATA_DIR`) when no URL of it is
/// configured: the server is not running, so the directory is all the preseed needs.
pub async fn preseed_dir_only(cfg: &Config, kind: EngineKind, guard: &SchemaGuard) -> Result<()> {
    let dir = cfg.data_dirs.get(&kind).ok_or_else(|| {
        Error::config(format!(
            "{} is not set",
            kind.data_dir_env().unwrap_or("the data directory")
        ))
    })?;
    preseed_dir(cfg, kind, dir, guard)
        .await?
        .log(kind, Some(dir));
    Ok(())
}

async fn preseed_one(
    cfg: &Config,
    e: &Engine,
    guard: &SchemaGuard,
    cancel: &CancellationToken,
) -> Result<Outcome> {
    let state = e.is_empty().await?;
    if let Emptiness::HasData(what) = state {
        return Ok(Outcome::SkippedHasData(what));
    }
    let Some(set) = super::newest_good(cfg, e.kind()).await? else {
        if state == Emptiness::Interrupted {
            warn!(engine = %e.kind(), "an interrupted preseed left partial data and no backup is left to redo it; wiping");
            e.wipe().await?;
            e.set_marker(false).await?;
        }
        return Ok(Outcome::FirstStart);
    };
    // A data copy is the pre-start preseed's (chroma-preseed): passed over before anything
    // is wiped, so an interrupted preseed's leftovers stay for it too.
    if let Some(entry) = set.manifest.engines.get(&e.kind())
        && !crate::engine::loads_online(e.kind(), entry)
    {
        return Ok(Outcome::LeftToDataDir(set.id().to_owned()));
    }
    // Before an interrupted preseed's leftovers are wiped: a refusal changes nothing.
    guard.refuse_preseed(e.kind(), &set)?;
    refuse_data_copy(e.kind(), &set)?;
    if state == Emptiness::Interrupted {
        warn!(engine = %e.kind(), "an earlier preseed was interrupted: wiping its partial data and restoring again");
        e.wipe().await?;
    }
    let records = restore_into(e, &set, &RestoreOptions::default(), cancel).await?;
    Ok(Outcome::Restored {
        set: set.id().to_owned(),
        records,
    })
}

/// The data directory is written to temp names and renamed into place only once every byte
/// checked out, so the newest set is tried directly and a corrupt one is dropped for the next:
/// the set is read once, not checksummed first and read again.
async fn preseed_dir(
    cfg: &Config,
    kind: EngineKind,
    dir: &std::path::Path,
    guard: &SchemaGuard,
) -> Result<Outcome> {
    if let Emptiness::HasData(what) = crate::engine::data_dir_state(kind, dir)? {
        return Ok(Outcome::SkippedHasData(what));
    }
    if let (EngineKind::Postgres, Some(to)) = (kind, cfg.preseed_to_time) {
        // A point in time: from the repository only (the WAL archive lives there).
        let repo = cfg.open_repo()?;
        let dir = dir.to_owned();
        return tokio::task::spawn_blocking(move || {
            let set = super::pitr::preseed_postgres_to_time(&repo, &dir, to)?;
            Ok(Outcome::Restored { set, records: 0 })
        })
        .await
        .map_err(|e| Error::engine(kind.name(), format!("preseed task failed: {e}")))?;
    }
    let repos = super::sources(cfg)?;
    let dir = dir.to_owned();
    let guard = guard.clone();
    tokio::task::spawn_blocking(move || -> Result<Outcome> {
        for (i, repo) in repos.iter().enumerate() {
            for set in repo.candidates(Some(kind))? {
                let entry = set.manifest.engines[&kind].clone();
                // The newest set is the online preseed's (a logical Chroma export): an older
                // data copy written here would make the server hold data, and the newer set
                // would then be skipped.
                if !crate::engine::loads_into_data_dir(kind, &entry) {
                    return Ok(Outcome::LeftToServer(set.id().to_owned()));
                }
                set.require_key()?;
                guard.refuse_preseed(kind, &set)?;
                if i > 0 {
                    info!(set = set.id(), remote = %repo.display(), engine = %kind, "no good set in the repository; using the remote's");
                }
                match crate::engine::preseed_data_dir(kind, &dir, &set, &entry) {
                    Ok(()) => {
                        return Ok(Outcome::Restored {
                            set: set.id().to_owned(),
                            records: entry.total_records(),
                        });
                    }
                    Err(e @ Error::Corrupt { .. }) => {
                        warn!(set = %set.id(), repo = %repo.display(), error = %e, "skipping a set that does not verify")
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Outcome::FirstStart)
    })
    .await
    .map_err(|e| Error::engine(kind.name(), format!("preseed task failed: {e}")))?
}

/// A Chroma data copy (a persist directory) and a PostgreSQL base backup load only into a
/// stopped server's volume: refused before any running target is marked or wiped.
fn refuse_data_copy(kind: EngineKind, set: &SetReader) -> Result<()> {
    match (kind, set.manifest.engines.get(&kind)) {
        (EngineKind::Chroma, Some(entry)) => {
            crate::engine::chroma::datacopy::refuse_online(set, entry)
        }
        (EngineKind::Postgres, _) => Err(Error::config(format!(
            "set {}: a running PostgreSQL server cannot load a physical backup; preseed its empty data directory before it starts (DBKEEPER_POSTGRES_DATA_DIR), or leave it out with --only; nothing was changed",
            set.id()
        ))),
        _ => Ok(()),
    }
}

/// Marks the target, restores, checks the counts against the manifest, clears the mark.
/// A failure leaves the mark, so the next preseed wipes and redoes.
async fn restore_into(
    e: &Engine,
    set: &SetReader,
    opts: &RestoreOptions,
    cancel: &CancellationToken,
) -> Result<u64> {
    let entry = set.manifest.engines.get(&e.kind()).ok_or_else(|| {
        Error::repo(
            set.location(),
            format!("set {} holds no {} backup", set.id(), e.kind()),
        )
    })?;
    // A set this host cannot decrypt fails here, before the target is marked or touched.
    set.require_key()?;
    let start = Instant::now();
    info!(engine = %e.kind(), set = set.id(), records = entry.total_records(), "restore started");
    e.set_marker(true).await?;
    let counts = e.restore(set, entry, opts, cancel).await?;
    if counts != e.expected_counts(entry) {
        return Err(Error::engine(
            e.kind().name(),
            format!(
                "restored {} records but set {} holds {}; the target stays marked and the next preseed redoes it",
                counts.values().sum::<u64>(),
                set.id(),
                entry.total_records()
            ),
        ));
    }
    e.set_marker(false).await?;
    info!(
        engine = %e.kind(),
        set = set.id(),
        records = entry.total_records(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "restore finished"
    );
    Ok(entry.total_records())
}
