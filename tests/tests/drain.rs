//! `dispatcher drain` and `dispatcher resume` against the whole stack: jobs in
//! flight finish or go back to the queue, queued jobs stay queued, the GPU
//! node is drained, nothing is lost and nothing runs twice.

use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::{bin_path, wait_until};
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions};
use dispatcher::job::JobState;
use dispatcher::queue::Store;
use dispatcher::JobId;
use serde_json::{json, Value};

/// Runs the `dispatcher` CLI against the stack; returns (success, stdout+stderr).
async fn cli(stack: &Stack, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(bin_path("dispatcher"))
        .args(args)
        .envs(stack.dispatcher_env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn state(store: &Store, id: &str) -> JobState {
    store.get(&id.parse::<JobId>().unwrap()).await.unwrap().unwrap().state
}

async fn node_eligibility(stack: &Stack) -> Option<String> {
    let url = stack.nomad_url.as_ref()?;
    let nodes: Value = reqwest::get(format!("{url}/v1/nodes")).await.unwrap().json().await.unwrap();
    nodes[0]["SchedulingEligibility"].as_str().map(str::to_string)
}

#[tokio::test]
async fn drain_requeues_what_runs_keeps_the_queue_and_resume_finishes_it_all() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = start(StackOptions { node_delay: Duration::from_millis(300), ..StackOptions::new(executor) }).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();
        let mut ids = Vec::new();
        for user in 1..=3 {
            ids.push(stack.submit(user, json!({ "prompt": model_free_workflow() })).await);
        }
        wait_until("the first job to run", Duration::from_secs(30), || {
            let (store, id) = (store.clone(), ids[0].clone());
            async move { (state(&store, &id).await == JobState::Running).then_some(()) }
        })
        .await
        .unwrap();

        let (ok, out) = cli(&stack, &["drain", "--deadline", "0s"]).await;
        assert!(ok, "{executor:?}: drain failed: {out}");
        assert!(out.contains("0 finished, 1 requeued, 3 still queued"), "{executor:?}: {out}");
        for id in &ids {
            assert_eq!(state(&store, id).await, JobState::Queued, "{executor:?}: every job is queued after the drain");
        }
        assert_eq!(store.paused().await.unwrap().as_deref(), Some("drain"));
        if matches!(executor, Executor::Nomad) {
            assert_eq!(node_eligibility(&stack).await.as_deref(), Some("ineligible"), "the GPU node is drained");
        }

        // Safe to run twice.
        let (ok, out) = cli(&stack, &["drain", "--deadline", "0s"]).await;
        assert!(ok && out.contains("0 requeued, 3 still queued"), "{executor:?}: second drain: {out}");

        let (ok, out) = cli(&stack, &["resume"]).await;
        assert!(ok, "{executor:?}: resume failed: {out}");
        if matches!(executor, Executor::Nomad) {
            assert_eq!(node_eligibility(&stack).await.as_deref(), Some("eligible"));
        }
        for (user, id) in (1..=3).zip(&ids) {
            let entry = stack.finished(user, id).await;
            assert_eq!(entry["status"]["status_str"], "success", "{executor:?}: {entry:#}");
            let images = entry["outputs"]["7"]["images"].as_array().unwrap();
            assert_eq!(images.len(), 1, "{executor:?}: one output, attached once: {entry:#}");
        }
        let first = store.get(&ids[0].parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(first.attempts, 2, "the requeued job ran again as a new attempt");
    }
}

#[tokio::test]
async fn drain_waits_for_jobs_in_flight_to_finish() {
    let stack = start(StackOptions { node_delay: Duration::from_millis(100), ..StackOptions::new(Executor::Nomad) }).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    let running = stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
    wait_until("the job to be taken", Duration::from_secs(30), || {
        let (store, id) = (store.clone(), running.clone());
        async move { state(&store, &id).await.is_in_flight().then_some(()) }
    })
    .await
    .unwrap();
    let queued = stack.submit(3, json!({ "prompt": model_free_workflow() })).await;

    let (ok, out) = cli(&stack, &["drain", "--deadline", "2m"]).await;
    assert!(ok, "drain failed: {out}");
    assert!(out.contains("1 finished, 0 requeued, 1 still queued"), "{out}");
    assert_eq!(state(&store, &running).await, JobState::Succeeded);
    assert_eq!(state(&store, &queued).await, JobState::Queued, "queued jobs stay queued");
    let (ok, status) = cli(&stack, &["status"]).await;
    assert!(ok && status.contains("paused"), "{status}");
}

#[tokio::test]
async fn ctrl_c_during_a_drain_leaves_a_consistent_state() {
    use tokio::io::AsyncBufReadExt;
    let stack = start(StackOptions { node_delay: Duration::from_millis(400), ..StackOptions::new(Executor::Nomad) }).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    let id = stack.submit(4, json!({ "prompt": model_free_workflow() })).await;
    wait_until("the job to run", Duration::from_secs(30), || {
        let (store, id) = (store.clone(), id.clone());
        async move { (state(&store, &id).await == JobState::Running).then_some(()) }
    })
    .await
    .unwrap();

    let mut drain = tokio::process::Command::new(bin_path("dispatcher"))
        .args(["drain", "--deadline", "10m"])
        .envs(stack.dispatcher_env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(drain.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap();
    assert!(first.is_some_and(|l| l.contains("dispatching paused")));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(drain.id().unwrap() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), drain.wait_with_output()).await.unwrap().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("drain interrupted"), "{out:?}");

    assert_eq!(store.paused().await.unwrap().as_deref(), Some("drain"), "still paused");
    assert!(state(&store, &id).await.is_in_flight() || state(&store, &id).await == JobState::Succeeded);
    let (ok, out) = cli(&stack, &["resume"]).await;
    assert!(ok, "{out}");
    let entry = stack.finished(4, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
}
