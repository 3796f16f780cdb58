//! The repository on S3-compatible object storage: a blocking client over `object_store`,
//! with streaming reads and multipart writes in bounded memory, stale-upload cleanup and a
//! leased writer lock.
//!
//! Every request runs on one process-wide runtime of its own, and callers wait for it with a
//! plain thread park. So the API can be called from plain threads, `spawn_blocking` threads
//! and async tasks alike (a current-thread runtime included) without nesting runtimes and
//! without needing the caller's runtime to make progress.
//!
//! S3 has no cheap "list my unfinished uploads" that `object_store` exposes, so each multipart
//! upload is recorded, as it is created, by a marker object `<prefix>/.multipart/<hash>`; the next
//! lock holder aborts whatever the markers name (`abort_stale_uploads`).
//!
//! The lock is an object written with a conditional put (`If-None-Match: *`), renewed and taken
//! over with `If-Match` on its ETag. Amazon S3, MinIO, Cloudflare R2 and SeaweedFS (4.x) honour
//! both atomically; on a store that ignored them two writers could both believe they hold it.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, MultipartId, ObjectStore, ObjectStoreExt, PutMode,
    PutPayload, RetryConfig, UpdateVersion,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::secret::{self, Secret};

/// Size of one multipart part. S3 wants at least 5 MiB for all parts but the last; 8 MiB keeps
/// 10,000 parts (the S3 limit) above 78 GiB per object.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts uploading at once per writer. With the part being filled, a writer holds at most
/// `(MAX_PARTS_IN_FLIGHT + 1) * PART_SIZE` = 40 MiB whatever the object size.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// Chunks a streaming GET may buffer ahead of its reader. hyper hands over at most a few hundred
/// KiB per chunk (usually 16 KiB), so this bounds read-ahead to a few MB.
const READ_AHEAD_CHUNKS: usize = 16;

/// Where multipart-upload markers live, below the store prefix. Not `.uploads`: SeaweedFS
/// keeps its own unfinished uploads in `.uploads` directories and hides any such name from
/// listings.
const UPLOADS_DIR: &str = ".multipart";

/// How long a dropped writer or lock waits for its best-effort cleanup.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a contender looks at a live lock again.
const LOCK_POLL: Duration = Duration::from_millis(500);

const DEFAULT_REGION: &str = "us-east-1";

/// Where the repository is on object storage and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix of the repository: no leading or trailing `/`; may be empty.
    pub prefix: String,
    /// A custom endpoint (MinIO, SeaweedFS, Ceph…): requests use path-style addressing.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    /// A PEM bundle trusted in addition to the system roots (a private endpoint's CA).
    pub ca_file: Option<PathBuf>,
}

impl S3Config {
    /// Parses `s3://bucket[/prefix]` plus the settings: `DBKEEPER_S3_ENDPOINT` (custom endpoint,
    /// path-style; `http://` allowed), `DBKEEPER_S3_REGION` (default us-east-1),
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (each also as `NAME_FILE`) and
    /// `DBKEEPER_S3_CA_FILE`.
    pub fn from_url(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<S3Config> {
        let (bucket, prefix) = parse_s3_url(url)?;
        let get = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let endpoint = get("DBKEEPER_S3_ENDPOINT")
            .map(|e| check_endpoint(&e))
            .transpose()?;
        let region = get("DBKEEPER_S3_REGION");
        let access_key_id = secret::resolve("AWS_ACCESS_KEY_ID", None, env)?;
        let secret_access_key = secret::resolve("AWS_SECRET_ACCESS_KEY", None, env)?;
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(Error::config(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not; set both or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not; set both or neither",
                ));
            }
            _ => {}
        }
        let ca_file = get("DBKEEPER_S3_CA_FILE").map(PathBuf::from);
        Ok(S3Config {
            bucket,
            prefix,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            ca_file,
        })
    }

    /// `s3://bucket/prefix` (or `s3://bucket`): for messages, never with a secret.
    pub fn url(&self) -> String {
        display_url(&self.bucket, &self.prefix)
    }
}

fn display_url(bucket: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

/// `s3://bucket[/prefix]` → (bucket, prefix without surrounding slashes).
fn parse_s3_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::config(format!("{url:?}: {why}; expected s3://bucket[/prefix]"));
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// URL"))?;
    if rest.contains(['?', '#']) {
        return Err(bad("query strings and fragments are not supported"));
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.contains('@') {
        // Never echo what may be a key pair: the URL is not printed back in this case.
        return Err(Error::config(
            "the s3:// URL holds credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or their _FILE variants) instead",
        ));
    }
    if bucket.is_empty() {
        return Err(bad("the bucket name is missing"));
    }
    // S3's own rules (3-63 of a-z, 0-9, '.', '-') are enforced by the store; be lenient with
    // what S3-compatible stores allow and reject only what cannot be a bucket at all.
    if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(bad(
            "the bucket name may hold only letters, digits, '.', '-' and '_'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|s| (s.is_empty() && !prefix.is_empty()) || s == "." || s == "..")
    {
        return Err(bad("the prefix has an empty, '.' or '..' segment"));
    }
    if prefix.chars().any(|c| c.is_control()) {
        return Err(bad("the prefix holds control characters"));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

fn check_endpoint(raw: &str) -> Result<String> {
    let bad = |why: &str| {
        Error::config(format!(
            "DBKEEPER_S3_ENDPOINT={}: {why}",
            secret::redact_url(raw)
        ))
    };
    let u = url::Url::parse(raw).map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("expected http:// or https://"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad(
            "credentials belong in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, not in the URL",
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("query strings are not supported"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

// ---------------------------------------------------------------------------------------------
// The dedicated runtime and waiting on it from any thread.

/// Never dropped: dropping a runtime from inside another one panics, and the store may be used
/// until the process exits.
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dbkeeper-s3")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads or an epoll fd: nothing can run then.
            .expect("cannot start the object-store runtime")
    })
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on the calling thread, parking between wake-ups. Used only on futures that
/// need no runtime of their own (join handles, channel receivers), so it works on any thread,
/// inside a runtime or not, and never panics the way `Handle::block_on` would.
fn park_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Runs `fut` on the dedicated runtime and waits for it. `None` if the task died (a panic in
/// a dependency); callers turn that into an error.
fn run<T: Send + 'static>(fut: impl Future<Output = T> + Send + 'static) -> Option<T> {
    park_on(runtime().spawn(fut)).ok()
}

// ---------------------------------------------------------------------------------------------
// The store.

/// A connected repository on object storage. Cheap to clone (one shared HTTP client).
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    /// Where requests go, for "cannot reach" messages.
    endpoint: String,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // AmazonS3's own Debug shows its configuration; ours shows only where.
        f.debug_struct("S3Store")
            .field("url", &self.url())
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

/// What an `object_store` error means to us.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    NotFound,
    NoSuchBucket,
    /// Conditional request lost: the object exists (create) or changed (update).
    Precondition,
    Credentials(String),
    Unreachable,
    Other,
}

impl S3Store {
    /// Builds the client; does no network I/O (see [`S3Store::check`]).
    pub fn connect(cfg: &S3Config) -> Result<S3Store> {
        // reqwest is built without a default crypto provider: it uses the process's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let region = cfg.region.as_deref().unwrap_or(DEFAULT_REGION);
        let mut options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // No whole-request timeout: a part upload or a streamed read may rightly take
            // minutes; a store that stops answering is caught by the read timeout.
            .with_timeout_disabled()
            .with_read_timeout(Duration::from_secs(60));
        let endpoint = match &cfg.endpoint {
            Some(e) => {
                options = options.with_allow_http(e.starts_with("http://"));
                e.clone()
            }
            None => format!("https://{}.s3.{region}.amazonaws.com", cfg.bucket),
        };
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(format!(
                    "DBKEEPER_S3_CA_FILE={}: cannot read: {e}",
                    path.display()
                ))
            })?;
            let certs = Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::config(format!(
                    "DBKEEPER_S3_CA_FILE={}: not a PEM certificate bundle: {e}",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(Error::config(format!(
                    "DBKEEPER_S3_CA_FILE={}: no certificate in the file",
                    path.display()
                )));
            }
            for c in certs {
                options = options.with_root_certificate(c);
            }
        }
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(region)
            .with_client_options(options)
            .with_retry(RetryConfig {
                // A few quick retries ride out a restart or a dropped connection; more would only
                // delay the one-line error an operator needs when the store is down.
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(4),
                    base: 2.0,
                },
                max_retries: 4,
                retry_timeout: Duration::from_secs(30),
            });
        match &cfg.endpoint {
            Some(e) => {
                b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
            }
            None => b = b.with_virtual_hosted_style_request(true),
        }
        if let (Some(id), Some(key)) = (&cfg.access_key_id, &cfg.secret_access_key) {
            b = b
                .with_access_key_id(id.expose())
                .with_secret_access_key(key.expose());
        }
        let url = cfg.url();
        let store = b
            .build()
            .map_err(|e| Error::config(format!("{url}: {}", one_line(&e))))?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                bucket: cfg.bucket.clone(),
                prefix: cfg.prefix.clone(),
                endpoint,
            }),
        })
    }

    /// `s3://bucket/prefix`, for messages; never holds a secret.
    pub fn url(&self) -> String {
        display_url(&self.inner.bucket, &self.inner.prefix)
    }

    /// One cheap request (a one-key listing) that tells a missing bucket, refused credentials
    /// and an unreachable endpoint apart.
    pub fn check(&self) -> Result<()> {
        let store = self.inner.store.clone();
        let prefix = self.key("").as_ref().to_owned();
        let opts = PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        let res = self.wait(async move {
            let p = (!prefix.is_empty()).then_some(prefix);
            store.list_paginated(p.as_deref(), opts).await.map(|_| ())
        })?;
        res.map_err(|e| self.err("list", "", e))
    }

    /// Names of the "directories" directly below `prefix/rel` (common prefixes), sorted.
    ///
    /// Derived from the recursive listing, not from a delimiter listing: SeaweedFS keeps
    /// reporting a prefix as a directory after its last object is deleted, where S3 does not.
    /// A repository holds a handful of objects per set, so this stays a page or two.
    pub fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        let base = rel.trim_matches('/');
        let mut names = std::collections::BTreeSet::new();
        for m in self.list_meta(rel)? {
            let full = self.rel_of(&m.location);
            let below = if base.is_empty() {
                Some(full.as_str())
            } else {
                full.strip_prefix(base).and_then(|r| r.strip_prefix('/'))
            };
            if let Some((dir, _)) = below.and_then(|b| b.split_once('/')) {
                names.insert(dir.to_owned());
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Every object below `prefix/rel`, recursively, as (path relative to the store prefix,
    /// size), sorted by path.
    pub fn list_files(&self, rel: &str) -> Result<Vec<(String, u64)>> {
        let metas = self.list_meta(rel)?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .map(|m| (self.rel_of(&m.location), m.size))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Every object below `prefix/rel` with its size and ETag, relative to `prefix/rel/`.
    pub fn list_tagged(&self, rel: &str) -> Result<Vec<(String, u64, Option<String>)>> {
        let base = format!("{}/", rel.trim_end_matches('/'));
        Ok(self
            .list_meta(rel)?
            .into_iter()
            .filter_map(|m| {
                let p = self.rel_of(&m.location);
                p.strip_prefix(&base)
                    .map(|r| (r.to_owned(), m.size, m.e_tag))
            })
            .collect())
    }

    fn list_meta(&self, rel: &str) -> Result<Vec<object_store::ObjectMeta>> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        let res = self.wait(async move {
            let p = (!key.as_ref().is_empty()).then_some(key);
            let mut s = store.list(p.as_ref());
            let mut v = Vec::new();
            while let Some(m) = s.next().await {
                v.push(m?);
            }
            Ok::<_, object_store::Error>(v)
        })?;
        res.map_err(|e| self.err("list", rel, e))
    }

    /// The object's size (a HEAD); `None` if it does not exist.
    pub fn size(&self, rel: &str) -> Result<Option<u64>> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        match self.wait(async move { store.head(&key).await })? {
            Ok(m) => Ok(Some(m.size)),
            Err(e) => self.absent_or(e, "head", rel),
        }
    }

    /// A small object whole (a manifest); `None` if it does not exist.
    pub fn read_all(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        let res = self.wait(async move {
            let r = store.get(&key).await?;
            r.bytes().await
        })?;
        match res {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(e) => self.absent_or(e, "read", rel),
        }
    }

    /// Streams an object. At most [`READ_AHEAD_CHUNKS`] chunks are buffered ahead of the
    /// reader; a failure mid-stream is an `io::Error` from `read`, and a stream that stops
    /// early is never mistaken for the end of the object.
    pub fn get(&self, rel: &str) -> Result<Box<dyn io::Read + Send>> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        let first = self.wait(async move { store.get(&key).await })?;
        let got = first.map_err(|e| self.err("read", rel, e))?;
        let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
        let what = format!("{}/{rel}", self.url());
        let task = runtime().spawn(async move {
            let mut stream = got.into_stream();
            while let Some(item) = stream.next().await {
                let msg = match item {
                    Ok(b) => Chunk::Data(b),
                    Err(e) => Chunk::Failed(format!("{what}: {}", one_line(&e))),
                };
                let failed = matches!(msg, Chunk::Failed(_));
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
            let _ = tx.send(Chunk::End).await;
        });
        Ok(Box::new(ObjectReader {
            rx,
            cur: Bytes::new(),
            done: false,
            task,
        }))
    }

    /// One PUT, replacing any object of that name.
    pub fn put_small(&self, rel: &str, data: Vec<u8>) -> Result<()> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        let res = self.wait(async move { store.put(&key, PutPayload::from(data)).await })?;
        res.map(|_| ()).map_err(|e| self.err("write", rel, e))
    }

    /// A streaming upload of `prefix/rel`, visible only once [`S3Writer::finish`] returns.
    pub fn writer(&self, rel: &str) -> Result<S3Writer> {
        Ok(S3Writer {
            store: self.clone(),
            rel: rel.to_owned(),
            key: self.key(rel),
            buf: Vec::new(),
            upload: None,
            written: 0,
            failed: None,
        })
    }

    /// Deletes an object; one that does not exist is fine.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let store = self.inner.store.clone();
        let key = self.key(rel);
        match self.wait(async move { store.delete(&key).await })? {
            Ok(()) => Ok(()),
            Err(e) => self.absent_or::<()>(e, "delete", rel).map(|_| ()),
        }
    }

    /// Deletes every object below `prefix/rel`; returns how many there were.
    pub fn delete_prefix(&self, rel: &str) -> Result<usize> {
        if rel.trim_matches('/').is_empty() {
            // A slip here would empty the whole repository.
            return Err(Error::repo(
                self.url(),
                "refusing to delete the whole repository prefix",
            ));
        }
        let metas = self.list_meta(rel)?;
        let n = metas.len();
        let store = self.inner.store.clone();
        let paths: Vec<ObjPath> = metas.into_iter().map(|m| m.location).collect();
        let res = self.wait(async move {
            let input = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
            let mut out = store.delete_stream(input);
            while let Some(r) = out.next().await {
                match r {
                    Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        res.map_err(|e| self.err("delete", rel, e))?;
        Ok(n)
    }

    /// Takes the repository's writer lock `prefix/rel`, waiting up to `wait` for a live holder
    /// to release it. A lock whose lease ran out (its holder died) is taken over.
    pub fn lock(&self, rel: &str, holder: &str, lease: Duration, wait: Duration) -> Result<S3Lock> {
        let key = self.key(rel);
        let deadline = Instant::now() + wait;
        // A store that has just restarted may answer 5xx for a moment: errors are retried for
        // a few seconds (or the whole wait, when longer) before they are reported.
        let patience = Instant::now() + wait.max(Duration::from_secs(5));
        loop {
            let attempt = match self.try_lock(&key, rel, holder, lease) {
                Ok(a) => a,
                Err(e) if Instant::now() < patience => {
                    debug!(error = %e, "taking the repository lock failed; retrying");
                    std::thread::sleep(LOCK_POLL);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match attempt {
                Attempt::Held(e_tag) => return Ok(S3Lock::start(self, key, holder, lease, e_tag)),
                Attempt::Retry => continue,
                Attempt::Busy(body) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Locked {
                            path: PathBuf::from(self.url()),
                            holder: format!(
                                "{} until {}",
                                body.holder,
                                body.expires_at
                                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                            ),
                        });
                    }
                    debug!(holder = %body.holder, "repository lock busy, waiting");
                    std::thread::sleep(
                        LOCK_POLL.min(deadline.saturating_duration_since(Instant::now())),
                    );
                }
            }
        }
    }

    fn try_lock(&self, key: &ObjPath, rel: &str, holder: &str, lease: Duration) -> Result<Attempt> {
        let body = LockBody::new(holder, lease);
        let store = self.inner.store.clone();
        let k = key.clone();
        let json = body.to_json();
        let created = self.wait(async move {
            store
                .put_opts(&k, PutPayload::from(json), PutMode::Create.into())
                .await
        })?;
        match created {
            Ok(r) => return Ok(Attempt::Held(r.e_tag)),
            Err(e) if classify(&e) == Kind::Precondition => {}
            Err(e) => return Err(self.err("lock", rel, e)),
        }
        // Someone holds it, or held it and died: look.
        let store = self.inner.store.clone();
        let k = key.clone();
        let current = self.wait(async move {
            let r = store.get(&k).await?;
            let meta = r.meta.clone();
            Ok::<_, object_store::Error>((meta, r.bytes().await?))
        })?;
        let (meta, bytes) = match current {
            Ok(v) => v,
            Err(e) if classify(&e) == Kind::NotFound => return Ok(Attempt::Retry),
            Err(e) => return Err(self.err("lock", rel, e)),
        };
        let theirs = LockBody::parse(&bytes).unwrap_or_else(|| LockBody {
            // Not ours to read (another version, or damage): honour it for one lease from its
            // last write rather than break a lock we do not understand.
            holder: "an unreadable lock object".into(),
            expires_at: meta.last_modified
                + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
        });
        if theirs.expires_at > Utc::now() {
            return Ok(Attempt::Busy(theirs));
        }
        let store = self.inner.store.clone();
        let k = key.clone();
        let json = body.to_json();
        let mode = PutMode::Update(UpdateVersion {
            e_tag: meta.e_tag.clone(),
            version: None,
        });
        let taken = self.wait(async move {
            store
                .put_opts(&k, PutPayload::from(json), mode.into())
                .await
        })?;
        match taken {
            Ok(r) => {
                warn!(
                    previous = %theirs.holder,
                    "took over the repository lock of a writer whose lease ran out"
                );
                Ok(Attempt::Held(r.e_tag))
            }
            // Another contender took it first, or the holder renewed just in time.
            Err(e) if matches!(classify(&e), Kind::Precondition | Kind::NotFound) => {
                Ok(Attempt::Retry)
            }
            Err(e) => Err(self.err("lock", rel, e)),
        }
    }

    /// Aborts the multipart uploads that writers recorded and never finished (killed, or lost
    /// the store mid-upload). An upload that is already gone is fine. Call it holding the lock.
    pub fn abort_stale_uploads(&self) -> Result<usize> {
        let markers = self.list_meta(UPLOADS_DIR)?;
        let mut aborted = 0;
        for m in markers {
            let store = self.inner.store.clone();
            let loc = m.location.clone();
            let rel = self.rel_of(&loc);
            let res = self.wait(async move {
                let bytes = match store.get(&loc).await {
                    Ok(r) => r.bytes().await?,
                    Err(object_store::Error::NotFound { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                };
                let aborted = match serde_json::from_slice::<Marker>(&bytes) {
                    Ok(mk) => {
                        let path = ObjPath::from(mk.path.as_str());
                        match store.abort_multipart(&path, &mk.upload_id).await {
                            Ok(()) => true,
                            Err(e) if classify(&e) == Kind::NotFound => false,
                            Err(e) => return Err(e),
                        }
                    }
                    // Nothing to abort from an unreadable marker; drop it.
                    Err(_) => false,
                };
                match store.delete(&loc).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(aborted),
                    Err(e) => Err(e),
                }
            })?;
            if res.map_err(|e| self.err("abort upload", &rel, e))? {
                aborted += 1;
            }
        }
        Ok(aborted)
    }

    // -- helpers --

    /// The full key of `rel` below the prefix.
    fn key(&self, rel: &str) -> ObjPath {
        let rel = rel.trim_matches('/');
        ObjPath::from_iter(
            self.inner
                .prefix
                .split('/')
                .chain(rel.split('/'))
                .filter(|s| !s.is_empty()),
        )
    }

    /// A listed key, relative to the prefix.
    fn rel_of(&self, p: &ObjPath) -> String {
        let full = decode(p.as_ref());
        let prefix = &self.inner.prefix;
        if prefix.is_empty() {
            return full;
        }
        full.strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .map(str::to_owned)
            .unwrap_or(full)
    }

    fn wait<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        run(fut).ok_or_else(|| Error::repo(self.url(), "the object-store task failed unexpectedly"))
    }

    fn absent_or<T>(&self, e: object_store::Error, op: &str, rel: &str) -> Result<Option<T>> {
        if classify(&e) == Kind::NotFound {
            Ok(None)
        } else {
            Err(self.err(op, rel, e))
        }
    }

    /// One line: what we did, on which object, and what the store said — naming the bucket
    /// or the endpoint where that is the problem. Credentials never reach it (the store's
    /// messages carry only the key id at most, and we do not copy that either).
    fn err(&self, op: &str, rel: &str, e: object_store::Error) -> Error {
        let url = self.url();
        let bucket = &self.inner.bucket;
        let msg = match classify(&e) {
            Kind::NoSuchBucket => format!(
                "bucket {bucket} does not exist; create it (e.g. `aws s3 mb s3://{bucket}` / `mc mb`) or fix DBKEEPER_REPO/DBKEEPER_REMOTE"
            ),
            Kind::Credentials(code) => format!(
                "the store refused the credentials ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions on bucket {bucket}"
            ),
            Kind::Unreachable => format!(
                "cannot reach the object store at {}: {}",
                self.inner.endpoint,
                root_cause(&e)
            ),
            Kind::NotFound => format!("{op} {}: not found", nonempty(rel)),
            Kind::Precondition | Kind::Other => {
                format!("{op} {}: {}", nonempty(rel), short_cause(&e))
            }
        };
        Error::repo(url, msg)
    }
}

fn nonempty(rel: &str) -> &str {
    if rel.is_empty() { "/" } else { rel }
}

enum Attempt {
    Held(Option<String>),
    Busy(LockBody),
    Retry,
}

/// Keys come back percent-encoded where a byte is not safe in a path segment.
fn decode(s: &str) -> String {
    percent_decode(s)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Sorts an `object_store` error into what we tell the operator.
fn classify(e: &object_store::Error) -> Kind {
    let text = chain_text(e);
    for code in [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    ] {
        if text.contains(code) {
            return Kind::Credentials(code.to_owned());
        }
    }
    if text.contains("NoSuchBucket") {
        return Kind::NoSuchBucket;
    }
    match e {
        object_store::Error::NotFound { .. } => return Kind::NotFound,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            return Kind::Precondition;
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            return Kind::Credentials("access denied".into());
        }
        _ => {}
    }
    if text.contains("NoSuchUpload") || text.contains("NoSuchKey") {
        return Kind::NotFound;
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<object_store::client::HttpError>()
            && matches!(
                h.kind(),
                object_store::client::HttpErrorKind::Connect
                    | object_store::client::HttpErrorKind::Timeout
            )
        {
            return Kind::Unreachable;
        }
        src = s.source();
    }
    Kind::Other
}

fn chain_text(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// An error chain on one line, without the XML of an S3 error body (its `Code` and `Message`
/// are kept) and without duplicated links.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(x) = src {
        let t = squash(&x.to_string());
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = x.source();
    }
    parts.join(": ")
}

/// The last link of an error chain (e.g. "Connection refused (os error 111)").
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last: &dyn std::error::Error = e;
    while let Some(s) = last.source() {
        last = s;
    }
    squash(&last.to_string())
}

/// The innermost useful part of an error: the S3 error code and message when the store sent
/// one, else the chain.
fn short_cause(e: &object_store::Error) -> String {
    let text = chain_text(e);
    if let Some(code) = xml_tag(&text, "Code") {
        return match xml_tag(&text, "Message") {
            Some(m) => format!("{code}: {m}"),
            None => code,
        };
    }
    one_line(e)
}

fn xml_tag(text: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&close)? + start;
    Some(squash(&text[start..end]))
}

/// Replaces an S3 XML error body by its code and collapses whitespace, so a message is one line.
fn squash(s: &str) -> String {
    let s = match (s.find("<?xml"), xml_tag(s, "Code")) {
        (Some(i), Some(code)) => format!("{}{code}", &s[..i]),
        _ => s.to_owned(),
    };
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ---------------------------------------------------------------------------------------------
// Streaming read.

enum Chunk {
    Data(Bytes),
    Failed(String),
    End,
}

struct ObjectReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    done: bool,
    task: JoinHandle<()>,
}

impl io::Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            match park_on(self.rx.recv()) {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.done = true,
                Some(Chunk::Failed(m)) => return Err(io::Error::other(m)),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "object stream stopped before its end",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        // Stop fetching what nobody will read.
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming write.

/// What a marker object records about an open multipart upload.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Marker {
    path: String,
    upload_id: String,
    created_at: DateTime<Utc>,
}

/// The marker key (relative to the prefix) for an upload to `key`: one per object, so a
/// retried write of the same object replaces its marker.
fn marker_rel(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("{UPLOADS_DIR}/{}", hex::encode(&digest[..16]))
}

struct Upload {
    id: MultipartId,
    marker: ObjPath,
    in_flight: VecDeque<JoinHandle<object_store::Result<PartId>>>,
    parts: Vec<PartId>,
    next_idx: usize,
}

/// A streaming upload. Bytes are cut into [`PART_SIZE`] parts uploaded [`MAX_PARTS_IN_FLIGHT`]
/// at a time; an object smaller than one part is a single PUT at `finish`. Dropped (or
/// [`S3Writer::abort`]ed) before `finish`, the upload is aborted and nothing becomes visible.
pub struct S3Writer {
    store: S3Store,
    rel: String,
    key: ObjPath,
    buf: Vec<u8>,
    upload: Option<Upload>,
    written: u64,
    /// The first failure; every later call reports it again.
    failed: Option<String>,
}

impl fmt::Debug for S3Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Writer")
            .field("object", &format!("{}/{}", self.store.url(), self.rel))
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl S3Writer {
    /// Completes the upload; the object is visible once this returns. Returns bytes written.
    pub fn finish(self) -> Result<u64> {
        self.finish_tagged().map(|(n, _)| n)
    }

    /// Like [`S3Writer::finish`], and also returns the object's ETag as the store gave it.
    pub fn finish_tagged(mut self) -> Result<(u64, Option<String>)> {
        if let Some(m) = &self.failed {
            return Err(Error::repo(self.store.url(), m.clone()));
        }
        let r = self.complete();
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn complete(&mut self) -> Result<(u64, Option<String>)> {
        let store = self.store.inner.store.clone();
        let key = self.key.clone();
        if self.upload.is_none() {
            let data = Bytes::from(std::mem::take(&mut self.buf));
            let res = self
                .store
                .wait(async move { store.put(&key, data.into()).await })?;
            let put = res.map_err(|e| self.store.err("write", &self.rel, e))?;
            return Ok((self.written, put.e_tag));
        }
        if !self.buf.is_empty() {
            self.send_part()
                .map_err(|e| Error::repo(self.store.url(), e.to_string()))?;
        }
        self.drain(0)
            .map_err(|e| Error::repo(self.store.url(), e.to_string()))?;
        let Some(up) = self.upload.take() else {
            return Ok((self.written, None));
        };
        let parts = up.parts;
        let id = up.id.clone();
        let marker = up.marker.clone();
        let res = self.store.wait(async move {
            let put = store.complete_multipart(&key, &id, parts).await?;
            // The upload is closed either way; a marker left behind only costs one no-op abort.
            let _ = store.delete(&marker).await;
            Ok::<_, object_store::Error>(put.e_tag)
        })?;
        match res {
            Ok(tag) => Ok((self.written, tag)),
            Err(e) => {
                // Put the upload back so Drop aborts it.
                self.upload = Some(Upload {
                    id: up.id,
                    marker: up.marker,
                    in_flight: VecDeque::new(),
                    parts: Vec::new(),
                    next_idx: 0,
                });
                Err(self.store.err("complete upload", &self.rel, e))
            }
        }
    }

    /// Aborts the upload now (as dropping does): nothing becomes visible.
    pub fn abort(self) {}

    fn fail(&mut self, msg: String) -> io::Error {
        self.failed = Some(msg.clone());
        io::Error::other(msg)
    }

    /// Sends the buffer as the next part, starting the multipart upload on the first one.
    fn send_part(&mut self) -> io::Result<()> {
        if self.upload.is_none() {
            self.start_upload()?;
        }
        self.drain(MAX_PARTS_IN_FLIGHT - 1)?;
        let data = Bytes::from(std::mem::take(&mut self.buf));
        let Some(up) = self.upload.as_mut() else {
            return Err(self.fail("the multipart upload did not start".into()));
        };
        let store = self.store.inner.store.clone();
        let key = self.key.clone();
        let id = up.id.clone();
        let idx = up.next_idx;
        up.next_idx += 1;
        up.in_flight.push_back(
            runtime().spawn(async move { store.put_part(&key, &id, idx, data.into()).await }),
        );
        Ok(())
    }

    fn start_upload(&mut self) -> io::Result<()> {
        let store = self.store.inner.store.clone();
        let key = self.key.clone();
        let marker = self.store.key(&marker_rel(key.as_ref()));
        let m = marker.clone();
        let res = self
            .store
            .wait(async move {
                let id = store.create_multipart(&key).await?;
                let body = Marker {
                    path: key.as_ref().to_owned(),
                    upload_id: id.clone(),
                    created_at: Utc::now(),
                };
                // Serialising three strings cannot fail.
                let json = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(e) = store.put(&m, json.into()).await {
                    let _ = store.abort_multipart(&key, &id).await;
                    return Err(e);
                }
                Ok(id)
            })
            .map_err(|e| self.fail(e.to_string()))?;
        let id = res.map_err(|e| {
            let msg = self.store.err("start upload", &self.rel, e).to_string();
            self.fail(msg)
        })?;
        self.upload = Some(Upload {
            id,
            marker,
            in_flight: VecDeque::new(),
            parts: Vec::new(),
            next_idx: 0,
        });
        Ok(())
    }

    /// Waits until at most `keep` parts are in flight.
    fn drain(&mut self, keep: usize) -> io::Result<()> {
        loop {
            let Some(up) = self.upload.as_mut() else {
                return Ok(());
            };
            if up.in_flight.len() <= keep {
                return Ok(());
            }
            let Some(h) = up.in_flight.pop_front() else {
                return Ok(());
            };
            match park_on(h) {
                Ok(Ok(part)) => up.parts.push(part),
                Ok(Err(e)) => {
                    let msg = self.store.err("upload part", &self.rel, e).to_string();
                    return Err(self.fail(msg));
                }
                Err(_) => {
                    return Err(self.fail(format!(
                        "{}: a part upload of {} failed unexpectedly",
                        self.store.url(),
                        self.rel
                    )));
                }
            }
        }
    }
}

impl io::Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(m) = &self.failed {
            return Err(io::Error::other(m.clone()));
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(PART_SIZE);
        }
        let n = data.len().min(PART_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == PART_SIZE {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Parts go out when full; nothing is durable before `finish` anyway.
        match &self.failed {
            Some(m) => Err(io::Error::other(m.clone())),
            None => Ok(()),
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        let Some(up) = self.upload.take() else {
            return;
        };
        for h in &up.in_flight {
            h.abort();
        }
        let store = self.store.inner.store.clone();
        let key = self.key.clone();
        let handles = up.in_flight;
        let done = run(async move {
            // Let aborted part uploads unwind first, so none lands after the abort.
            for h in handles {
                let _ = h.await;
            }
            let r = tokio::time::timeout(CLEANUP_TIMEOUT, async {
                match store.abort_multipart(&key, &up.id).await {
                    Ok(()) => {}
                    Err(e) if classify(&e) == Kind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let _ = store.delete(&up.marker).await;
                Ok(())
            })
            .await;
            match r {
                Ok(r) => r.map_err(|e| one_line(&e)),
                Err(_) => Err("timed out".to_owned()),
            }
        });
        if let Some(Err(e)) = done {
            warn!(
                object = %format!("{}/{}", self.store.url(), self.rel),
                error = %e,
                "cannot abort an unfinished upload; the next backup will"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lock.

/// The lock object's content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct LockBody {
    holder: String,
    expires_at: DateTime<Utc>,
}

impl LockBody {
    fn new(holder: &str, lease: Duration) -> Self {
        LockBody {
            holder: holder.to_owned(),
            expires_at: Utc::now()
                + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
        }
    }

    fn to_json(&self) -> Vec<u8> {
        // A string and a timestamp always serialise.
        serde_json::to_vec(self).unwrap_or_default()
    }

    fn parse(b: &[u8]) -> Option<Self> {
        serde_json::from_slice(b).ok()
    }
}

/// The repository's writer lock, renewed in the background every lease/3 while held. Dropping
/// it releases the lock (deletes the object, unless someone took it over meanwhile).
pub struct S3Lock {
    store: S3Store,
    key: ObjPath,
    e_tag: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl fmt::Debug for S3Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Lock")
            .field("object", &format!("{}/{}", self.store.url(), self.key))
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl S3Lock {
    fn start(
        store: &S3Store,
        key: ObjPath,
        holder: &str,
        lease: Duration,
        e_tag: Option<String>,
    ) -> S3Lock {
        let e_tag = Arc::new(Mutex::new(e_tag));
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let every = (lease / 3).max(Duration::from_millis(100));
        let renewer = {
            let s = store.inner.store.clone();
            let key = key.clone();
            let holder = holder.to_owned();
            let e_tag = e_tag.clone();
            let lost = lost.clone();
            let url = store.url();
            runtime().spawn(async move {
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let current = e_tag.lock().map(|g| g.clone()).unwrap_or(None);
                    let body = LockBody::new(&holder, lease).to_json();
                    let mode = PutMode::Update(UpdateVersion {
                        e_tag: current,
                        version: None,
                    });
                    match s.put_opts(&key, body.into(), mode.into()).await {
                        Ok(r) => {
                            if let Ok(mut g) = e_tag.lock() {
                                *g = r.e_tag;
                            }
                        }
                        Err(e) if matches!(classify(&e), Kind::Precondition | Kind::NotFound) => {
                            lost.store(true, Ordering::SeqCst);
                            warn!(repo = %url, "lost the repository lock: another writer took it over");
                            return;
                        }
                        // Transient: the lease outlives two more tries.
                        Err(e) => warn!(repo = %url, error = %one_line(&e), "cannot renew the repository lock"),
                    }
                }
            })
        };
        S3Lock {
            store: store.clone(),
            key,
            e_tag,
            lost,
            stop: Some(stop),
            renewer: Some(renewer),
        }
    }

    /// Whether another writer took the lock over (our renewals failed past the lease).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for S3Lock {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let renewer = self.renewer.take();
        if self.is_lost() {
            return;
        }
        let store = self.store.inner.store.clone();
        let key = self.key.clone();
        let ours = self.e_tag.lock().map(|g| g.clone()).unwrap_or(None);
        let url = self.store.url();
        let done = run(async move {
            if let Some(h) = renewer {
                let _ = h.await;
            }
            tokio::time::timeout(CLEANUP_TIMEOUT, async {
                // S3 has no conditional delete we can rely on: delete only if the object is
                // still the one we wrote. The gap between the two requests is milliseconds,
                // and only matters if our lease already ran out.
                match store.head(&key).await {
                    Ok(m) if m.e_tag == ours => store.delete(&key).await.map_err(|e| one_line(&e)),
                    Ok(_) => Ok(()),
                    Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(one_line(&e)),
                }
            })
            .await
            .unwrap_or_else(|_| Err("timed out".into()))
        });
        if let Some(Err(e)) = done {
            warn!(repo = %url, error = %e, "cannot release the repository lock; it expires with its lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::env_of;

    #[test]
    fn urls_parse() {
        let env = env_of(&[]);
        let c = S3Config::from_url("s3://bk/a/b/", &env).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bk", "a/b"));
        assert_eq!(c.url(), "s3://bk/a/b");
        let c = S3Config::from_url("s3://bk", &env).unwrap();
        assert_eq!(c.prefix, "");
        assert_eq!(c.url(), "s3://bk");
        assert_eq!(S3Config::from_url("s3://bk/", &env).unwrap().prefix, "");
        for bad in [
            "s3://",
            "s3:///x",
            "http://bk/x",
            "s3://bk/a//b",
            "s3://bk/../x",
            "s3://bk/x?y=1",
            "s3://b k/x",
        ] {
            let e = S3Config::from_url(bad, &env).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echo() {
        let e = S3Config::from_url("s3://AKIA:hunter2@bk/x", &env_of(&[])).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn settings_come_from_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sk");
        std::fs::write(&f, "topsecret\n").unwrap();
        let env = env_of(&[
            ("DBKEEPER_S3_ENDPOINT", "http://127.0.0.1:8333/"),
            ("DBKEEPER_S3_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY_FILE", f.to_str().unwrap()),
            ("DBKEEPER_S3_CA_FILE", "/etc/ca.pem"),
        ]);
        let c = S3Config::from_url("s3://bk/p", &env).unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(c.region.as_deref(), Some("eu-west-1"));
        assert_eq!(c.access_key_id.as_ref().unwrap().expose(), "AKID");
        assert_eq!(c.secret_access_key.as_ref().unwrap().expose(), "topsecret");
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("topsecret") && !dbg.contains("AKID"), "{dbg}");
    }

    #[test]
    fn half_a_key_pair_or_a_bad_endpoint_is_a_config_error() {
        let e = S3Config::from_url("s3://bk", &env_of(&[("AWS_ACCESS_KEY_ID", "a")])).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        for ep in ["ftp://h", "not a url", "http://u:pw@h:1", "http://h/?x=1"] {
            let e = S3Config::from_url("s3://bk", &env_of(&[("DBKEEPER_S3_ENDPOINT", ep)]))
                .unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{ep}");
            assert!(!e.to_string().contains("pw@"), "{e}");
        }
    }

    #[test]
    fn store_debug_and_url_hold_no_secret() {
        let env = env_of(&[
            ("DBKEEPER_S3_ENDPOINT", "http://127.0.0.1:1"),
            ("AWS_ACCESS_KEY_ID", "AKIDVISIBLE"),
            ("AWS_SECRET_ACCESS_KEY", "hunter2hunter2"),
        ]);
        let s = S3Store::connect(&S3Config::from_url("s3://bk/p", &env).unwrap()).unwrap();
        let dbg = format!("{s:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("AKIDVISIBLE"),
            "{dbg}"
        );
        assert_eq!(s.url(), "s3://bk/p");
    }

    #[test]
    fn keys_join_prefix_and_rel() {
        let env = env_of(&[("DBKEEPER_S3_ENDPOINT", "http://127.0.0.1:1")]);
        let s = S3Store::connect(&S3Config::from_url("s3://bk/a/b", &env).unwrap()).unwrap();
        assert_eq!(s.key("x/y").as_ref(), "a/b/x/y");
        assert_eq!(s.key("/x/").as_ref(), "a/b/x");
        assert_eq!(s.key("").as_ref(), "a/b");
        assert_eq!(s.rel_of(&s.key("set/f.zst")), "set/f.zst");
        let s = S3Store::connect(&S3Config::from_url("s3://bk", &env).unwrap()).unwrap();
        assert_eq!(s.key("x").as_ref(), "x");
        assert_eq!(s.key("").as_ref(), "");
        assert!(s.delete_prefix("").is_err());
    }

    #[test]
    fn marker_names_are_stable_and_distinct() {
        let a = marker_rel("p/set/a.zst");
        assert_eq!(a, marker_rel("p/set/a.zst"));
        assert_ne!(a, marker_rel("p/set/b.zst"));
        assert!(a.starts_with(".multipart/"));
        assert_eq!(a.len(), ".multipart/".len() + 32);
        let m = Marker {
            path: "p/x".into(),
            upload_id: "id-1".into(),
            created_at: Utc::now(),
        };
        let back: Marker = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn lock_body_round_trips_as_rfc3339() {
        let b = LockBody::new("host-1 pid 7", Duration::from_secs(60));
        let json = String::from_utf8(b.to_json()).unwrap();
        assert!(json.contains("\"holder\":\"host-1 pid 7\""), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let t = v["expires_at"].as_str().unwrap();
        assert!(DateTime::parse_from_rfc3339(t).is_ok(), "{t}");
        assert_eq!(LockBody::parse(json.as_bytes()), Some(b));
        assert_eq!(LockBody::parse(b"garbage"), None);
    }

    #[test]
    fn store_errors_become_one_line() {
        let xml = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code>\n<Message>bad sig</Message></Error>";
        assert_eq!(
            squash(xml),
            "Server returned non-2xx status code: 403 Forbidden: SignatureDoesNotMatch"
        );
        assert_eq!(xml_tag(xml, "Message").as_deref(), Some("bad sig"));
        assert_eq!(percent_decode("a%2Fb%zz"), "a/b%zz");
    }

    #[test]
    fn waiting_works_inside_a_current_thread_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let v = rt.block_on(async {
            run(async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                7
            })
        });
        assert_eq!(v, Some(7));
    }
}
