"""MongoDB point-in-time recovery (the `pitr` case of benches/run): oplog archiving under the
stand-in's maximum insert rate, replay throughput against pymongo bulk_write, and the writes
lost when the host dies.

Called by harness.py as `case_pitr(harness)`, with the harness module for its helpers (record,
start, run, WORK, BIN, …). Every server here is a one-member replica set (the stand-in without
`--standalone`), its own process with its own storage, so that one part's oplog never feeds
another's archive.

1. archive: insert load at the server's maximum rate (several writer processes, small
   insert_many batches), measured first without the sidecar, then for `load_s` seconds with
   `dbkeeper sidecar` archiving (DBKEEPER_PITR_FLUSH=1s). Lag per segment from the sidecar's
   `oplog segment published … lag_s=` lines (p50/p99), CPU from /proc/PID/stat over the load,
   peak RSS (VmHWM), and the time from the last acknowledged write to `list --pitr --json`
   reaching it. Reference: the same load with a bare pymongo tailable cursor on the oplog
   instead of the sidecar (what any oplog reader gets from this server under this load).
2. replay: a set, then M mixed operations (runs of inserts, $set updates and deletes) on the
   source while the sidecar archives; `restore --to-oplog-ts <last>` into an empty server,
   timed by its `oplog segments replayed … elapsed_ms=` line (the replay alone, not the set's
   restore), against the same operations sent by pymongo `bulk_write(ordered=True)` into a
   server preloaded with the same base data (the batches are the same: runs of one kind are
   shorter than both sides' batch limits).
3. rpo: a writer that logs each acknowledged insert's _id and time; the server is killed (-9)
   mid-load, then the sidecar is stopped (SIGTERM), or, the "host dies" variant, both are
   killed (-9) at the same instant; restore to the newest recoverable point (`list --pitr
   --json`) into a fresh server; the acknowledged inserts missing there, in seconds of writes
   at the load's rate. --quick runs the host-death variant only.

DBKEEPER_BENCH_PITR_RATE=0.25 paces the loads (not the calibration) to that fraction of the
measured maximum, to see the figures under a load the server's oplog readers can follow.
The sidecars' logs are kept in target/bench/pitr-logs/.
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

FLUSH_S = 1.0

# Writer: P processes x T threads, each inserting batches of B small documents for S seconds
# (or until the server goes away). With `log`, every acknowledged _id and its time go to
# OUT.<proc>. Prints one JSON line: acknowledged documents and the first/last ack time.
WRITER = r"""
import json, multiprocessing as mp, os, sys, threading, time
uri, procs, threads, batch, secs, out, rate = sys.argv[1:8]
procs, threads, batch, secs, rate = int(procs), int(threads), int(batch), float(secs), float(rate)
# rate > 0: paced to that many inserts/s in all, evenly over the threads.
every = batch * procs * threads / rate if rate > 0 else 0
# _ids unique across runs on one server: (run, writer thread, sequence).
run = int(time.time() * 10) % 10**6

def proc(k, q):
    import pymongo
    c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=1000, socketTimeoutMS=2000,
                            retryWrites=False, maxPoolSize=threads)
    coll = c.bench.events
    lock = threading.Lock()
    acked, logged, first, last, errors = [0], [], [None], [None], []
    end = time.time() + secs

    def work(t):
        seq = 0
        base = (run * 1000 + k * threads + t) * 10**9
        pad = "x" * 64
        due = time.time()
        while time.time() < end:
            if every:
                due += every
                time.sleep(max(0.0, due - time.time()))
            ids = list(range(base + seq, base + seq + batch))
            seq += batch
            docs = [{"_id": i, "k": i % 97, "s": pad} for i in ids]
            try:
                if batch == 1:
                    coll.insert_one(docs[0])
                else:
                    coll.insert_many(docs, ordered=True)
            except Exception as e:  # the server went away (the rpo part kills it)
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                return
            now = time.time()
            with lock:
                acked[0] += batch
                first[0] = first[0] or now
                if out != "-":
                    logged.append((ids, now))
                last[0] = now

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    [t.start() for t in ts]; [t.join() for t in ts]
    if out != "-":
        with open(f"{out}.{k}", "w") as f:
            for ids, at in logged:
                for i in ids:
                    f.write(f"{i} {at:.6f}\n")
    q.put((acked[0], first[0], last[0], errors))

if __name__ == "__main__":
    q = mp.Queue()
    ps = [mp.Process(target=proc, args=(k, q)) for k in range(procs)]
    t0 = time.time()
    [p.start() for p in ps]
    res = [q.get() for _ in ps]
    [p.join() for p in ps]
    firsts = [r[1] for r in res if r[1]]
    lasts = [r[2] for r in res if r[2]]
    print(json.dumps({"acked": sum(r[0] for r in res), "started": t0,
                      "first": min(firsts) if firsts else None,
                      "last": max(lasts) if lasts else None,
                      "errors": [e for r in res for e in r[3]]}))
"""

# Base data and mixed operations from one seed: `seed URI N` loads the N base documents,
# `ops URI N M` sends the M operations with one ordered bulk_write (timed alone) and prints
# {"seconds", "ops", "inserted", "modified", "deleted"}.
MIXED = r"""
import json, random, sys, time
import pymongo
from pymongo import InsertOne, UpdateOne, DeleteOne
mode, uri, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
coll = pymongo.MongoClient(uri).bench.items

def base(i, rng):
    return {"_id": i, "name": f"item-{i:08d}", "qty": rng.randrange(1000),
            "price": round(rng.uniform(1, 500), 2), "tags": ["a", "b", "c"][: rng.randrange(1, 4)],
            "note": rng.randbytes(rng.randrange(20, 80)).hex()}

if mode == "seed":
    rng = random.Random(3)
    docs = [base(i, rng) for i in range(n)]
    for s in range(0, n, 5000):
        coll.insert_many(docs[s:s + 5000], ordered=False)
    sys.exit()

m = int(sys.argv[4])
rng = random.Random(5)
alive, nxt, ops = list(range(n)), n, []
pos = {i: i for i in alive}  # _id -> index in alive, for O(1) deletes

def pick():
    return alive[rng.randrange(len(alive))]

while len(ops) < m:
    kind = rng.choices(["i", "u", "d"], weights=[5, 3, 2])[0]
    for _ in range(min(rng.randrange(1, 101), m - len(ops))):
        if kind == "i":
            ops.append(InsertOne(base(nxt, rng)))
            pos[nxt] = len(alive); alive.append(nxt); nxt += 1
        elif kind == "u":
            ops.append(UpdateOne({"_id": pick()}, {"$set": {"qty": rng.randrange(1000, 2000),
                                                            "seen": rng.randrange(10**6)}}))
        else:
            victim = pick()
            ops.append(DeleteOne({"_id": victim}))
            j, last = pos.pop(victim), alive.pop()
            if last != victim:
                alive[j] = last; pos[last] = j
t0 = time.perf_counter()
r = coll.bulk_write(ops, ordered=True)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "ops": len(ops), "inserted": r.inserted_count,
                  "modified": r.modified_count, "deleted": r.deleted_count}))
"""

DIGEST = r"""
import hashlib, json, sys, bson, pymongo
coll = pymongo.MongoClient(sys.argv[1]).bench[sys.argv[2]]
h, n = hashlib.sha256(), 0
for d in coll.find({}, sort=[("_id", 1)]):
    # Field order is not part of the comparison: sorted keys.
    h.update(json.dumps(d, sort_keys=True, default=str).encode()); n += 1
print(json.dumps({"count": n, "sha256": h.hexdigest()}))
"""

IDS = r"""
import sys, pymongo
coll = pymongo.MongoClient(sys.argv[1]).bench.events
with open(sys.argv[2], "w") as f:
    for d in coll.find({}, {"_id": 1}).batch_size(10000):
        f.write(f"{d['_id']}\n")
"""

# A bare oplog reader, the reference for the archiver's lag: a pymongo tailable awaitData
# cursor on local.oplog.rs from its newest entry, keeping nothing. It ends 2 s after the last
# entry it read (the load is over), and prints the entries read, the lag (read time - write
# time) of every 100th, and when it read the last one.
TAILER = r"""
import json, sys, time
import pymongo
from bson.raw_bson import RawBSONDocument
from pymongo import CursorType
c = pymongo.MongoClient(sys.argv[1], document_class=RawBSONDocument)
oplog = c.local["oplog.rs"]
after = oplog.find_one({}, sort=[("ts", -1)])["ts"]
print("ready", flush=True)
n, lags, last_read, give_up = 0, [], None, time.time() + float(sys.argv[2])
while time.time() < give_up and (last_read is None or time.time() - last_read < 2):
    cur = oplog.find({"ts": {"$gt": after}},
                     cursor_type=CursorType.TAILABLE_AWAIT).max_await_time_ms(200)
    # An idle cursor is reopened from where it stands, as the archiver does: the stand-in's
    # tailable cursors do not see entries written after they went idle.
    got = True
    while got and cur.alive:
        got = False
        for d in cur:
            got = True
            last_read = time.time()
            if n % 100 == 0:
                lags.append(last_read - d["wall"].timestamp())
            after = d["ts"]
            n += 1
    cur.close()
    time.sleep(0.01)
print(json.dumps({"entries": n, "lags": lags, "last_read": last_read}))
"""

LAST_TS = r"""
import sys, pymongo
d = pymongo.MongoClient(sys.argv[1]).local["oplog.rs"].find_one({}, sort=[("ts", -1)])
print(f"{d['ts'].time}:{d['ts'].inc}")
"""


def sizes(quick):
    return {
        "calib_s": 2 if quick else 15,  # the max rate without the sidecar
        "load_s": 4 if quick else 60,  # the sustained load with the sidecar (and the reference)
        "replay_base": 10_000 if quick else 100_000,
        "replay_ops": 10_000 if quick else 200_000,
        "replay_rounds": 1 if quick else 3,
        "rpo_kill_after_s": 4 if quick else 15,  # from the first write; longer than the lag
        "rpo_runs": 1 if quick else 3,  # per variant
        # --quick: the host-death variant only (the README's claim).
        "rpo_variants": ("host",) if quick else ("db", "host"),
    }


# Writer shape: on the 2-core bench machine, 1-4 processes x 2-4 threads x batches of 1-1000
# documents reach their highest rate (~50 000 inserts/s) from batches of 100 on; insert_one
# tops out near 3 000/s.
LOAD = {"procs": 2, "threads": 2, "batch": 100}
# The RPO writer logs every acknowledged _id with its acknowledgement's time.
RPO_LOAD = {"procs": 2, "threads": 2, "batch": 10}


def case_pitr(h):
    S = sizes(h.QUICK)
    w = h.WORK / "pitr"
    w.mkdir(exist_ok=True)
    scripts = {}
    for name, text in (("writer", WRITER), ("mixed", MIXED), ("digest", DIGEST), ("ids", IDS),
                       ("last_ts", LAST_TS), ("tailer", TAILER)):
        scripts[name] = w / f"{name}.py"
        scripts[name].write_text(text)
    ctx = Ctx(h, w, scripts)
    try:
        archive(ctx, S)
        replay(ctx, S)
        rpo(ctx, S)
    finally:
        # The sidecars' logs (every segment's entries and lag) outlive the work directory.
        keep = Path(os.environ.get("DBKEEPER_BENCH_OUT", h.ROOT / "target/bench")) / "pitr-logs"
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
        for f in h.WORK.glob("sidecar-*.log"):
            shutil.copy(f, keep / f.name)


class Ctx:
    def __init__(self, h, w, scripts):
        self.h, self.w, self.s = h, w, scripts
        self.n = 0
        # DBKEEPER_BENCH_PITR_RATE=0.25: the loads (not the calibration) paced to that
        # fraction of the measured maximum, to see the figures under a load the server's
        # oplog readers can follow. Unset: unpaced, the maximum rate.
        self.pace = float(os.environ.get("DBKEEPER_BENCH_PITR_RATE", "0"))
        self.rate = 0

    def py(self, script, *args, timeout=None):
        out = subprocess.run([self.h.PY, self.s[script], *map(str, args)], check=True,
                             capture_output=True, text=True, timeout=timeout).stdout
        return json.loads(out) if out.strip().startswith("{") else out.strip()

    def server(self, tag):
        """A fresh one-member replica set; returns (uri, Popen). The oplog cap is raised so
        that a full run's load stays inside it (the default keeps 100 000 entries)."""
        self.n += 1
        name = f"pitr-{tag}-{self.n}"
        port = self.h.free_port()

        def ready():
            import pymongo
            c = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true",
                                    serverSelectionTimeoutMS=300)
            return c.admin.command("hello").get("isWritablePrimary")

        p = self.h.start(name, [self.h.SECANTUSD, "--host", "127.0.0.1", "--port", port,
                                "--storage-path", self.h.WORK / name, "--log-file-max", "16MB",
                                "--cache-size", "512M", "--oplog-max-entries", "5000000",
                                "--log-level", "WARNING"], ready=ready)
        return f"mongodb://127.0.0.1:{port}/?directConnection=true", p

    def backup(self, repo, uri):
        self.h.clear_repo(repo)
        out = subprocess.run([self.h.BIN, "backup"], env=self.h.dbk_env(
            repo, DBKEEPER_MONGODB_URI=uri), check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def sidecar(self, tag, repo, uri):
        port = self.h.free_port()
        env = self.h.dbk_env(repo, DBKEEPER_MONGODB_URI=uri, DBKEEPER_MONGODB_PITR="on",
                             DBKEEPER_PITR_FLUSH=f"{int(FLUSH_S * 1000)}ms",
                             DBKEEPER_LISTEN=f"127.0.0.1:{port}", DBKEEPER_SCHEDULE="0 3 1 1 *",
                             DBKEEPER_MIN_FREE="0%", DBKEEPER_KEEP_LAST="10",
                             DBKEEPER_LOG="info,dbkeeper=debug")
        name = f"sidecar-{tag}"
        p = self.h.start(name, self.h.TASKSET + [str(self.h.BIN), "sidecar"], env=env,
                         ready=lambda: urllib.request.urlopen(
                             f"http://127.0.0.1:{port}/metrics", timeout=1).read() is not None)
        logf = self.h.WORK / f"{name}.log"
        for _ in range(100):
            if "oplog archiving started" in logf.read_text():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{name}: archiving did not start: {logf.read_text()[-2000:]}")
        return p, port, logf

    def newest_point(self, repo):
        """The newest recoverable oplog position over all windows, as (t, i), or None."""
        out = subprocess.run([self.h.BIN, "list", "--pitr", "--json"],
                             env=self.h.dbk_env(repo), capture_output=True, text=True)
        try:
            ends = [parse_ts(wd["to_ts"]) for wd in json.loads(out.stdout)]
        except (ValueError, KeyError, TypeError):
            return None
        return max(ends) if ends else None

    def wait_archived(self, repo, target, timeout):
        """Polls until the archive reaches `target`; returns the time.time() it did, or None."""
        end = time.time() + timeout
        while time.time() < end:
            p = self.newest_point(repo)
            if p is not None and p >= target:
                return time.time()
            time.sleep(0.02)
        return None

    def writer(self, uri, secs, load, out="-", wait=True):
        argv = [self.h.PY, self.s["writer"], uri, load["procs"], load["threads"], load["batch"],
                secs, out, self.rate if load is not None and self.pace else 0]
        p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, text=True)
        return finish_writer(p) if wait else p


def finish_writer(p, timeout=None, expect_errors=False):
    out, _ = p.communicate(timeout=timeout)
    r = json.loads(out.strip().splitlines()[-1])
    if not r["acked"] or (r["errors"] and not expect_errors):
        raise RuntimeError(f"writer: {r['acked']} inserts acknowledged, errors {r['errors'][:3]}")
    return r


def parse_ts(s):
    t, i = s.split(":")
    return int(t), int(i)


def proc_cpu_s(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


def pct(xs, q):
    """Nearest-rank percentile."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


SEGMENT = re.compile(r"oplog segment published.*?entries=(\d+).*?lag_s=([0-9.]+)")
REPLAYED = re.compile(r"oplog segments replayed.*?entries=(\d+).*?elapsed_ms=(\d+)")


def segments(logf, since=0):
    """(entries, lag_s) of every segment the sidecar's log reports after byte `since`."""
    text = logf.read_text()[since:]
    return [(int(m[1]), float(m[2])) for m in SEGMENT.finditer(text)]


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
    p.wait(timeout=30)


# --- 1. archiving under the maximum insert rate ------------------------------------------------


def archive(c, S):
    h = c.h
    uri, server = c.server("archive")
    h.log(f"pitr: writer {LOAD['procs']} processes x {LOAD['threads']} threads x insert_many of "
          f"{LOAD['batch']} ~100 B documents")
    pace, c.pace = c.pace, 0
    base = c.writer(uri, S["calib_s"], LOAD)
    rate0 = base["acked"] / (base["last"] - base["first"])
    h.log(f"pitr: without the sidecar {rate0:.0f} inserts/s over {S['calib_s']} s")
    c.pace, c.rate = pace, pace * rate0
    if pace:
        h.log(f"pitr: DBKEEPER_BENCH_PITR_RATE={pace}: loads paced to {c.rate:.0f} inserts/s")
    repo = c.w / "repo-archive"
    c.backup(repo, uri)
    sc, port, logf = c.sidecar("archive", repo, uri)
    since = len(logf.read_text())
    cpu0, t0 = proc_cpu_s(sc.pid), time.monotonic()
    res = c.writer(uri, S["load_s"], LOAD)
    cpu1, t1 = proc_cpu_s(sc.pid), time.monotonic()
    last = parse_ts(c.py("last_ts", uri))
    reached = c.wait_archived(repo, last, 30)
    catch_up = None if reached is None else max(0.0, reached - res["last"])
    hwm = proc_hwm_kib(sc.pid)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    stop(sc)
    # The reference: the same load with a bare pymongo oplog reader instead of the sidecar.
    tp = subprocess.Popen([str(h.PY), str(c.s["tailer"]), uri, str(S["load_s"] + 120)],
                          stdout=subprocess.PIPE, text=True)
    tp.stdout.readline()
    ref = c.writer(uri, S["load_s"], LOAD)
    try:
        out = tp.communicate(timeout=S["load_s"] + 180)[0]
    finally:
        if tp.poll() is None:
            tp.kill()
    tail = json.loads(out.strip().splitlines()[-1])
    stop(server)
    ref_rate = ref["acked"] / (ref["last"] - ref["first"])
    ref_catch = tail["last_read"] - ref["last"] if tail["last_read"] else None
    h.log(f"pitr: with a bare pymongo tailer instead {ref_rate:.0f} inserts/s; it read "
          f"{tail['entries']} entries, lag p50 {pct(tail['lags'], 50):.3f} s, p99 "
          f"{pct(tail['lags'], 99):.3f} s; it read the last write {ref_catch} s after it")
    rate = res["acked"] / (res["last"] - res["first"])
    cpu = (cpu1 - cpu0) / (t1 - t0) * 100
    segs = segments(logf, since)
    lags = [lag for _, lag in segs]
    entries = sum(n for n, _ in segs)
    archived = metric(metrics, "dbkeeper_pitr_entries_total")
    h.log(f"pitr: with the sidecar {rate:.0f} inserts/s over {S['load_s']} s; {len(segs)} segments, "
          f"{entries} entries (metrics: {archived}); lag p50 {pct(lags, 50):.3f} s, p99 "
          f"{pct(lags, 99):.3f} s, max {max(lags):.3f} s; sidecar CPU {cpu:.2f}% of a core, "
          f"VmHWM {hwm} KiB; archive reached the last write {catch_up} s after it")
    note = (f"lag = segment publication - write time of its first entry; with "
            f"DBKEEPER_PITR_FLUSH=1s a segment is cut 1 s after its first entry is read, so the "
            f"lag cannot be under 1 s; {len(segs)} segments over {S['load_s']} s")
    if res["acked"] > entries:
        h.FAILURES.append(f"pitr-archive: {res['acked']} inserts acknowledged, {entries} "
                          "entries archived")
    load = f"{rate:.0f} inserts/s for {S['load_s']} s, flush 1 s"
    if c.pace:
        load += f", paced to {c.pace:g} of the maximum"
    h.record("pitr-archive", "insert rate with the archiver running" + (
             f" (paced to {c.pace:g} of the maximum)" if c.pace else ""), round(rate),
             "the same writers without the sidecar", round(rate0), "inserts/s", "higher",
             note="both on the same 2 cores: the sidecar's CPU comes out of the server's")
    h.record("pitr-archive", f"archive lag p50 ({load})", round(pct(lags, 50), 3), "target",
             1.0, "s", "lower", "<=1", note=note)
    h.record("pitr-archive", f"archive lag p99 ({load})", round(pct(lags, 99), 3), "target",
             1.0, "s", "lower", "<=1", note=note)
    tailer = "a bare pymongo tailable cursor on the oplog under the same writers (no flush)"
    h.record("pitr-archive", f"archive lag p50 ({load})", round(pct(lags, 50), 3), tailer,
             round(pct(tail["lags"], 50), 3), "s", "lower",
             note=f"the reader's lag is per entry read (every 100th), ours per published segment; "
                  f"writers reached {ref_rate:.0f} inserts/s with the reader")
    h.record("pitr-archive", f"archive lag p99 ({load})", round(pct(lags, 99), 3), tailer,
             round(pct(tail["lags"], 99), 3), "s", "lower")
    h.record("pitr-archive", "last write recoverable after the load stops",
             None if catch_up is None else round(catch_up, 3), tailer,
             None if ref_catch is None else round(ref_catch, 3), "s", "lower",
             note="the reader: from the last acknowledged insert to reading it")
    h.record("pitr-archive", f"sidecar CPU under load ({load})", round(cpu, 2), "target", 5.0,
             "% of a core", "lower", "<=5")
    h.record("pitr-archive", f"sidecar max RSS (VmHWM, {load})", hwm, "target", 32 * 1024,
             "KiB", "lower", "<=32768")
    h.record("pitr-archive", "last write recoverable after the load stops", None if catch_up is None
             else round(catch_up, 3), "target", 2.0, "s", "lower", "<=2",
             note="from the last acknowledged insert to `list --pitr --json` reaching the "
                  "oplog's last entry (polled every 20 ms)")


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


# --- 2. replay throughput -----------------------------------------------------------------------


def replay(c, S):
    h = c.h
    n, m = S["replay_base"], S["replay_ops"]
    src, psrc = c.server("replay-src")
    c.py("mixed", "seed", src, n)
    repo = c.w / "repo-replay"
    set_id = c.backup(repo, src)
    sc, _, logf = c.sidecar("replay", repo, src)
    on_src = c.py("mixed", "ops", src, n, m)
    last = parse_ts(c.py("last_ts", src))
    if c.wait_archived(repo, last, 60) is None:
        raise RuntimeError(f"the archive did not reach {last}: {logf.read_text()[-2000:]}")
    stop(sc)
    want = c.py("digest", src, "items")
    stop(psrc)
    h.log(f"pitr: {m} mixed operations (runs of 1-100 inserts / $set updates / deletes) over "
          f"{n} documents; on the source with the archiver: {on_src['seconds']:.2f} s; set "
          f"{set_id}, replay to {last[0]}:{last[1]}")

    dst, _ = c.server("replay-dst")
    ref, _ = c.server("replay-ref")
    import pymongo
    dcl, rcl = pymongo.MongoClient(dst), pymongo.MongoClient(ref)

    def ours():
        dcl.drop_database("bench")
        p = subprocess.run([h.BIN, "restore", "--force", "--to-oplog-ts", f"{last[0]}:{last[1]}"],
                           env=h.dbk_env(repo, DBKEEPER_MONGODB_URI=dst, DBKEEPER_LOG="info"),
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"restore --to-oplog-ts exited {p.returncode}: {p.stderr[-2000:]}")
        mt = REPLAYED.search(p.stderr)
        if not mt:
            raise RuntimeError(f"no 'oplog segments replayed' line: {p.stderr[-2000:]}")
        return int(mt[1]), int(mt[2]) / 1000

    def peer():
        rcl.drop_database("bench")
        c.py("mixed", "seed", ref, n)  # untimed preload of the same base data
        r = c.py("mixed", "ops", ref, n, m)
        return r["ops"], r["seconds"]

    res = h.alternate({"ours": ours, "peer": peer}, rounds=S["replay_rounds"])
    got, got_ref = c.py("digest", dst, "items"), c.py("digest", ref, "items")
    note = None
    if not (got == got_ref == want):
        note = f"data differs: source {want}, restored {got}, bulk_write {got_ref}"
        h.FAILURES.append(f"pitr-replay: {note}")
    entries = res["ours"][0][0]
    if entries != m:
        h.FAILURES.append(f"pitr-replay: {entries} entries replayed, {m} operations sent")
    o = statistics.median(e / s for e, s in res["ours"])
    p = statistics.median(k / s for k, s in res["peer"])
    h.log(f"pitr: replay {o:.0f} ops/s ({[round(s, 3) for _, s in res['ours']]} s), bulk_write "
          f"{p:.0f} ops/s ({[round(s, 3) for _, s in res['peer']]} s); restored data "
          f"{'matches' if note is None else 'DIFFERS'} ({got['count']} documents)")
    h.record("pitr-replay", f"replay throughput ({m} mixed ops over {n} documents)", round(o),
             "pymongo bulk_write(ordered=True) of the same ops, preloaded server", round(p),
             "ops/s", "higher", ">=0.9x",
             note=note or "ours: the restore's `oplog segments replayed … elapsed_ms` (the replay "
                          "alone); peer: the bulk_write call alone")


# --- 3. writes lost when the host dies ----------------------------------------------------------


def rpo(c, S):
    h = c.h
    rows = {"db": [], "host": []}
    for variant in S["rpo_variants"]:
        for k in range(S["rpo_runs"]):
            rows[variant].append(rpo_once(c, S, variant, k))
    for variant, what in (("db", "database killed (-9), then the sidecar stopped (SIGTERM)"),
                          ("host", "host dies: database and sidecar killed (-9) together")):
        rs = rows[variant]
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["lost_s"])
        h.record("pitr-rpo", f"writes lost, {what} (worst of {len(rs)})",
                 round(worst["lost_s"], 3), "DBKEEPER_PITR_FLUSH", FLUSH_S,
                 "s of writes", "lower", "<=1x",
                 note=f"{worst['lost']} of {worst['acked']} acknowledged inserts missing at "
                      f"{worst['rate']:.0f} inserts/s; span of the lost writes "
                      f"{worst['span_s']:.3f} s; all runs: "
                      + ", ".join(f"{r['lost']} lost ({r['lost_s']:.3f} s)" for r in rs))


def rpo_once(c, S, variant, k):
    h = c.h
    uri, server = c.server(f"rpo-{variant}")
    c.py("mixed", "seed", uri, 1000)
    repo = c.w / f"repo-rpo-{variant}-{k}"
    c.backup(repo, uri)
    sc, _, logf = c.sidecar(f"rpo-{variant}-{k}", repo, uri)
    ids = c.w / f"acked-{variant}-{k}"
    wp = c.writer(uri, 3600, RPO_LOAD, out=ids, wait=False)
    import pymongo
    events = pymongo.MongoClient(uri).bench.events
    while not events.estimated_document_count():  # from the first write on
        time.sleep(0.01)
    time.sleep(S["rpo_kill_after_s"])
    server.kill()  # SIGKILL, mid-load
    if variant == "host":
        sc.kill()
    killed = time.time()
    server.wait()
    res = finish_writer(wp, timeout=60, expect_errors=True)
    stop(sc)
    acked = {}
    for f in c.w.glob(f"{ids.name}.*"):
        for line in f.read_text().splitlines():
            i, at = line.split()
            acked[int(i)] = float(at)
    newest = c.newest_point(repo)
    if newest is None:
        raise RuntimeError(f"no recoverable window after the kill: {logf.read_text()[-2000:]}")
    dst, dp = c.server("rpo-dst")
    p = subprocess.run([h.BIN, "restore", "--to-oplog-ts", f"{newest[0]}:{newest[1]}"],
                       env=h.dbk_env(repo, DBKEEPER_MONGODB_URI=dst), capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"restore to the newest point exited {p.returncode}: {p.stderr[-2000:]}")
    have_f = c.w / f"restored-{variant}-{k}"
    c.py("ids", dst, have_f)
    stop(dp)
    have = {int(x) for x in have_f.read_text().split()}
    lost = sorted(acked[i] for i in acked if i not in have)
    rate = res["acked"] / (res["last"] - res["first"])
    span = (res["last"] - lost[0]) if lost else 0.0
    r = {"acked": len(acked), "lost": len(lost), "rate": rate, "lost_s": len(lost) / rate,
         "span_s": span}
    if lost and len(lost) == len(acked):
        h.FAILURES.append(f"pitr-rpo: every acknowledged insert of the {variant} run was lost: "
                          "the load was shorter than the archive's lag, the figure is a floor")
    h.log(f"pitr-rpo ({variant}, run {k + 1}): {len(acked)} acknowledged inserts at {rate:.0f}/s, "
          f"killed {killed - res['last']:.3f} s after the last ack; newest point "
          f"{newest[0]}:{newest[1]}; {len(lost)} missing after the restore = "
          f"{r['lost_s']:.3f} s of writes (they span the last {span:.3f} s)")
    return r
