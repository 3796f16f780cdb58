//! RabbitMQ harness: private brokers (Debian's `rabbitmq-server`, management plugin on) on
//! loopback, each with its own node name, ports, epmd, data and logs in a temp dir; and a
//! small management-API client for seeding and comparing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

use super::{free_port, wait_until};

/// Where Debian installs the broker's own scripts (the `/usr/sbin` wrappers insist on the
/// rabbitmq user).
const SBIN: &str = "/usr/lib/rabbitmq/bin";

pub struct RabbitServer {
    child: Option<Child>,
    pub amqp_port: u16,
    pub api_port: u16,
    /// The `amqps://` listener, when started with TLS (`ca.crt` in [`RabbitServer::dir`]).
    pub tls_port: Option<u16>,
    epmd_port: u16,
    node: String,
    dir: tempfile::TempDir,
}

impl RabbitServer {
    /// Starts a broker and returns at once; [`RabbitServer::wait_up`] waits for it.
    pub fn spawn() -> RabbitServer {
        Self::spawn_with(false)
    }

    /// Like [`RabbitServer::spawn`], with an `amqps://` listener too when `tls`.
    pub fn spawn_with(tls: bool) -> RabbitServer {
        assert!(
            Path::new(SBIN).join("rabbitmq-server").exists(),
            "rabbitmq-server not found in {SBIN}; install the rabbitmq-server package"
        );
        let dir = tempfile::tempdir().unwrap();
        let amqp_port = free_port();
        let api_port = free_port();
        let epmd_port = free_port();
        let node = format!("dbk-{amqp_port}@localhost");
        let conf = dir.path().join("rabbitmq.conf");
        let mut text = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
             management.tcp.port = {api_port}\n\
             management.tcp.ip = 127.0.0.1\n\
             loopback_users = none\n"
        );
        let tls_port = tls.then(|| {
            super::make_certs(dir.path());
            let port = free_port();
            let d = dir.path().display();
            text.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {d}/ca.crt\n\
                 ssl_options.certfile = {d}/server.crt\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
            ));
            port
        });
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            dir.path().join("enabled_plugins"),
            "[rabbitmq_management].\n",
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(Path::new(SBIN).join("rabbitmq-server"));
        Self::env(&mut cmd, dir.path(), &node, amqp_port, epmd_port);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rabbitmq-server");
        RabbitServer {
            child: Some(child),
            amqp_port,
            api_port,
            tls_port,
            epmd_port,
            node,
            dir,
        }
    }

    fn env(cmd: &mut Command, dir: &Path, node: &str, amqp_port: u16, epmd_port: u16) {
        let dist = free_port();
        cmd.env("HOME", dir)
            .env("RABBITMQ_NODENAME", node)
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"));
    }

    pub fn wait_up(self) -> RabbitServer {
        let up = wait_until(Duration::from_secs(120), || {
            self.api("GET", "/api/overview", None)
                .is_ok_and(|(c, _)| c == 200)
        });
        if !up {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            panic!("rabbitmq did not start ({}):\n{log}", self.node);
        }
        self
    }

    pub fn start() -> RabbitServer {
        Self::spawn().wait_up()
    }

    /// The AMQP URL with the default user's credentials.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}", self.amqp_port)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// `rabbitmqctl` against this node.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(Path::new(SBIN).join("rabbitmqctl"));
        Self::env(
            &mut cmd,
            self.dir.path(),
            &self.node,
            self.amqp_port,
            self.epmd_port,
        );
        cmd.arg("-n").arg(&self.node).args(args).output().unwrap()
    }

    /// One management API request as guest: (status, body).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> std::io::Result<(u16, String)> {
        http(self.api_port, method, path, "guest:guest", body)
    }

    /// A request that must succeed.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<&Value>) -> String {
        let (code, text) = self.api(method, path, body).expect("management API");
        assert!(
            (200..300).contains(&code),
            "{method} {path}: HTTP {code}: {text}"
        );
        text
    }

    pub fn definitions(&self) -> Value {
        serde_json::from_str(&self.api_ok("GET", "/api/definitions", None)).unwrap()
    }

    /// Stops the broker now (kill; a backup in flight sees its connection go).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The start script runs the VM as its child: stop the node by its pid file.
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("rabbit.pid")) {
                let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // The node's epmd is private to this broker (its own port). It refuses to stop while
        // the dead node is still registered, which lasts a moment after the kill.
        let port = self.epmd_port.to_string();
        wait_until(Duration::from_secs(10), || {
            Command::new("epmd")
                .args(["-port", &port, "-kill"])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).contains("not allowed"))
                .unwrap_or(true)
        });
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for RabbitServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP/1.0 request (so the answer is not chunked and ends with the connection) with basic
/// auth and an optional JSON body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    user_pass: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pass);
    super::http_exchange(
        port,
        &format!(
            "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        Duration::from_secs(60),
    )
}

/// The parts of a broker's definitions a restore must reproduce, each list sorted, without
/// the broker's version fields and its own global parameters.
pub fn comparable(d: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for kind in [
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "global_parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        let mut items: Vec<Value> = d[kind]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| {
                kind != "global_parameters"
                    || !matches!(
                        i["name"].as_str(),
                        Some("cluster_name" | "internal_cluster_id")
                    )
            })
            .collect();
        items.sort_by_key(|i| i.to_string());
        out.insert(kind.to_owned(), Value::Array(items));
    }
    Value::Object(out)
}
