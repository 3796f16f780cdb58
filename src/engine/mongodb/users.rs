//! Users and custom roles: read with their SCRAM credentials for a backup (as mongodump stores
//! `admin.system.users` and `admin.system.roles`), recreated on restore the way mongorestore
//! does (temp collections + `_mergeAuthzCollections`), or, where the server refuses that, with
//! `createRole`/`createUser` and passwords the operator gives in a file.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use mongodb::Client;
use mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use mongodb::error::ErrorKind;
use tracing::{debug, warn};

use super::{ENGINE, MongoEngine, driver_message};
use crate::error::{Error, Result};
use crate::secret::Secret;

/// The variable naming the passwords file, for messages.
pub const PASSWORDS_FILE_VAR: &str = "DBKEEPER_MONGODB_USER_PASSWORDS_FILE";

/// The collections mongorestore stages users and roles in before merging them.
const TEMP_USERS: &str = "tempusers";
const TEMP_ROLES: &str = "temproles";

/// [`AuthzReport::method`] values.
pub const METHOD_NONE: &str = "none";
pub const METHOD_MERGE: &str = "_mergeAuthzCollections";
pub const METHOD_CREATE: &str = "createRole/createUser";

const UNAUTHORIZED: i32 = 13;
const COMMAND_NOT_FOUND: i32 = 59;

/// The fields of a stored user (`admin.system.users`), in mongodump's order; what `usersInfo`
/// adds (`mechanisms`, `inheritedRoles`, …) is derived by the server and not stored.
const USER_FIELDS: [&str; 8] = [
    "_id",
    "userId",
    "user",
    "db",
    "credentials",
    "customData",
    "roles",
    "authenticationRestrictions",
];
/// The fields of a stored custom role (`admin.system.roles`).
const ROLE_FIELDS: [&str; 6] = [
    "_id",
    "role",
    "db",
    "privileges",
    "roles",
    "authenticationRestrictions",
];

/// Users and custom roles as mongodump's `admin/system.users.bson` and `admin/system.roles.bson`
/// hold them. No `Debug`: the users carry their SCRAM keys.
#[derive(Default, Clone)]
pub struct AuthzDump {
    pub users: Vec<RawDocumentBuf>,
    pub roles: Vec<RawDocumentBuf>,
}

/// What a restore did with each user and role, named `db.name` (MongoDB's `_id` form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzReport {
    pub created_users: Vec<String>,
    /// Users the target held already (the image's root user): left alone, password and roles
    /// unchanged.
    pub kept_users: Vec<String>,
    pub created_roles: Vec<String>,
    pub kept_roles: Vec<String>,
    /// `(db.name, why)`: users and roles that could not be recreated. The restore carries on.
    pub failed: Vec<(String, String)>,
    /// [`METHOD_MERGE`] (credentials kept), [`METHOD_CREATE`] (passwords from the file) or
    /// [`METHOD_NONE`] (nothing to create).
    pub method: &'static str,
}

impl Default for AuthzReport {
    fn default() -> Self {
        AuthzReport {
            created_users: Vec::new(),
            kept_users: Vec::new(),
            created_roles: Vec::new(),
            kept_roles: Vec::new(),
            failed: Vec::new(),
            method: METHOD_NONE,
        }
    }
}

impl AuthzReport {
    /// The failures as one line (`app.bob: no password …; app.r: …`), or `None`.
    pub fn failures(&self) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        Some(
            self.failed
                .iter()
                .map(|(name, why)| format!("{name}: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

/// One line: `users: 1 created, 1 kept (admin.root); roles: 2 created, 0 kept; 1 failed
/// (app.bob: …); by createRole/createUser`.
impl fmt::Display for AuthzReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kept = |v: &[String]| {
            if v.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.join(", "))
            }
        };
        write!(
            f,
            "users: {} created, {} kept{}; roles: {} created, {} kept{}",
            self.created_users.len(),
            self.kept_users.len(),
            kept(&self.kept_users),
            self.created_roles.len(),
            self.kept_roles.len(),
            kept(&self.kept_roles),
        )?;
        if let Some(failures) = self.failures() {
            write!(f, "; {} failed ({failures})", self.failed.len())?;
        }
        write!(f, "; by {}", self.method)
    }
}

/// Passwords for users a server will not recreate from their stored credentials, from the file
/// `DBKEEPER_MONGODB_USER_PASSWORDS_FILE` names.
///
/// Format: one `db.user=password` line per user — the database up to the first `.`, the user
/// up to the first `=`, the password everything after it, taken as written (spaces, `=` and
/// `#` included; a trailing CR is dropped). Blank lines and lines starting with `#` are
/// skipped. A user in the same form as MongoDB's `_id` of it: `app.appuser=s3cret`.
#[derive(Default, Clone)]
pub struct Passwords {
    by_user: BTreeMap<String, Secret>,
    origin: Option<PathBuf>,
}

/// Names the users, never the passwords.
impl fmt::Debug for Passwords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Passwords")
            .field("users", &self.by_user.keys().collect::<Vec<_>>())
            .field("origin", &self.origin)
            .finish()
    }
}

impl Passwords {
    /// Reads the file, or holds none without one. A file that cannot be read or has a bad line
    /// is a configuration error naming the line, never its content.
    pub fn load(path: Option<&Path>) -> Result<Passwords> {
        let Some(path) = path else {
            return Ok(Passwords::default());
        };
        let origin = format!("{PASSWORDS_FILE_VAR}={}", path.display());
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("{origin}: cannot read: {e}")))?;
        let mut p = Passwords::parse(&text, &origin)?;
        p.origin = Some(path.to_owned());
        Ok(p)
    }

    fn parse(text: &str, origin: &str) -> Result<Passwords> {
        let mut by_user = BTreeMap::new();
        for (i, raw) in text.split('\n').enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let bad = |what: &str| Error::config(format!("{origin}: line {}: {what}", i + 1));
            let Some((key, password)) = trimmed.split_once('=') else {
                return Err(bad("expected db.user=password"));
            };
            let key = key.trim_end();
            let Some((db, user)) = key.split_once('.') else {
                return Err(bad("expected db.user=password (no `.` before the `=`)"));
            };
            if db.is_empty() || user.is_empty() {
                return Err(bad("expected db.user=password (empty database or user)"));
            }
            if password.is_empty() {
                return Err(bad(&format!("empty password for {key}")));
            }
            if by_user
                .insert(key.to_owned(), Secret::new(password))
                .is_some()
            {
                return Err(bad(&format!("{key} is listed twice")));
            }
        }
        if by_user.is_empty() {
            return Err(Error::config(format!(
                "{origin}: holds no db.user=password line"
            )));
        }
        Ok(Passwords {
            by_user,
            origin: None,
        })
    }

    pub fn get(&self, db: &str, user: &str) -> Option<&Secret> {
        self.by_user.get(&format!("{db}.{user}"))
    }

    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }

    fn missing(&self) -> String {
        match &self.origin {
            Some(_) => format!("no password for it in {PASSWORDS_FILE_VAR}"),
            None => format!("no password for it ({PASSWORDS_FILE_VAR} is not set)"),
        }
    }
}

/// Whether users and roles defined in `db` are backed up and restored. `admin` and
/// `$external` hold users of every database (the application's user is often in `admin`), so
/// they always are; other databases follow the namespace filter.
fn wanted(engine: &MongoEngine, db: &str) -> bool {
    db == "admin" || db == "$external" || engine.cfg.filter.wants_db(db)
}

fn code_of(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// Every database's users with their credentials and every custom role with its privileges,
/// as `admin.system.users`/`admin.system.roles` documents, sorted by `_id`; those of databases
/// the filter excludes are left out (`admin`'s and `$external`'s never are).
///
/// `admin.system.users` and `admin.system.roles` are read directly first, as mongodump does
/// (the `backup` role may); where they answer nothing, `usersInfo {forAllDBs: true}` with
/// `showCredentials` (then each user alone for its `authenticationRestrictions`, which
/// `forAllDBs` cannot show) and `rolesInfo` with `showPrivileges`, per database holding data,
/// users or a role one refers to.
///
/// A server without authentication answers with no users. Where the backup's user may not
/// read users or roles (`Unauthorized`, 13), that is logged once as a warning and the backup
/// carries none (the manifest counts 0): a backup of the data is worth more than no backup.
pub async fn read_authz(engine: &MongoEngine, client: &Client) -> Result<AuthzDump> {
    let mut refused = Vec::new();
    let users = match read_users(engine, client).await? {
        Some(u) => u,
        None => {
            refused.push("usersInfo");
            Vec::new()
        }
    };
    let roles = match read_roles(engine, client, &users).await? {
        Some(r) => r,
        None => {
            refused.push("rolesInfo");
            Vec::new()
        }
    };
    if !refused.is_empty() {
        warn!(
            engine = ENGINE,
            "{} refused (Unauthorized): this backup holds no MongoDB users or roles; give the backup's user the backup role (or viewUser and viewRole on admin) to include them",
            refused.join(" and ")
        );
    }
    let keep = |docs: Vec<Document>, name_field: &str| -> Result<Vec<RawDocumentBuf>> {
        let mut docs: Vec<(String, Document)> = docs
            .into_iter()
            .filter(|d| d.get_str("db").is_ok_and(|db| wanted(engine, db)))
            .filter_map(|d| Some((id_of(&d, name_field)?, d)))
            .collect();
        docs.sort_by(|a, b| a.0.cmp(&b.0));
        docs.dedup_by(|a, b| a.0 == b.0);
        docs.into_iter()
            .map(|(id, d)| {
                RawDocumentBuf::from_document(&d)
                    .map_err(|e| Error::engine(ENGINE, format!("{id}: cannot encode: {e}")))
            })
            .collect()
    };
    let dump = AuthzDump {
        users: keep(users, "user")?,
        roles: keep(roles, "role")?,
    };
    debug!(
        engine = ENGINE,
        users = dump.users.len(),
        roles = dump.roles.len(),
        "read users and roles"
    );
    Ok(dump)
}

/// `db.name` of a user (`name_field` = `user`) or role (`role`) document.
fn id_of(d: &Document, name_field: &str) -> Option<String> {
    Some(format!(
        "{}.{}",
        d.get_str("db").ok()?,
        d.get_str(name_field).ok()?
    ))
}

/// A document cut to the stored fields, `_id` first (computed when the server gave none).
fn stored(d: &Document, fields: &[&str], name_field: &str) -> Option<Document> {
    let id = id_of(d, name_field)?;
    let mut out = doc! {"_id": id};
    for f in fields.iter().skip(1) {
        if let Some(v) = d.get(*f) {
            out.insert(*f, v.clone());
        }
    }
    Some(out)
}

/// Documents of an `admin.system.*` collection; empty where the server answers nothing or
/// refuses (the commands are asked next).
async fn find_all(client: &Client, coll: &str) -> Vec<Document> {
    let c = client.database("admin").collection::<Document>(coll);
    let r = async { c.find(doc! {}).await?.try_collect::<Vec<_>>().await }.await;
    r.unwrap_or_else(|e| {
        debug!(
            engine = ENGINE,
            "find on admin.{coll}: {}",
            driver_message(&e)
        );
        Vec::new()
    })
}

/// `None`: not authorized.
async fn read_users(engine: &MongoEngine, client: &Client) -> Result<Option<Vec<Document>>> {
    let direct: Vec<Document> = find_all(client, "system.users")
        .await
        .iter()
        .filter_map(|d| stored(d, &USER_FIELDS, "user"))
        .collect();
    if !direct.is_empty() {
        return Ok(Some(direct));
    }
    let reply = match client
        .database("admin")
        .run_command(doc! {"usersInfo": {"forAllDBs": true}, "showCredentials": true})
        .await
    {
        Ok(r) => r,
        Err(e) if code_of(&e) == Some(UNAUTHORIZED) => return Ok(None),
        Err(e) => return Err(engine.op_err("usersInfo")(e)),
    };
    let mut users = Vec::new();
    for u in docs_in(&reply, "users") {
        let Some(mut s) = stored(&u, &USER_FIELDS, "user") else {
            continue;
        };
        if !s.contains_key("authenticationRestrictions")
            && let Some(r) = restrictions_of(client, &s).await
        {
            s.insert("authenticationRestrictions", r);
        }
        users.push(s);
    }
    Ok(Some(users))
}

/// A user's `authenticationRestrictions`, which `usersInfo {forAllDBs: true}` cannot show.
async fn restrictions_of(client: &Client, user: &Document) -> Option<Bson> {
    let (db, name) = (user.get_str("db").ok()?, user.get_str("user").ok()?);
    let reply = client
        .database(db)
        .run_command(doc! {
            "usersInfo": {"user": name, "db": db},
            "showAuthenticationRestrictions": true,
        })
        .await
        .inspect_err(|e| {
            debug!(
                engine = ENGINE,
                "usersInfo {db}.{name}: {}",
                driver_message(e)
            )
        })
        .ok()?;
    match docs_in(&reply, "users")
        .first()?
        .get("authenticationRestrictions")
    {
        Some(Bson::Array(a)) if !a.is_empty() => Some(Bson::Array(a.clone())),
        _ => None,
    }
}

fn docs_in(reply: &Document, field: &str) -> Vec<Document> {
    reply
        .get_array(field)
        .map(|a| a.iter().filter_map(|b| b.as_document().cloned()).collect())
        .unwrap_or_default()
}

/// The `(db, role)` a user's or role's `roles` array names.
fn role_refs(d: &Document) -> Vec<(String, String)> {
    docs_in(d, "roles")
        .iter()
        .filter_map(|r| {
            Some((
                r.get_str("db").ok()?.to_owned(),
                r.get_str("role").ok()?.to_owned(),
            ))
        })
        .collect()
}

/// `None`: not authorized.
async fn read_roles(
    engine: &MongoEngine,
    client: &Client,
    users: &[Document],
) -> Result<Option<Vec<Document>>> {
    let direct: Vec<Document> = find_all(client, "system.roles")
        .await
        .iter()
        .filter_map(|d| stored(d, &ROLE_FIELDS, "role"))
        .collect();
    if !direct.is_empty() {
        return Ok(Some(direct));
    }
    // rolesInfo answers one database at a time: those with data, with users, and those a
    // user's or a role's roles name (a database of roles alone holds no data to be listed).
    let mut queue: VecDeque<String> = VecDeque::from(["admin".to_owned()]);
    match client.list_database_names().await {
        Ok(names) => queue.extend(names),
        Err(e) if code_of(&e) == Some(UNAUTHORIZED) => return Ok(None),
        Err(e) => return Err(engine.op_err("listDatabases")(e)),
    }
    for u in users {
        queue.extend(u.get_str("db").ok().map(str::to_owned));
        queue.extend(role_refs(u).into_iter().map(|(db, _)| db));
    }
    let mut seen = BTreeSet::new();
    let mut roles = Vec::new();
    while let Some(db) = queue.pop_front() {
        if !seen.insert(db.clone())
            || db == "local"
            || db == "config"
            || db == "$external"
            || !wanted(engine, &db)
        {
            continue;
        }
        let reply = match client
            .database(&db)
            .run_command(doc! {"rolesInfo": 1, "showPrivileges": true, "showBuiltinRoles": false})
            .await
        {
            Ok(r) => r,
            Err(e) if code_of(&e) == Some(UNAUTHORIZED) => return Ok(None),
            Err(e) => return Err(engine.op_err(&format!("rolesInfo on {db}"))(e)),
        };
        for r in docs_in(&reply, "roles") {
            if r.get_bool("isBuiltin").unwrap_or(false) {
                continue;
            }
            let Some(s) = stored(&r, &ROLE_FIELDS, "role") else {
                continue;
            };
            queue.extend(role_refs(&s).into_iter().map(|(db, _)| db));
            roles.push(s);
        }
    }
    Ok(Some(roles))
}

/// A user or role of the set to recreate.
struct Item {
    id: String,
    db: String,
    name: String,
    doc: Document,
}

fn items(
    engine: &MongoEngine,
    docs: &[RawDocumentBuf],
    name_field: &str,
    what: &str,
    failed: &mut Vec<(String, String)>,
) -> Vec<Item> {
    let mut out = Vec::new();
    for (i, raw) in docs.iter().enumerate() {
        let parsed = raw.to_document().ok().and_then(|d| {
            let db = d.get_str("db").ok()?.to_owned();
            let name = d.get_str(name_field).ok()?.to_owned();
            Some((db, name, d))
        });
        let Some((db, name, doc)) = parsed else {
            failed.push((format!("{what} #{i}"), format!("not a {what} document")));
            continue;
        };
        if !wanted(engine, &db) {
            continue;
        }
        out.push(Item {
            id: format!("{db}.{name}"),
            db,
            name,
            doc,
        });
    }
    out
}

/// Recreates users and custom roles on the target; those it holds already are left alone and
/// reported as kept. Users and roles of databases the filter excludes are skipped.
///
/// First mongorestore's way, which keeps every user's SCRAM credentials (so passwords need
/// not be known): the documents go into `admin.tempusers`/`admin.temproles`, then
/// `_mergeAuthzCollections` with `drop: false` and `db: ""` (all databases) merges them, which
/// never replaces an existing user. Where the server answers that command with
/// `CommandNotFound` (59) or refuses the inserts, it falls back — in one warning line — to
/// `createRole` (custom roles, those a role inherits first) and `createUser` with each user's
/// roles, custom data, restrictions and mechanisms, and its password from `passwords`.
///
/// A user or role that cannot be recreated (no password for it, a role it needs missing, the
/// server's refusal) is reported in [`AuthzReport::failed`] and the rest carry on; only a
/// failure to talk to the server at all is an error.
pub async fn restore_authz(
    engine: &MongoEngine,
    client: &Client,
    users: &[RawDocumentBuf],
    roles: &[RawDocumentBuf],
    passwords: &Passwords,
) -> Result<AuthzReport> {
    let mut report = AuthzReport::default();
    let users = items(engine, users, "user", "user", &mut report.failed);
    let roles = items(engine, roles, "role", "role", &mut report.failed);
    let (had_users, had_roles) = existing(engine, client, &roles).await?;
    let (users, kept): (Vec<_>, Vec<_>) =
        users.into_iter().partition(|u| !had_users.contains(&u.id));
    report.kept_users = kept.into_iter().map(|u| u.id).collect();
    let (roles, kept): (Vec<_>, Vec<_>) =
        roles.into_iter().partition(|r| !had_roles.contains(&r.id));
    report.kept_roles = kept.into_iter().map(|r| r.id).collect();
    if users.is_empty() && roles.is_empty() {
        return Ok(report);
    }

    match merge(engine, client, &users, &roles).await? {
        Ok(()) => {
            report.method = METHOD_MERGE;
            // The merge logs, not returns, what it could not insert: ask what is there now.
            let (now_users, now_roles) = existing(engine, client, &roles).await?;
            for (list, now, created) in [
                (&roles, &now_roles, &mut report.created_roles),
                (&users, &now_users, &mut report.created_users),
            ] {
                for it in list {
                    if now.contains(&it.id) {
                        created.push(it.id.clone());
                    } else {
                        report.failed.push((
                            it.id.clone(),
                            "not merged by _mergeAuthzCollections (see the server's log)".into(),
                        ));
                    }
                }
            }
        }
        Err(why) => {
            warn!(
                engine = ENGINE,
                "the server refuses mongorestore's way of restoring users ({why}); recreating roles with createRole and users with createUser, passwords from {PASSWORDS_FILE_VAR} (their stored credentials cannot be kept)"
            );
            report.method = METHOD_CREATE;
            create_roles(engine, client, roles, &mut report).await?;
            create_users(engine, client, users, passwords, &mut report).await?;
        }
    }
    debug!(engine = ENGINE, method = report.method, "{report}");
    Ok(report)
}

/// The `db.name` of the users the target holds, and of its custom roles in the databases of
/// `roles` (and `admin`).
async fn existing(
    engine: &MongoEngine,
    client: &Client,
    roles: &[Item],
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let reply = client
        .database("admin")
        .run_command(doc! {"usersInfo": {"forAllDBs": true}})
        .await
        .map_err(engine.op_err("usersInfo"))?;
    let users = docs_in(&reply, "users")
        .iter()
        .filter_map(|u| id_of(u, "user"))
        .collect();
    let dbs: BTreeSet<&str> = roles
        .iter()
        .map(|r| r.db.as_str())
        .chain(["admin"])
        .collect();
    let mut have = BTreeSet::new();
    for db in dbs {
        let reply = client
            .database(db)
            .run_command(doc! {"rolesInfo": 1, "showBuiltinRoles": false})
            .await
            .map_err(engine.op_err(&format!("rolesInfo on {db}")))?;
        have.extend(
            docs_in(&reply, "roles")
                .iter()
                .filter_map(|r| id_of(r, "role")),
        );
    }
    Ok((users, have))
}

/// mongorestore's merge. `Ok(Err(why))`: the server refuses it, fall back.
async fn merge(
    engine: &MongoEngine,
    client: &Client,
    users: &[Item],
    roles: &[Item],
) -> Result<std::result::Result<(), String>> {
    let admin = client.database("admin");
    let leftovers = admin
        .list_collection_names()
        .filter(doc! {"name": {"$in": [TEMP_USERS, TEMP_ROLES]}})
        .await
        .map_err(engine.op_err("listCollections on admin"))?;
    for name in leftovers {
        // Staged by a restore that was interrupted before it dropped them.
        warn!(
            engine = ENGINE,
            "dropping admin.{name} left by an earlier restore"
        );
        admin
            .collection::<Document>(&name)
            .drop()
            .await
            .map_err(engine.op_err(&format!("dropping admin.{name}")))?;
    }
    let mut cmd = doc! {"_mergeAuthzCollections": 1};
    let mut staged = Vec::new();
    let mut refused = None;
    for (coll, list, field, fields, name_field) in [
        (
            TEMP_USERS,
            users,
            "tempUsersCollection",
            &USER_FIELDS[..],
            "user",
        ),
        (
            TEMP_ROLES,
            roles,
            "tempRolesCollection",
            &ROLE_FIELDS[..],
            "role",
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        let docs: Vec<Document> = list
            .iter()
            .filter_map(|it| stored(&it.doc, fields, name_field))
            .collect();
        staged.push(coll);
        if let Err(e) = admin.collection::<Document>(coll).insert_many(docs).await {
            refused = Some(format!(
                "inserting into admin.{coll}: {}",
                driver_message(&e)
            ));
            break;
        }
        cmd.insert(field, format!("admin.{coll}"));
    }
    let merged = match refused {
        Some(why) => Ok(Err(why)),
        None => {
            cmd.insert("drop", false);
            cmd.insert("writeConcern", doc! {"w": "majority"});
            cmd.insert("db", "");
            match admin.run_command(cmd).await {
                Ok(_) => Ok(Ok(())),
                Err(e) if code_of(&e) == Some(COMMAND_NOT_FOUND) => Ok(Err(format!(
                    "_mergeAuthzCollections: {}",
                    driver_message(&e)
                ))),
                Err(e) => Err(engine.op_err("_mergeAuthzCollections")(e)),
            }
        }
    };
    for coll in staged {
        if let Err(e) = admin.collection::<Document>(coll).drop().await {
            warn!(
                engine = ENGINE,
                "dropping admin.{coll}: {}; drop it by hand",
                driver_message(&e)
            );
        }
    }
    merged
}

/// Indexes of `deps` in an order where every role comes after the roles of the list it
/// inherits, and the indexes of those in a cycle (which no order can create).
fn creation_order(deps: &[Vec<usize>]) -> (Vec<usize>, Vec<usize>) {
    let mut done = vec![false; deps.len()];
    let mut order = Vec::new();
    loop {
        let ready: Vec<usize> = (0..deps.len())
            .filter(|&i| !done[i] && deps[i].iter().all(|&d| d == i || done[d]))
            .collect();
        if ready.is_empty() {
            break;
        }
        for i in ready {
            done[i] = true;
            order.push(i);
        }
    }
    let stuck = (0..deps.len()).filter(|&i| !done[i]).collect();
    (order, stuck)
}

async fn create_roles(
    engine: &MongoEngine,
    client: &Client,
    roles: Vec<Item>,
    report: &mut AuthzReport,
) -> Result<()> {
    let index: BTreeMap<&str, usize> = roles
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let deps: Vec<Vec<usize>> = roles
        .iter()
        .map(|r| {
            role_refs(&r.doc)
                .iter()
                .filter_map(|(db, name)| index.get(format!("{db}.{name}").as_str()).copied())
                .collect()
        })
        .collect();
    let (order, stuck) = creation_order(&deps);
    let mut failed = vec![false; roles.len()];
    for i in order {
        let r = &roles[i];
        let lost: Vec<&str> = deps[i]
            .iter()
            .filter(|&&d| failed[d])
            .map(|&d| roles[d].id.as_str())
            .collect();
        if !lost.is_empty() {
            failed[i] = true;
            report.failed.push((
                r.id.clone(),
                format!("inherits {}, which could not be created", lost.join(", ")),
            ));
            continue;
        }
        let mut cmd = doc! {
            "createRole": &r.name,
            "privileges": r.doc.get_array("privileges").cloned().unwrap_or_default(),
            "roles": r.doc.get_array("roles").cloned().unwrap_or_default(),
        };
        if let Ok(a) = r.doc.get_array("authenticationRestrictions")
            && !a.is_empty()
        {
            cmd.insert("authenticationRestrictions", a.clone());
        }
        match client.database(&r.db).run_command(cmd).await {
            Ok(_) => report.created_roles.push(r.id.clone()),
            Err(e) if code_of(&e).is_none() => {
                return Err(engine.op_err(&format!("createRole {}", r.id))(e));
            }
            Err(e) => {
                failed[i] = true;
                report.failed.push((r.id.clone(), driver_message(&e)));
            }
        }
    }
    for i in stuck {
        report.failed.push((
            roles[i].id.clone(),
            "its roles inherit each other in a cycle".into(),
        ));
    }
    Ok(())
}

async fn create_users(
    engine: &MongoEngine,
    client: &Client,
    users: Vec<Item>,
    passwords: &Passwords,
    report: &mut AuthzReport,
) -> Result<()> {
    for u in users {
        let mut cmd = doc! {
            "createUser": &u.name,
            "roles": u.doc.get_array("roles").cloned().unwrap_or_default(),
        };
        // Users of `$external` (x.509, LDAP, AWS) authenticate elsewhere and have no password.
        if u.db != "$external" {
            let Some(pwd) = passwords.get(&u.db, &u.name) else {
                report.failed.push((u.id, passwords.missing()));
                continue;
            };
            cmd.insert("pwd", pwd.expose());
            let mechanisms: Vec<&str> = u
                .doc
                .get_document("credentials")
                .map(|c| {
                    c.keys()
                        .map(String::as_str)
                        .filter(|k| k.starts_with("SCRAM-"))
                        .collect()
                })
                .unwrap_or_default();
            if !mechanisms.is_empty() {
                cmd.insert("mechanisms", mechanisms);
            }
        }
        if let Some(data) = u.doc.get("customData") {
            cmd.insert("customData", data.clone());
        }
        if let Ok(a) = u.doc.get_array("authenticationRestrictions")
            && !a.is_empty()
        {
            cmd.insert("authenticationRestrictions", a.clone());
        }
        match client.database(&u.db).run_command(cmd).await {
            Ok(_) => report.created_users.push(u.id),
            Err(e) if code_of(&e).is_none() => {
                return Err(engine.op_err(&format!("createUser {}", u.id))(e));
            }
            Err(e) => report.failed.push((u.id, driver_message(&e))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Passwords> {
        Passwords::parse(text, "F")
    }

    #[test]
    fn passwords_file_lines() {
        let p =
            parse("# app users\n\napp.appuser=s3cret\r\nadmin.ops.team = x=y #z \n  other.u=p\n")
                .unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p.get("app", "appuser").unwrap().expose(), "s3cret");
        // The database ends at the first `.`, the user at the first `=`; the password is the
        // rest as written.
        assert_eq!(p.get("admin", "ops.team").unwrap().expose(), " x=y #z ");
        assert_eq!(p.get("other", "u").unwrap().expose(), "p");
        assert!(p.get("app", "nobody").is_none());
        let shown = format!("{p:?}");
        assert!(
            shown.contains("app.appuser") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn bad_passwords_files_are_one_line_errors_without_the_password() {
        for (text, want) in [
            (
                "app.u=pw\nnot-a-line-hunter2\n",
                "F: line 2: expected db.user=password",
            ),
            (
                "appu=hunter2",
                "F: line 1: expected db.user=password (no `.`",
            ),
            (".u=hunter2", "F: line 1: expected db.user=password (empty"),
            (
                "app.=hunter2",
                "F: line 1: expected db.user=password (empty",
            ),
            ("app.u=", "F: line 1: empty password for app.u"),
            (
                "app.u=hunter2\napp.u=hunter2",
                "F: line 2: app.u is listed twice",
            ),
            ("# nothing\n\n", "F: holds no db.user=password line"),
        ] {
            let e = parse(text).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, Error::Config(_)), "{msg}");
            assert!(msg.starts_with(&format!("configuration: {want}")), "{msg}");
            assert!(!msg.contains("hunter2") && !msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn passwords_load() {
        assert!(Passwords::load(None).unwrap().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "app.u=pw\n").unwrap();
        let p = Passwords::load(Some(&f)).unwrap();
        assert_eq!(p.get("app", "u").unwrap().expose(), "pw");
        assert!(p.missing().contains("no password for it in"));
        assert!(Passwords::default().missing().contains("is not set"));
        let e = Passwords::load(Some(&dir.path().join("absent"))).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert!(e.to_string().contains(PASSWORDS_FILE_VAR), "{e}");
    }

    #[test]
    fn roles_come_after_the_roles_they_inherit() {
        // 0 inherits 2, 2 inherits 1; 3 and 4 inherit each other; 5 inherits itself only.
        let deps = vec![vec![2], vec![], vec![1], vec![4], vec![3], vec![5]];
        let (order, stuck) = creation_order(&deps);
        let pos = |i| order.iter().position(|&x| x == i).unwrap();
        assert!(pos(1) < pos(2) && pos(2) < pos(0));
        assert!(order.contains(&5));
        assert_eq!(stuck, vec![3, 4]);
    }

    #[test]
    fn stored_documents_keep_the_stored_fields() {
        let u = doc! {
            "user": "appuser", "db": "app", "userId": 1,
            "credentials": {"SCRAM-SHA-256": {"iterationCount": 15000}},
            "roles": [{"role": "readWrite", "db": "app"}],
            "mechanisms": ["SCRAM-SHA-256"], "inheritedRoles": [],
        };
        let s = stored(&u, &USER_FIELDS, "user").unwrap();
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            ["_id", "userId", "user", "db", "credentials", "roles"]
        );
        assert_eq!(s.get_str("_id").unwrap(), "app.appuser");
        assert!(stored(&doc! {"user": "x"}, &USER_FIELDS, "user").is_none());
    }

    #[test]
    fn report_is_one_line() {
        let r = AuthzReport {
            created_users: vec!["app.appuser".into()],
            kept_users: vec!["admin.root".into()],
            created_roles: vec!["app.reader".into()],
            kept_roles: vec![],
            failed: vec![("app.bob".into(), "no password for it".into())],
            method: METHOD_CREATE,
        };
        assert_eq!(
            r.to_string(),
            "users: 1 created, 1 kept (admin.root); roles: 1 created, 0 kept; 1 failed (app.bob: no password for it); by createRole/createUser"
        );
        assert_eq!(AuthzReport::default().failures(), None);
    }
}
