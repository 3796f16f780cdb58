"""PostgreSQL (the `postgres` case of benches/run, issue 19): backup, health probe and preseed
against the stock tools, on one private PostgreSQL 15 cluster.

Called by harness.py as `case_postgres(harness)`. The cluster: `initdb` into a temp dir owned
by the `postgres` user (the server refuses root), started on a free loopback port with
`wal_level=replica`, trust for 127.0.0.1 (a `replication` line included) and `fsync=off`
(only for loading and serving the source), filled by `pgbench -i` (scale 70, ≈ 1.1 GB on
disk; --quick: scale 10, ≈ 170 MB).

1. backup: `dbkeeper backup` (a base backup over the replication protocol, zstd into the set)
   vs `pg_basebackup -Ft -X fetch -c fast -D - | zstd -3 -T2 -o FILE`. The issue names
   `-X stream`, which pg_basebackup refuses with `-Ft -D -` ("cannot stream write-ahead logs in
   tar mode to stdout"); `-X fetch` puts the WAL into the same tar stream, as dbkeeper does.
   `-c fast` because dbkeeper asks for a fast checkpoint too. Throughput is the size of the
   base backup's tar (as dbkeeper's manifest records it) over the wall; peak RSS from GNU
   time, target ≤ 64 MB.
2. health: `dbkeeper-health postgres://…` vs `pg_isready -h 127.0.0.1 -p PORT`: wall per probe
   of sequential probes, and the peak RSS of one.
3. preseed: time to a server that answers, from an empty PGDATA (owned by `postgres`, 0700):
   `dbkeeper preseed` (deep verify, unpack, fsync) then `postgres` started on it, vs the
   backup's `pg_basebackup` output unpacked by `zstd -dc FILE | tar -x` (as `postgres`) then
   the same start. Both servers run with fsync on (the default), as a production one would:
   PostgreSQL then fsyncs the whole data directory before it replays, which is where the tar
   side pays for the durability dbkeeper's preseed gives before the start. Timed until
   `pg_isready` says the server accepts connections (polled every 20 ms); every run's copy is
   then checked (untimed) to hold all of pgbench_accounts.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("DBKEEPER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
# As the `postgres` user, the way the tests run the server: setpriv execs the program itself,
# so a signal sent to the child reaches the server.
AS_PG = (["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
         if os.geteuid() == 0 else [])


def _pg(name):
    return str(PG_BIN / name)


def _chown_pg(path):
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _isready(port):
    return subprocess.run([_pg("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _psql(port, sql):
    return subprocess.run([_pg("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                           "-d", "postgres", "-XAtq", "-c", sql], check=True,
                          capture_output=True, text=True).stdout.strip()


def _server_argv(data, port, sockdir, fsync):
    return AS_PG + [_pg("postgres"), "-D", str(data), "-p", str(port),
                    "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockdir}",
                    "-c", "wal_level=replica", "-c", "max_wal_senders=10",
                    "-c", f"fsync={'on' if fsync else 'off'}"]


def _dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not
               f.is_symlink())


def case_postgres(h):
    scale = 10 if h.QUICK else 70
    rounds = 2 if h.QUICK else h.ROUNDS
    warmup = not h.QUICK
    # Outside h.WORK (mode 0700, root's): the server's user must reach its directories.
    root = Path(tempfile.mkdtemp(prefix="dbkeeper-bench-pg-"))
    try:
        _run_case(h, root, scale, rounds, warmup)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_case(h, root, scale, rounds, warmup):
    _chown_pg(root)
    src = root / "src"
    subprocess.run(AS_PG + [_pg("initdb"), "-D", str(src), "-U", "postgres", "--auth=trust",
                            "-E", "UTF8", "--no-locale", "--no-sync"], check=True,
                   capture_output=True)
    hba = src / "pg_hba.conf"
    hba.write_text("host replication all 127.0.0.1/32 trust\n"
                   "host all all 127.0.0.1/32 trust\n" + hba.read_text())
    port = h.free_port()
    server = h.start("postgres-src", _server_argv(src, port, root, fsync=False),
                     ready=lambda: _isready(port))
    try:
        _cases(h, root, scale, rounds, warmup, src, port)
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown, before its directory goes
        server.wait(timeout=60)


def _cases(h, root, scale, rounds, warmup, src, port):
    h.log(f"postgres: pgbench -i -s {scale} (port {port}); backup and preseed: {rounds} "
          f"alternating rounds{' after a warm-up' if warmup else ''}")
    t0 = time.perf_counter()
    subprocess.run([_pg("pgbench"), "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p",
                    str(port), "-U", "postgres", "postgres"], check=True, capture_output=True)
    _psql(port, "CHECKPOINT")
    rows = int(_psql(port, "SELECT count(*) FROM pgbench_accounts"))
    version = _psql(port, "SHOW server_version")
    dbs = int(_psql(port, "SELECT sum(pg_database_size(datname)) FROM pg_database"))
    h.log(f"postgres {version}: {rows} pgbench_accounts rows, databases {dbs / 1e6:.0f} MB, "
          f"data directory {_dir_bytes(src) / 1e6:.0f} MB on disk, loaded in "
          f"{time.perf_counter() - t0:.0f} s")
    url = f"postgres://postgres@127.0.0.1:{port}/postgres"

    # 1. Backup.
    repo = h.WORK / "repo-postgres"
    tarz = h.WORK / "pg_basebackup.tar.zst"

    def ours():
        h.clear_repo(repo)
        return h.run([h.BIN, "backup"], env=h.dbk_env(repo, DBKEEPER_POSTGRES_URL=url))

    def peer():
        tarz.unlink(missing_ok=True)
        return h.run(["bash", "-c",
                      f"set -o pipefail; '{_pg('pg_basebackup')}' -h 127.0.0.1 -p {port} "
                      f"-U postgres -Ft -X fetch -c fast -D - | zstd -q -3 -T2 -o '{tarz}'"])

    res = h.alternate({"ours": ours, "peer": peer}, rounds=rounds, warmup=warmup)
    ours_set = h.newest_set(repo) / "postgres"
    ours_bytes = sum(f.stat().st_size for f in ours_set.rglob("*") if f.is_file())
    files = json.loads((h.newest_set(repo) / "manifest.json").read_text())["engines"][
        "postgres"]["files"]
    tar_bytes = sum(f["raw_size"] for f in files if f["path"].endswith(".tar.zst"))
    peer_tar = int(subprocess.run(["bash", "-c", f"zstd -qdc '{tarz}' | wc -c"], check=True,
                                  capture_output=True, text=True).stdout)
    h.log(f"postgres: dbkeeper's base.tar {tar_bytes / 1e6:.1f} MB, {ours_bytes / 1e6:.1f} MB "
          f"stored; pg_basebackup's tar {peer_tar / 1e6:.1f} MB, {tarz.stat().st_size / 1e6:.1f}"
          f" MB with zstd -3")
    # Throughput: the base backup's tar (data files and the WAL the copy needs) over the wall,
    # the same bytes for both sides (within the WAL of one checkpoint).
    mb = tar_bytes / 1e6
    size = f"{dbs / 1e6:.0f} MB of databases, {mb:.0f} MB base.tar"
    peer_name = "pg_basebackup -Ft -X fetch -c fast -D - | zstd -3 -T2"
    h.record("postgres-backup", f"throughput of one backup ({size})",
             round(mb / h.med(res["ours"], 0), 1), peer_name,
             round(mb / h.med(res["peer"], 0), 1), "MB/s", "higher", ">=1.0x",
             note="-X stream is refused with -Ft -D - (WAL cannot stream into tar on stdout)")
    h.record("postgres-backup", "max RSS of the backup", h.med(res["ours"], 2), "target",
             64 * 1024, "KiB", "lower", "<=65536",
             note=f"absolute 64 MB bound; the pipe's larger stage took {h.med(res['peer'], 2)} KiB")
    h.record("postgres-backup", f"CPU of one backup ({size})", round(h.med(res["ours"], 1), 3),
             peer_name + " (both stages)", round(h.med(res["peer"], 1), 3), "s", "lower")
    h.record("postgres-backup", "compressed size", ours_bytes, peer_name, tarz.stat().st_size,
             "bytes", "lower")

    # 2. Health probe.
    health = h.WORK / "dbkeeper-health"
    if not health.exists():
        health.symlink_to(h.BIN)
    n = h.SIZES["health_probes"]
    loop = h.WORK / "probe-loop.sh"
    loop.write_text('n=$1; shift; for _ in $(seq "$n"); do "$@" >/dev/null || exit 1; done\n')
    isready = [_pg("pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
    res = h.alternate({"ours": lambda: h.run(["bash", loop, n, health, url]),
                       "peer": lambda: h.run(["bash", loop, n, *isready])})
    h.record("postgres-health", f"wall per probe ({n} sequential probes)",
             round(h.med(res["ours"], 0) * 1000 / n, 3), "pg_isready",
             round(h.med(res["peer"], 0) * 1000 / n, 3), "ms", "lower", "<=1.0x")
    one = h.alternate({"ours": lambda: h.run([health, url]),
                       "peer": lambda: h.run(isready)})
    h.record("postgres-health", "max RSS of one probe", h.med(one["ours"], 2), "pg_isready",
             h.med(one["peer"], 2), "KiB", "lower", "<=1.0x",
             note="ours also runs SELECT pg_is_in_recovery(); pg_isready stops at the startup "
                  "answer")

    # 3. Preseed: time to a server that answers.
    target = root / "target"
    sock = root / "sock"
    sock.mkdir()
    _chown_pg(sock)
    ours_set_dir = h.newest_set(repo)

    def empty(_):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(mode=0o700)
        _chown_pg(target)
        # Write back the previous run's files now, or the next run's fsyncs pay for them.
        os.sync()

    def start_until_ready():
        """Starts the server on the target; seconds until pg_isready says it accepts
        connections. The server is checked and stopped after (untimed)."""
        p = h.free_port()
        logf = open(h.WORK / "postgres-copy.log", "wb")
        t0 = time.perf_counter()
        srv = subprocess.Popen(_server_argv(target, p, sock, fsync=True), stdout=logf,
                               stderr=subprocess.STDOUT)
        try:
            while not _isready(p):
                if srv.poll() is not None:
                    raise RuntimeError("postgres on the copy exited: " +
                                       (h.WORK / "postgres-copy.log").read_text()[-2000:])
                if time.perf_counter() - t0 > 900:
                    raise RuntimeError("postgres on the copy did not answer in 900 s")
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            got = int(_psql(p, "SELECT count(*) FROM pgbench_accounts"))
            if got != rows:
                h.FAILURES.append(f"postgres-preseed: the copy holds {got} pgbench_accounts "
                                  f"rows, the source {rows}")
        finally:
            srv.send_signal(signal.SIGQUIT)  # immediate shutdown: the copy is thrown away
            srv.wait(timeout=60)
            logf.close()
        return wall

    def preseed():
        w, cpu, rss, _ = h.run([h.BIN, "preseed"], env=h.dbk_env(
            repo, DBKEEPER_POSTGRES_URL="postgres://postgres@127.0.0.1:1/postgres",
            DBKEEPER_POSTGRES_DATA_DIR=target, DBKEEPER_POSTGRES_MAJOR=version.split(".")[0]))
        if not (target / "PG_VERSION").exists():
            raise RuntimeError(f"dbkeeper preseed left no PG_VERSION in {target}")
        return w, start_until_ready(), rss, cpu

    def untar():
        w, cpu, rss, _ = h.run(["bash", "-c", f"set -o pipefail; zstd -qdc '{tarz}' | "
                                f"{' '.join(AS_PG)} tar -x -C '{target}'"])
        return w, start_until_ready(), rss, cpu

    res = h.alternate({"ours": preseed, "peer": untar}, rounds=rounds, warmup=warmup,
                      between=empty)
    tot = {k: [a + b for a, b, _, _ in v] for k, v in res.items()}
    peer_name = "zstd -dc <pg_basebackup output> | tar -x, then postgres"
    h.record("postgres-preseed", f"time to a server that answers, from an empty PGDATA ({size})",
             round(h.med(tot["ours"]), 3), peer_name, round(h.med(tot["peer"]), 3), "s", "lower",
             note="ours deep-verifies the set and fsyncs before the start; the server then "
                  "fsyncs the tar copy's data directory at its start (fsync=on)")
    h.record("postgres-preseed", "of which: unpacking (preseed vs zstd -dc | tar -x)",
             round(h.med(res["ours"], 0), 3), "zstd -dc | tar -x",
             round(h.med(res["peer"], 0), 3), "s", "lower")
    h.record("postgres-preseed", "of which: the server's start until it answers",
             round(h.med(res["ours"], 1), 3), "the same start on the tar copy",
             round(h.med(res["peer"], 1), 3), "s", "lower")
    h.record("postgres-preseed", "max RSS of the preseed", h.med(res["ours"], 2),
             "zstd -dc | tar -x (the larger stage's)", h.med(res["peer"], 2), "KiB", "lower")
    h.log(f"postgres: preseeded from set {ours_set_dir.name}")
