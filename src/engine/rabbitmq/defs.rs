//! The definitions document (`GET /api/definitions`): what each kind of object is called by,
//! the counts a manifest records, what a fresh broker holds by itself, and the offline check
//! of a set's artifact.
//!
//! Counts cover every object of the artifact. A restore reports, per kind, how many of the
//! artifact's objects the broker holds after the import (found by name), so objects the
//! target already had (its own administrator, the default vhost) neither add to nor hide from
//! the comparison with the manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{DEFINITIONS_FILE, ENGINE, MARKER};
use crate::engine::{Counts, Emptiness};
use crate::error::{Error, Result};
use crate::repo::manifest::EngineEntry;
use crate::repo::reader::SetReader;

/// Version of what a set's `rabbitmq/` part holds (one definitions document).
pub const FORMAT: u32 = 1;

/// The kinds of object a definitions document lists, each with the fields that name one
/// object, and its singular for messages.
const KINDS: &[(&str, &[&str], &str)] = &[
    ("users", &["name"], "user"),
    ("vhosts", &["name"], "vhost"),
    ("permissions", &["user", "vhost"], "permission"),
    (
        "topic_permissions",
        &["user", "vhost", "exchange"],
        "topic permission",
    ),
    ("parameters", &["vhost", "component", "name"], "parameter"),
    ("global_parameters", &["name"], "global parameter"),
    ("policies", &["vhost", "name"], "policy"),
    ("queues", &["vhost", "name"], "queue"),
    ("exchanges", &["vhost", "name"], "exchange"),
    (
        "bindings",
        &[
            "vhost",
            "source",
            "destination",
            "destination_type",
            "routing_key",
            "arguments",
        ],
        "binding",
    ),
];

/// Global parameters the broker sets on itself; they describe the broker, not its users' state,
/// so they are neither backed up nor counted as data.
pub fn is_internal_global(name: &str) -> bool {
    matches!(name, "cluster_name" | "internal_cluster_id")
}

/// The default exchange (`""`) and the `amq.*` ones exist in every vhost and cannot be deleted.
pub fn is_builtin_exchange(name: &str) -> bool {
    name.is_empty() || name.starts_with("amq.")
}

/// The objects of one kind (none when the document lacks the kind).
pub fn items<'a>(d: &'a Value, kind: &str) -> impl Iterator<Item = &'a Value> {
    d.get(kind).and_then(|v| v.as_array()).into_iter().flatten()
}

/// A string field of an object, `""` when absent.
pub fn s<'a>(item: &'a Value, field: &str) -> &'a str {
    item.get(field).and_then(|v| v.as_str()).unwrap_or("")
}

pub fn names(d: &Value, kind: &str, field: &str) -> Vec<String> {
    items(d, kind).map(|i| s(i, field).to_owned()).collect()
}

/// One object's identity: its naming fields, as JSON (arguments compare as JSON values, whose
/// maps serialize in key order).
fn key(item: &Value, fields: &[&str]) -> String {
    let parts: Vec<&Value> = fields
        .iter()
        .map(|f| item.get(*f).unwrap_or(&Value::Null))
        .collect();
    serde_json::to_string(&parts).unwrap_or_default()
}

/// Removes what a set must not carry: the broker's own global parameters and our marker.
pub fn strip_internal(d: &mut Value) {
    if let Some(g) = d
        .get_mut("global_parameters")
        .and_then(|v| v.as_array_mut())
    {
        g.retain(|p| {
            let n = s(p, "name");
            !is_internal_global(n) && n != MARKER
        });
    }
}

/// Objects per kind. A kind that is present but not a list of objects is an error.
pub fn counts(d: &Value) -> std::result::Result<Counts, String> {
    if !d.is_object() {
        return Err("the definitions are not a JSON object".into());
    }
    let mut c = Counts::new();
    for (kind, fields, _) in KINDS {
        let n = match d.get(*kind) {
            None | Some(Value::Null) => 0,
            Some(Value::Array(a)) => {
                for (i, item) in a.iter().enumerate() {
                    if !item.is_object() {
                        return Err(format!("{kind}[{i}] is not an object"));
                    }
                    if let Some(f) = fields.iter().find(|f| {
                        **f != "arguments" && !item.get(**f).is_some_and(Value::is_string)
                    }) {
                        return Err(format!("{kind}[{i}] has no {f}"));
                    }
                }
                a.len() as u64
            }
            Some(_) => return Err(format!("{kind} is not a list")),
        };
        c.insert((*kind).to_owned(), n);
    }
    Ok(c)
}

/// How many objects of `wanted` `now` holds, per kind (by identity).
pub fn found(wanted: &Value, now: &Value) -> Counts {
    let mut c = Counts::new();
    for (kind, fields, _) in KINDS {
        let have: BTreeSet<String> = items(now, kind).map(|i| key(i, fields)).collect();
        let n = items(wanted, kind)
            .filter(|i| have.contains(&key(i, fields)))
            .count();
        c.insert((*kind).to_owned(), n as u64);
    }
    c
}

/// Whether a broker holds anything beyond what it creates for itself: the vhost `/`, the user
/// we connect as and its permissions on `/`, the built-in exchanges (never listed) and its own
/// global parameters.
pub fn emptiness(d: &Value, api_user: &str) -> Emptiness {
    if items(d, "global_parameters").any(|p| s(p, "name") == MARKER) {
        return Emptiness::Interrupted;
    }
    let mut found = Vec::new();
    for (kind, _, singular) in KINDS {
        let n = items(d, kind)
            .filter(|i| match *kind {
                "users" => s(i, "name") != api_user,
                "vhosts" => s(i, "name") != "/",
                "permissions" => !(s(i, "user") == api_user && s(i, "vhost") == "/"),
                "global_parameters" => !is_internal_global(s(i, "name")),
                "exchanges" => !is_builtin_exchange(s(i, "name")),
                _ => true,
            })
            .count();
        if n > 0 {
            let plural = if n == 1 {
                (*singular).to_owned()
            } else if let Some(stem) = singular.strip_suffix('y') {
                format!("{stem}ies")
            } else {
                format!("{singular}s")
            };
            found.push(format!("{n} {plural}"));
        }
    }
    if found.is_empty() {
        Emptiness::Empty
    } else {
        Emptiness::HasData(found.join(", "))
    }
}

/// Counts, and every reference a broker would reject on import resolved inside the document:
/// each object's vhost is listed, each binding's source is an exchange of its vhost (or a
/// built-in one) and its destination a queue or exchange of its vhost, each permission's user
/// is listed.
pub fn check(d: &Value) -> std::result::Result<Counts, String> {
    let c = counts(d)?;
    let vhosts: BTreeSet<&str> = items(d, "vhosts").map(|v| s(v, "name")).collect();
    let users: BTreeSet<&str> = items(d, "users").map(|v| s(v, "name")).collect();
    for kind in [
        "permissions",
        "topic_permissions",
        "parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        for i in items(d, kind) {
            let vh = s(i, "vhost");
            if !vhosts.contains(vh) {
                return Err(format!(
                    "{kind}: {} names vhost {vh:?}, which the definitions do not list",
                    describe(kind, i)
                ));
            }
            if kind.ends_with("permissions") && !users.contains(s(i, "user")) {
                return Err(format!(
                    "{kind}: the permission on vhost {vh:?} names user {:?}, which the definitions do not list",
                    s(i, "user")
                ));
            }
        }
    }
    let mut per_vhost: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for kind in ["queues", "exchanges"] {
        for i in items(d, kind) {
            per_vhost
                .entry((kind, s(i, "vhost")))
                .or_default()
                .insert(s(i, "name"));
        }
    }
    let has = |kind: &str, vh: &str, name: &str| {
        per_vhost
            .get(&(kind, vh))
            .is_some_and(|set| set.contains(name))
    };
    for b in items(d, "bindings") {
        let (vh, src, dst) = (s(b, "vhost"), s(b, "source"), s(b, "destination"));
        if !is_builtin_exchange(src) && !has("exchanges", vh, src) {
            return Err(format!(
                "binding {src:?} → {dst:?} in vhost {vh:?}: no exchange {src:?} in that vhost"
            ));
        }
        let ok = match s(b, "destination_type") {
            "queue" => has("queues", vh, dst),
            "exchange" => is_builtin_exchange(dst) || has("exchanges", vh, dst),
            other => {
                return Err(format!(
                    "binding {src:?} → {dst:?} in vhost {vh:?}: unknown destination type {other:?}"
                ));
            }
        };
        if !ok {
            return Err(format!(
                "binding {src:?} → {dst:?} in vhost {vh:?}: no {} {dst:?} in that vhost",
                s(b, "destination_type")
            ));
        }
    }
    Ok(c)
}

fn describe(kind: &str, i: &Value) -> String {
    match kind {
        "bindings" => format!("binding {:?} → {:?}", s(i, "source"), s(i, "destination")),
        "permissions" | "topic_permissions" => format!("user {:?}", s(i, "user")),
        _ => format!("{:?}", s(i, "name")),
    }
}

/// Reads and checks a set's definitions (checksum, JSON, references): the bytes as stored,
/// for the import, and the parsed document, for the read-back.
pub fn read_set(set: &SetReader, entry: &EngineEntry) -> Result<(Vec<u8>, Value)> {
    let path = format!("{ENGINE}/{DEFINITIONS_FILE}.zst");
    let corrupt = |msg: String| Error::corrupt(set.id(), format!("{ENGINE}: {msg}"));
    let fe = entry
        .file(&path)
        .ok_or_else(|| corrupt(format!("{path} is missing from the manifest")))?;
    let mut r = set.open_file(fe)?;
    let mut bytes = Vec::with_capacity(fe.raw_size.min(1 << 30) as usize);
    r.read_to_end(&mut bytes).map_err(|e| r.error(e))?;
    r.finish()?;
    let d: Value = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(format!("{path}: not a definitions document ({e})")))?;
    check(&d).map_err(|e| corrupt(format!("{path}: {e}")))?;
    Ok((bytes, d))
}

/// Offline check of a set's RabbitMQ part: the artifact's checksum, its JSON, its references;
/// returns its counts (compared with the manifest by the caller).
pub fn verify_deep(
    set: &SetReader,
    entry: &EngineEntry,
    cancel: &CancellationToken,
) -> Result<Counts> {
    if cancel.is_cancelled() {
        return Err(Error::Interrupted(0));
    }
    let (_, d) = read_set(set, entry)?;
    check(&d).map_err(|e| Error::corrupt(set.id(), format!("{ENGINE}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "users": [{"name": "guest"}, {"name": "app"}],
            "vhosts": [{"name": "/"}, {"name": "orders"}],
            "permissions": [{"user": "guest", "vhost": "/"}, {"user": "app", "vhost": "orders"}],
            "global_parameters": [{"name": "internal_cluster_id", "value": "x"}],
            "queues": [{"vhost": "orders", "name": "q1"}],
            "exchanges": [{"vhost": "orders", "name": "ex"}],
            "bindings": [
                {"vhost": "orders", "source": "ex", "destination": "q1", "destination_type": "queue", "routing_key": "k", "arguments": {}},
                {"vhost": "orders", "source": "amq.topic", "destination": "ex", "destination_type": "exchange", "routing_key": "#", "arguments": {}}
            ]
        })
    }

    #[test]
    fn counts_and_references_check() {
        let c = check(&sample()).unwrap();
        assert_eq!(c["users"], 2);
        assert_eq!(c["bindings"], 2);
        assert_eq!(c["policies"], 0);
        let mut broken = sample();
        broken["bindings"][0]["destination"] = json!("gone");
        let e = check(&broken).unwrap_err();
        assert!(e.contains("no queue \"gone\""), "{e}");
        let mut broken = sample();
        broken["queues"][0]["vhost"] = json!("nowhere");
        assert!(check(&broken).unwrap_err().contains("nowhere"));
        assert!(check(&json!({"queues": 3})).is_err());
        assert!(check(&json!([1])).is_err());
    }

    #[test]
    fn emptiness_ignores_what_the_broker_makes_itself() {
        let fresh = json!({
            "users": [{"name": "guest"}], "vhosts": [{"name": "/"}],
            "permissions": [{"user": "guest", "vhost": "/"}],
            "global_parameters": [{"name": "cluster_name"}, {"name": "internal_cluster_id"}],
            "queues": [], "exchanges": [], "bindings": []
        });
        assert_eq!(emptiness(&fresh, "guest"), Emptiness::Empty);
        assert_eq!(
            emptiness(&sample(), "guest"),
            Emptiness::HasData(
                "1 user, 1 vhost, 1 permission, 1 queue, 1 exchange, 2 bindings".into()
            )
        );
        let mut marked = fresh.clone();
        marked["global_parameters"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": MARKER}));
        assert_eq!(emptiness(&marked, "guest"), Emptiness::Interrupted);
    }

    #[test]
    fn found_counts_only_the_artifacts_objects() {
        let mut now = sample();
        now["users"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "admin"}));
        now["queues"] = json!([]);
        let f = found(&sample(), &now);
        assert_eq!(f["users"], 2);
        assert_eq!(f["queues"], 0);
        assert_eq!(f["bindings"], 2);
    }
}
