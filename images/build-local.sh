#!/usr/bin/env bash
# Builds the dbkeeper image from the binary already built on the host (cargo build --release),
# without pulling anything: assembles a build context in a temp dir and runs
# `docker build -f images/Dockerfile.local`.
#   images/build-local.sh [TAG]        (default TAG: dbkeeper:local)
# DBKEEPER_BIN overrides the binary (default target/x86_64-unknown-linux-gnu/release/dbkeeper).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
tag=${1:-dbkeeper:local}
bin=${DBKEEPER_BIN:-$root/target/x86_64-unknown-linux-gnu/release/dbkeeper}
ca=${DBKEEPER_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

[ -x "$bin" ] || { echo "build-local: no binary at $bin (run: cargo build --release)" >&2; exit 2; }
# A FROM-scratch image has no libc: refuse a dynamically linked binary instead of building an
# image that cannot start.
if "$bin" --version >/dev/null 2>&1 && ldd "$bin" 2>/dev/null | grep -q '=>'; then
  echo "build-local: $bin is dynamically linked; build it static (see .cargo/config.toml)" >&2
  exit 2
fi
[ -r "$ca" ] || { echo "build-local: no CA bundle at $ca (set DBKEEPER_CA_BUNDLE)" >&2; exit 2; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/dbkeeper" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp" "$ctx/owned"
cp "$bin" "$ctx/rootfs/dbkeeper/dbkeeper"
chmod 0755 "$ctx/rootfs/dbkeeper/dbkeeper"
ln -s dbkeeper "$ctx/rootfs/dbkeeper/dbkeeper-health"
ln -s dbkeeper "$ctx/rootfs/dbkeeper/dbkeeper-init"
cp "$ca" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$ctx/rootfs/tmp"
printf 'root:x:0:0:root:/:/dbkeeper/dbkeeper\ndbkeeper:x:10001:10001:dbkeeper:/:/dbkeeper/dbkeeper\n' \
  > "$ctx/rootfs/etc/passwd"
printf 'root:x:0:\ndbkeeper:x:10001:\n' > "$ctx/rootfs/etc/group"

docker build -q -f "$here/Dockerfile.local" -t "$tag" "$ctx" >/dev/null
echo "$tag $(docker image inspect -f '{{.Size}}' "$tag") bytes"
