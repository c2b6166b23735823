//! Emptying the GPU safely before the rented node is deleted
//! (`dispatcher drain`), and carrying on afterwards (`dispatcher resume`).
//!
//! A drain pauses dispatching (atomically with the queue's pop, so no
//! dispatcher can take another job), waits for the jobs in flight until they
//! end or the deadline passes, then puts what is left back in the queue
//! (first, so a late report from the stopped gpu-task cannot fail it) and
//! stops its runs, and finally drains the GPU node(s) in Nomad. Queued jobs
//! stay queued throughout. Every step is idempotent: running it twice, or
//! after an interrupted run, finishes the job; an interrupted drain leaves
//! dispatching paused and nothing half-done.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::job::{Job, JobId, JobState};
use crate::nomad::{NomadClient, NomadError};
use crate::queue::{Patch, QueueError, Store};

/// Why a drain step failed.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("Nomad: {0}")]
    Nomad(#[from] NomadError),
}

/// What a drain did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs that were in flight and ended by themselves during the drain.
    pub finished: Vec<JobId>,
    /// Jobs stopped at the deadline and put back in the queue.
    pub requeued: Vec<JobId>,
    /// Jobs waiting in the queue when the drain ended.
    pub still_queued: u64,
    /// Nomad nodes drained (names).
    pub nodes: Vec<String>,
}

/// Drains and resumes.
pub struct Drainer {
    store: Store,
    nomad: Option<NomadClient>,
    gpu_node_pool: String,
}

/// Reason stored while a drain holds dispatching.
const PAUSE_REASON: &str = "drain";
/// How often the jobs in flight are looked at while waiting.
const POLL: Duration = Duration::from_millis(500);

impl Drainer {
    /// `nomad` is the Nomad client when jobs run there; its nodes in
    /// `gpu_node_pool` are drained at the end.
    pub fn new(store: Store, nomad: Option<NomadClient>, gpu_node_pool: impl Into<String>) -> Self {
        Drainer { store, nomad, gpu_node_pool: gpu_node_pool.into() }
    }

    /// Stops dispatching. Jobs in flight go on.
    pub async fn pause(&self) -> Result<(), DrainError> {
        Ok(self.store.pause(PAUSE_REASON).await?)
    }

    /// The jobs in flight now.
    pub async fn in_flight(&self) -> Result<Vec<Job>, DrainError> {
        let mut jobs = Vec::new();
        for id in self.store.inflight().await? {
            if let Some(job) = self.store.get(&id).await? {
                if job.state.is_in_flight() {
                    jobs.push(job);
                }
            }
        }
        Ok(jobs)
    }

    /// Waits until nothing is in flight or `deadline` passes, calling
    /// `on_tick` with the jobs still in flight at every look. Returns the ids
    /// of the jobs that were in flight at the start and have ended.
    pub async fn wait(&self, deadline: Instant, mut on_tick: impl FnMut(&[Job])) -> Result<Vec<JobId>, DrainError> {
        let start: BTreeSet<JobId> = self.in_flight().await?.iter().map(|j| j.id).collect();
        loop {
            let now = self.in_flight().await?;
            on_tick(&now);
            if now.is_empty() || Instant::now() >= deadline {
                let left: BTreeSet<JobId> = now.iter().map(|j| j.id).collect();
                return Ok(start.difference(&left).copied().collect());
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Puts every job still in flight back in the queue (at its old place),
    /// then stops its run: through Nomad for a dispatched child, through the
    /// dispatcher that owns it for a local process.
    pub async fn requeue_in_flight(&self) -> Result<Vec<JobId>, DrainError> {
        let mut requeued = Vec::new();
        for job in self.in_flight().await? {
            match self.store.transition(&job.id, JobState::Queued, Patch::default()).await {
                Ok(_) => requeued.push(job.id),
                // It ended meanwhile: nothing to stop.
                Err(QueueError::Transition { .. }) | Err(QueueError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
            let Some(executor_ref) = job.executor_ref else { continue };
            self.store.request_stop(&executor_ref).await?;
            if let (Some(nomad), false) = (&self.nomad, executor_ref.starts_with("local:")) {
                match nomad.stop_job(&executor_ref, false).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(requeued)
    }

    /// Drains (and so marks ineligible) every Nomad node of the GPU pool.
    pub async fn drain_nodes(&self, deadline: Duration) -> Result<Vec<String>, DrainError> {
        let Some(nomad) = &self.nomad else { return Ok(Vec::new()) };
        let mut drained = Vec::new();
        for node in nomad.nodes().await? {
            if node.node_pool == self.gpu_node_pool {
                if !node.drain {
                    nomad.drain_node(&node.id, Some(deadline)).await?;
                }
                drained.push(node.name);
            }
        }
        Ok(drained)
    }

    /// Number of queued jobs.
    pub async fn queued(&self) -> Result<u64, DrainError> {
        Ok(self.store.queued_count().await?)
    }

    /// Ends a drain: GPU nodes eligible again, dispatching resumed. Returns
    /// the nodes made eligible.
    pub async fn resume(&self) -> Result<Vec<String>, DrainError> {
        let mut nodes = Vec::new();
        if let Some(nomad) = &self.nomad {
            for node in nomad.nodes().await? {
                if node.node_pool == self.gpu_node_pool && (node.drain || node.scheduling_eligibility != "eligible") {
                    if node.drain {
                        nomad.drain_node(&node.id, None).await?;
                    }
                    nomad.set_node_eligibility(&node.id, true).await?;
                    nodes.push(node.name);
                }
            }
        }
        self.store.resume().await?;
        Ok(nodes)
    }
}
