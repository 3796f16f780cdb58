//! A sidecar run for its continuous archive (MongoDB's oplog or PostgreSQL's WAL): started
//! with a test-sized flush interval and no scheduled backup, read over its HTTP API, stopped
//! with SIGTERM (or killed on drop).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{dbkeeper, free_port, wait_until};

pub struct Archiver {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Archiver {
    /// `env`: the engine's URL and switch (e.g. `DBKEEPER_MONGODB_PITR=on`) and any other
    /// setting; they win over the defaults set here.
    pub fn start(repo: &Path, env: &[(&str, &str)]) -> Archiver {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let port = free_port();
        let mut cmd = dbkeeper(repo);
        cmd.arg("sidecar")
            .env("DBKEEPER_PITR_FLUSH", "200ms")
            .env("DBKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("DBKEEPER_HEALTH_INTERVAL", "200ms")
            .env("DBKEEPER_SCHEDULE", "0 0 1 1 *")
            .env("DBKEEPER_MIN_FREE", "0%")
            // Retention must not take the sets a test restores from.
            .env("DBKEEPER_KEEP_LAST", "10")
            .env("DBKEEPER_LOG", "info,dbkeeper=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let a = Archiver {
            child,
            port,
            log,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(30), || a.get("/health").is_some()),
            "sidecar did not start:\n{}",
            a.log()
        );
        a
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    }

    pub fn alerts(&self) -> Vec<Value> {
        self.get("/alerts")
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| {
                v.as_array()
                    .cloned()
                    .or_else(|| v["alerts"].as_array().cloned())
            })
            .unwrap_or_default()
    }

    /// An unlabelled sample of `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = self.get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// SIGTERM, then its log once it has exited.
    pub fn stop(mut self) -> String {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        self.log()
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
