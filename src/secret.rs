//! Secrets: a wrapper that never prints, `NAME_FILE` resolution (Docker secrets), URL redaction.

use std::fmt;

use crate::error::{Error, Result};

/// A value that must not reach a log line, an error, `Debug` output or `--help`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to the value: call sites that use it are easy to audit.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Resolves a secret from, in order: the flag's value (`flag`), the variable `NAME`, or the file
/// named by `NAME_FILE` (trailing newline stripped). Setting both `NAME` and `NAME_FILE` is an
/// error, as in the official images' `file_env`.
///
/// `env` is passed in so tests (and the process) decide where variables come from.
pub fn resolve(
    name: &str,
    flag: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>> {
    let file_name = format!("{name}_FILE");
    let direct = env(name).filter(|v| !v.is_empty());
    let file = env(&file_name).filter(|v| !v.is_empty());
    if direct.is_some() && file.is_some() {
        return Err(Error::config(format!(
            "both {name} and {file_name} are set; set only one"
        )));
    }
    if let Some(v) = flag {
        return Ok(Some(Secret(v)));
    }
    if let Some(v) = direct {
        return Ok(Some(Secret(v)));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::config(format!("{file_name}={path}: cannot read: {e}")))?;
        let value = text.strip_suffix('\n').unwrap_or(&text);
        let value = value.strip_suffix('\r').unwrap_or(value);
        if value.is_empty() {
            return Err(Error::config(format!("{file_name}={path}: file is empty")));
        }
        return Ok(Some(Secret(value.to_owned())));
    }
    Ok(None)
}

/// Prints a URL with its password (and any `password`/`token` query value) replaced by `***`.
/// Unparseable input is shown only by its scheme, since it may hold a password we cannot find.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            let sensitive = |k: &str| {
                let k = k.to_ascii_lowercase();
                k.contains("password") || k.contains("token") || k.contains("secret")
            };
            if u.query_pairs().any(|(k, _)| sensitive(&k)) {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if sensitive(&k) {
                            "***".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://(unparseable URL)"),
            None => "(unparseable URL)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::env_of;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_variant_is_read_and_newline_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\n").unwrap();
        let env = env_of(&[("X_FILE", p.to_str().unwrap())]);
        let got = resolve("X", None, &env).unwrap().unwrap();
        assert_eq!(got.expose(), "s3cret");
    }

    #[test]
    fn both_set_is_a_configuration_error() {
        let env = env_of(&[("X", "a"), ("X_FILE", "/nonexistent")]);
        let err = resolve("X", None, &env).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.to_string().contains("X_FILE"));
    }

    #[test]
    fn flag_wins_and_missing_file_is_an_error() {
        let env = env_of(&[("X", "env")]);
        assert_eq!(
            resolve("X", Some("flag".into()), &env)
                .unwrap()
                .unwrap()
                .expose(),
            "flag"
        );
        let env = env_of(&[("X_FILE", "/definitely/not/here")]);
        assert!(resolve("X", None, &env).is_err());
        let env = env_of(&[]);
        assert!(resolve("X", None, &env).unwrap().is_none());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:pw@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        let m = redact_url("mongodb://root:p%40ss@db:27017/?authSource=admin");
        assert!(m.contains("root:***@db"), "{m}");
        assert!(!m.contains("p%40ss"));
        let c = redact_url("http://chroma:8000/?token=abc");
        assert!(!c.contains("abc"), "{c}");
        assert!(redact_url("redis://u:pw@[bad").find("pw").is_none());
    }
}
