//! The job store against a real Redis: atomic pop, the state machine enforced
//! in Redis, outputs attached once, and nothing lost across a Redis restart.

use std::collections::HashSet;

use std::time::Duration;

use comfy_multi_tests::harness::{wait_until, Redis};
use dispatcher::job::{FileRef, JobState};
use dispatcher::policy::Limits;
use dispatcher::queue::{NewJob, Patch, QueueError, Store};
use serde_json::json;

fn new_job(user: u32) -> NewJob {
    NewJob {
        user,
        workflow: json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}),
        extra_data: json!({"client_id": "abc"}),
        priority: 0,
    }
}

#[tokio::test]
async fn submit_then_pop_in_fifo_order() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let a = store.submit(new_job(1)).await.unwrap();
    let b = store.submit(new_job(2)).await.unwrap();
    assert!(b.number > a.number);
    assert_eq!(store.queued_count().await.unwrap(), 2);

    let first = store.pop_next().await.unwrap().unwrap();
    assert_eq!(first.id, a.id);
    assert_eq!(first.state, JobState::Dispatched);
    assert_eq!(first.attempts, 1);
    assert_eq!(first.workflow, a.workflow);
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, b.id);
    assert!(store.pop_next().await.unwrap().is_none());
    assert_eq!(store.inflight().await.unwrap().len(), 2);
}

#[tokio::test]
async fn concurrent_pops_never_share_a_job() {
    let redis = Redis::start().await.unwrap();
    let roomy = Limits { max_queued_per_user: 100, max_running_per_user: 100, max_queue: 1000 };
    let store = Store::connect(&redis.url).await.unwrap().with_limits(roomy);
    let mut ids = HashSet::new();
    for i in 0..60 {
        ids.insert(store.submit(new_job(i % 7 + 1)).await.unwrap().id);
    }
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = Store::connect(&redis.url).await.unwrap().with_limits(roomy);
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = store.pop_next().await.unwrap() {
                got.push(job.id);
            }
            got
        }));
    }
    let mut taken = Vec::new();
    for t in tasks {
        taken.extend(t.await.unwrap());
    }
    assert_eq!(taken.len(), 60, "every job taken exactly once");
    assert_eq!(taken.iter().copied().collect::<HashSet<_>>(), ids);
}

#[tokio::test]
async fn illegal_transitions_are_refused_in_redis() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let job = store.submit(new_job(1)).await.unwrap();
    let err = store.transition(&job.id, JobState::Succeeded, Patch::default()).await.unwrap_err();
    assert!(matches!(err, QueueError::Transition { from: JobState::Queued, to: JobState::Succeeded, .. }), "{err}");

    store.pop_next().await.unwrap().unwrap();
    store.transition(&job.id, JobState::Running, Patch::default()).await.unwrap();
    let patch = Patch { error: Some("boom\n  at node 3".into()), ..Patch::default() };
    store.transition(&job.id, JobState::Failed, patch).await.unwrap();
    let done = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.error.as_deref(), Some("boom at node 3"));
    assert!(done.finished_at.is_some());
    assert!(store.inflight().await.unwrap().is_empty());
    // Terminal means terminal.
    for to in JobState::ALL {
        assert!(store.transition(&job.id, to, Patch::default()).await.is_err());
    }
    let missing = dispatcher::JobId::new_v4();
    assert!(matches!(
        store.transition(&missing, JobState::Running, Patch::default()).await,
        Err(QueueError::NotFound(_))
    ));
}

#[tokio::test]
async fn requeue_keeps_the_place_in_line() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let a = store.submit(new_job(1)).await.unwrap();
    let b = store.submit(new_job(2)).await.unwrap();
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, a.id);
    store.transition(&a.id, JobState::Queued, Patch::default()).await.unwrap();
    let again = store.pop_next().await.unwrap().unwrap();
    assert_eq!(again.id, a.id, "a requeued job goes before later ones");
    assert_eq!(again.attempts, 2);
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, b.id);
}

#[tokio::test]
async fn a_users_unfinished_jobs_are_read_without_their_history() {
    let redis = Redis::start().await.unwrap();
    let roomy = Limits { max_queued_per_user: 100, max_running_per_user: 1, max_queue: 1000 };
    let store = Store::connect(&redis.url).await.unwrap().with_limits(roomy);
    let done = store.submit(new_job(1)).await.unwrap();
    let other = store.submit(new_job(2)).await.unwrap();
    let running = store.submit(new_job(1)).await.unwrap();
    let waiting = store.submit(new_job(1)).await.unwrap();
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, done.id);
    store.transition(&done.id, JobState::Running, Patch::default()).await.unwrap();
    store.transition(&done.id, JobState::Succeeded, Patch::default()).await.unwrap();
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, other.id);
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, running.id);

    let unfinished = store.user_unfinished(1).await.unwrap();
    let ids: Vec<_> = unfinished.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![waiting.id, running.id], "newest first; not the finished one, not user 2's");
    assert_eq!(unfinished[1].state, JobState::Dispatched);
    assert_eq!(unfinished[0].workflow, waiting.workflow);
    assert_eq!(store.user_pending(1).await.unwrap(), 2);

    // Read in one go, in the order asked, skipping ids that are not jobs.
    let missing = dispatcher::JobId::new_v4();
    let many = store.get_many(&[other.id, missing, done.id]).await.unwrap();
    assert_eq!(many.iter().map(|j| j.id).collect::<Vec<_>>(), vec![other.id, done.id]);
    assert_eq!(many[1].state, JobState::Succeeded);
    let history = store.user_jobs(1, 2).await.unwrap();
    assert_eq!(history.iter().map(|j| j.id).collect::<Vec<_>>(), vec![waiting.id, running.id]);
}

#[tokio::test]
async fn outputs_attach_once_and_only_in_flight() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let job = store.submit(new_job(3)).await.unwrap();
    let file = FileRef { filename: "smoke_00001_.png".into(), subfolder: job.id.to_string(), kind: "output".into() };
    assert!(!store.add_output(&job.id, "7", "images", 0, &file).await.unwrap(), "not while queued");
    store.pop_next().await.unwrap();
    assert!(store.add_output(&job.id, "7", "images", 0, &file).await.unwrap());
    assert!(store.add_output(&job.id, "7", "images", 0, &file).await.unwrap());
    let got = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(got.outputs["7"]["images"], vec![file]);
}

#[tokio::test]
async fn jobs_survive_a_redis_restart() {
    let mut redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let queued = store.submit(new_job(1)).await.unwrap();
    let running = store.submit(new_job(2)).await.unwrap();
    store.pop_next().await.unwrap();
    store.pop_next().await.unwrap();
    store.transition(&running.id, JobState::Running, Patch::default()).await.unwrap();
    store.transition(&queued.id, JobState::Queued, Patch::default()).await.unwrap();

    redis.kill();
    redis.restart().await.unwrap();

    // The same Store handle reconnects by itself.
    let back = comfy_multi_tests::harness::wait_until("the store to answer again", std::time::Duration::from_secs(20), || {
        let store = store.clone();
        let id = queued.id;
        async move { store.get(&id).await.ok().flatten() }
    })
    .await
    .unwrap();
    assert_eq!(back.state, JobState::Queued);
    assert_eq!(store.get(&running.id).await.unwrap().unwrap().state, JobState::Running);
    assert_eq!(store.pop_next().await.unwrap().unwrap().id, queued.id);
}

/// A store kept alive finds its connection to a restarted Redis dead by
/// itself and reconnects, so the first command after the restart (a
/// participant's request) succeeds instead of failing with a broken pipe.
#[tokio::test]
async fn a_kept_alive_store_reconnects_before_it_is_asked() {
    let mut redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();
    let _keep_alive = store.keep_alive(Duration::from_millis(100));
    store.submit(new_job(1)).await.unwrap();
    redis.restart().await.unwrap();

    // The new Redis sees the store connect again (the probe is the other client).
    let probe = redis::Client::open(redis.url.as_str()).unwrap();
    wait_until("the store to reconnect to the restarted Redis", Duration::from_secs(10), || {
        let probe = probe.clone();
        async move {
            let mut con = probe.get_multiplexed_async_connection().await.ok()?;
            let info: String = redis::cmd("INFO").arg("clients").query_async(&mut con).await.ok()?;
            let clients: u32 = info.lines().find_map(|l| l.strip_prefix("connected_clients:"))?.trim().parse().ok()?;
            (clients >= 2).then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(store.queued_count().await.unwrap(), 1, "the first command after the restart succeeds");
}
