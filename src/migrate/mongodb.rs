//! MongoDB migrations: the history collection and the lease lock in the URI's database, and
//! commands run one by one with `runCommand`.

use std::time::Duration;

use mongodb::bson::{self, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use tokio_util::sync::CancellationToken;

use super::files::{MigrationFile, Script};
use super::{Applied, HISTORY, StepError};
use crate::error::{Error, Result};
use crate::secret::{Secret, redact_url};

const LOCK: &str = "dbkeeper_schema_lock";
const LOCK_ID: &str = "migrate";
const ENGINE: &str = "mongodb";

pub struct MongoTarget {
    client: Client,
    db: String,
    display: String,
}

impl MongoTarget {
    pub async fn connect(url: &Secret) -> Result<MongoTarget> {
        let display = redact_url(url.expose());
        let opts = ClientOptions::parse(url.expose())
            .await
            .map_err(|e| Error::config(format!("{display}: {e}")))?;
        let db = opts.default_database.clone().ok_or_else(|| {
            Error::config(format!(
                "{display}: migrations need the URI to name a database (mongodb://host/app): the history is kept there"
            ))
        })?;
        let client = Client::with_options(opts).map_err(|e| self_err(&display, e))?;
        Ok(MongoTarget {
            client,
            db,
            display,
        })
    }

    /// Ends the client's sessions and closes its connections. A client merely dropped ends
    /// them in a task that an exiting process tears down under it, and the driver panics.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.client.clone().shutdown().immediate(true),
        )
        .await;
    }

    fn history_coll(&self) -> Collection<Document> {
        self.client.database(&self.db).collection(HISTORY)
    }

    fn err(&self, what: &str) -> impl Fn(mongodb::error::Error) -> Error + '_ {
        let what = what.to_owned();
        move |e| Error::engine(ENGINE, format!("{} ({what}): {e}", self.display))
    }

    pub async fn history(&self) -> Result<Vec<Applied>> {
        use futures_util::TryStreamExt;
        let docs: Vec<Document> = self
            .history_coll()
            .find(doc! {})
            .await
            .map_err(self.err("read the migration history"))?
            .try_collect()
            .await
            .map_err(self.err("read the migration history"))?;
        docs.into_iter()
            .map(|mut d| {
                d.remove("_id");
                bson::from_document::<Applied>(d).map_err(|e| {
                    Error::engine(
                        ENGINE,
                        format!(
                            "{}.{HISTORY} holds a row dbkeeper cannot read: {e}",
                            self.db
                        ),
                    )
                })
            })
            .collect()
    }

    pub async fn record(&self, a: &Applied) -> Result<()> {
        let mut d =
            bson::to_document(a).map_err(|e| Error::engine(ENGINE, format!("history row: {e}")))?;
        d.insert("_id", &a.version);
        self.history_coll()
            .replace_one(doc! {"_id": &a.version}, d)
            .upsert(true)
            .await
            .map_err(self.err("write the migration history"))?;
        Ok(())
    }

    pub async fn forget(&self, version: &str) -> Result<()> {
        self.history_coll()
            .delete_one(doc! {"_id": version})
            .await
            .map_err(self.err("write the migration history"))?;
        Ok(())
    }

    /// One document `{_id: "migrate", owner, expires_at}`: inserted when absent, taken over
    /// when expired, renewed by its owner. The unique `_id` makes taking it atomic.
    pub async fn lock(&self, owner: &str, lease: Duration) -> Result<bool> {
        let coll: Collection<Document> = self.client.database(&self.db).collection(LOCK);
        let now = bson::DateTime::now();
        let expires =
            bson::DateTime::from_millis(now.timestamp_millis() + lease.as_millis() as i64);
        let d = doc! {"_id": LOCK_ID, "owner": owner, "expires_at": expires};
        match coll.insert_one(d).await {
            Ok(_) => return Ok(true),
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(self.err("take the migration lock")(e)),
        }
        let r = coll
            .update_one(
                doc! {"_id": LOCK_ID, "$or": [{"owner": owner}, {"expires_at": {"$lt": now}}]},
                doc! {"$set": {"owner": owner, "expires_at": expires}},
            )
            .await
            .map_err(self.err("take the migration lock"))?;
        Ok(r.matched_count == 1)
    }

    pub async fn unlock(&self, owner: &str) -> Result<()> {
        let coll: Collection<Document> = self.client.database(&self.db).collection(LOCK);
        coll.delete_one(doc! {"_id": LOCK_ID, "owner": owner})
            .await
            .map_err(self.err("release the migration lock"))?;
        Ok(())
    }

    /// golang-migrate keeps `{version: N, dirty: false}` in `schema_migrations`: a clean one
    /// is adopted as the baseline.
    pub async fn foreign_baseline(&self) -> Result<Option<Applied>> {
        let coll: Collection<Document> = self
            .client
            .database(&self.db)
            .collection("schema_migrations");
        let Some(d) = coll
            .find_one(doc! {})
            .await
            .map_err(self.err("read golang-migrate's schema_migrations"))?
        else {
            return Ok(None);
        };
        let version = match d.get("version") {
            Some(bson::Bson::Int32(n)) => *n as i64,
            Some(bson::Bson::Int64(n)) => *n,
            _ => return Ok(None),
        };
        if d.get_bool("dirty").unwrap_or(false) {
            return Err(Error::engine(
                ENGINE,
                format!(
                    "{}.schema_migrations says golang-migrate left version {version} dirty; repair it before dbkeeper adopts the database",
                    self.db
                ),
            ));
        }
        if version < 0 {
            return Ok(None);
        }
        let v = super::files::Version::parse(&version.to_string()).expect("digits");
        Ok(Some(Applied::baseline(&v, "adopted from golang-migrate")))
    }

    pub async fn apply(
        &self,
        file: &MigrationFile,
        cancel: &CancellationToken,
    ) -> std::result::Result<(), StepError> {
        let Script::Mongo(cmds) = &file.script else {
            unreachable!("a MongoDB target runs MongoDB files")
        };
        for (i, c) in cmds.iter().enumerate() {
            let db = c.db.as_deref().unwrap_or(&self.db);
            let database = self.client.database(db);
            let run = database.run_command(c.command.clone());
            let r = tokio::select! {
                r = run => r,
                _ = cancel.cancelled() => {
                    return Err(StepError {
                        at: format!("item {}", i + 1),
                        command: c.name().to_owned(),
                        message: "interrupted".into(),
                    });
                }
            };
            if let Err(e) = r {
                return Err(StepError {
                    at: format!("item {}", i + 1),
                    command: format!("{} on {db}", c.name()),
                    message: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

fn self_err(display: &str, e: mongodb::error::Error) -> Error {
    Error::config(format!("{display}: {e}"))
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}
