//! Redis's figures for `/metrics`, named, typed, labelled and scaled as oliver006/redis_exporter
//! does, so the dashboards and alerts built on it keep working. A round is one round trip:
//! `INFO ALL` (every section but modules) and `CONFIG GET databases`, pipelined after `AUTH`.

use std::collections::HashMap;
use std::time::Duration;

use super::{Conn, ENGINE, RedisConfig, RedisEngine, Reply, blocking, first_line};
use crate::error::{Error, Result};
use crate::stats::{Family, Kind};

/// Scalar INFO fields and the family each becomes, under the exporter's name and type.
const FIELDS: &[(&str, &str, Kind, &str)] = &[
    // Server, clients
    (
        "uptime_in_seconds",
        "redis_uptime_in_seconds",
        Kind::Gauge,
        "Seconds since the server started.",
    ),
    (
        "connected_clients",
        "redis_connected_clients",
        Kind::Gauge,
        "Client connections, replicas excluded.",
    ),
    (
        "blocked_clients",
        "redis_blocked_clients",
        Kind::Gauge,
        "Clients waiting in a blocking call (BLPOP, XREAD, WAIT…).",
    ),
    // Memory
    (
        "used_memory",
        "redis_memory_used_bytes",
        Kind::Gauge,
        "Bytes allocated by the server's allocator.",
    ),
    (
        "used_memory_rss",
        "redis_memory_used_rss_bytes",
        Kind::Gauge,
        "Bytes of the server's resident set, as the kernel sees it.",
    ),
    (
        "used_memory_peak",
        "redis_memory_used_peak_bytes",
        Kind::Gauge,
        "Peak of redis_memory_used_bytes since the server started.",
    ),
    (
        "maxmemory",
        "redis_memory_max_bytes",
        Kind::Gauge,
        "The maxmemory setting in bytes; 0: no limit.",
    ),
    (
        "mem_fragmentation_ratio",
        "redis_mem_fragmentation_ratio",
        Kind::Gauge,
        "Resident set over allocated bytes.",
    ),
    // Persistence
    (
        "loading",
        "redis_loading_dump_file",
        Kind::Gauge,
        "1 while the server loads its dataset from disk.",
    ),
    (
        "rdb_changes_since_last_save",
        "redis_rdb_changes_since_last_save",
        Kind::Gauge,
        "Writes since the last RDB save.",
    ),
    (
        "rdb_bgsave_in_progress",
        "redis_rdb_bgsave_in_progress",
        Kind::Gauge,
        "1 while a background RDB save runs.",
    ),
    (
        "rdb_last_save_time",
        "redis_rdb_last_save_timestamp_seconds",
        Kind::Gauge,
        "Unix time of the last successful RDB save.",
    ),
    (
        "rdb_last_bgsave_time_sec",
        "redis_rdb_last_bgsave_duration_sec",
        Kind::Gauge,
        "Seconds the last background RDB save took; -1: none yet.",
    ),
    (
        "aof_enabled",
        "redis_aof_enabled",
        Kind::Gauge,
        "1 when the append-only file is on.",
    ),
    (
        "aof_rewrite_in_progress",
        "redis_aof_rewrite_in_progress",
        Kind::Gauge,
        "1 while an AOF rewrite runs.",
    ),
    // Stats
    (
        "total_connections_received",
        "redis_connections_received_total",
        Kind::Counter,
        "Connections accepted.",
    ),
    (
        "total_commands_processed",
        "redis_commands_processed_total",
        Kind::Counter,
        "Commands processed.",
    ),
    (
        "rejected_connections",
        "redis_rejected_connections_total",
        Kind::Counter,
        "Connections rejected because of maxclients.",
    ),
    (
        "total_net_input_bytes",
        "redis_net_input_bytes_total",
        Kind::Counter,
        "Bytes read from the network.",
    ),
    (
        "total_net_output_bytes",
        "redis_net_output_bytes_total",
        Kind::Counter,
        "Bytes written to the network.",
    ),
    (
        "expired_keys",
        "redis_expired_keys_total",
        Kind::Counter,
        "Keys removed because their TTL passed.",
    ),
    (
        "evicted_keys",
        "redis_evicted_keys_total",
        Kind::Counter,
        "Keys evicted because of maxmemory.",
    ),
    (
        "keyspace_hits",
        "redis_keyspace_hits_total",
        Kind::Counter,
        "Lookups that found their key.",
    ),
    (
        "keyspace_misses",
        "redis_keyspace_misses_total",
        Kind::Counter,
        "Lookups that did not find their key.",
    ),
    (
        "pubsub_channels",
        "redis_pubsub_channels",
        Kind::Gauge,
        "Pub/sub channels with subscribers.",
    ),
    (
        "pubsub_patterns",
        "redis_pubsub_patterns",
        Kind::Gauge,
        "Pub/sub patterns with subscribers.",
    ),
    // Replication
    (
        "connected_slaves",
        "redis_connected_slaves",
        Kind::Gauge,
        "Replicas connected to this server.",
    ),
    // CPU
    (
        "used_cpu_sys",
        "redis_cpu_sys_seconds_total",
        Kind::Counter,
        "System CPU seconds of the server.",
    ),
    (
        "used_cpu_user",
        "redis_cpu_user_seconds_total",
        Kind::Counter,
        "User CPU seconds of the server.",
    ),
];

/// `databases` when `CONFIG` is renamed or forbidden: Redis's default, as the exporter assumes.
const DEFAULT_DATABASES: u64 = 16;

impl RedisEngine {
    /// The whole round under `timeout`. The socket reads are bounded by the same deadline;
    /// the outer bound also covers name resolution, which a socket timeout does not.
    pub(super) async fn gather_stats(&self, timeout: Duration) -> Result<Vec<Family>> {
        let cfg = self.cfg.clone();
        let round = blocking(move || gather_blocking(&cfg, timeout));
        match tokio::time::timeout(timeout, round).await {
            Ok(r) => r,
            Err(_) => Err(self.cfg.unreachable(format!(
                "statistics not gathered within {:.1}s",
                timeout.as_secs_f64()
            ))),
        }
    }
}

fn gather_blocking(cfg: &RedisConfig, timeout: Duration) -> Result<Vec<Family>> {
    let mut c = Conn::connect(cfg, timeout)?;
    let auth = c.auth_command();
    let auth_args: Vec<&[u8]> = auth.iter().flatten().map(Vec::as_slice).collect();
    let info_args: &[&[u8]] = &[b"INFO", b"ALL"];
    let mut cmds: Vec<&[&[u8]]> = Vec::new();
    if auth.is_some() {
        cmds.push(&auth_args);
    }
    cmds.push(info_args);
    cmds.push(&[b"CONFIG", b"GET", b"databases"]);
    c.send(&cmds)?;
    if auth.is_some() {
        let r = c.read_reply()?;
        c.check_auth(r)?;
    }
    let info = match c.read_reply()? {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        Reply::Error(e) if e.starts_with("NOAUTH") => {
            return Err(cfg.refused(
                "the server requires a password; put it in the URL (redis://:PASSWORD@host)",
            ));
        }
        Reply::Error(e) => {
            return Err(Error::engine(ENGINE, format!("INFO: {}", first_line(&e))));
        }
        other => {
            return Err(Error::engine(
                ENGINE,
                format!("INFO: unexpected reply {other:?}"),
            ));
        }
    };
    // CONFIG may be renamed or forbidden by an ACL (managed services do both): then the
    // exporter's default.
    let databases = match c.read_reply()? {
        Reply::Array(Some(v)) => match v.as_slice() {
            [_, Reply::Bulk(Some(n))] => std::str::from_utf8(n).ok().and_then(|s| s.parse().ok()),
            _ => None,
        },
        _ => None,
    };
    Ok(families(&Info::parse(&info), databases))
}

/// One db's line of the keyspace section: `db3:keys=12,expires=2,avg_ttl=9000`.
#[derive(Debug, PartialEq)]
struct Db<'a> {
    name: &'a str,
    index: u64,
    keys: f64,
    expires: f64,
    /// Milliseconds, as the server reports it.
    avg_ttl_ms: Option<f64>,
}

/// One command's line of the commandstats section:
/// `cmdstat_get:calls=2,usec=6,usec_per_call=3.00,rejected_calls=0,failed_calls=0`.
#[derive(Debug, PartialEq)]
struct Command<'a> {
    /// `get`, or `config|get` for a subcommand, as the exporter labels it.
    name: &'a str,
    calls: f64,
    usec: f64,
    /// Since Redis 6.2; both or neither.
    rejected_failed: Option<(f64, f64)>,
}

/// What a round uses of `INFO ALL`. Lines that do not parse are skipped, as the exporter
/// skips them: one odd field must not cost every other figure.
#[derive(Debug, Default)]
struct Info<'a> {
    /// `field:value` lines of every section but the three below. Names are unique across
    /// sections, so the section does not matter.
    fields: HashMap<&'a str, &'a str>,
    /// Whether the keyspace section was there at all: without it the keys per db are
    /// unknown, not zero.
    has_keyspace: bool,
    dbs: Vec<Db<'a>>,
    commands: Vec<Command<'a>>,
    /// `errorstat_ERR:count=3` → (`ERR`, 3).
    errors: Vec<(&'a str, f64)>,
}

/// A finite number (Rust also parses `nan` and `inf`, which no INFO field means).
fn number(s: &str) -> Option<f64> {
    s.trim().parse().ok().filter(|v: &f64| v.is_finite())
}

/// `a=1,b=2` → the value of `key`, as a number.
fn sub_field(value: &str, key: &str) -> Option<f64> {
    value.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        if k.trim() == key { number(v) } else { None }
    })
}

impl<'a> Info<'a> {
    fn parse(text: &'a str) -> Info<'a> {
        let mut info = Info::default();
        let mut section = String::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('#') {
                section = name.trim().to_ascii_lowercase();
                if section == "keyspace" {
                    info.has_keyspace = true;
                }
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match section.as_str() {
                "keyspace" => {
                    let db = key.strip_prefix("db").and_then(|i| i.parse().ok());
                    let keys = sub_field(value, "keys");
                    let expires = sub_field(value, "expires");
                    if let (Some(index), Some(keys), Some(expires)) = (db, keys, expires) {
                        info.dbs.push(Db {
                            name: key,
                            index,
                            keys,
                            expires,
                            avg_ttl_ms: sub_field(value, "avg_ttl"),
                        });
                    }
                }
                "commandstats" => {
                    let name = key.strip_prefix("cmdstat_").filter(|n| !n.is_empty());
                    let calls = sub_field(value, "calls");
                    let usec = sub_field(value, "usec");
                    if let (Some(name), Some(calls), Some(usec)) = (name, calls, usec) {
                        let rejected_failed = sub_field(value, "rejected_calls")
                            .zip(sub_field(value, "failed_calls"));
                        info.commands.push(Command {
                            name,
                            calls,
                            usec,
                            rejected_failed,
                        });
                    }
                }
                "errorstats" => {
                    let prefix = key.strip_prefix("errorstat_").filter(|p| !p.is_empty());
                    if let (Some(prefix), Some(n)) = (prefix, sub_field(value, "count")) {
                        info.errors.push((prefix, n));
                    }
                }
                _ => {
                    info.fields.insert(key, value.trim());
                }
            }
        }
        info
    }

    fn number(&self, field: &str) -> Option<f64> {
        number(self.fields.get(field)?)
    }
}

/// The families of one round. `databases` is the server's `databases` setting, when it
/// could be read: the exporter reports every db up to it, empty ones as 0 (one db in
/// cluster mode, which has only db0).
fn families(info: &Info<'_>, databases: Option<u64>) -> Vec<Family> {
    let mut out = Vec::new();
    for (field, name, kind, help) in FIELDS {
        if let Some(v) = info.number(field) {
            out.push(Family::single(*name, *kind, *help, v));
        }
    }

    if let Some(version) = info.fields.get("redis_version") {
        // The label set of Debian's exporter (1.45); later ones add `master_replid`. None
        // is a secret: run_id identifies a server process.
        let mut f = Family::new(
            "redis_instance_info",
            Kind::Gauge,
            "The server's version, role and identity, as labels; always 1.",
        );
        let label = |k: &str| info.fields.get(k).copied().unwrap_or("");
        f.push(
            &[
                ("role", label("role")),
                ("redis_version", version),
                ("redis_build_id", label("redis_build_id")),
                ("redis_mode", label("redis_mode")),
                ("os", label("os")),
                ("maxmemory_policy", label("maxmemory_policy")),
                ("tcp_port", label("tcp_port")),
                ("run_id", label("run_id")),
                ("process_id", label("process_id")),
            ],
            1.0,
        );
        out.push(f);
    }

    if info.has_keyspace {
        let count = if info.fields.get("cluster_enabled") == Some(&"1") {
            1
        } else {
            databases.unwrap_or(DEFAULT_DATABASES)
        };
        let mut keys = Family::new("redis_db_keys", Kind::Gauge, "Keys per db.");
        let mut expiring = Family::new(
            "redis_db_keys_expiring",
            Kind::Gauge,
            "Keys with a TTL per db.",
        );
        let mut ttl = Family::new(
            "redis_db_avg_ttl_seconds",
            Kind::Gauge,
            "Average TTL of the keys that have one, per db (sampled by the server).",
        );
        for db in &info.dbs {
            let label = [("db", db.name)];
            keys.push(&label, db.keys);
            expiring.push(&label, db.expires);
            if let Some(ms) = db.avg_ttl_ms {
                ttl.push(&label, ms / 1000.0);
            }
        }
        for i in 0..count {
            if !info.dbs.iter().any(|d| d.index == i) {
                let name = format!("db{i}");
                keys.push(&[("db", &name)], 0.0);
                expiring.push(&[("db", &name)], 0.0);
            }
        }
        out.extend([keys, expiring, ttl]);
    }

    let mut calls = Family::new("redis_commands_total", Kind::Counter, "Calls per command.");
    let mut duration = Family::new(
        "redis_commands_duration_seconds_total",
        Kind::Counter,
        "Seconds spent executing each command.",
    );
    let mut rejected = Family::new(
        "redis_commands_rejected_calls_total",
        Kind::Counter,
        "Calls per command refused before execution (wrong arity, ACL, OOM…).",
    );
    let mut failed = Family::new(
        "redis_commands_failed_calls_total",
        Kind::Counter,
        "Calls per command that failed during execution.",
    );
    for c in &info.commands {
        let label = [("cmd", c.name)];
        calls.push(&label, c.calls);
        duration.push(&label, c.usec / 1e6);
        if let Some((r, f)) = c.rejected_failed {
            rejected.push(&label, r);
            failed.push(&label, f);
        }
    }
    let mut errors = Family::new(
        "redis_errors_total",
        Kind::Counter,
        "Error replies per error prefix (ERR, WRONGTYPE…).",
    );
    for (prefix, n) in &info.errors {
        errors.push(&[("err", prefix)], *n);
    }
    out.extend([calls, duration, rejected, failed, errors]);

    // A family without samples is one the server did not report (an old server, a missing
    // section): absent, as the exporter leaves it.
    out.retain(|f| !f.samples.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `redis-cli INFO ALL` of Debian's redis-server 7.0.15 (`--maxmemory 100mb`), after a
    /// few SETs (two with a TTL) in db0 and db3, a miss, an HSET and one unknown command.
    const INFO_ALL: &str = r#"
# Server
redis_version:7.0.15
redis_git_sha1:00000000
redis_git_dirty:0
redis_build_id:ae4d7c971a948f0
redis_mode:standalone
os:Linux 6.18.44-fc-v1147 x86_64
arch_bits:64
monotonic_clock:POSIX clock_gettime
multiplexing_api:epoll
atomicvar_api:c11-builtin
gcc_version:12.2.0
process_id:27997
process_supervised:no
run_id:c89ebf727a969a47906f6ae4419a40c829ec669a
tcp_port:16391
server_time_usec:1796389377898730
uptime_in_seconds:21
uptime_in_days:0
hz:10
configured_hz:10
lru_clock:1227265
executable:/tmp/rexp/redis-server
config_file:
io_threads_active:0

# Clients
connected_clients:1
cluster_connections:0
maxclients:10000
client_recent_max_input_buffer:0
client_recent_max_output_buffer:0
blocked_clients:0
tracking_clients:0
clients_in_timeout_table:0

# Memory
used_memory:1163736
used_memory_human:1.11M
used_memory_rss:12443648
used_memory_rss_human:11.87M
used_memory_peak:1163736
used_memory_peak_human:1.11M
used_memory_peak_perc:100.15%
used_memory_overhead:876760
used_memory_startup:876184
used_memory_dataset:286976
used_memory_dataset_perc:99.80%
allocator_allocated:2109792
allocator_active:2293760
allocator_resident:4968448
total_system_memory:25276071936
total_system_memory_human:23.54G
used_memory_lua:32768
used_memory_vm_eval:32768
used_memory_lua_human:32.00K
used_memory_scripts_eval:0
number_of_cached_scripts:0
number_of_functions:0
number_of_libraries:0
used_memory_vm_functions:33792
used_memory_vm_total:66560
used_memory_vm_total_human:65.00K
used_memory_functions:200
used_memory_scripts:200
used_memory_scripts_human:200B
maxmemory:104857600
maxmemory_human:100.00M
maxmemory_policy:noeviction
allocator_frag_ratio:1.09
allocator_frag_bytes:183968
allocator_rss_ratio:2.17
allocator_rss_bytes:2674688
rss_overhead_ratio:2.50
rss_overhead_bytes:7475200
mem_fragmentation_ratio:11.32
mem_fragmentation_bytes:11344752
mem_not_counted_for_evict:0
mem_replication_backlog:0
mem_total_replication_buffers:0
mem_clients_slaves:0
mem_clients_normal:0
mem_cluster_links:0
mem_aof_buffer:0
mem_allocator:jemalloc-5.3.0
active_defrag_running:0
lazyfree_pending_objects:0
lazyfreed_objects:0

# Persistence
loading:0
async_loading:0
current_cow_peak:0
current_cow_size:0
current_cow_size_age:0
current_fork_perc:0.00
current_save_keys_processed:0
current_save_keys_total:0
rdb_changes_since_last_save:5
rdb_bgsave_in_progress:0
rdb_last_save_time:1796389356
rdb_last_bgsave_status:ok
rdb_last_bgsave_time_sec:-1
rdb_current_bgsave_time_sec:-1
rdb_saves:0
rdb_last_cow_size:0
rdb_last_load_keys_expired:0
rdb_last_load_keys_loaded:0
aof_enabled:0
aof_rewrite_in_progress:0
aof_rewrite_scheduled:0
aof_last_rewrite_time_sec:-1
aof_current_rewrite_time_sec:-1
aof_last_bgrewrite_status:ok
aof_rewrites:0
aof_rewrites_consecutive_failures:0
aof_last_write_status:ok
aof_last_cow_size:0
module_fork_in_progress:0
module_fork_last_cow_size:0

# Stats
total_connections_received:10
total_commands_processed:16
instantaneous_ops_per_sec:0
total_net_input_bytes:517
total_net_output_bytes:12560
total_net_repl_input_bytes:0
total_net_repl_output_bytes:0
instantaneous_input_kbps:0.00
instantaneous_output_kbps:0.00
instantaneous_input_repl_kbps:0.00
instantaneous_output_repl_kbps:0.00
rejected_connections:0
sync_full:0
sync_partial_ok:0
sync_partial_err:0
expired_keys:0
expired_stale_perc:0.00
expired_time_cap_reached_count:0
expire_cycle_cpu_milliseconds:0
evicted_keys:0
evicted_clients:0
total_eviction_exceeded_time:0
current_eviction_exceeded_time:0
keyspace_hits:1
keyspace_misses:1
pubsub_channels:0
pubsub_patterns:0
pubsubshard_channels:0
latest_fork_usec:0
total_forks:0
migrate_cached_sockets:0
slave_expires_tracked_keys:0
active_defrag_hits:0
active_defrag_misses:0
active_defrag_key_hits:0
active_defrag_key_misses:0
total_active_defrag_time:0
current_active_defrag_time:0
tracking_total_keys:0
tracking_total_items:0
tracking_total_prefixes:0
unexpected_error_replies:0
total_error_replies:1
dump_payload_sanitizations:0
total_reads_processed:27
total_writes_processed:17
io_threaded_reads_processed:0
io_threaded_writes_processed:0
reply_buffer_shrinks:0
reply_buffer_expands:0

# Replication
role:master
connected_slaves:0
master_failover_state:no-failover
master_replid:f8f896170637378f034193b6ca7e06015a6d3021
master_replid2:0000000000000000000000000000000000000000
master_repl_offset:0
second_repl_offset:-1
repl_backlog_active:0
repl_backlog_size:1048576
repl_backlog_first_byte_offset:0
repl_backlog_histlen:0

# CPU
used_cpu_sys:0.026763
used_cpu_user:0.007652
used_cpu_sys_children:0.000000
used_cpu_user_children:0.000000
used_cpu_sys_main_thread:0.027431
used_cpu_user_main_thread:0.006857

# Modules

# Commandstats
cmdstat_hset:calls=1,usec=8,usec_per_call=8.00,rejected_calls=0,failed_calls=0
cmdstat_client|setname:calls=1,usec=4,usec_per_call=4.00,rejected_calls=0,failed_calls=0
cmdstat_latency|latest:calls=1,usec=2,usec_per_call=2.00,rejected_calls=0,failed_calls=0
cmdstat_set:calls=4,usec=25,usec_per_call=6.25,rejected_calls=0,failed_calls=0
cmdstat_info:calls=1,usec=168,usec_per_call=168.00,rejected_calls=0,failed_calls=0
cmdstat_slowlog|len:calls=1,usec=1,usec_per_call=1.00,rejected_calls=0,failed_calls=0
cmdstat_slowlog|get:calls=1,usec=3,usec_per_call=3.00,rejected_calls=0,failed_calls=0
cmdstat_select:calls=3,usec=5,usec_per_call=1.67,rejected_calls=0,failed_calls=0
cmdstat_config|get:calls=1,usec=193,usec_per_call=193.00,rejected_calls=0,failed_calls=0
cmdstat_get:calls=2,usec=6,usec_per_call=3.00,rejected_calls=0,failed_calls=0

# Errorstats
errorstat_ERR:count=1

# Latencystats
latency_percentiles_usec_hset:p50=8.031,p99=8.031,p99.9=8.031
latency_percentiles_usec_client|setname:p50=4.015,p99=4.015,p99.9=4.015
latency_percentiles_usec_latency|latest:p50=2.007,p99=2.007,p99.9=2.007
latency_percentiles_usec_set:p50=4.015,p99=11.007,p99.9=11.007
latency_percentiles_usec_info:p50=168.959,p99=168.959,p99.9=168.959
latency_percentiles_usec_slowlog|len:p50=1.003,p99=1.003,p99.9=1.003
latency_percentiles_usec_slowlog|get:p50=3.007,p99=3.007,p99.9=3.007
latency_percentiles_usec_select:p50=2.007,p99=2.007,p99.9=2.007
latency_percentiles_usec_config|get:p50=193.535,p99=193.535,p99.9=193.535
latency_percentiles_usec_get:p50=2.007,p99=4.015,p99.9=4.015

# Cluster
cluster_enabled:0

# Keyspace
db0:keys=2,expires=1,avg_ttl=981648
db3:keys=3,expires=1,avg_ttl=481649
"#;

    /// The families the issue names (all but `redis_up`, which the sidecar adds), with the
    /// exporter's types.
    const REQUIRED: &[(&str, Kind)] = &[
        ("redis_uptime_in_seconds", Kind::Gauge),
        ("redis_connected_clients", Kind::Gauge),
        ("redis_blocked_clients", Kind::Gauge),
        ("redis_memory_used_bytes", Kind::Gauge),
        ("redis_memory_max_bytes", Kind::Gauge),
        ("redis_mem_fragmentation_ratio", Kind::Gauge),
        ("redis_db_keys", Kind::Gauge),
        ("redis_db_keys_expiring", Kind::Gauge),
        ("redis_commands_processed_total", Kind::Counter),
        ("redis_commands_total", Kind::Counter),
        ("redis_commands_duration_seconds_total", Kind::Counter),
        ("redis_keyspace_hits_total", Kind::Counter),
        ("redis_keyspace_misses_total", Kind::Counter),
        ("redis_evicted_keys_total", Kind::Counter),
        ("redis_expired_keys_total", Kind::Counter),
        ("redis_connected_slaves", Kind::Gauge),
        ("redis_rdb_last_save_timestamp_seconds", Kind::Gauge),
        ("redis_rdb_changes_since_last_save", Kind::Gauge),
        ("redis_aof_enabled", Kind::Gauge),
        ("redis_net_input_bytes_total", Kind::Counter),
        ("redis_net_output_bytes_total", Kind::Counter),
    ];

    fn family<'f>(fs: &'f [Family], name: &str) -> Option<&'f Family> {
        fs.iter().find(|f| f.name == name)
    }

    /// The value of the sample of `name` whose labels are `labels`.
    fn value(fs: &[Family], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        family(fs, name)?
            .samples
            .iter()
            .find(|s| {
                s.labels.len() == labels.len()
                    && s.labels
                        .iter()
                        .zip(labels)
                        .all(|((k, v), (k2, v2))| k == k2 && v == v2)
            })
            .map(|s| s.value)
    }

    #[test]
    fn a_real_capture_gives_the_exporters_families() {
        let fs = families(&Info::parse(INFO_ALL), Some(16));
        for (name, kind) in REQUIRED {
            let f = family(&fs, name).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(f.kind, *kind, "{name}");
        }
        assert!(family(&fs, "redis_up").is_none());
        let one = |name| value(&fs, name, &[]).unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(one("redis_uptime_in_seconds"), 21.0);
        assert_eq!(one("redis_memory_used_bytes"), 1163736.0);
        assert_eq!(one("redis_memory_max_bytes"), 104857600.0);
        assert_eq!(one("redis_mem_fragmentation_ratio"), 11.32);
        assert_eq!(one("redis_commands_processed_total"), 16.0);
        assert_eq!(one("redis_keyspace_hits_total"), 1.0);
        assert_eq!(one("redis_keyspace_misses_total"), 1.0);
        assert_eq!(one("redis_rdb_last_save_timestamp_seconds"), 1796389356.0);
        assert_eq!(one("redis_rdb_changes_since_last_save"), 5.0);
        assert_eq!(one("redis_rdb_last_bgsave_duration_sec"), -1.0);
        assert_eq!(one("redis_aof_enabled"), 0.0);
        assert_eq!(one("redis_connected_slaves"), 0.0);
        assert_eq!(one("redis_net_output_bytes_total"), 12560.0);
        assert_eq!(one("redis_cpu_sys_seconds_total"), 0.026763);

        // Keys per db, labelled `db="db3"`, every db up to `databases` (empty ones as 0).
        let db = |name, db| value(&fs, name, &[("db", db)]);
        assert_eq!(db("redis_db_keys", "db0"), Some(2.0));
        assert_eq!(db("redis_db_keys", "db3"), Some(3.0));
        assert_eq!(db("redis_db_keys", "db15"), Some(0.0));
        assert_eq!(db("redis_db_keys", "db16"), None);
        assert_eq!(family(&fs, "redis_db_keys").unwrap().samples.len(), 16);
        assert_eq!(db("redis_db_keys_expiring", "db3"), Some(1.0));
        assert_eq!(db("redis_db_keys_expiring", "db7"), Some(0.0));
        // avg_ttl is in milliseconds; only dbs the server lists have one.
        assert_eq!(db("redis_db_avg_ttl_seconds", "db0"), Some(981.648));
        assert_eq!(db("redis_db_avg_ttl_seconds", "db7"), None);

        // Commands by name, subcommands as `config|get`; usec become seconds.
        let cmd = |name, c| value(&fs, name, &[("cmd", c)]);
        assert_eq!(cmd("redis_commands_total", "get"), Some(2.0));
        assert_eq!(cmd("redis_commands_total", "config|get"), Some(1.0));
        assert_eq!(
            cmd("redis_commands_duration_seconds_total", "config|get"),
            Some(193e-6)
        );
        assert_eq!(cmd("redis_commands_rejected_calls_total", "set"), Some(0.0));
        assert_eq!(cmd("redis_commands_failed_calls_total", "set"), Some(0.0));
        assert_eq!(
            family(&fs, "redis_commands_total").unwrap().samples.len(),
            10
        );
        assert_eq!(
            value(&fs, "redis_errors_total", &[("err", "ERR")]),
            Some(1.0)
        );

        let info = &family(&fs, "redis_instance_info").unwrap().samples[0];
        assert!(
            info.labels
                .contains(&("redis_version".to_owned(), "7.0.15".to_owned()))
        );
        // Latency percentiles are not scalar fields.
        assert!(fs.iter().all(|f| !f.name.contains("latency")));
    }

    #[test]
    fn crlf_line_ends_read_the_same() {
        let crlf = INFO_ALL.replace('\n', "\r\n");
        assert_eq!(
            families(&Info::parse(&crlf), Some(16)),
            families(&Info::parse(INFO_ALL), Some(16))
        );
    }

    #[test]
    fn a_missing_section_leaves_its_families_out() {
        let cut = |text: &str, section: &str| -> String {
            let start = text.find(&format!("# {section}")).unwrap();
            let end = text[start + 1..]
                .find("\n#")
                .map_or(text.len(), |i| start + 1 + i + 1);
            format!("{}{}", &text[..start], &text[end..])
        };
        let text = cut(&cut(INFO_ALL, "Keyspace"), "Commandstats");
        assert!(!text.contains("cmdstat_") && !text.contains("db0:"));
        let fs = families(&Info::parse(&text), Some(16));
        // Unknown is not zero: no keys per db at all, no commands.
        for gone in [
            "redis_db_keys",
            "redis_db_keys_expiring",
            "redis_db_avg_ttl_seconds",
            "redis_commands_total",
            "redis_commands_duration_seconds_total",
        ] {
            assert!(family(&fs, gone).is_none(), "{gone}");
        }
        assert_eq!(value(&fs, "redis_memory_max_bytes", &[]), Some(104857600.0));
        assert_eq!(
            value(&fs, "redis_errors_total", &[("err", "ERR")]),
            Some(1.0)
        );
    }

    #[test]
    fn an_empty_keyspace_is_zero_in_every_db() {
        let text = "# Server\r\nredis_version:7.0.15\r\n\r\n# Keyspace\r\n";
        // CONFIG unreadable: the exporter's default of 16.
        let fs = families(&Info::parse(text), None);
        let keys = &family(&fs, "redis_db_keys").unwrap().samples;
        assert_eq!(keys.len(), 16);
        assert!(keys.iter().all(|s| s.value == 0.0));
        assert!(family(&fs, "redis_db_avg_ttl_seconds").is_none());
        assert_eq!(
            family(&fs, "redis_db_keys",).map(|f| f.samples.len()),
            Some(16)
        );
        let fs = families(&Info::parse(text), Some(2));
        assert_eq!(family(&fs, "redis_db_keys").unwrap().samples.len(), 2);
        // A cluster node has db0 only, whatever `databases` says.
        let cluster = format!("{text}# Cluster\r\ncluster_enabled:1\r\n# Keyspace\r\n");
        let fs = families(&Info::parse(&cluster), Some(16));
        assert_eq!(value(&fs, "redis_db_keys", &[("db", "db0")]), Some(0.0));
        assert_eq!(family(&fs, "redis_db_keys").unwrap().samples.len(), 1);
    }

    #[test]
    fn commandstats_before_redis_6_2_have_no_rejected_or_failed_calls() {
        let text = "# Commandstats\ncmdstat_get:calls=21,usec=175,usec_per_call=8.33\n";
        let fs = families(&Info::parse(text), None);
        assert_eq!(
            value(
                &fs,
                "redis_commands_duration_seconds_total",
                &[("cmd", "get")]
            ),
            Some(175e-6)
        );
        assert!(family(&fs, "redis_commands_rejected_calls_total").is_none());
        assert!(family(&fs, "redis_commands_failed_calls_total").is_none());
    }

    #[test]
    fn garbage_lines_are_skipped_never_a_panic() {
        let text = "\
garbage without a colon
# Server
uptime_in_seconds:not-a-number
:
::::
connected_clients:7
blocked_clients:nan
used_memory:inf
#
# Commandstats
cmdstat_:calls=1,usec=1
cmdstat_get:calls=x,usec=1
cmdstat_set
cmdstat_del:usec=5
notcmd_get:calls=1,usec=1
cmdstat_ping:calls=3,usec=9,usec_per_call=3.00,rejected_calls=0
# Keyspace
db:keys=1,expires=0
dbx:keys=1,expires=0
db1:keys=,expires=0
db2:expires=0
db4:keys=5
db5:keys=4,expires=1,avg_ttl=oops
db6:keys=1e400,expires=0,avg_ttl=0
# Errorstats
errorstat_:count=1
errorstat_WRONGTYPE:count=two
# éàü\u{0}\u{7f}
\u{0}:\u{0}
";
        let fs = families(&Info::parse(text), Some(8));
        for gone in [
            "redis_uptime_in_seconds",
            "redis_blocked_clients",
            "redis_memory_used_bytes",
        ] {
            assert!(family(&fs, gone).is_none(), "{gone}");
        }
        assert_eq!(value(&fs, "redis_connected_clients", &[]), Some(7.0));
        let cmds = &family(&fs, "redis_commands_total").unwrap().samples;
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        assert_eq!(cmds[0].labels[0].1, "ping");
        // Half of the 6.2 pair is neither.
        assert!(family(&fs, "redis_commands_rejected_calls_total").is_none());
        assert_eq!(value(&fs, "redis_db_keys", &[("db", "db5")]), Some(4.0));
        assert_eq!(value(&fs, "redis_db_keys", &[("db", "db1")]), Some(0.0));
        assert_eq!(value(&fs, "redis_db_keys", &[("db", "db4")]), Some(0.0));
        assert_eq!(value(&fs, "redis_db_keys", &[("db", "db6")]), Some(0.0));
        assert!(value(&fs, "redis_db_avg_ttl_seconds", &[("db", "db5")]).is_none());
        assert_eq!(family(&fs, "redis_db_keys").unwrap().samples.len(), 8);
        assert!(family(&fs, "redis_errors_total").is_none());

        // Any cut of a real reply parses.
        for end in (0..INFO_ALL.len()).filter(|i| INFO_ALL.is_char_boundary(*i)) {
            families(&Info::parse(&INFO_ALL[..end]), None);
        }
    }
}
