#!/bin/sh
# The end-to-end test's stand-in for the official postgres image's entrypoint, run by
# compose.test.yaml as the image's user (999) with the host's PostgreSQL 15 server: on a data
# directory without PG_VERSION (a first start) initdb with POSTGRES_USER and POSTGRES_PASSWORD,
# as the image does; a preseeded one is started as it is (it recovers to the backup's end).
# Then the server, with compose.yaml's arguments (`postgres -c hba_file=…`, the leading
# `postgres` dropped as the image's entrypoint drops it).
set -eu
bin=/usr/lib/postgresql/15/bin
PGDATA=/var/lib/postgresql/data
export PGDATA
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  umask 077
  printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
  if ! "$bin/initdb" --username="${POSTGRES_USER:-postgres}" --pwfile=/tmp/pwfile \
      --auth=scram-sha-256 --no-sync > /tmp/initdb.log 2>&1; then
    cat /tmp/initdb.log >&2
    exit 1
  fi
  rm -f /tmp/pwfile
  echo "postgres.sh: initialised $PGDATA"
fi
[ "${1:-}" = postgres ] && shift
# No /var/run/postgresql in the minimal image: the socket goes to /tmp.
exec "$bin/postgres" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
