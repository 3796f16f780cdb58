//! Oplog replay: entries read from `local.oplog.rs` applied to a server in order and
//! idempotently (they may overlap data already there, as `mongorestore --oplogReplay` assumes),
//! with runs of CRUD entries on one namespace batched into one write command.
//!
//! How each entry becomes a write:
//! - `i`: an insert; a duplicate `_id` (the document is already there) turns that document and
//!   the rest of its batch into upsert-replacements by `_id`.
//! - `u`: a replacement (`o` without `$` fields) replaces by `o2`; a `$v: 2` diff — mongod's
//!   `doc_diff` format (`d`/`u`/`i`/`s<field>` sections, array diffs `a`/`l`/`u<n>`/`s<n>`) or the
//!   change-stream form (`updatedFields`/`removedFields`/`truncatedArrays`) — and a legacy
//!   operator update become `$set`/`$unset`/`$push`+`$slice` statements on dotted paths. Every
//!   update upserts, as `applyOps` does by default.
//! - `d`: a delete of `o` (the `_id`), at most one document.
//! - `c`: DDL on `<db>.$cmd`, sent as the command, with "already done" answers accepted; a
//!   transaction's `applyOps` (buffered across `partialTxn` entries, or from `prepare` until its
//!   `commitTransaction`) applies its inner operations in order.
//!
//! The `system.*` collections a dump carries are replayed too: `system.js` (user functions) and
//! a timeseries collection's `system.buckets.<name>` (its documents; creating or dropping the
//! buckets creates or drops the timeseries collection, whose view comes with it).
//!
//! Skipped: no-ops (`n`), the server's databases (`admin`, `local`, `config`), namespaces the
//! [`Filter`] does not select, and the other `system.*` collections (server metadata, recorded
//! by DDL entries), which are counted and reported by [`Applier::skipped_system`], never
//! dropped silently. Anything else that cannot be applied stops the replay with one line naming
//! the entry's timestamp.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::io::Write;

use mongodb::Client;
use mongodb::bson::{Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, Timestamp, doc};
use mongodb::error::ErrorKind;
use tracing::debug;

use super::{ENGINE, Filter, driver_message, names::is_system_db};
use crate::error::{Error, Result};

/// Statements per write command. Past a few hundred, larger batches save little (the server's
/// write path is the limit) and only hold more memory.
const MAX_BATCH_OPS: usize = 1000;
/// Bytes of documents per write command: the server takes a command up to 16 MiB + 16 KiB, and
/// an entry alone (at most 16 MiB) must always fit.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

const NAMESPACE_NOT_FOUND: i32 = 26;
const INDEX_NOT_FOUND: i32 = 27;
const NAMESPACE_EXISTS: i32 = 48;
const INDEX_ALREADY_EXISTS: i32 = 68;
const INDEX_OPTIONS_CONFLICT: i32 = 85;
const INDEX_KEY_SPECS_CONFLICT: i32 = 86;
const DUPLICATE_KEY: i32 = 11000;

/// The prefix of a timeseries collection's buckets.
const BUCKETS: &str = "system.buckets.";

/// The collection whose data entries on `coll` carry, as the filter names it: `coll` itself,
/// a timeseries collection for its buckets, `system.js`; `None` for the other `system.*`
/// collections, which hold the server's metadata.
fn data_collection(coll: &str) -> Option<&str> {
    match coll.strip_prefix("system.") {
        None => Some(coll),
        Some("js") => Some(coll),
        Some(_) => coll.strip_prefix(BUCKETS).filter(|c| !c.is_empty()),
    }
}

/// mongod logs a timeseries collection's creation as the creation of its buckets (with the
/// server's internal validator and clustered index) and then of its view: the command that
/// makes both is `create` of the collection with its `timeseries` options, and the view's own
/// entry then finds it there.
fn timeseries_create(coll: &str, logged: &Document) -> Document {
    let mut cmd = doc! {"create": coll};
    for key in [
        "timeseries",
        "expireAfterSeconds",
        "collation",
        "storageEngine",
    ] {
        if let Some(v) = logged.get(key) {
            cmd.insert(key, v.clone());
        }
    }
    cmd
}

/// The entry's `ts` as (secs, increment).
pub fn entry_ts(entry: &RawDocument) -> Option<Timestamp> {
    entry.get_timestamp("ts").ok()
}

/// Applies oplog entries (as read from `local.oplog.rs`) to a server, in order, idempotently.
/// CRUD entries are queued and sent in batches; call [`flush`](Applier::flush) at the end.
pub struct Applier {
    client: Client,
    filter: Filter,
    applied: u64,
    /// Entries on `system.*` collections that are not data, by namespace.
    skipped_system: BTreeMap<String, u64>,
    batch: Option<Batch>,
    /// Inner operations of transactions not committed yet (`partialTxn` or `prepare`), by
    /// session and transaction number.
    txns: HashMap<TxnKey, Vec<RawDocumentBuf>>,
}

/// `lsid` (as raw bytes) and `txnNumber`.
type TxnKey = (Vec<u8>, i64);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Insert,
    Update,
    Delete,
}

impl Kind {
    fn op(self) -> &'static str {
        match self {
            Kind::Insert => "i",
            Kind::Update => "u",
            Kind::Delete => "d",
        }
    }
}

/// Consecutive CRUD entries of one kind on one namespace, as the items of one write command.
struct Batch {
    db: String,
    coll: String,
    kind: Kind,
    /// Documents (insert) or statements (update, delete), in oplog order.
    items: Vec<RawDocumentBuf>,
    /// The timestamp of the entry each item comes from.
    origin: Vec<Timestamp>,
    bytes: usize,
    /// Entries behind the items (an update entry may need several statements).
    entries: u64,
}

impl Batch {
    fn ns(&self) -> String {
        format!("{}.{}", self.db, self.coll)
    }

    fn item_error(&self, index: usize, why: impl Display) -> Error {
        let ts = self
            .origin
            .get(index)
            .or(self.origin.last())
            .copied()
            .unwrap_or(Timestamp {
                time: 0,
                increment: 0,
            });
        entry_error(ts, self.kind.op(), &self.ns(), why)
    }

    fn batch_error(&self, why: impl Display) -> Error {
        match (self.origin.first(), self.origin.last()) {
            (Some(a), Some(b)) if a != b => Error::engine(
                ENGINE,
                format!(
                    "oplog entries {}..{} ({} on {}): {why}",
                    fmt_ts(*a),
                    fmt_ts(*b),
                    self.kind.op(),
                    self.ns()
                ),
            ),
            _ => self.item_error(0, why),
        }
    }
}

fn fmt_ts(ts: Timestamp) -> String {
    format!("{}:{}", ts.time, ts.increment)
}

fn entry_error(ts: Timestamp, op: &str, ns: &str, why: impl Display) -> Error {
    Error::engine(
        ENGINE,
        format!("oplog entry {} ({op} on {ns}): {why}", fmt_ts(ts)),
    )
}

/// The server's error code, for a command the server refused.
fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

impl Applier {
    /// `filter` decides which namespaces are replayed.
    pub fn new(client: Client, filter: Filter) -> Applier {
        Applier {
            client,
            filter,
            applied: 0,
            skipped_system: BTreeMap::new(),
            batch: None,
            txns: HashMap::new(),
        }
    }

    /// Operations applied so far (sent and acknowledged): CRUD and DDL entries, each inner
    /// operation of a transaction counted once; skipped entries are not counted.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Entries skipped because they write a `system.*` collection that is not data (see the
    /// module's notes), by namespace; the caller reports them.
    pub fn skipped_system(&self) -> &BTreeMap<String, u64> {
        &self.skipped_system
    }

    /// Queues or applies one entry. Errors name the entry's timestamp.
    pub async fn apply(&mut self, entry: &RawDocument) -> Result<()> {
        let Some(ts) = entry_ts(entry) else {
            let op = entry.get_str("op").unwrap_or("?");
            let ns = entry.get_str("ns").unwrap_or("?");
            return Err(Error::engine(
                ENGINE,
                format!("oplog entry without a timestamp ({op} on {ns})"),
            ));
        };
        self.apply_op(entry, ts, true).await
    }

    /// One operation: a top-level entry, or (`top` false) an operation inside `applyOps`, which
    /// carries no timestamp of its own and is named by its transaction's entry.
    async fn apply_op(&mut self, entry: &RawDocument, ts: Timestamp, top: bool) -> Result<()> {
        let op = entry.get_str("op").unwrap_or("?");
        let ns = entry.get_str("ns").unwrap_or("?");
        let fail = |why: &dyn Display| entry_error(ts, op, ns, why);
        match op {
            "n" => Ok(()),
            "i" | "u" | "d" => self.queue_crud(entry, ts, op, ns).await,
            "c" => {
                let o = entry
                    .get_document("o")
                    .map_err(|_| fail(&"no command document (o)"))?;
                let name = match o.iter().next() {
                    Some(Ok((name, _))) => name,
                    _ => return Err(fail(&"empty or malformed command document (o)")),
                };
                match name {
                    "applyOps" if top => self.apply_ops(entry, o, ts).await,
                    "commitTransaction" | "abortTransaction" if top => {
                        self.end_txn(entry, name == "commitTransaction", ts).await
                    }
                    "applyOps" | "commitTransaction" | "abortTransaction" => {
                        Err(fail(&format!("{name} inside applyOps")))
                    }
                    _ => self.command(o, name, ts, ns).await,
                }
            }
            "?" => Err(fail(&"no op field")),
            other => Err(fail(&format!("unknown op type {other:?}"))),
        }
    }

    /// Whether entries on `db.coll` are replayed; a skipped `system.*` collection that is not
    /// data is counted.
    fn wants(&mut self, db: &str, coll: &str) -> bool {
        if is_system_db(db) {
            return false;
        }
        match data_collection(coll) {
            Some(c) => self.filter.wants(db, c),
            None => {
                *self
                    .skipped_system
                    .entry(format!("{db}.{coll}"))
                    .or_default() += 1;
                false
            }
        }
    }

    async fn queue_crud(
        &mut self,
        entry: &RawDocument,
        ts: Timestamp,
        op: &str,
        ns: &str,
    ) -> Result<()> {
        let fail = |why: &dyn Display| entry_error(ts, op, ns, why);
        let Some((db, coll)) = ns.split_once('.') else {
            return Err(fail(&"namespace without a collection"));
        };
        if !self.wants(db, coll) {
            return Ok(());
        }
        let o = entry
            .get_document("o")
            .map_err(|_| fail(&"no document (o)"))?;
        let (kind, items) = match op {
            "i" => {
                if o.get("_id").ok().flatten().is_none() {
                    return Err(fail(&"inserted document has no _id"));
                }
                (Kind::Insert, vec![o.to_raw_document_buf()])
            }
            "u" => {
                let o2 = entry
                    .get_document("o2")
                    .map_err(|_| fail(&"update without its selector (o2)"))?;
                let mods = update_mods(o).map_err(|why| fail(&why))?;
                let items = mods.into_iter().map(|u| update_statement(o2, &u)).collect();
                (Kind::Update, items)
            }
            _ => {
                let mut d = RawDocumentBuf::new();
                d.append_ref("q", RawBsonRef::Document(o));
                d.append("limit", 1);
                (Kind::Delete, vec![d])
            }
        };
        self.push(db, coll, kind, items, ts).await
    }

    async fn push(
        &mut self,
        db: &str,
        coll: &str,
        kind: Kind,
        items: Vec<RawDocumentBuf>,
        ts: Timestamp,
    ) -> Result<()> {
        let size: usize = items.iter().map(|d| d.as_bytes().len() + 8).sum();
        let fits = self.batch.as_ref().is_some_and(|b| {
            b.kind == kind
                && b.db == db
                && b.coll == coll
                && b.items.len() + items.len() <= MAX_BATCH_OPS
                && b.bytes + size <= MAX_BATCH_BYTES
        });
        if !fits {
            self.flush().await?;
        }
        let b = self.batch.get_or_insert_with(|| Batch {
            db: db.to_owned(),
            coll: coll.to_owned(),
            kind,
            items: Vec::new(),
            origin: Vec::new(),
            bytes: 0,
            entries: 0,
        });
        b.origin.extend(std::iter::repeat_n(ts, items.len()));
        b.items.extend(items);
        b.bytes += size;
        b.entries += 1;
        Ok(())
    }

    /// Sends whatever is batched. Must be called at the end (and is called internally before
    /// any DDL or change of namespace or kind).
    pub async fn flush(&mut self) -> Result<()> {
        let Some(b) = self.batch.take() else {
            return Ok(());
        };
        if b.items.is_empty() {
            // Updates whose diff changes nothing: the server refuses an empty batch.
            self.applied += b.entries;
            return Ok(());
        }
        let db = self.client.database(&b.db);
        match b.kind {
            Kind::Insert => {
                let cmd = write_command("insert", &b.coll, "documents", &b.items);
                let reply = db
                    .run_raw_command(cmd)
                    .await
                    .map_err(|e| b.batch_error(driver_message(&e)))?;
                check_write_concern(&b, &reply)?;
                match first_write_error(&reply) {
                    None => {}
                    Some(we) if we.code == DUPLICATE_KEY && we.index < b.items.len() => {
                        // Already there (an overlap with the data, or a second replay): this
                        // document and the rest become replacements, still in order.
                        let from = we.index;
                        let mut stmts = Vec::with_capacity(b.items.len() - from);
                        for (i, d) in b.items[from..].iter().enumerate() {
                            let id = d
                                .get("_id")
                                .ok()
                                .flatten()
                                .ok_or_else(|| b.item_error(from + i, "no _id"))?;
                            let mut q = RawDocumentBuf::new();
                            q.append_ref("_id", id);
                            stmts.push(update_statement(&q, d));
                        }
                        let cmd = write_command("update", &b.coll, "updates", &stmts);
                        let reply = db
                            .run_raw_command(cmd)
                            .await
                            .map_err(|e| b.batch_error(driver_message(&e)))?;
                        check_write_concern(&b, &reply)?;
                        if let Some(we) = first_write_error(&reply) {
                            return Err(b.item_error(from + we.index, we));
                        }
                    }
                    Some(we) => return Err(b.item_error(we.index, we)),
                }
            }
            Kind::Update | Kind::Delete => {
                let (name, key) = if b.kind == Kind::Update {
                    ("update", "updates")
                } else {
                    ("delete", "deletes")
                };
                let cmd = write_command(name, &b.coll, key, &b.items);
                let reply = db
                    .run_raw_command(cmd)
                    .await
                    .map_err(|e| b.batch_error(driver_message(&e)))?;
                check_write_concern(&b, &reply)?;
                if let Some(we) = first_write_error(&reply) {
                    return Err(b.item_error(we.index, we));
                }
            }
        }
        self.applied += b.entries;
        Ok(())
    }

    /// A transaction's (or a plain) `applyOps`: buffered while `partialTxn` or `prepare`,
    /// applied with whatever was buffered before it otherwise.
    async fn apply_ops(
        &mut self,
        entry: &RawDocument,
        o: &RawDocument,
        ts: Timestamp,
    ) -> Result<()> {
        let ns = entry.get_str("ns").unwrap_or("?");
        let fail = |why: &dyn Display| entry_error(ts, "c", ns, why);
        let ops = o
            .get_array("applyOps")
            .map_err(|_| fail(&"applyOps is not an array"))?;
        let mut inner = Vec::new();
        for op in ops {
            match op {
                Ok(RawBsonRef::Document(d)) => inner.push(d),
                _ => return Err(fail(&"applyOps holds a malformed operation")),
            }
        }
        let key = txn_key(entry);
        let partial = o.get_bool("partialTxn").unwrap_or(false);
        let prepare = o.get_bool("prepare").unwrap_or(false);
        if partial || prepare {
            let key = key.ok_or_else(|| {
                fail(&"a partial or prepared transaction without lsid and txnNumber")
            })?;
            self.txns
                .entry(key)
                .or_default()
                .extend(inner.into_iter().map(|d| d.to_raw_document_buf()));
            return Ok(());
        }
        let earlier = key.and_then(|k| self.txns.remove(&k)).unwrap_or_default();
        for op in &earlier {
            Box::pin(self.apply_op(op, ts, false)).await?;
        }
        for op in inner {
            Box::pin(self.apply_op(op, ts, false)).await?;
        }
        Ok(())
    }

    /// `commitTransaction` applies a prepared transaction's operations; `abortTransaction`
    /// drops them.
    async fn end_txn(&mut self, entry: &RawDocument, commit: bool, ts: Timestamp) -> Result<()> {
        let ns = entry.get_str("ns").unwrap_or("?");
        let fail = |why: &dyn Display| entry_error(ts, "c", ns, why);
        let key = txn_key(entry).ok_or_else(|| fail(&"no lsid and txnNumber"))?;
        let ops = self.txns.remove(&key);
        if !commit {
            return Ok(());
        }
        let ops = ops.ok_or_else(|| {
            fail(&"commitTransaction of a transaction whose prepare entry was not replayed")
        })?;
        for op in &ops {
            Box::pin(self.apply_op(op, ts, false)).await?;
        }
        Ok(())
    }

    /// DDL on `<db>.$cmd`. Answers that mean "already done" (the namespace exists, is gone,
    /// the index exists, is gone) are accepted, so a replay may overlap what is there.
    async fn command(
        &mut self,
        o: &RawDocument,
        name: &str,
        ts: Timestamp,
        ns: &str,
    ) -> Result<()> {
        let fail = |why: &dyn Display| entry_error(ts, "c", ns, why);
        let Some(db) = ns.strip_suffix(".$cmd") else {
            return Err(fail(&"a command outside <db>.$cmd"));
        };
        let coll = || -> Result<&str> {
            o.get_str(name)
                .map_err(|_| fail(&format!("{name} without a collection name")))
        };
        let cmd = match name {
            "create" => {
                let c = coll()?;
                if !self.wants(db, c) {
                    return Ok(());
                }
                let mut cmd = to_document(o).map_err(|e| fail(&e))?;
                if let Some(ts_coll) = c.strip_prefix(BUCKETS) {
                    cmd = timeseries_create(ts_coll, &cmd);
                }
                if cmd.contains_key("viewOn") {
                    // Views have no _id index; some servers log the pipeline as viewPipeline.
                    cmd.remove("idIndex");
                    if let Some(p) = cmd.remove("viewPipeline") {
                        cmd.insert("pipeline", p);
                    }
                }
                (cmd, &[NAMESPACE_EXISTS][..])
            }
            "drop" => {
                let c = coll()?;
                if !self.wants(db, c) {
                    return Ok(());
                }
                // Dropping a timeseries collection drops its buckets and its view.
                let c = c.strip_prefix(BUCKETS).unwrap_or(c);
                (doc! {"drop": c}, &[NAMESPACE_NOT_FOUND][..])
            }
            "createIndexes" | "commitIndexBuild" => {
                let c = coll()?;
                if !self.wants(db, c) {
                    return Ok(());
                }
                let mut cmd = to_document(o).map_err(|e| fail(&e))?;
                let indexes = match cmd.remove("indexes") {
                    Some(Bson::Array(a)) => a,
                    Some(_) => return Err(fail(&"indexes is not an array")),
                    // mongod logs one index per entry: the spec is the command's other fields.
                    None => {
                        cmd.remove(name);
                        vec![Bson::Document(cmd)]
                    }
                };
                (
                    doc! {"createIndexes": c, "indexes": indexes},
                    &[
                        INDEX_ALREADY_EXISTS,
                        INDEX_OPTIONS_CONFLICT,
                        INDEX_KEY_SPECS_CONFLICT,
                    ][..],
                )
            }
            "dropIndexes" | "deleteIndexes" => {
                let c = coll()?;
                if !self.wants(db, c) {
                    return Ok(());
                }
                let index = o
                    .get("index")
                    .ok()
                    .flatten()
                    .and_then(|v| Bson::try_from(v.to_raw_bson()).ok())
                    .ok_or_else(|| fail(&"dropIndexes without index"))?;
                (
                    doc! {"dropIndexes": c, "index": index},
                    &[INDEX_NOT_FOUND, NAMESPACE_NOT_FOUND][..],
                )
            }
            "collMod" | "convertToCapped" => {
                let c = coll()?;
                if !self.wants(db, c) {
                    return Ok(());
                }
                (
                    to_document(o).map_err(|e| fail(&e))?,
                    &[NAMESPACE_NOT_FOUND][..],
                )
            }
            "renameCollection" => return self.rename(o, ts, ns).await,
            "dropDatabase" => return self.drop_database(db, ts, ns).await,
            // Bookkeeping of index builds (the index itself comes with commitIndexBuild) and
            // consistency checks: nothing to replay.
            "startIndexBuild" | "abortIndexBuild" | "dbCheck" => return Ok(()),
            _ => return Err(fail(&format!("command {name:?} cannot be replayed"))),
        };
        self.flush().await?;
        self.run_ddl(db, cmd.0, cmd.1, ts, ns).await
    }

    async fn run_ddl(
        &mut self,
        db: &str,
        cmd: Document,
        accept: &[i32],
        ts: Timestamp,
        ns: &str,
    ) -> Result<()> {
        match self.client.database(db).run_command(cmd).await {
            Ok(_) => {}
            Err(e) if command_code(&e).is_some_and(|c| accept.contains(&c)) => {
                debug!(engine = ENGINE, ts = %fmt_ts(ts), ns, error = %driver_message(&e), "already applied");
            }
            Err(e) => return Err(entry_error(ts, "c", ns, driver_message(&e))),
        }
        self.applied += 1;
        Ok(())
    }

    /// A rename replaces its target whatever it holds: at this point of the history the
    /// target is the source (a target already there is data from later in the oplog).
    async fn rename(&mut self, o: &RawDocument, ts: Timestamp, ns: &str) -> Result<()> {
        let fail = |why: &dyn Display| entry_error(ts, "c", ns, why);
        let from = o
            .get_str("renameCollection")
            .map_err(|_| fail(&"renameCollection without a source"))?;
        let to = o
            .get_str("to")
            .map_err(|_| fail(&"renameCollection without a target (to)"))?;
        let split = |n: &'_ str| {
            n.split_once('.')
                .map(|(d, c)| (d.to_owned(), c.to_owned()))
                .ok_or_else(|| fail(&format!("{n:?} is not a namespace")))
        };
        let (fdb, fcoll) = split(from)?;
        let (tdb, tcoll) = split(to)?;
        match (self.wants(&fdb, &fcoll), self.wants(&tdb, &tcoll)) {
            (false, false) => Ok(()),
            (true, true) => {
                self.flush().await?;
                self.run_ddl(
                    "admin",
                    doc! {"renameCollection": from, "to": to, "dropTarget": true},
                    &[NAMESPACE_NOT_FOUND],
                    ts,
                    ns,
                )
                .await
            }
            // Moved out of what is replayed: gone, as far as the replay is concerned.
            (true, false) => {
                self.flush().await?;
                self.run_ddl(&fdb, doc! {"drop": fcoll}, &[NAMESPACE_NOT_FOUND], ts, ns)
                    .await
            }
            (false, true) => Err(fail(&format!(
                "renames {from} (not replayed) to {to}: its documents are not in the replay"
            ))),
        }
    }

    async fn drop_database(&mut self, db: &str, ts: Timestamp, ns: &str) -> Result<()> {
        if !self.filter.wants_db(db) {
            return Ok(());
        }
        self.flush().await?;
        if self.filter.wants_whole_db(db) {
            return self
                .run_ddl(db, doc! {"dropDatabase": 1}, &[], ts, ns)
                .await;
        }
        // Only some collections are replayed: drop those.
        let names: Vec<String> = self
            .client
            .database(db)
            .list_collection_names()
            .await
            .map_err(|e| entry_error(ts, "c", ns, driver_message(&e)))?;
        let selected = names
            .iter()
            .filter(|c| data_collection(c).is_some_and(|d| self.filter.wants(db, d)));
        for c in selected {
            match self.client.database(db).run_command(doc! {"drop": c}).await {
                Ok(_) => {}
                Err(e) if command_code(&e) == Some(NAMESPACE_NOT_FOUND) => {}
                Err(e) => return Err(entry_error(ts, "c", ns, driver_message(&e))),
            }
        }
        self.applied += 1;
        Ok(())
    }
}

/// A transaction's identity: `lsid` and `txnNumber`, when the entry has both.
fn txn_key(entry: &RawDocument) -> Option<TxnKey> {
    let lsid = entry.get_document("lsid").ok()?;
    let n = match entry.get("txnNumber").ok()?? {
        RawBsonRef::Int64(n) => n,
        RawBsonRef::Int32(n) => n.into(),
        _ => return None,
    };
    Some((lsid.as_bytes().to_vec(), n))
}

fn to_document(o: &RawDocument) -> std::result::Result<Document, String> {
    Document::try_from(o).map_err(|e| format!("malformed command document: {e}"))
}

/// `{q, u, upsert: true}`.
fn update_statement(q: &RawDocument, u: &RawDocument) -> RawDocumentBuf {
    let mut s = RawDocumentBuf::new();
    s.append_ref("q", RawBsonRef::Document(q));
    s.append_ref("u", RawBsonRef::Document(u));
    s.append("upsert", true);
    s
}

/// `{<name>: <coll>, <key>: [items…], ordered: true}`, assembled as bytes: the items are
/// copied once, not re-encoded.
fn write_command(name: &str, coll: &str, key: &str, items: &[RawDocumentBuf]) -> RawDocumentBuf {
    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    let payload: usize = items.iter().map(|d| d.as_bytes().len() + 8).sum();
    let mut out = Vec::with_capacity(payload + name.len() + coll.len() + key.len() + 64);
    out.extend_from_slice(&[0; 4]);
    out.push(0x02);
    cstr(&mut out, name);
    out.extend_from_slice(&(coll.len() as i32 + 1).to_le_bytes());
    cstr(&mut out, coll);
    out.push(0x04);
    cstr(&mut out, key);
    let array_at = out.len();
    out.extend_from_slice(&[0; 4]);
    for (i, d) in items.iter().enumerate() {
        out.push(0x03);
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{i}");
        out.push(0);
        out.extend_from_slice(d.as_bytes());
    }
    out.push(0);
    let array_len = (out.len() - array_at) as i32;
    out[array_at..array_at + 4].copy_from_slice(&array_len.to_le_bytes());
    out.push(0x08);
    cstr(&mut out, "ordered");
    out.push(1);
    out.push(0);
    let len = out.len() as i32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    // Well-formed by construction from well-formed parts.
    RawDocumentBuf::from_bytes(out).unwrap_or_default()
}

struct WriteError {
    index: usize,
    code: i32,
    message: String,
}

impl Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "code {}: {}", self.code, one_line(&self.message))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn as_i64(b: &Bson) -> Option<i64> {
    match b {
        Bson::Int32(n) => Some((*n).into()),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

fn first_write_error(reply: &Document) -> Option<WriteError> {
    let errs = reply.get_array("writeErrors").ok()?;
    let first = errs.first()?.as_document()?;
    Some(WriteError {
        index: first
            .get("index")
            .and_then(as_i64)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0),
        code: first
            .get("code")
            .and_then(as_i64)
            .and_then(|c| i32::try_from(c).ok())
            .unwrap_or(0),
        message: first.get_str("errmsg").unwrap_or("").to_owned(),
    })
}

fn check_write_concern(b: &Batch, reply: &Document) -> Result<()> {
    match reply.get_document("writeConcernError") {
        Ok(wc) => Err(b.batch_error(format!(
            "write concern: {}",
            one_line(wc.get_str("errmsg").unwrap_or("failed"))
        ))),
        Err(_) => Ok(()),
    }
}

/// The update documents an update entry's `o` becomes, applied in order with the entry's `o2`
/// as the selector: the replacement itself, or modifier updates translated from a `$v: 2` diff
/// or taken from a legacy (`$v: 1` or unversioned) operator update.
pub(crate) fn update_mods(o: &RawDocument) -> std::result::Result<Vec<RawDocumentBuf>, String> {
    let bad = |e: mongodb::bson::raw::Error| format!("malformed update: {e}");
    let version = match o.get("$v").map_err(bad)? {
        None => None,
        Some(RawBsonRef::Int32(v)) => Some(i64::from(v)),
        Some(RawBsonRef::Int64(v)) => Some(v),
        Some(RawBsonRef::Double(v)) if v.fract() == 0.0 => Some(v as i64),
        Some(v) => return Err(format!("unknown update version $v: {v:?}")),
    };
    if version == Some(2) {
        let diff = match o.get("diff").map_err(bad)? {
            Some(RawBsonRef::Document(d)) => d,
            _ => return Err("$v: 2 update without a diff document".into()),
        };
        let mut m = Mods::default();
        let change_stream_form = diff.iter().any(|e| {
            matches!(e, Ok((k, _)) if matches!(k, "updatedFields" | "removedFields" | "truncatedArrays"))
        });
        if change_stream_form {
            m.truncate_first = true;
            description_diff(diff, &mut m)?;
        } else {
            document_diff(diff, "", &mut m)?;
        }
        return Ok(m.statements());
    }
    if version.is_some_and(|v| v != 1) {
        return Err(format!(
            "unknown update version $v: {}",
            version.unwrap_or(0)
        ));
    }
    let (mut ops, mut fields) = (0, 0);
    let mut out = RawDocumentBuf::new();
    for e in o.iter() {
        let (k, v) = e.map_err(bad)?;
        if k == "$v" {
            continue;
        }
        if k.starts_with('$') {
            ops += 1;
            out.append_ref(k, v);
        } else {
            fields += 1;
        }
    }
    match (ops, fields) {
        (0, _) => Ok(vec![o.to_raw_document_buf()]),
        (_, 0) => Ok(vec![out]),
        _ => Err("update mixes operators and fields".into()),
    }
}

/// A diff flattened into modifiers on dotted paths.
#[derive(Default)]
struct Mods<'a> {
    set: Vec<(String, RawBsonRef<'a>)>,
    unset: Vec<String>,
    /// Fields the diff inserts (`i`): mongod removes them from where they are and appends them
    /// at the end, so they are unset before they are set.
    moved: Vec<String>,
    /// Arrays cut to a length.
    truncate: Vec<(String, i32)>,
    /// Change-stream form: the lengths apply before the updated fields (which index the
    /// shortened arrays); in mongod's form they are consistent either way.
    truncate_first: bool,
}

impl Mods<'_> {
    /// Conflict-free statements: paths within one statement never overlap (the diff names each
    /// field once), and the array cuts, which touch a whole array, go on their own.
    fn statements(self) -> Vec<RawDocumentBuf> {
        let mut out = Vec::new();
        let truncates: Vec<RawDocumentBuf> = self
            .truncate
            .iter()
            .map(|(path, len)| {
                let mut each = RawDocumentBuf::new();
                each.append("$each", mongodb::bson::RawArrayBuf::new());
                each.append("$slice", *len);
                let mut push = RawDocumentBuf::new();
                push.append(path, each);
                let mut u = RawDocumentBuf::new();
                u.append("$push", push);
                u
            })
            .collect();
        let unset = |paths: &[String]| {
            let mut d = RawDocumentBuf::new();
            for p in paths {
                d.append(p, true);
            }
            d
        };
        if self.truncate_first {
            out.extend(truncates.iter().cloned());
        }
        if !self.moved.is_empty() {
            let mut u = RawDocumentBuf::new();
            u.append("$unset", unset(&self.moved));
            out.push(u);
        }
        if !self.set.is_empty() || !self.unset.is_empty() {
            let mut u = RawDocumentBuf::new();
            if !self.set.is_empty() {
                let mut s = RawDocumentBuf::new();
                for (p, v) in &self.set {
                    s.append_ref(p, *v);
                }
                u.append("$set", s);
            }
            if !self.unset.is_empty() {
                u.append("$unset", unset(&self.unset));
            }
            out.push(u);
        }
        if !self.truncate_first {
            out.extend(truncates);
        }
        out
    }
}

/// `prefix.field`, for a field an update path can name.
fn join(prefix: &str, field: &str) -> std::result::Result<String, String> {
    if field.is_empty() || field.contains('.') || field.starts_with('$') {
        let at = if prefix.is_empty() {
            "the top level"
        } else {
            prefix
        };
        return Err(format!(
            "the diff names field {field:?} at {at}, which an update path cannot address"
        ));
    }
    Ok(if prefix.is_empty() {
        field.to_owned()
    } else {
        format!("{prefix}.{field}")
    })
}

fn section<'a>(
    v: RawBsonRef<'a>,
    name: &str,
    at: &str,
) -> std::result::Result<&'a RawDocument, String> {
    match v {
        RawBsonRef::Document(d) => Ok(d),
        _ => Err(format!(
            "malformed diff: section {name:?} at {} is not a document",
            place(at)
        )),
    }
}

/// Where in a document a diff section applies, for messages.
fn place(path: &str) -> &str {
    if path.is_empty() {
        "the top level"
    } else {
        path
    }
}

fn malformed(e: mongodb::bson::raw::Error) -> String {
    format!("malformed diff: {e}")
}

/// mongod's document diff (`src/mongo/db/update/document_diff_serialization.h`): sections
/// `d` (deleted fields), `u` (updated, in place or appended), `i` (inserted, appended at the
/// end), `b` (binary diffs) and `s<field>` (a sub-diff of an object or array field).
fn document_diff<'a>(
    diff: &'a RawDocument,
    prefix: &str,
    m: &mut Mods<'a>,
) -> std::result::Result<(), String> {
    for e in diff.iter() {
        let (k, v) = e.map_err(malformed)?;
        match k {
            "d" => {
                for f in section(v, k, prefix)?.iter() {
                    let (f, _) = f.map_err(malformed)?;
                    m.unset.push(join(prefix, f)?);
                }
            }
            "u" | "i" => {
                for f in section(v, k, prefix)?.iter() {
                    let (f, val) = f.map_err(malformed)?;
                    let path = join(prefix, f)?;
                    if k == "i" {
                        m.moved.push(path.clone());
                    }
                    m.set.push((path, val));
                }
            }
            "b" => {
                return Err("binary diffs (section \"b\") cannot be replayed".into());
            }
            _ if k.len() > 1 && k.starts_with('s') => {
                let path = join(prefix, &k[1..])?;
                sub_diff(section(v, k, prefix)?, &path, m)?;
            }
            _ => {
                return Err(format!(
                    "malformed diff: unknown section {k:?} at {}",
                    place(prefix)
                ));
            }
        }
    }
    Ok(())
}

fn sub_diff<'a>(
    diff: &'a RawDocument,
    path: &str,
    m: &mut Mods<'a>,
) -> std::result::Result<(), String> {
    match diff.iter().next() {
        Some(Ok(("a", _))) => array_diff(diff, path, m),
        Some(Err(e)) => Err(malformed(e)),
        _ => document_diff(diff, path, m),
    }
}

/// An array diff: `a: true`, then `l` (the new length), then `u<n>` (element n replaced) and
/// `s<n>` (a sub-diff of element n).
fn array_diff<'a>(
    diff: &'a RawDocument,
    path: &str,
    m: &mut Mods<'a>,
) -> std::result::Result<(), String> {
    for e in diff.iter() {
        let (k, v) = e.map_err(malformed)?;
        match k {
            "a" => {
                if v != RawBsonRef::Boolean(true) {
                    return Err(format!(
                        "malformed diff: array header at {path} is not true"
                    ));
                }
            }
            "l" => {
                let len = match v {
                    RawBsonRef::Int32(n) if n >= 0 => n,
                    RawBsonRef::Int64(n) if (0..=i64::from(i32::MAX)).contains(&n) => n as i32,
                    _ => return Err(format!("malformed diff: array length at {path}: {v:?}")),
                };
                m.truncate.push((path.to_owned(), len));
            }
            _ => {
                let (kind, index) = k.split_at(k.len().min(1));
                let index: usize = index
                    .parse()
                    .map_err(|_| format!("malformed diff: {k:?} in the array diff at {path}"))?;
                let elem = format!("{path}.{index}");
                match kind {
                    "u" => m.set.push((elem, v)),
                    "s" => sub_diff(section(v, k, path)?, &elem, m)?,
                    _ => {
                        return Err(format!("malformed diff: {k:?} in the array diff at {path}"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The change-stream form some servers log (`updatedFields` by dotted path, `removedFields`,
/// `truncatedArrays: [{field, newSize}]`).
fn description_diff<'a>(
    diff: &'a RawDocument,
    m: &mut Mods<'a>,
) -> std::result::Result<(), String> {
    for e in diff.iter() {
        let (k, v) = e.map_err(malformed)?;
        match (k, v) {
            ("updatedFields", RawBsonRef::Document(d)) => {
                for f in d.iter() {
                    let (path, val) = f.map_err(malformed)?;
                    if path.is_empty() {
                        return Err("malformed diff: an empty updated field".into());
                    }
                    m.set.push((path.to_owned(), val));
                }
            }
            ("removedFields", RawBsonRef::Array(a)) => {
                for f in a.into_iter() {
                    match f.map_err(malformed)? {
                        RawBsonRef::String(p) if !p.is_empty() => m.unset.push(p.to_owned()),
                        other => {
                            return Err(format!("malformed diff: removed field {other:?}"));
                        }
                    }
                }
            }
            ("truncatedArrays", RawBsonRef::Array(a)) => {
                for t in a.into_iter() {
                    let t = match t.map_err(malformed)? {
                        RawBsonRef::Document(t) => t,
                        other => {
                            return Err(format!("malformed diff: truncated array {other:?}"));
                        }
                    };
                    let field = t
                        .get_str("field")
                        .map_err(|_| "malformed diff: truncated array without field".to_owned())?;
                    let size = match t.get("newSize").map_err(malformed)? {
                        Some(RawBsonRef::Int32(n)) if n >= 0 => n,
                        Some(RawBsonRef::Int64(n)) if (0..=i64::from(i32::MAX)).contains(&n) => {
                            n as i32
                        }
                        other => {
                            return Err(format!(
                                "malformed diff: truncated array {field:?} newSize {other:?}"
                            ));
                        }
                    };
                    m.truncate.push((field.to_owned(), size));
                }
            }
            ("updatedFields" | "removedFields" | "truncatedArrays", _) => {
                return Err(format!("malformed diff: {k} has the wrong type"));
            }
            // disambiguatedPaths (change streams, 6.1+) only explains the paths above.
            ("disambiguatedPaths", _) => {}
            _ => return Err(format!("malformed diff: unknown field {k:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use mongodb::bson::{Document, doc, rawdoc};

    use super::*;

    fn mods(o: RawDocumentBuf) -> std::result::Result<Vec<Document>, String> {
        update_mods(&o).map(|v| v.iter().map(|d| d.to_document().unwrap()).collect())
    }

    #[test]
    fn which_system_collections_are_data() {
        assert_eq!(data_collection("m"), Some("m"));
        assert_eq!(data_collection("system.js"), Some("system.js"));
        assert_eq!(data_collection("system.buckets.weather"), Some("weather"));
        assert_eq!(data_collection("system.buckets."), None);
        assert_eq!(data_collection("system.views"), None);
        assert_eq!(data_collection("system.profile"), None);
    }

    #[test]
    fn a_logged_buckets_creation_becomes_the_timeseries_creation() {
        let logged = doc! {
            "create": "system.buckets.weather",
            "validator": {"$jsonSchema": {}},
            "clusteredIndex": true,
            "timeseries": {"timeField": "t", "metaField": "m", "granularity": "hours"},
            "expireAfterSeconds": 60_i64,
        };
        assert_eq!(
            timeseries_create("weather", &logged),
            doc! {
                "create": "weather",
                "timeseries": {"timeField": "t", "metaField": "m", "granularity": "hours"},
                "expireAfterSeconds": 60_i64,
            }
        );
    }

    #[test]
    fn replacements_and_legacy_operators() {
        assert_eq!(
            mods(rawdoc! {"_id": 1, "x": 2}).unwrap(),
            vec![doc! {"_id": 1, "x": 2}]
        );
        assert_eq!(
            mods(rawdoc! {"$v": 1, "$set": {"a.b": 1}, "$unset": {"c": true}}).unwrap(),
            vec![doc! {"$set": {"a.b": 1}, "$unset": {"c": true}}]
        );
        assert_eq!(
            mods(rawdoc! {"$set": {"a": 1}}).unwrap(),
            vec![doc! {"$set": {"a": 1}}]
        );
        assert!(
            mods(rawdoc! {"$set": {"a": 1}, "b": 2})
                .unwrap_err()
                .contains("mixes")
        );
        assert!(
            mods(rawdoc! {"$v": 3, "diff": {}})
                .unwrap_err()
                .contains("$v")
        );
        assert!(mods(rawdoc! {"$v": 2}).unwrap_err().contains("diff"));
    }

    #[test]
    fn document_diffs_become_dotted_modifiers() {
        // u: in place; i: moved to the end (unset first); d: removed; s: nested.
        let got = mods(rawdoc! {"$v": 2, "diff": {
            "d": {"gone": false},
            "u": {"x": 5},
            "i": {"new": "v"},
            "sa": {"u": {"b": 1}, "sc": {"d": {"e": false}}},
        }})
        .unwrap();
        assert_eq!(
            got,
            vec![
                doc! {"$unset": {"new": true}},
                doc! {"$set": {"x": 5, "new": "v", "a.b": 1}, "$unset": {"gone": true, "a.c.e": true}},
            ]
        );
    }

    #[test]
    fn array_diffs_set_elements_and_cut_lengths() {
        let got = mods(rawdoc! {"$v": 2, "diff": {
            "sarr": {"a": true, "l": 3, "u0": 7, "s2": {"u": {"k": 1}}},
            "snest": {"a": true, "s1": {"a": true, "u4": "x"}},
        }})
        .unwrap();
        assert_eq!(
            got,
            vec![
                doc! {"$set": {"arr.0": 7, "arr.2.k": 1, "nest.1.4": "x"}},
                doc! {"$push": {"arr": {"$each": [], "$slice": 3}}},
            ]
        );
        // A pop: only the length.
        assert_eq!(
            mods(rawdoc! {"$v": 2, "diff": {"sarr": {"a": true, "l": 0}}}).unwrap(),
            vec![doc! {"$push": {"arr": {"$each": [], "$slice": 0}}}]
        );
    }

    #[test]
    fn change_stream_diffs() {
        let got = mods(rawdoc! {"$v": 2, "diff": {
            "updatedFields": {"a.b": 9, "a.c.3": 4},
            "removedFields": ["n"],
            "truncatedArrays": [{"field": "a.c", "newSize": 4}],
        }})
        .unwrap();
        assert_eq!(
            got,
            vec![
                doc! {"$push": {"a.c": {"$each": [], "$slice": 4}}},
                doc! {"$set": {"a.b": 9, "a.c.3": 4}, "$unset": {"n": true}},
            ]
        );
        let empty = rawdoc! {"$v": 2, "diff": {"updatedFields": {}, "removedFields": [], "truncatedArrays": []}};
        assert!(mods(empty).unwrap().is_empty());
    }

    #[test]
    fn malformed_diffs_are_refused() {
        for (diff, want) in [
            (rawdoc! {"x": {}}, "unknown section"),
            (rawdoc! {"u": 1}, "not a document"),
            (rawdoc! {"sarr": {"a": true, "q1": 1}}, "\"q1\""),
            (rawdoc! {"sarr": {"a": true, "ux": 1}}, "\"ux\""),
            (rawdoc! {"sarr": {"a": true, "l": -1}}, "length"),
            (rawdoc! {"sarr": {"a": false}}, "header"),
            (rawdoc! {"b": {"f": {}}}, "binary"),
            (rawdoc! {"u": {"a.b": 1}}, "cannot address"),
            (
                rawdoc! {"updatedFields": [], "removedFields": []},
                "wrong type",
            ),
            (rawdoc! {"removedFields": [1]}, "removed field"),
            (rawdoc! {"truncatedArrays": [{"field": "a"}]}, "newSize"),
        ] {
            let err = mods(rawdoc! {"$v": 2, "diff": diff.clone()}).unwrap_err();
            assert!(err.contains(want), "{diff:?}: {err}");
        }
    }

    #[test]
    fn write_commands_are_well_formed() {
        let items = vec![rawdoc! {"_id": 1}, rawdoc! {"_id": 2, "s": "x"}];
        let cmd = write_command("insert", "things", "documents", &items);
        assert_eq!(
            cmd.to_document().unwrap(),
            doc! {"insert": "things", "documents": [{"_id": 1}, {"_id": 2, "s": "x"}], "ordered": true}
        );
        let empty = write_command("delete", "c", "deletes", &[]);
        assert_eq!(
            empty.to_document().unwrap(),
            doc! {"delete": "c", "deletes": [], "ordered": true}
        );
    }

    #[test]
    fn timestamps_and_transactions_are_read() {
        let e = rawdoc! {"ts": Timestamp { time: 5, increment: 2 }, "lsid": {"id": 1}, "txnNumber": 3_i64};
        assert_eq!(
            entry_ts(&e),
            Some(Timestamp {
                time: 5,
                increment: 2
            })
        );
        assert_eq!(txn_key(&e).map(|k| k.1), Some(3));
        assert_eq!(entry_ts(&rawdoc! {"ts": 1}), None);
        assert_eq!(txn_key(&rawdoc! {"txnNumber": 1}), None);
    }
}
