//! Names shared across process boundaries.
//!
//! The Nomad job spec (`nomad/comfy-workflow.nomad.hcl`), gpu-task, the gateway
//! and the dispatcher all agree on these. A test parses the job spec and checks
//! it against the constants here, so they cannot drift apart.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Name of the parameterized Nomad batch job that runs one workflow.
pub const NOMAD_JOB: &str = "comfy-workflow";
/// Name of the task inside [`NOMAD_JOB`] that runs gpu-task.
pub const NOMAD_TASK: &str = "gpu-task";

/// Dispatch meta key: the comfy-multi job id (also the idempotency token).
pub const META_JOB_ID: &str = "job_id";
/// Dispatch meta key: the participant's number.
pub const META_USER_ID: &str = "user_id";
/// Dispatch meta key: the job's priority tier (optional).
pub const META_PRIORITY: &str = "priority";
/// Meta keys that every dispatch must carry (`meta_required`).
pub const META_REQUIRED: [&str; 2] = [META_JOB_ID, META_USER_ID];
/// Meta keys a dispatch may carry (`meta_optional`).
pub const META_OPTIONAL: [&str; 1] = [META_PRIORITY];

/// File name (inside the task's `local/` dir) Nomad writes the payload to.
pub const PAYLOAD_FILE: &str = "workflow.json";
/// Nomad refuses payloads larger than this many bytes (after base64 decoding).
pub const NOMAD_PAYLOAD_LIMIT: usize = 16 * 1024;

/// Consul service name of the warm ComfyUI on the GPU node.
pub const CONSUL_COMFYUI_SERVICE: &str = "comfyui";
/// Consul service name of the gateway (what gpu-task calls back).
pub const CONSUL_GATEWAY_SERVICE: &str = "comfy-gateway";

/// Header carrying the shared secret on every internal API call
/// (`Authorization: Bearer <secret>` is accepted too).
pub const INTERNAL_SECRET_HEADER: &str = "x-comfy-multi-secret";

/// Paths of the gateway's internal API, used by gpu-task. Participants never
/// reach these: every call must carry the shared secret.
pub mod internal {
    /// Prefix of every internal route.
    pub const PREFIX: &str = "/_internal";

    /// `GET`: the job's [`super::WorkflowPayload`].
    pub fn workflow(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/workflow")
    }
    /// `POST`: gpu-task has started working on the job (moves it to `running`).
    pub fn started(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/started")
    }
    /// `POST` a ComfyUI websocket message (`{type, data}`) to relay to the user.
    pub fn events(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/events")
    }
    /// `PUT` one output file's bytes; query [`super::OutputQuery`]. Idempotent.
    pub fn outputs(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/outputs")
    }
    /// `POST` one binary preview frame from ComfyUI's websocket, as received
    /// (type 1, or type 4 of the job's prompt), to relay to the user. Best
    /// effort: gpu-task drops previews rather than wait.
    pub fn preview(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/preview")
    }
    /// `POST` the final [`super::Finished`] report.
    pub fn finished(job: &str) -> String {
        format!("{PREFIX}/jobs/{job}/finished")
    }
    /// `GET` one of the participant's files the job's prompt refers to
    /// (one of [`super::WorkflowPayload::inputs`], URL-encoded as a whole).
    pub fn input(job: &str, reference: &str) -> String {
        format!("{PREFIX}/jobs/{job}/inputs/{}", urlencoding::encode(reference))
    }
}

/// Key in a job's stored `extra_data` under which the gateway keeps the
/// prompt's file references ([`WorkflowPayload::inputs`]) at submit time.
/// [`WorkflowPayload::from_job`] moves it out, so ComfyUI never sees it.
pub const INPUTS_EXTRA_DATA_KEY: &str = "comfy_multi_inputs";

/// A file reference in a prompt's string input, ComfyUI's way
/// (`folder_paths.annotated_filepath`): `path [input]`, `path [temp]`,
/// `path [output]`, or a plain `path` (input). Returns the folder type and
/// the path within it (`sub/name.png`). Says nothing about whether the path
/// is safe or exists.
pub fn split_file_reference(value: &str) -> (&'static str, &str) {
    for kind in ["input", "temp", "output"] {
        if let Some(path) = value.strip_suffix(&format!(" [{kind}]")[..]) {
            return (kind, path);
        }
    }
    ("input", value)
}

/// What gpu-task runs: the dispatch payload, or the answer of
/// [`internal::workflow`] when the payload would exceed Nomad's limit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkflowPayload {
    /// The workflow in ComfyUI's API ("prompt") format.
    pub prompt: Value,
    /// ComfyUI's `extra_data` (e.g. `extra_pnginfo`), passed through to `/prompt`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub extra_data: Value,
    /// The participant's uploaded files the prompt refers to: string input
    /// values such as `photo.png`, `clipspace/mask.png [input]` or
    /// `webcam/1.png [temp]`, each naming a file in the participant's own
    /// area. gpu-task fetches each ([`internal::input`]), uploads it to
    /// ComfyUI and rewrites the prompt to ComfyUI's name for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
}

impl WorkflowPayload {
    /// The payload of a job, from its stored workflow and `extra_data`: the
    /// gateway's [`INPUTS_EXTRA_DATA_KEY`] moves from `extra_data` to
    /// [`WorkflowPayload::inputs`].
    pub fn from_job(prompt: Value, mut extra_data: Value) -> WorkflowPayload {
        let inputs = match extra_data.as_object_mut().and_then(|m| m.remove(INPUTS_EXTRA_DATA_KEY)) {
            Some(Value::Array(list)) => list.into_iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            _ => Vec::new(),
        };
        WorkflowPayload { prompt, extra_data, inputs }
    }
}

/// Query of an output upload: where the file belongs in ComfyUI's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputQuery {
    /// The node id that produced it.
    pub node: String,
    /// The kind of output in ComfyUI's `executed` message (`images`, `gifs`, `audio`, ...).
    pub kind: String,
    /// The file name ComfyUI gave it.
    pub filename: String,
    /// Its position within the node's outputs of that kind.
    #[serde(default)]
    pub index: u32,
    /// ComfyUI's folder type: `output` (saved) or `temp` (a `PreviewImage`).
    #[serde(rename = "type", default = "output_type")]
    pub folder_type: String,
}

fn output_type() -> String {
    "output".into()
}

/// gpu-task's final report on a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Finished {
    /// `true` when ComfyUI ran the whole prompt and every output was uploaded.
    pub success: bool,
    /// One line saying why, when it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// ComfyUI's history `status.messages` for the prompt, if it gave any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Value>,
    /// With `success: false`: this run could not do the job for a reason
    /// outside the workflow (ComfyUI unreachable), so another run may. The
    /// job is not ended: the gateway notes `error` as the run's reason and
    /// the dispatcher, seeing gpu-task exit, requeues it (up to
    /// `max_attempts`) or fails it with that reason.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retryable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_move_out_of_extra_data() {
        let p = WorkflowPayload::from_job(
            json!({"1": {}}),
            json!({"client_id": "c", INPUTS_EXTRA_DATA_KEY: ["a.png", "sub/b.png [input]"]}),
        );
        assert_eq!(p.inputs, vec!["a.png".to_string(), "sub/b.png [input]".to_string()]);
        assert_eq!(p.extra_data, json!({"client_id": "c"}));
        let text = serde_json::to_value(&p).unwrap();
        assert_eq!(text["inputs"], json!(["a.png", "sub/b.png [input]"]));
        // Old payloads (no inputs) still read, and write no `inputs`.
        let old: WorkflowPayload = serde_json::from_value(json!({"prompt": {}})).unwrap();
        assert!(old.inputs.is_empty());
        assert!(serde_json::to_value(&old).unwrap().get("inputs").is_none());
        assert_eq!(split_file_reference("a.png"), ("input", "a.png"));
        assert_eq!(split_file_reference("w/1.png [temp]"), ("temp", "w/1.png"));
        assert_eq!(split_file_reference("x [output]"), ("output", "x"));
        assert_eq!(split_file_reference("x[input]"), ("input", "x[input]"));
        // Uploads from before `type` existed are outputs.
        let q: OutputQuery = serde_json::from_value(json!({"node": "7", "kind": "images", "filename": "a.png"})).unwrap();
        assert_eq!(q.folder_type, "output");
        assert_eq!(internal::input("j", "sub/b.png [input]"), "/_internal/jobs/j/inputs/sub%2Fb.png%20%5Binput%5D");
    }
}
