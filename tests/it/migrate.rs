//! Schema migrations against real servers: apply, re-run, new and edited files, repair,
//! out-of-order and missing files, the pre-migration set and its restore, two migrators at
//! once, golang-migrate's MongoDB files, and `init` running them.

use std::path::Path;
use std::process::{Command, Output};

use mongodb::bson::{Document, doc};

use crate::common::mongodb::Mongo;
use crate::common::redis::RedisServer;
use crate::common::{assert_code, dbkeeper, run, sets, stderr, stdout};

fn mongo_uri(m: &Mongo) -> String {
    m.uri().replacen("/?", "/app?", 1)
}

fn with_mongo(repo: &Path, m: &Mongo, dir: &Path) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_MONGODB_URI", mongo_uri(m))
        .env("DBKEEPER_MIGRATIONS", dir);
    c
}

fn with_redis(repo: &Path, r: &RedisServer, dir: &Path) -> Command {
    let mut c = dbkeeper(repo);
    c.env("DBKEEPER_REDIS_URL", r.url())
        .env("DBKEEPER_MIGRATIONS", dir);
    c
}

fn write(dir: &Path, engine: &str, name: &str, body: &str) {
    let d = dir.join(engine);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), body).unwrap();
}

fn migrate(c: &mut Command, args: &[&str]) -> Output {
    run(c.arg("migrate").args(args))
}

#[track_caller]
fn assert_fails_naming(o: &Output, code: i32, names: &[&str]) {
    assert_code(o, code);
    let err = stderr(o);
    for n in names {
        assert!(err.contains(n), "stderr does not name {n}:\n{err}");
    }
}

fn info_line<'a>(out: &'a str, engine: &str, version: &str) -> &'a str {
    out.lines()
        .find(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some(engine) && w.next() == Some(version)
        })
        .unwrap_or_else(|| panic!("no {engine} {version} in\n{out}"))
}

#[test]
fn redis_apply_rerun_new_edited_out_of_order_missing() {
    let r = RedisServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    write(
        dir,
        "redis",
        "V1__seed.redis",
        "# the first keys\nSET app:greeting \"hello world\"\nINCR app:runs\n",
    );
    write(
        dir,
        "redis",
        "V2__more.redis",
        "SELECT 3\nSET other 'x y'\nINCR app:runs\n",
    );
    let o = migrate(&mut with_redis(repo, &r, dir), &[]);
    assert_code(&o, 0);
    assert_eq!(r.cli(&["GET", "app:greeting"]), "hello world");
    assert_eq!(r.cli(&["-n", "3", "GET", "other"]), "x y");
    assert_eq!(r.cli(&["-n", "3", "GET", "app:runs"]), "1");
    // The database held nothing before: no pre-migration set was needed.
    assert!(sets(repo).is_empty());

    // Nothing to do the second time.
    assert_code(&migrate(&mut with_redis(repo, &r, dir), &[]), 0);
    assert_eq!(r.cli(&["GET", "app:runs"]), "1");

    // A new file: only it runs, after a pre-migration set.
    write(dir, "redis", "V3__third.redis", "INCR app:runs\n");
    assert_code(&migrate(&mut with_redis(repo, &r, dir), &[]), 0);
    assert_eq!(r.cli(&["GET", "app:runs"]), "2");
    let s = sets(repo);
    assert_eq!(s.len(), 1);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join(&s[0]).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["schema"]["pre_migration"]["redis"]["from"], "2");
    assert_eq!(m["schema"]["pre_migration"]["redis"]["to"], "3");
    assert_eq!(m["schema_version"], "2");

    // An applied file edited: refused until repair.
    write(dir, "redis", "V1__seed.redis", "SET app:greeting changed\n");
    let o = migrate(&mut with_redis(repo, &r, dir), &[]);
    assert_fails_naming(&o, 1, &["V1__seed.redis", "repair"]);
    let o = run(with_redis(repo, &r, dir).args(["migrate", "info"]));
    assert_code(&o, 0);
    assert!(info_line(&stdout(&o), "redis", "1").contains("checksum changed"));
    assert_code(
        &run(with_redis(repo, &r, dir).args(["migrate", "repair"])),
        0,
    );
    assert_code(&migrate(&mut with_redis(repo, &r, dir), &[]), 0);
    assert_eq!(r.cli(&["GET", "app:greeting"]), "hello world");

    // Out of order: refused, then accepted with the flag.
    write(dir, "redis", "V2.5__late.redis", "SET late yes\n");
    let o = migrate(&mut with_redis(repo, &r, dir), &[]);
    assert_fails_naming(&o, 1, &["V2.5__late.redis", "--out-of-order"]);
    assert_eq!(r.cli(&["EXISTS", "late"]), "0");
    assert_code(
        &migrate(&mut with_redis(repo, &r, dir), &["--out-of-order"]),
        0,
    );
    assert_eq!(r.cli(&["GET", "late"]), "yes");

    // An applied file gone: reported, and --ignore-missing goes on.
    std::fs::remove_file(dir.join("redis/V2__more.redis")).unwrap();
    write(dir, "redis", "V4__four.redis", "SET four 4\n");
    let o = migrate(&mut with_redis(repo, &r, dir), &[]);
    assert_fails_naming(&o, 1, &["V2__more", "--ignore-missing"]);
    let o = run(with_redis(repo, &r, dir).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "redis", "2").contains("missing"));
    assert!(info_line(&stdout(&o), "redis", "4").contains("pending"));
    assert_code(
        &migrate(&mut with_redis(repo, &r, dir), &["--ignore-missing"]),
        0,
    );
    assert_eq!(r.cli(&["GET", "four"]), "4");
}

#[test]
fn bad_files_are_one_line_usage_errors() {
    let r = RedisServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "redis", "V1__ok.redis", "SET a 1\n");
    write(dir.path(), "redis", "V2__bad.redis", "SET a 1\nSET \"b 2\n");
    let o = migrate(&mut with_redis(repo.path(), &r, dir.path()), &[]);
    assert_fails_naming(&o, 2, &["V2__bad.redis", "line 2"]);
    // Nothing ran: the files are all read first.
    assert_eq!(r.cli(&["EXISTS", "a"]), "0");
    std::fs::remove_file(dir.path().join("redis/V2__bad.redis")).unwrap();
    write(dir.path(), "redis", "V2_typo.redis", "SET a 1\n");
    let o = migrate(&mut with_redis(repo.path(), &r, dir.path()), &[]);
    assert_fails_naming(&o, 2, &["V2_typo.redis"]);
}

#[test]
fn mongodb_apply_rerun_new_edited_out_of_order_missing() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    write(
        dir,
        "mongodb",
        "V1__users.json",
        r#"[{"create": "users"},
            {"insert": "users", "documents": [{"_id": 1, "name": "ada", "since": {"$date": "2020-01-02T03:04:05Z"}}]}]"#,
    );
    write(
        dir,
        "mongodb",
        "V1.2.9__email_index.json",
        r#"[{"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1"}]}]"#,
    );
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_code(&o, 0);
    let idx = m.indexes("app", "users");
    assert!(
        idx.iter().any(|i| i.get_str("name") == Ok("email_1")),
        "{idx:?}"
    );
    let u = m.command("app", doc! {"find": "users"});
    let first = &u
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0];
    assert!(matches!(
        first.as_document().unwrap().get("since"),
        Some(mongodb::bson::Bson::DateTime(_))
    ));
    let hist = m.sorted_docs("app", "dbkeeper_schema_history");
    assert_eq!(hist.len(), 2);

    assert_code(&migrate(&mut with_mongo(repo, &m, dir), &[]), 0);
    assert_eq!(m.sorted_docs("app", "users").len(), 1);

    // 1.2.10 sorts after 1.2.9, and is the only one applied.
    write(
        dir,
        "mongodb",
        "V1.2.10__second_user.json",
        r#"[{"db": "app", "command": {"insert": "users", "documents": [{"_id": 2}]}}]"#,
    );
    assert_code(&migrate(&mut with_mongo(repo, &m, dir), &[]), 0);
    assert_eq!(m.sorted_docs("app", "users").len(), 2);
    assert_eq!(sets(repo).len(), 1, "one pre-migration set");

    write(
        dir,
        "mongodb",
        "V1__users.json",
        r#"[{"create": "people"}]"#,
    );
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_fails_naming(&o, 1, &["V1__users.json"]);
    assert_code(
        &run(with_mongo(repo, &m, dir).args(["migrate", "repair"])),
        0,
    );
    assert_code(&migrate(&mut with_mongo(repo, &m, dir), &[]), 0);

    write(dir, "mongodb", "V1.1__late.json", r#"[{"create": "late"}]"#);
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_fails_naming(&o, 1, &["V1.1__late.json", "out of order"]);
    assert_code(
        &migrate(&mut with_mongo(repo, &m, dir), &["--out-of-order"]),
        0,
    );

    std::fs::remove_file(dir.join("mongodb/V1.1__late.json")).unwrap();
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_fails_naming(&o, 1, &["--ignore-missing"]);
    let o = run(with_mongo(repo, &m, dir).args(["migrate", "info"]));
    assert_code(&o, 0);
    assert!(info_line(&stdout(&o), "mongodb", "1.1").contains("missing"));
    assert!(info_line(&stdout(&o), "mongodb", "1.2.10").contains("applied"));
    assert_code(
        &migrate(&mut with_mongo(repo, &m, dir), &["--ignore-missing"]),
        0,
    );
}

fn populate(m: &Mongo) {
    let docs: Vec<_> = (0..50)
        .map(|i| {
            mongodb::bson::RawDocumentBuf::from_document(&doc! {"_id": i, "n": i, "tag": "x"})
                .unwrap()
        })
        .collect();
    m.insert("app", "items", docs);
}

const FAILS_THIRD: &str = r#"[
    {"update": "items", "updates": [{"q": {}, "u": {"$set": {"tag": "migrated"}}, "multi": true}]},
    {"insert": "items", "documents": [{"_id": 1000}]},
    {"noSuchCommandAtAll": 1}
]"#;

#[test]
fn mongodb_failure_restores_the_pre_migration_set_document_for_document() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    populate(&m);
    let before = m.sorted_docs("app", "items");
    write(dir, "mongodb", "V1__breaks.json", FAILS_THIRD);
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_fails_naming(&o, 1, &["V1__breaks.json", "item 3", "noSuchCommandAtAll"]);
    // One line names the file, the item and the command.
    assert!(
        stderr(&o).lines().any(|l| l.contains("V1__breaks.json")
            && l.contains("item 3")
            && l.contains("noSuchCommandAtAll")),
        "{}",
        stderr(&o)
    );
    assert_eq!(m.sorted_docs("app", "items"), before);
    let s = sets(repo);
    assert_eq!(s.len(), 1, "the pre-migration set");
    // The history says it failed; a fixed file may be tried again.
    let o = run(with_mongo(repo, &m, dir).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "mongodb", "1").contains("failed"));
    write(
        dir,
        "mongodb",
        "V1__breaks.json",
        r#"[{"update": "items", "updates": [{"q": {}, "u": {"$set": {"tag": "migrated"}}, "multi": true}]}]"#,
    );
    assert_code(&migrate(&mut with_mongo(repo, &m, dir), &[]), 0);
}

#[test]
fn mongodb_failure_under_halt_is_left_and_recorded() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    populate(&m);
    write(dir, "mongodb", "V1__breaks.json", FAILS_THIRD);
    let mut c = with_mongo(repo, &m, dir);
    c.env("DBKEEPER_MIGRATE_ON_FAILURE", "halt");
    let o = migrate(&mut c, &[]);
    assert_fails_naming(&o, 1, &["V1__breaks.json", "item 3", "halt"]);
    // Left half-way: the first two commands stay.
    assert_eq!(m.sorted_docs("app", "items").len(), 51);
    let o = run(with_mongo(repo, &m, dir).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "mongodb", "1").contains("failed"));
    // Nothing runs until an operator repairs.
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_fails_naming(&o, 1, &["V1__breaks.json", "repair"]);
}

#[test]
fn two_migrators_at_once_apply_each_migration_once() {
    let m = Mongo::start(false, true);
    let r = RedisServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    for v in 1..=5 {
        write(
            dir,
            "mongodb",
            &format!("V{v}__count.json"),
            r#"[{"update": "runs", "updates": [{"q": {"_id": "n"}, "u": {"$inc": {"n": 1}}, "upsert": true}]}]"#,
        );
        write(dir, "redis", &format!("V{v}__count.redis"), "INCR runs\n");
    }
    let spawn = || {
        let mut c = with_mongo(repo, &m, dir);
        c.env("DBKEEPER_REDIS_URL", r.url())
            .arg("migrate")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c.spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        assert_code(&o, 0);
    }
    let runs = m.command("app", doc! {"find": "runs"});
    let d: &Document = runs
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0]
        .as_document()
        .unwrap();
    assert_eq!(d.get_i32("n").unwrap(), 5);
    assert_eq!(r.cli(&["GET", "runs"]), "5");
}

#[test]
fn golang_migrate_files_run_unchanged_and_its_version_is_adopted() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    write(
        dir,
        "mongodb",
        "1_create_users.up.json",
        r#"[{"create": "users"}]"#,
    );
    write(
        dir,
        "mongodb",
        "1_create_users.down.json",
        r#"[{"drop": "users"}]"#,
    );
    write(
        dir,
        "mongodb",
        "2_users_email.up.json",
        r#"[{"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]}]"#,
    );
    write(
        dir,
        "mongodb",
        "2_users_email.down.json",
        r#"[{"dropIndexes": "users", "index": "email_1"}]"#,
    );
    assert_code(&migrate(&mut with_mongo(repo, &m, dir), &[]), 0);
    assert!(
        m.indexes("app", "users")
            .iter()
            .any(|i| i.get_str("name") == Ok("email_1"))
    );

    // A database golang-migrate had brought to version 1: only 2 runs.
    let m2 = Mongo::start(false, true);
    m2.command(
        "app",
        doc! {"insert": "schema_migrations", "documents": [{"version": 1_i64, "dirty": false}]},
    );
    let o = migrate(&mut with_mongo(repo, &m2, dir), &[]);
    assert_code(&o, 0);
    assert!(
        !m2.collections("app").iter().any(|(n, _)| n == "users")
            || m2
                .indexes("app", "users")
                .iter()
                .any(|i| i.get_str("name") == Ok("email_1"))
    );
    let o = run(with_mongo(repo, &m2, dir).args(["migrate", "info"]));
    assert!(
        info_line(&stdout(&o), "mongodb", "1").contains("baseline"),
        "{}",
        stdout(&o)
    );
    assert!(info_line(&stdout(&o), "mongodb", "2").contains("applied"));
}

#[test]
fn init_runs_pending_migrations_and_backups_record_the_schema_version() {
    let r = RedisServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    write(dir, "redis", "V7__seed.redis", "SET seeded yes\n");
    let o = run(with_redis(repo, &r, dir).args(["init", "--timeout", "20s"]));
    assert_code(&o, 0);
    assert_eq!(r.cli(&["GET", "seeded"]), "yes");
    let o = run(with_redis(repo, &r, dir).arg("backup"));
    assert_code(&o, 0);
    let id = stdout(&o).trim().to_owned();
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join(&id).join("manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["schema_version"], "7");
    assert_eq!(m["schema"]["versions"]["redis"], "7");

    // baseline on a database that already has a history is refused.
    let o = run(with_redis(repo, &r, dir).args(["migrate", "baseline", "3"]));
    assert_code(&o, 1);
    // --dry-run changes nothing.
    write(dir, "redis", "V8__more.redis", "SET more yes\n");
    let o = run(with_redis(repo, &r, dir).args(["migrate", "--dry-run"]));
    assert_code(&o, 0);
    assert!(stdout(&o).contains("V8__more.redis"));
    assert_eq!(r.cli(&["EXISTS", "more"]), "0");
}

#[test]
fn baseline_adopts_an_existing_database() {
    let r = RedisServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    write(dir, "redis", "V1__old.redis", "SET old 1\n");
    write(dir, "redis", "V2__new.redis", "SET new 1\n");
    assert_code(
        &run(with_redis(repo, &r, dir).args(["migrate", "baseline", "1"])),
        0,
    );
    assert_code(&migrate(&mut with_redis(repo, &r, dir), &[]), 0);
    assert_eq!(r.cli(&["EXISTS", "old"]), "0");
    assert_eq!(r.cli(&["GET", "new"]), "1");
}

/// Each collection of the default database with its metadata, `name {json}` per line.
fn chroma_collections(s: &crate::common::chroma::ChromaServer) -> Vec<String> {
    let script = r#"
import sys, json, chromadb
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]), settings=chromadb.Settings(anonymized_telemetry=False))
for x in sorted(c.list_collections(), key=lambda x: x.name):
    if x.name.startswith("dbkeeper_"):
        continue
    print(x.name, json.dumps(x.metadata or {}, sort_keys=True))
"#;
    crate::common::chroma::py(script, &[&s.port.to_string()])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn chroma_apply_rerun_new_edited_out_of_order_missing() {
    let s = crate::common::chroma::ChromaServer::start();
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    let with = |dir: &Path| {
        let mut c = dbkeeper(repo);
        c.env("DBKEEPER_CHROMA_URL", s.url())
            .env("DBKEEPER_MIGRATIONS", dir);
        c
    };
    write(
        dir,
        "chroma",
        "V1__lore.json",
        r#"[{"op": "create", "name": "lore", "metadata": {"topic": "myth"}},
            {"op": "create", "name": "scratch"}]"#,
    );
    write(
        dir,
        "chroma",
        "V2__rename.json",
        r#"[{"op": "modify", "name": "lore", "new_name": "lore_v2", "metadata": {"topic": "legend"}},
            {"op": "delete", "name": "scratch"}]"#,
    );
    let o = migrate(&mut with(dir), &[]);
    assert_code(&o, 0);
    assert_eq!(chroma_collections(&s), [r#"lore_v2 {"topic": "legend"}"#]);
    assert_code(&migrate(&mut with(dir), &[]), 0);

    write(
        dir,
        "chroma",
        "V3__more.json",
        r#"[{"op": "create", "name": "more"}]"#,
    );
    assert_code(&migrate(&mut with(dir), &[]), 0);
    assert_eq!(chroma_collections(&s).len(), 2);
    assert_eq!(sets(repo).len(), 1, "one pre-migration set");

    write(
        dir,
        "chroma",
        "V1__lore.json",
        r#"[{"op": "create", "name": "other"}]"#,
    );
    let o = migrate(&mut with(dir), &[]);
    assert_fails_naming(&o, 1, &["V1__lore.json", "repair"]);
    assert_code(&run(with(dir).args(["migrate", "repair"])), 0);
    assert_code(&migrate(&mut with(dir), &[]), 0);

    write(
        dir,
        "chroma",
        "V2.5__late.json",
        r#"[{"op": "create", "name": "late"}]"#,
    );
    assert_fails_naming(&migrate(&mut with(dir), &[]), 1, &["V2.5__late.json"]);
    assert_code(&migrate(&mut with(dir), &["--out-of-order"]), 0);

    std::fs::remove_file(dir.join("chroma/V3__more.json")).unwrap();
    assert_fails_naming(&migrate(&mut with(dir), &[]), 1, &["V3__more.json"]);
    let o = run(with(dir).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "chroma", "3").contains("missing"));
    assert_code(&migrate(&mut with(dir), &["--ignore-missing"]), 0);

    // A failing operation: the collections are put back from the pre-migration set.
    let before = chroma_collections(&s);
    write(
        dir,
        "chroma",
        "V4__fails.json",
        r#"[{"op": "delete", "name": "lore_v2"}, {"op": "modify", "name": "nope", "new_name": "x"}]"#,
    );
    let o = migrate(&mut with(dir), &["--ignore-missing"]);
    assert_fails_naming(&o, 1, &["V4__fails.json", "item 2", "modify nope"]);
    assert_eq!(chroma_collections(&s), before);
}

#[test]
fn a_migrator_killed_mid_way_is_put_back_on_the_next_run() {
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    populate(&m);
    let before = m.sorted_docs("app", "items");
    let cmds: Vec<String> = (0..40_000)
        .map(|i| {
            format!(
                r#"{{"insert": "items", "documents": [{{"_id": {}}}]}}"#,
                1000 + i
            )
        })
        .collect();
    write(
        dir,
        "mongodb",
        "V1__slow.json",
        &format!("[{}]", cmds.join(",\n")),
    );
    let mut child = with_mongo(repo, &m, dir)
        .arg("migrate")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let count = || {
        m.command("app", doc! {"count": "items"})
            .get_i32("n")
            .map(i64::from)
            .or_else(|_| m.command("app", doc! {"count": "items"}).get_i64("n"))
            .unwrap()
    };
    assert!(
        crate::common::wait_until(std::time::Duration::from_secs(60), || count() > 200),
        "the migration never started"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(count() < 40_050, "killed too late: the migration finished");
    let o = run(with_mongo(repo, &m, dir).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "mongodb", "1").contains("failed"));
    // Halt: refused, left as it is.
    let mut c = with_mongo(repo, &m, dir);
    c.env("DBKEEPER_MIGRATE_ON_FAILURE", "halt");
    assert_fails_naming(&migrate(&mut c, &[]), 1, &["V1__slow.json", "repair"]);
    // Restore (the default): the pre-migration set goes back once the dead lease expires.
    let o = migrate(&mut with_mongo(repo, &m, dir), &["--to", "0"]);
    assert_code(&o, 0);
    assert_eq!(m.sorted_docs("app", "items"), before);
}

fn has_index(m: &Mongo, coll: &str, name: &str) -> bool {
    m.indexes("app", coll)
        .iter()
        .any(|i| i.get_str("name") == Ok(name))
}

const V1_ITEMS: &str = r#"[{"create": "items"},
    {"insert": "items", "documents": [{"_id": 1, "sku": "a"}, {"_id": 2, "sku": "b"}]}]"#;
const V2_SKU_INDEX: &str =
    r#"[{"createIndexes": "items", "indexes": [{"key": {"sku": 1}, "name": "sku_1"}]}]"#;

/// preseed → migrate → app: a set taken at V1 preseeds an empty server and `init` then applies
/// V2. A set taken at V2 is a downgrade where the newest file is V1: preseed, init and restore
/// refuse it with one line naming both versions and change nothing; `restore --force` loads it.
#[test]
fn an_older_set_is_migrated_after_preseed_and_a_newer_one_is_refused() {
    let source = Mongo::start(false, true);
    let target = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let (new, old) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (repo, new, old) = (repo.path(), new.path(), old.path());
    write(old, "mongodb", "V1__items.json", V1_ITEMS);
    write(new, "mongodb", "V1__items.json", V1_ITEMS);
    write(new, "mongodb", "V2__sku_index.json", V2_SKU_INDEX);

    // A set at schema version 1.
    assert_code(&migrate(&mut with_mongo(repo, &source, old), &[]), 0);
    let o = run(with_mongo(repo, &source, old).arg("backup"));
    assert_code(&o, 0);

    // The app now ships V2: init preseeds the V1 set into the empty target, then migrates it.
    let o = run(with_mongo(repo, &target, new).args(["init", "--timeout", "20s"]));
    assert_code(&o, 0);
    assert_eq!(target.sorted_docs("app", "items").len(), 2);
    assert!(has_index(&target, "items", "sku_1"), "{}", stderr(&o));
    let o = run(with_mongo(repo, &target, new).args(["migrate", "info"]));
    assert!(info_line(&stdout(&o), "mongodb", "2").contains("applied"));

    // A set at schema version 2, then a deployment that knows only V1, on an empty server.
    let o = run(with_mongo(repo, &target, new).arg("backup"));
    assert_code(&o, 0);
    let v2 = stdout(&o).trim().to_owned();
    source.command("app", doc! {"dropDatabase": 1});
    assert!(source.collections("app").is_empty());
    for args in [
        &["preseed"][..],
        &["init", "--timeout", "20s"],
        &["restore", v2.as_str()],
    ] {
        let o = run(with_mongo(repo, &source, old).args(args));
        assert_code(&o, 1);
        let err = stderr(&o);
        assert!(
            err.lines().any(|l| l.contains(&v2)
                && l.contains("schema version 2")
                && l.contains("(1)")
                && l.contains("downgrade")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            source.collections("app").is_empty(),
            "{args:?} changed data"
        );
    }
    // --force loads it anyway.
    let o = run(with_mongo(repo, &source, old).args(["restore", &v2, "--force"]));
    assert_code(&o, 0);
    assert!(has_index(&source, "items", "sku_1"));
}

/// `prune` keeps Redis's pre-migration set past DBKEEPER_KEEP_LAST=1 while the only later set
/// holds MongoDB alone, and lets it go once a later verified set holds Redis.
#[test]
fn prune_keeps_the_newest_pre_migration_set_until_a_later_set_holds_its_engine() {
    let r = RedisServer::start();
    let m = Mongo::start(false, true);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    r.cli(&["SET", "app:data", "1"]);
    populate(&m);
    let both = |c: &mut Command| {
        c.env("DBKEEPER_MONGODB_URI", mongo_uri(&m))
            .env("DBKEEPER_KEEP_LAST", "1");
    };
    write(dir, "redis", "V1__one.redis", "SET app:schema 1\n");
    let mut c = with_redis(repo, &r, dir);
    both(&mut c);
    assert_code(&migrate(&mut c, &[]), 0);
    let pre = sets(repo);
    assert_eq!(pre.len(), 1, "the pre-migration set");
    let mut c = dbkeeper(repo);
    both(&mut c);
    let o = run(c.args(["backup", "--only", "mongodb"]));
    assert_code(&o, 0);
    let mongo_only = stdout(&o).trim().to_owned();

    let prune = || {
        let mut c = with_redis(repo, &r, dir);
        both(&mut c);
        let o = run(c.arg("prune"));
        assert_code(&o, 0);
        stdout(&o)
    };
    let out = prune();
    assert!(
        out.contains(&format!("keep    {}  (pre-migration)", pre[0])),
        "{out}"
    );
    assert_eq!(sets(repo), vec![pre[0].clone(), mongo_only.clone()]);

    let mut c = with_redis(repo, &r, dir);
    both(&mut c);
    let o = run(c.arg("backup"));
    assert_code(&o, 0);
    let newest = stdout(&o).trim().to_owned();
    let out = prune();
    assert!(out.contains(&format!("deleted {}", pre[0])), "{out}");
    assert_eq!(sets(repo), vec![newest]);
}

/// On a replica set a file of document writes runs in one transaction: its third command fails
/// and, even under `halt` (no restore), none of the first two is left behind. A file with DDL
/// runs command by command.
#[test]
fn mongodb_crud_migration_runs_in_a_transaction_on_a_replica_set() {
    let m = Mongo::start(false, false);
    let repo = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (repo, dir) = (repo.path(), dir.path());
    populate(&m);
    let before = m.sorted_docs("app", "items");
    write(
        dir,
        "mongodb",
        "V1__retag.json",
        r#"[{"update": "items", "updates": [{"q": {}, "u": {"$set": {"tag": "migrated"}}, "multi": true}]},
            {"insert": "items", "documents": [{"_id": 1000}]},
            {"insert": "items", "documents": [{"_id": 1}]}]"#,
    );
    let mut c = with_mongo(repo, &m, dir);
    c.env("DBKEEPER_MIGRATE_ON_FAILURE", "halt");
    let o = migrate(&mut c, &[]);
    assert_fails_naming(&o, 1, &["V1__retag.json", "item 3", "rolled back"]);
    assert_eq!(m.sorted_docs("app", "items"), before);

    // Fixed: it commits.
    write(
        dir,
        "mongodb",
        "V1__retag.json",
        r#"[{"update": "items", "updates": [{"q": {}, "u": {"$set": {"tag": "migrated"}}, "multi": true}]},
            {"insert": "items", "documents": [{"_id": 1000}]}]"#,
    );
    let mut c = with_mongo(repo, &m, dir);
    assert_code(&run(c.args(["migrate", "repair"])), 0);
    let o = migrate(&mut with_mongo(repo, &m, dir), &[]);
    assert_code(&o, 0);
    assert_eq!(m.sorted_docs("app", "items").len(), 51);
    let n = m.command("app", doc! {"count": "items", "query": {"tag": "migrated"}});
    assert_eq!(n.get_i32("n").unwrap(), 50);
}
