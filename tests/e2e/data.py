"""Writes and checks the end-to-end test's data in MongoDB, Redis, Chroma and PostgreSQL (run
inside the compose network by tests/e2e/compose.sh through the `tools` service).

usage: data.py write | check | migrated | bulk N | seedmark | seed DIR | fingerprint
"""
import hashlib
import json
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


# What seedmark adds: data that only the seed-layout set holds, so that a preseed from any
# older set shows.
SEED_DOCS = 50
SEED_KEYS = 50
SEED_RECORDS = 40


def seedmark():
    c = mongo()
    c.e2e.seeded.insert_many([{"_id": "s%d" % i, "i": i, "tag": "seed"} for i in range(SEED_DOCS)])
    c.e2e.seeded.create_index([("i", -1)], name="i_desc")
    for i in range(SEED_KEYS):
        redis("SET", "seed:%d" % i, "seeded-%d" % i)
    redis("RPUSH", "seed:list", "a", "b", "c")
    col = chroma().create_collection("seeded", embedding_function=None, metadata={"from": "seed"})
    col.add(ids=["s%d" % i for i in range(SEED_RECORDS)],
            embeddings=[[float(i), -1.0] for i in range(SEED_RECORDS)],
            documents=["seed %d" % i for i in range(SEED_RECORDS)])
    print("seed marks written: mongodb %d docs, redis %d keys, chroma %d records"
          % (SEED_DOCS, SEED_KEYS + 1, SEED_RECORDS))


def seed(out):
    """The parts of the seed's nightly set that are taken from the running servers, as its
    script takes them: a mongodump-shaped directory (every collection's documents as the
    server returns them, its metadata as mongodump writes it) in mongodb/mongodb_backup/, and
    `redis-cli --rdb` in redis/dump.rdb."""
    from bson import json_util
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    raw = CodecOptions(document_class=RawBSONDocument)
    canonical = json_util.CANONICAL_JSON_OPTIONS
    c = mongo()
    root = os.path.join(out, "mongodb", "mongodb_backup")
    n = 0
    for db in c.list_database_names():
        if db in ("admin", "local", "config"):
            continue
        os.makedirs(os.path.join(root, db), exist_ok=True)
        for info in c[db].list_collections():
            name = info["name"]
            if info.get("type", "collection") != "collection" or name.startswith("system."):
                continue
            coll = c[db].get_collection(name, codec_options=raw)
            with open(os.path.join(root, db, name + ".bson"), "wb") as f:
                for d in coll.find({}, sort=[("_id", 1)]):
                    f.write(d.raw)
                    n += 1
            # A bson Binary (subtype 4) without a uuid representation configured.
            uuid = info.get("info", {}).get("uuid")
            uuid = uuid.hex() if isinstance(uuid, bytes) else getattr(uuid, "hex", "")
            meta = {"options": info.get("options", {}),
                    "indexes": [dict(ix) for ix in c[db][name].list_indexes()],
                    "uuid": uuid,
                    "collectionName": name, "type": "collection"}
            with open(os.path.join(root, db, name + ".metadata.json"), "w") as f:
                f.write(json_util.dumps(meta, json_options=canonical))
    os.makedirs(os.path.join(out, "redis"), exist_ok=True)
    rdb = os.path.join(out, "redis", "dump.rdb")
    r = subprocess.run(["/usr/bin/redis-cli", "-h", "redis", "-a", REDIS_PASSWORD, "--no-auth-warning",
                        "--rdb", rdb], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or not os.path.isfile(rdb):
        sys.exit("redis-cli --rdb failed: %s %s" % (r.stdout.strip(), r.stderr.strip()))
    print("seed parts written: mongodb %d docs, redis dump.rdb %d bytes" % (n, os.path.getsize(rdb)))


def fingerprint():
    """Every database's content, digested: MongoDB's documents per collection (as stored)
    and index names, Redis's DEBUG DIGEST and key count, Chroma's records per collection."""
    from bson.codec_options import CodecOptions
    from bson.raw_bson import RawBSONDocument
    raw = CodecOptions(document_class=RawBSONDocument)
    out = {}
    c = mongo()
    for db in sorted(c.list_database_names()):
        if db in ("admin", "local", "config"):
            continue
        for name in sorted(c[db].list_collection_names()):
            coll = c[db].get_collection(name, codec_options=raw)
            h = hashlib.sha256()
            k = 0
            for d in coll.find({}, sort=[("_id", 1)]):
                h.update(d.raw)
                k += 1
            out["mongodb %s.%s" % (db, name)] = "%d %s %s" % (
                k, h.hexdigest()[:16], ",".join(sorted(c[db][name].index_information())))
    out["redis"] = "%d %s" % (redis("DBSIZE"), redis("DEBUG", "DIGEST"))
    for col in sorted(chroma().list_collections(), key=lambda x: x.name):
        col = chroma().get_collection(col.name, embedding_function=None)
        r = col.get(include=["embeddings", "documents", "metadatas"])
        rows = sorted(zip(r["ids"], [[float(x) for x in e] for e in r["embeddings"]],
                          r["documents"], r["metadatas"]), key=lambda t: t[0])
        h = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
        out["chroma %s" % col.name] = "%d %s %s" % (len(rows), h, json.dumps(col.metadata, sort_keys=True))
    print(json.dumps(out, sort_keys=True))


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
    elif cmd == "seedmark":
        seedmark()
    elif cmd == "seed":
        seed(sys.argv[2])
    elif cmd == "fingerprint":
        fingerprint()
    else:
        sys.exit(__doc__)
