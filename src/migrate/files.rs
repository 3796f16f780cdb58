//! Migration files on disk: discovery under `<dir>/<engine>/`, versions, checksums, and the
//! per-engine parsing of their bodies (MongoDB commands, Redis command lines, Chroma operations).

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

use mongodb::bson::{Bson, Document};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::engine::EngineKind;
use crate::error::{Error, Result};

/// A migration version: `3`, `1.2.10`. Compared part by part as numbers, so `1.2.10` is newer
/// than `1.2.9`, and `1.0` equals `1`.
#[derive(Debug, Clone, Eq)]
pub struct Version {
    parts: Vec<u64>,
    text: String,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let s = s.trim();
        if s.is_empty() {
            return None;
        }
        // Flyway also spells the dots as underscores (`V1_2__x.sql`).
        let parts = s
            .split(['.', '_'])
            .map(|p| {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    p.parse::<u64>().ok()
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Version {
            parts,
            text: s.replace('_', "."),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn trimmed(&self) -> &[u64] {
        let n = self
            .parts
            .iter()
            .rposition(|p| *p != 0)
            .map_or(0, |i| i + 1);
        &self.parts[..n]
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.trimmed() == other.trimmed()
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.trimmed().cmp(other.trimmed())
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// One migration file, read and parsed.
#[derive(Debug, Clone)]
pub struct MigrationFile {
    pub version: Version,
    pub description: String,
    pub path: PathBuf,
    /// File name, for messages and the history.
    pub name: String,
    /// SHA-256 of the file's bytes, lowercase hex.
    pub sha256: String,
    pub script: Script,
}

/// A file's body, parsed for its engine.
#[derive(Debug, Clone)]
pub enum Script {
    Mongo(Vec<MongoCommand>),
    Redis(Vec<RedisLine>),
    Chroma(Vec<ChromaOp>),
}

impl Script {
    pub fn len(&self) -> usize {
        match self {
            Script::Mongo(v) => v.len(),
            Script::Redis(v) => v.len(),
            Script::Chroma(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One database command and the database it runs on (`None`: the URI's).
#[derive(Debug, Clone)]
pub struct MongoCommand {
    pub db: Option<String>,
    pub command: Document,
}

impl MongoCommand {
    /// The command's name (its first key), for messages.
    pub fn name(&self) -> &str {
        self.command.keys().next().map_or("?", |k| k.as_str())
    }
}

/// One Redis command line: its 1-based line number and its arguments.
#[derive(Debug, Clone)]
pub struct RedisLine {
    pub line: usize,
    pub args: Vec<Vec<u8>>,
}

impl RedisLine {
    pub fn text(&self) -> String {
        self.args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One Chroma operation on a collection of the configured database (or of `database`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ChromaOp {
    Create {
        name: String,
        #[serde(default)]
        database: Option<String>,
        #[serde(default)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
        #[serde(default)]
        configuration: Option<serde_json::Value>,
        /// Succeed when it exists already (Chroma's `get_or_create`).
        #[serde(default)]
        get_or_create: bool,
    },
    Modify {
        name: String,
        #[serde(default)]
        database: Option<String>,
        #[serde(default)]
        new_name: Option<String>,
        #[serde(default)]
        metadata: Option<serde_json::Map<String, serde_json::Value>>,
        #[serde(default)]
        configuration: Option<serde_json::Value>,
    },
    Delete {
        name: String,
        #[serde(default)]
        database: Option<String>,
    },
}

impl ChromaOp {
    pub fn describe(&self) -> String {
        match self {
            ChromaOp::Create { name, .. } => format!("create {name}"),
            ChromaOp::Modify { name, .. } => format!("modify {name}"),
            ChromaOp::Delete { name, .. } => format!("delete {name}"),
        }
    }
}

/// The extensions each engine's files may have.
fn extensions(kind: EngineKind) -> &'static [&'static str] {
    match kind {
        EngineKind::Mongodb => &["json"],
        EngineKind::Redis => &["redis", "txt"],
        EngineKind::Chroma => &["json"],
        EngineKind::Postgres | EngineKind::Rabbitmq => &[],
    }
}

/// Splits a file name into version and description, or `None` for a file that is not a
/// migration (golang-migrate's `.down.json`, a README). A name that looks like a migration but
/// is malformed is an error, so a typo is never silently skipped.
fn split_name(name: &str, kind: EngineKind) -> Result<Option<(Version, String)>> {
    let bad = |why: &str| Error::config(format!("migration {name}: {why}"));
    // golang-migrate: `1_create_users.up.json`; its `.down.json` halves are not ours to run.
    if kind == EngineKind::Mongodb {
        if name.ends_with(".down.json") {
            return Ok(None);
        }
        if let Some(stem) = name.strip_suffix(".up.json") {
            let (v, desc) = stem.split_once('_').unwrap_or((stem, ""));
            let version = Version::parse(v).ok_or_else(|| {
                bad("a golang-migrate file's name starts with its number (`1_name.up.json`)")
            })?;
            return Ok(Some((version, desc.replace('_', " "))));
        }
    }
    if !name.starts_with('V') {
        return Ok(None);
    }
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return Err(bad("no extension"));
    };
    if !extensions(kind).contains(&ext) {
        return Err(bad(&format!(
            "a {kind} migration ends in .{}",
            extensions(kind).join(" or .")
        )));
    }
    let Some((v, desc)) = stem[1..].split_once("__") else {
        return Err(bad("expected V<version>__<description>.<ext>"));
    };
    let version = Version::parse(v).ok_or_else(|| {
        bad(&format!(
            "{v:?} is not a version (digits, optionally dotted: 3, 1.2.10)"
        ))
    })?;
    Ok(Some((version, desc.replace('_', " "))))
}

/// Reads every migration of `kind` under `dir/<kind>/`, sorted by version. A directory that
/// does not exist holds none. Any unreadable or malformed file, or two files with one version,
/// is a configuration error naming the file.
pub fn discover(dir: &Path, kind: EngineKind) -> Result<Vec<MigrationFile>> {
    let sub = dir.join(kind.name());
    let entries = match std::fs::read_dir(&sub) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::config(format!(
                "migrations {}: cannot read: {e}",
                sub.display()
            )));
        }
    };
    let mut files: Vec<MigrationFile> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::config(format!("migrations {}: cannot read: {e}", sub.display()))
        })?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((version, description)) = split_name(&name, kind)? else {
            continue;
        };
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::config(format!("migration {}: cannot read: {e}", path.display()))
        })?;
        let script = parse(kind, &bytes)
            .map_err(|why| Error::config(format!("migration {}: {why}", path.display())))?;
        files.push(MigrationFile {
            version,
            description,
            name,
            sha256: hex::encode(Sha256::digest(&bytes)),
            path,
            script,
        });
    }
    files.sort_by(|a, b| a.version.cmp(&b.version));
    for w in files.windows(2) {
        if w[0].version == w[1].version {
            return Err(Error::config(format!(
                "migrations {} and {} have the same version {}",
                w[0].path.display(),
                w[1].path.display(),
                w[1].version
            )));
        }
    }
    Ok(files)
}

/// Parses a file's body for its engine; the error says where (item or line) and why.
pub fn parse(kind: EngineKind, bytes: &[u8]) -> std::result::Result<Script, String> {
    match kind {
        EngineKind::Mongodb => parse_mongo(bytes).map(Script::Mongo),
        EngineKind::Redis => parse_redis(bytes).map(Script::Redis),
        EngineKind::Chroma => parse_chroma(bytes).map(Script::Chroma),
        EngineKind::Postgres | EngineKind::Rabbitmq => {
            Err(format!("dbkeeper runs no {kind} migrations"))
        }
    }
}

fn parse_mongo(bytes: &[u8]) -> std::result::Result<Vec<MongoCommand>, String> {
    let items: Vec<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON array of commands: {e}"))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |why: String| format!("item {}: {why}", i + 1);
            let serde_json::Value::Object(map) = item else {
                return Err(at("not a command document".into()));
            };
            // `{"db": "app", "command": {…}}` names its database; anything else is a command.
            let is_wrapped = map.len() == 2
                && map.get("db").is_some_and(|d| d.is_string())
                && map.get("command").is_some_and(|c| c.is_object());
            let (db, value) = if is_wrapped {
                let mut map = map;
                let db = map.remove("db").and_then(|d| d.as_str().map(str::to_owned));
                (db, map.remove("command").expect("checked"))
            } else {
                (None, serde_json::Value::Object(map))
            };
            let command = match Bson::try_from(value) {
                Ok(Bson::Document(d)) => d,
                Ok(_) => return Err(at("not a command document".into())),
                Err(e) => return Err(at(format!("not Extended JSON v2: {e}"))),
            };
            if command.is_empty() {
                return Err(at("an empty command".into()));
            }
            Ok(MongoCommand { db, command })
        })
        .collect()
}

fn parse_redis(bytes: &[u8]) -> std::result::Result<Vec<RedisLine>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let args = split_args(trimmed).map_err(|why| format!("line {}: {why}", i + 1))?;
        if args.is_empty() {
            continue;
        }
        if args[0].eq_ignore_ascii_case(b"select") {
            let ok = args.len() == 2
                && std::str::from_utf8(&args[1])
                    .ok()
                    .and_then(|s| s.parse::<u32>().ok())
                    .is_some();
            if !ok {
                return Err(format!("line {}: SELECT takes one db number", i + 1));
            }
        }
        out.push(RedisLine { line: i + 1, args });
    }
    Ok(out)
}

/// Splits a line as redis-cli does (`sdssplitargs`): double quotes with `\n \r \t \b \a \\ \"`
/// and `\xHH` escapes, single quotes with only `\'`, and a closing quote must end the argument.
/// Written out rather than taken from a shell-words crate: POSIX shell quoting differs (no
/// `\xHH`, different escapes inside double quotes), and binary values need the bytes.
pub fn split_args(line: &str) -> std::result::Result<Vec<Vec<u8>>, String> {
    let b = line.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return Ok(out);
        }
        let mut cur = Vec::new();
        let (mut inq, mut insq) = (false, false);
        loop {
            if inq {
                if i >= b.len() {
                    return Err("unbalanced double quote".into());
                }
                if b[i] == b'\\'
                    && i + 3 < b.len()
                    && b[i + 1] == b'x'
                    && b[i + 2].is_ascii_hexdigit()
                    && b[i + 3].is_ascii_hexdigit()
                {
                    let h = std::str::from_utf8(&b[i + 2..i + 4]).expect("hex digits");
                    cur.push(u8::from_str_radix(h, 16).expect("hex digits"));
                    i += 4;
                    continue;
                }
                if b[i] == b'\\' && i + 1 < b.len() {
                    cur.push(match b[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        c => c,
                    });
                    i += 2;
                    continue;
                }
                if b[i] == b'"' {
                    if i + 1 < b.len() && !b[i + 1].is_ascii_whitespace() {
                        return Err("a closing quote must be followed by a space".into());
                    }
                    i += 1;
                    break;
                }
                cur.push(b[i]);
                i += 1;
            } else if insq {
                if i >= b.len() {
                    return Err("unbalanced single quote".into());
                }
                if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\'' {
                    cur.push(b'\'');
                    i += 2;
                    continue;
                }
                if b[i] == b'\'' {
                    if i + 1 < b.len() && !b[i + 1].is_ascii_whitespace() {
                        return Err("a closing quote must be followed by a space".into());
                    }
                    i += 1;
                    break;
                }
                cur.push(b[i]);
                i += 1;
            } else {
                if i >= b.len() || b[i].is_ascii_whitespace() {
                    break;
                }
                match b[i] {
                    b'"' => inq = true,
                    b'\'' => insq = true,
                    c => cur.push(c),
                }
                i += 1;
            }
        }
        out.push(cur);
    }
}

fn parse_chroma(bytes: &[u8]) -> std::result::Result<Vec<ChromaOp>, String> {
    let items: Vec<serde_json::Value> = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JSON array of operations: {e}"))?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value::<ChromaOp>(v).map_err(|e| {
                format!(
                    "item {}: {e} (expected {{\"op\": \"create\"|\"modify\"|\"delete\", \"name\": …}})",
                    i + 1
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_order_numerically() {
        assert!(v("1.2.10") > v("1.2.9"));
        assert!(v("10") > v("9"));
        assert_eq!(v("1.0"), v("1"));
        assert!(v("1.1") > v("1"));
        assert_eq!(v("1_2").as_str(), "1.2");
        for bad in ["", "a", "1..2", "1.x", "-1"] {
            assert!(Version::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn names_split_into_version_and_description() {
        let m = EngineKind::Mongodb;
        let (ver, d) = split_name("V3__add_email_index.json", m).unwrap().unwrap();
        assert_eq!((ver.as_str(), d.as_str()), ("3", "add email index"));
        let (ver, d) = split_name("V1.2.10__x.redis", EngineKind::Redis)
            .unwrap()
            .unwrap();
        assert_eq!((ver.as_str(), d.as_str()), ("1.2.10", "x"));
        let (ver, d) = split_name("2_create_users.up.json", m).unwrap().unwrap();
        assert_eq!((ver.as_str(), d.as_str()), ("2", "create users"));
        assert!(split_name("2_create_users.down.json", m).unwrap().is_none());
        assert!(split_name("README.md", m).unwrap().is_none());
        for bad in ["V3_x.json", "Vx__y.json", "V3__x.yaml", "V3"] {
            let e = split_name(bad, m).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn mongo_items_are_commands_or_wrapped() {
        let s = br#"[{"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1"}]},
                     {"db": "other", "command": {"insert": "c", "documents": [{"at": {"$date": "2020-01-01T00:00:00Z"}, "n": {"$numberLong": "5"}}]}}]"#;
        let Script::Mongo(c) = parse(EngineKind::Mongodb, s).unwrap() else {
            panic!()
        };
        assert_eq!(c[0].db, None);
        assert_eq!(c[0].name(), "createIndexes");
        assert_eq!(c[1].db.as_deref(), Some("other"));
        let doc = c[1].command.get_array("documents").unwrap()[0]
            .as_document()
            .unwrap();
        assert!(matches!(doc.get("at"), Some(Bson::DateTime(_))));
        assert!(matches!(doc.get("n"), Some(Bson::Int64(5))));
        let e = parse(EngineKind::Mongodb, b"[{\"ping\":1}, 3]").unwrap_err();
        assert!(e.starts_with("item 2:"), "{e}");
        assert!(parse(EngineKind::Mongodb, b"{\"ping\":1}").is_err());
    }

    #[test]
    fn redis_lines_split_like_redis_cli() {
        assert_eq!(
            split_args(r#"SET "a b" 'c\'d' "\x41\n" plain"#).unwrap(),
            vec![
                b"SET".to_vec(),
                b"a b".to_vec(),
                b"c'd".to_vec(),
                b"A\n".to_vec(),
                b"plain".to_vec()
            ]
        );
        assert!(split_args(r#"SET "a"b"#).is_err());
        assert!(split_args(r#"SET "a"#).is_err());
        let Script::Redis(l) =
            parse(EngineKind::Redis, b"# comment\n\nSELECT 2\nSET k v\n").unwrap()
        else {
            panic!()
        };
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].line, l[1].text()), (4, "SET k v".to_owned()));
        let e = parse(EngineKind::Redis, b"SET k v\nSELECT x\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn chroma_ops_parse() {
        let s = br#"[{"op": "create", "name": "lore", "metadata": {"a": 1}},
                     {"op": "modify", "name": "lore", "new_name": "lore2"},
                     {"op": "delete", "name": "old"}]"#;
        let Script::Chroma(ops) = parse(EngineKind::Chroma, s).unwrap() else {
            panic!()
        };
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[1].describe(), "modify lore");
        let e = parse(EngineKind::Chroma, br#"[{"op": "drop", "name": "x"}]"#).unwrap_err();
        assert!(e.starts_with("item 1:"), "{e}");
    }

    #[test]
    fn discovery_sorts_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("mongodb");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("V1.2.10__b.json"), "[]").unwrap();
        std::fs::write(m.join("V1.2.9__a.json"), "[{\"ping\": 1}]").unwrap();
        std::fs::write(m.join("notes.txt"), "x").unwrap();
        let f = discover(dir.path(), EngineKind::Mongodb).unwrap();
        let names: Vec<_> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["V1.2.9__a.json", "V1.2.10__b.json"]);
        assert_eq!(f[1].sha256.len(), 64);
        assert!(discover(dir.path(), EngineKind::Redis).unwrap().is_empty());
        std::fs::write(m.join("V1.2.9.0__dup.json"), "[]").unwrap();
        let e = discover(dir.path(), EngineKind::Mongodb).unwrap_err();
        assert_eq!(e.exit_code(), crate::ExitCode::Usage);
        std::fs::remove_file(m.join("V1.2.9.0__dup.json")).unwrap();
        std::fs::write(m.join("V3__bad.json"), "[1").unwrap();
        let e = discover(dir.path(), EngineKind::Mongodb).unwrap_err();
        assert!(e.to_string().contains("V3__bad.json"), "{e}");
    }
}
