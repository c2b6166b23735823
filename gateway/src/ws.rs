//! The editor's websocket, `GET /user/{n}/ws?clientId=…`, as ComfyUI speaks it
//! (`shared/comfyui-api.md` A.5, B.3, 9.2), scoped to participant n.
//!
//! # Protocol
//!
//! - **Who**: the [`Participant`] extractor, before the upgrade: the
//!   `cm_session` cookie (what a browser sends; it cannot set headers on a
//!   websocket), or the access code as bearer for other clients. No or wrong
//!   credentials: 401 and no upgrade. A request whose `Origin` names another
//!   host is refused (403). Every [`REAUTH_EVERY`] the credentials are checked
//!   again; a revoked session or a disabled participant closes the socket
//!   (code 4401).
//! - **Client ids** are the gateway's: the `clientId` the client asks for is
//!   kept only if this gateway issued it to the same participant (see
//!   [`ClientIds`]); anything else (none, made up, another participant's) is
//!   replaced by a fresh one. ComfyUI's own ids are never shown.
//! - **On connect**: `{"type":"status","data":{"status":{"exec_info":
//!   {"queue_remaining":R}},"sid":"<id>"}}`, R being the participant's own
//!   queued + running jobs ([`dispatcher::queue::Store::user_pending`]).
//! - **Client → server**: only the first text message counts: if it is
//!   `{"type":"feature_flags",…}` it is answered with [`SERVER_FEATURES`], as
//!   ComfyUI does. Everything else is ignored.
//! - **Execution messages**: every message gpu-task relayed for one of the
//!   participant's jobs (`execution_start`, `execution_cached`, `executing`,
//!   `progress`, `progress_state`, `executed`, `execution_success`,
//!   `execution_error`, `execution_interrupted`, …), in the order gpu-task
//!   relayed them, with `prompt_id` = the job id (the `prompt_id` the editor
//!   got from `POST /prompt`). Only the participant's own: other
//!   participants' never reach the socket.
//! - **`status`** (no `sid`, the participant's own count) whenever their
//!   queue changes: a submit or requeue (`cm:wake`), a job's start (sent just
//!   before its `execution_start`, like ComfyUI) and a job's end
//!   ([`JOB_ENDED_EVENT`], published by the queue in the same atomic step as
//!   the end).
//! - **The end of a prompt** always reaches the editor: when a job ends and
//!   gpu-task did not relay its verdict (`execution_success` /
//!   `execution_error` / `execution_interrupted`) or the final `executing`
//!   with `node: null` — it crashed, never started, was cancelled while
//!   queued for a GPU, failed to upload its outputs — the gateway sends them,
//!   from the job record (`execution_error` carries the job's error).
//!
//! - **Binary previews** (types 1 and 4, `shared/comfyui-api.md` 9.2) of the
//!   participant's running job, as gpu-task posted them (best effort, so
//!   some may be missing), type 4 with `prompt_id` = the job id. They are
//!   never held back.
//!
//! Not (yet) sent: the `executing` ComfyUI sends on connect to the client
//! whose prompt runs.
//!
//! # Outputs in `executed`
//!
//! ComfyUI's `executed` names the file as ComfyUI saved it (`subfolder: ""`);
//! the gateway serves it under `subfolder=<job id>` once gpu-task has uploaded
//! it, which happens after the prompt ended. So an `executed` that lists
//! saved outputs or temp previews (`type: "temp"`, from `PreviewImage`) is
//! rewritten to the gateway's names, and from it on the
//! job's messages are held back (in Redis, `cm:job:<id>:held`) until
//! gpu-task's final report: on success they are released in order (the
//! files are there by then), on failure the `executed` and
//! `execution_success` are dropped and the failure is reported instead. The
//! editor therefore never asks for a file that is not there yet.
//!
//! # Fan-out
//!
//! One Redis pub/sub connection per gateway ([`Events`], started by the
//! first socket) psubscribes `cm:events:*` and subscribes `cm:wake`; it hands
//! each participant's messages to their open sockets (a preview travels as
//! a [`PREVIEW_EVENT`] envelope, its frame in base64, and leaves as a binary
//! frame) through one in-memory
//! `tokio::sync::broadcast` channel per participant. A socket is a receiver
//! of its participant's channel only, so routing is by construction.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use base64::Engine;
use dispatcher::job::{now_ms, Job, JobId};
use dispatcher::queue::{events_channel, JOB_ENDED_EVENT, WAKE_CHANNEL};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use crate::auth::Participant;
use crate::error::ApiError;
use crate::state::AppState;

/// What the server answers to the client's `feature_flags`: the same as
/// `GET /features` (ComfyUI v0.3.64's, `shared/comfyui-samples/get-features.json`).
pub fn server_features() -> Value {
    json!({ "supports_preview_metadata": true, "max_upload_size": crate::editor_api::MAX_UPLOAD_BYTES })
}

/// How often an open socket's credentials are checked again.
pub const REAUTH_EVERY: Duration = Duration::from_secs(30);
/// Messages a participant's channel buffers for a slow socket.
const CHANNEL_CAPACITY: usize = 1024;
/// Client ids remembered per participant (the oldest are forgotten).
const IDS_PER_USER: usize = 32;
/// How long held-back messages of a job stay in Redis at most.
const HELD_TTL_SECS: i64 = 24 * 3600;
/// Read buffer of a socket: the editor sends next to nothing (one
/// `feature_flags`), and 100 sockets with the default 128 KiB each would
/// cost megabytes.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// How long a new socket waits for the Redis subscription to be in place.
const READY_WAIT: Duration = Duration::from_secs(5);
/// `type` of the Redis envelope that carries a binary preview frame
/// (`{"type": PREVIEW_EVENT, "data": "<base64 of the frame>"}`); it reaches
/// the socket as that binary frame, never as text.
pub const PREVIEW_EVENT: &str = "cm_preview";
/// Job fields noting what gpu-task relayed of a prompt's end.
const VERDICT_FIELD: &str = "ws_verdict";
const END_FIELD: &str = "ws_end";

/// The participant websocket's route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/user/{n}/ws", get(websocket))
}

// ---------------------------------------------------------------------------
// Client ids
// ---------------------------------------------------------------------------

/// The client ids this gateway issued, and to whom. A client may keep its id
/// across reconnects (the editor keeps it in `window.name`), but never use
/// one issued to somebody else.
#[derive(Default)]
pub struct ClientIds {
    owner: HashMap<String, u32>,
    by_user: HashMap<u32, VecDeque<String>>,
}

impl ClientIds {
    /// `wanted` if it was issued to `user`, else a fresh id for `user`.
    pub fn assign(&mut self, user: u32, wanted: Option<&str>) -> String {
        let ids = self.by_user.entry(user).or_default();
        if let Some(w) = wanted.filter(|w| self.owner.get(*w) == Some(&user)) {
            if let Some(i) = ids.iter().position(|id| id == w) {
                let id = ids.remove(i).expect("position is in range");
                ids.push_back(id);
            }
            return w.to_string();
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        ids.push_back(id.clone());
        self.owner.insert(id.clone(), user);
        while ids.len() > IDS_PER_USER {
            if let Some(old) = ids.pop_front() {
                self.owner.remove(&old);
            }
        }
        id
    }
}

// ---------------------------------------------------------------------------
// Fan-out
// ---------------------------------------------------------------------------

/// The gateway's one subscription to Redis and its per-participant channels.
/// Cheap to clone.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    users: Mutex<HashMap<u32, broadcast::Sender<Message>>>,
    clients: Mutex<ClientIds>,
    started: OnceLock<()>,
    /// `true` while the Redis subscription is in place.
    ready: watch::Sender<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            inner: Arc::new(Inner {
                users: Mutex::new(HashMap::new()),
                clients: Mutex::new(ClientIds::default()),
                started: OnceLock::new(),
                ready: watch::channel(false).0,
            }),
        }
    }
}

impl Events {
    /// The client id for a socket of `user` that asked for `wanted`.
    pub fn client_id(&self, user: u32, wanted: Option<&str>) -> String {
        self.inner.clients.lock().expect("client ids lock").assign(user, wanted)
    }

    /// A receiver of everything for `user`'s sockets from now on.
    pub fn subscribe(&self, user: u32) -> broadcast::Receiver<Message> {
        let mut users = self.inner.users.lock().expect("users lock");
        users.entry(user).or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0).subscribe()
    }

    /// Whether `user` has a socket on this gateway.
    fn listening(&self, user: u32) -> bool {
        self.inner.users.lock().expect("users lock").get(&user).is_some_and(|tx| tx.receiver_count() > 0)
    }

    /// Whether any participant has a socket on this gateway.
    fn any_listening(&self) -> bool {
        self.inner.users.lock().expect("users lock").values().any(|tx| tx.receiver_count() > 0)
    }

    /// Participants with a socket on this gateway.
    fn local_users(&self) -> Vec<u32> {
        let mut users = self.inner.users.lock().expect("users lock");
        users.retain(|_, tx| tx.receiver_count() > 0);
        users.keys().copied().collect()
    }

    /// Hands `frame` to `user`'s sockets.
    fn send(&self, user: u32, frame: Message) {
        if let Some(tx) = self.inner.users.lock().expect("users lock").get(&user) {
            let _ = tx.send(frame);
        }
    }

    /// Starts the Redis subscription (once) and waits until it is in place
    /// (at most [`READY_WAIT`]: a socket opens even while Redis is away).
    async fn ensure_listening(&self, state: &AppState) {
        self.inner.started.get_or_init(|| {
            tokio::spawn(listen(state.clone()));
        });
        let mut ready = self.inner.ready.subscribe();
        let _ = tokio::time::timeout(READY_WAIT, ready.wait_for(|r| *r)).await;
    }
}

/// What a participant's own `status` message says.
fn status_message(remaining: u64, sid: Option<&str>) -> String {
    let mut data = json!({ "status": { "exec_info": { "queue_remaining": remaining } } });
    if let Some(sid) = sid {
        data["sid"] = json!(sid);
    }
    json!({ "type": "status", "data": data }).to_string()
}

/// Sends `user`'s sockets a fresh `status`.
async fn send_status(state: &AppState, user: u32) {
    match state.store.user_pending(user).await {
        Ok(remaining) => state.events.send(user, status_message(remaining, None).into()),
        Err(e) => tracing::warn!(user, error = %e, "cannot count the participant's jobs for a status message"),
    }
}

/// The subscription: follows Redis and fans out; resubscribes after Redis
/// drops the connection.
async fn listen(state: AppState) {
    let client = state.store.client().clone();
    let mut backoff = Duration::from_millis(250);
    loop {
        match subscribe(&client).await {
            Ok(mut pubsub) => {
                backoff = Duration::from_millis(250);
                state.events.inner.ready.send_replace(true);
                // A resubscription may have missed changes.
                for user in state.events.local_users() {
                    send_status(&state, user).await;
                }
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let payload: String = match msg.get_payload() {
                        Ok(p) => p,
                        Err(_) => continue,
                    };
                    on_message(&state, msg.get_channel_name(), payload).await;
                }
                state.events.inner.ready.send_replace(false);
                tracing::warn!("editor websockets: lost the Redis subscription; resubscribing");
            }
            Err(e) => tracing::warn!("editor websockets: cannot subscribe to Redis ({e}); retrying"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe(client: &redis::Client) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(WAKE_CHANNEL).await?;
    pubsub.psubscribe("cm:events:*").await?;
    Ok(pubsub)
}

/// Only the type of a message, without building its data.
#[derive(Deserialize)]
struct Kind {
    #[serde(rename = "type")]
    kind: String,
}

/// One message from Redis.
async fn on_message(state: &AppState, channel: &str, payload: String) {
    if channel == WAKE_CHANNEL {
        // A submit or a requeue: the payload is the job id. Whose it is
        // matters only when somebody's editor is open here.
        if !state.events.any_listening() {
            return;
        }
        let Ok(id) = payload.parse::<JobId>() else { return };
        let owner: redis::RedisResult<Option<u32>> =
            state.auth.accounts_conn().hget(format!("cm:job:{id}"), "user").await;
        if let Ok(Some(user)) = owner {
            if state.events.listening(user) {
                send_status(state, user).await;
            }
        }
        return;
    }
    let Some(user) = channel.strip_prefix("cm:events:").and_then(|n| n.parse::<u32>().ok()) else { return };
    if !state.events.listening(user) {
        return;
    }
    let kind = serde_json::from_str::<Kind>(&payload).map(|k| k.kind).unwrap_or_default();
    match kind.as_str() {
        JOB_ENDED_EVENT => {
            if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&payload) {
                job_ended(state, user, m.get("data").unwrap_or(&Value::Null)).await;
            }
        }
        PREVIEW_EVENT => {
            let frame = serde_json::from_str::<Value>(&payload)
                .ok()
                .and_then(|m| base64::engine::general_purpose::STANDARD.decode(m["data"].as_str()?).ok());
            if let Some(frame) = frame {
                state.events.send(user, Message::Binary(frame.into()));
            }
        }
        "execution_start" => {
            // ComfyUI says `status` when a prompt starts, then `execution_start`.
            send_status(state, user).await;
            state.events.send(user, payload.into());
        }
        _ => state.events.send(user, payload.into()),
    }
}

/// One of `user`'s jobs ended: what gpu-task could not say, then `status`.
async fn job_ended(state: &AppState, user: u32, data: &Value) {
    let Some(id) = data["prompt_id"].as_str() else { return };
    let ended = data["state"].as_str().unwrap_or("failed");
    let was_in_flight = data["from"].as_str().is_some_and(|f| f != "queued");
    if !was_in_flight {
        // Removed from the queue before it ran: ComfyUI says only `status`.
        send_status(state, user).await;
        return;
    }
    let fields: redis::RedisResult<(Option<String>, Option<String>, Option<String>)> = redis::cmd("HMGET")
        .arg(format!("cm:job:{id}"))
        .arg(VERDICT_FIELD)
        .arg(END_FIELD)
        .arg("error")
        .query_async(&mut state.auth.accounts_conn())
        .await;
    let (verdict, end, error) = fields.unwrap_or((None, None, None));
    if verdict.is_none() {
        let message = verdict_message(id, ended, error.as_deref());
        state.events.send(user, message.to_string().into());
    }
    send_status(state, user).await;
    if end.is_none() {
        let message = json!({ "type": "executing", "data": { "node": null, "display_node": null, "prompt_id": id } });
        state.events.send(user, message.to_string().into());
    }
}

/// The verdict ComfyUI would have sent for a job that ended `state`.
fn verdict_message(id: &str, state: &str, error: Option<&str>) -> Value {
    let timestamp = now_ms();
    match state {
        "succeeded" => json!({ "type": "execution_success", "data": { "prompt_id": id, "timestamp": timestamp } }),
        "cancelled" => json!({ "type": "execution_interrupted", "data": {
            "prompt_id": id, "node_id": null, "node_type": null, "executed": [], "timestamp": timestamp
        } }),
        _ => json!({ "type": "execution_error", "data": {
            "prompt_id": id, "node_id": null, "node_type": null, "executed": [],
            "exception_message": error.unwrap_or("the job failed"),
            "exception_type": "comfy_multi.JobFailed", "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": timestamp
        } }),
    }
}

// ---------------------------------------------------------------------------
// What the internal API hands over (gpu-task's relayed messages)
// ---------------------------------------------------------------------------

fn held_key(id: &JobId) -> String {
    format!("cm:job:{id}:held")
}

/// Which end-of-prompt field a message sets, if any.
fn end_field(message: &Value) -> Option<&'static str> {
    match message["type"].as_str()? {
        "execution_success" | "execution_error" | "execution_interrupted" => Some(VERDICT_FIELD),
        "executing" if message["data"]["node"].is_null() => Some(END_FIELD),
        _ => None,
    }
}

/// Rewrites the saved outputs and temp previews an `executed` lists to where
/// the gateway serves them (`subfolder` = the job id, as gpu-task uploads
/// them); returns whether it listed any.
fn rewrite_outputs(message: &mut Value, job: &JobId) -> bool {
    if message["type"] != "executed" {
        return false;
    }
    let Some(Value::Object(output)) = message.get_mut("data").and_then(|d| d.get_mut("output")) else {
        return false;
    };
    let mut any = false;
    for list in output.values_mut() {
        let Value::Array(items) = list else { continue };
        for item in items {
            let Value::Object(file) = item else { continue };
            let uploaded = file.contains_key("filename")
                && matches!(file.get("type").and_then(Value::as_str).unwrap_or("output"), "output" | "temp");
            if uploaded {
                file.insert("subfolder".into(), Value::String(job.to_string()));
                any = true;
            }
        }
    }
    any
}

/// A job (re)starts: forget what an earlier run held back or relayed.
pub async fn job_started(state: &AppState, job: &Job) -> Result<(), ApiError> {
    let _: () = redis::pipe()
        .del(held_key(&job.id))
        .hdel(format!("cm:job:{}", job.id), &[VERDICT_FIELD, END_FIELD])
        .query_async(&mut state.auth.accounts_conn())
        .await?;
    Ok(())
}

/// Relays one message gpu-task sent (its `prompt_id` already the job id) to
/// the participant's editors, or holds it back (see the module doc).
pub async fn relay(state: &AppState, job: &Job, mut message: Value) -> Result<(), ApiError> {
    // Built once: every message gpu-task relays runs it.
    static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
        redis::Script::new(
            r#"
        if ARGV[3] == '1' or redis.call('EXISTS', KEYS[1]) == 1 then
          redis.call('RPUSH', KEYS[1], ARGV[2])
          redis.call('EXPIRE', KEYS[1], ARGV[5])
          return 1
        end
        redis.call('PUBLISH', ARGV[1], ARGV[2])
        if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[4], '1') end
        return 0
        "#,
        )
    });
    let hold_now = rewrite_outputs(&mut message, &job.id);
    let _: i64 = SCRIPT
        .key(held_key(&job.id))
        .key(format!("cm:job:{}", job.id))
        .arg(events_channel(job.user))
        .arg(message.to_string())
        .arg(if hold_now { "1" } else { "0" })
        .arg(end_field(&message).unwrap_or(""))
        .arg(HELD_TTL_SECS)
        .invoke_async(&mut state.auth.accounts_conn())
        .await?;
    Ok(())
}

/// Relays one preview frame (already retagged, see `crate::internal`) to the
/// participant's editors.
pub async fn relay_preview(state: &AppState, job: &Job, frame: &[u8]) -> Result<(), ApiError> {
    let data = base64::engine::general_purpose::STANDARD.encode(frame);
    let envelope = json!({ "type": PREVIEW_EVENT, "data": data }).to_string();
    let _: () = state.auth.accounts_conn().publish(events_channel(job.user), envelope).await?;
    Ok(())
}

/// gpu-task's final report is in (before the job's state changes): releases
/// what was held back. On failure the outputs and the success are dropped
/// (the end is then told from the job record, see [`job_ended`]).
pub async fn release(state: &AppState, job: &Job, succeeded: bool) -> Result<(), ApiError> {
    let held: Vec<String> = redis::Script::new(
        r#"
        local held = redis.call('LRANGE', KEYS[1], 0, -1)
        redis.call('DEL', KEYS[1])
        return held
        "#,
    )
    .key(held_key(&job.id))
    .invoke_async(&mut state.auth.accounts_conn())
    .await?;
    if held.is_empty() {
        return Ok(());
    }
    let channel = events_channel(job.user);
    let mut pipe = redis::pipe();
    for raw in held {
        let Ok(message) = serde_json::from_str::<Value>(&raw) else { continue };
        let field = end_field(&message);
        if !succeeded && (message["type"] == "executed" || message["type"] == "execution_success" || field == Some(END_FIELD)) {
            continue;
        }
        pipe.publish(&channel, raw).ignore();
        if let Some(field) = field {
            pipe.hset(format!("cm:job:{}", job.id), field, "1").ignore();
        }
    }
    let _: () = pipe.query_async(&mut state.auth.accounts_conn()).await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The socket
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct WsQuery {
    #[serde(rename = "clientId")]
    client_id: Option<String>,
}


/// `GET /user/{n}/ws`: authenticated before the upgrade.
async fn websocket(
    Participant(user): Participant,
    State(state): State<AppState>,
    Query(query): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    crate::auth::same_origin(&headers, "this websocket")?;
    let wanted = query.client_id;
    let sid = state.events.client_id(user, wanted.as_deref());
    state.events.ensure_listening(&state).await;
    Ok(ws.read_buffer_size(READ_BUFFER_BYTES).on_upgrade(move |socket| serve(socket, state, user, sid, headers)))
}

async fn serve(mut socket: WebSocket, state: AppState, user: u32, sid: String, headers: HeaderMap) {
    let _open = dispatcher::metrics::OpenSocket::new("editor");
    // Subscribe before counting, so no change falls between the two.
    let mut rx = state.events.subscribe(user);
    let remaining = match state.store.user_pending(user).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(user, error = %e, "cannot count the participant's jobs");
            0
        }
    };
    if !send_counted(&mut socket, Message::Text(status_message(remaining, Some(&sid)).into()), "editor").await {
        return;
    }
    let mut first = true;
    let mut reauth = tokio::time::interval_at(tokio::time::Instant::now() + REAUTH_EVERY, REAUTH_EVERY);
    loop {
        tokio::select! {
            relayed = rx.recv() => match relayed {
                Ok(frame) => {
                    if !send_counted(&mut socket, frame, "editor").await {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(user, missed, "a slow editor socket missed messages");
                    if let Ok(r) = state.store.user_pending(user).await {
                        if !send_counted(&mut socket, Message::Text(status_message(r, None).into()), "editor").await {
                            break;
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Text(text))) => {
                    if std::mem::take(&mut first) && is_feature_flags(&text) {
                        let answer = json!({ "type": "feature_flags", "data": server_features() }).to_string();
                        if !send_counted(&mut socket, Message::Text(answer.into()), "editor").await {
                            break;
                        }
                    }
                }
                Some(Ok(_)) => {}
            },
            _ = reauth.tick() => {
                match state.auth.authorize(user, &headers).await {
                    Ok(_) => {}
                    Err(ApiError::Unavailable(_) | ApiError::Internal(_)) => {}
                    Err(e) => {
                        let frame = CloseFrame { code: 4401, reason: Utf8Bytes::from(one_line_reason(&e)) };
                        let _ = socket.send(Message::Close(Some(frame))).await;
                        break;
                    }
                }
            }
        }
    }
}

/// Sends `message` on a `kind` (`editor`, `admin`) socket, counting it in
/// the metrics; false when the socket is gone.
pub(crate) async fn send_counted(socket: &mut WebSocket, message: Message, kind: &'static str) -> bool {
    let sent = socket.send(message).await.is_ok();
    if sent {
        dispatcher::metrics::websocket_sent(kind);
    }
    sent
}

/// A close reason fits in 123 bytes.
fn one_line_reason(e: &ApiError) -> String {
    let mut s = e.to_string();
    while s.len() > 120 {
        s.pop();
    }
    s
}

fn is_feature_flags(text: &str) -> bool {
    serde_json::from_str::<Kind>(text).is_ok_and(|k| k.kind == "feature_flags")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_never_shared() {
        let mut ids = ClientIds::default();
        let a = ids.assign(1, None);
        assert_eq!(a.len(), 32);
        assert_eq!(ids.assign(1, Some(&a)), a, "the owner keeps its id");
        let b = ids.assign(2, Some(&a));
        assert_ne!(b, a, "another participant never gets it");
        assert_ne!(ids.assign(1, Some("made-up")), "made-up");
        assert_eq!(ids.assign(1, Some(&a)), a);
        for _ in 0..IDS_PER_USER {
            ids.assign(1, None);
        }
        assert_ne!(ids.assign(1, Some(&a)), a, "old ids are forgotten");
        assert_eq!(ids.assign(2, Some(&b)), b);
    }

    #[test]
    fn saved_outputs_point_at_the_job() {
        let job = JobId::new_v4();
        let mut m = json!({ "type": "executed", "data": { "node": "7", "output": {
            "images": [
                { "filename": "smoke_00001_.png", "subfolder": "", "type": "output" },
                { "filename": "p.png", "subfolder": "", "type": "temp" }
            ],
            "text": ["hello"]
        }, "prompt_id": job.to_string() } });
        assert!(rewrite_outputs(&mut m, &job));
        assert_eq!(m["data"]["output"]["images"][0]["subfolder"], job.to_string());
        assert_eq!(m["data"]["output"]["images"][1]["subfolder"], job.to_string());
        assert_eq!(m["data"]["output"]["text"], json!(["hello"]));
        let mut preview = json!({ "type": "executed", "data": { "output": { "images": [
            { "filename": "p.png", "subfolder": "", "type": "temp" }
        ] } } });
        assert!(rewrite_outputs(&mut preview, &job), "temp previews are uploaded too");
        assert_eq!(preview["data"]["output"]["images"][0]["subfolder"], job.to_string());
        let mut input = json!({ "type": "executed", "data": { "output": { "images": [
            { "filename": "i.png", "subfolder": "", "type": "input" }
        ] } } });
        assert!(!rewrite_outputs(&mut input, &job));
        assert!(!rewrite_outputs(&mut json!({ "type": "progress", "data": {} }), &job));
    }

    #[test]
    fn ends_are_recognised() {
        assert_eq!(end_field(&json!({ "type": "executing", "data": { "node": null } })), Some(END_FIELD));
        assert_eq!(end_field(&json!({ "type": "executing", "data": { "node": "3" } })), None);
        assert_eq!(end_field(&json!({ "type": "execution_error", "data": {} })), Some(VERDICT_FIELD));
        assert_eq!(verdict_message("x", "failed", Some("boom"))["data"]["exception_message"], "boom");
        assert_eq!(verdict_message("x", "cancelled", None)["type"], "execution_interrupted");
        assert_eq!(verdict_message("x", "succeeded", None)["type"], "execution_success");
    }

    #[test]
    fn status_has_the_sid_only_on_connect() {
        let first: Value = serde_json::from_str(&status_message(2, Some("abc"))).unwrap();
        assert_eq!(first, json!({ "type": "status", "data": { "status": { "exec_info": { "queue_remaining": 2 } }, "sid": "abc" } }));
        let later: Value = serde_json::from_str(&status_message(0, None)).unwrap();
        assert!(later["data"].get("sid").is_none());
    }
}
