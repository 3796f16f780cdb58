//! Redis server harness: private `redis-server` processes on free loopback ports, each with
//! its data in a temp dir (or a given one), killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use super::{free_port, server_binary, wait_until};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    pub password: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// How to start a server.
#[derive(Default, Clone)]
pub struct Opts<'a> {
    pub password: Option<&'a str>,
    /// Start on this data directory (kept) instead of a fresh temp dir.
    pub dir: Option<&'a Path>,
    /// `appendonly yes` (with its multi-part AOF in `appendonlydir/`).
    pub appendonly: bool,
    /// More `--name value` arguments for redis-server.
    pub extra: &'a [&'a str],
    /// Return once the port answers at all (even `-LOADING`), not only once PING succeeds.
    pub no_wait: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(Opts::default())
    }

    pub fn with_password(pw: &str) -> Self {
        Self::start_with(Opts {
            password: Some(pw),
            ..Opts::default()
        })
    }

    /// A server on an existing data directory, loading whatever is in it.
    pub fn on_dir(dir: &Path, appendonly: bool) -> Self {
        Self::start_with(Opts {
            dir: Some(dir),
            appendonly,
            ..Opts::default()
        })
    }

    pub fn start_with(o: Opts<'_>) -> Self {
        let bin = server_binary(
            "DBKEEPER_TEST_REDIS_SERVER",
            "redis/redis-server",
            "redis-server",
        );
        let (tmp, dir) = match o.dir {
            Some(d) => (None, d.to_owned()),
            None => {
                let t = tempfile::tempdir().unwrap();
                let d = t.path().to_owned();
                (Some(t), d)
            }
        };
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--enable-debug-command", "yes"])
            .args(["--appendonly", if o.appendonly { "yes" } else { "no" }])
            .args(["--repl-diskless-sync-delay", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = o.password {
            cmd.args(["--requirepass", pw]);
        }
        cmd.args(o.extra);
        let child = cmd.spawn().expect("start redis-server");
        let mut s = RedisServer {
            child,
            port,
            dir,
            password: o.password.map(str::to_owned),
            _tmp: tmp,
        };
        let ready = wait_until(Duration::from_secs(30), || {
            s.try_cli(&["PING"])
                .map(|out| {
                    let text = String::from_utf8_lossy(&out.stdout);
                    text.trim() == "PONG" || (o.no_wait && text.contains("LOADING"))
                })
                .unwrap_or(false)
        });
        if !ready {
            let status = s.child.try_wait();
            panic!("redis-server on port {port} did not answer PING ({status:?})");
        }
        s
    }

    /// `redis://[:password@]127.0.0.1:port`
    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn try_cli(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut c = Command::new("redis-cli");
        c.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            c.env("REDISCLI_AUTH", pw);
        }
        c.args(args).output()
    }

    /// Runs redis-cli and returns its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.try_cli(args).expect("run redis-cli");
        assert!(o.status.success(), "redis-cli {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// `DEBUG DIGEST`: one hash of every key, value and expiry.
    pub fn digest(&self) -> String {
        let d = self.cli(&["DEBUG", "DIGEST"]);
        assert_eq!(d.len(), 40, "DEBUG DIGEST answered {d:?}");
        d
    }

    /// Total keys over every db.
    pub fn total_keys(&self) -> u64 {
        let info = self.cli(&["INFO", "keyspace"]);
        info.lines()
            .filter_map(|l| {
                l.split_once(":keys=")?
                    .1
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Stops the server (no save), keeping its directory.
    pub fn stop(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dir.clone()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
