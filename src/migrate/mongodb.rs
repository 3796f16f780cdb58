//! MongoDB migrations: the history collection and the lease lock in the URI's database, and
//! commands run one by one with `runCommand`.

use std::time::Duration;

use mongodb::bson::{self, Document, doc};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use tokio_util::sync::CancellationToken;

use super::files::{MigrationFile, MongoCommand, Script};
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

    pub async fn retake(&self, owner: &str, lease: Duration) -> Result<()> {
        let coll: Collection<Document> = self.client.database(&self.db).collection(LOCK);
        let expires = bson::DateTime::from_millis(
            bson::DateTime::now().timestamp_millis() + lease.as_millis() as i64,
        );
        coll.replace_one(
            doc! {"_id": LOCK_ID},
            doc! {"_id": LOCK_ID, "owner": owner, "expires_at": expires},
        )
        .upsert(true)
        .await
        .map_err(self.err("take the migration lock"))?;
        Ok(())
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
        if transactional(cmds) && self.supports_transactions().await {
            return self.apply_in_transaction(cmds, cancel).await;
        }
        for (i, c) in cmds.iter().enumerate() {
            let db = c.db.as_deref().unwrap_or(&self.db);
            let database = self.client.database(db);
            let run = database.run_command(c.command.clone());
            let r = tokio::select! {
                r = run => r,
                _ = cancel.cancelled() => return Err(step(i, c, db, "interrupted".into())),
            };
            match r {
                Err(e) => return Err(step(i, c, db, short(&e))),
                Ok(reply) => {
                    if let Some(message) = reply_error(&reply) {
                        return Err(step(i, c, db, message));
                    }
                }
            }
        }
        Ok(())
    }

    /// A replica set member or a mongos, asked with `hello`; a server that cannot say is
    /// treated as one without transactions.
    async fn supports_transactions(&self) -> bool {
        match self
            .client
            .database("admin")
            .run_command(doc! {"hello": 1})
            .await
        {
            Ok(hello) => hello_allows_transactions(&hello),
            Err(_) => false,
        }
    }

    /// Every command in one transaction: all of them commit, or none does.
    async fn apply_in_transaction(
        &self,
        cmds: &[MongoCommand],
        cancel: &CancellationToken,
    ) -> std::result::Result<(), StepError> {
        let whole = |message: String| StepError {
            at: "the transaction".into(),
            command: "startTransaction".into(),
            message,
        };
        let mut session = self
            .client
            .start_session()
            .await
            .map_err(|e| whole(short(&e)))?;
        session
            .start_transaction()
            .await
            .map_err(|e| whole(short(&e)))?;
        for (i, c) in cmds.iter().enumerate() {
            let db = c.db.as_deref().unwrap_or(&self.db);
            let database = self.client.database(db);
            let r = tokio::select! {
                r = database.run_command(c.command.clone()).session(&mut session) => {
                    match r {
                        Err(e) => Err(short(&e)),
                        Ok(reply) => reply_error(&reply).map_or(Ok(()), Err),
                    }
                }
                _ = cancel.cancelled() => Err("interrupted".into()),
            };
            if let Err(message) = r {
                // Best effort: a transaction not committed is also aborted by the server when
                // it times out or the session ends.
                let _ = session.abort_transaction().await;
                return Err(step(
                    i,
                    c,
                    db,
                    format!(
                        "{message} (the transaction was rolled back: nothing of this file was applied)"
                    ),
                ));
            }
        }
        session.commit_transaction().await.map_err(|e| StepError {
            at: "the transaction".into(),
            command: "commitTransaction".into(),
            message: short(&e),
        })
    }
}

/// The server's own words for a failed command, without the raw reply the driver appends.
fn short(e: &mongodb::error::Error) -> String {
    match &*e.kind {
        mongodb::error::ErrorKind::Command(c) => {
            format!("{} ({}): {}", c.code_name, c.code, c.message)
        }
        _ => e.to_string(),
    }
}

/// A write command answers `ok: 1` even when its writes failed: they are in `writeErrors`
/// (a duplicate key, a validation failure) or `writeConcernError`.
fn reply_error(reply: &Document) -> Option<String> {
    let first = |key: &str| -> Option<String> {
        let e = match reply.get(key)? {
            bson::Bson::Array(a) => a.first()?.as_document()?.clone(),
            bson::Bson::Document(d) => d.clone(),
            _ => return None,
        };
        Some(format!(
            "{key}: code {}: {}",
            e.get("code").map(|c| c.to_string()).unwrap_or_default(),
            e.get_str("errmsg").unwrap_or("")
        ))
    };
    first("writeErrors").or_else(|| first("writeConcernError"))
}

fn step(i: usize, c: &MongoCommand, db: &str, message: String) -> StepError {
    StepError {
        at: format!("item {}", i + 1),
        command: format!("{} on {db}", c.name()),
        message,
    }
}

/// The commands that may run in a transaction on every server that has transactions (4.0):
/// reads and writes of documents (not `count`: transactions refuse it). Everything else (DDL such as `create`, `createIndexes`,
/// `drop`, `collMod`, `renameCollection`; admin commands) runs outside one, command by
/// command, as on a standalone server.
const TRANSACTIONAL: &[&str] = &[
    "insert",
    "update",
    "delete",
    "findAndModify",
    "findandmodify",
    "find",
    "distinct",
];

/// Fields a command may not carry inside a transaction: the transaction sets them.
const SESSION_FIELDS: &[&str] = &[
    "writeConcern",
    "readConcern",
    "lsid",
    "txnNumber",
    "autocommit",
    "startTransaction",
];

/// A file runs as one transaction when every command in it is a document read or write
/// ([`TRANSACTIONAL`]) that sets none of [`SESSION_FIELDS`]. One DDL command anywhere in
/// the file and the whole file runs command by command: mixing the two would commit part of
/// the file ahead of the rest.
pub fn transactional(cmds: &[MongoCommand]) -> bool {
    !cmds.is_empty()
        && cmds.iter().all(|c| {
            TRANSACTIONAL.contains(&c.name())
                && !c
                    .command
                    .keys()
                    .any(|k| SESSION_FIELDS.contains(&k.as_str()))
        })
}

/// `hello` of a replica set member (it names its set) or of a mongos, new enough for
/// transactions: wire version 7 (4.0) on a replica set, 8 (4.2) through a mongos.
pub fn hello_allows_transactions(hello: &Document) -> bool {
    let wire = hello
        .get("maxWireVersion")
        .and_then(|v| match v {
            bson::Bson::Int32(n) => Some(i64::from(*n)),
            bson::Bson::Int64(n) => Some(*n),
            bson::Bson::Double(n) => Some(*n as i64),
            _ => None,
        })
        .unwrap_or(0);
    if hello.get_str("msg") == Ok("isdbgrid") {
        return wire >= 8;
    }
    hello.get_str("setName").is_ok() && wire >= 7
}

fn self_err(display: &str, e: mongodb::error::Error) -> Error {
    Error::config(format!("{display}: {e}"))
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmds(items: &[Document]) -> Vec<MongoCommand> {
        items
            .iter()
            .map(|d| MongoCommand {
                db: None,
                command: d.clone(),
            })
            .collect()
    }

    #[test]
    fn only_document_reads_and_writes_run_in_a_transaction() {
        let crud = cmds(&[
            doc! {"insert": "a", "documents": [{"_id": 1}]},
            doc! {"update": "a", "updates": [{"q": {}, "u": {"$set": {"x": 1}}}]},
            doc! {"delete": "a", "deletes": [{"q": {"_id": 2}, "limit": 1}]},
            doc! {"findAndModify": "a", "query": {}, "update": {"$inc": {"n": 1}}},
        ]);
        assert!(transactional(&crud));
        assert!(!transactional(&[]));
        let mut ddl = crud.clone();
        ddl.extend(cmds(&[
            doc! {"createIndexes": "a", "indexes": [{"key": {"x": 1}, "name": "x_1"}]},
        ]));
        assert!(!transactional(&ddl));
        assert!(!transactional(&cmds(&[doc! {"create": "a"}])));
        let wc = cmds(&[doc! {"insert": "a", "documents": [], "writeConcern": {"w": 1}}]);
        assert!(!transactional(&wc));
    }

    #[test]
    fn write_errors_in_an_ok_reply_are_failures() {
        assert_eq!(reply_error(&doc! {"ok": 1, "n": 1}), None);
        let dup = doc! {"ok": 1, "n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}]};
        let e = reply_error(&dup).unwrap();
        assert!(e.contains("11000") && e.contains("duplicate key"), "{e}");
        let wc = doc! {"ok": 1, "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"}};
        assert!(reply_error(&wc).unwrap().contains("replication"));
    }

    #[test]
    fn transactions_need_a_replica_set_or_mongos_new_enough() {
        assert!(hello_allows_transactions(
            &doc! {"setName": "rs0", "maxWireVersion": 17}
        ));
        assert!(!hello_allows_transactions(
            &doc! {"setName": "rs0", "maxWireVersion": 6}
        ));
        assert!(!hello_allows_transactions(
            &doc! {"isWritablePrimary": true, "maxWireVersion": 17}
        ));
        assert!(hello_allows_transactions(
            &doc! {"msg": "isdbgrid", "maxWireVersion": 8_i64}
        ));
        assert!(!hello_allows_transactions(
            &doc! {"msg": "isdbgrid", "maxWireVersion": 7}
        ));
        assert!(!hello_allows_transactions(&doc! {"setName": "rs0"}));
    }
}
