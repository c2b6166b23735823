//! The chaos: at random intervals, SIGKILLs one of a running gpu-task (as
//! when a GPU node is lost), the dispatcher, the gateway or Redis, and starts
//! the killed service again after a random downtime. A killed gpu-task is not
//! started again: bringing its job back is the dispatcher's work.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use comfy_multi_tests::harness::{gpu_task_of, wait_until};
use comfy_multi_tests::stack::Stack;
use dispatcher::queue::Store;
use dispatcher::JobId;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::watch;

/// What gets killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    GpuTask,
    /// Every run of one job, until it ends (a node that keeps dying under
    /// it): the job must fail after its last attempt, with the reason.
    GpuTaskEveryRun,
    Dispatcher,
    Gateway,
    Redis,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::GpuTask => "gpu-task",
            Target::GpuTaskEveryRun => "every run of a job",
            Target::Dispatcher => "dispatcher",
            Target::Gateway => "gateway",
            Target::Redis => "redis",
        })
    }
}

/// How often and how hard to kill.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The pause before each kill is drawn from this range.
    pub interval: (Duration, Duration),
    /// A killed service stays down for up to this long.
    pub downtime: Duration,
    /// Relative weights of the targets, in [`Target`]'s order.
    pub weights: [u32; 5],
}

/// Kills done, by target; `skipped` counts gpu-task kills with no gpu-task
/// running at the time.
#[derive(Clone, Debug, Default)]
pub struct Kills {
    pub done: BTreeMap<Target, u32>,
    pub skipped: u32,
    /// When Redis was SIGKILLed (ms since the epoch).
    pub redis_at: Vec<u64>,
}

/// Kills until `stop` turns true; every killed service runs again when this
/// returns.
pub async fn run(
    stack: &mut Stack,
    store: &Store,
    rng: &mut StdRng,
    plan: &Plan,
    mut stop: watch::Receiver<bool>,
) -> Kills {
    let mut kills = Kills::default();
    let targets = [Target::GpuTask, Target::GpuTaskEveryRun, Target::Dispatcher, Target::Gateway, Target::Redis];
    let mut first: Vec<Target> = targets.iter().copied().filter(|t| plan.weights[*t as usize] > 0).collect();
    first.shuffle(rng);
    loop {
        let pause = rng.gen_range(plan.interval.0..=plan.interval.1);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return kills,
        }
        // Every target once (in a random order) first, so even a short run
        // has them all; then drawn by weight.
        let target = match first.pop() {
            Some(target) => target,
            None => *targets.choose_weighted(rng, |t| plan.weights[*t as usize]).expect("a kill weight is not zero"),
        };
        let downtime = rng.gen_range(Duration::ZERO..=plan.downtime);
        let killed = match target {
            Target::GpuTask => kill_gpu_task(store, rng).await.is_some(),
            Target::GpuTaskEveryRun => match kill_gpu_task(store, rng).await {
                Some(id) => {
                    kill_every_run(store, id).await;
                    true
                }
                None => false,
            },
            Target::Dispatcher => {
                stack.kill_service("dispatcher").await;
                tokio::time::sleep(downtime).await;
                stack.start_dispatcher(&[]);
                true
            }
            Target::Gateway => {
                stack.kill_service("gateway").await;
                tokio::time::sleep(downtime).await;
                stack.start_gateway().await;
                true
            }
            Target::Redis => {
                kills.redis_at.push(dispatcher::job::now_ms());
                stack.kill_redis();
                tokio::time::sleep(downtime).await;
                stack.start_redis().await.expect("redis-server starts again on its AOF");
                true
            }
        };
        if killed {
            tracing::info!(%target, ?downtime, "killed");
            *kills.done.entry(target).or_default() += 1;
        } else {
            kills.skipped += 1;
            if !kills.done.contains_key(&target) {
                first.push(target);
            }
        }
    }
}

/// SIGKILLs the gpu-task of one of the jobs in flight, waiting up to 2 s for
/// one to run; returns its job, `None` if none ran.
async fn kill_gpu_task(store: &Store, rng: &mut StdRng) -> Option<JobId> {
    let seed: u64 = rng.gen();
    let found = wait_until("a gpu-task to run", Duration::from_secs(2), || {
        let store = store.clone();
        async move {
            let mut ids = store.inflight().await.ok()?;
            ids.sort();
            ids.shuffle(&mut <StdRng as rand::SeedableRng>::seed_from_u64(seed));
            ids.into_iter().find_map(|id| Some((id, gpu_task_of(&id.to_string())?)))
        }
    })
    .await;
    let (id, pid) = found.ok()?;
    kill(Pid::from_raw(pid), Signal::SIGKILL).ok().map(|()| id)
}

/// SIGKILLs every further run of job `id` until it has ended (at most 60 s).
async fn kill_every_run(store: &Store, id: JobId) {
    let job = id.to_string();
    let _ = wait_until("the job to end under repeated kills", Duration::from_secs(60), || {
        let (store, job) = (store.clone(), job.clone());
        async move {
            if let Some(pid) = gpu_task_of(&job) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            store.get(&id).await.ok()?.filter(|j| j.state.is_terminal()).map(|_| ())
        }
    })
    .await;
}
