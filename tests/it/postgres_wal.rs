//! The WAL scanner against a real server's pg_wal: its transaction ends equal pg_waldump's
//! COMMIT/ABORT lines (LSN and time) whatever the chunk size; a zeroed tail and a flipped byte
//! end the scan at the last whole record.

use std::path::Path;
use std::process::Command;

use chrono::{DateTime, NaiveDateTime, Utc};
use dbkeeper::engine::postgres::wal::{WalScanner, XactEnd, XactKind};

use crate::common::postgres::{PgServer, pg_bin};

const SEG: u64 = 16 << 20;

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// pg_waldump's transaction ends: (lsn, kind, time), times printed in the TZ it runs with.
fn waldump(dir: &Path, first: &str, last: &str) -> Vec<(u64, XactKind, DateTime<Utc>)> {
    let o = Command::new(pg_bin("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(dir)
        .args(["-r", "Transaction", first, last])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let mut v = Vec::new();
    for line in out.lines() {
        let lsn = line
            .split("lsn: ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap();
        let desc = line.split("desc: ").nth(1).unwrap();
        let kind = match desc.split([' ', ';']).next().unwrap() {
            "COMMIT" => XactKind::Commit,
            "ABORT" => XactKind::Abort,
            "COMMIT_PREPARED" => XactKind::CommitPrepared,
            "ABORT_PREPARED" => XactKind::AbortPrepared,
            _ => continue,
        };
        let at = desc.find(" UTC").unwrap();
        let ts = &desc[at - 26..at];
        let t = NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.6f")
            .unwrap()
            .and_utc();
        v.push((parse_lsn(lsn), kind, t));
    }
    v
}

fn scan(wal: &[u8], start: u64, chunk: usize) -> (Vec<XactEnd>, WalScanner) {
    let mut s = WalScanner::new(start);
    let mut v = Vec::new();
    for c in wal.chunks(chunk) {
        v.extend(s.feed(c));
    }
    (v, s)
}

fn flat(v: &[XactEnd]) -> Vec<(u64, XactKind, DateTime<Utc>)> {
    v.iter().map(|x| (x.start, x.kind, x.time)).collect()
}

#[test]
fn postgres_wal_scan_matches_pg_waldump() {
    let mut pg = PgServer::start();
    pg.psql("ALTER SYSTEM SET max_prepared_transactions = 4");
    pg.stop();
    pg.run();
    let slot = pg.psql("SELECT lsn FROM pg_create_physical_replication_slot('keep', true, false)");
    let start = parse_lsn(slot.trim()) / SEG * SEG;
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    pg.psql("ALTER TABLE t ALTER v SET STORAGE EXTERNAL");
    for i in 0..20 {
        pg.psql(&format!("INSERT INTO t VALUES ({i}, 'x')"));
    }
    pg.psql("BEGIN; INSERT INTO t VALUES (1000, 'a'); ROLLBACK");
    pg.psql("BEGIN; INSERT INTO t VALUES (1001, 'p'); PREPARE TRANSACTION 'p1'");
    pg.psql("COMMIT PREPARED 'p1'");
    pg.psql("BEGIN; INSERT INTO t VALUES (1002, 'q'); PREPARE TRANSACTION 'p2'");
    pg.psql("ROLLBACK PREPARED 'p2'");
    pg.psql("CHECKPOINT");
    pg.psql("UPDATE t SET v = 'y' WHERE id < 10");
    // Incompressible TOASTed rows: more than a segment of WAL.
    pg.psql(
        "INSERT INTO t SELECT i, (SELECT string_agg(md5(random()::text || i || j), '') \
         FROM generate_series(1, 300) j) FROM generate_series(2000, 4000) i",
    );
    pg.psql("SELECT pg_logical_emit_message(true, 'big', repeat(md5('x'), 4000))");
    pg.psql("BEGIN; INSERT INTO t VALUES (1003, 'b'); ROLLBACK");
    pg.psql("SELECT pg_switch_wal()");
    for i in 0..5 {
        pg.psql(&format!("INSERT INTO t VALUES ({}, 'z')", 5000 + i));
    }
    pg.stop();

    let dir = pg.data.join("pg_wal");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    names.sort();
    let first = format!(
        "00000001{:08X}{:08X}",
        start >> 32,
        (start & 0xFFFF_FFFF) / SEG
    );
    names.retain(|n| *n >= first);
    assert!(names.len() >= 3, "segments: {names:?}");
    let mut wal = Vec::new();
    for n in &names {
        wal.extend(std::fs::read(dir.join(n)).unwrap());
    }
    // Coverage: some segment after the first starts inside a record.
    let conts = (1..names.len())
        .filter(|k| {
            let off = k * SEG as usize;
            wal[off + 2] & 1 != 0 && wal[off + 16..off + 20] != [0; 4]
        })
        .count();
    assert!(conts >= 1, "no record spans a segment boundary");

    // Both ends: given one segment, pg_waldump reads only that one.
    let want = waldump(&dir, &first, names.last().unwrap());
    for k in [
        XactKind::Commit,
        XactKind::Abort,
        XactKind::CommitPrepared,
        XactKind::AbortPrepared,
    ] {
        assert!(want.iter().any(|w| w.1 == k), "pg_waldump shows no {k:?}");
    }
    assert!(want.len() > 25, "{want:?}");

    for chunk in [1 << 20, 8192, 4093, 7, 1] {
        let (got, s) = scan(&wal, start, chunk);
        let g = flat(&got);
        let d = g.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            g == want,
            "chunk {chunk}: got {} want {}, first diff {d:?}: {:?} vs {:?}; last got {:?} valid_end {}",
            g.len(),
            want.len(),
            d.map(|i| g[i]),
            d.map(|i| want[i]),
            g.last(),
            s.valid_end()
        );
        assert!(s.ended(), "chunk {chunk}: the tail is not valid WAL");
        assert!(
            got.iter()
                .all(|x| x.end > x.start && x.end <= s.valid_end())
        );
        assert_eq!(s.position(), start + wal.len() as u64);
    }

    // A zero-filled tail from inside a commit record ends at the record before it.
    let (all, _) = scan(&wal, start, 1 << 20);
    let cut = all[all.len() / 2];
    let mut torn = wal.clone();
    let at = (cut.start - start) as usize + 10;
    torn[at..].fill(0);
    let (got, s) = scan(&torn, start, 4093);
    assert!(s.ended());
    assert_eq!(got, all[..all.len() / 2]);
    assert!(s.valid_end() <= cut.start && s.valid_end() + 8 > cut.start);

    // A flipped byte in a commit's timestamp: the CRC stops the scan before that record.
    let mut bad = wal.clone();
    bad[(cut.start - start) as usize + 26] ^= 0x01;
    let (got, s) = scan(&bad, start, 8192);
    assert!(s.ended());
    assert_eq!(got, all[..all.len() / 2]);
    assert!(s.valid_end() <= cut.start && s.valid_end() + 8 > cut.start);
}
