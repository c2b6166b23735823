//! Runs each job as a dispatch of the parameterized Nomad job.
//!
//! This is how the workshop runs: Nomad places the child job on the GPU node
//! (its device request is the GPU lease), gpu-task runs inside it, and the
//! whole queue is visible in `nomad job status comfy-workflow`. The dispatch
//! carries the contract meta and, when it fits, the workflow as payload; the
//! idempotency token is the job id and attempt ([`super::dispatch_token`]), so a dispatcher that restarts mid-dispatch
//! gets the same child back instead of running the workflow twice.

use std::time::Duration;

use async_trait::async_trait;

use super::{attempt_of_token, meta_for, payload_for, Executor, ExecutorError, Outcome, Run, Started};
use crate::config::NomadConfig;
use crate::contract::META_JOB_ID;
use crate::health::Component;
use crate::job::Job;
use crate::nomad::{NomadClient, NomadError, TerminalStatus};

/// Dispatches `job` (normally `comfy-workflow`) once per comfy-multi job.
#[derive(Debug, Clone)]
pub struct NomadExecutor {
    client: NomadClient,
    job: String,
}

/// How long [`Executor::wait`] retries Nomad by itself before it returns
/// the error: a blip passes unseen, an outage reaches the dispatch loop,
/// which keeps retrying and tells `/healthz` that Nomad is down.
pub const FOLLOW_PATIENCE: Duration = Duration::from_secs(5);

impl NomadExecutor {
    /// An executor dispatching the parameterized job `job` through `client`
    /// (following runs with [`FOLLOW_PATIENCE`]).
    pub fn new(client: NomadClient, job: impl Into<String>) -> Self {
        NomadExecutor {
            client: client.with_patience(FOLLOW_PATIENCE),
            job: job.into(),
        }
    }

    /// An executor for the `nomad` section of the configuration.
    pub fn from_config(config: &NomadConfig) -> Result<Self, NomadError> {
        Ok(Self::new(
            NomadClient::new(&config.addr, config.token.clone())?,
            config.job.clone(),
        ))
    }

    /// The client, for callers that need more of Nomad's API.
    pub fn client(&self) -> &NomadClient {
        &self.client
    }

    /// The parameterized job dispatched.
    pub fn job(&self) -> &str {
        &self.job
    }
}

/// Whether an error about the dispatch is the job's fault (it will never be
/// accepted) rather than Nomad's or the operator's (jobs should wait).
fn is_rejection(e: &NomadError) -> bool {
    match e {
        NomadError::Status { status, body } => {
            let operator_must_fix = body.contains("parameterized job not found")
                || body.contains("is stopped")
                || body.contains("is not a parameterized job")
                || body.contains("Permission denied")
                || body.contains("ACL token not found");
            !e.is_transient()
                && !operator_must_fix
                && (*status == 400 || *status == 500 || *status == 413)
        }
        _ => false,
    }
}

#[async_trait]
impl Executor for NomadExecutor {
    async fn start(&self, job: &Job) -> Result<Started, ExecutorError> {
        let meta = meta_for(job);
        let payload = payload_for(job);
        let token = super::dispatch_token(job);
        match self
            .client
            .dispatch(&self.job, &meta, payload.as_deref(), &token)
            .await
        {
            Ok(resp) => {
                tracing::info!(job = %job.id, child = %resp.dispatched_job_id, "dispatched to Nomad");
                Ok(Started {
                    executor_ref: resp.dispatched_job_id,
                    index: resp.index,
                })
            }
            Err(e) if is_rejection(&e) => Err(ExecutorError::Rejected(format!(
                "Nomad refused the dispatch of {}: {e}",
                self.job
            ))),
            Err(e) => Err(ExecutorError::Unavailable(e.to_string())),
        }
    }

    async fn wait(&self, started: &Started) -> Result<Outcome, ExecutorError> {
        let end = self
            .client
            .follow_to_end(&started.executor_ref, started.index)
            .await
            .map_err(|e| {
                ExecutorError::Unavailable(format!("cannot follow {}: {e}", started.executor_ref))
            })?;
        tracing::info!(child = %started.executor_ref, status = ?end.status, reason = %end.reason, "Nomad job ended");
        Ok(match end.status {
            TerminalStatus::Complete => Outcome::Completed,
            TerminalStatus::Failed => Outcome::Failed { reason: end.reason },
            TerminalStatus::Stopped => Outcome::Failed { reason: end.reason },
            TerminalStatus::Lost | TerminalStatus::Gone => Outcome::Lost { reason: end.reason },
        })
    }

    async fn stop(&self, executor_ref: &str) -> Result<(), ExecutorError> {
        match self.client.stop_job(executor_ref, false).await {
            Ok(_) => Ok(()),
            // Already gone: nothing left to stop.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(ExecutorError::Unavailable(format!(
                "cannot stop {executor_ref}: {e}"
            ))),
        }
    }

    /// The children of the parameterized job that are pending or running
    /// and not being stopped, each read once for its meta `job_id` and
    /// idempotency token (the job list carries neither).
    async fn runs(&self) -> Result<Vec<Run>, ExecutorError> {
        let unavailable = |e: NomadError| ExecutorError::Unavailable(format!("cannot list the runs: {e}"));
        let prefix = format!("{}/dispatch-", self.job);
        let stubs = self.client.list_jobs(&prefix).await.map_err(unavailable)?;
        let mut runs = Vec::new();
        for stub in stubs.into_iter().filter(|s| s.status != "dead" && !s.stop && s.parent_id == self.job) {
            let Some(job) = self.client.read_job(&stub.id).await.map_err(unavailable)? else { continue };
            let meta = |key: &str| job.pointer(&format!("/Meta/{key}")).and_then(serde_json::Value::as_str);
            let Some(job_id) = meta(META_JOB_ID).and_then(|id| id.parse().ok()) else {
                tracing::warn!(child = %stub.id, "a child of {} without a valid meta job_id", self.job);
                continue;
            };
            let token = job.get("DispatchIdempotencyToken").and_then(serde_json::Value::as_str).unwrap_or_default();
            runs.push(Run { executor_ref: stub.id, job_id, attempt: attempt_of_token(token) });
        }
        Ok(runs)
    }

    fn remote(&self) -> Option<Component> {
        Some(Component::Nomad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_dispatch_errors() {
        let status = |status, body: &str| NomadError::Status {
            status,
            body: body.into(),
        };
        assert!(is_rejection(&status(
            500,
            "Payload exceeds maximum size; 16385 > 16384"
        )));
        assert!(is_rejection(&status(
            500,
            "Dispatch did not provide required meta keys: [job_id]"
        )));
        assert!(!is_rejection(&status(500, "parameterized job not found")));
        assert!(!is_rejection(&status(500, "rpc error: No cluster leader")));
        assert!(!is_rejection(&status(403, "Permission denied")));
        assert!(!is_rejection(&status(503, "")));
    }
}
