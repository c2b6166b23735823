//! Cancel through the real HTTP surface, with both executors: a queued job is
//! removed, a running one is stopped (gpu-task interrupts its prompt in
//! ComfyUI) and ends `cancelled`; nobody can cancel, or see, another's job.

use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::wait_until;
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions};
use dispatcher::job::JobState;
use dispatcher::queue::Store;
use dispatcher::JobId;
use serde_json::{json, Value};

async fn state(store: &Store, id: &str) -> JobState {
    store.get(&id.parse::<JobId>().unwrap()).await.unwrap().unwrap().state
}

async fn post(stack: &Stack, user: u32, path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/user/{user}/api/{path}", stack.gateway_url))
        .bearer_auth(stack.code(user))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn participants_cancel_their_own_jobs_queued_or_running() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = start(StackOptions { node_delay: Duration::from_millis(400), ..StackOptions::new(executor) }).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();
        let running = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;
        let queued = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;
        wait_until("the first job to run", Duration::from_secs(30), || {
            let (store, id) = (store.clone(), running.clone());
            async move { (state(&store, &id).await == JobState::Running).then_some(()) }
        })
        .await
        .unwrap();

        // Where they stand: the queued one is next.
        let places: Value = stack.get(1, "../_gw/queue").send().await.unwrap().json().await.unwrap();
        assert_eq!(places["jobs"][0]["id"], queued.as_str(), "{places}");
        assert_eq!(places["jobs"][0]["position"], 1);

        // Another participant can neither cancel nor see them.
        assert_eq!(post(&stack, 2, &format!("jobs/{running}/cancel"), json!({})).await.status(), 404);
        post(&stack, 2, "queue", json!({ "delete": [queued] })).await;
        post(&stack, 2, "interrupt", json!({ "prompt_id": running })).await;
        assert_eq!(state(&store, &queued).await, JobState::Queued);
        assert_eq!(state(&store, &running).await, JobState::Running);

        // The owner removes the queued one (ComfyUI's queue delete) ...
        assert!(post(&stack, 1, "queue", json!({ "delete": [queued] })).await.status().is_success());
        assert_eq!(state(&store, &queued).await, JobState::Cancelled);
        // ... and stops the running one (ComfyUI's interrupt).
        assert!(post(&stack, 1, "interrupt", json!({ "prompt_id": running })).await.status().is_success());
        let entry = stack.finished(1, &running).await;
        assert_eq!(state(&store, &running).await, JobState::Cancelled, "{executor:?}: {entry:#}");
        assert_eq!(entry["outputs"], json!({}), "{executor:?}: a cancelled job has no outputs");
        let events: Vec<&str> =
            entry["status"]["messages"].as_array().unwrap().iter().filter_map(|m| m[0].as_str()).collect();
        assert!(events.contains(&"execution_interrupted"), "{executor:?}: ComfyUI interrupted it: {events:?}");
        let again: Value =
            post(&stack, 1, &format!("jobs/{running}/cancel"), json!({})).await.json().await.unwrap();
        assert_eq!(again, json!({ "cancelled": true }), "idempotent");
    }
}

#[tokio::test]
async fn limits_refuse_with_clear_errors() {
    let stack = start(StackOptions::new(Executor::Local)).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    store.pause("test").await.unwrap();
    for _ in 0..3 {
        stack.submit(3, json!({ "prompt": model_free_workflow() })).await;
    }
    let res = post(&stack, 3, "prompt", json!({ "prompt": model_free_workflow() })).await;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "user_queue_limit");
    assert!(body["error"]["message"].as_str().unwrap().contains("3 workflows waiting"), "{body}");
    store
        .set_limits(dispatcher::policy::Limits { max_queue: 3, ..store.limits().await.unwrap() })
        .await
        .unwrap();
    let res = post(&stack, 4, "prompt", json!({ "prompt": model_free_workflow() })).await;
    assert_eq!(res.status(), 429);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["type"], "queue_full");
}
