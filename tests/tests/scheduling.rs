//! The scheduling policy against a real Redis: fair share, priority, limits,
//! positions, live mode switches, and all of it across a Redis restart.
//! Property tests run many random queues through one Redis (flushed between
//! cases); sequential "GPU" runs pop a job and finish it before the next pop.

use std::collections::{HashMap, HashSet};

use comfy_multi_tests::harness::Redis;
use dispatcher::job::JobState;
use dispatcher::policy::{Limits, Mode};
use dispatcher::queue::{Cancelled, NewJob, Patch, QueueError, Store};
use dispatcher::JobId;
use proptest::prelude::*;
use serde_json::json;

fn job(user: u32) -> NewJob {
    NewJob { user, workflow: json!({"1": {"class_type": "EmptyImage", "inputs": {}}}), extra_data: json!({}), priority: 0 }
}

const ROOMY: Limits = Limits { max_queued_per_user: 1000, max_running_per_user: 1, max_queue: 10_000 };

async fn flush(redis: &Redis) {
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
}

/// Pops and finishes jobs one at a time (one GPU); returns them in run order.
async fn run_all(store: &Store) -> Vec<(JobId, u32)> {
    let mut ran = Vec::new();
    while let Some(j) = store.pop_next().await.unwrap() {
        store.transition(&j.id, JobState::Running, Patch::default()).await.unwrap();
        store.transition(&j.id, JobState::Succeeded, Patch::default()).await.unwrap();
        ran.push((j.id, j.user));
    }
    ran
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn fair_mode_serves_every_single_job_before_a_bursts_second() {
    let rt = runtime();
    let redis = rt.block_on(Redis::start()).unwrap();
    // Where in the submission order the four single jobs come, relative to
    // the burst's ten: any interleaving.
    proptest!(ProptestConfig::with_cases(24), |(slots in proptest::collection::vec(0usize..=10, 4))| {
        rt.block_on(async {
            flush(&redis).await;
            let store = Store::connect(&redis.url).await.unwrap().with_limits(ROOMY);
            store.set_mode(Mode::Fair).await.unwrap();
            let mut burst = Vec::new();
            let mut singles = HashSet::new();
            for i in 0..=10usize {
                for (k, s) in slots.iter().enumerate() {
                    if *s == i {
                        singles.insert(store.submit(job(2 + k as u32)).await.unwrap().id);
                    }
                }
                if i < 10 {
                    burst.push(store.submit(job(1)).await.unwrap().id);
                }
            }
            let order: Vec<JobId> = run_all(&store).await.into_iter().map(|(id, _)| id).collect();
            let second = order.iter().position(|id| *id == burst[1]).unwrap();
            for single in &singles {
                let at = order.iter().position(|id| id == single).unwrap();
                prop_assert!(at < second, "single job ran at {at}, after the burst's second at {second}");
            }
            // The burst keeps its own order.
            let burst_order: Vec<_> = order.iter().filter(|id| burst.contains(id)).copied().collect();
            prop_assert_eq!(burst_order, burst);
            Ok(())
        })?;
    });
}

#[test]
fn priority_always_wins_and_the_shown_order_is_the_real_one() {
    let rt = runtime();
    let redis = rt.block_on(Redis::start()).unwrap();
    proptest!(ProptestConfig::with_cases(24), |(
        users in proptest::collection::vec(1u32..=6, 1..25),
        raised_jobs in proptest::collection::vec(any::<bool>(), 25),
        raised_user in proptest::option::of(1u32..=6),
        fair in any::<bool>(),
    )| {
        rt.block_on(async {
            flush(&redis).await;
            let store = Store::connect(&redis.url).await.unwrap().with_limits(ROOMY);
            store.set_mode(if fair { Mode::Fair } else { Mode::Fifo }).await.unwrap();
            let mut front = HashSet::new();
            let mut owner = HashMap::new();
            for (i, u) in users.iter().enumerate() {
                let id = store.submit(job(*u)).await.unwrap().id;
                owner.insert(id, *u);
                if raised_jobs[i] {
                    store.raise_job(&id, true).await.unwrap();
                    front.insert(id);
                }
            }
            if let Some(u) = raised_user {
                store.raise_user(u, true).await.unwrap();
                front.extend(owner.iter().filter(|(_, o)| **o == u).map(|(id, _)| *id));
            }
            let shown = store.order().await.unwrap();
            let ran: Vec<JobId> = run_all(&store).await.into_iter().map(|(id, _)| id).collect();
            prop_assert_eq!(&shown, &ran, "the order shown is the order run");
            prop_assert_eq!(ran.len(), users.len());
            let first_normal = ran.iter().position(|id| !front.contains(id)).unwrap_or(ran.len());
            prop_assert!(ran[first_normal..].iter().all(|id| !front.contains(id)), "a front-tier job ran after a normal one");
            Ok(())
        })?;
    });
}

#[tokio::test]
async fn limits_hold_under_concurrent_submits_and_pops() {
    let redis = Redis::start().await.unwrap();
    let limits = Limits { max_queued_per_user: 3, max_running_per_user: 1, max_queue: 20 };
    let store = Store::connect(&redis.url).await.unwrap().with_limits(limits);
    // 8 users × 10 concurrent submits each.
    let mut tasks = Vec::new();
    for user in 1..=8u32 {
        for _ in 0..10 {
            let store = Store::connect(&redis.url).await.unwrap().with_limits(limits);
            tasks.push(tokio::spawn(async move { (user, store.submit(job(user)).await) }));
        }
    }
    let mut accepted: HashMap<u32, u32> = HashMap::new();
    let (mut user_full, mut queue_full) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (user, Ok(_)) => *accepted.entry(user).or_default() += 1,
            (_, Err(QueueError::UserQueueFull { limit: 3 })) => user_full += 1,
            (_, Err(QueueError::QueueFull { limit: 20 })) => queue_full += 1,
            (_, Err(e)) => panic!("unexpected {e}"),
        }
    }
    assert!(accepted.values().all(|n| *n <= 3), "{accepted:?}");
    assert_eq!(accepted.values().sum::<u32>(), 20, "the queue fills to its cap exactly");
    assert_eq!(user_full + queue_full, 60);
    assert_eq!(store.queued_count().await.unwrap(), 20);

    // Many dispatchers pop at once: never two jobs of one user in flight.
    let mut pops = Vec::new();
    for _ in 0..12 {
        let store = Store::connect(&redis.url).await.unwrap().with_limits(limits);
        pops.push(tokio::spawn(async move { store.pop_next().await.unwrap() }));
    }
    let mut running: HashMap<u32, u32> = HashMap::new();
    for p in pops {
        if let Some(j) = p.await.unwrap() {
            *running.entry(j.user).or_default() += 1;
        }
    }
    assert!(running.values().all(|n| *n == 1), "{running:?}");
    assert_eq!(running.len(), accepted.len(), "every user with a queued job got one running");
    assert!(store.pop_next().await.unwrap().is_none(), "everyone is at their running limit");
}

#[tokio::test]
async fn mode_switches_live_and_settings_survive_a_redis_restart() {
    let mut redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap().with_limits(ROOMY);
    store.init_mode(Mode::Fifo).await.unwrap();
    let mut ids = Vec::new();
    for u in [1, 1, 1, 2, 3] {
        ids.push(store.submit(job(u)).await.unwrap().id);
    }
    assert_eq!(store.order().await.unwrap(), ids, "fifo: submission order");
    store.set_mode(Mode::Fair).await.unwrap();
    let fair = store.order().await.unwrap();
    assert_eq!(fair, vec![ids[0], ids[3], ids[4], ids[1], ids[2]], "fair: users take turns");
    store.raise_user(1, true).await.unwrap();
    store.set_limits(Limits { max_queued_per_user: 7, ..ROOMY }).await.unwrap();
    store.init_mode(Mode::Fifo).await.unwrap(); // a restarted service must not undo the instructor's choice

    redis.kill();
    redis.restart().await.unwrap();
    let order = comfy_multi_tests::harness::wait_until("Redis to be back", std::time::Duration::from_secs(20), || {
        let store = store.clone();
        async move { store.order().await.ok() }
    })
    .await
    .unwrap();
    assert_eq!(store.mode().await.unwrap(), Mode::Fair);
    assert_eq!(store.limits().await.unwrap().max_queued_per_user, 7);
    assert_eq!(order, vec![ids[0], ids[1], ids[2], ids[3], ids[4]], "user 1 raised: all theirs first");
    assert_eq!(store.queued_count().await.unwrap(), 5, "nothing lost");
}

#[tokio::test]
async fn cancel_removes_queued_jobs_and_only_for_their_owner() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap().with_limits(ROOMY);
    let a = store.submit(job(1)).await.unwrap().id;
    let b = store.submit(job(2)).await.unwrap().id;
    assert!(matches!(store.cancel(&a, Some(2)).await, Err(QueueError::NotFound(_))), "not the owner");
    assert_eq!(store.cancel(&a, Some(1)).await.unwrap(), Cancelled::Removed);
    assert_eq!(store.get(&a).await.unwrap().unwrap().state, JobState::Cancelled);
    assert_eq!(store.order().await.unwrap(), vec![b]);
    assert_eq!(store.cancel(&a, None).await.unwrap(), Cancelled::AlreadyEnded(JobState::Cancelled));

    let running = store.pop_next().await.unwrap().unwrap();
    assert_eq!(running.id, b);
    assert_eq!(store.cancel(&b, None).await.unwrap(), Cancelled::Stopping, "the instructor cancels any");
    assert!(store.get(&b).await.unwrap().unwrap().cancel_requested);
}
