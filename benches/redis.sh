#!/usr/bin/env bash
# The two Redis figures the project publishes, against the stock tools on the same server:
#   1. `dbkeeper-health` vs `redis-cli ping`: wall time of N sequential probes, max RSS of one.
#   2. backup throughput of a ~1 GB dataset: `dbkeeper backup` vs `redis-cli --rdb FILE`.
# Usage: [ROUNDS=5] benches/redis.sh [PROBES=200] [KEYS=1000000] [VALUE_BYTES=1000]
# Needs redis-server, redis-cli, python3 and GNU time (/usr/bin/time). Uses the release binary.
set -euo pipefail

probes=${1:-200}
keys=${2:-1000000}
value_bytes=${3:-1000}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --quiet
bin=$root/target/x86_64-unknown-linux-gnu/release/dbkeeper

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
    --repl-diskless-sync-delay 0 --daemonize no >"$work/server.log" 2>&1 &
for _ in $(seq 100); do
    [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
done
url=redis://127.0.0.1:$port
ln -s "$bin" "$work/dbkeeper-health"

now() { date +%s.%N; }
ratio() { python3 -c "import sys; a,b=map(float,sys.argv[1:]); print(f'{a/b:.2f}')" "$1" "$2"; }
max_rss_kb() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -1; }

echo "== health: $probes sequential probes (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$work/dbkeeper-health" "$url" >/dev/null
t0=$(now)
for _ in $(seq "$probes"); do "$work/dbkeeper-health" "$url" >/dev/null; done
t1=$(now)
for _ in $(seq "$probes"); do redis-cli -p "$port" ping >/dev/null; done
t2=$(now)
ours=$(python3 -c "print($t1-$t0)")
theirs=$(python3 -c "print($t2-$t1)")
ours_rss=$(max_rss_kb "$work/dbkeeper-health" "$url")
theirs_rss=$(max_rss_kb redis-cli -p "$port" ping)
printf 'dbkeeper-health: %.3f s total, %.2f ms/probe, max RSS %s KiB\n' "$ours" \
    "$(python3 -c "print($ours*1000/$probes)")" "$ours_rss"
printf 'redis-cli ping:  %.3f s total, %.2f ms/probe, max RSS %s KiB\n' "$theirs" \
    "$(python3 -c "print($theirs*1000/$probes)")" "$theirs_rss"
echo "wall ratio dbkeeper/redis-cli: $(ratio "$ours" "$theirs")   RSS ratio: $(ratio "$ours_rss" "$theirs_rss")"

echo "== backup: loading $keys keys of $value_bytes bytes (base64 of random bytes)"
python3 - "$keys" "$value_bytes" <<'EOF' | redis-cli -p "$port" --pipe >/dev/null
import base64, os, sys
n, size = int(sys.argv[1]), int(sys.argv[2])
raw = size * 3 // 4
out = sys.stdout.buffer
batch = []
for i in range(n):
    k = b"key:%d" % i
    v = base64.b64encode(os.urandom(raw))[:size]
    batch.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
    if len(batch) == 10000:
        out.write(b"".join(batch)); batch = []
out.write(b"".join(batch))
EOF
echo "used_memory: $(redis-cli -p "$port" info memory | grep '^used_memory_human' | cut -d: -f2 | tr -d '\r')"

repo=$work/repo
mkdir -p "$repo"
rounds=${ROUNDS:-5}
# Both clients wait on the server's fork, which writes the snapshot. watch.py runs a client and
# looks at the fork (the server's child) every 10 ms: its CPU time and its wait for a CPU, from
# /proc/<pid>/schedstat. It prints "wall fork_cpu fork_wait" in seconds.
server_pid=$(redis-cli -p "$port" info server | tr -d '\r' | sed -n 's/^process_id://p')
cat >"$work/watch.py" <<'EOF'
import subprocess, sys, time
server = sys.argv[1]
def fork_stat():
    try:
        with open(f"/proc/{server}/task/{server}/children") as f:
            pids = f.read().split()
        for pid in pids:
            with open(f"/proc/{pid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            return int(run) / 1e9, int(wait) / 1e9
    except OSError:
        pass
    return None
t0 = time.time()
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
seen = (0.0, 0.0)
while p.poll() is None:
    seen = fork_stat() or seen
    time.sleep(0.01)
wall = time.time() - t0
if p.returncode:
    sys.exit(p.returncode)
print(f"{wall:.3f} {seen[0]:.3f} {seen[1]:.3f}")
EOF
watched() { python3 "$work/watch.py" "$server_pid" "$@"; }
cli_backup() {
    rm -f "$work/cli.rdb"
    read -r cli_s cli_fork cli_wait < <(watched redis-cli -p "$port" --rdb "$work/cli.rdb" 2>/dev/null)
    [ -n "${cli_s:-}" ] || { echo "redis-cli --rdb failed" >&2; exit 1; }
}
our_backup() {
    rm -rf "${repo:?}"/*
    read -r ours_s our_fork our_wait < <(DBKEEPER_REPO=$repo DBKEEPER_REDIS_URL=$url \
        DBKEEPER_LOG=warn watched /usr/bin/time -o "$work/rss" -f %M "$bin" backup)
    [ -n "${ours_s:-}" ] || { echo "dbkeeper backup failed" >&2; exit 1; }
}
# The two alternate which goes first, round by round: on a shared machine the second of a
# pair is often the slower.
for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 1 ]; then cli_backup; our_backup; else our_backup; cli_backup; fi
    # What the stock tools need to store the same compressed artifact.
    t2=$(now)
    zstd -q -3 -T2 -f "$work/cli.rdb" -o "$work/cli.rdb.zst"
    t3=$(now)
    bytes=$(stat -c %s "$work/cli.rdb")
    cli_zstd_s=$(python3 -c "print($cli_s+$t3-$t2)")
    stored=$(du -sb "$repo" | cut -f1)
    printf 'round %d: RDB %.0f MB | redis-cli --rdb %.2f s (%.0f MB/s) | dbkeeper backup %.2f s (%.0f MB/s, %.0f MB stored) max RSS %s KiB | speed ratio dbkeeper/redis-cli %s\n' \
        "$round" "$(python3 -c "print($bytes/1e6)")" "$cli_s" "$(python3 -c "print($bytes/1e6/$cli_s)")" \
        "$ours_s" "$(python3 -c "print($bytes/1e6/$ours_s)")" "$(python3 -c "print($stored/1e6)")" \
        "$(cat "$work/rss")" "$(ratio "$cli_s" "$ours_s")"
    printf '         redis-cli --rdb then zstd -3 -T2: %.2f s | speed ratio dbkeeper/(redis-cli+zstd) %s\n' \
        "$cli_zstd_s" "$(ratio "$cli_zstd_s" "$ours_s")"
    printf "         server's fork: CPU %.2f s, waited %.2f s for a CPU (redis-cli) | %.2f s, %.2f s (dbkeeper) | wall beyond the fork's CPU: redis-cli %.2f s, dbkeeper %.2f s\n" \
        "$cli_fork" "$cli_wait" "$our_fork" "$our_wait" \
        "$(python3 -c "print($cli_s-$cli_fork)")" "$(python3 -c "print($ours_s-$our_fork)")"
    echo "$(ratio "$cli_s" "$ours_s")" >>"$work/ratios"
    echo "$cli_s $ours_s $cli_fork $our_fork" >>"$work/times"
    rm -f "$work/cli.rdb.zst"
done
echo "median speed ratio dbkeeper/redis-cli over $rounds rounds: $(sort -n "$work/ratios" | python3 -c "import sys, statistics; print(statistics.median(float(l) for l in sys.stdin))")"
# The whole series as one transfer: each round weighs by its length, a second view beside the
# median (the host's speed drifts within a series).
echo "speed ratio of the summed times over $rounds rounds: $(python3 -c "
import sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
print(f'{sum(r[0] for r in rows) / sum(r[1] for r in rows):.3f}')" "$work/times")"
# The host's speed moves the fork's CPU time, and with it both walls, by up to ±10% from round
# to round; what each client adds beyond the fork's own CPU time moves much less.
echo "medians over $rounds rounds: $(python3 -c "
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
cli = statistics.median(r[0] - r[2] for r in rows)
ours = statistics.median(r[1] - r[3] for r in rows)
fork = statistics.median(r[3] / r[2] for r in rows)
print(f'wall beyond the fork\'s CPU: redis-cli {cli:.2f} s, dbkeeper {ours:.2f} s; '
      f'fork CPU with dbkeeper / with redis-cli {fork:.3f}')" "$work/times")"
