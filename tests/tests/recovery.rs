//! A run that dies without a result (gpu-task killed, as when a node is lost)
//! puts its job back at the front of its user's line, up to `MAX_ATTEMPTS`
//! runs; then the job fails with the executor's reason. Never stuck.

use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::{gpu_task_of, wait_until};
use comfy_multi_tests::stack::{start, Executor, StackOptions};
use dispatcher::job::JobState;
use dispatcher::queue::Store;
use dispatcher::JobId;
use serde_json::json;

async fn kill_run(store: &Store, id: &str, attempt: u32) {
    let pid = wait_until("gpu-task of the attempt to run", Duration::from_secs(30), || {
        let store = store.clone();
        let id = id.to_string();
        async move {
            let job = store.get(&id.parse::<JobId>().unwrap()).await.ok()??;
            if job.state == JobState::Running && job.attempts == attempt {
                gpu_task_of(&id)
            } else {
                None
            }
        }
    })
    .await
    .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[tokio::test]
async fn a_killed_run_is_retried_then_fails_with_the_reason() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = start(StackOptions { node_delay: Duration::from_millis(300), ..StackOptions::new(executor) }).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();

        // Killed once: runs again and succeeds, its outputs attached once.
        let id = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;
        kill_run(&store, &id, 1).await;
        let entry = stack.finished(1, &id).await;
        assert_eq!(entry["status"]["status_str"], "success", "{executor:?}: {entry:#}");
        assert_eq!(entry["outputs"]["7"]["images"].as_array().map(Vec::len), Some(1));
        let job = store.get(&id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(job.attempts, 2, "{executor:?}");
        assert_eq!(job.error, None, "{executor:?}: the lost first attempt is not the result");

        // Killed on every attempt: fails after MAX_ATTEMPTS (3) with a reason.
        let id = stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
        for attempt in 1..=3 {
            kill_run(&store, &id, attempt).await;
        }
        let entry = stack.finished(2, &id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        let job = store.get(&id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Failed, 3), "{executor:?}");
        let error = job.error.unwrap_or_default();
        assert!(error.contains("after 3 attempts") && error.contains("signal"), "{executor:?}: {error}");
    }
}
