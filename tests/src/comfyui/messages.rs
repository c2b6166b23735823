//! What the stand-in says on the websocket and in `/history`, as types whose
//! field order is the order ComfyUI 0.3.64 writes (see
//! `shared/comfyui-samples/*.ws-transcript.json` and `*.history.json`).
//!
//! Why typed: the shapes are a contract that gpu-task and the gateway parse;
//! a struct per message makes a wrong key a compile error rather than a
//! silent difference, and derived `Serialize` keeps the recorded key order.

use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;

use super::json::{dumps_python, Json, Map};

/// `{"type": kind, "data": data}`, the frame of every JSON websocket message.
#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    data: &'a T,
}

/// The text of a websocket message, as Python's `json.dumps` writes it.
pub fn frame<T: Serialize>(kind: &str, data: &T) -> String {
    dumps_python(&Envelope { kind, data })
}

/// `{"exec_info": {"queue_remaining": N}}` (`GET /prompt` and `status`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct QueueInfo {
    /// The only member ComfyUI sends.
    pub exec_info: ExecInfo,
}

/// Pending plus running prompts.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ExecInfo {
    /// Prompts queued or running.
    pub queue_remaining: usize,
}

impl QueueInfo {
    /// The info for `n` remaining prompts.
    pub fn new(n: usize) -> QueueInfo {
        QueueInfo { exec_info: ExecInfo { queue_remaining: n } }
    }
}

/// `status`: broadcast on every queue change; with `sid` only on connect.
#[derive(Serialize)]
pub struct Status {
    /// The queue.
    pub status: QueueInfo,
    /// The client id the server assigned or accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

/// The server's `feature_flags` (also `GET /features`).
#[derive(Serialize)]
pub struct FeatureFlags {
    /// ComfyUI can send previews with metadata (binary type 4).
    pub supports_preview_metadata: bool,
    /// `--max-upload-size` in bytes (default 100 MiB).
    pub max_upload_size: u64,
}

/// The flags ComfyUI 0.3.64 announces.
pub const FEATURE_FLAGS: FeatureFlags =
    FeatureFlags { supports_preview_metadata: true, max_upload_size: MAX_UPLOAD_SIZE };

/// ComfyUI's default `max_upload_size` (and request size limit).
pub const MAX_UPLOAD_SIZE: u64 = 100 * 1024 * 1024;

/// `execution_start` and `execution_success`.
#[derive(Serialize, Clone, Debug)]
pub struct PromptEvent {
    /// The prompt.
    pub prompt_id: String,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// `execution_cached`.
#[derive(Serialize, Clone, Debug)]
pub struct ExecutionCached {
    /// Nodes of the prompt whose outputs are cached, in prompt order.
    pub nodes: Vec<String>,
    /// The prompt.
    pub prompt_id: String,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// `execution_interrupted`.
#[derive(Serialize, Clone, Debug)]
pub struct ExecutionInterrupted {
    /// The prompt.
    pub prompt_id: String,
    /// The node that was about to run.
    pub node_id: String,
    /// Its class.
    pub node_type: String,
    /// Nodes that ran before.
    pub executed: Vec<String>,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// `execution_error`.
#[derive(Serialize, Clone, Debug)]
pub struct ExecutionError {
    /// The prompt.
    pub prompt_id: String,
    /// The failing node.
    pub node_id: String,
    /// Its class.
    pub node_type: String,
    /// Nodes that ran before.
    pub executed: Vec<String>,
    /// `str(exception)` plus ComfyUI's tip line (empty here, so a trailing newline).
    pub exception_message: String,
    /// The Python exception's full type name.
    pub exception_type: String,
    /// Traceback lines.
    pub traceback: Vec<String>,
    /// The node's inputs, each as a list of values.
    pub current_inputs: Json,
    /// Node ids of the prompt with outputs in the cache.
    pub current_outputs: Vec<String>,
    /// Milliseconds since the epoch.
    pub timestamp: u64,
}

/// The data of an event that goes into `history.status.messages`.
#[derive(Serialize, Clone, Debug)]
#[serde(untagged)]
pub enum StatusData {
    /// `execution_start` / `execution_success`.
    Prompt(PromptEvent),
    /// `execution_cached`.
    Cached(ExecutionCached),
    /// `execution_interrupted`.
    Interrupted(ExecutionInterrupted),
    /// `execution_error`.
    Error(ExecutionError),
}

/// `[event, data]` in `history.status.messages`.
#[derive(Serialize, Clone, Debug)]
pub struct StatusMessage(pub &'static str, pub StatusData);

/// `executing` for a node (`display_node` present) or the end (`node: null`).
#[derive(Serialize)]
pub struct Executing {
    /// The node, or `None` when the prompt is done.
    pub node: Option<String>,
    /// The node shown in the editor; absent in the final message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_node: Option<String>,
    /// The prompt.
    pub prompt_id: String,
}

/// `executing` as sent to a client that reconnects while its prompt runs.
#[derive(Serialize)]
pub struct ExecutingResume {
    /// The node running.
    pub node: String,
}

/// One file in a node's UI output.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct ImageRef {
    /// File name in its folder.
    pub filename: String,
    /// Folder below the type's directory ("" for none).
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A node's UI output (`executed.output`, `history.outputs[id]`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct UiOutput {
    /// Saved or previewed images.
    pub images: Vec<ImageRef>,
}

/// `executed`.
#[derive(Serialize)]
pub struct Executed<'a> {
    /// The node.
    pub node: &'a str,
    /// The node shown in the editor.
    pub display_node: &'a str,
    /// Its UI output (`null` for a cached node without one).
    pub output: Option<&'a UiOutput>,
    /// The prompt.
    pub prompt_id: &'a str,
}

/// One node in `progress_state`.
#[derive(Serialize, Clone, Debug)]
pub struct NodeProgress {
    /// Progress value: `0.0`/`1.0` for a node that ran, `1` for a cached one.
    pub value: Json,
    /// Progress maximum, typed like `value`.
    pub max: Json,
    /// `running` or `finished`.
    pub state: &'static str,
    /// The node.
    pub node_id: String,
    /// The prompt.
    pub prompt_id: String,
    /// The node shown in the editor.
    pub display_node_id: String,
    /// The subgraph parent (none here).
    pub parent_node_id: Option<String>,
    /// The node in the original graph.
    pub real_node_id: String,
}

/// `progress_state`: every node that started, in start order.
#[derive(Serialize)]
pub struct ProgressState<'a> {
    /// The prompt.
    pub prompt_id: &'a str,
    /// Node states.
    pub nodes: &'a Map<NodeProgress>,
}

/// `history[id].meta[node]`.
#[derive(Serialize, Clone, Debug)]
pub struct Meta {
    /// The node.
    pub node_id: String,
    /// The node shown in the editor.
    pub display_node: String,
    /// The subgraph parent (none here).
    pub parent_node: Option<String>,
    /// The node in the original graph.
    pub real_node_id: String,
}

impl Meta {
    /// The meta of a top-level node.
    pub fn of(node: &str) -> Meta {
        Meta { node_id: node.into(), display_node: node.into(), parent_node: None, real_node_id: node.into() }
    }
}

/// A queued prompt: `[number, prompt_id, prompt, extra_data, outputs_to_execute]`
/// on the wire; the sensitive extra data stays server-side.
#[derive(Clone, Debug)]
pub struct QueueItem {
    /// Priority: the running counter, its negation for `front`, or the client's float.
    pub number: Json,
    /// The prompt id.
    pub prompt_id: String,
    /// The prompt after validation (values converted like ComfyUI does).
    pub prompt: Map<Json>,
    /// Extra data with `client_id`, without the sensitive keys.
    pub extra_data: Map<Json>,
    /// Output nodes to run.
    pub outputs: Vec<String>,
}

impl Serialize for QueueItem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(5))?;
        seq.serialize_element(&self.number)?;
        seq.serialize_element(&self.prompt_id)?;
        seq.serialize_element(&self.prompt)?;
        seq.serialize_element(&self.extra_data)?;
        seq.serialize_element(&self.outputs)?;
        seq.end()
    }
}

/// `history[id].status`.
#[derive(Serialize, Clone, Debug)]
pub struct HistoryStatus {
    /// `success` or `error`.
    pub status_str: &'static str,
    /// Whether the prompt ran to the end.
    pub completed: bool,
    /// The recorded execution events.
    pub messages: Vec<StatusMessage>,
}

/// `history[id]`.
#[derive(Serialize, Clone, Debug)]
pub struct HistoryEntry {
    /// The queue item.
    pub prompt: QueueItem,
    /// UI outputs by node.
    pub outputs: Map<UiOutput>,
    /// How it ended.
    pub status: HistoryStatus,
    /// Node meta by node.
    pub meta: Map<Meta>,
}
