//! Oplog replay (`engine::mongodb::oplog::Applier`) against real servers: a workload's oplog
//! on server A replayed onto an empty server B gives the same collections, documents, options
//! and indexes, and again when replayed twice; mongod's own entry formats (doc_diff updates,
//! applyOps transactions, two-phase index builds) synthesized as BSON; bad entries stop the
//! replay with one line naming the entry's timestamp.

use std::time::Instant;

use dbkeeper::engine::mongodb::Filter;
use dbkeeper::engine::mongodb::oplog::{Applier, entry_ts};
use futures_util::TryStreamExt;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document, RawDocumentBuf, Timestamp, doc};
use mongodb::options::{IndexOptions, ReturnDocument};
use mongodb::{Collection, IndexModel};

use crate::common::mongodb::Mongo;

fn all() -> Filter {
    Filter::new(&[], &[]).unwrap()
}

/// Every entry of a server's oplog, in timestamp order.
fn oplog(m: &Mongo) -> Vec<RawDocumentBuf> {
    let c = m
        .client()
        .database("local")
        .collection::<RawDocumentBuf>("oplog.rs");
    let mut v: Vec<RawDocumentBuf> =
        m.block(async { c.find(doc! {}).await.unwrap().try_collect().await.unwrap() });
    v.sort_by_key(|e| entry_ts(e).map(|t| (t.time, t.increment)));
    v
}

fn replay(m: &Mongo, entries: &[RawDocumentBuf], filter: Filter) -> dbkeeper::Result<u64> {
    m.block(async {
        let mut a = Applier::new(m.client().clone(), filter);
        for e in entries {
            a.apply(e).await?;
        }
        a.flush().await?;
        Ok(a.applied())
    })
}

/// Documents of a collection sorted by `_id`, as raw bytes (so field order counts).
fn docs_by_id(m: &Mongo, db: &str, coll: &str) -> Vec<Vec<u8>> {
    let c = m.client().database(db).collection::<RawDocumentBuf>(coll);
    m.block(async {
        c.find(doc! {})
            .sort(doc! {"_id": 1})
            .await
            .unwrap()
            .map_ok(|d| d.into_bytes())
            .try_collect()
            .await
            .unwrap()
    })
}

/// A collection as compared: namespace, `listCollections` entry, documents, indexes.
type Collected = (String, Document, Vec<Vec<u8>>, Vec<Document>);

/// What replay must reproduce: per user database, each collection's `listCollections` entry
/// (type, options), documents and indexes.
fn snapshot(m: &Mongo) -> Vec<Collected> {
    let mut out = Vec::new();
    for db in m.databases() {
        for (name, spec) in m.collections(&db) {
            if name.starts_with("system.") {
                continue;
            }
            let view = spec.get_str("type") == Ok("view");
            let docs = if view {
                Vec::new()
            } else {
                docs_by_id(m, &db, &name)
            };
            let indexes = if view {
                Vec::new()
            } else {
                m.indexes(&db, &name)
            };
            out.push((format!("{db}.{name}"), spec, docs, indexes));
        }
    }
    out
}

#[track_caller]
fn assert_same(a: &Mongo, b: &Mongo) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let names = |s: &[Collected]| s.iter().map(|c| c.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&sa), names(&sb), "collections");
    for (ca, cb) in sa.iter().zip(&sb) {
        assert_eq!(ca.1, cb.1, "{}: listCollections", ca.0);
        assert_eq!(ca.3, cb.3, "{}: indexes", ca.0);
        let show = |d: &[Vec<u8>]| -> Vec<Document> {
            d.iter()
                .map(|b| {
                    RawDocumentBuf::from_bytes(b.clone())
                        .unwrap()
                        .to_document()
                        .unwrap()
                })
                .collect()
        };
        assert!(
            ca.2 == cb.2,
            "{}: documents differ\nA: {:?}\nB: {:?}",
            ca.0,
            show(&ca.2),
            show(&cb.2)
        );
    }
}

/// Inserts, replacements, operator and pipeline updates (nested fields, arrays), deletes,
/// collection and index DDL, a rename over an existing target, a dropped database, a view,
/// and a committed and an aborted transaction.
fn workload(m: &Mongo) {
    let db = m.client().database("app");
    let things: Collection<Document> = db.collection("things");
    m.block(async {
        let docs: Vec<Document> = (0..300)
            .map(|i| {
                doc! {"_id": i, "n": i, "s": format!("s{i}"), "a": {"b": i, "c": [1, 2, 3, {"k": i}]},
                "tags": ["x", "y"]}
            })
            .collect();
        things.insert_many(docs).await.unwrap();
        things
            .replace_one(doc! {"_id": 0}, doc! {"replaced": true, "v": [1, {"w": 2}]})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 1}, doc! {"$set": {"a.b": "nested", "new": {"deep": 1}}, "$unset": {"n": ""}})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 2}, doc! {"$push": {"a.c": 4, "tags": {"$each": ["z"], "$position": 0}}})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 3}, doc! {"$pop": {"a.c": 1}})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 4}, doc! {"$pull": {"tags": "x"}})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 5}, doc! {"$set": {"a.c.3.k": "deep", "a.c.0": 10, "tags.5": "pad"}})
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 6}, doc! {"$rename": {"s": "renamed_s"}, "$inc": {"n": 1}})
            .await
            .unwrap();
        things
            .update_one(
                doc! {"_id": 7},
                vec![doc! {"$set": {"sum": {"$add": ["$n", 100]}}}, doc! {"$unset": "tags"}],
            )
            .await
            .unwrap();
        things
            .update_many(doc! {"_id": {"$lt": 50}}, doc! {"$inc": {"counter": 1}})
            .await
            .unwrap();
        things
            .find_one_and_update(doc! {"_id": 8}, doc! {"$addToSet": {"tags": "q"}})
            .return_document(ReturnDocument::After)
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 1000}, doc! {"$set": {"upserted": 1}})
            .upsert(true)
            .await
            .unwrap();
        things
            .delete_many(doc! {"_id": {"$gte": 250, "$lt": 260}})
            .await
            .unwrap();
        things.delete_one(doc! {"_id": 9}).await.unwrap();
        // The same _id inserted again after its delete.
        things
            .insert_one(doc! {"_id": 9, "again": true})
            .await
            .unwrap();

        db.run_command(doc! {"create": "capped", "capped": true, "size": 65536})
            .await
            .unwrap();
        let capped: Collection<Document> = db.collection("capped");
        for i in 0..20 {
            capped.insert_one(doc! {"i": i}).await.unwrap();
        }
        db.run_command(doc! {"create": "valid", "validator": {"x": {"$type": "int"}}})
            .await
            .unwrap();
        db.collection::<Document>("valid")
            .insert_one(doc! {"x": 1})
            .await
            .unwrap();
        db.run_command(doc! {"collMod": "valid", "validator": {"x": {"$type": "number"}}})
            .await
            .unwrap();

        things
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"s": 1})
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .sparse(true)
                            .name("s_u".to_owned())
                            .build(),
                    )
                    .build(),
            )
            .await
            .unwrap();
        things
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"n": -1, "a.b": 1})
                    .options(IndexOptions::builder().sparse(true).build())
                    .build(),
            )
            .await
            .unwrap();
        things
            .create_index(IndexModel::builder().keys(doc! {"tags": 1}).build())
            .await
            .unwrap();
        things.drop_index("tags_1").await.unwrap();
        db.run_command(doc! {"dropIndexes": "things", "index": {"n": -1, "a.b": 1}})
            .await
            .unwrap();
        things
            .create_index(IndexModel::builder().keys(doc! {"counter": 1}).build())
            .await
            .unwrap();

        // Renames: to a new name, then over an existing target.
        let other: Collection<Document> = db.collection("other");
        other
            .insert_many(vec![doc! {"_id": 1, "o": 1}, doc! {"_id": 2, "o": 2}])
            .await
            .unwrap();
        m.client()
            .database("admin")
            .run_command(doc! {"renameCollection": "app.other", "to": "app.moved"})
            .await
            .unwrap();
        db.collection::<Document>("target")
            .insert_one(doc! {"_id": "old"})
            .await
            .unwrap();
        m.client()
            .database("admin")
            .run_command(doc! {"renameCollection": "app.moved", "to": "app.target", "dropTarget": true})
            .await
            .unwrap();
        db.collection::<Document>("target")
            .update_one(doc! {"_id": 1}, doc! {"$set": {"after_rename": true}})
            .await
            .unwrap();
        db.collection::<Document>("temp")
            .insert_one(doc! {"t": 1})
            .await
            .unwrap();
        db.collection::<Document>("temp").drop().await.unwrap();
        db.run_command(doc! {"create": "view", "viewOn": "things", "pipeline": [{"$match": {"n": {"$gt": 5}}}]})
            .await
            .unwrap();

        let gone = m.client().database("gone");
        gone.collection::<Document>("x")
            .insert_one(doc! {"x": 1})
            .await
            .unwrap();
        gone.drop().await.unwrap();
        m.client()
            .database("second")
            .collection::<Document>("c")
            .insert_one(doc! {"_id": "kept"})
            .await
            .unwrap();

        let mut s = m.client().start_session().await.unwrap();
        s.start_transaction().await.unwrap();
        things
            .insert_one(doc! {"_id": 2000, "txn": 1})
            .session(&mut s)
            .await
            .unwrap();
        things
            .update_one(doc! {"_id": 2000}, doc! {"$set": {"txn": 2}})
            .session(&mut s)
            .await
            .unwrap();
        things
            .delete_one(doc! {"_id": 10})
            .session(&mut s)
            .await
            .unwrap();
        s.commit_transaction().await.unwrap();
        s.start_transaction().await.unwrap();
        things
            .insert_one(doc! {"_id": 3000, "aborted": true})
            .session(&mut s)
            .await
            .unwrap();
        s.abort_transaction().await.unwrap();
    });
}

#[test]
fn replay_reproduces_a_workload_and_is_idempotent() {
    let a = Mongo::start(false, false);
    workload(&a);
    let entries = oplog(&a);
    assert!(entries.len() > 300, "{} oplog entries", entries.len());

    let b = Mongo::start(false, false);
    let applied = replay(&b, &entries, all()).unwrap();
    assert!(applied > 300, "applied {applied}");
    assert_same(&a, &b);
    assert_eq!(
        b.indexes("app", "things")
            .iter()
            .map(|i| i.get_str("name").unwrap().to_owned())
            .collect::<Vec<_>>(),
        ["_id_", "counter_1", "s_u"]
    );

    // Again over the result: every entry overlaps data already there.
    replay(&b, &entries, all()).unwrap();
    assert_same(&a, &b);

    // From the middle onwards, over the final data (a dump taken while writes went on).
    replay(&b, &entries[entries.len() / 2..], all()).unwrap();
    assert_same(&a, &b);
}

#[test]
fn replay_follows_the_filter() {
    let a = Mongo::start(false, false);
    workload(&a);
    let entries = oplog(&a);
    let b = Mongo::start(false, false);
    let only = Filter::new(&["app".into()], &["app.capped".into()]).unwrap();
    replay(&b, &entries, only).unwrap();
    assert_eq!(b.databases(), ["app"]);
    let names: Vec<String> = b.collections("app").into_iter().map(|c| c.0).collect();
    assert!(!names.contains(&"capped".to_owned()), "{names:?}");
    assert!(names.contains(&"things".to_owned()), "{names:?}");
    assert_eq!(
        docs_by_id(&a, "app", "things"),
        docs_by_id(&b, "app", "things")
    );
}

fn ts(i: u32) -> Timestamp {
    Timestamp {
        time: 1_700_000_000,
        increment: i,
    }
}

fn lsid(n: u8) -> Document {
    doc! {"id": Binary { subtype: BinarySubtype::Uuid, bytes: vec![n; 16] }, "uid": Binary { subtype: BinarySubtype::Generic, bytes: vec![7; 32] }}
}

fn entry(i: u32, op: &str, ns: &str, o: Document) -> RawDocumentBuf {
    raw(
        doc! {"op": op, "ns": ns, "o": o, "ts": ts(i), "v": 2_i64, "wall": mongodb::bson::DateTime::now()},
    )
}

fn raw(d: Document) -> RawDocumentBuf {
    RawDocumentBuf::from_document(&d).unwrap()
}

fn with(mut e: RawDocumentBuf, key: &str, v: impl Into<Bson>) -> RawDocumentBuf {
    let mut d = e.to_document().unwrap();
    d.insert(key, v.into());
    e = raw(d);
    e
}

#[track_caller]
fn assert_docs(m: &Mongo, coll: &str, want: Vec<Document>) {
    let got = docs_by_id(m, "app", coll);
    let want_bytes: Vec<Vec<u8>> = want.iter().map(|d| raw(d.clone()).into_bytes()).collect();
    let show: Vec<Document> = got
        .iter()
        .map(|b| {
            RawDocumentBuf::from_bytes(b.clone())
                .unwrap()
                .to_document()
                .unwrap()
        })
        .collect();
    assert!(
        got == want_bytes,
        "app.{coll}\n got: {show:?}\nwant: {want:?}"
    );
}

/// Entries as mongod writes them (5.0+): doc_diff updates, applyOps transactions (plain,
/// partialTxn chains, prepared then committed or aborted), two-phase index builds, a rename
/// whose dropTarget is the target's UUID.
#[test]
fn mongod_entry_formats() {
    let m = Mongo::start(false, false);
    let uuid = Binary {
        subtype: BinarySubtype::Uuid,
        bytes: vec![1; 16],
    };
    let u = |i, id: i32, o: Document| with(entry(i, "u", "app.m", o), "o2", doc! {"_id": id});
    // One applier throughout: transactions span calls.
    let mut ap = Applier::new(m.client().clone(), all());
    let mut step = |entries: Vec<RawDocumentBuf>| {
        m.block(async {
            let before = ap.applied();
            for e in &entries {
                ap.apply(e).await.unwrap();
            }
            ap.flush().await.unwrap();
            ap.applied() - before
        })
    };

    step(vec![
        entry(
            1,
            "c",
            "app.$cmd",
            doc! {"create": "m", "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}},
        ),
        entry(
            2,
            "i",
            "app.m",
            doc! {"_id": 1, "a": {"b": 1, "c": [1, 2, 3, {"k": 1}]}, "x": 1, "y": 2},
        ),
        u(
            3,
            1,
            doc! {"$v": 2, "diff": {
                "d": {"y": false},
                "u": {"x": 5},
                "i": {"z": 1},
                "sa": {"u": {"b": 2}, "sc": {"a": true, "u0": 9, "s3": {"u": {"k": 2}}}},
            }},
        ),
    ]);
    assert_docs(
        &m,
        "m",
        vec![doc! {"_id": 1, "a": {"b": 2, "c": [9, 2, 3, {"k": 2}]}, "x": 5, "z": 1}],
    );

    // Cut an array; insert an existing field (mongod moves it to the end); grow an array
    // past its end (padded with nulls); a legacy $v:1 update.
    step(vec![
        u(
            4,
            1,
            doc! {"$v": 2, "diff": {"sa": {"sc": {"a": true, "l": 2}}}},
        ),
        u(5, 1, doc! {"$v": 2, "diff": {"i": {"x": 6}}}),
        u(
            6,
            1,
            doc! {"$v": 2, "diff": {"sa": {"sc": {"a": true, "u3": "new"}}}},
        ),
        u(
            7,
            1,
            doc! {"$v": 1, "$set": {"legacy": true}, "$unset": {"z": true}},
        ),
    ]);
    assert_docs(
        &m,
        "m",
        vec![
            doc! {"_id": 1, "a": {"b": 2, "c": [9, 2, Bson::Null, "new"]}, "x": 6, "legacy": true},
        ],
    );

    // A plain transaction commit: applyOps on admin.$cmd.
    let txn = |i, n: i64, o: Document| {
        with(
            with(entry(i, "c", "admin.$cmd", o), "lsid", lsid(1)),
            "txnNumber",
            n,
        )
    };
    let inner = |op: &str, o: Document| doc! {"op": op, "ns": "app.m", "ui": uuid.clone(), "o": o};
    let inner_u = |id: i32, o: Document| {
        let mut d = inner("u", o);
        d.insert("o2", doc! {"_id": id});
        d
    };
    step(vec![txn(
        10,
        1,
        doc! {"applyOps": [
            inner("i", doc! {"_id": 2, "t": 0}),
            inner_u(2, doc! {"$v": 2, "diff": {"u": {"t": 1}}}),
            inner("d", doc! {"_id": 1}),
        ]},
    )]);
    assert_docs(&m, "m", vec![doc! {"_id": 2, "t": 1}]);

    // A transaction in several entries: nothing until the last one.
    step(vec![
        txn(
            11,
            2,
            doc! {"applyOps": [inner("i", doc! {"_id": 3})], "partialTxn": true},
        ),
        entry(12, "i", "app.m", doc! {"_id": 4}),
        txn(
            13,
            2,
            doc! {"applyOps": [inner("i", doc! {"_id": 5})], "partialTxn": true},
        ),
    ]);
    assert_docs(&m, "m", vec![doc! {"_id": 2, "t": 1}, doc! {"_id": 4}]);
    step(vec![txn(
        14,
        2,
        doc! {"applyOps": [inner_u(3, doc! {"$v": 2, "diff": {"i": {"late": 1}}})], "count": 3_i64},
    )]);
    assert_docs(
        &m,
        "m",
        vec![
            doc! {"_id": 2, "t": 1},
            doc! {"_id": 3, "late": 1},
            doc! {"_id": 4},
            doc! {"_id": 5},
        ],
    );

    // Prepared: applied at commitTransaction, dropped at abortTransaction.
    step(vec![
        txn(
            20,
            3,
            doc! {"applyOps": [inner("i", doc! {"_id": 6})], "prepare": true},
        ),
        txn(
            21,
            4,
            doc! {"applyOps": [inner("i", doc! {"_id": 7})], "prepare": true},
        ),
    ]);
    assert_eq!(docs_by_id(&m, "app", "m").len(), 4);
    step(vec![
        txn(
            22,
            3,
            doc! {"commitTransaction": 1, "commitTimestamp": ts(20)},
        ),
        txn(23, 4, doc! {"abortTransaction": 1}),
    ]);
    let ids: Vec<Document> = docs_by_id(&m, "app", "m")
        .into_iter()
        .map(|b| {
            RawDocumentBuf::from_bytes(b)
                .unwrap()
                .to_document()
                .unwrap()
        })
        .collect();
    assert!(
        ids.contains(&doc! {"_id": 6}) && !ids.contains(&doc! {"_id": 7}),
        "{ids:?}"
    );

    // Indexes: mongod's single-spec createIndexes, a two-phase build, dropIndexes by key.
    step(vec![
        entry(
            30,
            "c",
            "app.$cmd",
            doc! {"createIndexes": "m", "v": 2, "key": {"t": 1}, "name": "t_1", "sparse": true},
        ),
        entry(
            31,
            "c",
            "app.$cmd",
            doc! {"startIndexBuild": "m", "indexBuildUUID": uuid.clone(), "indexes": [{"v": 2, "key": {"late": -1}, "name": "late_-1"}]},
        ),
        entry(
            32,
            "c",
            "app.$cmd",
            doc! {"commitIndexBuild": "m", "indexBuildUUID": uuid.clone(), "indexes": [{"v": 2, "key": {"late": -1}, "name": "late_-1"}]},
        ),
        entry(
            33,
            "c",
            "app.$cmd",
            doc! {"createIndexes": "m", "v": 2, "key": {"gone": 1}, "name": "gone_1"},
        ),
        entry(
            34,
            "c",
            "app.$cmd",
            doc! {"dropIndexes": "m", "index": {"gone": 1}},
        ),
        entry(
            35,
            "c",
            "app.$cmd",
            doc! {"dropIndexes": "m", "index": "never_there"},
        ),
    ]);
    let names: Vec<String> = m
        .indexes("app", "m")
        .iter()
        .map(|i| i.get_str("name").unwrap().to_owned())
        .collect();
    assert_eq!(names, ["_id_", "late_-1", "t_1"]);
    assert_eq!(m.indexes("app", "m")[2].get_bool("sparse"), Ok(true));

    // A rename whose dropTarget is the dropped target's UUID; no-ops and the server's own
    // namespaces are skipped, and not counted.
    let applied = step(vec![
        entry(40, "i", "app.src", doc! {"_id": 1}),
        entry(41, "i", "app.dst", doc! {"_id": "old"}),
        entry(
            42,
            "c",
            "app.$cmd",
            doc! {"renameCollection": "app.src", "to": "app.dst", "stayTemp": false, "dropTarget": uuid.clone()},
        ),
        entry(43, "n", "", doc! {"msg": "periodic noop"}),
        entry(
            44,
            "i",
            "admin.system.users",
            doc! {"_id": "admin.x", "user": "x"},
        ),
        entry(45, "i", "config.transactions", doc! {"_id": 1}),
        entry(46, "i", "app.system.views", doc! {"_id": "app.v"}),
        entry(47, "c", "local.$cmd", doc! {"create": "x"}),
        entry(48, "c", "app.$cmd", doc! {"dbCheck": "m"}),
    ]);
    assert_eq!(applied, 3);
    assert_docs(&m, "dst", vec![doc! {"_id": 1}]);
    assert!(!m.collections("app").iter().any(|c| c.0 == "src"));
    assert_eq!(m.databases(), ["app"]);

    // dropDatabase; collMod; a drop of what is not there.
    step(vec![
        entry(50, "i", "other.c", doc! {"_id": 1}),
        entry(51, "c", "other.$cmd", doc! {"dropDatabase": 1}),
        entry(
            52,
            "c",
            "app.$cmd",
            doc! {"collMod": "m", "validator": {"t": {"$exists": true}}},
        ),
        entry(53, "c", "app.$cmd", doc! {"drop": "never_there"}),
        entry(54, "c", "app.$cmd", doc! {"drop": "dst"}),
    ]);
    assert_eq!(m.databases(), ["app"]);
    let m_spec = m
        .collections("app")
        .into_iter()
        .find(|c| c.0 == "m")
        .unwrap()
        .1;
    assert_eq!(
        m_spec
            .get_document("options")
            .unwrap()
            .get_document("validator"),
        Ok(&doc! {"t": {"$exists": true}})
    );
    assert!(!m.collections("app").iter().any(|c| c.0 == "dst"));
}

#[track_caller]
/// The `system.*` collections a dump carries are replayed; the others are counted, not
/// silently dropped.
#[test]
fn system_js_is_replayed_and_server_metadata_is_counted() {
    let m = Mongo::start(false, false);
    let f = doc! {"_id": "add", "value": "function (a, b) { return a + b; }"};
    let entries = vec![
        entry(1, "i", "app.system.js", f.clone()),
        entry(
            2,
            "i",
            "app.system.views",
            doc! {"_id": "app.v", "viewOn": "m", "pipeline": []},
        ),
        entry(3, "i", "app.m", doc! {"_id": 1}),
    ];
    let (applied, skipped) = m.block(async {
        let mut a = Applier::new(m.client().clone(), all());
        for e in &entries {
            a.apply(e).await.unwrap();
        }
        a.flush().await.unwrap();
        (a.applied(), a.skipped_system().clone())
    });
    assert_eq!(applied, 2);
    assert_eq!(
        skipped.into_iter().collect::<Vec<_>>(),
        vec![("app.system.views".to_owned(), 1)]
    );
    assert_docs(&m, "system.js", vec![f]);
    assert_docs(&m, "m", vec![doc! {"_id": 1}]);
    // A filter that leaves system.js out leaves it out; that is no metadata skip.
    let m2 = Mongo::start(false, false);
    let only_m = Filter::new(&["app.m".to_owned()], &[]).unwrap();
    let (applied, skipped) = m2.block(async {
        let mut a = Applier::new(m2.client().clone(), only_m);
        a.apply(&entries[0]).await.unwrap();
        a.flush().await.unwrap();
        (a.applied(), a.skipped_system().len())
    });
    assert_eq!((applied, skipped), (0, 0));
}

fn replay_err(m: &Mongo, entries: Vec<RawDocumentBuf>) -> String {
    let e = replay(m, &entries, all()).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn bad_entries_stop_with_the_entry_named() {
    let m = Mongo::start(false, false);
    let e = replay_err(&m, vec![entry(1, "x", "app.m", doc! {"_id": 1})]);
    assert!(
        e.contains("oplog entry 1700000000:1 (x on app.m): unknown op type \"x\""),
        "{e}"
    );

    let bad = with(
        entry(
            2,
            "u",
            "app.m",
            doc! {"$v": 2, "diff": {"sa": {"a": true, "zz": 1}}},
        ),
        "o2",
        doc! {"_id": 1},
    );
    let e = replay_err(&m, vec![bad]);
    assert!(
        e.contains("oplog entry 1700000000:2 (u on app.m): malformed diff"),
        "{e}"
    );

    let e = replay_err(
        &m,
        vec![entry(3, "c", "app.$cmd", doc! {"frobnicate": "m"})],
    );
    assert!(
        e.contains(
            "oplog entry 1700000000:3 (c on app.$cmd): command \"frobnicate\" cannot be replayed"
        ),
        "{e}"
    );

    let commit = with(
        with(
            entry(4, "c", "admin.$cmd", doc! {"commitTransaction": 1}),
            "lsid",
            lsid(9),
        ),
        "txnNumber",
        1_i64,
    );
    let e = replay_err(&m, vec![commit]);
    assert!(
        e.contains("1700000000:4") && e.contains("prepare entry was not replayed"),
        "{e}"
    );

    let mut no_ts = entry(5, "i", "app.m", doc! {"_id": 1})
        .to_document()
        .unwrap();
    no_ts.remove("ts");
    let e = replay_err(&m, vec![raw(no_ts)]);
    assert!(e.contains("without a timestamp (i on app.m)"), "{e}");

    // A server error, found when the batch is sent, names the entry it comes from (the third
    // of its batch) and nothing after it is applied.
    let e = replay_err(
        &m,
        vec![
            entry(10, "i", "app.m", doc! {"_id": 1, "a": 5}),
            with(
                entry(11, "u", "app.m", doc! {"$v": 2, "diff": {"u": {"ok": 1}}}),
                "o2",
                doc! {"_id": 1},
            ),
            with(
                entry(
                    12,
                    "u",
                    "app.m",
                    doc! {"$v": 2, "diff": {"sa": {"u": {"b": 1}}}},
                ),
                "o2",
                doc! {"_id": 1},
            ),
            with(
                entry(
                    13,
                    "u",
                    "app.m",
                    doc! {"$v": 2, "diff": {"u": {"after": 1}}},
                ),
                "o2",
                doc! {"_id": 1},
            ),
        ],
    );
    assert!(
        e.contains("oplog entry 1700000000:12 (u on app.m): code 28"),
        "{e}"
    );
    assert_docs(&m, "m", vec![doc! {"_id": 1, "a": 5, "ok": 1}]);

    // A duplicate on a unique index other than _id is not "already applied".
    let e = replay_err(
        &m,
        vec![
            entry(
                20,
                "c",
                "app.$cmd",
                doc! {"createIndexes": "m", "indexes": [{"v": 2, "key": {"u": 1}, "name": "u_1", "unique": true}]},
            ),
            entry(21, "i", "app.m", doc! {"_id": 2, "u": 1}),
            entry(22, "i", "app.m", doc! {"_id": 3, "u": 1}),
        ],
    );
    assert!(
        e.contains("oplog entry 1700000000:22 (i on app.m): code 11000"),
        "{e}"
    );
}

/// Replay throughput against pymongo's ordered `bulk_write` of the same operations (the
/// issue asks for at least 0.9×). Needs `DBKEEPER_TEST_PYTHON` with pymongo; run with
/// `cargo test --test it -- --ignored oplog_replay_throughput --nocapture`.
#[test]
#[ignore]
fn oplog_replay_throughput() {
    let n: usize = std::env::var("DBKEEPER_OPLOG_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let python = std::env::var("DBKEEPER_TEST_PYTHON").expect("DBKEEPER_TEST_PYTHON");
    let a = Mongo::start(false, false);
    let script = r#"
import random, sys, time
import pymongo
from pymongo import InsertOne, UpdateOne, DeleteOne, ReplaceOne
uri, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
c = pymongo.MongoClient(uri)
coll = c.bench.ops
ops, live, next_id = [], [], 0
for _ in range(n):
    r = rng.random()
    if r < 0.5 or len(live) < 100:
        ops.append(InsertOne({"_id": next_id, "name": "user%d" % next_id, "n": next_id,
                              "tags": ["a", "b"], "addr": {"city": "c%d" % (next_id % 97), "zip": next_id}}))
        live.append(next_id); next_id += 1
    elif r < 0.75:
        i = live[rng.randrange(len(live))]
        ops.append(UpdateOne({"_id": i}, {"$set": {"addr.city": "x%d" % rng.randrange(1000), "seen": True}, "$inc": {"n": 1}}))
    elif r < 0.85:
        i = live[rng.randrange(len(live))]
        ops.append(UpdateOne({"_id": i}, {"$push": {"tags": "t"}}))
    elif r < 0.9:
        i = live[rng.randrange(len(live))]
        ops.append(ReplaceOne({"_id": i}, {"replaced": rng.randrange(1000)}))
    else:
        k = rng.randrange(len(live)); i = live[k]; live[k] = live[-1]; live.pop()
        ops.append(DeleteOne({"_id": i}))
coll.insert_one({"_id": -1}); coll.delete_one({"_id": -1})
t = time.perf_counter()
coll.bulk_write(ops, ordered=True)
print(time.perf_counter() - t)
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script, &a.uri(), &n.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bulk_s: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let entries: Vec<RawDocumentBuf> = oplog(&a)
        .into_iter()
        .filter(|e| e.get_str("ns").is_ok_and(|ns| ns.starts_with("bench.")))
        .collect();

    let b = Mongo::start(false, false);
    b.command("bench", doc! {"create": "ops"});
    let started = Instant::now();
    let applied = replay(&b, &entries, all()).unwrap();
    let replay_s = started.elapsed().as_secs_f64();
    assert_eq!(
        docs_by_id(&a, "bench", "ops"),
        docs_by_id(&b, "bench", "ops")
    );
    println!(
        "oplog replay: {} entries ({applied} applied) in {replay_s:.2}s; pymongo bulk_write of {n} ops in {bulk_s:.2}s; throughput ratio {:.2}",
        entries.len(),
        bulk_s / replay_s * entries.len() as f64 / n as f64
    );
}
