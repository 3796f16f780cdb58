//! The library's one error type: what failed, where, and which exit code it maps to.

use std::path::PathBuf;

use crate::exit::ExitCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure dbkeeper reports. Messages name the engine (by redacted URL) or the path, and
/// say what to do where there is something to do. They never carry a password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag, environment variable or value that cannot be used.
    #[error("configuration: {0}")]
    Config(String),

    /// The engine could not be reached, or answered "not ready" (e.g. Redis `-LOADING`).
    /// Retrying may help.
    #[error("{engine} at {url}: {message}")]
    Unreachable {
        engine: &'static str,
        url: String,
        message: String,
    },

    /// The engine answered but refused us: bad credentials, not a server of that kind, TLS
    /// mismatch. Retrying will not help.
    #[error("{engine} at {url}: {message}")]
    Refused {
        engine: &'static str,
        url: String,
        message: String,
    },

    /// The wait deadline passed before the engine was ready.
    #[error("{engine} at {url} not ready after {waited_s:.1}s: {last}")]
    Deadline {
        engine: &'static str,
        url: String,
        waited_s: f64,
        last: String,
    },

    /// An engine operation (dump, restore, wipe) failed part-way.
    #[error("{engine}: {message}")]
    Engine {
        engine: &'static str,
        message: String,
    },

    /// The target holds data and the operation would overwrite it.
    #[error(
        "{engine} at {url} is not empty ({what}); nothing was changed. Re-run with --force to replace its data"
    )]
    NotEmpty {
        engine: &'static str,
        url: String,
        what: String,
    },

    /// The backup repository is missing, unreadable, or a set in it is corrupt.
    #[error("repository {path}: {message}")]
    Repository { path: PathBuf, message: String },

    /// A backup set failed verification.
    #[error("set {set}: {message}")]
    Corrupt { set: String, message: String },

    /// Another writer holds the repository lock.
    #[error(
        "repository {path} is locked by {holder}; wait for it to finish or retry with --lock-wait"
    )]
    Locked { path: PathBuf, holder: String },

    /// An I/O error on a repository path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An encrypted set that no configured key opens (missing or wrong age identity).
    /// The message names the set and the recipients it was sealed to.
    #[error("{0}")]
    Key(String),

    /// The operation was cancelled by signal `n` (or by an API cancel, with n = 0).
    #[error("interrupted{}", if *.0 > 0 { format!(" by signal {}", .0) } else { String::new() })]
    Interrupted(i32),
}

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    pub fn repo(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Repository {
            path: path.into(),
            message: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn engine(engine: &'static str, msg: impl Into<String>) -> Self {
        Error::Engine {
            engine,
            message: msg.into(),
        }
    }

    /// The engine did not answer (yet): retrying may help.
    pub fn unreachable(engine: &'static str, url: &str, msg: impl Into<String>) -> Self {
        Error::Unreachable {
            engine,
            url: url.to_owned(),
            message: msg.into(),
        }
    }

    /// The engine answered no: retrying cannot help (credentials, protocol).
    pub fn refused(engine: &'static str, url: &str, msg: impl Into<String>) -> Self {
        Error::Refused {
            engine,
            url: url.to_owned(),
            message: msg.into(),
        }
    }

    pub fn corrupt(set: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            set: set.into(),
            message: msg.into(),
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Config(_) => ExitCode::Usage,
            Error::Unreachable { .. } | Error::Deadline { .. } => ExitCode::Unreachable,
            Error::Refused { .. }
            | Error::Engine { .. }
            | Error::NotEmpty { .. }
            | Error::Key(_) => ExitCode::Failed,
            Error::Repository { .. } | Error::Corrupt { .. } | Error::Locked { .. } => {
                ExitCode::Repository
            }
            // An object of the repository on object storage could not be written or read.
            Error::Io { path, .. } if path.starts_with("s3:") => ExitCode::Repository,
            Error::Io { source, .. } => match source.raw_os_error() {
                // ENOSPC and EDQUOT: the repository is full.
                Some(28) | Some(122) => ExitCode::Repository,
                _ => ExitCode::Failed,
            },
            Error::Interrupted(n) if *n > 0 => ExitCode::Signal(*n),
            Error::Interrupted(_) => ExitCode::Failed,
        }
    }

    /// Whether waiting and trying again can help (used by `wait`).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_kind() {
        assert_eq!(Error::config("x").exit_code(), ExitCode::Usage);
        let unreachable = Error::Unreachable {
            engine: "redis",
            url: "redis://h".into(),
            message: "refused".into(),
        };
        assert!(unreachable.is_retryable());
        assert_eq!(unreachable.exit_code(), ExitCode::Unreachable);
        let refused = Error::Refused {
            engine: "redis",
            url: "redis://h".into(),
            message: "WRONGPASS".into(),
        };
        assert!(!refused.is_retryable());
        assert_eq!(refused.exit_code(), ExitCode::Failed);
        assert_eq!(Error::repo("/b", "gone").exit_code(), ExitCode::Repository);
        assert_eq!(Error::Interrupted(15).exit_code(), ExitCode::Signal(15));
        let full = Error::io("/b", std::io::Error::from_raw_os_error(28));
        assert_eq!(full.exit_code(), ExitCode::Repository);
    }
}
