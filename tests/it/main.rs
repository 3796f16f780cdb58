//! Integration tests: the real binary against real servers started by `common`.

mod common;

mod chroma;
mod chroma_copy;
mod cli;
mod encryption;
mod import;
mod install;
mod metrics;
mod metrics_chroma;
mod metrics_mongo;
mod metrics_redis;
mod migrate;
mod mongo_oplog;
mod mongo_pitr;
mod mongo_replset;
mod mongo_users;
mod mongodb;
mod monitoring;
mod postgres;
mod postgres_pitr;
mod postgres_stack;
mod postgres_wal;
mod rabbitmq;
mod redis;
mod redis_aof;
mod remote;
mod s3store;
mod sidecar;
mod verify;
