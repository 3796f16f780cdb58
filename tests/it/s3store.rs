//! The object-store client against a real SeaweedFS: round trips, listings, the one-line
//! errors an operator sees, abandoned and interrupted uploads, and the leased lock.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use dbkeeper::error::Error;
use dbkeeper::repo::s3::{PART_SIZE, S3Config, S3Store};

use crate::common::free_port;
use crate::common::s3::S3Server;

fn config(env: &[(String, String)], url: &str) -> S3Config {
    let env = env.to_vec();
    let lookup = move |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    S3Config::from_url(url, &lookup).unwrap()
}

fn store(s: &S3Server, url: &str) -> S3Store {
    S3Store::connect(&config(&s.env(), url)).unwrap()
}

/// A server with bucket `bk` and a store on `s3://bkt/repo`.
fn setup() -> Option<(S3Server, S3Store)> {
    let s = S3Server::start_or_skip()?;
    eprintln!("weed mini answered S3 after {:?}", s.started_in);
    s.create_bucket("bkt");
    let st = store(&s, "s3://bkt/repo");
    st.check().unwrap();
    Some((s, st))
}

/// Bytes that differ across parts, so a misplaced part shows.
fn pattern(len: usize) -> Vec<u8> {
    crate::common::noise(len, 0x9e37_79b9)
}

fn repo_message(e: &Error) -> String {
    match e {
        Error::Repository { .. } => e.to_string(),
        other => panic!("expected a repository error, got {other:?}"),
    }
}

#[test]
fn objects_round_trip_list_and_delete() {
    let Some((s, st)) = setup() else { return };

    // 30 MB through the writer: four parts, uploaded concurrently.
    let big = pattern(30_000_000);
    let mut w = st.writer("set-1/data.zst").unwrap();
    for chunk in big.chunks(1_000_003) {
        w.write_all(chunk).unwrap();
    }
    assert_eq!(
        st.size("set-1/data.zst").unwrap(),
        None,
        "visible before finish"
    );
    assert_eq!(w.finish().unwrap(), big.len() as u64);
    assert_eq!(st.size("set-1/data.zst").unwrap(), Some(big.len() as u64));

    // Streamed back in small reads.
    let mut r = st.get("set-1/data.zst").unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 7000];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    assert!(back == big, "30 MB object differs after the round trip");

    // Smaller than a part: one PUT at finish.
    let mut w = st.writer("set-1/small").unwrap();
    w.write_all(b"hello").unwrap();
    assert_eq!(w.finish().unwrap(), 5);
    assert_eq!(
        st.read_all("set-1/small").unwrap().as_deref(),
        Some(&b"hello"[..])
    );
    // Exactly one part: still complete and exact.
    let one = pattern(PART_SIZE);
    let mut w = st.writer("set-2/one-part").unwrap();
    w.write_all(&one).unwrap();
    w.finish().unwrap();
    assert!(st.read_all("set-2/one-part").unwrap().unwrap() == one);

    st.put_small("set-1/manifest.json", b"{}".to_vec()).unwrap();
    st.put_small("set-1/manifest.json", b"{\"v\":2}".to_vec())
        .unwrap();
    assert_eq!(
        st.read_all("set-1/manifest.json").unwrap().as_deref(),
        Some(&b"{\"v\":2}"[..])
    );
    st.put_small("set-3/sub/deep", b"x".to_vec()).unwrap();

    assert_eq!(st.list_dirs("").unwrap(), ["set-1", "set-2", "set-3"]);
    assert_eq!(st.list_dirs("set-3").unwrap(), ["sub"]);
    assert_eq!(
        st.list_files("set-1").unwrap(),
        [
            ("set-1/data.zst".to_owned(), big.len() as u64),
            ("set-1/manifest.json".to_owned(), 7),
            ("set-1/small".to_owned(), 5),
        ]
    );
    assert_eq!(
        st.list_files("set-3").unwrap(),
        [("set-3/sub/deep".to_owned(), 1)]
    );

    // Absent objects.
    assert_eq!(st.size("nope").unwrap(), None);
    assert_eq!(st.read_all("nope").unwrap(), None);
    let e = st.get("nope").err().expect("get of a missing object fails");
    assert!(repo_message(&e).contains("nope"), "{e}");
    st.delete("nope").unwrap();

    assert_eq!(st.delete_prefix("set-1").unwrap(), 3);
    assert_eq!(st.list_files("set-1").unwrap(), []);
    st.delete("set-2/one-part").unwrap();
    assert_eq!(st.list_dirs("").unwrap(), ["set-3"]);

    // No upload left open, no marker left behind.
    assert_eq!(s.open_uploads("bkt"), Vec::<String>::new());
    assert_eq!(st.list_files(".multipart").unwrap(), []);
    // A store on the bucket root sees the prefix as a directory.
    assert_eq!(store(&s, "s3://bkt").list_dirs("").unwrap(), ["repo"]);
}

#[test]
fn a_missing_bucket_is_named_with_the_fix() {
    let Some(s) = S3Server::start_or_skip() else {
        return;
    };
    let st = store(&s, "s3://no-such-bucket/x");
    let e = st.check().unwrap_err();
    let m = repo_message(&e);
    eprintln!("{m}");
    assert!(
        m.contains("bucket no-such-bucket does not exist") && m.contains("mb s3://no-such-bucket"),
        "{m}"
    );
    assert!(!m.contains('\n'), "{m}");
    assert_eq!(e.exit_code(), dbkeeper::exit::ExitCode::Repository);
}

#[test]
fn refused_credentials_say_so_without_the_secret() {
    let Some(s) = S3Server::start_or_skip() else {
        return;
    };
    s.create_bucket("bkt");
    for (id, secret) in [
        (s.access_key.as_str(), "wrong-secret-8c1f"),
        ("NOSUCHKEYID", "wrong-secret-8c1f"),
    ] {
        let env = vec![
            ("DBKEEPER_S3_ENDPOINT".to_owned(), s.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID".to_owned(), id.to_owned()),
            ("AWS_SECRET_ACCESS_KEY".to_owned(), secret.to_owned()),
        ];
        let st = S3Store::connect(&config(&env, "s3://bkt/repo")).unwrap();
        let e = st.check().unwrap_err();
        let m = repo_message(&e);
        eprintln!("{m}");
        assert!(m.contains("refused the credentials"), "{m}");
        assert!(
            !m.contains(secret) && !format!("{e:?}").contains(secret),
            "{m}"
        );
        assert!(!m.contains('\n'), "{m}");
        // Every operation says the same, not only check().
        let e = st.put_small("x", b"1".to_vec()).unwrap_err();
        assert!(repo_message(&e).contains("refused the credentials"), "{e}");
    }
}

#[test]
fn an_unreachable_endpoint_is_named() {
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    // With credentials: without them the client would first ask the instance metadata service.
    let env = vec![
        ("DBKEEPER_S3_ENDPOINT".to_owned(), endpoint.clone()),
        ("AWS_ACCESS_KEY_ID".to_owned(), "id".to_owned()),
        ("AWS_SECRET_ACCESS_KEY".to_owned(), "secret".to_owned()),
    ];
    let st = S3Store::connect(&config(&env, "s3://bkt/repo")).unwrap();
    let began = Instant::now();
    let e = st.check().unwrap_err();
    let m = repo_message(&e);
    eprintln!("{m} ({:?})", began.elapsed());
    assert!(
        m.contains(&format!("cannot reach the object store at {endpoint}")),
        "{m}"
    );
    assert!(!m.contains('\n'), "{m}");
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "took {:?}",
        began.elapsed()
    );
}

#[test]
fn a_dropped_writer_leaves_no_object_and_no_open_upload() {
    let Some((s, st)) = setup() else { return };
    let mut w = st.writer("set/abandoned").unwrap();
    w.write_all(&pattern(3 * PART_SIZE + 100)).unwrap();
    assert_eq!(
        s.open_uploads("bkt").len(),
        1,
        "the multipart upload is open while writing"
    );
    assert_eq!(
        st.list_files(".multipart").unwrap().len(),
        1,
        "its marker is recorded"
    );
    drop(w);
    assert_eq!(st.size("set/abandoned").unwrap(), None);
    assert_eq!(s.open_uploads("bkt"), Vec::<String>::new());
    assert_eq!(st.list_files(".multipart").unwrap(), []);

    // abort() is the same, spelled out.
    let mut w = st.writer("set/aborted").unwrap();
    w.write_all(&pattern(PART_SIZE + 1)).unwrap();
    w.abort();
    assert_eq!(st.size("set/aborted").unwrap(), None);
    assert_eq!(s.open_uploads("bkt"), Vec::<String>::new());
}

#[test]
fn a_store_killed_mid_upload_fails_the_writer_and_the_next_run_cleans_up() {
    let Some((mut s, st)) = setup() else { return };
    let mut w = st.writer("set/interrupted").unwrap();
    w.write_all(&pattern(2 * PART_SIZE)).unwrap();
    s.kill();
    let began = Instant::now();
    let chunk = pattern(PART_SIZE);
    let err = loop {
        // Parts in flight and the buffer hide the failure for a few parts at most.
        if let Err(e) = w.write_all(&chunk).and_then(|_| w.flush()) {
            break e.to_string();
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "writes kept succeeding"
        );
    };
    eprintln!("write failed after {:?}: {err}", began.elapsed());
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.contains("cannot reach the object store") && err.contains(&s.endpoint),
        "{err}"
    );
    let fin = w.finish().unwrap_err().to_string();
    assert!(!fin.contains('\n'), "{fin}");
    assert!(
        began.elapsed() < Duration::from_secs(60),
        "took {:?}",
        began.elapsed()
    );

    s.restart();
    assert_eq!(st.size("set/interrupted").unwrap(), None);
    let open = s.open_uploads("bkt");
    assert_eq!(open.len(), 1, "the killed upload is still open: {open:?}");
    // Right after a restart weed can list an upload before its volume server has registered
    // again ("volume 1 not found", an InternalError): the store's own race, waited out here.
    let began = Instant::now();
    let aborted = loop {
        match st.abort_stale_uploads() {
            Ok(n) => break n,
            Err(e)
                if began.elapsed() < Duration::from_secs(20)
                    && e.to_string().contains("InternalError") =>
            {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => panic!("{e}\n--- weed log\n{}", s.log_tail()),
        }
    };
    assert_eq!(aborted, 1);
    assert_eq!(s.open_uploads("bkt"), Vec::<String>::new());
    assert_eq!(st.list_files(".multipart").unwrap(), []);
    assert_eq!(st.abort_stale_uploads().unwrap(), 0);
}

#[test]
fn stale_markers_of_finished_or_vanished_uploads_are_harmless() {
    let Some((_s, st)) = setup() else { return };
    // A marker whose upload no longer exists (completed, or aborted by the store).
    st.put_small(
        ".multipart/0123456789abcdef0123456789abcdef",
        br#"{"path":"repo/x","upload_id":"no-such-upload","created_at":"2026-01-01T00:00:00Z"}"#
            .to_vec(),
    )
    .unwrap();
    st.put_small(".multipart/garbage", b"not json".to_vec())
        .unwrap();
    assert_eq!(st.abort_stale_uploads().unwrap(), 0);
    assert_eq!(st.list_files(".multipart").unwrap(), []);
}

#[test]
fn a_second_writer_is_locked_out_naming_the_holder() {
    let Some((_s, st)) = setup() else { return };
    let lease = Duration::from_secs(3);
    let first = st
        .lock(".lock", "host-a pid 1", lease, Duration::ZERO)
        .unwrap();
    // Outlive the lease: the renewal keeps it held.
    std::thread::sleep(Duration::from_secs(4));
    let began = Instant::now();
    let e = st
        .lock(".lock", "host-b pid 2", lease, Duration::from_secs(1))
        .unwrap_err();
    assert!(began.elapsed() >= Duration::from_secs(1));
    match &e {
        Error::Locked { path, holder } => {
            assert_eq!(path.to_str(), Some("s3://bkt/repo"));
            assert!(holder.starts_with("host-a pid 1 until 20"), "{holder}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert!(!first.is_lost());
    drop(first);
    assert_eq!(st.size(".lock").unwrap(), None, "released on drop");
    let second = st
        .lock(".lock", "host-b pid 2", lease, Duration::ZERO)
        .unwrap();
    drop(second);

    // A waiting writer gets the lock as soon as the holder lets go.
    let first = st.lock(".lock", "host-a", lease, Duration::ZERO).unwrap();
    let st2 = st.clone();
    let waiter = std::thread::spawn(move || {
        st2.lock(".lock", "host-b", lease, Duration::from_secs(10))
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(800));
    drop(first);
    waiter.join().unwrap().unwrap();
}

#[test]
fn a_dead_holders_lock_is_taken_over_by_one_contender() {
    let Some((_s, st)) = setup() else { return };
    // What a holder killed without releasing leaves once its lease ran out.
    let dead = br#"{"holder":"host-dead pid 9","expires_at":"2020-01-01T00:00:00Z"}"#;
    st.put_small(".lock", dead.to_vec()).unwrap();
    let lease = Duration::from_secs(30);
    let l = st.lock(".lock", "host-new", lease, Duration::ZERO).unwrap();
    let body = String::from_utf8(st.read_all(".lock").unwrap().unwrap()).unwrap();
    assert!(body.contains("host-new"), "{body}");
    drop(l);

    // Two contenders for one expired lock: exactly one wins.
    for round in 0..3 {
        st.put_small(".lock", dead.to_vec()).unwrap();
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let st = st.clone();
                std::thread::spawn(move || {
                    st.lock(".lock", &format!("contender-{i}"), lease, Duration::ZERO)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(matches!(e, Error::Locked { .. }), "{e:?}");
            }
        }
    }

    // A live lock (expiry in the future) is not taken over.
    let live = br#"{"holder":"host-live","expires_at":"2999-01-01T00:00:00Z"}"#;
    st.put_small(".lock", live.to_vec()).unwrap();
    let e = st
        .lock(".lock", "host-new", lease, Duration::ZERO)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("host-live until 2999-01-01T00:00:00Z"),
        "{e}"
    );
}

/// Set for the child process of `a_killed_holders_lock_is_taken_over_after_its_lease`:
/// endpoint, access key and secret key, tab-separated.
const CHILD_ENV: &str = "DBKEEPER_TEST_S3_LOCK_CHILD";

#[test]
#[ignore = "helper process of a_killed_holders_lock_is_taken_over_after_its_lease"]
fn lock_holder_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut it = spec.split('\t').map(str::to_owned);
    let env: Vec<(String, String)> = [
        "DBKEEPER_S3_ENDPOINT",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ]
    .into_iter()
    .map(|k| (k.to_owned(), it.next().unwrap()))
    .collect();
    let st = S3Store::connect(&config(&env, "s3://bkt/repo")).unwrap();
    let _held = st
        .lock(
            ".lock",
            "host-doomed pid 1",
            Duration::from_secs(2),
            Duration::ZERO,
        )
        .unwrap();
    println!("locked");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_holders_lock_is_taken_over_after_its_lease() {
    let Some((s, st)) = setup() else { return };
    // The holder is another process, SIGKILLed: no release, no more renewals.
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "s3store::lock_holder_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            CHILD_ENV,
            format!("{}\t{}\t{}", s.endpoint, s.access_key, s.secret_key),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the lock-holding child exited early");
    }
    // Alive past its 2 s lease: renewed, so still locked.
    std::thread::sleep(Duration::from_secs(3));
    let e = st
        .lock(".lock", "host-next", Duration::from_secs(2), Duration::ZERO)
        .unwrap_err();
    assert!(e.to_string().contains("host-doomed pid 1"), "{e}");
    child.kill().unwrap();
    child.wait().unwrap();
    let began = Instant::now();
    let l = st
        .lock(
            ".lock",
            "host-next",
            Duration::from_secs(2),
            Duration::from_secs(10),
        )
        .unwrap();
    // At most one lease after the last renewal, plus a poll.
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "took {:?}",
        began.elapsed()
    );
    drop(l);
}

#[test]
fn the_blocking_api_works_from_async_contexts() {
    let Some((_s, st)) = setup() else { return };
    // A current-thread runtime: the caller's only thread blocks, the work runs elsewhere.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st2 = st.clone();
    rt.block_on(async move {
        st2.put_small("a/x", b"1".to_vec()).unwrap();
        let mut w = st2.writer("a/y").unwrap();
        w.write_all(&pattern(PART_SIZE + 10)).unwrap();
        w.finish().unwrap();
        assert_eq!(st2.read_all("a/x").unwrap().as_deref(), Some(&b"1"[..]));
        let l = st2
            .lock(".lock", "async", Duration::from_secs(5), Duration::ZERO)
            .unwrap();
        drop(l);
    });
    // A multi-thread runtime, from a task and from spawn_blocking.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let st3 = st.clone();
    rt.block_on(async move {
        let a = st3.clone();
        tokio::spawn(async move { a.size("a/y").unwrap() })
            .await
            .unwrap();
        let b = st3.clone();
        let files = tokio::task::spawn_blocking(move || b.list_files("a").unwrap())
            .await
            .unwrap();
        assert_eq!(files.len(), 2);
    });
    drop(rt);
}
