"""The sidecar as the stack's database monitor (the `metrics` case of benches/run).

Called by harness.py as `case_metrics(harness)`. One Redis (keys in two dbs, maxmemory set),
one MongoDB stand-in with 1,000 collections, one Chroma server with a few collections, and
`dbkeeper sidecar` on all three at the default DBKEEPER_STATS_INTERVAL (15 s):

1. scrape latency: sequential GETs of /metrics on one keep-alive connection once the first
   statistics round is in; p50/p99. Target p99 <= 5 ms. Side by side: Debian's
   prometheus-redis-exporter on the same Redis (it queries Redis on every scrape; ours serves
   from memory), the same number of scrapes.
2. memory: the sidecar's peak RSS (VmHWM) after the scrapes, target <= 16 MB; the exporter's
   beside it.
3. background collection: the sidecar's CPU over an idle window (no scrapes) at the default
   interval, as % of one core; target <= 1%.
"""

import http.client
import os
import signal
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

COLLECTIONS = 1000


def _proc_kib(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _cpu_ticks(pid):
    f = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
    return int(f[11]) + int(f[12])


def _scrapes(port, n):
    """Milliseconds per GET /metrics over one keep-alive connection; the body is read whole."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read()
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status == 200 and body, r.status
    c.close()
    return out


def _p(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _seed(h, redis_port, mongo_uri, chroma_port):
    subprocess.run(["redis-cli", "-p", str(redis_port), "config", "set", "maxmemory", "1gb"],
                   check=True, capture_output=True)
    # redis-py is not in the venv: RESP through redis-cli --pipe instead.
    cmds = "".join(f"SET k{i} {'v' * 64}\r\n" for i in range(20000))
    cmds += "SELECT 3\r\n" + "".join(f"SET s{i} v EX 3600\r\n" for i in range(5000))
    subprocess.run(["redis-cli", "-p", str(redis_port)], input=cmds.encode(), check=True,
                   capture_output=True)
    subprocess.run([h.PY, "-c", (
        "import sys, pymongo\n"
        "c = pymongo.MongoClient(sys.argv[1])\n"
        f"for i in range({COLLECTIONS}):\n"
        "    db = c[f'app{i % 10}']\n"
        "    db[f'c{i}'].insert_many([{'_id': j, 'v': 'x' * 100} for j in range(1 + i % 20)])\n"
    ), mongo_uri], check=True)
    subprocess.run([h.PY, "-c", (
        "import sys, chromadb\n"
        "c = chromadb.HttpClient(host='127.0.0.1', port=int(sys.argv[1]), "
        "settings=chromadb.Settings(anonymized_telemetry=False))\n"
        "for n in ['notes', 'lore', 'faq']:\n"
        "    col = c.create_collection(n)\n"
        "    col.add(ids=[f'{n}{i}' for i in range(200)], embeddings=[[float(i), 1.0, 2.0] for i in range(200)])\n"
    ), str(chroma_port)], check=True, env={**os.environ, "ANONYMIZED_TELEMETRY": "False"})


def case_metrics(h):
    n = 300 if h.QUICK else 2000
    idle = 30 if h.QUICK else 120
    redis_port = h.redis_server()
    mongo_uri = h.mongo_server("mongo-metrics")
    chroma_port = h.chroma_server("chroma-metrics")
    h.log(f"metrics: seeding ({COLLECTIONS} MongoDB collections)")
    _seed(h, redis_port, mongo_uri, chroma_port)

    repo = h.WORK / "repo-metrics"
    h.clear_repo(repo)
    port = h.free_port()
    env = h.dbk_env(repo, DBKEEPER_REDIS_URL=f"redis://127.0.0.1:{redis_port}",
                    DBKEEPER_MONGODB_URI=mongo_uri,
                    DBKEEPER_CHROMA_URL=f"http://127.0.0.1:{chroma_port}",
                    DBKEEPER_LISTEN=f"127.0.0.1:{port}", DBKEEPER_SCHEDULE="0 3 1 1 *",
                    DBKEEPER_STATS_MAX_COLLECTIONS=str(COLLECTIONS))

    def full():
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        return all(k in body for k in (b"redis_db_keys", b"mongodb_connections",
                                       b"chroma_collection_records"))

    p = h.start("sidecar-metrics", h.TASKSET + [str(h.BIN), "sidecar"], env=env, ready=full)
    size = len(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read())
    ours = _scrapes(port, n)
    rss = _proc_kib(p.pid, "VmHWM")

    # The background rounds alone: no scrapes for `idle` seconds.
    hz = os.sysconf("SC_CLK_TCK")
    c0, t0 = _cpu_ticks(p.pid), time.monotonic()
    time.sleep(idle)
    cpu = (_cpu_ticks(p.pid) - c0) / hz / (time.monotonic() - t0) * 100
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=15)

    exp_port = h.free_port()
    theirs, exp_rss = None, None
    try:
        e = h.start("redis-exporter", h.TASKSET + [
            "prometheus-redis-exporter", "-redis.addr", f"redis://127.0.0.1:{redis_port}",
            "-web.listen-address", f"127.0.0.1:{exp_port}"],
            ready=lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{exp_port}/metrics", timeout=2).read() is not None)
        theirs = _scrapes(exp_port, n)
        exp_rss = _proc_kib(e.pid, "VmHWM")
        e.send_signal(signal.SIGTERM)
        e.wait(timeout=10)
    except (OSError, RuntimeError) as err:
        h.log(f"metrics: prometheus-redis-exporter not measured: {err}")

    what = f"3 engines, {COLLECTIONS} MongoDB collections, {size // 1024} KiB per scrape"
    h.record("metrics", f"scrape latency p50 ({what})", round(statistics.median(ours), 3),
             "redis_exporter (Redis only)", theirs and round(statistics.median(theirs), 3),
             "ms", "lower", "<=1.0x")
    h.record("metrics", f"scrape latency p99 ({what})", round(_p(ours, 0.99), 3),
             "target", 5, "ms", "lower", "<=5")
    h.record("metrics", "scrape latency p99 against the exporter", round(_p(ours, 0.99), 3),
             "redis_exporter (Redis only)", theirs and round(_p(theirs, 0.99), 3), "ms", "lower",
             "<=1.0x")
    h.record("metrics", "sidecar peak RSS (3 engines, after the scrapes)", rss, "target", 16384,
             "KiB", "lower", "<=16384")
    h.record("metrics", "peak RSS against the exporter", rss, "redis_exporter (Redis only)",
             exp_rss, "KiB", "lower", "<=1.0x",
             note="ours watches three databases and takes backups; the exporter one Redis")
    h.record("metrics", f"background collection CPU over {idle} s (default 15 s interval)",
             round(cpu, 3), "target", 1.0, "% of a core", "lower", "<=1",
             note="no scrapes in the window; includes the 30 s health probes")
