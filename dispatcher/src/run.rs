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
//!
//! **Reconciliation**, at start and every `reconcile_every` (15 s by
//! default, `dispatcher.reconcile_seconds`), compares what Redis says is in
//! flight with the executor's runs ([`Executor::runs`]), so a dispatcher
//! killed at any point neither loses nor duplicates a job:
//! - a job in flight that nobody here follows is followed (its run found
//!   again, or handed over again with the same idempotency token, or, when
//!   its run is gone, settled as [`follow`] does: requeued or failed);
//! - a live run whose job is unknown, ended (for [`STOP_GRACE`]) or
//!   cancelled, or that is not the job's current run, is stopped;
//! - a live run of a job Redis says is queued (Redis lost the dispatch's
//!   write) is adopted: the job becomes dispatched with that run, instead
//!   of being run a second time.
//!
//! The loop also writes its heartbeat and what it sees of its executor's
//! remote service to [`crate::health`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::task::JoinSet;

use crate::executor::{Executor, ExecutorError, Outcome, Run, Started};
use crate::health;
use crate::job::{now_ms, Job, JobId, JobState};
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
    reconcile_every: Duration,
    /// Jobs a task of this loop follows.
    followed: Followed,
}

const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Default period of the reconciliation pass.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(15);
/// How long after its job ended a run may still be going (gpu-task exits
/// right after its report) before reconciliation stops it.
pub const STOP_GRACE: Duration = Duration::from_secs(60);

/// The set of jobs followed by this loop's tasks.
#[derive(Clone, Default)]
struct Followed(Arc<Mutex<HashSet<JobId>>>);

impl Followed {
    fn contains(&self, id: &JobId) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).contains(id)
    }
    /// Marks `id` followed until the returned guard is dropped; `None` when
    /// it already is.
    fn claim(&self, id: JobId) -> Option<FollowGuard> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(id).then(|| FollowGuard(self.clone(), id))
    }
}

struct FollowGuard(Followed, JobId);

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl Dispatcher {
    pub fn new(store: Store, executor: Arc<dyn Executor>, slots: usize) -> Self {
        Dispatcher {
            store,
            executor,
            slots: slots.max(1),
            max_attempts: 3,
            reconcile_every: RECONCILE_EVERY,
            followed: Followed::default(),
        }
    }

    /// How often to reconcile Redis with the executor's runs (at least 1 s).
    pub fn with_reconcile_every(mut self, every: Duration) -> Self {
        self.reconcile_every = every.max(Duration::from_secs(1));
        self
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
                self.spawn_resume(&mut tasks, job);
            }
        }
        // Before taking anything new: adopt what Redis lost track of.
        if let Err(e) = self.reconcile(&mut tasks).await {
            tracing::warn!("cannot reconcile with the executor at start: {e}");
        }
        if let Err(e) = health::heartbeat(&self.store).await {
            tracing::warn!("cannot write the heartbeat: {e}");
        }
        let mut reconcile =
            tokio::time::interval_at(tokio::time::Instant::now() + self.reconcile_every, self.reconcile_every);
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(health::HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if backoff.is_none() {
                while tasks.len() < self.slots {
                    match self.store.pop_next().await {
                        Ok(Some(job)) => {
                            crate::metrics::dispatched();
                            let span = crate::job_span!(job.id, job.user);
                            span.in_scope(|| tracing::info!("dispatching"));
                            let guard = self.followed.claim(job.id);
                            let (store, executor, max) = (self.store.clone(), self.executor.clone(), self.max_attempts);
                            tasks.spawn(tracing::Instrument::instrument(
                                async move {
                                    let _guard = guard;
                                    handle(store, executor, job, max).await
                                },
                                span,
                            ));
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
            crate::metrics::set_in_flight(tasks.len());
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
                _ = heartbeat.tick() => {
                    if let Err(e) = health::heartbeat(&self.store).await {
                        tracing::warn!("cannot write the heartbeat: {e}");
                    }
                    // A subscription to a Redis that restarted goes silent
                    // rather than ending: check it, and after subscribing
                    // again reconcile at once (a stop sent meanwhile is lost).
                    if !subscribed(&mut wake).await {
                        wake = self.subscribe().await;
                        if wake.is_some() {
                            tracing::info!("subscribed to Redis again");
                            if let Err(e) = self.reconcile(&mut tasks).await {
                                tracing::warn!("cannot reconcile with the executor: {e}");
                            }
                        }
                    }
                }
                _ = reconcile.tick() => {
                    if let Err(e) = self.reconcile(&mut tasks).await {
                        tracing::warn!("cannot reconcile with the executor: {e}");
                    }
                }
                _ = tokio::time::sleep(pause) => {
                    backoff = None;
                }
            }
        }
        Ok(())
    }

    /// Follows `job` (left in flight) in a task, unless a task already does.
    fn spawn_resume(&self, tasks: &mut JoinSet<Handled>, job: Job) {
        let Some(guard) = self.followed.claim(job.id) else { return };
        let (store, executor, max) = (self.store.clone(), self.executor.clone(), self.max_attempts);
        let span = crate::job_span!(job.id, job.user);
        tasks.spawn(tracing::Instrument::instrument(
            async move {
                let _guard = guard;
                resume(store, executor, job, max).await
            },
            span,
        ));
    }

    /// One reconciliation pass (see the module doc).
    async fn reconcile(&self, tasks: &mut JoinSet<Handled>) -> Result<(), ReconcileError> {
        let runs = match self.executor.runs().await {
            Ok(runs) => {
                note_remote(&self.store, self.executor.as_ref(), Ok(())).await;
                runs
            }
            Err(e) => {
                note_remote(&self.store, self.executor.as_ref(), Err(e.to_string())).await;
                return Err(e.into());
            }
        };
        // Jobs in flight that no task here follows.
        for id in self.store.inflight().await? {
            if self.followed.contains(&id) {
                continue;
            }
            if let Some(job) = self.store.get(&id).await? {
                if job.state.is_in_flight() {
                    tracing::warn!(job = %id, state = %job.state, "reconcile: following a job in flight that nobody followed");
                    self.spawn_resume(tasks, job);
                }
            }
        }
        // Runs that no job should have, and runs of jobs Redis lost track of.
        let mut by_job: HashMap<JobId, Vec<Run>> = HashMap::new();
        for run in runs {
            by_job.entry(run.job_id).or_default().push(run);
        }
        for (id, runs) in by_job {
            let job = self.store.get(&id).await?;
            for run in runs {
                match verdict(job.as_ref(), &run, self.followed.contains(&id)) {
                    Verdict::Keep => {}
                    Verdict::Stop(why) => {
                        tracing::warn!(job = %id, run = %run.executor_ref, "reconcile: stopping a run: {why}");
                        let executor = self.executor.clone();
                        tokio::spawn(async move { stop_run(executor.as_ref(), &run.executor_ref).await });
                    }
                    Verdict::Adopt => {
                        let attempt = run.attempt.unwrap_or(0);
                        if self.store.adopt(&id, &run.executor_ref, attempt).await? {
                            tracing::warn!(job = %id, run = %run.executor_ref, "reconcile: adopted a run of a job Redis had as queued");
                            if let Some(job) = self.store.get(&id).await? {
                                self.spawn_resume(tasks, job);
                            }
                        }
                    }
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

/// Why a reconciliation pass stopped early.
#[derive(Debug, thiserror::Error)]
enum ReconcileError {
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What reconciliation does with a live run.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    Stop(String),
    Adopt,
}

/// The rules of reconciliation for one live `run` of `job` (`None`: Redis
/// does not know the job); `followed` says whether a task here follows it.
fn verdict(job: Option<&Job>, run: &Run, followed: bool) -> Verdict {
    let Some(job) = job else {
        return Verdict::Stop("its job is unknown".into());
    };
    match job.state {
        s if s.is_terminal() => {
            let ended = job.finished_at.unwrap_or(0);
            if now_ms().saturating_sub(ended) >= STOP_GRACE.as_millis() as u64 {
                Verdict::Stop(format!("its job is {s}"))
            } else {
                Verdict::Keep
            }
        }
        _ if job.state.is_in_flight() && job.cancel_requested => Verdict::Stop("its job was cancelled".into()),
        _ if job.state.is_in_flight() => match &job.executor_ref {
            // Not the job's current run (an earlier attempt left running).
            Some(current) if *current != run.executor_ref => {
                Verdict::Stop(format!("the job runs as {current}"))
            }
            _ => Verdict::Keep,
        },
        // Queued: a drain requeued it and a task here is stopping the run...
        _ if followed => Verdict::Keep,
        // ...or Redis lost the dispatch (the run is a newer attempt than it
        // counted), or the run is an old attempt nobody stopped.
        _ => match run.attempt {
            Some(attempt) if attempt <= job.attempts => {
                Verdict::Stop(format!("attempt {attempt} of a job that was requeued"))
            }
            _ => Verdict::Adopt,
        },
    }
}

/// Records what the executor's remote service (Nomad) did, for `/healthz`.
async fn note_remote(store: &Store, executor: &dyn Executor, result: Result<(), String>) {
    if let Some(component) = executor.remote() {
        if let Err(e) = health::record(store, component, result).await {
            tracing::debug!("cannot record the health of {component}: {e}");
        }
    }
}

/// Whether the subscription still answers (a PING within 2 s).
async fn subscribed(pubsub: &mut Option<redis::aio::PubSub>) -> bool {
    match pubsub {
        Some(p) => matches!(tokio::time::timeout(Duration::from_secs(2), p.ping::<redis::Value>()).await, Ok(Ok(_))),
        None => false,
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
        Ok(started) => {
            note_remote(&store, executor.as_ref(), Ok(())).await;
            started
        }
        Err(ExecutorError::Unavailable(why)) => {
            tracing::warn!(job = %job.id, "executor unavailable, job stays queued: {why}");
            note_remote(&store, executor.as_ref(), Err(why.clone())).await;
            // It never ran: the attempt is given back, so the next dispatch
            // uses the same idempotency token (and finds a child Nomad may
            // have made before the answer was lost).
            let patch = Patch { attempts: Some(job.attempts.saturating_sub(1)), ..Patch::default() };
            settle_with(&store, &job.id, JobState::Queued, patch).await;
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
            Ok(outcome) => {
                note_remote(store, executor, Ok(())).await;
                break outcome;
            }
            Err(e) => {
                tracing::warn!(job = %id, "cannot follow the job, retrying: {e}");
                note_remote(store, executor, Err(e.to_string())).await;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    };
    let reason = match outcome {
        Outcome::Completed => "gpu-task exited without reporting a result".to_string(),
        Outcome::Failed { reason } | Outcome::Lost { reason } => reason,
    };
    // gpu-task's own reason (e.g. ComfyUI unreachable) beats the executor's.
    let reason = match store.run_error(id).await {
        Ok(Some(noted)) => noted,
        _ => reason,
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
    settle_with(store, id, to, Patch { error, ..Patch::default() }).await
}

/// [`settle`] with any [`Patch`].
async fn settle_with(store: &Store, id: &JobId, to: JobState, patch: Patch) {
    let mut delay = MIN_BACKOFF;
    loop {
        match store.transition(id, to, patch.clone()).await {
            Ok(_) | Err(QueueError::Transition { .. }) | Err(QueueError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(job = %id, "cannot mark job {to}, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState, attempts: u32, executor_ref: Option<&str>) -> Job {
        serde_json::from_value(serde_json::json!({
            "id": JobId::new_v4(), "user": 1, "number": 1, "workflow": {}, "extra_data": null,
            "state": state, "priority": 0, "created_at": 0, "outputs": {}, "attempts": attempts,
            "executor_ref": executor_ref, "messages": [],
        }))
        .expect("a job record")
    }

    fn run(job: &Job, attempt: u32) -> Run {
        Run { executor_ref: format!("child-{attempt}"), job_id: job.id, attempt: Some(attempt) }
    }

    #[test]
    fn reconciliation_rules() {
        let stop = |v: Verdict| matches!(v, Verdict::Stop(_));
        // Unknown job: stop.
        let queued = job(JobState::Queued, 0, None);
        assert!(stop(verdict(None, &run(&queued, 1), false)));
        // Redis lost the dispatch: the run is a newer attempt than it counted.
        assert_eq!(verdict(Some(&queued), &run(&queued, 1), false), Verdict::Adopt);
        // A requeued job's old run that nobody stops: stop it...
        let requeued = job(JobState::Queued, 2, None);
        assert!(stop(verdict(Some(&requeued), &run(&requeued, 2), false)));
        // ...unless a task here is stopping it (a drain).
        assert_eq!(verdict(Some(&requeued), &run(&requeued, 2), true), Verdict::Keep);
        // In flight: its own run is kept, another attempt's is stopped.
        let running = job(JobState::Running, 2, Some("child-2"));
        assert_eq!(verdict(Some(&running), &run(&running, 2), false), Verdict::Keep);
        assert!(stop(verdict(Some(&running), &run(&running, 1), false)));
        assert!(stop(verdict(Some(&running), &run(&running, 1), true)));
        // Dispatched, not yet recorded where: kept (being handed over).
        let dispatched = job(JobState::Dispatched, 1, None);
        assert_eq!(verdict(Some(&dispatched), &run(&dispatched, 1), true), Verdict::Keep);
        // Cancelled while nobody listened: stopped.
        let mut cancelled = running.clone();
        cancelled.cancel_requested = true;
        assert!(stop(verdict(Some(&cancelled), &run(&cancelled, 2), true)));
        // Ended: stopped after the grace, not while gpu-task is exiting.
        let mut ended = job(JobState::Succeeded, 1, Some("child-1"));
        ended.finished_at = Some(now_ms());
        assert_eq!(verdict(Some(&ended), &run(&ended, 1), false), Verdict::Keep);
        ended.finished_at = Some(now_ms() - STOP_GRACE.as_millis() as u64 - 1);
        assert!(stop(verdict(Some(&ended), &run(&ended, 1), false)));
    }
}
