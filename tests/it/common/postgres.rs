//! PostgreSQL server harness: a private cluster (`initdb` into a temp dir) started with
//! `postgres` on a free loopback port, `wal_level=replica`, SCRAM passwords over TCP and
//! trust on its own Unix socket, TLS on request; stopped (immediate shutdown) and reaped on
//! drop. Run as root, the server runs as the `postgres` user (it refuses root), which then
//! owns the temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_until};

/// The superuser's password (SCRAM).
pub const PW: &str = "Pg-s3cret-4711";
/// A login that authenticates with md5 (its own pg_hba.conf line).
pub const MD5_USER: (&str, &str) = ("md5user", "md5-Pw-0815");
/// A login that the server trusts over TCP (its own pg_hba.conf line).
pub const TRUST_USER: &str = "trusty";

/// Where the PostgreSQL 15 programs are (`DBKEEPER_TEST_PG_BIN` overrides).
pub fn pg_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("DBKEEPER_TEST_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found; install postgresql-15 (or set DBKEEPER_TEST_PG_BIN)",
        p.display()
    );
    p
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A command that runs as the `postgres` user when the tests run as root.
pub fn as_pg(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// TLS for a test server: `certs` holds `make_certs`' `server.crt`, `server.key` and `ca.crt`.
#[derive(Clone, Copy)]
pub struct Tls<'a> {
    pub certs: &'a Path,
    /// pg_hba.conf's TCP lines are `hostssl`: a plain-text client finds no entry.
    pub only: bool,
    /// Every TCP line asks for a client certificate the test CA signed (`clientcert=verify-ca`).
    pub client_cert: bool,
}

pub struct PgServer {
    child: Option<Child>,
    pub port: u16,
    /// PGDATA.
    pub data: PathBuf,
    /// The temp dir: PGDATA, the socket, the server log.
    pub root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl PgServer {
    /// A fresh cluster with the test roles, running.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A fresh cluster with the test roles, running, with `ssl = on` when `tls` is given.
    pub fn start_with(tls: Option<Tls>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&root)
                .status()
                .unwrap();
            assert!(ok.success(), "chown of the temp dir to postgres");
        }
        let data = root.join("data");
        let pwfile = root.join("pw");
        std::fs::write(&pwfile, PW).unwrap();
        if is_root() {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&pwfile)
                .status()
                .unwrap();
        }
        let o = as_pg(&pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // First match wins: the md5 and trust logins before initdb's scram lines.
        let hba = data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "host all {TRUST_USER} 127.0.0.1/32 trust\nhost all {} 127.0.0.1/32 md5\n{old}",
                MD5_USER.0
            ),
        )
        .unwrap();
        if let Some(tls) = tls {
            configure_tls(&root, &data, tls);
        }
        let mut s = PgServer {
            child: None,
            port: free_port(),
            data,
            root,
            _tmp: tmp,
        };
        s.run();
        s.psql(&format!(
            "CREATE ROLE {TRUST_USER} LOGIN; SET password_encryption = 'md5'; \
             CREATE ROLE {} LOGIN PASSWORD '{}'; RESET password_encryption; \
             CREATE ROLE keeper LOGIN REPLICATION PASSWORD '{PW}';",
            MD5_USER.0, MD5_USER.1
        ));
        s
    }

    /// A server on an existing PGDATA (e.g. a preseeded one), started in a new temp dir for
    /// its socket and log. The directory is kept.
    pub fn on_data(data: &Path) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        if is_root() {
            Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&root)
                .status()
                .unwrap();
        }
        let mut s = PgServer {
            child: None,
            port: free_port(),
            data: data.to_owned(),
            root,
            _tmp: tmp,
        };
        s.run();
        s
    }

    /// Starts the server on its data directory and waits until it takes a query (or, in
    /// recovery, a connection).
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.root.join("server.log")).unwrap();
        let child = as_pg(&pg_bin("postgres"))
            .arg("-D")
            .arg(&self.data)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.root.display()))
            .args([
                "-c",
                "wal_level=replica",
                "-c",
                "fsync=off",
                "-c",
                "max_wal_senders=4",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ok = wait_until(Duration::from_secs(60), || {
            Command::new(pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        assert!(
            ok,
            "postgres did not start: {}",
            std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
        );
    }

    /// Immediate shutdown (SIGQUIT to the postmaster), then reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = c.wait();
        }
    }

    /// The superuser's URL (SCRAM).
    pub fn url(&self) -> String {
        self.url_as("postgres", Some(PW))
    }

    pub fn url_as(&self, user: &str, pw: Option<&str>) -> String {
        match pw {
            Some(pw) => format!("postgres://{user}:{pw}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://{user}@127.0.0.1:{}/postgres", self.port),
        }
    }

    /// Runs SQL as the superuser over the Unix socket; returns its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let o = Command::new(pg_bin("psql"))
            .arg("-h")
            .arg(&self.root)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-XAtq", "-c", sql])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

/// Copies the server's certificate and key into the temp dir (the key the server's user's, mode
/// 0600, as the server insists), turns `ssl` on and rewrites pg_hba.conf's TCP lines.
fn configure_tls(root: &Path, data: &Path, tls: Tls) {
    for (name, mode) in [
        ("server.crt", 0o644),
        ("server.key", 0o600),
        ("ca.crt", 0o644),
    ] {
        let to = root.join(name);
        std::fs::copy(tls.certs.join(name), &to).unwrap();
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
        if is_root() {
            let ok = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&to)
                .status()
                .unwrap();
            assert!(ok.success(), "chown of {name} to postgres");
        }
    }
    let mut conf = format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
        root.join("server.crt").display(),
        root.join("server.key").display()
    );
    if tls.client_cert {
        conf += &format!("ssl_ca_file = '{}'\n", root.join("ca.crt").display());
    }
    let pgconf = data.join("postgresql.conf");
    let old = std::fs::read_to_string(&pgconf).unwrap();
    std::fs::write(&pgconf, format!("{old}\n{conf}")).unwrap();
    let hba = data.join("pg_hba.conf");
    let lines: Vec<String> = std::fs::read_to_string(&hba)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("host ") {
            Some(rest) => {
                let kind = if tls.only { "hostssl" } else { "host" };
                let opt = if tls.client_cert {
                    " clientcert=verify-ca"
                } else {
                    ""
                };
                format!("{kind} {rest}{opt}")
            }
            None => l.to_owned(),
        })
        .collect();
    std::fs::write(&hba, lines.join("\n") + "\n").unwrap();
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
