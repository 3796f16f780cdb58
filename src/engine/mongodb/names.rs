//! Namespaces: which databases are the server's own, mongodump's escaping of collection names
//! into file names, and the include/exclude filter.

use crate::error::{Error, Result};

/// Databases that belong to the server, never dumped, restored or wiped.
pub const SYSTEM_DBS: [&str; 3] = ["admin", "local", "config"];

pub fn is_system_db(db: &str) -> bool {
    SYSTEM_DBS.contains(&db)
}

/// Collections a dump carries. The server's `system.*` collections are not data (views are
/// recorded from `listCollections`, timeseries buckets through their timeseries collection),
/// except `system.js`, which holds user functions and mongodump keeps too.
pub fn is_dumped_collection(name: &str) -> bool {
    !name.starts_with("system.") || name == "system.js"
}

/// mongodump's file name for a collection: Go's `url.PathEscape` (bytes outside
/// `A-Za-z0-9-_.~$&+:=@` become `%XX`, so `/` can never split a path), plus a leading `.`
/// escaped so a name never makes a hidden file. `mongorestore` and [`unescape`] undo it.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'_' | b'~' | b'$' | b'&' | b'+' | b':' | b'=' | b'@'
            )
            || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The collection name a mongodump file name stands for (what mongorestore does with it;
/// here it proves [`escape`] loses nothing, and `import` reads a stock dump's file names).
pub fn unescape(file: &str) -> Result<String> {
    let bytes = file.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config(format!("{file:?}: bad %-escape")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config(format!("{file:?}: not UTF-8 once unescaped")))
}

/// Which namespaces a dump, restore or wipe touches. Patterns are `db` (the whole database),
/// `db.coll` (one collection; the first `.` separates, as in MongoDB) or `db.*`.
/// Empty `include` means everything; `exclude` wins over `include`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    db: String,
    coll: Option<String>,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern> {
        let s = s.trim();
        let (db, coll) = match s.split_once('.') {
            Some((db, "*")) => (db, None),
            Some((db, coll)) => (db, Some(coll.to_owned())),
            None => (s, None),
        };
        if db.is_empty() || coll.as_deref() == Some("") {
            return Err(Error::config(format!(
                "MongoDB namespace pattern {s:?}: expected db, db.collection or db.*"
            )));
        }
        Ok(Pattern {
            db: db.to_owned(),
            coll,
        })
    }

    fn matches_db(&self, db: &str) -> bool {
        self.db == db
    }

    fn matches(&self, db: &str, coll: &str) -> bool {
        self.db == db && self.coll.as_deref().is_none_or(|c| c == coll)
    }
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter> {
        let parse = |v: &[String]| -> Result<Vec<Pattern>> {
            v.iter()
                .filter(|s| !s.trim().is_empty())
                .map(|s| Pattern::parse(s))
                .collect()
        };
        Ok(Filter {
            include: parse(include)?,
            exclude: parse(exclude)?,
        })
    }

    pub fn is_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    /// Whether any collection of `db` may be selected (to skip listing a database at all).
    pub fn wants_db(&self, db: &str) -> bool {
        if is_system_db(db) {
            return false;
        }
        let included = self.include.is_empty() || self.include.iter().any(|p| p.matches_db(db));
        let excluded_whole = self
            .exclude
            .iter()
            .any(|p| p.coll.is_none() && p.matches_db(db));
        included && !excluded_whole
    }

    /// Whether the filter selects every collection of `db` (so the database may be dropped
    /// whole).
    pub fn wants_whole_db(&self, db: &str) -> bool {
        self.wants_db(db)
            && !self.exclude.iter().any(|p| p.matches_db(db))
            && (self.include.is_empty()
                || self
                    .include
                    .iter()
                    .any(|p| p.coll.is_none() && p.matches_db(db)))
    }

    pub fn wants(&self, db: &str, coll: &str) -> bool {
        self.wants_db(db)
            && (self.include.is_empty() || self.include.iter().any(|p| p.matches(db, coll)))
            && !self.exclude.iter().any(|p| p.matches(db, coll))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_mongodump() {
        // The fixture from mongo-tools: specialcharacter/db1/caf%C3%A9s.bson
        assert_eq!(escape("cafés"), "caf%C3%A9s");
        assert_eq!(escape("a/b"), "a%2Fb");
        assert_eq!(escape("with space"), "with%20space");
        assert_eq!(escape("dots.in.name"), "dots.in.name");
        assert_eq!(escape(".hidden"), "%2Ehidden");
        assert_eq!(escape("a$b:c=d@e&f+g~h"), "a$b:c=d@e&f+g~h");
        assert_eq!(escape("q?;,#%"), "q%3F%3B%2C%23%25");
        for n in ["cafés", "a/b", ".hidden", "日本語", "x%41", "q?;,#%", "a b"] {
            assert_eq!(unescape(&escape(n)).unwrap(), n);
        }
        assert!(unescape("bad%4").is_err());
        assert!(unescape("bad%FF").is_err());
    }

    #[test]
    fn filters_select_namespaces() {
        let all = Filter::new(&[], &[]).unwrap();
        assert!(all.is_all());
        assert!(all.wants("app", "users"));
        assert!(!all.wants("admin", "users"));
        assert!(!all.wants_db("local"));

        let f = Filter::new(
            &["app".into(), "logs.events".into()],
            &["app.secret".into()],
        )
        .unwrap();
        assert!(f.wants("app", "users"));
        assert!(!f.wants("app", "secret"));
        assert!(f.wants("logs", "events"));
        assert!(!f.wants("logs", "other"));
        assert!(!f.wants("other", "x"));
        assert!(f.wants_db("logs"));
        assert!(!f.wants_whole_db("logs"));
        assert!(!f.wants_whole_db("app"));

        let f = Filter::new(&[], &["tmp".into(), "app.cache.v2".into()]).unwrap();
        assert!(!f.wants_db("tmp"));
        assert!(f.wants("app", "cache"));
        assert!(!f.wants("app", "cache.v2"));
        assert!(f.wants_whole_db("other"));

        assert!(Filter::new(&["".into(), " ".into()], &[]).unwrap().is_all());
        assert!(Filter::new(&[".x".into()], &[]).is_err());
        assert!(Filter::new(&["db.".into()], &[]).is_err());
    }
}
