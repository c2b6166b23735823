//! How a job is actually run, behind one trait.
//!
//! - [`nomad::NomadExecutor`] dispatches the parameterized Nomad job and
//!   follows the child's allocation (event stream, blocking queries as
//!   fallback) to its end.
//! - [`local::LocalExecutor`] runs gpu-task as a child process per job, with
//!   the environment Nomad would give it. The single-machine default.
//!
//! Both hand gpu-task the same things: meta `job_id`, `user_id`, `priority` as
//! `NOMAD_META_*`, and the workflow as `local/workflow.json` when it fits
//! Nomad's payload limit (otherwise gpu-task fetches it from the gateway).

use async_trait::async_trait;

use crate::contract::{WorkflowPayload, NOMAD_PAYLOAD_LIMIT};
use crate::health::Component;
use crate::job::{Job, JobId};

pub mod local;
pub mod nomad;

/// A job an executor has accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// What the executor calls the job: the Nomad child job id, or `local:<job id>.<attempt>`.
    pub executor_ref: String,
    /// The executor's own progress marker (Nomad's index after the dispatch),
    /// so that [`Executor::wait`] misses no event.
    pub index: u64,
}

/// How a started job ended, as the executor saw it. What gpu-task reported to
/// the gateway is in the job record; this is the fallback when it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// gpu-task exited 0.
    Completed,
    /// gpu-task exited non-zero or could not start; `reason` says why.
    Failed { reason: String },
    /// The executor lost track of it (node lost, allocation gone).
    Lost { reason: String },
}

/// A run the executor has that is not over (pending or running, and not
/// being stopped), whoever started it: what reconciliation compares with
/// the jobs Redis says are in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// As in [`Started::executor_ref`].
    pub executor_ref: String,
    /// The comfy-multi job it runs (dispatch meta `job_id`).
    pub job_id: JobId,
    /// Which attempt of the job it is, from its [`dispatch_token`], when known.
    pub attempt: Option<u32>,
}

/// The attempt in a [`dispatch_token`] (`<job id>.<attempt>`).
pub fn attempt_of_token(token: &str) -> Option<u32> {
    token.rsplit_once('.')?.1.parse().ok()
}

/// Why an executor could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// Transient: the executor cannot be reached now. The job stays queued
    /// and the dispatcher backs off.
    #[error("executor unavailable: {0}")]
    Unavailable(String),
    /// Permanent: this job cannot be run this way (the executor refused it).
    #[error("executor refused the job: {0}")]
    Rejected(String),
}

/// Runs jobs.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Hands `job` over. Idempotent by job id: starting the same job twice
    /// yields the same run.
    async fn start(&self, job: &Job) -> Result<Started, ExecutorError>;
    /// Waits until the started job has ended.
    async fn wait(&self, started: &Started) -> Result<Outcome, ExecutorError>;
    /// Stops a started job (cancel, drain deadline): gpu-task gets SIGTERM and
    /// time to interrupt its prompt.
    async fn stop(&self, executor_ref: &str) -> Result<(), ExecutorError>;
    /// Every run not over yet ([`Run`]), including those an earlier
    /// dispatcher started.
    async fn runs(&self) -> Result<Vec<Run>, ExecutorError>;
    /// The remote service this executor depends on, whose health
    /// ([`crate::health`]) its errors tell; `None` for the local executor.
    fn remote(&self) -> Option<Component> {
        None
    }
}

/// The payload bytes for `job`, or `None` when they exceed Nomad's limit and
/// gpu-task must fetch the workflow from the gateway instead.
pub fn payload_for(job: &Job) -> Option<Vec<u8>> {
    let payload = WorkflowPayload::from_job(job.workflow.clone(), job.extra_data.clone());
    let bytes = serde_json::to_vec(&payload).ok()?;
    (bytes.len() <= NOMAD_PAYLOAD_LIMIT).then_some(bytes)
}

/// The idempotency token of `job`'s current attempt: `<job id>.<attempt>`.
///
/// The same attempt dispatched twice (a dispatcher that restarts mid-dispatch)
/// is one run; a requeued job (drain, lost node) gets a fresh run, not the
/// dead child of its previous attempt.
pub fn dispatch_token(job: &Job) -> String {
    format!("{}.{}", job.id, job.attempts)
}

/// The dispatch meta of `job` (keys from [`crate::contract`]).
pub fn meta_for(job: &Job) -> std::collections::BTreeMap<String, String> {
    use crate::contract::{META_JOB_ID, META_PRIORITY, META_USER_ID};
    [
        (META_JOB_ID.to_string(), job.id.to_string()),
        (META_USER_ID.to_string(), job.user.to_string()),
        (META_PRIORITY.to_string(), job.priority.to_string()),
    ]
    .into()
}
