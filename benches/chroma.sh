#!/usr/bin/env bash
# Chroma export/import throughput: dbkeeper against the Python client on the same data, same run.
#   export: `dbkeeper backup` vs a chromadb.HttpClient paging loop (get with every field, pages of
#           max_batch_size) that only holds each page;
#   import: `dbkeeper restore` vs the Python client's add in batches of max_batch_size into a
#           fresh server (data taken from the same numpy arrays the source was seeded with).
# Usage: benches/chroma.sh [records] [dimension]     (default 50000 × 384)
# Needs the test servers (bash .ci/install); builds the release binary.
set -euo pipefail

N=${1:-50000}
DIM=${2:-384}
CACHE="${DBKEEPER_CACHE:-$HOME/.cache/dbkeeper}"
CHROMA="${DBKEEPER_TEST_CHROMA:-$CACHE/venv/bin/chroma}"
PY="${DBKEEPER_TEST_PYTHON:-$CACHE/venv/bin/python}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=
for b in target/*/release/dbkeeper target/release/dbkeeper; do [ -x "$b" ] && BIN=$b && break; done
[ -n "$BIN" ] || { echo "no release binary" >&2; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # dir port
  ANONYMIZED_TELEMETRY=False "$CHROMA" run --path "$1" --host 127.0.0.1 --port "$2" >"$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$2/api/v2/heartbeat" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "chroma did not start on $2" >&2; return 1
}
now() { date +%s.%N; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }

SRC=$(port); start "$WORK/src" "$SRC"
DST=$(port); start "$WORK/dst" "$DST"
DST2=$(port); start "$WORK/dst2" "$DST2"

export N DIM
echo "seeding $N records of dimension $DIM"
"$PY" - "$SRC" <<'EOF'
import os, sys, numpy as np, chromadb
n, dim = int(os.environ["N"]), int(os.environ["DIM"])
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
col = c.create_collection("bench", configuration={"hnsw": {"space": "l2"}}, embedding_function=None)
emb = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
bs = c.get_max_batch_size()
for s in range(0, n, bs):
    ids = [f"id-{i}" for i in range(s, min(n, s + bs))]
    col.add(ids=ids, embeddings=emb[s:s + len(ids)], documents=[f"document {i}" for i in range(s, s + len(ids))],
            metadatas=[{"i": i, "s": f"s{i % 9}"} for i in range(s, s + len(ids))])
EOF

# Export: Python paging loop (timed inside Python: interpreter start and imports excluded).
"$PY" - "$SRC" <<'EOF' > "$WORK/py_export_s"
import sys, time, chromadb
t = time.time()
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
col = c.get_collection("bench")
bs, off = c.get_max_batch_size(), 0
while True:
    page = col.get(include=["embeddings", "documents", "metadatas", "uris"], limit=bs, offset=off)
    if len(page["ids"]) < bs: break
    off += bs
print(time.time() - t)
EOF
T1=$(now)
REPO="$WORK/repo"; mkdir "$REPO"
DBKEEPER_REPO="$REPO" DBKEEPER_CHROMA_URL="http://127.0.0.1:$SRC" DBKEEPER_LOG=warn "$BIN" backup >/dev/null
T2=$(now)

# Import: the Python client's add in batches, then dbkeeper restore, each into an empty server.
"$PY" - "$DST2" <<'EOF' > "$WORK/py_import_s"
import os, sys, time, numpy as np, chromadb
n, dim = int(os.environ["N"]), int(os.environ["DIM"])
emb = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
ids = [f"id-{i}" for i in range(n)]; docs = [f"document {i}" for i in range(n)]
metas = [{"i": i, "s": f"s{i % 9}"} for i in range(n)]
c = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1]))
t = time.time()
col = c.create_collection("bench", configuration={"hnsw": {"space": "l2"}}, embedding_function=None)
bs = c.get_max_batch_size()
for s in range(0, n, bs):
    col.add(ids=ids[s:s + bs], embeddings=emb[s:s + bs], documents=docs[s:s + bs], metadatas=metas[s:s + bs])
print(time.time() - t)
EOF
T3=$(now)
DBKEEPER_REPO="$REPO" DBKEEPER_CHROMA_URL="http://127.0.0.1:$DST" DBKEEPER_LOG=warn "$BIN" restore >/dev/null
T4=$(now)

PY_EXPORT=$(awk -v n="$N" -v s="$(cat "$WORK/py_export_s")" 'BEGIN { printf "%.0f", n / s }')
DK_EXPORT=$(rate "$N" "$T1" "$T2")
PY_IMPORT=$(awk -v n="$N" -v s="$(cat "$WORK/py_import_s")" 'BEGIN { printf "%.0f", n / s }')
DK_IMPORT=$(rate "$N" "$T3" "$T4")
SIZE=$(du -sb "$REPO" | cut -f1)
echo
echo "records=$N dimension=$DIM set_bytes=$SIZE"
printf "%-8s %14s %14s %7s\n" "" "python rec/s" "dbkeeper rec/s" "ratio"
printf "%-8s %14s %14s %7s\n" export "$PY_EXPORT" "$DK_EXPORT" "$(awk -v a="$DK_EXPORT" -v b="$PY_EXPORT" 'BEGIN { printf "%.2fx", a / b }')"
printf "%-8s %14s %14s %7s\n" import "$PY_IMPORT" "$DK_IMPORT" "$(awk -v a="$DK_IMPORT" -v b="$PY_IMPORT" 'BEGIN { printf "%.2fx", a / b }')"
