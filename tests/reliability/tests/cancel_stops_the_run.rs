//! Found by the chaos run: a participant's cancel of a running job must stop
//! the run even when no dispatcher heard it. `Store::cancel` marks the job
//! `cancel_requested` and publishes a stop on `cm:stop` (pub/sub: heard only
//! by a dispatcher subscribed at that moment), so:
//!
//! - while the dispatcher is down: the restarted dispatcher stops the run
//!   when it reconciles at start (a live run of a cancelled job is stopped);
//! - after a Redis outage: the subscription's connection dies with Redis but
//!   its message stream does not end, so the dispatcher PINGs it with every
//!   heartbeat, subscribes again when it is dead, and reconciles at once.

use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::wait_until;
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions};
use dispatcher::job::JobState;
use dispatcher::queue::Store;
use serde_json::{json, Value};

/// A stack whose runs take seven seconds (seven nodes of 1 s).
async fn slow_stack() -> (Stack, Store) {
    let stack = start(StackOptions { node_delay: Duration::from_secs(1), ..StackOptions::new(Executor::Nomad) }).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    (stack, store)
}

/// Submits a job as participant 1 and waits until it runs.
async fn running_job(stack: &Stack, store: &Store) -> String {
    let id = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;
    wait_until("the job to run", Duration::from_secs(30), || {
        let (store, id) = (store.clone(), id.parse().unwrap());
        async move { store.get(&id).await.ok()?.filter(|j| j.state == JobState::Running).map(|_| ()) }
    })
    .await
    .unwrap();
    id
}

/// Waits (up to 15 s) until a dispatcher is subscribed to `cm:stop`.
async fn listening_for_stops(store: &Store) {
    wait_until("the dispatcher to listen on cm:stop", Duration::from_secs(15), || {
        let client = store.client().clone();
        async move {
            let mut con = client.get_multiplexed_async_connection().await.ok()?;
            let (_, n): (String, u32) =
                redis::cmd("PUBSUB").arg("NUMSUB").arg("cm:stop").query_async(&mut con).await.ok()?;
            (n > 0).then_some(())
        }
    })
    .await
    .unwrap();
}

/// Cancels job `id` as participant 1; the gateway must confirm it.
async fn cancel(stack: &Stack, id: &str) {
    let url = format!("{}/user/1/api/jobs/{id}/cancel", stack.gateway_url);
    let res = reqwest::Client::new().post(url).bearer_auth(stack.code(1)).send().await.unwrap();
    let answer: Value = res.json().await.unwrap();
    assert_eq!(answer, json!({ "cancelled": true }));
}

/// The job ends `cancelled`.
async fn ends_cancelled(stack: &mut Stack, store: &Store, id: &str) {
    let entry = stack.finished(1, id).await;
    let job = store.get(&id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled, "{}\n{}", entry["status"], stack.service_log_tail("dispatcher", 20));
}

#[tokio::test]
async fn a_cancel_confirmed_while_the_dispatcher_is_down_still_stops_the_run() {
    let (mut stack, store) = slow_stack().await;
    let id = running_job(&stack, &store).await;
    stack.kill_service("dispatcher").await;
    cancel(&stack, &id).await;
    stack.start_dispatcher(&[]);
    ends_cancelled(&mut stack, &store, &id).await;
}

#[tokio::test]
async fn a_cancel_after_a_redis_outage_still_stops_the_run() {
    let (mut stack, store) = slow_stack().await;
    listening_for_stops(&store).await;
    // Down long enough for the dispatcher's resubscription to fail.
    stack.kill_redis();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.start_redis().await.unwrap();
    listening_for_stops(&store).await;
    // The gateway's first request after the restart may still fail (503).
    wait_until("the gateway to reach Redis again", Duration::from_secs(30), || {
        let req = stack.get(1, "prompt");
        async move { req.send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await
    .unwrap();
    let id = running_job(&stack, &store).await;
    cancel(&stack, &id).await;
    ends_cancelled(&mut stack, &store, &id).await;
}
