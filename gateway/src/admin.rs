//! The instructor's admin page (`/admin/`) and its API.
//!
//! # Routes (every one needs [`Admin`]: the admin token as bearer, or the
//! `cm_admin` session cookie of `/admin/login`)
//!
//! | route | what |
//! | --- | --- |
//! | `GET /admin/` | the page (plain HTML/CSS/JS from `gateway/static/admin/`, embedded); a browser without a session is sent to `/admin/login` |
//! | `GET /admin/admin.js`, `/admin/admin.css` | its script and style |
//! | `GET /admin/ws` | websocket: a [`Snapshot`] (JSON text) at once and after every change |
//! | `GET /admin/api/snapshot` | the same JSON, for tests and scripts |
//! | `GET /admin/api/report.json`, `/admin/api/report.csv` | the workshop report (`dispatcher::report`) as a download |
//! | `POST /admin/api/jobs/{id}/cancel` | cancel a queued job, or stop one in flight |
//! | `POST /admin/api/jobs/{id}/raise`, `…/lower` | move a job to the front tier, or back |
//! | `POST /admin/api/users/{n}/raise`, `…/lower` | the same for every job of participant n |
//! | `POST /admin/api/pause` `{reason?}`, `POST /admin/api/resume` | stop / continue dispatching |
//! | `POST /admin/api/mode` `{mode: "fair" \| "fifo"}` | switch the scheduling mode |
//! | `POST /admin/api/limits` `{max_queued_per_user?, max_running_per_user?, max_queue?}` | change limits (the fields given) |
//! | `GET /admin/api/accounts` | participants' accounts |
//! | `POST /admin/api/accounts` | add a participant; answers its code (shown once) |
//! | `POST /admin/api/accounts/{n}/reset`, `…/disable`, `…/enable` | new code (shown once), lock out, let in |
//!
//! Errors are JSON (`{error: {type, message, …}}`, [`ApiError`]): 401 without
//! admin credentials (a participant's code is not one), 400 for a bad body,
//! 404 for an unknown job or participant, 409 for a job that cannot be
//! raised any more. Requests whose `Origin` is another site are refused (403):
//! the session cookie must not be usable from elsewhere.
//!
//! # Live updates
//!
//! One task per gateway (the *hub*, started by the first websocket) keeps
//! the latest snapshot and hands it to every open page through a
//! `tokio::sync::watch` channel. It rebuilds the snapshot
//! - when Redis says something happened: it subscribes to `cm:wake`
//!   (submit, requeue, resume, limits), `cm:stop` (cancel, drain) and
//!   `cm:events:*` (progress of every job), plus [`ADMIN_CHANNEL`], which
//!   every admin action here publishes; bursts are debounced ([`DEBOUNCE`]);
//! - and on a tick ([`TICK`]), for waiting and elapsed times and for Nomad's
//!   and Consul's state, which Redis does not announce.
//!
//! The expensive part (every job record, for per-participant counts and
//! the report's metrics) is retaken when jobs change state, throttled by
//! its own cost, and at least every [`CENSUS_EVERY`]; progress events alone
//! only refresh the queue and running tables. A new page gets a freshly
//! built snapshot first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dispatcher::config::ExecutorKind;
use dispatcher::consul::ConsulClient;
use dispatcher::job::{now_ms, Job, JobId, JobState};
use dispatcher::nomad::NomadClient;
use dispatcher::policy::{Limits, Mode, FRONT_TIER};
use dispatcher::queue::{Cancelled, STOP_CHANNEL, WAKE_CHANNEL};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::auth::Admin;
use crate::error::ApiError;
use crate::state::AppState;

/// Published (payload: what changed) after every admin action, so open
/// admin pages refresh at once.
pub const ADMIN_CHANNEL: &str = "cm:admin";
/// A participant heard from within this window is "online".
pub const ONLINE_WINDOW_MS: u64 = 2 * 60 * 1000;
/// How often open pages get a snapshot without any change announced.
pub const TICK: Duration = Duration::from_millis(1500);
/// How long the hub waits after an announced change for more to come.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// The job census (every job record) is rebuilt at least this often.
pub const CENSUS_EVERY: Duration = Duration::from_secs(5);
/// Nomad and Consul get this long to answer before they count as unreachable.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(3);
/// How many ended jobs the snapshot lists.
const RECENT: usize = 10;
/// An open websocket re-checks its admin session this often.
const REAUTH_EVERY: Duration = Duration::from_secs(30);

const INDEX_HTML: &str = include_str!("../static/admin/index.html");
const ADMIN_JS: &str = include_str!("../static/admin/admin.js");
const ADMIN_CSS: &str = include_str!("../static/admin/admin.css");

// ---------------------------------------------------------------------------
// What the admin page reads besides Redis
// ---------------------------------------------------------------------------

/// The cluster as the admin page shows it (Nomad nodes, Consul), and the hub
/// that keeps open pages live. Part of [`AppState`]; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    pub executor: ExecutorKind,
    /// Set with the Nomad executor: the GPU nodes are read from it.
    pub nomad: Option<NomadClient>,
    pub consul: Option<ConsulClient>,
    /// `nomad.gpu_node_pool`: the nodes shown (all nodes when none is in it).
    pub gpu_node_pool: String,
    hub: Arc<Hub>,
}

impl Cluster {
    pub fn new(
        executor: ExecutorKind,
        nomad: Option<NomadClient>,
        consul: Option<ConsulClient>,
        gpu_node_pool: impl Into<String>,
    ) -> Self {
        Cluster { executor, nomad, consul, gpu_node_pool: gpu_node_pool.into(), hub: Arc::new(Hub::new()) }
    }

    /// The local executor, no Consul: for tests and tools that need an
    /// [`AppState`] without a cluster.
    pub fn local() -> Self {
        Cluster::new(ExecutorKind::Local, None, None, "gpu")
    }
}

/// The latest snapshot (JSON text), shared by every open admin page.
struct Hub {
    tx: watch::Sender<Option<Arc<str>>>,
    started: OnceLock<()>,
}

impl Hub {
    fn new() -> Self {
        Hub { tx: watch::channel(None).0, started: OnceLock::new() }
    }
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// The admin routes (the login pages are in [`crate::login`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(|| async { Redirect::permanent("/admin/") }))
        .route("/admin/", get(index))
        .route("/admin/admin.js", get(script))
        .route("/admin/admin.css", get(style))
        .route("/admin/ws", get(websocket))
        .route("/admin/api/snapshot", get(snapshot_handler))
        .route("/admin/api/report.json", get(report_json))
        .route("/admin/api/report.csv", get(report_csv))
        .route("/admin/api/jobs/{id}/cancel", post(cancel_job))
        .route("/admin/api/jobs/{id}/raise", post(raise_job))
        .route("/admin/api/jobs/{id}/lower", post(lower_job))
        .route("/admin/api/users/{n}/raise", post(raise_user))
        .route("/admin/api/users/{n}/lower", post(lower_user))
        .route("/admin/api/pause", post(pause))
        .route("/admin/api/resume", post(resume))
        .route("/admin/api/mode", post(set_mode))
        .route("/admin/api/limits", post(set_limits))
        .route("/admin/api/accounts", get(list_accounts).post(create_account))
        .route("/admin/api/accounts/{n}/reset", post(reset_account))
        .route("/admin/api/accounts/{n}/disable", post(disable_account))
        .route("/admin/api/accounts/{n}/enable", post(enable_account))
}

fn asset(content_type: &'static str, body: &'static str, cache: &'static str) -> Response {
    let mut res = body.into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

async fn index(_: Admin) -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML, "no-store")
}

async fn script(_: Admin) -> Response {
    asset("text/javascript; charset=utf-8", ADMIN_JS, "no-cache")
}

async fn style(_: Admin) -> Response {
    asset("text/css; charset=utf-8", ADMIN_CSS, "no-cache")
}


/// Parses an optional JSON body: empty is `T::default()`.
fn body<T: DeserializeOwned + Default>(bytes: &Bytes) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request("invalid_body", format!("the request body is not what this action takes: {e}"))
    })
}

/// Tells open admin pages that something changed.
async fn announce(state: &AppState, what: &str) {
    let mut conn = state.auth.accounts_conn();
    let published: Result<i64, _> = redis::cmd("PUBLISH").arg(ADMIN_CHANNEL).arg(what).query_async(&mut conn).await;
    if let Err(e) = published {
        tracing::warn!("cannot announce {what} to admin pages: {e}");
    }
}

fn parse_job_id(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|_| ApiError::NotFound(format!("no job {id:?} (a job id is a UUID)")))
}

fn parse_user(n: &str) -> Result<u32, ApiError> {
    n.parse().map_err(|_| ApiError::NotFound(format!("there is no participant {n:?}")))
}

async fn existing_user(state: &AppState, n: &str) -> Result<u32, ApiError> {
    let n = parse_user(n)?;
    let count = state.auth.accounts().count().await?;
    if n == 0 || n > count {
        return Err(ApiError::NotFound(format!("there is no participant {n} (participants are 1..={count})")));
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Actions
// ---------------------------------------------------------------------------

/// `POST /admin/api/jobs/{id}/cancel`.
async fn cancel_job(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let id = parse_job_id(&id)?;
    let outcome = state.store.cancel(&id, None).await?;
    tracing::info!(job = %id, ?outcome, "cancelled by the instructor");
    announce(&state, "cancel").await;
    let (outcome, job_state) = match outcome {
        Cancelled::Removed => ("removed", JobState::Cancelled),
        Cancelled::Stopping => ("stopping", JobState::Running),
        Cancelled::AlreadyEnded(s) => ("already_ended", s),
    };
    Ok(Json(json!({ "job": id, "outcome": outcome, "state": job_state })))
}

async fn set_job_tier(state: &AppState, headers: &HeaderMap, id: &str, front: bool) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(headers, "the admin API")?;
    let id = parse_job_id(id)?;
    let job = state.store.get(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    if job.state != JobState::Queued {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; only a queued job can be moved in the queue",
            job.state
        )));
    }
    state.store.raise_job(&id, front).await?;
    tracing::info!(job = %id, front, "job tier changed by the instructor");
    announce(state, "tier").await;
    Ok(Json(json!({ "job": id, "tier": if front { FRONT_TIER } else { 0 } })))
}

/// `POST /admin/api/jobs/{id}/raise`: to the front tier.
async fn raise_job(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_job_tier(&state, &headers, &id, true).await
}

/// `POST /admin/api/jobs/{id}/lower`: back to the normal tier.
async fn lower_job(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_job_tier(&state, &headers, &id, false).await
}

async fn set_user_tier(state: &AppState, headers: &HeaderMap, n: &str, front: bool) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(headers, "the admin API")?;
    let n = existing_user(state, n).await?;
    state.store.raise_user(n, front).await?;
    tracing::info!(user = n, front, "participant tier changed by the instructor");
    announce(state, "tier").await;
    Ok(Json(json!({ "user": n, "raised": front })))
}

/// `POST /admin/api/users/{n}/raise`: every job of n to the front tier.
async fn raise_user(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_user_tier(&state, &headers, &n, true).await
}

/// `POST /admin/api/users/{n}/lower`.
async fn lower_user(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_user_tier(&state, &headers, &n, false).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/api/pause` `{reason?}`: nothing more is dispatched; jobs in
/// flight go on.
async fn pause(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let b: PauseBody = body(&bytes)?;
    let reason = b
        .reason
        .map(|r| r.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "paused by the instructor".into());
    if reason.len() > 200 {
        return Err(ApiError::bad_request("invalid_reason", "keep the reason under 200 characters"));
    }
    state.store.pause(&reason).await?;
    tracing::info!(%reason, "dispatching paused by the instructor");
    announce(&state, "pause").await;
    Ok(Json(json!({ "paused": true, "reason": reason })))
}

/// `POST /admin/api/resume`.
async fn resume(_: Admin, State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    state.store.resume().await?;
    tracing::info!("dispatching resumed by the instructor");
    announce(&state, "resume").await;
    Ok(Json(json!({ "paused": false })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    #[serde(default)]
    mode: Option<String>,
}

/// `POST /admin/api/mode` `{mode}`.
async fn set_mode(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let b: ModeBody = body(&bytes)?;
    let Some(name) = b.mode else {
        return Err(ApiError::bad_request("invalid_mode", "send {\"mode\": \"fair\"} or {\"mode\": \"fifo\"}"));
    };
    let mode: Mode = name
        .trim()
        .parse()
        .map_err(|e: dispatcher::policy::UnknownMode| ApiError::bad_request("invalid_mode", e.to_string()))?;
    state.store.set_mode(mode).await?;
    tracing::info!(%mode, "scheduling mode switched by the instructor");
    announce(&state, "mode").await;
    Ok(Json(json!({ "mode": mode })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_queued_per_user: Option<u32>,
    max_running_per_user: Option<u32>,
    max_queue: Option<u32>,
}

/// The largest value any limit may be set to.
const MAX_LIMIT: u32 = 100_000;

/// `POST /admin/api/limits`: the fields given change, the others stay.
async fn set_limits(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let b: LimitsBody = body(&bytes)?;
    let current = state.store.limits().await?;
    let new = Limits {
        max_queued_per_user: b.max_queued_per_user.unwrap_or(current.max_queued_per_user),
        max_running_per_user: b.max_running_per_user.unwrap_or(current.max_running_per_user),
        max_queue: b.max_queue.unwrap_or(current.max_queue),
    };
    for (name, value) in [
        ("max_queued_per_user", new.max_queued_per_user),
        ("max_running_per_user", new.max_running_per_user),
        ("max_queue", new.max_queue),
    ] {
        if !(1..=MAX_LIMIT).contains(&value) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("{name} must be between 1 and {MAX_LIMIT} (to stop dispatching, pause instead)"),
            ));
        }
    }
    state.store.set_limits(new).await?;
    tracing::info!(?new, "limits changed by the instructor");
    announce(&state, "limits").await;
    Ok(Json(json!({ "limits": new })))
}

/// `GET /admin/api/accounts`.
async fn list_accounts(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({ "accounts": state.auth.accounts().list().await? })))
}

fn issued(i: crate::auth::Issued) -> Json<Value> {
    let (handout, warning) = match i.handout {
        Ok(path) => (Some(path.display().to_string()), None),
        Err(e) => (None, Some(format!("{e}; write the code down now"))),
    };
    Json(json!({ "user": i.user, "code": i.code, "handout": handout, "warning": warning }))
}

/// `POST /admin/api/accounts`: a new participant N+1; its code is in the
/// answer, once.
async fn create_account(_: Admin, State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let i = state.auth.accounts().create().await?;
    announce(&state, "accounts").await;
    Ok(issued(i))
}

/// `POST /admin/api/accounts/{n}/reset`: a new code (in the answer, once);
/// the old one and n's sessions stop working.
async fn reset_account(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    let n = parse_user(&n)?;
    let i = state.auth.accounts().reset(n).await?;
    announce(&state, "accounts").await;
    Ok(issued(i))
}

async fn set_disabled(state: &AppState, headers: &HeaderMap, n: &str, disabled: bool) -> Result<Json<Value>, ApiError> {
    crate::auth::same_origin(headers, "the admin API")?;
    let n = parse_user(n)?;
    let changed = state.auth.accounts().set_disabled(n, disabled).await?;
    announce(state, "accounts").await;
    Ok(Json(json!({ "user": n, "enabled": !disabled, "changed": changed })))
}

/// `POST /admin/api/accounts/{n}/disable`.
async fn disable_account(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &headers, &n, true).await
}

/// `POST /admin/api/accounts/{n}/enable`.
async fn enable_account(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(n): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_disabled(&state, &headers, &n, false).await
}

// ---------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------

async fn report_of(state: &AppState) -> Result<dispatcher::report::Report, ApiError> {
    let jobs = state.store.all_jobs().await?;
    Ok(dispatcher::report::build(&jobs, state.slots, now_ms()))
}

fn download(content_type: &'static str, name: &str, body: String) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    res
}

/// `GET /admin/api/report.json`.
async fn report_json(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = report_of(&state).await?;
    Ok(download("application/json", "comfy-multi-report.json", dispatcher::report::to_json(&report)))
}

/// `GET /admin/api/report.csv`.
async fn report_csv(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = report_of(&state).await?;
    Ok(download("text/csv; charset=utf-8", "comfy-multi-report.csv", dispatcher::report::to_csv(&report)))
}

// ---------------------------------------------------------------------------
// The snapshot
// ---------------------------------------------------------------------------

/// Everything the admin page shows, as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When it was built (ms since the epoch).
    pub generated_at: u64,
    pub controls: Controls,
    /// Queued jobs in dispatch order.
    pub queue: Vec<QueuedJob>,
    /// Jobs dispatched or running.
    pub running: Vec<RunningJob>,
    pub cluster: ClusterView,
    pub participants: Vec<ParticipantView>,
    /// The workshop report so far ([`dispatcher::report::Report`] without
    /// `users`): totals, wait and run p50/p95/max, peak participants,
    /// failures by reason, GPU busy.
    pub metrics: Value,
    /// The last jobs that ended, newest first.
    pub recent: Vec<EndedJob>,
    /// What is down and since when (`dispatcher::health`; Consul is in
    /// `cluster`): the page's banner.
    pub health: dispatcher::health::Report,
}

/// Dispatching state, mode and limits.
#[derive(Debug, Clone, Serialize)]
pub struct Controls {
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub mode: Mode,
    pub limits: Limits,
    /// GPUs the dispatcher keeps busy.
    pub slots: usize,
    /// Participants raised to the front tier.
    pub raised_users: Vec<u32>,
}

/// One queued job.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedJob {
    pub id: JobId,
    pub user: u32,
    pub number: u64,
    pub state: JobState,
    /// 1 = next to run.
    pub position: usize,
    /// Since it was submitted.
    pub waited_seconds: u64,
    /// The tier it is ordered by: the higher of its own and its user's
    /// (0 normal, 1 front).
    pub tier: i64,
    /// The job itself was raised.
    pub job_raised: bool,
    /// Its participant was raised.
    pub user_raised: bool,
    /// Estimated wait until it starts; `None` until enough jobs have run.
    pub estimated_wait_seconds: Option<u64>,
    /// Times it was handed to an executor before (a requeued job).
    pub attempts: u32,
}

/// One job in flight.
#[derive(Debug, Clone, Serialize)]
pub struct RunningJob {
    pub id: JobId,
    pub user: u32,
    pub number: u64,
    pub state: JobState,
    /// `{node, value, max}` as gpu-task last reported it.
    pub progress: Option<Value>,
    /// Since it was dispatched.
    pub elapsed_seconds: u64,
    /// Since gpu-task said it started, once it did.
    pub running_seconds: Option<u64>,
    pub attempts: u32,
    pub cancel_requested: bool,
    pub executor_ref: Option<String>,
}

/// A job that ended.
#[derive(Debug, Clone, Serialize)]
pub struct EndedJob {
    pub id: JobId,
    pub user: u32,
    pub number: u64,
    pub state: JobState,
    pub error: Option<String>,
    pub finished_at: Option<u64>,
    /// From start (or dispatch) to end, with millisecond precision.
    pub run_seconds: Option<f64>,
}

/// The GPU side: Nomad's nodes, or the local executor.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// `nomad` or `local`.
    pub executor: &'static str,
    /// A sentence for the page when there is no Nomad to show.
    pub note: Option<String>,
    pub nomad_addr: Option<String>,
    /// `None` with the local executor.
    pub nomad_reachable: Option<bool>,
    pub nomad_error: Option<String>,
    /// `None` when no Consul is configured.
    pub consul_reachable: Option<bool>,
    pub node_pool: String,
    /// `pool`: the nodes of `node_pool`; `all`: none is in it, so every node.
    pub nodes_scope: &'static str,
    pub nodes: Vec<NodeView>,
}

/// One Nomad node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub pool: String,
    pub datacenter: String,
    /// `ready`, `down`, `initializing`, `disconnected`.
    pub status: String,
    /// `eligible` or `ineligible`.
    pub eligibility: String,
    /// A drain is in progress.
    pub drain: bool,
    /// `nvidia/gpu` device ids (GPU UUIDs).
    pub gpus: Vec<String>,
    /// Allocations pending or running on it.
    pub allocations: usize,
    /// Their jobs (e.g. `comfy-workflow/dispatch-…`).
    pub allocation_jobs: Vec<String>,
    /// Why the node's details could not be read, if they could not.
    pub error: Option<String>,
}

/// One participant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ParticipantView {
    pub user: u32,
    /// Heard from within the last two minutes.
    pub online: bool,
    pub last_seen: Option<u64>,
    pub enabled: bool,
    pub has_code: bool,
    pub raised: bool,
    pub queued: u32,
    pub running: u32,
    pub done: u32,
    pub failed: u32,
    pub cancelled: u32,
}

/// Per-participant counts and the report's metrics, from every job record.
#[derive(Debug, Clone, Default)]
struct Census {
    counts: BTreeMap<u32, [u32; 5]>,
    metrics: Value,
    recent: Vec<EndedJob>,
    /// When it was taken, and how long that took.
    at: Option<Instant>,
    took: Duration,
}

async fn census(state: &AppState) -> Result<Census, ApiError> {
    let started = Instant::now();
    let jobs = state.store.all_jobs().await?;
    let now = now_ms();
    let mut counts: BTreeMap<u32, [u32; 5]> = BTreeMap::new();
    for job in &jobs {
        let c = counts.entry(job.user).or_default();
        let i = match job.state {
            JobState::Queued => 0,
            JobState::Dispatched | JobState::Running => 1,
            JobState::Succeeded => 2,
            JobState::Failed => 3,
            JobState::Cancelled => 4,
        };
        c[i] += 1;
    }
    let mut ended: Vec<&Job> = jobs.iter().filter(|j| j.state.is_terminal()).collect();
    ended.sort_by_key(|j| std::cmp::Reverse(j.finished_at.unwrap_or(0)));
    let recent = ended
        .into_iter()
        .take(RECENT)
        .map(|j| EndedJob {
            id: j.id,
            user: j.user,
            number: j.number,
            state: j.state,
            error: j.error.clone(),
            finished_at: j.finished_at,
            run_seconds: j
                .finished_at
                .zip(j.started_at.or(j.dispatched_at))
                .map(|(end, start)| end.saturating_sub(start) as f64 / 1000.0),
        })
        .collect();
    // The report without its per-participant part (the participants table
    // has that).
    let mut metrics = serde_json::to_value(dispatcher::report::build(&jobs, state.slots, now))
        .map_err(|e| ApiError::Internal(format!("cannot encode the report: {e}")))?;
    if let Some(m) = metrics.as_object_mut() {
        m.remove("users");
    }
    Ok(Census { counts, metrics, recent, at: Some(started), took: started.elapsed() })
}

/// The queue, the jobs in flight and the controls: cheap, rebuilt every time.
struct Live {
    controls: Controls,
    queue: Vec<QueuedJob>,
    running: Vec<RunningJob>,
}

async fn live(state: &AppState) -> Result<Live, ApiError> {
    let store = &state.store;
    let (paused, mode, limits, raised) =
        tokio::try_join!(store.paused(), store.mode(), store.limits(), store.raised_users())?;
    let places = dispatcher::estimate::places(store, state.slots).await?;
    let now = now_ms();
    let raised_set: BTreeSet<u32> = raised.iter().copied().collect();
    let mut queue = Vec::with_capacity(places.len());
    for place in places {
        let Some(job) = store.get(&place.id).await? else { continue };
        let user_raised = raised_set.contains(&job.user);
        queue.push(QueuedJob {
            id: job.id,
            user: job.user,
            number: job.number,
            state: job.state,
            position: place.position,
            waited_seconds: now.saturating_sub(job.created_at) / 1000,
            tier: job.priority.max(if user_raised { FRONT_TIER } else { 0 }),
            job_raised: job.priority >= FRONT_TIER,
            user_raised,
            estimated_wait_seconds: place.wait_seconds,
            attempts: job.attempts,
        });
    }
    let mut running = Vec::new();
    for id in store.inflight().await? {
        let Some(job) = store.get(&id).await? else { continue };
        let since = |t: Option<u64>| t.map(|t| now.saturating_sub(t) / 1000);
        running.push(RunningJob {
            id: job.id,
            user: job.user,
            number: job.number,
            state: job.state,
            progress: job.progress.clone(),
            elapsed_seconds: since(job.dispatched_at.or(job.started_at)).unwrap_or(0),
            running_seconds: since(job.started_at),
            attempts: job.attempts,
            cancel_requested: job.cancel_requested,
            executor_ref: job.executor_ref.clone(),
        });
    }
    running.sort_by_key(|r| r.number);
    let mut raised_users = raised;
    raised_users.sort_unstable();
    Ok(Live {
        controls: Controls {
            paused: paused.is_some(),
            pause_reason: paused,
            mode,
            limits,
            slots: state.slots,
            raised_users,
        },
        queue,
        running,
    })
}

async fn cluster_view(cluster: &Cluster) -> ClusterView {
    let consul = async {
        match &cluster.consul {
            Some(c) => Some(tokio::time::timeout(CLUSTER_TIMEOUT, c.reachable()).await.unwrap_or(false)),
            None => None,
        }
    };
    let mut view = ClusterView {
        executor: match cluster.executor {
            ExecutorKind::Local => "local",
            ExecutorKind::Nomad => "nomad",
        },
        note: None,
        nomad_addr: cluster.nomad.as_ref().map(|n| n.addr().to_string()),
        nomad_reachable: None,
        nomad_error: None,
        consul_reachable: None,
        node_pool: cluster.gpu_node_pool.clone(),
        nodes_scope: "pool",
        nodes: Vec::new(),
    };
    let nomad = async {
        match &cluster.nomad {
            Some(n) => Some(tokio::time::timeout(CLUSTER_TIMEOUT, nomad_nodes(n, &cluster.gpu_node_pool)).await),
            None => None,
        }
    };
    let (consul, nomad) = tokio::join!(consul, nomad);
    view.consul_reachable = consul;
    match nomad {
        None => {
            view.note = Some(match cluster.executor {
                ExecutorKind::Local => {
                    "Local executor: jobs run as processes on the gateway's machine; there is no Nomad node to show."
                        .into()
                }
                ExecutorKind::Nomad => "No Nomad address is configured.".into(),
            })
        }
        Some(Err(_)) => {
            view.nomad_reachable = Some(false);
            view.nomad_error = Some(format!("Nomad did not answer within {} s", CLUSTER_TIMEOUT.as_secs()));
        }
        Some(Ok(Err(e))) => {
            view.nomad_reachable = Some(false);
            view.nomad_error = Some(e.to_string());
        }
        Some(Ok(Ok((scope, nodes)))) => {
            view.nomad_reachable = Some(true);
            view.nodes_scope = scope;
            view.nodes = nodes;
        }
    }
    view
}

async fn nomad_nodes(
    nomad: &NomadClient,
    pool: &str,
) -> Result<(&'static str, Vec<NodeView>), dispatcher::nomad::NomadError> {
    let all = nomad.nodes().await?;
    let in_pool: Vec<_> = all.iter().filter(|n| n.node_pool == pool).cloned().collect();
    let (scope, stubs) = if in_pool.is_empty() { ("all", all) } else { ("pool", in_pool) };
    let views = futures_util::future::join_all(stubs.into_iter().map(|stub| async move {
        let (node, allocs) = tokio::join!(nomad.node(&stub.id), nomad.node_allocations(&stub.id));
        let mut view = NodeView {
            id: stub.id.clone(),
            name: stub.name.clone(),
            pool: stub.node_pool.clone(),
            datacenter: stub.datacenter.clone(),
            status: stub.status.clone(),
            eligibility: stub.scheduling_eligibility.clone(),
            drain: stub.drain,
            gpus: Vec::new(),
            allocations: 0,
            allocation_jobs: Vec::new(),
            error: None,
        };
        match node {
            Ok(node) => {
                view.gpus = node.device_ids("nvidia", "gpu");
                view.drain = node.stub.drain || node.drain_strategy.as_ref().is_some_and(|d| !d.is_null());
            }
            Err(e) => view.error = Some(e.to_string()),
        }
        match allocs {
            Ok(allocs) => {
                let live: Vec<_> = allocs.iter().filter(|a| !a.is_terminal()).collect();
                view.allocations = live.len();
                view.allocation_jobs = live.iter().map(|a| a.job_id.clone()).collect();
            }
            Err(e) => view.error = Some(view.error.map_or(e.to_string(), |prev| format!("{prev}; {e}"))),
        }
        view
    }))
    .await;
    Ok((scope, views))
}

async fn participants(state: &AppState, census: &Census, raised: &[u32]) -> Result<Vec<ParticipantView>, ApiError> {
    let (accounts, seen) = tokio::join!(state.auth.accounts().list(), state.store.last_seen());
    let (accounts, seen) = (accounts?, seen?);
    let now = now_ms();
    Ok(accounts
        .into_iter()
        .map(|a| {
            let c = census.counts.get(&a.user).copied().unwrap_or_default();
            let last_seen = seen.get(&a.user).copied();
            ParticipantView {
                user: a.user,
                online: last_seen.is_some_and(|t| now.saturating_sub(t) <= ONLINE_WINDOW_MS),
                last_seen,
                enabled: a.enabled,
                has_code: a.has_code,
                raised: raised.contains(&a.user),
                queued: c[0],
                running: c[1],
                done: c[2],
                failed: c[3],
                cancelled: c[4],
            }
        })
        .collect())
}

/// Builds a snapshot; `census` is reused when given (else read afresh).
async fn build(state: &AppState, census: Option<Arc<Census>>) -> Result<(Snapshot, Arc<Census>), ApiError> {
    let census_fut = async {
        match census {
            Some(c) => Ok(c),
            None => self::census(state).await.map(Arc::new),
        }
    };
    let nomad = matches!(state.cluster.executor, ExecutorKind::Nomad);
    let (live, census, cluster, health) = tokio::join!(
        live(state),
        census_fut,
        cluster_view(&state.cluster),
        dispatcher::health::gather(&state.store, None, nomad)
    );
    let (live, census) = (live?, census?);
    let participants = participants(state, &census, &live.controls.raised_users).await?;
    let snapshot = Snapshot {
        generated_at: now_ms(),
        controls: live.controls,
        queue: live.queue,
        running: live.running,
        cluster,
        participants,
        metrics: census.metrics.clone(),
        recent: census.recent.clone(),
        health,
    };
    Ok((snapshot, census))
}

/// A complete, fresh snapshot.
pub async fn snapshot(state: &AppState) -> Result<Snapshot, ApiError> {
    Ok(build(state, None).await?.0)
}

/// `GET /admin/api/snapshot`.
async fn snapshot_handler(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut res = Json(snapshot(&state).await?).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

fn error_json(e: &ApiError) -> String {
    json!({ "error": { "message": e.to_string() }, "generated_at": now_ms() }).to_string()
}

// ---------------------------------------------------------------------------
// Live: the hub and the websocket
// ---------------------------------------------------------------------------

/// What an announced change needs rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kick {
    /// Progress of a job in flight: the queue and running tables.
    Light,
    /// Jobs changed state, or an admin action: everything.
    Full,
}

/// Follows Redis pub/sub and turns messages into kicks; resubscribes after
/// Redis drops the connection.
async fn listen(client: redis::Client, kicks: mpsc::Sender<Kick>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match subscribe(&client).await {
            Ok(mut pubsub) => {
                backoff = Duration::from_millis(250);
                // A reconnect may have missed changes.
                if kicks.send(Kick::Full).await.is_err() {
                    return;
                }
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let kick = if msg.get_channel_name().starts_with("cm:events:") {
                        let payload: String = msg.get_payload().unwrap_or_default();
                        let kind = serde_json::from_str::<Value>(&payload)
                            .ok()
                            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string));
                        match kind.as_deref() {
                            Some("progress" | "executing" | "progress_state" | "executed") => Kick::Light,
                            _ => Kick::Full,
                        }
                    } else {
                        Kick::Full
                    };
                    // A full channel means a rebuild is pending anyway.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = kicks.try_send(kick) {
                        return;
                    }
                }
                tracing::warn!("admin page: lost the Redis subscription; resubscribing");
            }
            Err(e) => tracing::warn!("admin page: cannot subscribe to Redis ({e}); retrying"),
        }
        if kicks.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&[WAKE_CHANNEL, STOP_CHANNEL, ADMIN_CHANNEL]).await?;
    pubsub.psubscribe("cm:events:*").await?;
    Ok(pubsub)
}

/// The hub: rebuilds the snapshot on kicks and ticks while a page is open.
///
/// The census (every job record) is retaken when jobs changed state (a full
/// kick, or a job entered or left the queue or the GPU), but at most every
/// ten times as long as the last one took, so a long workshop's thousands of
/// records never keep Redis busy; and at least every [`CENSUS_EVERY`].
async fn run_hub(state: AppState) {
    let hub = state.cluster.hub.clone();
    let (kick_tx, mut kick_rx) = mpsc::channel::<Kick>(256);
    tokio::spawn(listen(state.store.client().clone(), kick_tx));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut census: Option<Arc<Census>> = None;
    let mut recount = true;
    let mut last_ids: Option<(Vec<JobId>, Vec<JobId>)> = None;
    loop {
        let full = tokio::select! {
            _ = tick.tick() => false,
            kick = kick_rx.recv() => match kick {
                Some(kick) => {
                    tokio::time::sleep(DEBOUNCE).await;
                    let mut full = kick == Kick::Full;
                    while let Ok(k) = kick_rx.try_recv() {
                        full |= k == Kick::Full;
                    }
                    full
                }
                // The listener is gone (it never returns while we run): tick on.
                None => {
                    tick.tick().await;
                    false
                }
            },
        };
        recount |= full;
        if hub.tx.receiver_count() == 0 {
            continue;
        }
        let retake = match census.as_deref() {
            Some(Census { at: Some(at), took, .. }) => {
                let age = at.elapsed();
                age >= CENSUS_EVERY || (recount && age >= *took * 10)
            }
            _ => true,
        };
        let reuse = if retake { None } else { census.clone() };
        let text: Arc<str> = match build(&state, reuse).await {
            Ok((snap, c)) => {
                if retake {
                    recount = false;
                }
                census = Some(c);
                // A job that started or ended changes the counts.
                let ids = (snap.queue.iter().map(|q| q.id).collect(), snap.running.iter().map(|r| r.id).collect());
                recount |= last_ids.as_ref().is_some_and(|prev| *prev != ids);
                last_ids = Some(ids);
                match serde_json::to_string(&snap) {
                    Ok(t) => t.into(),
                    Err(e) => error_json(&ApiError::Internal(format!("cannot encode the snapshot: {e}"))).into(),
                }
            }
            Err(e) => {
                tracing::warn!("admin page: cannot build a snapshot: {e}");
                error_json(&e).into()
            }
        };
        hub.tx.send_if_modified(|cur| {
            if cur.as_deref() == Some(&*text) {
                false
            } else {
                *cur = Some(text);
                true
            }
        });
    }
}

/// A receiver of the hub's snapshots; starts the hub on first use.
fn hub_receiver(state: &AppState) -> watch::Receiver<Option<Arc<str>>> {
    let hub = &state.cluster.hub;
    let rx = hub.tx.subscribe();
    hub.started.get_or_init(|| {
        tokio::spawn(run_hub(state.clone()));
    });
    rx
}

/// `GET /admin/ws`: the live snapshot.
async fn websocket(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    crate::auth::same_origin(&headers, "the admin API")?;
    Ok(ws.on_upgrade(move |socket| serve_socket(socket, state, headers)))
}

async fn serve_socket(mut socket: WebSocket, state: AppState, headers: HeaderMap) {
    let _open = dispatcher::metrics::OpenSocket::new("admin");
    let mut rx = hub_receiver(&state);
    let first = match snapshot(&state).await {
        Ok(s) => serde_json::to_string(&s).unwrap_or_else(|e| error_json(&ApiError::Internal(e.to_string()))),
        Err(e) => error_json(&e),
    };
    rx.mark_unchanged();
    if !crate::ws::send_counted(&mut socket, Message::Text(first.into()), "admin").await {
        return;
    }
    let mut reauth = tokio::time::interval_at(tokio::time::Instant::now() + REAUTH_EVERY, REAUTH_EVERY);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let text = rx.borrow_and_update().clone();
                if let Some(text) = text {
                    if !crate::ws::send_counted(&mut socket, Message::Text(text.to_string().into()), "admin").await {
                        break;
                    }
                }
            }
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
            _ = reauth.tick() => {
                if let Err(e) = state.auth.admin(&headers).await {
                    if matches!(e, ApiError::Unauthorized(_)) {
                        let _ = socket
                            .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                                code: 4401,
                                reason: "log in again at /admin/login".into(),
                            })))
                            .await;
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_optional_and_strict() {
        let empty: PauseBody = body(&Bytes::from_static(b"")).unwrap();
        assert!(empty.reason.is_none());
        assert!(body::<LimitsBody>(&Bytes::from_static(b"{\"max_qeue\": 3}")).is_err());
        let l: LimitsBody = body(&Bytes::from_static(b"{\"max_queue\": 3}")).unwrap();
        assert_eq!(l.max_queue, Some(3));
    }
}
