//! `dispatcher report` against a real Redis: jobs taken through their states
//! with the store, then the real binary's JSON and CSV checked figure by
//! figure (and against `dispatcher::report::build` over the same records).

use std::collections::HashMap;

use comfy_multi_tests::harness::{bin_path, Redis};
use dispatcher::job::{now_ms, JobState};
use dispatcher::queue::{Cancelled, NewJob, Patch, Store};
use dispatcher::report::{self, Failure, Report, Totals};
use serde_json::json;

fn new_job(user: u32) -> NewJob {
    NewJob {
        user,
        workflow: json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}),
        extra_data: json!({}),
        priority: 0,
    }
}

/// Runs `dispatcher <args>` against `redis` with 2 slots; returns stdout.
async fn dispatcher(redis: &Redis, args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin_path("dispatcher"))
        .args(args)
        .env("REDIS_URL", &redis.url)
        .env("SLOTS", "2")
        .env_remove("COMFY_MULTI_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "dispatcher {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[derive(Clone, Copy)]
enum Outcome {
    Succeed,
    Fail,
    CancelWhileRunning,
}

#[tokio::test]
async fn report_counts_a_workshop() {
    let redis = Redis::start().await.unwrap();
    let store = Store::connect(&redis.url).await.unwrap();

    // Users 1..4 all have something queued at once: the peak is 4.
    let a = store.submit(new_job(1)).await.unwrap();
    let b = store.submit(new_job(2)).await.unwrap();
    let c = store.submit(new_job(3)).await.unwrap();
    let d = store.submit(new_job(1)).await.unwrap();
    let e = store.submit(new_job(4)).await.unwrap();
    assert_eq!(store.cancel(&e.id, Some(4)).await.unwrap(), Cancelled::Removed);

    let outcomes: HashMap<_, _> = [
        (a.id, Outcome::Succeed),
        (b.id, Outcome::Fail),
        (c.id, Outcome::Fail),
        (d.id, Outcome::CancelWhileRunning),
    ]
    .into();
    for _ in 0..outcomes.len() {
        let job = store.pop_next().await.unwrap().expect("a queued job");
        store.transition(&job.id, JobState::Running, Patch::default()).await.unwrap();
        match outcomes[&job.id] {
            Outcome::Succeed => {
                store.transition(&job.id, JobState::Succeeded, Patch::default()).await.unwrap();
            }
            Outcome::Fail => {
                let patch = Patch { error: Some("CUDA out of memory".into()), ..Patch::default() };
                store.transition(&job.id, JobState::Failed, patch).await.unwrap();
            }
            Outcome::CancelWhileRunning => {
                assert_eq!(store.cancel(&job.id, None).await.unwrap(), Cancelled::Stopping);
                store.transition(&job.id, JobState::Cancelled, Patch::default()).await.unwrap();
            }
        }
    }
    assert!(store.pop_next().await.unwrap().is_none());
    // One more, left waiting: the window is still open.
    store.submit(new_job(2)).await.unwrap();

    let jobs = store.all_jobs().await.unwrap();
    let expected = report::build(&jobs, 2, now_ms());
    let latest_finish = jobs.iter().filter_map(|j| j.finished_at).max().unwrap();

    // JSON on stdout.
    let text = dispatcher(&redis, &["report", "--format", "json"]).await;
    let got: Report = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(got.slots, 2);
    assert_eq!(
        got.totals,
        Totals { submitted: 6, queued: 1, dispatched: 0, running: 0, succeeded: 1, failed: 2, cancelled: 2 }
    );
    assert_eq!(got.failures, vec![Failure { reason: "CUDA out of memory".into(), count: 2 }]);
    assert_eq!(got.peak_concurrent_participants, 4);
    assert_eq!(got.peak_at_ms, Some(e.created_at));
    assert_eq!((got.wait.count, got.run.count), (4, 4), "e was cancelled while queued; f never left the queue");
    for s in [&got.wait, &got.run] {
        let (p50, p95, max) = (s.p50_s.unwrap(), s.p95_s.unwrap(), s.max_s.unwrap());
        assert!(0.0 <= p50 && p50 <= p95 && p95 <= max && max <= s.total_s, "{s:?}");
    }
    let window = got.window.as_ref().unwrap();
    assert_eq!(window.start_ms, a.created_at);
    assert!(window.open, "f is still queued");
    assert_eq!(window.end_ms, got.generated_at_ms, "an open window ends now");
    assert!(window.end_ms >= latest_finish);
    let fraction = got.gpu_busy_fraction.expect("a window");
    assert!((0.0..=1.0).contains(&fraction), "{fraction}");

    let by_user: Vec<_> = got
        .users
        .iter()
        .map(|u| (u.user, u.submitted, u.succeeded, u.failed, u.cancelled, u.queued, u.in_flight))
        .collect();
    // (user, submitted, succeeded, failed, cancelled, queued, in_flight)
    let want = vec![(1, 2, 1, 0, 1, 0, 0), (2, 2, 0, 1, 0, 1, 0), (3, 1, 0, 1, 0, 0, 0), (4, 1, 0, 0, 1, 0, 0)];
    assert_eq!(by_user, want);
    assert_eq!((got.users[3].wait.count, got.users[3].run.count), (0, 0));
    assert_eq!(got.users[0].run.count, 2, "the cancelled run counts too");

    // Everything not tied to "now" is exactly what the library computes.
    assert_eq!(got.users, expected.users);
    assert_eq!((&got.wait, &got.run), (&expected.wait, &expected.run));
    assert_eq!(got.gpu_busy_s, expected.gpu_busy_s, "nothing is running now");
    assert_eq!(got.gpu_busy_s, expected.run.total_s);

    // CSV into a file: nothing in it depends on "now".
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.csv");
    let stdout = dispatcher(&redis, &["report", "--format", "csv", "--output", path.to_str().unwrap()]).await;
    assert!(stdout.is_empty(), "{stdout}");
    let csv = std::fs::read_to_string(&path).unwrap();
    assert_eq!(csv, report::to_csv(&expected));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], report::CSV_COLUMNS.join(","));
    assert!(lines[0].starts_with("user,submitted,succeeded,failed,cancelled,queued,in_flight,wait_count"));
    assert!(lines[1].starts_with("1,2,1,0,1,0,0,2,"), "{csv}");
    assert!(lines[2].starts_with("2,2,0,1,0,1,0,1,"), "{csv}");
    assert!(lines[3].starts_with("3,1,0,1,0,0,0,1,"), "{csv}");
    assert_eq!(lines[4], "4,1,0,0,1,0,0,0,0,,,,0,0,,,");
    assert!(lines[5].starts_with("all,6,1,2,2,1,0,4,"), "{csv}");
    assert_eq!(lines.len(), 6);

    // CSV on stdout is the same table.
    assert_eq!(dispatcher(&redis, &["report", "--format", "csv"]).await, csv);
}

#[tokio::test]
async fn report_of_an_empty_store_has_nulls() {
    let redis = Redis::start().await.unwrap();
    let text = dispatcher(&redis, &["report"]).await;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["window"], serde_json::Value::Null);
    assert_eq!(json["gpu_busy_fraction"], serde_json::Value::Null);
    assert_eq!(json["wait"]["p50_s"], serde_json::Value::Null);
    assert_eq!(json["totals"]["submitted"], 0);
    assert_eq!(json["peak_concurrent_participants"], 0);
    let csv = dispatcher(&redis, &["report", "--format", "csv"]).await;
    let header = report::CSV_COLUMNS.join(",");
    assert_eq!(csv.lines().collect::<Vec<_>>(), vec![header.as_str(), "all,0,0,0,0,0,0,0,0,,,,0,0,,,"]);
}
