//! The HTTP API: health, alerts, metrics, statistics, sets, and jobs (start, watch, cancel). JSON
//! everywhere; errors are `{"error": "..."}`; POST and DELETE need the bearer token when one
//! is configured.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use serde_json::{Value, json};
use tracing::info;

use super::state::{JobKind, Trigger};
use super::{NotStarted, Sidecar};

type App = Arc<Sidecar>;

pub fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/alerts", get(alerts))
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/backups", get(list_backups).post(start_backup))
        .route("/test-restores", axum::routing::post(start_test_restore))
        .route("/jobs/{id}", get(get_job).delete(cancel_job))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        })
        .with_state(app)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

fn ok(status: StatusCode, v: Value) -> Response {
    (status, axum::Json(v)).into_response()
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Some(401 response)` when the call lacks the configured token.
fn unauthorized(app: &Sidecar, headers: &HeaderMap) -> Option<Response> {
    let token = app.sc.api_token.as_ref()?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(g) if same(g.as_bytes(), token.expose().as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong bearer token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "this call needs Authorization: Bearer <DBKEEPER_API_TOKEN>",
        )),
    }
}

/// The aggregate health and the reasons when unhealthy.
pub fn health_body(app: &Sidecar) -> (bool, Value) {
    let now = Utc::now();
    let mut reasons = Vec::new();
    for (k, why) in app.engine_problems() {
        reasons.push(format!("{k} down: {why}"));
    }
    let (newest, age, fresh) = app.freshness(now);
    if let Err(why) = &fresh {
        reasons.push(why.clone());
    }
    let remote = app.remote_freshness(now);
    if let Some(Err(why)) = &remote {
        reasons.push(why.clone());
    }
    let g = app.state.lock();
    let engines: serde_json::Map<String, Value> = g
        .engines
        .iter()
        .map(|(k, h)| {
            (
                k.name().to_owned(),
                serde_json::to_value(h).unwrap_or_default(),
            )
        })
        .collect();
    let healthy = reasons.is_empty();
    let remote = app.remote.as_ref().map(|r| {
        json!({
            "url": r.display(),
            "newest": g.remote.newest.as_ref().map(|(id, _)| id),
            "last_success": g.remote.last_success,
            "last_error": g.remote.last_error,
            "max_age_seconds": app.sc.remote_max_age.as_secs_f64(),
            "fresh": !matches!(remote, Some(Err(_))),
        })
    });
    let encryption = app.cfg.crypto.as_ref().map(|c| {
        json!({
            "scheme": "age",
            "recipients": c.fingerprints(),
            "can_decrypt": c.can_decrypt(),
            "detail": c.describe(),
        })
    });
    let body = json!({
        "remote": remote,
        "encryption": encryption,
        "status": if healthy { "ok" } else { "unhealthy" },
        "reasons": reasons,
        "engines": engines,
        "backup": {
            "newest_verified": newest,
            "age_seconds": age,
            "max_age_seconds": app.sc.max_backup_age.as_secs_f64(),
            "fresh": fresh.is_ok(),
        },
    });
    (healthy, body)
}

async fn health(State(app): State<App>) -> Response {
    let (healthy, body) = health_body(&app);
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    ok(code, body)
}

/// Every active condition an operator should look at.
pub fn active_alerts(app: &Sidecar) -> Vec<Value> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (k, why) in app.engine_problems() {
        out.push(json!({"alert": "engine_down", "engine": k.name(), "message": why}));
    }
    for (kind, s) in app.stats.snapshot() {
        out.extend(super::db_alerts::conditions(
            kind,
            &s.families,
            &s.events,
            &app.sc.db_alerts,
            now,
        ));
    }
    if let (_, _, Err(why)) = app.freshness(now) {
        out.push(json!({"alert": "backup_stale", "message": why}));
    }
    let g = app.state.lock();
    if let Some(run) = &g.last_backup
        && run.status == super::state::JobStatus::Failed
    {
        out.push(json!({
            "alert": "last_run_failed",
            "finished_at": run.finished_at,
            "message": run.error.clone().unwrap_or_default(),
        }));
    }
    if let Some(run) = &g.last_test_restore
        && run.status == super::state::JobStatus::Failed
    {
        out.push(json!({
            "alert": "test_restore_failed",
            "finished_at": run.finished_at,
            "message": run.error.clone().unwrap_or_default(),
        }));
    }
    if let Some(err) = &g.repo.error {
        out.push(json!({"alert": "repository_error", "message": err}));
    }
    if let Some(err) = &g.remote.last_error {
        out.push(json!({
            "alert": "remote_copy_failed",
            "attempted_at": g.remote.last_attempt,
            "message": err,
        }));
    }
    drop(g);
    if let Some(p) = app
        .pitr
        .as_ref()
        .and_then(|p| p.lock().ok().map(|g| g.clone()))
    {
        if let Some((lost, resumed)) = p.gap {
            out.push(json!({
                "alert": "pitr_gap",
                "archived_to": lost.to_string(),
                "archived_to_time": lost.time(),
                "resumed_at": resumed.to_string(),
                "message": format!(
                    "the oplog rolled past the archive's end ({lost}, {}): points between it and the next set cannot be recovered; a new set starts a new chain",
                    lost.time().to_rfc3339()
                ),
            }));
        }
        if let (false, Some(err)) = (p.running, &p.last_error) {
            out.push(json!({"alert": "pitr_stopped", "message": err}));
        }
    }
    if let Some(p) = app
        .pg_pitr
        .as_ref()
        .and_then(|p| p.lock().ok().map(|g| g.clone()))
    {
        use crate::engine::postgres::pitr::fmt_lsn;
        if let Some((lost, resumed)) = p.gap {
            out.push(json!({
                "alert": "pitr_gap",
                "engine": "postgres",
                "archived_to": fmt_lsn(lost),
                "resumed_at": fmt_lsn(resumed),
                "message": format!(
                    "the replication slot no longer held the WAL after the archive's end ({}): points between it and the next set cannot be recovered; a new set starts a new chain",
                    fmt_lsn(lost)
                ),
            }));
        }
        if let (false, Some(err)) = (p.running, &p.last_error) {
            out.push(json!({"alert": "pitr_stopped", "engine": "postgres", "message": err}));
        }
        let limit = app.sc.db_alerts.postgres_slot_lag;
        if let Some(lag) = p.slot_lag_bytes
            && lag >= limit
        {
            out.push(json!({
                "alert": "postgres_slot_lagging",
                "engine": "postgres",
                "slot": app.cfg.postgres_slot,
                "lag_bytes": lag,
                "threshold_bytes": limit,
                "message": format!(
                    "replication slot {} holds {lag} bytes of WAL on the server (threshold {limit}): the server keeps WAL until it is archived; it fills the server's disk if archiving stays behind",
                    app.cfg.postgres_slot
                ),
            }));
        }
    }
    if let Some(Err(why)) = app.remote_freshness(now) {
        out.push(json!({"alert": "remote_stale", "message": why}));
    }
    let g = app.state.lock();
    if let (Some(free), Some(total)) = (g.repo.free_bytes, g.repo.total_bytes)
        && app.sc.min_free.is_low(free, total)
    {
        out.push(json!({
            "alert": "repository_low_space",
            "free_bytes": free,
            "total_bytes": total,
            "message": format!(
                "{} free of {} on the repository's filesystem, below DBKEEPER_MIN_FREE ({:?})",
                crate::role::list::human_bytes(free),
                crate::role::list::human_bytes(total),
                app.sc.min_free
            ),
        }));
    }
    out
}

async fn alerts(State(app): State<App>) -> Response {
    let alerts = active_alerts(&app);
    ok(StatusCode::OK, json!({ "alerts": alerts }))
}

async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = super::metrics::Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        super::metrics::render(&app, format),
    )
        .into_response()
}

/// The engines' statistics as JSON, from memory like `/metrics`.
async fn stats(State(app): State<App>) -> Response {
    let rounds = app.stats.snapshot();
    ok(
        StatusCode::OK,
        super::stats::to_json(app.cfg.stats_interval, &rounds),
    )
}

async fn list_backups(State(app): State<App>) -> Response {
    let repo = app.repo.clone();
    let verified = app.state.lock().newest_verified.clone().map(|(id, _)| id);
    let listed = tokio::task::spawn_blocking(move || -> crate::Result<Value> {
        let now = Utc::now();
        let sets = repo.list()?;
        let items: Vec<Value> = sets
            .iter()
            .map(|s| {
                let mut v = crate::role::list::set_json(s, now);
                v["newest_verified"] = json!(verified.as_deref() == Some(s.id.as_str()));
                v
            })
            .collect();
        Ok(Value::Array(items))
    })
    .await;
    match listed {
        Ok(Ok(v)) => ok(StatusCode::OK, v),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn start_backup(State(app): State<App>, headers: HeaderMap) -> Response {
    start_job(&app, &headers, JobKind::Backup)
}

async fn start_test_restore(State(app): State<App>, headers: HeaderMap) -> Response {
    if app.sc.scratch.is_empty() {
        if let Some(r) = unauthorized(&app, &headers) {
            return r;
        }
        return error(
            StatusCode::CONFLICT,
            "no scratch server configured: set DBKEEPER_TEST_RESTORE_REDIS_URL (or _MONGODB_URI, _CHROMA_URL)",
        );
    }
    start_job(&app, &headers, JobKind::TestRestore)
}

fn start_job(app: &App, headers: &HeaderMap, kind: JobKind) -> Response {
    if let Some(r) = unauthorized(app, headers) {
        return r;
    }
    match app.start(kind, Trigger::Api, Utc::now()) {
        Ok(id) => ok(
            StatusCode::ACCEPTED,
            json!({ "job": id, "status_url": format!("/jobs/{id}") }),
        ),
        Err(NotStarted::Stopping) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "the sidecar is stopping")
        }
        Err(NotStarted::Busy(running)) => ok(
            StatusCode::CONFLICT,
            json!({ "error": format!("job {running} is still running"), "job": running }),
        ),
    }
}

async fn get_job(State(app): State<App>, Path(id): Path<String>) -> Response {
    let Some(job) = app.state.job(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    let mut v = serde_json::to_value(&job).unwrap_or_default();
    if !job.status.is_finished() {
        let root = app.repo.local_root().map(std::path::Path::to_path_buf);
        let bytes = tokio::task::spawn_blocking(move || root.map_or(0, |r| super::temp_bytes(&r)))
            .await
            .unwrap_or(0);
        v["progress"] = json!({
            "phase": job.phase,
            "elapsed_seconds": job.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0),
            "bytes_written": bytes,
        });
    }
    ok(StatusCode::OK, v)
}

async fn cancel_job(
    State(app): State<App>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&app, &headers) {
        return r;
    }
    let Some(job) = app.state.job(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no job {id}"));
    };
    if job.status.is_finished() {
        return ok(
            StatusCode::CONFLICT,
            json!({ "error": format!("job {id} already finished"), "status": job.status }),
        );
    }
    info!(job = %id, "job cancel requested over the API");
    job.cancel.cancel();
    ok(
        StatusCode::ACCEPTED,
        json!({ "job": id, "status": "cancelling" }),
    )
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }
}
