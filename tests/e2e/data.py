"""Writes and checks the end-to-end test's data in MongoDB, Redis, Chroma and PostgreSQL (run
inside the compose network by tests/e2e/compose.sh through the `tools` service).

usage: data.py write | check | migrated | bulk N
"""
import hashlib
import os
import socket
import subprocess
import sys

import chromadb
import pymongo

REDIS_PASSWORD = os.environ.get("REDIS_PASSWORD", "change-me-redis")
DOCS = 2000
KEYS = 500
RECORDS = 300
ROWS = 5000
# The host's PostgreSQL 15 client (no driver in the venv).
PSQL = "/usr/lib/postgresql/15/bin/psql"


def redis(*args):
    """One command over RESP (no client library in the venv)."""
    s = socket.create_connection(("redis", 6379), timeout=30)
    f = s.makefile("rb")

    def send(parts):
        out = b"*%d\r\n" % len(parts)
        for p in parts:
            p = p if isinstance(p, bytes) else str(p).encode()
            out += b"$%d\r\n%s\r\n" % (len(p), p)
        s.sendall(out)

    def read():
        line = f.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError("redis: " + rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data.decode()
        if kind == b"*":
            return [read() for _ in range(int(rest))]
        raise RuntimeError("redis: unexpected reply %r" % line)

    send(["AUTH", REDIS_PASSWORD])
    read()
    send(list(args))
    r = read()
    s.close()
    return r


def psql(sql, db="e2e"):
    """One statement through psql; its unaligned, tuples-only output."""
    env = dict(os.environ, PGPASSWORD=os.environ.get("POSTGRES_PASSWORD", "change-me-postgres"),
               PGCONNECT_TIMEOUT="20")
    r = subprocess.run(
        [PSQL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "postgres",
         "-U", os.environ.get("POSTGRES_USER", "postgres"), "-d", db, "-c", sql],
        env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("psql: " + r.stderr.strip())
    return r.stdout.strip()


# The rows' digest as PostgreSQL computes it, and as it must be.
PG_DIGEST = "SELECT md5(string_agg(id || ':' || name || ':' || n, ',' ORDER BY id)) FROM items"
PG_EXPECTED = hashlib.md5(",".join("%d:row-%d:%d" % (i, i, i * 7) for i in range(ROWS)).encode()).hexdigest()


def mongo():
    return pymongo.MongoClient("mongodb://mongo:27017/?directConnection=true", serverSelectionTimeoutMS=20000)


def chroma():
    return chromadb.HttpClient(host="chroma", port=8000)


def write():
    c = mongo()
    c.e2e.items.insert_many([{"_id": i, "name": "item-%d" % i, "n": i * i} for i in range(DOCS)])
    c.e2e.items.create_index("name")
    for i in range(KEYS):
        redis("SET", "e2e:%d" % i, "value-%d" % i)
    redis("HSET", "e2e:hash", "a", "1", "b", "2")
    col = chroma().create_collection("e2e", embedding_function=None, metadata={"purpose": "e2e"})
    col.add(
        ids=["r%d" % i for i in range(RECORDS)],
        embeddings=[[float(i), float(i % 7), 0.5] for i in range(RECORDS)],
        documents=["doc %d" % i for i in range(RECORDS)],
        metadatas=[{"i": i} for i in range(RECORDS)],
    )
    psql("CREATE DATABASE e2e", db="postgres")
    psql("CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, n bigint NOT NULL);"
         " INSERT INTO items SELECT i, 'row-' || i, i * 7 FROM generate_series(0, %d) AS i;"
         " CREATE INDEX items_name ON items (name)" % (ROWS - 1))
    print("written: mongodb %d docs, redis %d keys, chroma %d records, postgres %d rows"
          % (DOCS, KEYS + 1, RECORDS, ROWS))


def check():
    problems = []
    c = mongo()
    n = c.e2e.items.count_documents({})
    if n != DOCS:
        problems.append("mongodb e2e.items has %d documents, expected %d" % (n, DOCS))
    d = c.e2e.items.find_one({"_id": 1234})
    if not d or d.get("name") != "item-1234" or d.get("n") != 1234 * 1234:
        problems.append("mongodb document 1234 is %r" % (d,))
    if "name_1" not in c.e2e.items.index_information():
        problems.append("mongodb index name_1 missing")
    keys = redis("DBSIZE")
    if keys < KEYS + 1:
        problems.append("redis holds %d keys, expected at least %d" % (keys, KEYS + 1))
    if redis("GET", "e2e:123") != "value-123":
        problems.append("redis e2e:123 is %r" % redis("GET", "e2e:123"))
    if redis("HGET", "e2e:hash", "b") != "2":
        problems.append("redis hash field e2e:hash.b wrong")
    try:
        col = chroma().get_collection("e2e", embedding_function=None)
        if col.count() != RECORDS:
            problems.append("chroma e2e has %d records, expected %d" % (col.count(), RECORDS))
        r = col.get(ids=["r42"], include=["embeddings", "documents", "metadatas"])
        if r["documents"] != ["doc 42"] or r["metadatas"][0].get("i") != 42:
            problems.append("chroma record r42 is %r" % (r,))
        elif [float(x) for x in r["embeddings"][0]] != [42.0, 0.0, 0.5]:
            problems.append("chroma record r42 embedding is %r" % (list(r["embeddings"][0]),))
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        problems.append("chroma: %s" % e)
    rows = None
    try:
        rows = int(psql("SELECT count(*) FROM items"))
        if rows != ROWS:
            problems.append("postgres e2e.items has %d rows, expected %d" % (rows, ROWS))
        digest = psql(PG_DIGEST)
        if digest != PG_EXPECTED:
            problems.append("postgres e2e.items digest is %s, expected %s" % (digest, PG_EXPECTED))
        if psql("SELECT name FROM items WHERE n = 4242") != "row-606":
            problems.append("postgres: the row with n = 4242 is wrong")
        if psql("SELECT count(*) FROM pg_indexes WHERE indexname = 'items_name'") != "1":
            problems.append("postgres index items_name missing")
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        problems.append("postgres: %s" % e)
    if problems:
        for p in problems:
            print("MISSING: " + p)
        sys.exit(1)
    print("ok: mongodb %d docs, redis %d keys, chroma %d records, postgres %d rows"
          % (n, keys, RECORDS, rows))


def migrated():
    """The index migration V2 creates exists; prints when V2 was applied (RFC 3339, UTC)."""
    c = mongo()
    if "n_1" not in c.e2e.items.index_information():
        print("MISSING: mongodb index n_1 (migration V2) on e2e.items")
        sys.exit(1)
    row = c.e2e.dbkeeper_schema_history.find_one({"version": "2", "success": True})
    if not row:
        print("MISSING: migration V2 in e2e.dbkeeper_schema_history")
        sys.exit(1)
    t = row["applied_at"]
    if not isinstance(t, str):
        t = t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    print(t)


def bulk(n):
    # Values large enough that a snapshot takes a few seconds to dump and compress.
    redis("DEBUG", "POPULATE", str(n), "bulk", "512")
    print("redis now holds %d keys" % redis("DBSIZE"))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "write":
        write()
    elif cmd == "check":
        check()
    elif cmd == "migrated":
        migrated()
    elif cmd == "bulk":
        bulk(int(sys.argv[2]))
    else:
        sys.exit(__doc__)
