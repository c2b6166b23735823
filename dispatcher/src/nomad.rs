//! A small client for the parts of Nomad's HTTP API that comfy-multi uses.
//!
//! Why our own: the dispatcher needs only a handful of endpoints (dispatch,
//! allocations with blocking queries, the event stream, job stop/parse/register
//! and node reads), but it needs them exactly right: child job ids contain `/`
//! and must be sent as `%2F`, payloads are base64 and limited to 16 KiB, error
//! bodies are plain text (validation failures come back as 500), and the event
//! stream is NDJSON with `{}` heartbeats. The facts come from
//! `shared/nomad-api/README.md`; the unit tests below decode its sample bodies.
//!
//! The central piece is [`NomadClient::follow_to_end`]: it follows one
//! dispatched child job until its allocation is terminal, by the event stream
//! first and by blocking queries when the stream is refused or drops, and
//! explains the end in one line built from the task events.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, warn};

/// Longest wait Nomad accepts for a blocking query (it caps at 10 minutes).
const MAX_BLOCKING_WAIT: Duration = Duration::from_secs(600);
/// Blocking wait used by [`NomadClient::follow_to_end`]'s fallback.
const FOLLOW_WAIT: Duration = Duration::from_secs(300);
/// Timeout of ordinary (non-blocking) requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call to Nomad did not work.
#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    /// The address given is not a usable URL.
    #[error("NOMAD_ADDR {addr:?} is not a valid address ({why}); expected something like http://127.0.0.1:4646")]
    BadAddress { addr: String, why: String },
    /// No answer at all: connection refused, DNS, TLS, timeout, dropped stream.
    #[error("cannot reach Nomad at {addr}: {source} (is NOMAD_ADDR right? is the agent running?)")]
    Unreachable {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    /// Nomad answered with an error status; `body` is its plain-text message.
    #[error("Nomad answered {status}: {body}{}", status_hint(*.status, .body))]
    Status { status: u16, body: String },
    /// Nomad answered 2xx but the body is not what this client expects.
    #[error("cannot understand Nomad's answer to {0} (is NOMAD_ADDR a Nomad agent of a supported version?)")]
    Decode(String),
}

fn status_hint(status: u16, body: &str) -> &'static str {
    match status {
        403 => " (check NOMAD_TOKEN: it must allow this operation)",
        404 if body.contains("job not found") => {
            " (is the job registered? `nomad job run nomad/comfy-workflow.nomad.hcl`)"
        }
        500 if body.contains("parameterized job not found") => {
            " (register the job first: `nomad job run nomad/comfy-workflow.nomad.hcl`)"
        }
        _ => "",
    }
}

impl NomadError {
    /// Whether trying again later may succeed on its own (Nomad unreachable,
    /// no leader, overloaded), as opposed to a request Nomad will always refuse.
    pub fn is_transient(&self) -> bool {
        match self {
            NomadError::Unreachable { .. } => true,
            NomadError::Status { status, body } => match status {
                408 | 429 | 502 | 503 | 504 => true,
                500 => {
                    let b = body.to_ascii_lowercase();
                    [
                        "no cluster leader",
                        "no path to region",
                        "leadership lost",
                        "timeout",
                        "eof",
                        "connection refused",
                        "rpc error: rpc error",
                    ]
                    .iter()
                    .any(|s| b.contains(s))
                }
                _ => false,
            },
            NomadError::BadAddress { .. } | NomadError::Decode(_) => false,
        }
    }

    /// Whether Nomad said the object does not exist (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NomadError::Status { status: 404, .. })
    }

    /// The HTTP status Nomad answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            NomadError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Percent-encodes a job (or other) id for use as one path segment; child ids
/// like `comfy-workflow/dispatch-1700000000-0a1b2c3d` become `…%2F…`.
pub fn encode_id(id: &str) -> String {
    urlencoding::encode(id).into_owned()
}

/// A duration in Go's syntax (`300000ms`), as Nomad's `wait` parameter wants.
pub fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

// ---------------------------------------------------------------------------
// Typed responses: only the fields we use; unknown fields are ignored.
// ---------------------------------------------------------------------------

/// Answer to a dispatch (`POST /v1/job/:job_id/dispatch`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DispatchResponse {
    /// The child job's id, `<parent>/dispatch-<secs>-<8 hex>`.
    #[serde(rename = "DispatchedJobID")]
    pub dispatched_job_id: String,
    /// The evaluation created; `""` when the idempotency token matched an
    /// existing child.
    #[serde(rename = "EvalID", default)]
    pub eval_id: String,
    /// `0` when the idempotency token matched an existing child.
    #[serde(default)]
    pub eval_create_index: u64,
    #[serde(default)]
    pub job_create_index: u64,
    /// Raft index after the dispatch: follow the child from here.
    #[serde(default)]
    pub index: u64,
}

/// Answer to a job register (`POST /v1/jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RegisterResponse {
    #[serde(rename = "EvalID", default)]
    pub eval_id: String,
    #[serde(default)]
    pub eval_create_index: u64,
    #[serde(default)]
    pub job_modify_index: u64,
    #[serde(default)]
    pub warnings: String,
}

/// One entry of the job list (`GET /v1/jobs`). It has no `Meta`: read the
/// job for that.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobListStub {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "ParentID", default)]
    pub parent_id: String,
    /// `pending`, `running` or `dead`.
    #[serde(default)]
    pub status: String,
    /// A stop was requested.
    #[serde(default, deserialize_with = "null_as_default")]
    pub stop: bool,
}

/// Answer to a job stop (`DELETE /v1/job/:job_id`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StopResponse {
    #[serde(rename = "EvalID", default)]
    pub eval_id: String,
    #[serde(default)]
    pub eval_create_index: u64,
    #[serde(default)]
    pub job_modify_index: u64,
}

/// An allocation as listed (`/v1/job/:id/allocations`) and as read
/// (`/v1/allocation/:id`); the full read has more fields, which we ignore.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AllocationStub {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "EvalID", default)]
    pub eval_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "NodeID", default)]
    pub node_id: String,
    #[serde(default)]
    pub node_name: String,
    #[serde(rename = "JobID")]
    pub job_id: String,
    #[serde(default)]
    pub task_group: String,
    /// `run`, `stop` or `evict`.
    #[serde(default)]
    pub desired_status: String,
    #[serde(default)]
    pub desired_description: String,
    /// `pending`, `running`, `complete`, `failed`, `lost` or `unknown`.
    pub client_status: String,
    #[serde(default)]
    pub client_description: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub task_states: BTreeMap<String, TaskState>,
    #[serde(default)]
    pub next_allocation: String,
    #[serde(rename = "FollowupEvalID", default)]
    pub followup_eval_id: String,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// The full allocation read has the same fields we care about.
pub type Allocation = AllocationStub;

impl AllocationStub {
    /// `complete`, `failed` or `lost`: the allocation will not run again.
    pub fn is_terminal(&self) -> bool {
        is_terminal_status(&self.client_status)
    }
}

/// Whether a ClientStatus is terminal.
pub fn is_terminal_status(client_status: &str) -> bool {
    matches!(client_status, "complete" | "failed" | "lost")
}

/// One task's state within an allocation.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskState {
    /// `pending`, `running` or `dead`.
    pub state: String,
    pub failed: bool,
    pub restarts: u64,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub events: Vec<TaskEvent>,
}

/// One task event (`Received`, `Started`, `Terminated`, `Killing`, ...).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskEvent {
    #[serde(rename = "Type")]
    pub kind: String,
    /// Unix nanoseconds.
    pub time: i64,
    pub exit_code: i64,
    pub signal: i64,
    pub fails_task: bool,
    pub message: String,
    pub display_message: String,
    pub driver_error: String,
    pub setup_error: String,
    pub kill_reason: String,
    pub kill_error: String,
    pub download_error: String,
    pub validation_error: String,
    pub restart_reason: String,
}

/// An evaluation (`/v1/evaluation/:id`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Evaluation {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "JobID", default)]
    pub job_id: String,
    /// `pending`, `blocked`, `complete`, `failed`, `canceled`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_description: String,
    #[serde(default)]
    pub triggered_by: String,
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(default)]
    pub blocked_eval: String,
    #[serde(default)]
    pub previous_eval: String,
    #[serde(default)]
    pub next_eval: String,
    /// Per task group: why placement failed.
    #[serde(
        rename = "FailedTGAllocs",
        default,
        deserialize_with = "null_as_default"
    )]
    pub failed_tg_allocs: BTreeMap<String, AllocMetric>,
    #[serde(default)]
    pub create_index: u64,
    #[serde(default)]
    pub modify_index: u64,
}

/// Placement metrics of a task group (why it could not be placed).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AllocMetric {
    pub nodes_evaluated: u64,
    pub nodes_filtered: u64,
    pub nodes_exhausted: u64,
    pub coalesced_failures: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub nodes_available: BTreeMap<String, u64>,
    #[serde(deserialize_with = "null_as_default")]
    pub constraint_filtered: BTreeMap<String, u64>,
    #[serde(deserialize_with = "null_as_default")]
    pub dimension_exhausted: BTreeMap<String, u64>,
}

impl AllocMetric {
    /// One line: why nothing could be placed.
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (k, v) in self
            .constraint_filtered
            .iter()
            .chain(&self.dimension_exhausted)
        {
            parts.push(format!("{k} ({v} node{})", if *v == 1 { "" } else { "s" }));
        }
        if parts.is_empty() && self.nodes_evaluated == 0 {
            parts.push("no eligible node".into());
        }
        parts.join(", ")
    }
}

/// A node as listed (`/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeStub {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub datacenter: String,
    #[serde(default)]
    pub node_pool: String,
    /// `initializing`, `ready`, `down`, `disconnected`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub drain: bool,
    /// `eligible` or `ineligible`.
    #[serde(default)]
    pub scheduling_eligibility: String,
}

/// A node as read (`/v1/node/:id`): what the list says, and more.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    #[serde(flatten)]
    pub stub: NodeStub,
    /// Present while a drain is in progress.
    #[serde(default)]
    pub drain_strategy: Option<Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub node_resources: Option<NodeResources>,
}

impl Node {
    /// The ids (GPU UUIDs for `nvidia/gpu`) of the node's devices of `vendor/type`.
    pub fn device_ids(&self, vendor: &str, kind: &str) -> Vec<String> {
        self.node_resources
            .iter()
            .flat_map(|r| r.devices.iter())
            .filter(|d| d.vendor == vendor && d.kind == kind)
            .flat_map(|d| d.instances.iter().map(|i| i.id.clone()))
            .collect()
    }
}

/// The part of a node's resources we read: its devices.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeResources {
    #[serde(deserialize_with = "null_as_default")]
    pub devices: Vec<NodeDevice>,
}

/// A group of identical devices on a node (e.g. the node's NVIDIA GPUs).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeDevice {
    pub vendor: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub instances: Vec<DeviceInstance>,
}

/// One device (one GPU).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct DeviceInstance {
    #[serde(rename = "ID")]
    pub id: String,
    pub healthy: bool,
}

/// Answer to a node drain or eligibility update.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeUpdateResponse {
    #[serde(default)]
    pub node_modify_index: u64,
    #[serde(default)]
    pub index: u64,
}

/// One NDJSON line of the event stream: the events of one raft index.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EventBatch {
    pub index: u64,
    #[serde(deserialize_with = "null_as_default")]
    pub events: Vec<Event>,
}

impl EventBatch {
    /// `{}`: sent on connect and every 30 s to keep the stream alive.
    pub fn is_heartbeat(&self) -> bool {
        self.index == 0 && self.events.is_empty()
    }
}

/// One event of the event stream.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Event {
    /// `Allocation`, `Job`, `Evaluation`, `Node`, ...
    pub topic: String,
    /// `AllocationUpdated`, `JobRegistered`, ...
    #[serde(rename = "Type")]
    pub kind: String,
    /// The object's id.
    pub key: String,
    pub namespace: String,
    #[serde(deserialize_with = "null_as_default")]
    pub filter_keys: Vec<String>,
    pub index: u64,
    /// `{"Allocation": …}`, `{"Job": …}`, ...
    pub payload: Value,
}

impl Event {
    /// The allocation carried by an `Allocation` event.
    pub fn allocation(&self) -> Option<Result<AllocationStub, NomadError>> {
        let alloc = self.payload.get("Allocation")?;
        Some(
            AllocationStub::deserialize(alloc)
                .map_err(|e| NomadError::Decode(format!("an Allocation event ({e})"))),
        )
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------
// How a followed child job ended.
// ---------------------------------------------------------------------------

/// How [`NomadClient::follow_to_end`] saw the child job end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminalStatus {
    /// The allocation completed: every task exited 0.
    Complete,
    /// The allocation failed: a task exited non-zero or could not start.
    Failed,
    /// The allocation was lost (its node went away) or is being migrated off
    /// a draining node: the work did not finish and may be retried.
    Lost,
    /// The job was stopped: its allocation was killed, or it never ran.
    Stopped,
    /// The job no longer exists (purged or garbage-collected) and no terminal
    /// allocation was seen.
    Gone,
}

/// The end of a followed child job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub status: TerminalStatus,
    /// The allocation that ended, when there was one.
    pub alloc_id: Option<String>,
    /// One line for people, e.g. `gpu-task exited with code 2`.
    pub reason: String,
    /// The Nomad index at which the end was seen.
    pub index: u64,
}

impl Terminal {
    /// The end described by a terminal allocation.
    pub fn from_allocation(alloc: &AllocationStub, index: u64) -> Terminal {
        let stopped = matches!(alloc.desired_status.as_str(), "stop" | "evict");
        let migrated =
            alloc.desired_description.contains("migrat") || alloc.desired_status == "evict";
        let status = match alloc.client_status.as_str() {
            "lost" => TerminalStatus::Lost,
            _ if stopped && migrated => TerminalStatus::Lost,
            _ if stopped => TerminalStatus::Stopped,
            "complete" => TerminalStatus::Complete,
            _ => TerminalStatus::Failed,
        };
        Terminal {
            status,
            alloc_id: Some(alloc.id.clone()),
            reason: alloc_reason(alloc),
            index,
        }
    }
}

/// One line explaining why an allocation ended, from its task events.
pub fn alloc_reason(alloc: &AllocationStub) -> String {
    let mut parts: Vec<String> = Vec::new();
    if alloc.client_status == "lost" {
        let mut s = String::from("node lost");
        if !alloc.client_description.is_empty() {
            s.push_str(&format!(" ({})", alloc.client_description));
        }
        parts.push(s);
    }
    if matches!(alloc.desired_status.as_str(), "stop" | "evict") {
        let why = if alloc.desired_description.is_empty() {
            "the job was stopped".to_string()
        } else {
            alloc.desired_description.clone()
        };
        parts.push(format!("stopped by Nomad: {why}"));
    }
    for (name, state) in &alloc.task_states {
        if let Some(s) = task_reason(name, state) {
            parts.push(s);
        }
    }
    if parts.is_empty() {
        let mut s = format!("allocation {}", alloc.client_status);
        if !alloc.client_description.is_empty() {
            s.push_str(&format!(": {}", alloc.client_description));
        }
        parts.push(s);
    }
    parts.join("; ")
}

/// What a task's events say about its end, if anything.
fn task_reason(task: &str, state: &TaskState) -> Option<String> {
    let mut reason: Option<String> = None;
    for ev in &state.events {
        let r = match ev.kind.as_str() {
            "Terminated" if ev.signal != 0 => {
                Some(format!("{task} was killed by signal {}", ev.signal))
            }
            "Terminated" => Some(format!("{task} exited with code {}", ev.exit_code)),
            "Driver Failure" => Some(format!(
                "{task} could not start: {}",
                first_nonempty(&[&ev.driver_error, &ev.display_message, &ev.message])
            )),
            "Setup Failure" => Some(format!(
                "{task} setup failed: {}",
                first_nonempty(&[&ev.setup_error, &ev.display_message, &ev.message])
            )),
            "Failed Validation" => Some(format!(
                "{task} is invalid: {}",
                first_nonempty(&[&ev.validation_error, &ev.display_message])
            )),
            "Failed Artifact Download" => Some(format!(
                "{task} artifact download failed: {}",
                first_nonempty(&[&ev.download_error, &ev.display_message])
            )),
            "Sibling Task Failed" => {
                Some(format!("{task} was stopped because a sibling task failed"))
            }
            "Task hook failed" => Some(format!(
                "{task}: {}",
                first_nonempty(&[&ev.display_message, &ev.message])
            )),
            "Killed" if !ev.kill_error.is_empty() => {
                Some(format!("{task} could not be killed: {}", ev.kill_error))
            }
            _ => None,
        };
        if r.is_some() {
            reason = r;
        }
    }
    if reason.is_none() && state.failed {
        let last = state
            .events
            .last()
            .map(|e| first_nonempty(&[&e.display_message, &e.message, &e.kind]));
        reason = Some(format!(
            "{task} failed{}",
            last.map(|l| format!(": {l}")).unwrap_or_default()
        ));
    }
    reason
}

fn first_nonempty(options: &[&str]) -> String {
    options
        .iter()
        .find(|s| !s.is_empty())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "no details".into())
}

// ---------------------------------------------------------------------------
// The client.
// ---------------------------------------------------------------------------

/// The stream [`NomadClient::event_stream`] returns.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EventBatch, NomadError>> + Send>>;

/// A client of one Nomad agent's HTTP API.
#[derive(Debug, Clone)]
pub struct NomadClient {
    http: reqwest::Client,
    addr: String,
    token: Option<String>,
    /// An event stream silent (not even a heartbeat) for this long is dead.
    stream_idle: Duration,
    /// How long [`NomadClient::follow_to_end`] keeps retrying while Nomad is
    /// unreachable before it gives up with the error.
    patience: Duration,
}

#[derive(Serialize)]
struct DispatchBody<'a> {
    #[serde(rename = "JobID")]
    job_id: &'a str,
    #[serde(rename = "Meta")]
    meta: &'a BTreeMap<String, String>,
    #[serde(rename = "Payload", skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
}

impl NomadClient {
    /// A client of the agent at `addr` (e.g. `http://127.0.0.1:4646`); `token`
    /// is sent as `X-Nomad-Token` when set.
    pub fn new(addr: &str, token: Option<String>) -> Result<Self, NomadError> {
        let trimmed = addr.trim().trim_end_matches('/');
        let bad = |why: &str| NomadError::BadAddress {
            addr: addr.to_string(),
            why: why.to_string(),
        };
        let url = reqwest::Url::parse(trimmed).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if url.host_str().is_none() {
            return Err(bad("there is no host"));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| bad(&format!("cannot build an HTTP client: {e}")))?;
        Ok(NomadClient {
            http,
            addr: trimmed.to_string(),
            token: token.filter(|t| !t.is_empty()),
            stream_idle: Duration::from_secs(95),
            patience: Duration::from_secs(300),
        })
    }

    /// Treats an event stream that sent nothing (not even its 30 s heartbeat)
    /// for `idle` as dropped. Default 95 s.
    pub fn with_stream_idle_timeout(mut self, idle: Duration) -> Self {
        self.stream_idle = idle;
        self
    }

    /// How long [`NomadClient::follow_to_end`] retries while Nomad is
    /// unreachable. Default 5 minutes.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The agent's address, as given (without a trailing `/`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, format!("{}{}", self.addr, path));
        if let Some(token) = &self.token {
            rb = rb.header("X-Nomad-Token", token);
        }
        rb
    }

    fn unreachable(&self, source: reqwest::Error) -> NomadError {
        NomadError::Unreachable {
            addr: self.addr.clone(),
            source,
        }
    }

    /// Sends, and turns a non-2xx answer into [`NomadError::Status`].
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, NomadError> {
        let resp = rb.send().await.map_err(|e| self.unreachable(e)).inspect_err(|_| crate::metrics::nomad_error(None))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        crate::metrics::nomad_error(Some(status.as_u16()));
        let body = resp.text().await.unwrap_or_default();
        Err(NomadError::Status {
            status: status.as_u16(),
            body: body.trim().to_string(),
        })
    }

    /// Sends and decodes a JSON answer, with its `X-Nomad-Index`.
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(T, u64), NomadError> {
        let resp = self.send(rb).await?;
        let index = resp
            .headers()
            .get("X-Nomad-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| NomadError::Decode(format!("{what} ({e})")))?;
        Ok((value, index))
    }

    /// Dispatches the parameterized job `job` with `meta` and an optional
    /// payload (at most 16 KiB; Nomad refuses more with a 500).
    /// `idempotency_token` makes a repeated dispatch return the same child.
    pub async fn dispatch(
        &self,
        job: &str,
        meta: &BTreeMap<String, String>,
        payload: Option<&[u8]>,
        idempotency_token: &str,
    ) -> Result<DispatchResponse, NomadError> {
        let body = DispatchBody {
            job_id: job,
            meta,
            payload: payload.map(|p| base64::engine::general_purpose::STANDARD.encode(p)),
        };
        let rb = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/job/{}/dispatch", encode_id(job)),
            )
            .query(&[("idempotency_token", idempotency_token)])
            .timeout(REQUEST_TIMEOUT)
            .json(&body);
        let (resp, _) = self.json::<DispatchResponse>(rb, "a dispatch").await?;
        debug!(job, child = %resp.dispatched_job_id, eval = %resp.eval_id, "dispatched");
        Ok(resp)
    }

    /// The allocations of `job_id`, with the index to block on next. With
    /// `block = Some((index, wait))` this is a blocking query: Nomad answers
    /// when something changed after `index` or `wait` has passed (capped at 10 min).
    pub async fn job_allocations(
        &self,
        job_id: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(Vec<AllocationStub>, u64), NomadError> {
        let mut rb = self.request(
            reqwest::Method::GET,
            &format!("/v1/job/{}/allocations", encode_id(job_id)),
        );
        rb = match block {
            Some((index, wait)) => {
                let wait = wait.min(MAX_BLOCKING_WAIT);
                rb.query(&[("index", index.to_string()), ("wait", go_duration(wait))])
                    .timeout(wait + wait / 16 + REQUEST_TIMEOUT)
            }
            None => rb.timeout(REQUEST_TIMEOUT),
        };
        self.json(rb, "an allocation list").await
    }

    /// One allocation.
    pub async fn allocation(&self, id: &str) -> Result<Allocation, NomadError> {
        let rb = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/allocation/{}", encode_id(id)),
            )
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "an allocation read").await?.0)
    }

    /// One evaluation.
    pub async fn evaluation(&self, id: &str) -> Result<Evaluation, NomadError> {
        let rb = self
            .request(
                reqwest::Method::GET,
                &format!("/v1/evaluation/{}", encode_id(id)),
            )
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "an evaluation read").await?.0)
    }

    /// The jobs whose id starts with `prefix` (e.g. the children of a
    /// parameterized job: `comfy-workflow/dispatch-`).
    pub async fn list_jobs(&self, prefix: &str) -> Result<Vec<JobListStub>, NomadError> {
        let rb = self
            .request(reqwest::Method::GET, "/v1/jobs")
            .query(&[("prefix", prefix)])
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "a job list").await?.0)
    }

    /// A job as Nomad's JSON, or `None` when Nomad does not know it.
    pub async fn read_job(&self, id: &str) -> Result<Option<Value>, NomadError> {
        let rb = self
            .request(reqwest::Method::GET, &format!("/v1/job/{}", encode_id(id)))
            .timeout(REQUEST_TIMEOUT);
        match self.json::<Value>(rb, "a job read").await {
            Ok((job, _)) => Ok(Some(job)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stops a job (its allocations get SIGTERM, then SIGKILL after the
    /// task's kill_timeout); `purge` also removes it from Nomad at once.
    pub async fn stop_job(&self, id: &str, purge: bool) -> Result<StopResponse, NomadError> {
        let mut rb = self
            .request(
                reqwest::Method::DELETE,
                &format!("/v1/job/{}", encode_id(id)),
            )
            .timeout(REQUEST_TIMEOUT);
        if purge {
            rb = rb.query(&[("purge", "true")]);
        }
        Ok(self.json(rb, "a job stop").await?.0)
    }

    /// Parses an HCL2 job spec into Nomad's JSON job, with HCL2 `variables`
    /// (name → value; sent as a variables file, values converted by the
    /// variable's declared type as with `nomad job run -var`).
    pub async fn parse_job(
        &self,
        hcl: &str,
        variables: &BTreeMap<String, String>,
    ) -> Result<Value, NomadError> {
        let body = serde_json::json!({
            "JobHCL": hcl,
            "Canonicalize": true,
            "Variables": variables_file(variables),
        });
        let rb = self
            .request(reqwest::Method::POST, "/v1/jobs/parse")
            .timeout(REQUEST_TIMEOUT)
            .json(&body);
        Ok(self.json(rb, "a job parse").await?.0)
    }

    /// Registers (creates or updates) a job given as Nomad's JSON job.
    pub async fn register_job(&self, job: &Value) -> Result<RegisterResponse, NomadError> {
        let body = serde_json::json!({ "Job": job });
        let rb = self
            .request(reqwest::Method::POST, "/v1/jobs")
            .timeout(REQUEST_TIMEOUT)
            .json(&body);
        Ok(self.json(rb, "a job register").await?.0)
    }

    /// The cluster's nodes.
    pub async fn nodes(&self) -> Result<Vec<NodeStub>, NomadError> {
        let rb = self
            .request(reqwest::Method::GET, "/v1/nodes")
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "a node list").await?.0)
    }

    /// One node, with its attributes and devices.
    pub async fn node(&self, id: &str) -> Result<Node, NomadError> {
        let rb = self
            .request(reqwest::Method::GET, &format!("/v1/node/{}", encode_id(id)))
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "a node read").await?.0)
    }

    /// The allocations placed on node `id` (every status; see
    /// [`AllocationStub::is_terminal`]).
    pub async fn node_allocations(&self, id: &str) -> Result<Vec<AllocationStub>, NomadError> {
        let rb = self
            .request(reqwest::Method::GET, &format!("/v1/node/{}/allocations", encode_id(id)))
            .timeout(REQUEST_TIMEOUT);
        Ok(self.json(rb, "a node's allocation list").await?.0)
    }

    /// Starts draining a node: it becomes ineligible, and allocations still
    /// running after `deadline` are stopped. `None` cancels a drain.
    pub async fn drain_node(
        &self,
        id: &str,
        deadline: Option<Duration>,
    ) -> Result<NodeUpdateResponse, NomadError> {
        let spec = deadline.map(
            |d| serde_json::json!({ "Deadline": d.as_nanos() as u64, "IgnoreSystemJobs": false }),
        );
        let body =
            serde_json::json!({ "DrainSpec": spec, "Meta": { "message": "comfy-multi drain" } });
        let rb = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/node/{}/drain", encode_id(id)),
            )
            .timeout(REQUEST_TIMEOUT)
            .json(&body);
        Ok(self.json(rb, "a node drain").await?.0)
    }

    /// Marks a node eligible or ineligible for new placements.
    pub async fn set_node_eligibility(
        &self,
        id: &str,
        eligible: bool,
    ) -> Result<NodeUpdateResponse, NomadError> {
        let body =
            serde_json::json!({ "Eligibility": if eligible { "eligible" } else { "ineligible" } });
        let rb = self
            .request(
                reqwest::Method::POST,
                &format!("/v1/node/{}/eligibility", encode_id(id)),
            )
            .timeout(REQUEST_TIMEOUT)
            .json(&body);
        Ok(self.json(rb, "a node eligibility update").await?.0)
    }

    /// The event stream from `index` for `topics` (`Topic:key`, e.g.
    /// `Allocation:comfy-workflow/dispatch-…`), heartbeats removed. The
    /// stream ends (or yields an error) when the connection drops.
    pub async fn event_stream(
        &self,
        topics: &[String],
        index: u64,
    ) -> Result<EventStream, NomadError> {
        let raw = self.raw_event_stream(topics, index).await?;
        Ok(Box::pin(raw.filter(|item| {
            let keep = !matches!(item, Ok(b) if b.is_heartbeat());
            async move { keep }
        })))
    }

    /// Like [`NomadClient::event_stream`] but heartbeats included, so a
    /// reader can tell a quiet stream from a dead one.
    async fn raw_event_stream(
        &self,
        topics: &[String],
        index: u64,
    ) -> Result<EventStream, NomadError> {
        let mut query: Vec<(&str, String)> = vec![("index", index.to_string())];
        query.extend(topics.iter().map(|t| ("topic", t.clone())));
        let rb = self
            .request(reqwest::Method::GET, "/v1/event/stream")
            .query(&query);
        let resp = self.send(rb).await?;
        let addr = self.addr.clone();
        let bytes: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>> =
            Box::pin(resp.bytes_stream());
        struct St {
            bytes: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
            buf: Vec<u8>,
            done: bool,
            addr: String,
        }
        let st = St {
            bytes,
            buf: Vec::new(),
            done: false,
            addr,
        };
        let stream = futures_util::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(pos) = st.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = st.buf.drain(..=pos).collect();
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    let item = serde_json::from_slice::<EventBatch>(line)
                        .map_err(|e| NomadError::Decode(format!("an event stream line ({e})")));
                    return Some((item, st));
                }
                if st.done {
                    return None;
                }
                match st.bytes.next().await {
                    Some(Ok(chunk)) => st.buf.extend_from_slice(&chunk),
                    Some(Err(source)) => {
                        st.done = true;
                        return Some((
                            Err(NomadError::Unreachable {
                                addr: st.addr.clone(),
                                source,
                            }),
                            st,
                        ));
                    }
                    None => {
                        st.done = true;
                        // A last line without its newline still counts.
                        if !st.buf.trim_ascii().is_empty() {
                            st.buf.push(b'\n');
                        }
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    /// Follows the child job `child_job_id` from `from_index` until its
    /// allocation is terminal (`complete`, `failed`, `lost`), or the job was
    /// stopped before it ran, or it is gone.
    ///
    /// It subscribes to the event stream (`Allocation:<id>` and `Job:<id>`),
    /// then reads the allocations once so that nothing that happened before the
    /// subscription is missed. When the stream is refused, breaks or falls
    /// silent, it goes on with blocking queries on the job's allocations.
    /// While Nomad is unreachable it retries for [`NomadClient::with_patience`].
    pub async fn follow_to_end(
        &self,
        child_job_id: &str,
        from_index: u64,
    ) -> Result<Terminal, NomadError> {
        let topics = vec![
            format!("Allocation:{child_job_id}"),
            format!("Job:{child_job_id}"),
        ];
        let mut index = from_index;
        match self.raw_event_stream(&topics, from_index).await {
            Ok(stream) => match self.follow_stream(child_job_id, stream, &mut index).await {
                Ok(Some(end)) => return Ok(end),
                Ok(None) => debug!(
                    job = child_job_id,
                    "event stream ended; following with blocking queries"
                ),
                Err(e) if e.is_transient() => {
                    warn!(job = child_job_id, "{e}; following with blocking queries")
                }
                Err(e) => return Err(e),
            },
            Err(e) if e.is_transient() || e.status().is_some() => {
                warn!(
                    job = child_job_id,
                    "event stream unavailable ({e}); following with blocking queries"
                )
            }
            Err(e) => return Err(e),
        }
        self.follow_blocking(child_job_id, index).await
    }

    /// Reads the job's current state once: its end if it has ended.
    async fn check_now(&self, child_job_id: &str) -> Result<(Option<Terminal>, u64), NomadError> {
        let (allocs, index) = self.job_allocations(child_job_id, None).await?;
        Ok((self.end_of(child_job_id, &allocs, index).await?, index))
    }

    /// The end shown by `allocs` (or by the job, when it has no allocation).
    async fn end_of(
        &self,
        child_job_id: &str,
        allocs: &[AllocationStub],
        index: u64,
    ) -> Result<Option<Terminal>, NomadError> {
        if let Some(alloc) = latest_terminal(allocs) {
            return Ok(Some(Terminal::from_allocation(alloc, index)));
        }
        if !allocs.is_empty() {
            return Ok(None);
        }
        match self.read_job(child_job_id).await? {
            None => Ok(Some(Terminal {
                status: TerminalStatus::Gone,
                alloc_id: None,
                reason: format!(
                    "Nomad job {child_job_id} no longer exists (purged or garbage-collected)"
                ),
                index,
            })),
            Some(job) if job.get("Stop").and_then(Value::as_bool) == Some(true) => {
                Ok(Some(Terminal {
                    status: TerminalStatus::Stopped,
                    alloc_id: None,
                    reason: format!("Nomad job {child_job_id} was stopped before it was placed"),
                    index,
                }))
            }
            Some(_) => Ok(None),
        }
    }

    async fn follow_stream(
        &self,
        child_job_id: &str,
        mut stream: EventStream,
        index: &mut u64,
    ) -> Result<Option<Terminal>, NomadError> {
        let (end, read_index) = self.check_now(child_job_id).await?;
        if let Some(end) = end {
            return Ok(Some(end));
        }
        *index = (*index).max(read_index);
        loop {
            let item = match tokio::time::timeout(self.stream_idle, stream.next()).await {
                Err(_) => {
                    warn!(
                        job = child_job_id,
                        "event stream silent for {:?}", self.stream_idle
                    );
                    return Ok(None);
                }
                Ok(None) => return Ok(None),
                Ok(Some(item)) => item,
            };
            let batch = match item {
                Ok(b) => b,
                Err(e) => {
                    warn!(job = child_job_id, "event stream broke: {e}");
                    return Ok(None);
                }
            };
            if batch.is_heartbeat() {
                continue;
            }
            *index = (*index).max(batch.index);
            let mut recheck = false;
            for ev in &batch.events {
                match ev.topic.as_str() {
                    "Allocation" => match ev.allocation() {
                        Some(Ok(alloc)) if alloc.job_id == child_job_id && alloc.is_terminal() => {
                            return Ok(Some(Terminal::from_allocation(&alloc, batch.index)));
                        }
                        Some(Err(e)) => warn!(job = child_job_id, "{e}"),
                        _ => {}
                    },
                    "Job" if ev.key == child_job_id => {
                        let stopped =
                            ev.payload.pointer("/Job/Stop").and_then(Value::as_bool) == Some(true);
                        if stopped || ev.kind.contains("Deregistered") {
                            recheck = true;
                        }
                    }
                    _ => {}
                }
            }
            if recheck {
                let (end, _) = self.check_now(child_job_id).await?;
                if end.is_some() {
                    return Ok(end);
                }
            }
        }
    }

    async fn follow_blocking(
        &self,
        child_job_id: &str,
        from_index: u64,
    ) -> Result<Terminal, NomadError> {
        let mut index = from_index.max(1);
        let mut failing_since: Option<Instant> = None;
        let mut backoff = Duration::from_millis(200);
        loop {
            let result = match self
                .job_allocations(child_job_id, Some((index, FOLLOW_WAIT)))
                .await
            {
                Ok((allocs, new_index)) => self
                    .end_of(child_job_id, &allocs, new_index)
                    .await
                    .map(|end| (end, new_index)),
                Err(e) => Err(e),
            };
            match result {
                Ok((Some(end), _)) => return Ok(end),
                Ok((None, new_index)) => {
                    failing_since = None;
                    backoff = Duration::from_millis(200);
                    // An index that goes backwards means Nomad's state was reset.
                    index = if new_index < index {
                        1
                    } else {
                        new_index.max(1)
                    };
                }
                Err(e) if e.is_transient() => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.patience {
                        return Err(e);
                    }
                    warn!(job = child_job_id, "{e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The terminal allocation that decides the job's end: the newest one.
fn latest_terminal(allocs: &[AllocationStub]) -> Option<&AllocationStub> {
    allocs
        .iter()
        .filter(|a| a.is_terminal())
        .max_by_key(|a| (a.create_index, a.modify_index))
}

/// An HCL2 variables file (`name = "value"` lines) for `/v1/jobs/parse`.
pub fn variables_file(variables: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in variables {
        let mut quoted = String::with_capacity(v.len() + 2);
        for c in v.chars() {
            match c {
                '"' => quoted.push_str("\\\""),
                '\\' => quoted.push_str("\\\\"),
                '\n' => quoted.push_str("\\n"),
                '\r' => quoted.push_str("\\r"),
                '\t' => quoted.push_str("\\t"),
                // `${` and `%{` start HCL templates; `$${`/`%%{` are their escapes.
                '{' if quoted.ends_with('$') || quoted.ends_with('%') => {
                    let last = quoted.pop().unwrap_or('$');
                    quoted.push(last);
                    quoted.push(last);
                    quoted.push('{');
                }
                c => quoted.push(c),
            }
        }
        out.push_str(&format!("{k} = \"{quoted}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = format!(
            "{}/../tests/fixtures/nomad-api/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    #[test]
    fn decodes_dispatch_responses() {
        let d: DispatchResponse = serde_json::from_str(&sample("dispatch.response.json")).unwrap();
        assert_eq!(d.dispatched_job_id, "example/dispatch-1485408778-81644024");
        assert_eq!(d.eval_id, "e5f55fac-bc69-119d-528a-1fc7ade5e02c");
        assert_eq!(
            (d.index, d.job_create_index, d.eval_create_index),
            (13, 12, 13)
        );
        let d: DispatchResponse =
            serde_json::from_str(&sample("dispatch-payload.response.json")).unwrap();
        assert_eq!(d.dispatched_job_id, "param/dispatch-1730920906-81821d1f");
    }

    #[test]
    fn decodes_allocations() {
        let list: Vec<AllocationStub> =
            serde_json::from_str(&sample("job.allocations.response.json")).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].client_status, "running");
        assert_eq!(list[0].task_states["redis"].events.len(), 4);
        assert_eq!(list[0].task_states["redis"].events[1].kind, "Task Setup");
        let list: Vec<AllocationStub> =
            serde_json::from_str(&sample("allocations.list.response.json")).unwrap();
        assert_eq!(list[0].node_name, "linux");
        assert_eq!(list[0].task_states["redis"].finished_at, None);
        // allocation.read repeats `PreviousAllocation`; we do not read it, so
        // the duplicate does not matter.
        let a: Allocation = serde_json::from_str(&sample("allocation.read.response.json")).unwrap();
        assert_eq!(a.id, "a8198d79-cfdb-6593-a999-1e9adabcba2e");
        assert_eq!(a.next_allocation, "cd13d9b9-4f97-7184-c88b-7b451981616b");
        assert!(!a.is_terminal());
    }

    #[test]
    fn decodes_evaluations() {
        let e: Evaluation = serde_json::from_str(&sample("evaluation.read.response.json")).unwrap();
        assert_eq!(e.status, "blocked");
        assert_eq!(e.failed_tg_allocs["cache"].summary(), "no eligible node");
        let e: Evaluation = serde_json::from_str(&sample(
            "evaluation.blocked-missing-devices.synthesized.json",
        ))
        .unwrap();
        assert_eq!(
            e.failed_tg_allocs["cache"].constraint_filtered["missing devices"],
            1
        );
        assert_eq!(
            e.failed_tg_allocs["cache"].summary(),
            "missing devices (1 node)"
        );
    }

    #[test]
    fn decodes_nodes_and_updates() {
        let n: Node = serde_json::from_str(&sample("node.read.response.json")).unwrap();
        assert_eq!(n.stub.name, "mew");
        assert_eq!(n.stub.scheduling_eligibility, "eligible");
        assert_eq!(n.device_ids("hashicorp", "skeleton").len(), 2);
        assert_eq!(n.attributes["kernel.name"], "linux");
        for f in ["node.drain.response.json", "node.eligibility.response.json"] {
            let u: NodeUpdateResponse = serde_json::from_str(&sample(f)).unwrap();
            assert_eq!(u.node_modify_index, 3742);
        }
    }

    #[test]
    fn decodes_job_answers() {
        let s: StopResponse = serde_json::from_str(&sample("job.stop.response.json")).unwrap();
        assert_eq!(s.job_modify_index, 34);
        let r: RegisterResponse =
            serde_json::from_str(&sample("job.register.response.json")).unwrap();
        assert_eq!((r.eval_id.as_str(), r.job_modify_index), ("", 109));
        let job: Value = serde_json::from_str(&sample("job.read.response.json")).unwrap();
        assert_eq!(job["ParameterizedJob"]["MetaRequired"][0], "foo");
    }

    #[test]
    fn decodes_event_stream_lines() {
        for f in [
            "event-stream.sample.ndjson",
            "event-stream.allocation.synthesized.ndjson",
        ] {
            let batches: Vec<EventBatch> = sample(f)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert!(batches[0].is_heartbeat(), "{f}");
            assert!(batches.iter().any(|b| !b.is_heartbeat()), "{f}");
        }
        let line = sample("event-stream.allocation.synthesized.ndjson")
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        let batch: EventBatch = serde_json::from_str(&line).unwrap();
        let ev = &batch.events[0];
        assert_eq!(
            (ev.topic.as_str(), ev.kind.as_str()),
            ("Allocation", "AllocationUpdated")
        );
        assert_eq!(ev.filter_keys, vec!["example".to_string(), String::new()]);
        let alloc = ev.allocation().unwrap().unwrap();
        assert_eq!(alloc.job_id, "example");
        assert_eq!(alloc.client_status, "running");
    }

    fn alloc_with(client: &str, desired: &str, events: Vec<TaskEvent>) -> AllocationStub {
        let mut a: AllocationStub =
            serde_json::from_str(&sample("allocation.read.response.json")).unwrap();
        a.client_status = client.into();
        a.desired_status = desired.into();
        a.task_states = [(
            "gpu-task".to_string(),
            TaskState {
                state: "dead".into(),
                failed: client == "failed",
                events,
                ..Default::default()
            },
        )]
        .into();
        a
    }

    fn ev(kind: &str) -> TaskEvent {
        TaskEvent {
            kind: kind.into(),
            ..Default::default()
        }
    }

    #[test]
    fn reasons_come_from_task_events() {
        let exit2 = TaskEvent {
            exit_code: 2,
            ..ev("Terminated")
        };
        let a = alloc_with("failed", "run", vec![ev("Received"), ev("Started"), exit2]);
        let t = Terminal::from_allocation(&a, 9);
        assert_eq!(t.status, TerminalStatus::Failed);
        assert_eq!(t.reason, "gpu-task exited with code 2");

        let a = alloc_with("complete", "run", vec![ev("Started"), ev("Terminated")]);
        assert_eq!(
            Terminal::from_allocation(&a, 9).status,
            TerminalStatus::Complete
        );

        let a = alloc_with("lost", "run", vec![ev("Started")]);
        let t = Terminal::from_allocation(&a, 9);
        assert_eq!(
            (t.status, t.reason.as_str()),
            (TerminalStatus::Lost, "node lost")
        );

        let killed = TaskEvent {
            signal: 9,
            ..ev("Terminated")
        };
        let mut a = alloc_with(
            "complete",
            "stop",
            vec![ev("Started"), ev("Killing"), killed, ev("Killed")],
        );
        a.desired_description = "alloc not needed as job is stopped".into();
        let t = Terminal::from_allocation(&a, 9);
        assert_eq!(t.status, TerminalStatus::Stopped);
        assert!(
            t.reason.contains("job is stopped") && t.reason.contains("killed by signal 9"),
            "{}",
            t.reason
        );

        let df = TaskEvent {
            driver_error: "exec: \"gpu-task\": executable file not found in $PATH".into(),
            ..ev("Driver Failure")
        };
        let a = alloc_with("failed", "run", vec![ev("Received"), df]);
        assert!(Terminal::from_allocation(&a, 9)
            .reason
            .starts_with("gpu-task could not start: exec"));
    }

    #[test]
    fn errors_say_what_to_check() {
        let e = NomadError::Status {
            status: 500,
            body: "Payload exceeds maximum size; 16385 > 16384".into(),
        };
        assert!(!e.is_transient());
        assert!(NomadError::Status {
            status: 500,
            body: "rpc error: No cluster leader".into()
        }
        .is_transient());
        assert!(NomadError::Status {
            status: 503,
            body: String::new()
        }
        .is_transient());
        let e = NomadError::Status {
            status: 403,
            body: "Permission denied".into(),
        };
        assert!(e.to_string().contains("NOMAD_TOKEN"), "{e}");
        let e = NomadError::Status {
            status: 500,
            body: "parameterized job not found".into(),
        };
        assert!(e.to_string().contains("nomad job run"), "{e}");
        assert!(matches!(
            NomadClient::new("localhost:4646", None),
            Err(NomadError::BadAddress { .. })
        ));
        assert!(NomadClient::new("http://127.0.0.1:4646/", None).is_ok());
    }

    #[test]
    fn decodes_the_recorded_job_list() {
        let list: Vec<JobListStub> = serde_json::from_str(&sample("jobs.list.response.json")).unwrap();
        assert_eq!(list[0].id, "example");
        assert_eq!(list[0].status, "pending");
        assert!(!list[0].stop);
    }

    #[tokio::test]
    async fn unreachable_says_check_nomad_addr() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = NomadClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let unreachable = r#"comfy_multi_nomad_api_errors_total{kind="unreachable"}"#;
        let count = |text: String| {
            text.lines().find_map(|l| l.strip_prefix(unreachable)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        let before = count(crate::metrics::render());
        let e = c.nodes().await.unwrap_err();
        assert!(e.is_transient());
        assert!(e.to_string().contains("NOMAD_ADDR"), "{e}");
        assert!(count(crate::metrics::render()) > before, "counted in the metrics");
    }

    #[test]
    fn ids_and_variables_are_encoded() {
        assert_eq!(
            encode_id("comfy-workflow/dispatch-1-0a1b2c3d"),
            "comfy-workflow%2Fdispatch-1-0a1b2c3d"
        );
        assert_eq!(go_duration(Duration::from_secs(300)), "300000ms");
        let vars: BTreeMap<String, String> = [
            ("gpu_count".to_string(), "0".to_string()),
            ("x".to_string(), "a\"b${c}".to_string()),
        ]
        .into();
        assert_eq!(
            variables_file(&vars),
            "gpu_count = \"0\"\nx = \"a\\\"b$${c}\"\n"
        );
        let parsed = hcl::parse(&variables_file(&vars)).unwrap();
        assert_eq!(parsed.attributes().count(), 2);
    }
}
