//! The dispatch loop behind `dispatcher run`.
//!
//! Keeps at most `slots` jobs in flight: takes the next job atomically from
//! the queue, hands it to the executor, follows it to its end, and makes sure
//! it ends in a terminal state even when gpu-task could not report (crash, no
//! gateway). A run that ended without gpu-task's report (it crashed, its node
//! was lost) goes back to the front of its user's line, up to `max_attempts`
//! runs, then fails with the reason the executor gave. When the executor is
//! unreachable the job goes back to the queue and the loop backs off; nothing
//! is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::task::JoinSet;

use crate::executor::{Executor, ExecutorError, Outcome, Started};
use crate::job::{Job, JobId, JobState};
use crate::queue::{Patch, QueueError, Store, STOP_CHANNEL, WAKE_CHANNEL};

/// How a handled job left the loop's hands.
enum Handled {
    Done,
    /// The executor could not be reached: back off before dispatching again.
    ExecutorUnavailable,
}

/// The dispatch loop.
pub struct Dispatcher {
    store: Store,
    executor: Arc<dyn Executor>,
    slots: usize,
    max_attempts: u32,
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);

impl Dispatcher {
    pub fn new(store: Store, executor: Arc<dyn Executor>, slots: usize) -> Self {
        Dispatcher { store, executor, slots: slots.max(1), max_attempts: 3 }
    }

    /// Runs that may end without a report (crash, lost node) before the job
    /// fails; at least 1.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Runs until `shutdown` completes. Jobs still in flight then are left
    /// as they are (their executor keeps running them; a restarted
    /// dispatcher follows them again).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<(), QueueError> {
        tokio::pin!(shutdown);
        let mut tasks: JoinSet<Handled> = JoinSet::new();
        let mut backoff: Option<Duration> = None;
        let mut wake = self.subscribe().await;

        // Follow what an earlier run left in flight.
        for id in self.store.inflight().await? {
            if let Some(job) = self.store.get(&id).await? {
                tracing::info!(job = %id, state = %job.state, "following a job left in flight");
                let (store, executor, max) = (self.store.clone(), self.executor.clone(), self.max_attempts);
                tasks.spawn(async move { resume(store, executor, job, max).await });
            }
        }

        loop {
            if backoff.is_none() {
                while tasks.len() < self.slots {
                    match self.store.pop_next().await {
                        Ok(Some(job)) => {
                            tracing::info!(job = %job.id, user = job.user, "dispatching");
                            let (store, executor, max) = (self.store.clone(), self.executor.clone(), self.max_attempts);
                            tasks.spawn(async move { handle(store, executor, job, max).await });
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("cannot take the next job: {e}");
                            backoff = Some(MIN_BACKOFF);
                            break;
                        }
                    }
                }
            }
            let pause = backoff.unwrap_or(Duration::from_secs(2));
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                    match res {
                        Ok(Handled::ExecutorUnavailable) => {
                            backoff = Some(backoff.map_or(MIN_BACKOFF, |b| (b * 2).min(MAX_BACKOFF)));
                        }
                        Ok(Handled::Done) => {}
                        Err(e) => tracing::error!("a job handler panicked: {e}"),
                    }
                }
                msg = next_message(&mut wake) => {
                    // A burst of submits is one look at the queue, not one per submit.
                    let mut msg = msg;
                    loop {
                        match msg {
                            None => {
                                wake = self.subscribe().await;
                                break;
                            }
                            Some((channel, payload)) if channel == STOP_CHANNEL => {
                                let executor = self.executor.clone();
                                tokio::spawn(async move { stop_run(executor.as_ref(), &payload).await });
                            }
                            Some(_) => {}
                        }
                        match next_message(&mut wake).now_or_never() {
                            Some(next) => msg = next,
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep(pause) => {
                    backoff = None;
                }
            }
        }
        Ok(())
    }

    async fn subscribe(&self) -> Option<redis::aio::PubSub> {
        let mut pubsub = self.store.client().get_async_pubsub().await.ok()?;
        pubsub.subscribe(&[WAKE_CHANNEL, STOP_CHANNEL]).await.ok()?;
        Some(pubsub)
    }
}

/// Waits for a message (channel, payload); `None` when the subscription is gone.
async fn next_message(pubsub: &mut Option<redis::aio::PubSub>) -> Option<(String, String)> {
    match pubsub {
        Some(p) => {
            let msg = p.on_message().next().await?;
            Some((msg.get_channel_name().to_string(), msg.get_payload().unwrap_or_default()))
        }
        None => std::future::pending().await,
    }
}

/// Stops the run `executor_ref` (a drain deadline, a cancel). Only the
/// dispatcher whose executor runs it can; for the others this is a no-op.
async fn stop_run(executor: &dyn Executor, executor_ref: &str) {
    tracing::info!(%executor_ref, "stopping the run on request");
    if let Err(e) = executor.stop(executor_ref).await {
        tracing::warn!(%executor_ref, "cannot stop the run: {e}");
    }
}

async fn handle(store: Store, executor: Arc<dyn Executor>, job: Job, max_attempts: u32) -> Handled {
    let started = match executor.start(&job).await {
        Ok(started) => started,
        Err(ExecutorError::Unavailable(why)) => {
            tracing::warn!(job = %job.id, "executor unavailable, job stays queued: {why}");
            settle(&store, &job.id, JobState::Queued, None).await;
            return Handled::ExecutorUnavailable;
        }
        Err(ExecutorError::Rejected(why)) => {
            tracing::warn!(job = %job.id, "executor refused the job: {why}");
            settle(&store, &job.id, JobState::Failed, Some(why)).await;
            return Handled::Done;
        }
    };
    if let Err(e) = store.set_executor_ref(&job.id, &started.executor_ref).await {
        tracing::warn!(job = %job.id, "cannot record where the job runs: {e}");
    }
    // Cancelled while it was being handed over: the cancel could not name the run yet.
    if let Ok(Some(now)) = store.get(&job.id).await {
        if now.cancel_requested {
            stop_run(executor.as_ref(), &started.executor_ref).await;
        }
    }
    follow(&store, executor.as_ref(), &job.id, &started, max_attempts).await;
    Handled::Done
}

/// Follows a job an earlier dispatcher run left in flight.
async fn resume(store: Store, executor: Arc<dyn Executor>, job: Job, max_attempts: u32) -> Handled {
    match job.executor_ref.clone() {
        Some(executor_ref) => {
            let started = Started { executor_ref, index: 0 };
            follow(&store, executor.as_ref(), &job.id, &started, max_attempts).await;
        }
        None => {
            // Taken from the queue but never handed over: hand it over now.
            return handle(store, executor, job, max_attempts).await;
        }
    }
    Handled::Done
}

/// Waits for the executor to report the end, then makes sure the job is in a
/// terminal state.
async fn follow(store: &Store, executor: &dyn Executor, id: &JobId, started: &Started, max_attempts: u32) {
    let mut delay = MIN_BACKOFF;
    let outcome = loop {
        match executor.wait(started).await {
            Ok(outcome) => break outcome,
            Err(e) => {
                tracing::warn!(job = %id, "cannot follow the job, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    };
    let reason = match outcome {
        Outcome::Completed => "gpu-task exited without reporting a result".to_string(),
        Outcome::Failed { reason } | Outcome::Lost { reason } => reason,
    };
    match store.get(id).await {
        Ok(Some(job)) if job.state.is_terminal() => {
            tracing::info!(job = %id, state = %job.state, "job ended");
        }
        Ok(Some(job)) if job.cancel_requested => {
            tracing::info!(job = %id, "cancelled job stopped");
            settle(store, id, JobState::Cancelled, Some("cancelled".into())).await;
        }
        Ok(Some(job)) if job.attempts < max_attempts => {
            tracing::warn!(
                job = %id,
                attempt = job.attempts,
                "run ended without a report from gpu-task ({reason}); back to the front of its user's line"
            );
            let why = format!("attempt {} ended without a result: {reason}", job.attempts);
            settle(store, id, JobState::Queued, Some(why)).await;
        }
        Ok(Some(job)) => {
            tracing::warn!(job = %id, "job ended without a report from gpu-task: {reason}");
            let why = if job.attempts > 1 { format!("{reason} (after {} attempts)", job.attempts) } else { reason };
            settle(store, id, JobState::Failed, Some(why)).await;
        }
        Ok(None) => tracing::warn!(job = %id, "job vanished from the store"),
        Err(e) => tracing::warn!(job = %id, "cannot read the job back: {e}"),
    }
}

/// Moves a job to `to`, retrying while Redis is away; a refused transition
/// (someone else already ended it) is fine.
async fn settle(store: &Store, id: &JobId, to: JobState, error: Option<String>) {
    let mut delay = MIN_BACKOFF;
    loop {
        match store.transition(id, to, Patch { error: error.clone(), ..Patch::default() }).await {
            Ok(_) | Err(QueueError::Transition { .. }) | Err(QueueError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(job = %id, "cannot mark job {to}, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}
