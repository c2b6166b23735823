//! The internal API that gpu-task calls (contract: `dispatcher::contract::internal`).
//!
//! Participants never reach it: every call must carry the shared secret. The
//! job id in the path is the comfy-multi job id; ComfyUI's own prompt ids in
//! relayed messages are rewritten to it, so the editor only ever sees the ids
//! it was given.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use dispatcher::contract::{self, Finished, OutputQuery, WorkflowPayload, INTERNAL_SECRET_HEADER};
use dispatcher::health::{self, Component};
use dispatcher::job::{FileRef, Job, JobState};
use dispatcher::queue::{Patch, QueueError};
use dispatcher::JobId;
use serde_json::Value;

use crate::auth::{bearer, constant_time_eq};
use crate::error::ApiError;
use crate::state::AppState;

/// The largest preview frame accepted (ComfyUI's previews are small JPEGs).
pub const MAX_PREVIEW_BYTES: usize = 8 * 1024 * 1024;

/// A request that carries the internal secret.
pub struct Internal;

impl FromRequestParts<AppState> for Internal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let given = parts
            .headers
            .get(INTERNAL_SECRET_HEADER)
            .and_then(|v| v.to_str().ok())
            .or_else(|| bearer(parts))
            .unwrap_or_default();
        if !given.is_empty() && constant_time_eq(given.as_bytes(), state.internal_secret.as_bytes()) {
            Ok(Internal)
        } else {
            Err(ApiError::Unauthorized(format!(
                "the internal API needs the shared secret in the {INTERNAL_SECRET_HEADER} header (INTERNAL_SECRET)"
            )))
        }
    }
}

/// The internal routes.
pub fn routes(state: &AppState) -> Router<AppState> {
    let p = contract::internal::PREFIX;
    Router::new()
        .route(&format!("{p}/jobs/{{id}}/workflow"), get(workflow))
        .route(&format!("{p}/jobs/{{id}}/started"), post(started))
        .route(&format!("{p}/jobs/{{id}}/events"), post(events))
        .route(
            &format!("{p}/jobs/{{id}}/outputs"),
            put(output).layer(axum::extract::DefaultBodyLimit::max(state.limits.max_output_bytes)),
        )
        .route(
            &format!("{p}/jobs/{{id}}/preview"),
            post(preview).layer(axum::extract::DefaultBodyLimit::max(MAX_PREVIEW_BYTES)),
        )
        .route(&format!("{p}/jobs/{{id}}/finished"), post(finished))
        .route(&format!("{p}/jobs/{{id}}/inputs/{{reference}}"), get(input))
        .route_layer(axum::middleware::from_fn(in_job_span))
}

/// Every internal call is about one job: what it logs is in the job's span
/// (`dispatcher::job_span!`), its `user_id` filled in once the job is read.
async fn in_job_span(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use tracing::Instrument;
    let prefix = format!("{}/jobs/", contract::internal::PREFIX);
    let id = request.uri().path().strip_prefix(&prefix).and_then(|rest| rest.split('/').next()).unwrap_or_default();
    let span = tracing::info_span!("job", job_id = %id, user_id = tracing::field::Empty);
    next.run(request).instrument(span).await
}

async fn job(state: &AppState, id: &str) -> Result<Job, ApiError> {
    let parsed: JobId = id.parse().map_err(|_| ApiError::NotFound(format!("no job {id:?}")))?;
    let job = state.store.get(&parsed).await?.ok_or_else(|| ApiError::NotFound(format!("no job {id}")))?;
    tracing::Span::current().record("user_id", tracing::field::display(job.user));
    Ok(job)
}

fn require_in_flight(job: &Job) -> Result<(), ApiError> {
    if job.state.is_in_flight() {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!("job {} is {}, not in flight", job.id, job.state)))
    }
}

/// `GET workflow`: what gpu-task runs when the payload did not fit Nomad's limit.
async fn workflow(_: Internal, State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<WorkflowPayload>, ApiError> {
    let job = job(&state, &id).await?;
    require_in_flight(&job)?;
    Ok(Json(WorkflowPayload::from_job(job.workflow, job.extra_data)))
}

/// `GET inputs/{reference}`: one of the job's user's files its prompt refers
/// to (listed at submit time in the job's inputs; nothing else).
async fn input(
    _: Internal,
    State(state): State<AppState>,
    Path((id, reference)): Path<(String, String)>,
    request: axum::extract::Request,
) -> Result<axum::response::Response, ApiError> {
    let job = job(&state, &id).await?;
    require_in_flight(&job)?;
    let listed = job
        .extra_data
        .get(contract::INPUTS_EXTRA_DATA_KEY)
        .and_then(Value::as_array)
        .is_some_and(|list| list.iter().any(|v| v.as_str() == Some(reference.as_str())));
    if !listed {
        return Err(ApiError::NotFound(format!("job {} refers to no input {reference:?}", job.id)));
    }
    let path = crate::editor_api::resolve_reference(&state.files, job.user, &reference)?;
    crate::editor_api::serve_file(path, request.uri().clone()).await
}

/// `POST started`: the job is running. Idempotent.
async fn started(_: Internal, State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let job = job(&state, &id).await?;
    match job.state {
        JobState::Running => Ok(StatusCode::NO_CONTENT),
        _ => {
            // A new run: what an earlier one held back for the editor is stale.
            crate::ws::job_started(&state, &job).await?;
            state.store.transition(&job.id, JobState::Running, Patch::default()).await?;
            tracing::info!(attempt = job.attempts, "gpu-task started the job");
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// `POST events`: a ComfyUI websocket message to relay to the user's editors.
async fn events(
    _: Internal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(mut message): Json<Value>,
) -> Result<StatusCode, ApiError> {
    let job = job(&state, &id).await?;
    require_in_flight(&job)?;
    if !message.get("type").is_some_and(Value::is_string) {
        return Err(ApiError::bad_request("invalid_event", "an event is {\"type\": ..., \"data\": {...}}"));
    }
    retag(message.get_mut("data"), &job.id);
    if let Some(progress) = progress_of(&message) {
        state.store.set_progress(&job.id, &progress).await?;
    }
    // To the participant's editors (`crate::ws`), or held back until the
    // outputs it names are uploaded.
    crate::ws::relay(&state, &job, message).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST preview`: a binary preview frame from ComfyUI's websocket (type 1,
/// or type 4 with its `prompt_id` rewritten to the job id) for the user's
/// editors, as a binary websocket frame (`crate::ws`).
async fn preview(
    _: Internal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let job = job(&state, &id).await?;
    require_in_flight(&job)?;
    let frame = retag_preview(&body, &job.id)?;
    crate::ws::relay_preview(&state, &job, &frame).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A preview frame for the editor: type 1 as is, type 4 with the job id as
/// `prompt_id` in its metadata. Other frames are refused.
fn retag_preview(frame: &[u8], job: &JobId) -> Result<Vec<u8>, ApiError> {
    let invalid = |why: String| {
        ApiError::bad_request("invalid_preview", format!("{why}: a preview is a ComfyUI binary frame of type 1 or 4"))
    };
    let word = |at: usize| frame.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match word(0) {
        Some(1) if frame.len() > 8 => Ok(frame.to_vec()),
        Some(4) => {
            let len = word(4).ok_or_else(|| invalid("no metadata length".into()))? as usize;
            let end = 8usize.saturating_add(len);
            let meta = frame.get(8..end).ok_or_else(|| invalid("metadata longer than the frame".into()))?;
            let mut meta: Value =
                serde_json::from_slice(meta).map_err(|e| invalid(format!("metadata is not JSON ({e})")))?;
            let Some(fields) = meta.as_object_mut() else { return Err(invalid("metadata is not an object".into())) };
            fields.insert("prompt_id".into(), Value::String(job.to_string()));
            let meta = meta.to_string().into_bytes();
            let mut out = Vec::with_capacity(8 + meta.len() + frame.len() - end);
            out.extend_from_slice(&4u32.to_be_bytes());
            out.extend_from_slice(&(meta.len() as u32).to_be_bytes());
            out.extend_from_slice(&meta);
            out.extend_from_slice(&frame[end..]);
            Ok(out)
        }
        Some(kind) => Err(invalid(format!("type {kind}, or no image"))),
        None => Err(invalid("too short".into())),
    }
}

/// `PUT outputs`: one output file (`type=output`, the default) or temp
/// preview (`type=temp`). Idempotent per (node, kind, index).
async fn output(
    _: Internal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let job = job(&state, &id).await?;
    require_in_flight(&job)?;
    crate::files::safe_name(&q.kind)?;
    state.files.store_output(job.user, &q.folder_type, &job.id, &q.filename, &body).await?;
    let file = FileRef { filename: q.filename.clone(), subfolder: job.id.to_string(), kind: q.folder_type.clone() };
    if state.store.add_output(&job.id, &q.node, &q.kind, q.index, &file).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Conflict(format!("job {} ended before its output {} arrived", job.id, q.filename)))
    }
}

/// `POST finished`: gpu-task's final report. A `retryable` failure does not
/// end the job: its reason is noted for the dispatcher, which decides.
async fn finished(
    _: Internal,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(report): Json<Finished>,
) -> Result<StatusCode, ApiError> {
    let job = job(&state, &id).await?;
    // What gpu-task saw of ComfyUI, for `/healthz` and the admin page.
    let comfyui = match (&report.retryable, report.success) {
        (_, true) => Some(Ok(())),
        (true, false) => Some(Err(report.error.clone().unwrap_or_else(|| "unreachable".into()))),
        _ => None,
    };
    if let Some(result) = comfyui {
        if let Err(e) = health::record(&state.store, Component::Comfyui, result).await {
            tracing::warn!("cannot record ComfyUI's health: {e}");
        }
    }
    if report.retryable && !report.success && !job.cancel_requested {
        // Not the job's end: the dispatcher runs it again or fails it, with this reason.
        let reason = report.error.unwrap_or_else(|| "gpu-task could not do the job".into());
        tracing::warn!(job = %job.id, "run could not do the job, the dispatcher decides: {reason}");
        state.store.note_run_error(&job.id, &reason).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    let mut messages = report.messages;
    for m in &mut messages {
        if let Some(pair) = m.as_array_mut() {
            retag(pair.get_mut(1), &job.id);
        }
    }
    let (to, error) = if report.success {
        (JobState::Succeeded, None)
    } else if job.cancel_requested {
        (JobState::Cancelled, Some("cancelled".into()))
    } else {
        (JobState::Failed, Some(report.error.unwrap_or_else(|| "gpu-task reported a failure".into())))
    };
    // What the editor was not told yet goes out before the end (`crate::ws`).
    crate::ws::release(&state, &job, to == JobState::Succeeded).await?;
    let patch = Patch { error: error.clone(), messages: Some(messages), ..Patch::default() };
    // A report for a job that already ended the same way is a retry: fine.
    match state.store.transition(&job.id, to, patch).await {
        Ok(_) => {
            dispatcher::metrics::job_ended(&job, to, dispatcher::job::now_ms());
            tracing::info!(state = %to, error = error.as_deref().unwrap_or(""), "gpu-task reported the end");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(QueueError::Transition { from, .. }) if from == to => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(e.into()),
    }
}

/// What the instructor sees of a progress message: the node, and the step
/// for samplers (`progress`), from `executing` and `progress`.
fn progress_of(message: &Value) -> Option<Value> {
    let data = message.get("data")?;
    match message.get("type")?.as_str()? {
        "executing" if !data.get("node")?.is_null() => {
            Some(serde_json::json!({ "node": data["node"], "value": null, "max": null }))
        }
        "progress" => Some(serde_json::json!({ "node": data["node"], "value": data["value"], "max": data["max"] })),
        _ => None,
    }
}

/// Rewrites ComfyUI's `prompt_id` in a message's data to the job id.
fn retag(data: Option<&mut Value>, job: &JobId) {
    if let Some(Value::Object(data)) = data {
        if data.contains_key("prompt_id") {
            data.insert("prompt_id".into(), Value::String(job.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_carry_the_job_id() {
        let job = JobId::new_v4();
        let meta = br#"{"node_id":"3","prompt_id":"comfy-own","image_type":"image/png"}"#;
        let mut frame = 4u32.to_be_bytes().to_vec();
        frame.extend((meta.len() as u32).to_be_bytes());
        frame.extend(meta);
        frame.extend(b"PNGDATA");
        let out = retag_preview(&frame, &job).unwrap();
        assert_eq!(&out[..4], &4u32.to_be_bytes());
        let len = u32::from_be_bytes(out[4..8].try_into().unwrap()) as usize;
        let meta: Value = serde_json::from_slice(&out[8..8 + len]).unwrap();
        assert_eq!(meta["prompt_id"], job.to_string());
        assert_eq!(meta["node_id"], "3");
        assert_eq!(&out[8 + len..], b"PNGDATA");

        let mut one = 1u32.to_be_bytes().to_vec();
        one.extend(1u32.to_be_bytes());
        one.extend(b"JPEG");
        assert_eq!(retag_preview(&one, &job).unwrap(), one);
        assert!(retag_preview(&one[..8], &job).is_err());
        assert!(retag_preview(&[0, 0, 0, 2, 1, 2, 3, 4, 5], &job).is_err());
        assert!(retag_preview(&frame[..12], &job).is_err());
        assert!(retag_preview(&[0, 0, 0, 4, 255, 255, 255, 255], &job).is_err());
    }
}
