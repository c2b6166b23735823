//! The ComfyUI server API, per participant, under `/user/{n}/`.
//!
//! Every route exists at `/user/{n}/api/X` and `/user/{n}/X`, as ComfyUI
//! registers both. Handlers stay thin: authenticate ([`Participant`]), check,
//! then one call into the job store; answers have ComfyUI's shapes (see
//! `shared/comfyui-api.md`). A participant only ever sees their own jobs and
//! files: anything else is answered 404, exactly as if it did not exist.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dispatcher::job::{Job, JobState};
use dispatcher::queue::{Cancelled, NewJob};
use dispatcher::JobId;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use crate::auth::Participant;
use crate::error::{read_body, ApiError, JsonBody};
use crate::state::AppState;
use crate::validate;

/// Keys ComfyUI strips from `extra_data` before storing it.
const SENSITIVE_EXTRA_DATA: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];

/// The per-user routes.
pub fn routes(_state: &AppState) -> Router<AppState> {
    let mut router = Router::new();
    for prefix in ["/user/{n}/api", "/user/{n}"] {
        router = router
            .route(&format!("{prefix}/prompt"), post(submit).get(prompt_status))
            .route(&format!("{prefix}/history"), get(history))
            .route(&format!("{prefix}/history/{{id}}"), get(history_one))
            .route(&format!("{prefix}/view"), get(view))
            .route(&format!("{prefix}/queue"), get(queue).post(queue_delete))
            .route(&format!("{prefix}/interrupt"), post(interrupt))
            .route(&format!("{prefix}/jobs/{{id}}/cancel"), post(cancel_one))
            .route(&format!("{prefix}/jobs/cancel"), post(cancel_many));
    }
    router.route("/user/{n}/_gw/queue", get(positions))
}

/// `POST /prompt`: validate, then queue a job; counted in the metrics
/// either way.
async fn submit(
    Participant(user): Participant,
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let result = queue_prompt(user, &state, request).await;
    match &result {
        Ok(_) => dispatcher::metrics::submitted(),
        Err(e) => dispatcher::metrics::rejected(e.kind()),
    }
    result
}

async fn queue_prompt(user: u32, state: &AppState, request: Request) -> Result<Json<Value>, ApiError> {
    let limit = state.limits.max_workflow_bytes;
    let bytes = read_body(request.into_body(), limit, || {
        ApiError::TooLarge(format!("the request is larger than the {limit}-byte limit for a workflow"))
    })
    .await?;
    let mut body: Value = serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid_json(&e))?;
    let Some(body) = body.as_object_mut() else {
        return Err(ApiError::bad_request("invalid_prompt", "the request body must be a JSON object"));
    };
    let Some(prompt) = body.remove("prompt") else {
        return Err(ApiError::bad_request("no_prompt", "No prompt provided"));
    };
    validate::prompt(&prompt, state.editor.comfy().node_types().await.as_deref())?;
    let mut extra_data = match body.remove("extra_data") {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for key in SENSITIVE_EXTRA_DATA {
        extra_data.remove(key);
    }
    if let Some(client_id) = body.get("client_id").filter(|v| v.is_string()) {
        extra_data.insert("client_id".into(), client_id.clone());
    }
    // The participant's files the prompt refers to, for gpu-task to fetch.
    let inputs = crate::editor_api::referenced_inputs(&state.files, user, &prompt);
    extra_data.remove(dispatcher::contract::INPUTS_EXTRA_DATA_KEY);
    if !inputs.is_empty() {
        extra_data.insert(dispatcher::contract::INPUTS_EXTRA_DATA_KEY.into(), json!(inputs));
    }
    let job = state
        .store
        .submit(NewJob { user, workflow: prompt, extra_data: Value::Object(extra_data), priority: 0 })
        .await?;
    dispatcher::job_span!(job.id, user).in_scope(|| tracing::info!(number = job.number, "queued"));
    Ok(Json(json!({ "prompt_id": job.id, "number": job.number, "node_errors": {} })))
}

/// `GET /prompt`: the user's own jobs still to finish.
async fn prompt_status(Participant(user): Participant, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let remaining = state.store.user_pending(user).await?;
    Ok(Json(json!({ "exec_info": { "queue_remaining": remaining } })))
}

/// `GET /queue`: the user's own running and pending jobs.
async fn queue(Participant(user): Participant, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut jobs = state.store.user_unfinished(user).await?;
    jobs.reverse();
    let tuple = |j: &Job| json!([j.number, j.id, j.workflow, j.extra_data, output_nodes(j)]);
    let running: Vec<Value> = jobs.iter().filter(|j| j.state.is_in_flight()).map(tuple).collect();
    let pending: Vec<Value> = jobs.iter().filter(|j| j.state == JobState::Queued).map(tuple).collect();
    Ok(Json(json!({ "queue_running": running, "queue_pending": pending })))
}

#[derive(Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
}

/// `GET /history`: the user's own finished jobs, newest first.
async fn history(
    Participant(user): Participant,
    State(state): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let max = q.max_items.unwrap_or(200).min(1000);
    let jobs = state.store.user_jobs(user, 1000).await?;
    let entries: Map<String, Value> = jobs
        .iter()
        .filter(|j| j.state.is_terminal())
        .take(max)
        .map(|j| (j.id.to_string(), history_entry(j)))
        .collect();
    Ok(Json(Value::Object(entries)))
}

/// `GET /history/{id}`: one of the user's jobs; `{}` while it has not finished.
async fn history_one(
    Participant(user): Participant,
    State(state): State<AppState>,
    Path((_n, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let job = own_job(&state, user, &id).await?;
    if !job.state.is_terminal() {
        return Ok(Json(json!({})));
    }
    Ok(Json(json!({ job.id.to_string(): history_entry(&job) })))
}

/// The job `id` if it belongs to `user`; 404 otherwise, whether it exists or not.
pub async fn own_job(state: &AppState, user: u32, id: &str) -> Result<Job, ApiError> {
    let not_found = || ApiError::NotFound(format!("no job {id:?}"));
    let id: JobId = id.parse().map_err(|_| not_found())?;
    match state.store.get(&id).await? {
        Some(job) if job.user == user => Ok(job),
        _ => Err(not_found()),
    }
}

#[derive(Deserialize)]
struct ViewQuery {
    #[serde(default)]
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(rename = "type", default = "output_type")]
    kind: String,
}

fn output_type() -> String {
    "output".into()
}

/// `GET /view`: one of the user's own files.
async fn view(
    Participant(user): Participant,
    State(state): State<AppState>,
    Query(q): Query<ViewQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let path = state.files.resolve(user, &q.kind, &q.subfolder, &q.filename)?;
    let request = Request::builder().uri(request.uri()).body(Body::empty()).expect("request");
    let response = tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read file: {e}")))?;
    Ok(response.into_response())
}

/// The ids of the nodes that produced outputs.
fn output_nodes(job: &Job) -> Vec<String> {
    job.outputs.keys().cloned().collect()
}

/// A finished job in ComfyUI's history shape.
pub fn history_entry(job: &Job) -> Value {
    let success = job.state == JobState::Succeeded;
    let messages = if job.messages.is_empty() {
        synthesized_messages(job)
    } else {
        Value::Array(job.messages.clone())
    };
    let meta: Map<String, Value> = job
        .outputs
        .keys()
        .map(|node| {
            (node.clone(), json!({ "node_id": node, "display_node": node, "parent_node": null, "real_node_id": node }))
        })
        .collect();
    json!({
        "prompt": [job.number, job.id, job.workflow, job.extra_data, output_nodes(job)],
        "outputs": job.outputs,
        "status": {
            "status_str": if success { "success" } else { "error" },
            "completed": success,
            "messages": messages,
        },
        "meta": meta,
    })
}

/// History messages for a job gpu-task could not report on (e.g. cancelled
/// before it started, or failed to reach ComfyUI).
fn synthesized_messages(job: &Job) -> Value {
    let id = job.id.to_string();
    let mut messages = Vec::new();
    if let Some(t) = job.started_at {
        messages.push(json!(["execution_start", { "prompt_id": id, "timestamp": t }]));
    }
    let end = job.finished_at.unwrap_or(job.created_at);
    match job.state {
        JobState::Succeeded => messages.push(json!(["execution_success", { "prompt_id": id, "timestamp": end }])),
        JobState::Cancelled => messages.push(json!(["execution_interrupted", {
            "prompt_id": id, "node_id": null, "node_type": null, "executed": [], "timestamp": end
        }])),
        _ => messages.push(json!(["execution_error", {
            "prompt_id": id, "node_id": null, "node_type": null, "executed": [],
            "exception_message": job.error.clone().unwrap_or_default(),
            "exception_type": "comfy_multi.JobFailed", "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": end
        }])),
    }
    Value::Array(messages)
}

#[derive(Deserialize, Default)]
struct QueueEdit {
    #[serde(default)]
    delete: Vec<String>,
    #[serde(default)]
    clear: bool,
}

/// `POST /queue {delete: [ids]} | {clear: true}`: cancels the user's own
/// waiting jobs (others' ids are ignored, as if they did not exist).
async fn queue_delete(
    Participant(user): Participant,
    State(state): State<AppState>,
    JsonBody(edit): JsonBody<QueueEdit>,
) -> Result<Json<Value>, ApiError> {
    let ids: Vec<String> = if edit.clear {
        let jobs = state.store.user_unfinished(user).await?;
        jobs.iter().filter(|j| j.state == JobState::Queued).map(|j| j.id.to_string()).collect()
    } else {
        edit.delete
    };
    for id in ids {
        if let Ok(job) = own_job(&state, user, &id).await {
            if job.state == JobState::Queued {
                state.store.cancel(&job.id, Some(user)).await?;
            }
        }
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
struct InterruptBody {
    prompt_id: Option<String>,
}

/// `POST /interrupt {prompt_id?}`: stops the user's own running job (that
/// one, or whichever runs). Never anyone else's.
async fn interrupt(
    Participant(user): Participant,
    State(state): State<AppState>,
    body: Option<JsonBody<InterruptBody>>,
) -> Result<Json<Value>, ApiError> {
    let wanted = body.and_then(|JsonBody(b)| b.prompt_id);
    let targets: Vec<Job> = match wanted {
        Some(id) => vec![own_job(&state, user, &id).await?],
        None => state.store.user_unfinished(user).await?.into_iter().filter(|j| j.state.is_in_flight()).collect(),
    };
    for job in targets.iter().filter(|j| j.state.is_in_flight()) {
        state.store.cancel(&job.id, Some(user)).await?;
    }
    Ok(Json(json!({})))
}

/// `POST /jobs/{id}/cancel`: `{cancelled: bool}`; idempotent.
async fn cancel_one(
    Participant(user): Participant,
    State(state): State<AppState>,
    Path((_n, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let job = own_job(&state, user, &id).await?;
    let outcome = state.store.cancel(&job.id, Some(user)).await?;
    Ok(Json(json!({ "cancelled": cancelled(&outcome) })))
}

#[derive(Deserialize)]
struct CancelMany {
    job_ids: Vec<String>,
}

/// `POST /jobs/cancel {job_ids}`: cancels those that are the user's.
async fn cancel_many(
    Participant(user): Participant,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CancelMany>,
) -> Result<Json<Value>, ApiError> {
    let mut any = false;
    for id in body.job_ids {
        if let Ok(job) = own_job(&state, user, &id).await {
            any |= cancelled(&state.store.cancel(&job.id, Some(user)).await?);
        }
    }
    Ok(Json(json!({ "cancelled": any })))
}

fn cancelled(outcome: &Cancelled) -> bool {
    matches!(outcome, Cancelled::Removed | Cancelled::Stopping | Cancelled::AlreadyEnded(JobState::Cancelled))
}

/// `GET /user/{n}/_gw/queue`: where the user's waiting jobs stand and how
/// long they may wait (see `dispatcher::estimate` for how).
pub async fn positions(Participant(user): Participant, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let places = dispatcher::estimate::places(&state.store, state.slots).await?;
    let total = places.len();
    let mine: Vec<_> = places.into_iter().filter(|p| p.user == user).collect();
    Ok(Json(json!({ "queued_total": total, "jobs": mine })))
}
