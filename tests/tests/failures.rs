//! Failure handling against the whole stack, with real processes killed for
//! real: a dispatcher SIGKILLed at any point neither loses nor duplicates a
//! job (reconciliation), Nomad going away keeps the queue and `/healthz`
//! says so (also when the link to Nomad breaks while a run is followed,
//! through a cut-able proxy), an unreachable Consul leaves the gateway
//! serving, an unreachable ComfyUI fails a run fast and the job is retried,
//! and a gateway restart keeps sessions, queue, history and outputs.

use std::time::{Duration, Instant};

use comfy_multi_tests::browser::{self, Browser};
use comfy_multi_tests::comfyui::{model_free_workflow, ComfyUi, Options};
use comfy_multi_tests::harness::{free_port, wait_until};
use comfy_multi_tests::stack::{start, stack_with, Executor, Stack, StackOptions, ADMIN_TOKEN};
use dispatcher::job::{Job, JobState};
use dispatcher::nomad::NomadClient;
use dispatcher::queue::{Patch, Store};
use dispatcher::JobId;
use serde_json::{json, Value};

/// The model-free workflow, made distinct by `n` so that ComfyUI's cache
/// does not make it instant.
fn workflow(n: u32) -> Value {
    let mut prompt = model_free_workflow();
    prompt["1"]["inputs"]["color"] = json!(n);
    json!({ "prompt": prompt })
}

async fn job(store: &Store, id: &str) -> Job {
    store.get(&id.parse::<JobId>().unwrap()).await.unwrap().unwrap()
}

async fn wait_state(store: &Store, id: &str, state: JobState) -> Job {
    wait_until(&format!("job {id} to be {state}"), Duration::from_secs(60), || async move {
        let job = job(store, id).await;
        (job.state == state).then_some(job)
    })
    .await
    .unwrap()
}

/// How many children of `comfy-workflow` Nomad made for job `id` (by meta `job_id`).
async fn nomad_children(stack: &Stack, id: &str) -> usize {
    let client = NomadClient::new(stack.nomad_url.as_ref().unwrap(), None).unwrap();
    let mut n = 0;
    for stub in client.list_jobs("comfy-workflow/dispatch-").await.unwrap() {
        let job = client.read_job(&stub.id).await.unwrap().unwrap();
        if job.pointer("/Meta/job_id").and_then(Value::as_str) == Some(id) {
            n += 1;
        }
    }
    n
}

/// The job succeeded once: one run (one Nomad child), its image attached once.
async fn assert_ran_once(stack: &Stack, store: &Store, user: u32, id: &str, what: &str) {
    let entry = stack.finished(user, id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{what}: {entry:#}");
    let images = entry["outputs"]["7"]["images"].as_array().map(Vec::len);
    assert_eq!(images, Some(1), "{what}: one output, attached once: {entry:#}");
    let job = job(store, id).await;
    assert_eq!(job.attempts, 1, "{what}: handed to the executor once, not run again");
    if stack.nomad_url.is_some() {
        assert_eq!(nomad_children(stack, id).await, 1, "{what}: one Nomad child");
    }
}

async fn healthz(stack: &Stack) -> (u16, Value) {
    let res = reqwest::get(format!("{}/healthz", stack.gateway_url)).await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

/// Waits until `/healthz` answers 200 with `component` in `status`; returns the body.
async fn wait_health(stack: &Stack, component: &str, status: &str) -> Value {
    let what = format!("/healthz to say {component} is {status}");
    wait_until(&what, Duration::from_secs(45), || async move {
        let (code, health) = healthz(stack).await;
        (code == 200 && health["components"][component]["status"] == status).then_some(health)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_killed_dispatcher_neither_loses_nor_duplicates_a_job() {
    for executor in [Executor::Local, Executor::Nomad] {
        let opts = StackOptions { node_delay: Duration::from_millis(700), ..StackOptions::new(executor) };
        let mut stack = start(opts).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();

        // Killed while a run is in flight: its gpu-task goes on.
        let running = stack.submit(1, workflow(2)).await;
        wait_state(&store, &running, JobState::Running).await;
        stack.kill_service("dispatcher").await;

        // Killed right after the pop: dispatched, not yet handed over.
        let popped = stack.submit(2, workflow(3)).await;
        let taken = store.pop_next().await.unwrap().expect("the job is next");
        assert_eq!(taken.id.to_string(), popped);
        assert_eq!((taken.state, taken.executor_ref.as_deref()), (JobState::Dispatched, None));

        stack.start_dispatcher(&[]);
        assert_ran_once(&stack, &store, 1, &running, &format!("{executor:?}, killed mid-run")).await;
        assert_ran_once(&stack, &store, 2, &popped, &format!("{executor:?}, killed after the pop")).await;

        // Redis lost the dispatch's writes (its last second before a
        // crash): the job is queued again, its run goes on. The restarted
        // dispatcher adopts the run instead of running the job twice.
        let lost = stack.submit(3, workflow(4)).await;
        wait_state(&store, &lost, JobState::Running).await;
        stack.kill_service("dispatcher").await;
        let patch = Patch { attempts: Some(0), ..Patch::default() };
        store.transition(&lost.parse().unwrap(), JobState::Queued, patch).await.unwrap();
        stack.start_dispatcher(&[]);
        assert_ran_once(&stack, &store, 3, &lost, &format!("{executor:?}, dispatch lost by Redis")).await;
        assert!(store.inflight().await.unwrap().is_empty(), "{executor:?}: nothing left in flight");
    }
}

#[tokio::test]
async fn nomad_unreachable_keeps_the_queue_and_healthz_says_what_is_down() {
    let mut stack = start(StackOptions::new(Executor::Nomad)).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    let (status, health) = healthz(&stack).await;
    assert_eq!(status, 200, "{health:#}");
    assert_eq!(health["components"]["redis"]["status"], "up", "{health:#}");

    stack.kill_service("nomad-standin").await;
    // Participants still submit; the dispatcher backs off and keeps the job.
    let id = stack.submit(1, workflow(5)).await;
    let health = wait_health(&stack, "nomad", "down").await;
    let nomad = &health["components"]["nomad"];
    assert!(nomad["since"].is_u64(), "{health:#}");
    assert!(nomad["error"].as_str().unwrap_or("").contains("cannot reach Nomad"), "{health:#}");
    assert!(
        health["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().starts_with("Nomad is unreachable since")),
        "{health:#}"
    );
    assert_eq!(health["components"]["dispatcher"]["status"], "up", "{health:#}");
    wait_until("the job to wait in the queue, its attempt given back", Duration::from_secs(30), || {
        let store = &store;
        let id = &id;
        async move {
            let job = job(store, id).await;
            (job.state == JobState::Queued && job.attempts == 0).then_some(())
        }
    })
    .await
    .unwrap();
    let snapshot = stack.admin_snapshot().await;
    assert_eq!(snapshot["health"]["components"]["nomad"]["status"], "down", "the admin page's banner");
    if !browser::skip() {
        // The instructor sees it on the page, in a real browser.
        let shot = browser::artifacts_dir(env!("CARGO_TARGET_TMPDIR")).join("admin-nomad-down.png");
        let args = [stack.gateway_url.as_str(), ADMIN_TOKEN, shot.to_str().unwrap()];
        let mut page = Browser::spawn("admin.mjs", args);
        page.expect("READY", Duration::from_secs(60)).await;
        page.send("WAIT_TEXT #health-banner Nomad unreachable since").await;
        page.expect("TEXT", Duration::from_secs(30)).await;
        page.send("SCREENSHOT").await;
        page.expect("SHOT", Duration::from_secs(30)).await;
    }

    // Nomad back: the queue goes on, the job runs once.
    stack.restart_nomad_standin().await;
    assert_ran_once(&stack, &store, 1, &id, "after Nomad came back").await;
    let (_, health) = healthz(&stack).await;
    assert_eq!(health["components"]["nomad"]["status"], "up", "{health:#}");

    // No dispatcher: /healthz still 200 (submits work) and says so.
    stack.kill_service("dispatcher").await;
    let health = wait_health(&stack, "dispatcher", "down").await;
    assert!(health["problems"].to_string().contains("The dispatcher is not running"), "{health:#}");
}

#[tokio::test]
async fn nomad_unreachable_while_a_run_is_followed_neither_stops_nor_repeats_it() {
    // The link to Nomad breaks, not Nomad: the stand-in and the gpu-task it
    // runs go on, as on a real cluster seen across a network outage.
    let opts = StackOptions {
        node_delay: Duration::from_millis(2500),
        proxies: true,
        // Only the follow may tell that Nomad is gone (a reconciliation
        // pass would tell too, but its turn comes too late to prove that).
        env: vec![("RECONCILE_SECONDS".into(), "3600".into())],
        ..StackOptions::new(Executor::Nomad)
    };
    let stack = start(opts).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    let link = stack.nomad_proxy.as_ref().expect("a proxy to Nomad");

    let running = stack.submit(1, workflow(11)).await;
    wait_state(&store, &running, JobState::Running).await;
    link.cut();
    // Participants still submit; with the one slot taken by the followed
    // run, the new job waits in the queue.
    let waiting = stack.submit(2, workflow(12)).await;
    let health = wait_health(&stack, "nomad", "down").await;
    assert!(health["components"]["nomad"]["error"].as_str().unwrap_or("").contains("cannot reach Nomad"), "{health:#}");
    // Seen by the follow itself (within FOLLOW_PATIENCE), not only by the
    // next reconciliation: the run is still going.
    assert_eq!(job(&store, &running).await.state, JobState::Running, "told while the run goes on");
    let snapshot = stack.admin_snapshot().await;
    assert_eq!(snapshot["health"]["components"]["nomad"]["status"], "down", "the admin page's banner");

    // gpu-task reports to the gateway, not through Nomad: the run ends well
    // while the dispatcher still cannot see its end.
    let entry = stack.finished(1, &running).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
    let (_, health) = healthz(&stack).await;
    assert_eq!(health["components"]["nomad"]["status"], "down", "still cut: {health:#}");
    let queued = job(&store, &waiting).await;
    assert_eq!((queued.state, queued.attempts), (JobState::Queued, 0), "nothing dispatched while Nomad is cut");
    assert_eq!(nomad_children(&stack, &running).await, 1, "one child while cut");
    assert_eq!(nomad_children(&stack, &waiting).await, 0, "no child for the waiting job yet");

    link.restore();
    assert_ran_once(&stack, &store, 1, &running, "followed across the outage").await;
    assert_ran_once(&stack, &store, 2, &waiting, "submitted during the outage").await;
    wait_health(&stack, "nomad", "up").await;
    assert!(store.inflight().await.unwrap().is_empty(), "nothing left in flight");
}

#[tokio::test]
async fn consul_unreachable_the_gateway_keeps_serving_and_healthz_says_so() {
    let opts = StackOptions { proxies: true, ..StackOptions::new(Executor::Local) };
    let mut stack = start(opts).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    wait_health(&stack, "consul", "up").await;
    // Without Consul gpu-task cannot find ComfyUI (the case above): keep
    // the job from running until Consul is back.
    stack.kill_service("dispatcher").await;
    let link = stack.consul_proxy.as_ref().expect("a proxy to Consul");

    link.cut();
    let health = wait_health(&stack, "consul", "down").await;
    assert!(health["components"]["consul"]["error"].as_str().unwrap_or("").contains("no answer"), "{health:#}");
    assert!(health["problems"].to_string().contains("Consul"), "{health:#}");
    let snapshot = stack.admin_snapshot().await;
    assert_eq!(snapshot["cluster"]["consul_reachable"], false, "the admin page's banner: {:#}", snapshot["cluster"]);
    // The gateway keeps serving: participants log in, submit, see the queue.
    let id = stack.submit(1, workflow(13)).await;
    let queue: Value = stack.get(1, "queue").send().await.unwrap().json().await.unwrap();
    assert!(queue.to_string().contains(&id), "the job is in the participant's queue: {queue:#}");
    assert_eq!(job(&store, &id).await.state, JobState::Queued);

    stack.consul_proxy.as_ref().unwrap().restore();
    wait_health(&stack, "consul", "up").await;
    stack.start_dispatcher(&[]);
    assert_ran_once(&stack, &store, 1, &id, "submitted while Consul was unreachable").await;
}

#[tokio::test]
async fn unreachable_comfyui_fails_each_run_fast_then_the_job_with_the_reason() {
    for executor in [Executor::Local, Executor::Nomad] {
        let dead = format!("http://127.0.0.1:{}", free_port());
        let stack = stack_with(executor, Some(dead.clone())).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();
        let begun = Instant::now();
        let id = stack.submit(1, workflow(6)).await;
        let entry = stack.finished(1, &id).await;
        let took = begun.elapsed();
        assert_eq!(entry["status"]["status_str"], "error", "{executor:?}: {entry:#}");
        let job = job(&store, &id).await;
        assert_eq!((job.state, job.attempts), (JobState::Failed, 3), "{executor:?}: run MAX_ATTEMPTS times");
        let error = job.error.unwrap_or_default();
        assert!(
            error.contains(&format!("cannot reach ComfyUI at {dead}")) && error.contains("after 3 attempts"),
            "{executor:?}: {error}"
        );
        assert!(took < Duration::from_secs(60), "{executor:?}: three runs took {took:?}");
        let (_, health) = healthz(&stack).await;
        assert_eq!(health["components"]["comfyui"]["status"], "down", "{executor:?}: {health:#}");
    }
}

#[tokio::test]
async fn a_job_waits_out_a_comfyui_restart() {
    for executor in [Executor::Local, Executor::Nomad] {
        let port = free_port();
        let mut stack = stack_with(executor, Some(format!("http://127.0.0.1:{port}"))).await;
        // Enough attempts that the test, not a race, decides when ComfyUI is back.
        stack.kill_service("dispatcher").await;
        stack.start_dispatcher(&[("MAX_ATTEMPTS", "50")]);
        let store = Store::connect(&stack.redis_url).await.unwrap();
        let id = stack.submit(1, workflow(7)).await;
        let requeued = wait_until("the first run to fail and the job to be requeued", Duration::from_secs(60), || {
            let (store, id) = (&store, &id);
            async move {
                let job = job(store, id).await;
                job.error.filter(|e| e.starts_with("attempt 1 ended without a result: cannot reach ComfyUI"))
            }
        })
        .await
        .unwrap();
        assert!(!job(&store, &id).await.state.is_terminal(), "{executor:?}: {requeued}");

        let dir = tempfile::tempdir().unwrap();
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let _comfy = ComfyUi::bind(listen, Options::new(dir.path().join("out"), dir.path().join("in"))).await.unwrap();
        let entry = stack.finished(1, &id).await;
        assert_eq!(entry["status"]["status_str"], "success", "{executor:?}: {entry:#}");
        assert_eq!(entry["outputs"]["7"]["images"].as_array().map(Vec::len), Some(1));
        let job = job(&store, &id).await;
        assert!(job.attempts >= 2, "{executor:?}: {job:?}");
        assert_eq!(job.error, None, "{executor:?}: the failed runs are not the result");
    }
}

/// Logs participant `n` in through the login form; returns the `Cookie` header value.
async fn login(stack: &Stack, n: u32) -> String {
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/login", stack.gateway_url))
        .form(&[("user", n.to_string()), ("code", stack.code(n).to_string())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 303);
    let cookie = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("cm_session="))
        .expect("a session cookie");
    cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn a_gateway_restart_keeps_sessions_queue_history_and_outputs() {
    let opts = StackOptions { node_delay: Duration::from_millis(700), ..StackOptions::new(Executor::Nomad) };
    let mut stack = start(opts).await;
    let store = Store::connect(&stack.redis_url).await.unwrap();
    let cookie = login(&stack, 1).await;
    let done = stack.submit(1, workflow(8)).await;
    let entry = stack.finished(1, &done).await;
    let image = entry["outputs"]["7"]["images"][0]["filename"].as_str().unwrap().to_string();
    let running = stack.submit(2, workflow(9)).await;
    wait_state(&store, &running, JobState::Running).await;
    let queued = stack.submit(3, workflow(10)).await;

    stack.kill_service("gateway").await;
    // The running job's prompt ends while the gateway is down.
    let comfy = stack.comfyui_url().expect("the ComfyUI stand-in");
    wait_until("the prompt to finish in ComfyUI", Duration::from_secs(60), || {
        let url = format!("{comfy}/history");
        async move {
            let h: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            (h.as_object()?.len() >= 2).then_some(())
        }
    })
    .await
    .unwrap();
    stack.restart_gateway().await;

    // The browser's session still works; history and outputs are there.
    let http = reqwest::Client::new();
    let with_cookie = |path: &str| {
        http.get(format!("{}/user/1/api/{path}", stack.gateway_url)).header("cookie", &cookie).send()
    };
    let history: Value = with_cookie(&format!("history/{done}")).await.unwrap().json().await.unwrap();
    assert_eq!(history[&done]["status"]["status_str"], "success", "{history:#}");
    let view = with_cookie(&format!("view?filename={image}&subfolder={done}&type=output")).await.unwrap();
    assert_eq!(view.status().as_u16(), 200);
    assert!(view.bytes().await.unwrap().starts_with(b"\x89PNG"), "the image survived");

    // The job that finished while the gateway was down is recorded (gpu-task
    // retried its reports), and the queued one still runs.
    assert_ran_once(&stack, &store, 2, &running, "finished during the restart").await;
    assert_ran_once(&stack, &store, 3, &queued, "queued during the restart").await;
}
