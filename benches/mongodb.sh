#!/usr/bin/env bash
# MongoDB throughput and memory against baselines with the same driver, in one run:
#   dump:    `dbkeeper backup` (raw batches → zstd, manifest, fsync) vs a raw batch-cursor drain
#            of the same collection that discards the bytes (examples/mongo_baseline.rs drain)
#   restore: `dbkeeper restore` into an empty server vs one plain unordered `insert_many` of
#            the same documents into another empty server
#   memory:  peak RSS of the dump (/usr/bin/time -v)
# Usage: benches/mongodb.sh [DOCS]   (default 1000000; needs secantusd-rs, see .ci/install)
set -euo pipefail
cd "$(dirname "$0")/.."

docs="${1:-1000000}"
server="${DBKEEPER_TEST_SECANTUSD:-$HOME/.cache/dbkeeper/secantus/bin/secantusd-rs}"
cargo build --release --quiet --bin dbkeeper --example mongo_baseline
bin=target/x86_64-unknown-linux-gnu/release/dbkeeper
base=target/x86_64-unknown-linux-gnu/release/examples/mongo_baseline

work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_server() { # name → sets $uri (not in a subshell, so that cleanup knows the pid)
    local port; port="$(free_port)"
    "$server" --host 127.0.0.1 --port "$port" --storage-path "$work/$1" --log-file-max 16MB \
        --standalone --log-level WARNING >"$work/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    uri="mongodb://127.0.0.1:$port/?directConnection=true"
}

elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$@"; }
now() { date +%s.%N; }

start_server src; src=$uri
echo "loading $docs documents…"
"$base" load "$src" bench users "$docs"

echo "--- dump (a warm-up drain, then drain and backup alternated 3 times; medians)"
"$base" drain "$src" bench users >/dev/null
mkdir "$work/repo"
for i in 1 2 3; do
    "$base" drain "$src" bench users | tee -a "$work/drain.txt"
    t0="$(now)"
    /usr/bin/time -v env DBKEEPER_REPO="$work/repo" DBKEEPER_MONGODB_URI="$src" DBKEEPER_LOG=info \
        DBKEEPER_LOG_FORMAT=json "$bin" backup >"$work/set.txt" 2>"$work/backup.time"
    t1="$(now)"
    set_id="$(cat "$work/set.txt")"
    elapsed "$t0" "$t1" >>"$work/dump_s.txt"
    awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$work/backup.time" >>"$work/rss.txt"
    grep '"dump finished"' "$work/backup.time" | sed 's/.*"mb_per_s":"\([0-9.]*\)".*/\1/' >>"$work/stream.txt"
    [ "$i" = 3 ] || rm -rf "${work:?}/repo/$set_id"
done
median() { sort -n "$1" | sed -n 2p; }
bytes="$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(sum(f["raw_size"] for f in m["engines"]["mongodb"]["files"]))' "$work/repo/$set_id/manifest.json")"
dump_s="$(median "$work/dump_s.txt")"
rss_kb="$(sort -n "$work/rss.txt" | tail -1)"
sed -n 's/.*mb_per_s=\([0-9.]*\).*/\1/p' "$work/drain.txt" >"$work/drain_mbs.txt"
drain_mbs="$(median "$work/drain_mbs.txt")"
stream_mbs="$(median "$work/stream.txt")"
dump_mbs="$(python3 -c "print(f'{$bytes/$dump_s/1e6:.1f}')")"
echo "raw drain: ${drain_mbs} MB/s (median)"
echo "dbkeeper backup: ${dump_s}s for the whole process (start-up, probe, listing, manifest, fsync),"
echo "  ${dump_mbs} MB/s raw BSON overall, ${stream_mbs} MB/s while streaming, peak RSS $((rss_kb / 1024)) MiB (max of 3)"
echo "dump/drain ratio: overall $(python3 -c "print(f'{$dump_mbs/$drain_mbs:.2f}')"), streaming $(python3 -c "print(f'{$stream_mbs/$drain_mbs:.2f}')")"

echo "--- restore"
zstd -qd "$work/repo/$set_id/mongodb/bench/users.bson.zst" -o "$work/users.bson"
start_server plain; plain=$uri
"$base" insert "$plain" bench users "$work/users.bson" | tee "$work/insert.txt"
start_server ours; ours=$uri
t0="$(now)"
/usr/bin/time -v env DBKEEPER_REPO="$work/repo" DBKEEPER_MONGODB_URI="$ours" DBKEEPER_LOG=warn \
    "$bin" restore "$set_id" 2>"$work/restore.time"
t1="$(now)"
restore_s="$(elapsed "$t0" "$t1")"
restore_mbs="$(python3 -c "print(f'{$bytes/$restore_s/1e6:.1f}')")"
insert_mbs="$(sed -n 's/.*mb_per_s=\([0-9.]*\).*/\1/p' "$work/insert.txt")"
rrss_kb="$(awk -F: '/Maximum resident/ {gsub(/ /,"",$2); print $2}' "$work/restore.time")"
echo "dbkeeper restore: ${restore_s}s, ${restore_mbs} MB/s raw BSON, peak RSS $((rrss_kb / 1024)) MiB"
echo "restore/insert_many ratio: $(python3 -c "print(f'{$restore_mbs/$insert_mbs:.2f}')")"
