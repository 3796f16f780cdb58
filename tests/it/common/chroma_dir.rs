//! A Chroma server on a persist directory the test owns (seeded, stopped, copied, preseeded),
//! stopped gracefully so that its files are whole when the test copies them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::chroma::http_status;
use super::{free_port, server_binary, wait_until};

pub struct ChromaDirServer {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl ChromaDirServer {
    /// `chroma run --path dir` on a free loopback port, up when its heartbeat answers.
    pub fn start(dir: &Path) -> ChromaDirServer {
        let bin = server_binary("DBKEEPER_TEST_CHROMA", "venv/bin/chroma", "chroma");
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args([
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--path",
            ])
            .arg(dir)
            .env("ANONYMIZED_TELEMETRY", "False")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start chroma");
        let mut s = ChromaDirServer {
            child: Some(child),
            port,
            log,
            _logdir: logdir,
        };
        if !wait_until(Duration::from_secs(60), || {
            http_status(port, "/api/v2/heartbeat") == Some(200)
        }) {
            s.kill();
            panic!(
                "chroma did not start on {}:\n{}",
                dir.display(),
                std::fs::read_to_string(&s.log).unwrap_or_default()
            );
        }
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGTERM, then wait for the server to exit (SIGKILL after 30 s).
    pub fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let exited = wait_until(Duration::from_secs(30), || {
                matches!(c.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChromaDirServer {
    fn drop(&mut self) {
        self.kill();
    }
}
