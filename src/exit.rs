//! The process exit codes, one enum, as the README's table documents them.

/// Every exit code a dbkeeper role can return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Success, including "preseed skipped: target holds data" and "first start: no backup yet".
    Ok,
    /// The operation failed, or the probed engine is unhealthy.
    Failed,
    /// Bad flag, bad environment variable, malformed value.
    Usage,
    /// An engine was unreachable or not ready before the deadline.
    Unreachable,
    /// The backup repository is missing, corrupt, locked or full.
    Repository,
    /// Interrupted by signal `n`: exits with 128 + n.
    Signal(i32),
}

impl ExitCode {
    pub fn code(self) -> i32 {
        match self {
            ExitCode::Ok => 0,
            ExitCode::Failed => 1,
            ExitCode::Usage => 2,
            ExitCode::Unreachable => 3,
            ExitCode::Repository => 4,
            ExitCode::Signal(n) => 128 + n,
        }
    }

    /// `dbkeeper-health` may only say healthy (0) or unhealthy (1): Docker reserves 2.
    pub fn for_healthcheck(self) -> i32 {
        match self {
            ExitCode::Ok => 0,
            _ => 1,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code.code().clamp(0, 255) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::ExitCode;

    #[test]
    fn codes_match_the_documented_table() {
        assert_eq!(ExitCode::Ok.code(), 0);
        assert_eq!(ExitCode::Failed.code(), 1);
        assert_eq!(ExitCode::Usage.code(), 2);
        assert_eq!(ExitCode::Unreachable.code(), 3);
        assert_eq!(ExitCode::Repository.code(), 4);
        assert_eq!(ExitCode::Signal(15).code(), 143);
        assert_eq!(ExitCode::Signal(2).code(), 130);
    }

    #[test]
    fn healthcheck_never_returns_docker_reserved_codes() {
        for c in [
            ExitCode::Failed,
            ExitCode::Usage,
            ExitCode::Unreachable,
            ExitCode::Repository,
            ExitCode::Signal(15),
        ] {
            assert_eq!(c.for_healthcheck(), 1);
        }
        assert_eq!(ExitCode::Ok.for_healthcheck(), 0);
    }
}
