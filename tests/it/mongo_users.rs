//! MongoDB users and custom roles read from one server and recreated on an empty one, through
//! the library (`engine::mongodb::users`), against private `secantusd-rs` servers with `--auth`.

use dbkeeper::engine::EngineOptions;
use dbkeeper::engine::mongodb::MongoEngine;
use dbkeeper::engine::mongodb::users::{
    AuthzDump, METHOD_CREATE, Passwords, read_authz, restore_authz,
};
use dbkeeper::error::Error;
use dbkeeper::secret::Secret;
use mongodb::Client;
use mongodb::bson::{Document, RawDocumentBuf, doc};
use mongodb::options::{ClientOptions, Credential};

use crate::common::mongodb::{Mongo, PASSWORD};

/// `=`, a space and `#` inside: the file takes everything after the first `=` as written.
const APP_PW: &str = "app=pw #1 x";
const LIMITED_PW: &str = "lim-pw-9";

fn engine(m: &Mongo, opts: &EngineOptions) -> MongoEngine {
    MongoEngine::new(&Secret::new(m.uri()), opts).unwrap()
}

fn ids(docs: &[RawDocumentBuf]) -> Vec<String> {
    docs.iter()
        .map(|d| d.get_str("_id").unwrap().to_owned())
        .collect()
}

/// A client of `m` authenticated as `user@db` (credentials set apart from the URI, so the
/// password needs no escaping).
fn client_as(m: &Mongo, db: &str, user: &str, pw: &str) -> Client {
    let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", m.port);
    m.block(async {
        let mut o = ClientOptions::parse(uri).await.unwrap();
        o.credential = Some(
            Credential::builder()
                .username(user.to_owned())
                .password(pw.to_owned())
                .source(db.to_owned())
                .build(),
        );
        Client::with_options(o).unwrap()
    })
}

/// Server A: the application's user with `readWrite` and a custom role on `app`, the role
/// inheriting another one whose name sorts after it; a user whose password nobody will give;
/// a user with authentication restrictions; a user and role of a database a filter excludes.
fn source() -> Mongo {
    let a = Mongo::start(true, false);
    a.insert(
        "app",
        "items",
        vec![RawDocumentBuf::from_document(&doc! {"_id": 1}).unwrap()],
    );
    a.command(
        "app",
        doc! {"createRole": "z_inner", "privileges": [{"resource": {"db": "app", "collection": "secret"}, "actions": ["find"]}], "roles": []},
    );
    a.command(
        "app",
        doc! {"createRole": "a_outer", "privileges": [], "roles": [{"role": "z_inner", "db": "app"}]},
    );
    a.command(
        "app",
        doc! {"createUser": "appuser", "pwd": APP_PW, "roles": ["readWrite", "a_outer"], "customData": {"team": "web"}},
    );
    a.command(
        "app",
        doc! {"createUser": "bob", "pwd": "bob-pw", "roles": ["read"]},
    );
    a.command(
        "app",
        doc! {"createUser": "limited", "pwd": LIMITED_PW, "roles": ["read"],
        "authenticationRestrictions": [{"clientSource": ["127.0.0.1"]}]},
    );
    a.command(
        "other",
        doc! {"createRole": "o_role", "privileges": [], "roles": [{"role": "read", "db": "other"}]},
    );
    a.command(
        "other",
        doc! {"createUser": "ouser", "pwd": "o-pw", "roles": ["o_role"]},
    );
    a
}

#[test]
fn users_and_roles_survive_a_restore_into_an_empty_server() {
    let a = source();
    let dump: AuthzDump = a
        .block(read_authz(
            &engine(&a, &EngineOptions::default()),
            a.client(),
        ))
        .unwrap();
    assert_eq!(
        ids(&dump.users),
        [
            "admin.root",
            "app.appuser",
            "app.bob",
            "app.limited",
            "other.ouser"
        ]
    );
    assert_eq!(
        ids(&dump.roles),
        ["app.a_outer", "app.z_inner", "other.o_role"]
    );
    for u in &dump.users {
        // As admin.system.users stores them: credentials, nothing usersInfo derives.
        let d = u.to_document().unwrap();
        let creds = d.get_document("credentials").unwrap();
        assert!(creds.contains_key("SCRAM-SHA-256"), "{d}");
        assert!(!d.contains_key("mechanisms") && !d.contains_key("inheritedRoles"));
    }
    let app = dump.users[1].to_document().unwrap();
    assert_eq!(
        app.get_document("customData").unwrap(),
        &doc! {"team": "web"}
    );
    let limited = dump.users[3].to_document().unwrap();
    assert!(
        limited.get_array("authenticationRestrictions").is_ok(),
        "{limited}"
    );

    // A filter that excludes `other` leaves its user and role out; admin's stay.
    let no_other = EngineOptions {
        mongo_exclude: vec!["other".into()],
        ..EngineOptions::default()
    };
    let filtered = a
        .block(read_authz(&engine(&a, &no_other), a.client()))
        .unwrap();
    assert_eq!(
        ids(&filtered.users),
        ["admin.root", "app.appuser", "app.bob", "app.limited"]
    );
    assert_eq!(ids(&filtered.roles), ["app.a_outer", "app.z_inner"]);

    // Server B: empty but for the image's root user (same name, its own password).
    let b = Mongo::start(true, false);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwords");
    std::fs::write(
        &file,
        format!("# the application\napp.appuser={APP_PW}\napp.limited={LIMITED_PW}\n"),
    )
    .unwrap();
    let passwords = Passwords::load(Some(&file)).unwrap();
    let eb = engine(&b, &no_other);
    let report = b
        .block(restore_authz(
            &eb,
            b.client(),
            &dump.users,
            &dump.roles,
            &passwords,
        ))
        .unwrap();
    // secantusd-rs has no _mergeAuthzCollections: users are created with their passwords.
    assert_eq!(report.method, METHOD_CREATE);
    assert_eq!(report.kept_users, ["admin.root"]);
    assert_eq!(report.created_roles, ["app.z_inner", "app.a_outer"]);
    assert_eq!(report.created_users, ["app.appuser", "app.limited"]);
    assert_eq!(report.failed.len(), 1, "{report}");
    assert_eq!(report.failed[0].0, "app.bob");
    assert!(
        report.failed[0]
            .1
            .contains("no password for it in DBKEEPER_MONGODB_USER_PASSWORDS_FILE"),
        "{report}"
    );
    // mongorestore's staging collections were tried, and dropped.
    let staged: Vec<String> = b
        .collections("admin")
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with("temp"))
        .collect();
    assert!(staged.is_empty(), "{staged:?}");
    let line = report.to_string();
    assert!(!line.contains('\n') && !line.contains(APP_PW), "{line}");
    assert!(line.contains("kept (admin.root)"), "{line}");

    // The application logs in with its password, writes and reads its database, and has
    // what its custom role inherits.
    let app_client = client_as(&b, "app", "appuser", APP_PW);
    let found = b.block(async {
        let items = app_client.database("app").collection::<Document>("items");
        items.insert_one(doc! {"_id": 2, "by": "appuser"}).await?;
        app_client
            .database("app")
            .collection::<Document>("secret")
            .find_one(doc! {})
            .await?;
        items.find_one(doc! {"_id": 2}).await
    });
    assert_eq!(found.unwrap().unwrap(), doc! {"_id": 2, "by": "appuser"});
    let info = b.command(
        "app",
        doc! {"usersInfo": "appuser", "showAuthenticationRestrictions": true},
    );
    let u = info.get_array("users").unwrap()[0].as_document().unwrap();
    assert_eq!(u.get_document("customData").unwrap(), &doc! {"team": "web"});
    let info = b.command(
        "app",
        doc! {"usersInfo": "limited", "showAuthenticationRestrictions": true},
    );
    let u = info.get_array("users").unwrap()[0].as_document().unwrap();
    assert_eq!(
        u.get_array("authenticationRestrictions").unwrap().len(),
        1,
        "{u}"
    );
    // The excluded database's user was not created; root still logs in with B's password.
    let users = b.command("admin", doc! {"usersInfo": {"forAllDBs": true}});
    assert_eq!(users.get_array("users").unwrap().len(), 3, "{users}");
    let root = client_as(&b, "admin", "root", PASSWORD);
    b.block(root.database("admin").run_command(doc! {"ping": 1}))
        .unwrap();

    // Again: everything there is kept, only bob is still missing.
    let again = b
        .block(restore_authz(
            &eb,
            b.client(),
            &dump.users,
            &dump.roles,
            &passwords,
        ))
        .unwrap();
    assert_eq!(
        again.kept_users,
        ["admin.root", "app.appuser", "app.limited"]
    );
    assert_eq!(again.kept_roles, ["app.a_outer", "app.z_inner"]);
    assert!(again.created_users.is_empty() && again.created_roles.is_empty());
    assert_eq!(again.failed.len(), 1, "{again}");
}

#[test]
fn a_user_without_rights_to_users_backs_up_none() {
    let a = Mongo::start(true, true);
    a.command(
        "app",
        doc! {"createUser": "appuser", "pwd": LIMITED_PW, "roles": ["readWrite"]},
    );
    let uri = format!(
        "mongodb://appuser:{LIMITED_PW}@127.0.0.1:{}/?directConnection=true&authSource=app",
        a.port
    );
    let e = MongoEngine::new(&Secret::new(uri), &EngineOptions::default()).unwrap();
    let client = client_as(&a, "app", "appuser", LIMITED_PW);
    let dump = a.block(read_authz(&e, &client)).unwrap();
    assert!(dump.users.is_empty() && dump.roles.is_empty());
}

#[test]
fn a_bad_passwords_file_is_a_one_line_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwords");
    std::fs::write(&file, "app.appuser=fine\nappuser hunter2\n").unwrap();
    let e = Passwords::load(Some(&file)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Config(_)), "{msg}");
    assert!(msg.contains("DBKEEPER_MONGODB_USER_PASSWORDS_FILE=") && msg.contains("line 2"));
    assert!(!msg.contains("hunter2") && !msg.contains("fine") && !msg.contains('\n'));
}

/// Through the binary: `backup` records the users in the set and counts them in the manifest;
/// `restore` into an empty server recreates the application's user, which then logs in with
/// its password and writes.
#[test]
fn the_application_user_logs_in_after_backup_and_restore_through_the_binary() {
    use crate::common::{assert_code, dbkeeper, run, stdout};
    let a = Mongo::start(true, false);
    a.command(
        "app",
        doc! {"createUser": "appuser", "pwd": APP_PW, "roles": [{"role": "readWrite", "db": "app"}]},
    );
    a.insert(
        "app",
        "things",
        vec![RawDocumentBuf::from_document(&doc! {"_id": 1}).unwrap()],
    );
    let repo = tempfile::tempdir().unwrap();
    let o = run(dbkeeper(repo.path())
        .arg("backup")
        .env("DBKEEPER_MONGODB_URI", a.uri()));
    assert_code(&o, 0);
    let set = stdout(&o).trim().to_owned();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo.path().join(&set).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let authz = &manifest["engines"]["mongodb"]["details"]["authz"];
    // The harness's root user and the application's.
    assert_eq!(authz["users"], 2, "{authz}");
    let raw = std::fs::read(repo.path().join(&set).join("manifest.json")).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains(APP_PW));

    let b = Mongo::start(true, false);
    let pwfile = repo.path().join("passwords");
    std::fs::write(&pwfile, format!("app.appuser={APP_PW}\n")).unwrap();
    let o = run(dbkeeper(repo.path())
        .args(["restore", &set])
        .env("DBKEEPER_MONGODB_URI", b.uri())
        .env("DBKEEPER_MONGODB_USER_PASSWORDS_FILE", &pwfile));
    assert_code(&o, 0);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("admin.root"),
        "the existing root user is reported kept: {err}"
    );
    assert!(!err.contains(APP_PW), "{err}");
    let app = client_as(&b, "app", "appuser", APP_PW);
    b.block(async {
        let c = app.database("app").collection::<Document>("things");
        c.insert_one(doc! {"_id": 2}).await.unwrap();
        assert_eq!(c.count_documents(doc! {}).await.unwrap(), 2);
    });
}
