//! The suite's figures: each fault class records the cases it tried and passed and the seed it
//! ran with, merged (under a file lock, tests run in parallel) into `target/faults/results.json`.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether this is the full run (`DBKEEPER_FAULTS=full`) rather than CI's quick subset.
pub fn full() -> bool {
    std::env::var("DBKEEPER_FAULTS").is_ok_and(|v| v == "full")
}

/// `quick` cases in the quick run, `full` in the full run (`DBKEEPER_FAULT_CASES=N` overrides both).
pub fn cases(quick: usize, full_run: usize) -> usize {
    if let Some(n) = std::env::var("DBKEEPER_FAULT_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    if full() { full_run } else { quick }
}

/// The run's seed: `DBKEEPER_FAULT_SEED`, else the clock's nanoseconds; printed once so a failure
/// can be replayed.
pub fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("DBKEEPER_FAULT_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("fault suite seed: {s} (replay with DBKEEPER_FAULT_SEED={s})");
        s
    })
}

/// A seed for one case of one class, derived from the run's seed so each case replays alone.
pub fn case_seed(class: &str, case: usize) -> u64 {
    let mut h = seed() ^ 0x9e37_79b9_7f4a_7c15;
    for b in class.bytes().chain((case as u64).to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn results_path() -> PathBuf {
    // `target/faults/`, whatever target triple the build is configured for.
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("faults")
        .join("results.json")
}

/// Records one fault class's tally. `failures` names the cases that failed (with their seeds);
/// the test asserts on them itself, this only publishes.
pub fn record(class: &str, tried: usize, passed: usize, failures: &[String]) {
    let path = results_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .unwrap();
    f.lock().unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    let mut all: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_default();
    all.insert(
        class.to_owned(),
        serde_json::json!({
            "tried": tried,
            "passed": passed,
            "seed": seed(),
            "mode": if full() { "full" } else { "quick" },
            "failures": failures,
        }),
    );
    let out = serde_json::to_string_pretty(&all).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.set_len(0).unwrap();
    f.write_all(out.as_bytes()).unwrap();
    f.write_all(b"\n").unwrap();
    eprintln!(
        "fault class {class}: {passed}/{tried} passed (seed {})",
        seed()
    );
}

/// The message a caught panic carried (an assertion's text), for a case's failure line.
pub fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}
