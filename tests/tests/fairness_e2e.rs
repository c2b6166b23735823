//! Fair share through the whole stack, with both executors: a burst from one
//! participant does not hold back the others, and an instructor-raised job
//! goes first.

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::stack::{start, Executor, StackOptions};
use dispatcher::queue::Store;
use dispatcher::JobId;
use serde_json::json;

#[tokio::test]
async fn a_burst_does_not_hold_back_the_others_and_priority_goes_first() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = start(StackOptions::new(executor)).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();
        store.pause("test: queue everything first").await.unwrap();
        let burst: Vec<String> = {
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(stack.submit(1, json!({ "prompt": model_free_workflow() })).await);
            }
            ids
        };
        let single2 = stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
        let single3 = stack.submit(3, json!({ "prompt": model_free_workflow() })).await;
        let raised = stack.submit(4, json!({ "prompt": model_free_workflow() })).await;
        store.raise_job(&raised.parse().unwrap(), true).await.unwrap();
        store.resume().await.unwrap();

        let mut started = Vec::new();
        for (user, id) in [(1, &burst[0]), (1, &burst[1]), (1, &burst[2]), (2, &single2), (3, &single3), (4, &raised)] {
            let entry = stack.finished(user, id).await;
            assert_eq!(entry["status"]["status_str"], "success", "{executor:?}: {entry:#}");
            let job = store.get(&id.parse::<JobId>().unwrap()).await.unwrap().unwrap();
            started.push((job.dispatched_at.unwrap(), id.clone()));
        }
        started.sort();
        let order: Vec<&String> = started.iter().map(|(_, id)| id).collect();
        let at = |id: &String| order.iter().position(|x| *x == id).unwrap();
        assert_eq!(at(&raised), 0, "{executor:?}: the raised job goes first");
        assert!(at(&single2) < at(&burst[1]) && at(&single3) < at(&burst[1]), "{executor:?}: {order:?}");
        assert!(at(&burst[0]) < at(&burst[1]) && at(&burst[1]) < at(&burst[2]), "a user's own jobs keep their order");
    }
}
