//! Fuzzing of every parser that reads bytes from outside: the RDB reader, the `.bson` stream
//! reader, the Chroma record reader, the manifest reader, the RESP reader (through a loopback
//! socket, as the probe reads it) and the cron and duration parsers.
//!
//! Each target starts from real inputs (the fixtures from other projects, and bytes our own
//! writers produce), mutates them (bit flips, byte inserts and deletes, splices, length fields
//! overwritten with huge values, dictionary tokens) and adds pure random bytes. Every input must
//! end in `Ok` or a clean `Err`: a panic is caught and reported with the input (saved under
//! `target/faults/fuzz/`), and a counting allocator checks that no single allocation is larger
//! than the input justifies (a length prefix of 4 GB must not allocate 4 GB).
//!
//! The mutator is written by hand (a few lines on `fastrand`) rather than with `proptest`
//! because the inputs are byte strings whose structure the strategies could not express
//! better than byte mutations of real files, and `cargo fuzz` needs a nightly compiler.
//! Quick run: a few thousand inputs per target; `DBKEEPER_FAULTS=full`: a million per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::net::{Shutdown, TcpListener};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fastrand::Rng;

use crate::report;

// ---------------------------------------------------------------------------------------------
// The counting allocator: the largest single allocation (or reallocation) of this thread since
// the last reset. Thread-local, so tests running beside the fuzzing do not disturb its figures.

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot is gone while the thread's locals are being destroyed.
    let _ = LARGEST.try_with(|c| {
        if c.get() < size {
            c.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; `note` only reads and
// writes a thread-local `Cell` (const-initialised, so touching it never allocates).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[allow(unsafe_code)]
#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`, catching a panic; returns its outcome and the largest allocation it made.
fn measured(f: impl FnOnce()) -> (std::thread::Result<()>, usize) {
    LARGEST.with(|c| c.set(0));
    let r = panic::catch_unwind(AssertUnwindSafe(f));
    (r, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// The mutator.

/// Values a corrupt length field likes to hold.
const HUGE: [u32; 8] = [
    0xFFFF_FFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0x4000_0000,
    0x0100_0000,
    0x00FF_FFFF,
    0xFFFF,
    0,
];
const BYTES: [u8; 12] = [
    0, 1, 0x7F, 0x80, 0xFF, 0xFE, 0xFD, 0xFC, 0xC0, 0xC3, 0x40, 0x0A,
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], dict: &[&[u8]]) -> Vec<u8> {
    if seeds.is_empty() || rng.u8(..) < 12 {
        let n = rng.usize(..=256);
        return (0..n).map(|_| rng.u8(..)).collect();
    }
    let mut v = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..=rng.usize(..4) {
        let at = |rng: &mut Rng, v: &Vec<u8>| rng.usize(..=v.len());
        match rng.u8(..10) {
            0 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] ^= 1 << rng.u8(..8);
            }
            1 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                v[i] = if rng.bool() {
                    BYTES[rng.usize(..BYTES.len())]
                } else {
                    rng.u8(..)
                };
            }
            2 => {
                let i = at(rng, &v);
                let n = rng.usize(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                v.splice(i..i, ins);
            }
            3 if !v.is_empty() => {
                let i = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - i).min(64));
                v.drain(i..i + n);
            }
            4 => {
                // Splice: a chunk of another seed over or into this one.
                let other = &seeds[rng.usize(..seeds.len())];
                if !other.is_empty() {
                    let s = rng.usize(..other.len());
                    let n = rng.usize(1..=(other.len() - s).min(128));
                    let chunk = other[s..s + n].to_vec();
                    let i = at(rng, &v);
                    let end = if rng.bool() { (i + n).min(v.len()) } else { i };
                    v.splice(i..end, chunk);
                }
            }
            5 if v.len() >= 4 => {
                // A length field overwritten with a huge (or zero) value, either byte order.
                let i = rng.usize(..=v.len() - 4);
                let x = HUGE[rng.usize(..HUGE.len())];
                let b = if rng.bool() {
                    x.to_le_bytes()
                } else {
                    x.to_be_bytes()
                };
                v[i..i + 4].copy_from_slice(&b);
            }
            6 => {
                let n = at(rng, &v);
                v.truncate(n);
            }
            7 if !v.is_empty() => {
                // A chunk repeated (deep nesting, repeated records).
                let s = rng.usize(..v.len());
                let n = rng.usize(1..=(v.len() - s).min(64));
                let chunk = v[s..s + n].to_vec();
                let times = rng.usize(1..=32);
                let i = at(rng, &v);
                v.splice(i..i, chunk.iter().copied().cycle().take(n * times));
            }
            8 | 9 if !dict.is_empty() => {
                let tok = dict[rng.usize(..dict.len())];
                let i = at(rng, &v);
                if rng.bool() || v.len() < tok.len() {
                    v.splice(i..i, tok.iter().copied());
                } else {
                    let i = i.min(v.len() - tok.len());
                    v[i..i + tok.len()].copy_from_slice(tok);
                }
            }
            _ => {}
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// The loop.

struct Target<'a> {
    name: &'a str,
    quick: usize,
    seeds: Vec<Vec<u8>>,
    dict: &'a [&'a [u8]],
    /// The allocation bound: `per_byte * input length + fixed`.
    per_byte: usize,
    fixed: usize,
}

fn failures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("faults")
        .join("fuzz")
}

/// Feeds the seeds, then mutated inputs, to `f`; records and asserts the tally.
fn run(t: Target<'_>, f: impl Fn(&[u8])) {
    let class = format!("fuzz/{}", t.name);
    let total = report::cases(t.quick, 1_000_000).max(t.seeds.len());
    let mut failures = Vec::new();
    let mut passed = 0;
    let started = std::time::Instant::now();
    for i in 0..total {
        let seed = report::case_seed(&class, i);
        let input = if i < t.seeds.len() {
            t.seeds[i].clone()
        } else {
            mutate(&mut Rng::with_seed(seed), &t.seeds, t.dict)
        };
        let (outcome, largest) = measured(|| f(&input));
        let bound = t.per_byte * input.len() + t.fixed;
        let why = match outcome {
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default()
            )),
            Ok(()) if largest > bound => Some(format!(
                "allocated {largest} bytes at once for a {}-byte input (bound {bound})",
                input.len()
            )),
            Ok(()) => None,
        };
        match why {
            None => passed += 1,
            Some(why) => {
                let file = failures_dir().join(format!("{}-{i}.bin", t.name));
                if failures.len() < 20 {
                    let _ = std::fs::create_dir_all(failures_dir());
                    let _ = std::fs::write(&file, &input);
                }
                failures.push(format!(
                    "input {i} (case seed {seed}, saved as {}): {why}",
                    file.display()
                ));
            }
        }
    }
    // Printed for the record (how long a full run takes), never asserted.
    eprintln!("{class}: {total} inputs in {:.1?}", started.elapsed());
    report::record(&class, total, passed, &failures);
    assert!(
        failures.is_empty(),
        "{class}: {} of {total} inputs failed:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}

/// The files of a fixture folder (`../shared/fixtures/<sub>`, beside the checkout) whose names
/// end in `ext`, searched recursively; empty, saying why, when the folder is absent.
fn fixtures(sub: &str, ext: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures")
        .join(sub);
    if !dir.is_dir() {
        eprintln!(
            "fuzz: {} is absent (fixtures live beside the checkout); seeding from our own inputs only",
            dir.display()
        );
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(ext) {
                out.push(std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The targets.

/// A tiny RDB of our own (one string key, no checksum), for when the fixtures are absent.
fn minimal_rdb() -> Vec<u8> {
    let mut v = b"REDIS0009".to_vec();
    v.extend_from_slice(&[0xFA, 9]);
    v.extend_from_slice(b"redis-ver");
    v.extend_from_slice(&[6]);
    v.extend_from_slice(b"7.0.15");
    v.extend_from_slice(&[0xFE, 0, 0xFB, 1, 0, 0, 3]);
    v.extend_from_slice(b"key");
    v.push(5);
    v.extend_from_slice(b"value");
    v.push(0xFF);
    v.extend_from_slice(&[0; 8]);
    v
}

#[test]
fn rdb() {
    use dbkeeper::engine::redis::rdb::{self, CountOnly, ParseOptions};
    let mut seeds = fixtures("redis-rdb", ".rdb");
    seeds.extend(fixtures("redis-rdb", ".aof"));
    seeds.push(minimal_rdb());
    let deep = ParseOptions {
        decode_values: true,
        capture_payload: true,
    };
    run(
        Target {
            name: "rdb",
            quick: 10_000,
            seeds,
            dict: &[
                b"REDIS0011",
                b"REDIS0012",
                &[0xC3],
                &[0x80, 0xFF, 0xFF, 0xFF, 0xFF],
                &[0x81, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
                &[0xFF, 0, 0, 0, 0, 0, 0, 0, 0],
            ],
            // The reader's own 1 MiB buffer, and reads of declared lengths grow by 1 MiB steps.
            per_byte: 8,
            fixed: 3 << 20,
        },
        |input| {
            let _ = rdb::read(input, &deep, &mut CountOnly, false);
            let _ = rdb::read(input, &ParseOptions::default(), &mut CountOnly, true);
        },
    );
}

#[test]
fn bson() {
    use dbkeeper::fuzzing::{DocReader, validate_bson};
    use mongodb::bson::rawdoc;
    let mut seeds = fixtures("mongodump", ".bson");
    let ours = [
        rawdoc! {"_id": 1, "s": "é", "d": {"a": [1, 2.5, {"b": null}]}, "t": true},
        rawdoc! {"x": mongodb::bson::Binary { subtype: mongodb::bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] }},
    ];
    seeds.push(ours.iter().flat_map(|d| d.as_bytes().to_vec()).collect());
    run(
        Target {
            name: "bson",
            quick: 10_000,
            seeds,
            dict: &[&[3, b'a', 0], &[4, b'a', 0], &[5, 0, 0, 0, 0], &[0x0F]],
            per_byte: 4,
            fixed: 128 << 10,
        },
        |input| {
            let mut r = DocReader::new(input);
            while let Ok(Some(doc)) = r.next_doc() {
                let _ = validate_bson(&doc);
            }
        },
    );
}

/// The input of the Chroma target: byte 0 is the dimension, then `records.jsonl`, a NUL, and
/// `embeddings.f32`.
fn chroma_input(dim: u8, records: &[u8], embeddings: &[u8]) -> Vec<u8> {
    let mut v = vec![dim];
    v.extend_from_slice(records);
    v.push(0);
    v.extend_from_slice(embeddings);
    v
}

#[test]
fn chroma_records() {
    use dbkeeper::engine::chroma::format::{RecordReader, write_page};
    let mut seeds = Vec::new();
    for page in [
        &br#"{"ids":["a","b"],"embeddings":[[1.0,2.5],[-3e-7,4]],"documents":["x",null],"metadatas":[{"k":1,"s":"v"},null],"uris":null}"#[..],
        br#"{"ids":["only"],"embeddings":[[0.5,0.25,0.125]],"documents":null,"metadatas":[{"nested":{"a":[1,2]}}]}"#,
        br#"{"ids":[],"embeddings":[]}"#,
    ] {
        let (mut dim, mut records, mut emb, mut floats) = (None, Vec::new(), Vec::new(), Vec::new());
        write_page(page, &mut dim, &mut records, &mut emb, &mut floats).unwrap();
        seeds.push(chroma_input(dim.unwrap_or(0) as u8, &records, &emb));
    }
    run(
        Target {
            name: "chroma_records",
            quick: 10_000,
            seeds,
            dict: &[
                b"\n",
                b"null",
                b"{",
                b"\"id\":",
                b"\"metadata\":",
                b"\\u0000",
                b"\"",
            ],
            // The reader's 1 MiB line buffer and one vector of at most 255 floats.
            per_byte: 4,
            fixed: (1 << 20) + (64 << 10),
        },
        |input| {
            let Some((&dim, rest)) = input.split_first() else {
                return;
            };
            let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let (records, embeddings) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
            let mut r = RecordReader::new(records, embeddings, dim as usize, "fuzz".into());
            while let Ok(true) = r.next_record() {
                if let Ok(rec) = r.record() {
                    let _ = rec.check();
                }
            }
        },
    );
}

const SET_ID: &str = "2026-12-04_15-42-00";

fn manifests() -> Vec<Vec<u8>> {
    use dbkeeper::engine::EngineKind;
    use dbkeeper::repo::manifest::{
        Encryption, EngineEntry, FORMAT, FORMAT_PLAIN, FileEntry, Manifest, Tool,
    };
    let t = chrono::DateTime::parse_from_rfc3339("2026-12-04T15:42:00Z")
        .unwrap()
        .to_utc();
    let file = |p: &str, n: u64| FileEntry {
        path: p.into(),
        stored: None,
        size: n,
        sha256: "ab".repeat(32),
        raw_size: n * 3,
    };
    let entry = |files: Vec<FileEntry>| EngineEntry {
        source: "redis://cache:6379".into(),
        server_version: "7.0.15".into(),
        started_at: t,
        finished_at: t,
        files,
        counts: [("db0".to_owned(), 3)].into(),
        details: serde_json::json!({"rdb_version": 11}),
    };
    let plain = Manifest {
        format: FORMAT_PLAIN,
        id: SET_ID.into(),
        tool: Tool::current(),
        started_at: t,
        finished_at: t,
        schema_version: None,
        schema: None,
        encryption: None,
        imported: None,
        engines: [
            (
                EngineKind::Redis,
                entry(vec![file("redis/dump.rdb.zst", 10)]),
            ),
            (
                EngineKind::Mongodb,
                entry(vec![file("mongodb/app/users.bson.zst", 20)]),
            ),
        ]
        .into(),
    };
    let sealed = plain.public(Encryption {
        scheme: "age".into(),
        recipients: vec!["x25519:0123456789abcdef".into()],
        manifest: file("manifest.json.age", 5),
        identity: Some(file("identity.age", 1)),
    });
    assert_eq!(sealed.format, FORMAT);
    vec![
        serde_json::to_vec_pretty(&plain).unwrap(),
        serde_json::to_vec_pretty(&sealed).unwrap(),
    ]
}

#[test]
fn manifest() {
    run(
        Target {
            name: "manifest",
            quick: 10_000,
            seeds: manifests(),
            dict: &[
                b"18446744073709551615",
                b"-1",
                b"1e999",
                b"null",
                b"\"format\": 3",
                b"\"../../etc\"",
                b"\"stored\": \"x\",",
                b"\\ud800",
                b"[",
                b"{",
            ],
            per_byte: 8,
            fixed: 16 << 10,
        },
        |input| {
            if let Ok(m) = dbkeeper::fuzzing::manifest(SET_ID, input) {
                // What listing, verify and retention compute from a manifest.
                let _ = m.stored_bytes();
                let _ = m.stored_files();
                for e in m.engines.values() {
                    let _ = e.total_records();
                    let _ = e.stored_bytes();
                }
                let _ = m.schema.as_ref().map(|s| s.summary());
            }
        },
    );
}

/// Serves each input it is sent as a whole server answer on a loopback socket, then closes.
fn resp_server() -> (u16, mpsc::Sender<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        while let Ok(answer) = rx.recv() {
            let Ok((mut s, _)) = l.accept() else { return };
            // The client's commands are read after the answer is sent and the write side shut,
            // so a client that stops reading early never blocks the server.
            let _ = s.write_all(&answer);
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = std::io::copy(&mut s, &mut std::io::sink());
        }
    });
    (port, tx)
}

#[test]
fn resp() {
    use dbkeeper::engine::redis::probe_blocking;
    use dbkeeper::secret::Secret;
    let (port, tx) = resp_server();
    let url = Secret::new(format!("redis://127.0.0.1:{port}"));
    let info = b"# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
    let mut pong_info = format!("+PONG\r\n${}\r\n", info.len()).into_bytes();
    pong_info.extend_from_slice(info);
    pong_info.extend_from_slice(b"\r\n");
    let seeds: Vec<Vec<u8>> = vec![
        pong_info,
        b"+PONG\r\n-ERR unknown command 'INFO'\r\n".to_vec(),
        b"-LOADING Redis is loading the dataset in memory\r\n".to_vec(),
        b"-NOAUTH Authentication required.\r\n".to_vec(),
        b"+PONG\r\n*3\r\n$3\r\nfoo\r\n:42\r\n*-1\r\n".to_vec(),
        b"+PONG\r\n$-1\r\n".to_vec(),
        b"*2\r\n*1\r\n+x\r\n$0\r\n\r\n".to_vec(),
    ];
    run(
        Target {
            name: "resp",
            quick: 3000,
            seeds,
            dict: &[
                b"$4294967295\r\n",
                b"$67108864\r\n",
                b"*1048576\r\n",
                b"*1\r\n",
                b"\r\n",
                b":-9223372036854775808\r\n",
            ],
            // The connection's 64 KiB read buffer and a line of at most 64 KiB.
            per_byte: 4,
            fixed: 160 << 10,
        },
        |input| {
            tx.send(input.to_vec()).unwrap();
            let _ = probe_blocking(&url, &Default::default(), Duration::from_secs(10));
        },
    );
}

#[test]
fn cron() {
    use dbkeeper::sidecar::schedule::Schedule;
    let seeds: Vec<Vec<u8>> = [
        "0 2 * * *",
        "*/15 * * * 1-5",
        "30 3 1,15 * *|Europe/Paris",
        "0 0 29 2 *|:America/New_York",
        "5 4 L * *",
        "0 0 ? * MON#2|UTC",
        "0 12 * JAN-MAR SUN|Asia/Kolkata",
        "59 23 31 12 7",
        "0 0 30 2 *",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run(
        Target {
            name: "cron",
            quick: 2000,
            seeds,
            dict: &[
                b"*",
                b"/",
                b"-",
                b",",
                b"L",
                b"W",
                b"#",
                b"?",
                b" ",
                b"0",
                b"59",
                b"4294967295",
                b"MON",
                b"DEC",
                b"|",
                b"Europe/Paris",
                b":",
                b"@daily",
            ],
            per_byte: 16,
            fixed: 64 << 10,
        },
        |input| {
            let text = String::from_utf8_lossy(input);
            let (expr, tz) = match text.split_once('|') {
                Some((e, tz)) => (e, Some(tz)),
                None => (&*text, None),
            };
            if let Ok(s) = Schedule::parse("DBKEEPER_SCHEDULE", expr, tz) {
                let _ = s.interval(chrono::Utc::now());
            }
        },
    );
}

#[test]
fn duration() {
    use dbkeeper::config::{MinFree, parse_stats_interval};
    let seeds: Vec<Vec<u8>> = [
        "30s", "1h 30m", "5min", "2days", "1week", "250ms", "10%", "5GiB", "500MB", "0", "1.5h",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run(
        Target {
            name: "duration",
            quick: 10_000,
            seeds,
            dict: &[
                b"18446744073709551615",
                b"99999999999999999999",
                b"y",
                b"ns",
                b"TiB",
                b"%",
                b".",
                b"-",
                b" ",
                b"e308",
            ],
            per_byte: 16,
            fixed: 16 << 10,
        },
        |input| {
            let text = String::from_utf8_lossy(input);
            let _ = dbkeeper::cli::parse_duration(&text);
            let _ = parse_stats_interval(&text);
            if let Ok(m) = MinFree::parse(&text) {
                let _ = m.is_low(u64::MAX, u64::MAX);
                let _ = m.is_low(0, 1);
            }
        },
    );
}

/// The mutator itself: it must reach the huge-length and truncation cases the targets rely on,
/// and replay the same input from the same seed.
#[test]
fn mutator_covers_its_cases() {
    let seeds = vec![b"0123456789abcdef".to_vec()];
    let mut huge = false;
    let mut shorter = false;
    for s in 0..2000 {
        let a = mutate(&mut Rng::with_seed(s), &seeds, &[]);
        assert_eq!(a, mutate(&mut Rng::with_seed(s), &seeds, &[]));
        huge |= a.windows(4).any(|w| w == [0xFF; 4]);
        shorter |= a.len() < seeds[0].len();
    }
    assert!(huge && shorter);
}

/// The counting allocator sees a large allocation on this thread.
#[test]
fn allocator_counts() {
    let (_, largest) = measured(|| drop(std::hint::black_box(vec![0u8; 3 << 20])));
    assert!(largest >= 3 << 20);
    let (r, _) = measured(|| {
        let _ = std::hint::black_box(vec![0u8; 16]);
    });
    assert!(r.is_ok());
}

/// The inputs the allocation bound exists for, by hand: length prefixes far beyond the bytes
/// that follow them cost what arrives, not what they claim.
#[test]
fn huge_length_prefixes_allocate_what_arrives() {
    use dbkeeper::engine::redis::rdb::{self, CountOnly, ParseOptions};
    use dbkeeper::fuzzing::DocReader;
    // BSON: a 16 MiB document prefix before 100 bytes.
    let mut bson = 0x00FF_FFFFu32.to_le_bytes().to_vec();
    bson.extend_from_slice(&[0x10; 100]);
    let (r, largest) = measured(|| assert!(DocReader::new(&bson[..]).next_doc().is_err()));
    r.unwrap();
    assert!(largest < 256 << 10, "bson: {largest} bytes");
    // RDB: a string key whose 32-bit length says 4 GiB.
    let mut rdb_bytes = b"REDIS0009\xFE\x00\x00\x80\xFF\xFF\xFF\xFFkey".to_vec();
    rdb_bytes.extend_from_slice(&[0; 64]);
    let opts = ParseOptions {
        decode_values: true,
        capture_payload: true,
    };
    let (r, largest) =
        measured(|| assert!(rdb::read(&rdb_bytes[..], &opts, &mut CountOnly, false).is_err()));
    r.unwrap();
    assert!(largest < 3 << 20, "rdb: {largest} bytes");
    // RESP: a 64 MiB bulk header before 3 bytes and a closed socket.
    let (port, tx) = resp_server();
    let url = dbkeeper::secret::Secret::new(format!("redis://127.0.0.1:{port}"));
    tx.send(b"$67108864\r\nabc".to_vec()).unwrap();
    let (r, largest) = measured(|| {
        assert!(
            dbkeeper::engine::redis::probe_blocking(
                &url,
                &Default::default(),
                Duration::from_secs(10)
            )
            .is_err()
        )
    });
    r.unwrap();
    assert!(largest < 256 << 10, "resp: {largest} bytes");
}
