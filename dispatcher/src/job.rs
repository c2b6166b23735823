//! The job record and its state machine.
//!
//! A job is one participant's workflow, from the moment the gateway accepts it
//! until it ends. This module is the only place that knows which state may
//! follow which; the queue applies a change only if [`JobState::sources`]
//! allows it, atomically, in Redis.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job's id. It is also ComfyUI's `prompt_id` for the participant and the
/// idempotency token of the Nomad dispatch.
pub type JobId = uuid::Uuid;

/// Where a job is in its life (contract: see `shared/design.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting in the queue.
    Queued,
    /// Taken from the queue and handed to an executor (a Nomad dispatch or a
    /// local process), not yet confirmed started by gpu-task.
    Dispatched,
    /// gpu-task reported it is working on it.
    Running,
    /// Finished, outputs attached.
    Succeeded,
    /// Ended with an error; `error` says why.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobState {
    /// Every state, in life order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The name stored in Redis and shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Dispatched or running: an executor holds it.
    pub fn is_in_flight(self) -> bool {
        matches!(self, JobState::Dispatched | JobState::Running)
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Dispatched)
                | (Queued, Cancelled)
                | (Dispatched, Running)
                | (Dispatched, Queued)
                | (Dispatched, Failed)
                | (Dispatched, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Queued)
        )
    }

    /// The states from which `next` may be reached.
    pub fn sources(next: JobState) -> Vec<JobState> {
        JobState::ALL.into_iter().filter(|s| s.can_become(next)).collect()
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`JobState::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// One output file, as ComfyUI's history and `/view` name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub filename: String,
    pub subfolder: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// A job's outputs in ComfyUI's history shape: node id → output kind
/// (`images`, ...) → files.
pub type Outputs = BTreeMap<String, BTreeMap<String, Vec<FileRef>>>;

/// Everything known about a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// The participant's number (`/user/{n}/`).
    pub user: u32,
    /// Position in submission order; ComfyUI's `number`.
    pub number: u64,
    /// The workflow in ComfyUI's API format (`{node_id: {class_type, inputs}}`).
    pub workflow: Value,
    /// ComfyUI's `extra_data` as the editor sent it.
    pub extra_data: Value,
    pub state: JobState,
    /// Priority tier: higher goes first (0 = normal).
    pub priority: i64,
    /// Milliseconds since the Unix epoch.
    pub created_at: u64,
    pub dispatched_at: Option<u64>,
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub outputs: Outputs,
    /// Why it failed, in one line a participant can read.
    pub error: Option<String>,
    /// How many times it was handed to an executor.
    pub attempts: u32,
    /// What the executor calls it: the Nomad child job id, or `local:<job id>.<attempt>`.
    pub executor_ref: Option<String>,
    /// ComfyUI's history `status.messages`, as gpu-task reported them.
    pub messages: Vec<Value>,
    /// Someone cancelled it while it was in flight: it ends `cancelled`.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The latest progress gpu-task relayed: `{node, value, max}`.
    #[serde(default)]
    pub progress: Option<Value>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert!(!from.can_become(to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn design_doc_transitions_are_allowed() {
        use JobState::*;
        for (a, b) in [
            (Queued, Dispatched),
            (Dispatched, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Dispatched, Queued),
            (Running, Queued),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        assert!(!Queued.can_become(Succeeded));
        assert!(!Queued.can_become(Running));
        assert_eq!(JobState::sources(Running), vec![Dispatched]);
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), Value::from(s.as_str()));
        }
        assert!("done".parse::<JobState>().is_err());
    }
}
