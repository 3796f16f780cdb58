//! SeaweedFS harness: a private `weed mini` (master, volume, filer and S3 gateway in one
//! process, ~1 s to answer) on loopback ports with its data in a temp dir, static S3
//! credentials (so wrong ones are refused), buckets and upload listings through `rclone`.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wait_until;

pub struct S3Server {
    child: Option<Child>,
    /// The S3 gateway's port.
    pub port: u16,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// The data directory (kept across `restart`).
    pub dir: PathBuf,
    /// How long the last start took until S3 answered a signed request.
    pub started_in: Duration,
    bin: PathBuf,
    /// master, volume, filer, s3, admin: each HTTP port p has its gRPC port at p + 10000,
    /// the offset some of weed's components assume whatever the flags say.
    ports: [u16; 5],
    /// With TLS: the directory of `make_certs`' files and the HTTPS port.
    tls: Option<(PathBuf, u16)>,
    tmp: tempfile::TempDir,
}

/// Where `weed` is: `$DBKEEPER_TEST_WEED`, else `weed` on `PATH`.
pub fn weed_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DBKEEPER_TEST_WEED") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("weed"))
        .find(|p| p.is_file())
}

impl S3Server {
    /// A fresh server, or `None` (saying why) when `weed` is not installed and `CI` is unset.
    /// Under CI a missing `weed` fails the test: the install step is broken.
    pub fn start_or_skip() -> Option<S3Server> {
        match weed_binary() {
            Some(bin) if bin.is_file() => Some(Self::start_with(bin)),
            other => {
                let why = match other {
                    Some(p) => format!("DBKEEPER_TEST_WEED={} does not exist", p.display()),
                    None => "weed not found (set DBKEEPER_TEST_WEED or put weed on PATH; `bash .ci/install` installs it)".into(),
                };
                if std::env::var_os("CI").is_some() {
                    panic!("{why}");
                }
                eprintln!("skipping: {why}");
                None
            }
        }
    }

    pub fn start_with(bin: PathBuf) -> S3Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let config = tmp.path().join("s3.json");
        let access_key = "dbkeeper-test".to_owned();
        let secret_key = format!("test-secret-{}", std::process::id());
        let identities = serde_json::json!({
            "identities": [{
                "name": "dbkeeper",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]
        });
        std::fs::write(&config, identities.to_string()).unwrap();
        let ports = [0; 5].map(|_| port_pair());
        let port = ports[3];
        let mut s = S3Server {
            child: None,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key,
            secret_key,
            dir,
            started_in: Duration::ZERO,
            bin,
            ports,
            tls: None,
            tmp,
        };
        s.spawn();
        s
    }

    /// Also serves S3 over HTTPS, with the certificate `make_certs` wrote into `certs`
    /// (a private CA's, for 127.0.0.1). Returns the HTTPS endpoint.
    pub fn serve_tls(&mut self, certs: &Path) -> String {
        let port = port_pair();
        self.tls = Some((certs.to_owned(), port));
        self.restart();
        format!("https://127.0.0.1:{port}")
    }

    fn spawn(&mut self) {
        let [master, volume, filer, s3, admin] = self.ports;
        let t = self.tmp.path();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("mini")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args(pair("master", master))
            .args(pair("volume", volume))
            .args(pair("filer", filer))
            .args(pair("s3", s3))
            .args(pair("admin", admin))
            .arg(format!(
                "-filer.localSocket={}",
                t.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", t.join("s3.sock").display()))
            .arg(format!("-s3.config={}", t.join("s3.json").display()))
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            .args(self.tls.iter().flat_map(|(d, port)| {
                [
                    format!("-s3.cert.file={}", d.join("server.crt").display()),
                    format!("-s3.key.file={}", d.join("server.key").display()),
                    format!("-s3.port.https={port}"),
                ]
            }))
            .current_dir(t)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(t.join("weed.log")).unwrap());
        let began = Instant::now();
        self.child = Some(cmd.spawn().expect("start weed mini"));
        let ready = wait_until(Duration::from_secs(60), || {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return true;
            }
            // Listing answers as soon as the filer does; a write and a delete also need a
            // volume server registered with the master, which after a restart on the old data
            // dir comes later (an abort then failed with InternalError under load).
            [
                "lsd s:",
                "mkdir s:harness-ready",
                "touch s:harness-ready/probe",
                "deletefile s:harness-ready/probe",
            ]
            .iter()
            .all(|c| {
                let args: Vec<&str> = c.split(' ').collect();
                self.rclone(&args)
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            })
        });
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("weed mini exited ({status}):\n{}", self.log_tail());
        }
        assert!(
            ready,
            "weed mini's S3 did not answer within 60 s:\n{}",
            self.log_tail()
        );
        self.started_in = began.elapsed();
    }

    /// The last lines of weed's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.tmp.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs rclone against this server (remote `s:`), with no config file and none of the
    /// process's AWS variables.
    pub fn rclone(&self, args: &[&str]) -> std::io::Result<Output> {
        let mut c = Command::new("rclone");
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("AWS_") || k.starts_with("RCLONE_") {
                c.env_remove(&*k);
            }
        }
        c.env("RCLONE_CONFIG", self.tmp.path().join("rclone.conf"))
            .env("RCLONE_CONFIG_S_TYPE", "s3")
            .env("RCLONE_CONFIG_S_PROVIDER", "SeaweedFS")
            .env("RCLONE_CONFIG_S_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_S_ACCESS_KEY_ID", &self.access_key)
            .env("RCLONE_CONFIG_S_SECRET_ACCESS_KEY", &self.secret_key)
            .args(["--retries", "1", "--low-level-retries", "1"])
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    pub fn rclone_ok(&self, args: &[&str]) -> String {
        let o = self
            .rclone(args)
            .expect("run rclone (apt-get install rclone)");
        assert!(
            o.status.success(),
            "rclone {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Every object key of `bucket`, sorted.
    pub fn list_keys(&self, bucket: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .rclone_ok(&["lsf", "-R", "--files-only", &format!("s:{bucket}")])
            .lines()
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    /// One object's bytes.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let o = self.rclone(&["cat", &format!("s:{bucket}/{key}")]).unwrap();
        assert!(o.status.success(), "rclone cat {bucket}/{key}: {o:?}");
        o.stdout
    }

    /// Replaces (or creates) one object.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let file = self.tmp.path().join("upload.bin");
        std::fs::write(&file, data).unwrap();
        self.rclone_ok(&[
            "copyto",
            file.to_str().unwrap(),
            &format!("s:{bucket}/{key}"),
        ]);
    }

    pub fn create_bucket(&self, name: &str) {
        self.rclone_ok(&["mkdir", &format!("s:{name}")]);
    }

    /// Keys of the multipart uploads still open in `bucket` (S3 ListMultipartUploads).
    pub fn open_uploads(&self, bucket: &str) -> Vec<String> {
        let out = self.rclone_ok(&["backend", "list-multipart-uploads", &format!("s:{bucket}")]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("list-multipart-uploads answered {out:?}: {e}"));
        v.get(bucket)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.get("Key").and_then(|k| k.as_str()).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Environment for `S3Config::from_url` / the binary: endpoint and credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBKEEPER_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
        ]
    }

    /// SIGKILL, as a crashed store; the data dir stays for `restart`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.kill();
        // The old process's listeners are gone once it is reaped; the ports are ours again.
        self.spawn();
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pair(name: &str, port: u16) -> [String; 2] {
    [
        format!("-{name}.port={port}"),
        format!("-{name}.port.grpc={}", port + 10000),
    ]
}

/// A port p with p and p + 10000 both free, never handed out twice by this process.
fn port_pair() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    let mut seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    loop {
        // xorshift: no rand dependency for picking ports.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let p = 20000 + (seed % 10000) as u16;
        if given.contains(&p) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            given.insert(p);
            return p;
        }
    }
}
