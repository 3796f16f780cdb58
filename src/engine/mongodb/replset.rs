//! Replica sets: what a `hello` (and `replSetGetStatus`) says about a member; what `health`,
//! `wait` and `init` make of it; and `init`'s one write to a set, `replSetInitiate` of a server
//! started with `--replSet` that is not initiated yet. An initiated set is never reconfigured.
//!
//! The decisions are pure functions over the server's replies, unit-tested below with
//! documents shaped like mongod's: the stand-in server the integration tests run is always an
//! initiated set (or a standalone), so the uninitiated path is covered here only.

use std::time::{Duration, Instant};

use mongodb::Client;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, ConnectionString, HostInfo, ServerAddress};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{ENGINE, MongoConfig, MongoEngine, Purpose};
use crate::engine::Probe;
use crate::error::{Error, Result};

const DEFAULT_PORT: u16 = 27017;
/// `AlreadyInitialized`: someone initiated the set between our `hello` and our initiate.
const ALREADY_INITIALIZED: i32 = 23;
/// `NoReplicationEnabled`: the server was not started with `--replSet`.
const NO_REPLICATION: i32 = 76;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MAX_ATTEMPT: Duration = Duration::from_secs(5);

/// What kind of server a `hello` reply describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Topology {
    Mongos,
    /// No replication at all.
    Standalone,
    /// Started with `--replSet` but holding no set configuration: never initiated (or removed
    /// from its set). `hello` says `isreplicaset: true` and names no `setName`.
    Uninitiated,
    Member(Member),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Member {
    pub set: String,
    pub state: State,
    /// The primary this member knows of (`hello`'s `primary`), if any.
    pub primary: Option<String>,
}

/// A member's state as far as `hello` tells it; the rest (RECOVERING, STARTUP2, ROLLBACK…)
/// only `replSetGetStatus` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Primary,
    Secondary,
    Arbiter,
    Other,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Primary => "PRIMARY",
            State::Secondary => "SECONDARY",
            State::Arbiter => "ARBITER",
            State::Other => "not PRIMARY, SECONDARY or ARBITER",
        }
    }
}

fn flag(d: &Document, key: &str) -> bool {
    d.get_bool(key).unwrap_or(false)
}

impl Topology {
    pub(super) fn of_hello(hello: &Document) -> Topology {
        if hello.get_str("msg").ok() == Some("isdbgrid") {
            return Topology::Mongos;
        }
        let Ok(set) = hello.get_str("setName") else {
            return if flag(hello, "isreplicaset") {
                Topology::Uninitiated
            } else {
                Topology::Standalone
            };
        };
        // `ismaster` is what servers older than 4.4.2 answer to `isMaster`.
        let state = if flag(hello, "isWritablePrimary") || flag(hello, "ismaster") {
            State::Primary
        } else if flag(hello, "secondary") {
            State::Secondary
        } else if flag(hello, "arbiterOnly") {
            State::Arbiter
        } else {
            State::Other
        };
        Topology::Member(Member {
            set: set.to_owned(),
            state,
            primary: hello
                .get_str("primary")
                .ok()
                .filter(|p| !p.is_empty())
                .map(str::to_owned),
        })
    }
}

/// What `replSetGetStatus` adds to `hello`: this member's state by name, and how far its last
/// applied operation is behind the primary's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Status {
    pub state: Option<String>,
    pub lag: Option<Duration>,
}

impl Status {
    /// `None` for an error reply (not a member, or not authorized: then only `hello` counts).
    pub(super) fn parse(reply: &Document) -> Option<Status> {
        if !is_ok(reply) {
            return None;
        }
        let members = reply.get_array("members").ok();
        let member_docs = || members.into_iter().flatten().filter_map(Bson::as_document);
        let me = member_docs().find(|m| flag(m, "self"));
        let primary = member_docs().find(|m| {
            m.get_str("stateStr").ok() == Some("PRIMARY") || int(m.get("state")) == Some(1)
        });
        let state = me
            .and_then(|m| m.get_str("stateStr").ok().map(str::to_owned))
            .or_else(|| {
                int(reply.get("myState"))
                    .and_then(state_name)
                    .map(str::to_owned)
            });
        let lag = match (me, primary) {
            (Some(me), Some(p)) => {
                let mine = me.get_datetime("optimeDate").ok();
                let theirs = p.get_datetime("optimeDate").ok();
                mine.zip(theirs).map(|(m, p)| {
                    let ms = p.timestamp_millis().saturating_sub(m.timestamp_millis());
                    Duration::from_millis(ms.max(0) as u64)
                })
            }
            _ => None,
        };
        Some(Status { state, lag })
    }
}

fn int(v: Option<&Bson>) -> Option<i64> {
    match v? {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

fn is_ok(reply: &Document) -> bool {
    match reply.get("ok") {
        Some(Bson::Boolean(b)) => *b,
        other => int(other) == Some(1),
    }
}

/// The names `replSetGetStatus` gives the numeric `myState`.
fn state_name(code: i64) -> Option<&'static str> {
    Some(match code {
        0 => "STARTUP",
        1 => "PRIMARY",
        2 => "SECONDARY",
        3 => "RECOVERING",
        5 => "STARTUP2",
        6 => "UNKNOWN",
        7 => "ARBITER",
        8 => "DOWN",
        9 => "ROLLBACK",
        10 => "REMOVED",
        _ => return None,
    })
}

/// The health line's facts: `role=<state> set=<name> lag=<n>s wire=<n>`, the lag only where
/// `replSetGetStatus` answered.
pub(super) fn describe(hello: &Document, status: Option<&Status>) -> Probe {
    let role = match Topology::of_hello(hello) {
        Topology::Mongos => "mongos".to_owned(),
        Topology::Standalone => "standalone".to_owned(),
        Topology::Uninitiated => "uninitiated".to_owned(),
        Topology::Member(m) => {
            let state = match (m.state, status.and_then(|s| s.state.as_deref())) {
                (State::Other, Some(named)) => named.to_ascii_lowercase(),
                (State::Other, None) => "other".to_owned(),
                (s, _) => s.name().to_ascii_lowercase(),
            };
            let lag = match (m.state, status.and_then(|s| s.lag)) {
                (State::Arbiter, _) | (_, None) => String::new(),
                (_, Some(l)) => format!(" lag={}s", l.as_secs()),
            };
            format!("{state} set={}{lag}", m.set)
        }
    };
    Probe {
        version: None,
        detail: format!(
            "role={role} wire={}",
            hello
                .get("maxWireVersion")
                .map(|v| v.to_string())
                .unwrap_or_default()
        ),
    }
}

/// The health check of one server: a standalone or a mongos that answers is healthy; a
/// replica-set member only as PRIMARY, SECONDARY or ARBITER. `Err` is the unhealthy reason.
pub(super) fn health(hello: &Document, status: Option<&Status>) -> Result<Probe, String> {
    match Topology::of_hello(hello) {
        Topology::Uninitiated => Err(
            "the server runs with --replSet but its replica set is not initiated yet \
             (`dbkeeper init` with DBKEEPER_MONGODB_REPLSET initiates it)"
                .to_owned(),
        ),
        Topology::Member(m) => {
            let named = status.and_then(|s| s.state.as_deref());
            let healthy = m.state != State::Other
                || named.is_some_and(|n| matches!(n, "PRIMARY" | "SECONDARY" | "ARBITER"));
            if healthy {
                Ok(describe(hello, status))
            } else {
                Err(format!(
                    "member of replica set {:?} is {}; healthy is PRIMARY, SECONDARY or ARBITER",
                    m.set,
                    named.unwrap_or(m.state.name())
                ))
            }
        }
        Topology::Mongos | Topology::Standalone => Ok(describe(hello, status)),
    }
}

/// Whether the server is what `DBKEEPER_MONGODB_REPLSET` says it should be (a member of that
/// set, or not initiated yet); `Err` says what to do instead.
fn check_configured(topology: &Topology, want: &str) -> Result<(), String> {
    match topology {
        Topology::Uninitiated => Ok(()),
        Topology::Member(m) if m.set == want => Ok(()),
        Topology::Member(m) => Err(format!(
            "the server is in replica set {:?}, but DBKEEPER_MONGODB_REPLSET is {want:?}; \
             dbkeeper never reconfigures a set",
            m.set
        )),
        Topology::Standalone => Err(format!(
            "the server runs without replication, but DBKEEPER_MONGODB_REPLSET is {want:?}; \
             start mongod with --replSet {want}"
        )),
        Topology::Mongos => Err(format!(
            "the server is a mongos, but DBKEEPER_MONGODB_REPLSET is {want:?}; \
             point DBKEEPER_MONGODB_URI at a member of the set"
        )),
    }
}

/// What `wait` makes of a `hello` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Readiness {
    Ready,
    /// Retrying may help: the reason.
    NotYet(String),
    /// Retrying cannot help: what to change.
    Refused(String),
}

/// Ready means writes can be taken: a standalone or a mongos that answers, or a member of a
/// set with a writable primary, this one or the one it names (a direct connection to a
/// secondary).
pub(super) fn readiness(topology: &Topology, want: Option<&str>) -> Readiness {
    if let Some(want) = want
        && let Err(m) = check_configured(topology, want)
    {
        return Readiness::Refused(m);
    }
    match topology {
        Topology::Mongos | Topology::Standalone => Readiness::Ready,
        Topology::Uninitiated => Readiness::NotYet(match want {
            Some(want) => {
                format!("replica set {want:?} is not initiated yet; `dbkeeper init` initiates it")
            }
            None => "the server runs with --replSet but its replica set is not initiated; \
                     set DBKEEPER_MONGODB_REPLSET for `dbkeeper init` to initiate it"
                .to_owned(),
        }),
        Topology::Member(m) if m.state == State::Primary || m.primary.is_some() => Readiness::Ready,
        Topology::Member(m) => Readiness::NotYet(format!(
            "replica set {:?} has no primary yet (this member is {})",
            m.set,
            m.state.name()
        )),
    }
}

/// What `init` does to the server before it waits for a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// The configured set is initiated already: leave it as it is.
    Keep,
    Initiate,
}

pub(super) fn plan(topology: &Topology, want: &str) -> Result<Plan, String> {
    check_configured(topology, want)?;
    Ok(match topology {
        Topology::Uninitiated => Plan::Initiate,
        _ => Plan::Keep,
    })
}

/// `replSetInitiate` with members `_id` 0..n in the order given.
pub(super) fn initiate_command(set: &str, members: &[String]) -> Document {
    let members: Vec<Bson> = members
        .iter()
        .enumerate()
        .map(|(i, host)| Bson::Document(doc! {"_id": i as i32, "host": host}))
        .collect();
    doc! {"replSetInitiate": {"_id": set, "members": members}}
}

/// Checks `DBKEEPER_MONGODB_REPLSET(_MEMBERS)`: a set name MongoDB accepts, members as
/// `host[:port]`.
pub(super) fn validate(set: Option<&str>, members: &[String]) -> Result<()> {
    if let Some(set) = set
        && set.contains(['/', ' ', ','])
    {
        return Err(Error::config(format!(
            "DBKEEPER_MONGODB_REPLSET={set:?}: a replica-set name has no '/', ',' or spaces"
        )));
    }
    for m in members {
        let (host, port) = match m.rsplit_once(':') {
            // A bare IPv6 address: no port.
            Some((h, _)) if !h.ends_with(']') && h.contains(':') => (m.as_str(), None),
            Some((h, p)) => (h, Some(p)),
            None => (m.as_str(), None),
        };
        if host.is_empty() || port.is_some_and(|p| p.parse::<u16>().map_or(true, |p| p == 0)) {
            return Err(Error::config(format!(
                "DBKEEPER_MONGODB_REPLSET_MEMBERS: {m:?} is not host:port"
            )));
        }
    }
    Ok(())
}

/// The members to initiate with: the configured ones, else the URI's hosts.
fn members_of(cfg: &MongoConfig) -> Result<Vec<String>> {
    if !cfg.replset_members.is_empty() {
        return Ok(cfg.replset_members.clone());
    }
    match &cfg.conn.host_info {
        HostInfo::HostIdentifiers(hosts) => Ok(hosts
            .iter()
            .map(|h| match h {
                ServerAddress::Tcp { host, port } => {
                    format!("{host}:{}", port.unwrap_or(DEFAULT_PORT))
                }
                other => other.to_string(),
            })
            .collect()),
        _ => Err(Error::config(
            "DBKEEPER_MONGODB_REPLSET with a mongodb+srv:// URI needs DBKEEPER_MONGODB_REPLSET_MEMBERS",
        )),
    }
}

/// Client options for asking one server about itself. A single-host URI that names no set is
/// connected to directly: an uninitiated member cannot be discovered as a set, and a health
/// check is about this member. `first_host` narrows a seed list to its first host (the one
/// `init` initiates).
pub(super) fn direct(o: &mut ClientOptions, conn: &ConnectionString, first_host: bool) {
    if o.load_balanced == Some(true) || !matches!(conn.host_info, HostInfo::HostIdentifiers(_)) {
        return;
    }
    if first_host {
        o.hosts.truncate(1);
        o.repl_set_name = None;
        o.direct_connection = Some(true);
    } else if o.hosts.len() == 1 && o.repl_set_name.is_none() && o.direct_connection.is_none() {
        o.direct_connection = Some(true);
    }
}

impl MongoEngine {
    fn refused(&self, message: String) -> Error {
        Error::Refused {
            engine: ENGINE,
            url: self.cfg.display.clone(),
            message,
        }
    }

    /// `wait`'s check: a writable primary is reachable, and the server is the configured set.
    pub(super) async fn ready_with(&self, client: Client) -> Result<Probe> {
        let hello = self.hello_with(&client).await?;
        match readiness(&Topology::of_hello(&hello), self.cfg.replset.as_deref()) {
            Readiness::Ready => Ok(describe(&hello, None)),
            Readiness::NotYet(message) => Err(Error::Unreachable {
                engine: ENGINE,
                url: self.cfg.display.clone(),
                message,
            }),
            Readiness::Refused(message) => Err(self.refused(message)),
        }
    }

    /// `replSetGetStatus` of a member, read for its state and lag; `None` when refused (not
    /// authorized) or failed: then `hello` alone decides.
    pub(super) async fn status_with(&self, client: &Client) -> Option<Status> {
        match client
            .database("admin")
            .run_command(doc! {"replSetGetStatus": 1})
            .await
        {
            Ok(reply) => Status::parse(&reply),
            Err(e) => {
                debug!(engine = ENGINE, error = %super::driver_message(&e), "replSetGetStatus");
                None
            }
        }
    }

    /// `init`'s step before it waits for a primary: with `DBKEEPER_MONGODB_REPLSET`, waits for
    /// the server to answer, checks it is that set or not initiated yet, and initiates it.
    pub(super) async fn prepare_replset(
        &self,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let Some(want) = self.cfg.replset.clone() else {
            return Ok(());
        };
        let members = members_of(&self.cfg)?;
        let hello = self.hello_until(deadline, cancel).await?;
        match plan(&Topology::of_hello(&hello), &want).map_err(|m| self.refused(m))? {
            Plan::Keep => {
                info!(
                    engine = ENGINE,
                    set = want,
                    "replica set initiated already; left as it is"
                );
                Ok(())
            }
            Plan::Initiate => {
                let left = deadline.saturating_duration_since(Instant::now());
                let t = left.clamp(Duration::from_secs(1), Duration::from_secs(30));
                let cmd = initiate_command(&want, &members);
                let want_s: &str = &want;
                let initiated = self
                    .with_client(Purpose::Member(t), |client| async move {
                        match client.database("admin").run_command(cmd).await {
                            Ok(_) => Ok(true),
                            Err(e) => match e.kind.as_ref() {
                                ErrorKind::Command(c) if c.code == ALREADY_INITIALIZED => Ok(false),
                                _ => Err(self.initiate_error(e, want_s)),
                            },
                        }
                    })
                    .await?;
                if initiated {
                    info!(engine = ENGINE, set = want, members = %members.join(","), "replica set initiated");
                } else {
                    // Someone else was quicker; `wait` checks the set's name.
                    info!(
                        engine = ENGINE,
                        set = want,
                        "replica set initiated meanwhile by another client"
                    );
                }
                Ok(())
            }
        }
    }

    fn initiate_error(&self, e: mongodb::error::Error, want: &str) -> Error {
        match e.kind.as_ref() {
            ErrorKind::Command(c) if c.code == NO_REPLICATION => {
                self.refused(format!("the server runs without replication, but DBKEEPER_MONGODB_REPLSET is {want:?}; start mongod with --replSet {want}"))
            }
            ErrorKind::Command(_) => Error::engine(
                ENGINE,
                format!(
                    "{}: replSetInitiate of {want:?} failed: {}",
                    self.cfg.display,
                    super::driver_message(&e)
                ),
            ),
            _ => self.classify(e),
        }
    }

    /// `hello` from the first host of the URI, retried with backoff until it answers or
    /// `deadline` passes; gives up at once on what retrying cannot fix.
    async fn hello_until(&self, deadline: Instant, cancel: &CancellationToken) -> Result<Document> {
        let start = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.clamp(Duration::from_millis(200), MAX_ATTEMPT);
            let r = self
                .with_client(Purpose::Member(attempt), |client| async move {
                    self.hello_with(&client).await
                })
                .await;
            match r {
                Ok(hello) => return Ok(hello),
                Err(e) if e.is_retryable() => {
                    debug!(engine = ENGINE, reason = %e, "not answering yet");
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Deadline {
                            engine: ENGINE,
                            url: self.cfg.display.clone(),
                            waited_s: start.elapsed().as_secs_f64(),
                            last: match e {
                                Error::Unreachable { message, .. } => message,
                                other => other.to_string(),
                            },
                        });
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.min(left)) => {}
                        _ = cancel.cancelled() => return Err(Error::Interrupted(0)),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{DateTime, oid::ObjectId};

    /// mongod 8.0 started with `--replSet rs0`, before `replSetInitiate`.
    fn uninitiated() -> Document {
        doc! {
            "isWritablePrimary": false, "secondary": false,
            "info": "Does not have a valid replica set config",
            "isreplicaset": true,
            "topologyVersion": {"processId": ObjectId::new(), "counter": 0_i64},
            "maxBsonObjectSize": 16777216, "maxWireVersion": 25, "minWireVersion": 0,
            "readOnly": false, "ok": 1.0,
        }
    }

    fn member(set: &str, primary: bool, secondary: bool) -> Document {
        let mut d = doc! {
            "topologyVersion": {"processId": ObjectId::new(), "counter": 6_i64},
            "hosts": ["mongo:27017", "mongo2:27017"],
            "setName": set, "setVersion": 1,
            "isWritablePrimary": primary, "secondary": secondary,
            "me": "mongo:27017", "maxWireVersion": 25, "ok": 1.0,
        };
        if primary || secondary {
            d.insert("primary", "mongo2:27017");
        }
        d
    }

    fn standalone() -> Document {
        doc! {"isWritablePrimary": true, "maxWireVersion": 25, "minWireVersion": 0, "ok": 1.0}
    }

    fn status(me_state: &str, me_secs: i64, primary_secs: Option<i64>) -> Document {
        let code = |s: &str| match s {
            "PRIMARY" => 1,
            "SECONDARY" => 2,
            "RECOVERING" => 3,
            _ => 5,
        };
        let mut members = vec![Bson::Document(doc! {
            "_id": 0, "name": "mongo:27017", "self": true, "state": code(me_state),
            "stateStr": me_state, "optimeDate": DateTime::from_millis(me_secs * 1000),
        })];
        if let Some(p) = primary_secs {
            members.push(Bson::Document(doc! {
                "_id": 1, "name": "mongo2:27017", "state": 1, "stateStr": "PRIMARY",
                "optimeDate": DateTime::from_millis(p * 1000),
            }));
        }
        doc! {"set": "rs0", "myState": code(me_state), "members": members, "ok": 1.0}
    }

    #[test]
    fn hello_replies_are_sorted_into_topologies() {
        assert_eq!(Topology::of_hello(&uninitiated()), Topology::Uninitiated);
        assert_eq!(Topology::of_hello(&standalone()), Topology::Standalone);
        assert_eq!(
            Topology::of_hello(&doc! {"msg": "isdbgrid", "isWritablePrimary": true, "ok": 1}),
            Topology::Mongos
        );
        let Topology::Member(m) = Topology::of_hello(&member("rs0", false, true)) else {
            panic!("a member")
        };
        assert_eq!(m.state, State::Secondary);
        assert_eq!(m.primary.as_deref(), Some("mongo2:27017"));
        // isMaster of a server older than 4.4.2.
        let old = doc! {"ismaster": true, "setName": "rs0", "ok": 1};
        assert!(
            matches!(Topology::of_hello(&old), Topology::Member(m) if m.state == State::Primary)
        );
        let arb = doc! {"setName": "rs0", "arbiterOnly": true, "isWritablePrimary": false, "secondary": false, "ok": 1};
        assert!(
            matches!(Topology::of_hello(&arb), Topology::Member(m) if m.state == State::Arbiter)
        );
    }

    #[test]
    fn status_gives_the_state_name_and_the_lag_behind_the_primary() {
        let s = Status::parse(&status("SECONDARY", 100, Some(112))).unwrap();
        assert_eq!(s.state.as_deref(), Some("SECONDARY"));
        assert_eq!(s.lag, Some(Duration::from_secs(12)));
        // Ahead of a stale view of the primary: no negative lag.
        let s = Status::parse(&status("SECONDARY", 120, Some(112))).unwrap();
        assert_eq!(s.lag, Some(Duration::ZERO));
        let s = Status::parse(&status("RECOVERING", 100, None)).unwrap();
        assert_eq!(s.state.as_deref(), Some("RECOVERING"));
        assert_eq!(s.lag, None);
        // Only myState: the name comes from the code.
        let s = Status::parse(&doc! {"myState": 9, "ok": 1}).unwrap();
        assert_eq!(s.state.as_deref(), Some("ROLLBACK"));
        // Unauthorized, or not running with --replSet: hello alone decides.
        assert_eq!(
            Status::parse(&doc! {"ok": 0.0, "code": 13, "errmsg": "not authorized"}),
            None
        );
        assert_eq!(
            Status::parse(&doc! {"ok": 0.0, "code": 94, "codeName": "NotYetInitialized"}),
            None
        );
    }

    #[test]
    fn health_accepts_primary_secondary_arbiter_and_names_state_and_lag() {
        let lagging = Status::parse(&status("SECONDARY", 100, Some(103)));
        let p = health(&member("rs0", false, true), lagging.as_ref()).unwrap();
        assert_eq!(p.detail, "role=secondary set=rs0 lag=3s wire=25");
        let p = health(&member("rs0", false, true), None).unwrap();
        assert_eq!(p.detail, "role=secondary set=rs0 wire=25");
        let p = health(&member("rs0", true, false), None).unwrap();
        assert_eq!(p.detail, "role=primary set=rs0 wire=25");
        let arb = doc! {"setName": "rs0", "arbiterOnly": true, "secondary": false, "maxWireVersion": 25, "ok": 1};
        assert_eq!(
            health(&arb, None).unwrap().detail,
            "role=arbiter set=rs0 wire=25"
        );
        assert_eq!(
            health(&standalone(), None).unwrap().detail,
            "role=standalone wire=25"
        );

        let recovering = Status::parse(&status("RECOVERING", 100, Some(200)));
        let e = health(&member("rs0", false, false), recovering.as_ref()).unwrap_err();
        assert!(e.contains("\"rs0\" is RECOVERING"), "{e}");
        let e = health(&member("rs0", false, false), None).unwrap_err();
        assert!(e.contains("not PRIMARY, SECONDARY or ARBITER"), "{e}");
        // A primary in drain mode is PRIMARY by state though not yet writable.
        let draining = Status::parse(&doc! {"myState": 1, "ok": 1});
        assert!(health(&member("rs0", false, false), draining.as_ref()).is_ok());
        let e = health(&uninitiated(), None).unwrap_err();
        assert!(e.contains("not initiated"), "{e}");
    }

    #[test]
    fn ready_needs_a_writable_primary_and_the_configured_set() {
        let t = |d: &Document| Topology::of_hello(d);
        assert_eq!(
            readiness(&t(&member("rs0", true, false)), None),
            Readiness::Ready
        );
        // A direct connection to a secondary that names its primary.
        assert_eq!(
            readiness(&t(&member("rs0", false, true)), Some("rs0")),
            Readiness::Ready
        );
        let no_primary =
            doc! {"setName": "rs0", "secondary": true, "isWritablePrimary": false, "ok": 1};
        assert!(
            matches!(readiness(&t(&no_primary), None), Readiness::NotYet(m) if m.contains("no primary"))
        );
        assert!(
            matches!(readiness(&t(&uninitiated()), None), Readiness::NotYet(m) if m.contains("DBKEEPER_MONGODB_REPLSET"))
        );
        assert!(
            matches!(readiness(&t(&uninitiated()), Some("rs0")), Readiness::NotYet(m) if m.contains("dbkeeper init"))
        );
        assert_eq!(readiness(&t(&standalone()), None), Readiness::Ready);
        assert_eq!(
            readiness(&t(&member("secantus", true, false)), Some("rs0")),
            Readiness::Refused(
                "the server is in replica set \"secantus\", but DBKEEPER_MONGODB_REPLSET is \"rs0\"; dbkeeper never reconfigures a set".into()
            )
        );
        assert!(
            matches!(readiness(&t(&standalone()), Some("rs0")), Readiness::Refused(m) if m.contains("start mongod with --replSet rs0"))
        );
    }

    #[test]
    fn init_initiates_only_an_uninitiated_server_of_the_configured_set() {
        let t = |d: &Document| Topology::of_hello(d);
        assert_eq!(plan(&t(&uninitiated()), "rs0"), Ok(Plan::Initiate));
        assert_eq!(plan(&t(&member("rs0", true, false)), "rs0"), Ok(Plan::Keep));
        assert_eq!(plan(&t(&member("rs0", false, true)), "rs0"), Ok(Plan::Keep));
        let e = plan(&t(&member("secantus", true, false)), "rs0").unwrap_err();
        assert!(
            e.contains("\"secantus\"") && e.contains("\"rs0\"") && !e.contains('\n'),
            "{e}"
        );
        let e = plan(&t(&standalone()), "rs0").unwrap_err();
        assert!(e.contains("--replSet"), "{e}");
        assert!(plan(&t(&doc! {"msg": "isdbgrid", "ok": 1}), "rs0").is_err());
    }

    #[test]
    fn the_initiate_command_numbers_members_in_order() {
        let c = initiate_command("rs0", &["mongo:27017".into(), "mongo2:27018".into()]);
        assert_eq!(
            c,
            doc! {"replSetInitiate": {"_id": "rs0", "members": [
                {"_id": 0, "host": "mongo:27017"}, {"_id": 1, "host": "mongo2:27018"},
            ]}}
        );
    }

    #[test]
    fn members_default_to_the_uri_hosts_and_are_validated() {
        use crate::engine::EngineOptions;
        use crate::secret::Secret;
        let opts = EngineOptions {
            mongo_replset: Some("rs0".into()),
            ..EngineOptions::default()
        };
        let cfg =
            MongoConfig::new(&Secret::new("mongodb://u:p@mongo/?authSource=admin"), &opts).unwrap();
        assert_eq!(members_of(&cfg).unwrap(), vec!["mongo:27017".to_owned()]);
        let cfg = MongoConfig::new(&Secret::new("mongodb://a:1,b:2/"), &opts).unwrap();
        assert_eq!(
            members_of(&cfg).unwrap(),
            vec!["a:1".to_owned(), "b:2".to_owned()]
        );
        let given = EngineOptions {
            mongo_replset_members: vec!["m1:27017".into(), "m2".into(), "[::1]:27019".into()],
            ..opts.clone()
        };
        let cfg = MongoConfig::new(&Secret::new("mongodb://a:1/"), &given).unwrap();
        assert_eq!(members_of(&cfg).unwrap().len(), 3);
        for bad in ["m1:x", ":27017", "m1:0"] {
            let o = EngineOptions {
                mongo_replset_members: vec![bad.into()],
                ..opts.clone()
            };
            let e = MongoConfig::new(&Secret::new("mongodb://a/"), &o)
                .err()
                .expect(bad);
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
        }
        let o = EngineOptions {
            mongo_replset: Some("a/b".into()),
            ..EngineOptions::default()
        };
        assert!(MongoConfig::new(&Secret::new("mongodb://a/"), &o).is_err());
    }
}
