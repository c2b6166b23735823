//! What an operator watching a workshop reads: the gateway's and the
//! dispatcher's Prometheus `/metrics` move with submits, rejections,
//! dispatches, job ends and websockets, the gateway's only for the admin
//! token; and with `LOG_FORMAT=json` every log line is JSON, a job's lines in
//! the gateway, the dispatcher and gpu-task carry its `job_id`, and no
//! access code, token, password, secret or session cookie is ever logged.

use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::{free_port, wait_until};
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions, ADMIN_TOKEN, INTERNAL_SECRET};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const WAIT: Duration = Duration::from_secs(30);

/// The value of the sample `series` (`name` or `name{labels}`) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape_gateway(stack: &Stack) -> String {
    let res = stack.http.get(format!("{}/metrics", stack.gateway_url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    res.text().await.unwrap()
}

async fn scrape(url: &str) -> Option<String> {
    let res = reqwest::get(url).await.ok()?;
    res.status().is_success().then_some(())?;
    res.text().await.ok()
}

/// Waits until the gateway's metrics satisfy `check`; returns them.
async fn gateway_until(stack: &Stack, what: &str, check: impl Fn(&str) -> bool) -> String {
    let last = std::sync::Mutex::new(String::new());
    let found = wait_until(what, WAIT, || {
        let (check, last) = (&check, &last);
        async move {
            let text = scrape_gateway(stack).await;
            let ok = check(&text);
            *last.lock().unwrap() = text;
            ok.then_some(())
        }
    })
    .await;
    let last = last.into_inner().unwrap();
    if let Err(e) = found {
        panic!("{e}\n{last}");
    }
    last
}

async fn editor_socket(
    stack: &Stack,
    user: u32,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/user/{user}/ws", stack.gateway_url.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", stack.code(user)).parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

#[tokio::test]
async fn metrics_move_with_the_workshop_and_are_for_the_instructor_only() {
    let dispatcher_addr = format!("127.0.0.1:{}", free_port());
    let mut opts = StackOptions::new(Executor::Local);
    opts.node_delay = Duration::from_millis(150);
    opts.env.push(("DISPATCHER_METRICS_ADDR".into(), dispatcher_addr.clone()));
    let stack = start(opts).await;
    let metrics_url = format!("{}/metrics", stack.gateway_url);

    // Unauthorised scrapes: 401.
    assert_eq!(stack.http.get(&metrics_url).send().await.unwrap().status(), 401);
    let wrong = stack.http.get(&metrics_url).bearer_auth("not-the-token").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let participant = stack.http.get(&metrics_url).bearer_auth(stack.code(1)).send().await.unwrap();
    assert_eq!(participant.status(), 401);

    let dispatcher_url = format!("http://{dispatcher_addr}/metrics");
    let before_d = wait_until("the dispatcher's /metrics", WAIT, || scrape(&dispatcher_url)).await.unwrap();
    let before = scrape_gateway(&stack).await;
    assert_eq!(sample(&before, "comfy_multi_submits_total"), Some(0.0), "{before}");
    assert_eq!(sample(&before_d, "comfy_multi_dispatches_total"), Some(0.0), "{before_d}");
    assert_eq!(sample(&before, r#"comfy_multi_jobs{state="succeeded"}"#), Some(0.0), "{before}");

    // An open editor counts, and hears about the jobs below.
    let _socket = editor_socket(&stack, 1).await;
    gateway_until(&stack, "one open editor socket", |t| {
        sample(t, r#"comfy_multi_open_websockets{socket="editor"}"#) == Some(1.0)
    })
    .await;

    // One rejected prompt, two accepted; the second waits for the first (one running job per participant).
    let refused = stack.http.post(format!("{}/user/1/api/prompt", stack.gateway_url)).bearer_auth(stack.code(1));
    assert_eq!(refused.json(&json!({ "no": "prompt" })).send().await.unwrap().status(), 400);
    let first = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;
    let mut other = model_free_workflow();
    other["1"]["inputs"]["color"] = json!(255);
    let second = stack.submit(1, json!({ "prompt": other })).await;
    gateway_until(&stack, "the second job waiting in the queue", |t| {
        sample(t, r#"comfy_multi_queue_length{mode="fair",tier="0"}"#) == Some(1.0)
            && sample(t, r#"comfy_multi_jobs{state="queued"}"#) == Some(1.0)
    })
    .await;
    for id in [&first, &second] {
        assert_eq!(stack.finished(1, id).await["status"]["status_str"], "success");
    }

    let after = gateway_until(&stack, "both jobs' ends observed", |t| {
        sample(t, r#"comfy_multi_jobs{state="succeeded"}"#) == Some(2.0)
            && sample(t, r#"comfy_multi_run_seconds_count{state="succeeded"}"#) == Some(2.0)
    })
    .await;
    assert_eq!(sample(&after, "comfy_multi_submits_total"), Some(2.0), "{after}");
    assert_eq!(sample(&after, r#"comfy_multi_rejections_total{reason="no_prompt"}"#), Some(1.0), "{after}");
    assert_eq!(sample(&after, "comfy_multi_queue_wait_seconds_count"), Some(2.0), "{after}");
    assert!(sample(&after, "comfy_multi_queue_wait_seconds_sum").unwrap() > 0.0, "the second job waited: {after}");
    assert!(sample(&after, r#"comfy_multi_run_seconds_sum{state="succeeded"}"#).unwrap() > 0.0, "{after}");
    assert_eq!(sample(&after, r#"comfy_multi_queue_length{mode="fair",tier="0"}"#), Some(0.0), "{after}");
    assert_eq!(sample(&after, r#"comfy_multi_queue_length{mode="fifo",tier="0"}"#), Some(0.0), "{after}");
    // Health, as /healthz sees it: Redis answers, the dispatcher beats, ComfyUI was reached.
    for component in ["redis", "dispatcher", "comfyui"] {
        let up = format!(r#"comfy_multi_component_up{{component="{component}"}}"#);
        assert_eq!(sample(&after, &up), Some(1.0), "{after}");
    }
    let sent = sample(&after, r#"comfy_multi_websocket_messages_sent_total{socket="editor"}"#).unwrap_or(0.0);
    assert!(sent >= 4.0, "the editor was sent its status and the jobs' progress: {after}");

    let after_d = wait_until("the dispatcher to count both dispatches", WAIT, || async {
        let text = scrape(&dispatcher_url).await?;
        let done = sample(&text, "comfy_multi_dispatches_total") == Some(2.0)
            && sample(&text, "comfy_multi_jobs_in_flight") == Some(0.0);
        done.then_some(text)
    })
    .await
    .unwrap();
    assert!(after_d.contains("# TYPE comfy_multi_dispatches_total counter"), "{after_d}");
}

/// The span fields (`job_id`, ...) of a JSON log line, from its current span
/// and the span list.
fn job_ids(line: &Value) -> Vec<String> {
    let spans = line["spans"].as_array().cloned().unwrap_or_default();
    spans
        .iter()
        .chain(std::iter::once(&line["span"]))
        .filter_map(|s| s["job_id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn json_logs_tell_a_jobs_story_by_its_id_and_never_a_secret() {
    const ADMIN_PASSWORD: &str = "e2e-admin-password-do-not-log";
    let mut opts = StackOptions::new(Executor::Local);
    opts.env.push(("LOG_FORMAT".into(), "json".into()));
    opts.env.push(("ADMIN_PASSWORD".into(), ADMIN_PASSWORD.into()));
    let stack = start(opts).await;
    let plain = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // Sessions as a browser gets them: a participant's and the instructor's.
    let mut cookies = Vec::new();
    for (path, form) in [
        ("/login", vec![("user", "2".to_string()), ("code", stack.code(2).to_string())]),
        ("/admin/login", vec![("secret", ADMIN_PASSWORD.to_string())]),
        ("/admin/login", vec![("secret", ADMIN_TOKEN.to_string())]),
    ] {
        let res = plain.post(format!("{}{path}", stack.gateway_url)).form(&form).send().await.unwrap();
        assert_eq!(res.status(), 303, "{path}");
        let set = res.headers()["set-cookie"].to_str().unwrap();
        cookies.push(set.split(';').next().unwrap().split_once('=').unwrap().1.to_string());
    }
    // A failed login too: what was typed must not be logged either.
    let typo = "wrong-code-do-not-log";
    let res = plain.post(format!("{}/login", stack.gateway_url)).form(&[("user", "2"), ("code", typo)]).send().await.unwrap();
    assert_eq!(res.status(), 401);

    let _socket = editor_socket(&stack, 2).await;
    let job = stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
    assert_eq!(stack.finished(2, &job).await["status"]["status_str"], "success");
    // The dispatcher logs the job's end after the gateway knows it.
    let dispatcher = stack.process("dispatcher");
    wait_until("the dispatcher to log the job's end", WAIT, || async {
        dispatcher.log().lines().any(|l| l.contains(&job) && l.contains("job ended")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", dispatcher.log_tail(20)));

    let mut with_job = std::collections::BTreeMap::<&str, usize>::new();
    for process in stack.processes() {
        let log = process.log();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            // What the gateway prints for the operator on stdout (not a log line).
            if line.starts_with("listening on ") || line.starts_with("generated ") {
                continue;
            }
            let parsed: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", process.name()));
            if job_ids(&parsed).contains(&job) {
                *with_job.entry(process.name()).or_default() += 1;
            }
            // The local executor relays gpu-task's own lines (JSON too) in its messages.
            if let Some(relayed) = parsed["fields"]["message"].as_str().and_then(|m| m.strip_prefix("gpu-task: ")) {
                let inner: Value =
                    serde_json::from_str(relayed).unwrap_or_else(|e| panic!("gpu-task: not JSON ({e}): {relayed}"));
                if job_ids(&inner).contains(&job) {
                    *with_job.entry("gpu-task").or_default() += 1;
                }
            }
        }
        let mut secrets: Vec<&str> = vec![ADMIN_TOKEN, INTERNAL_SECRET, ADMIN_PASSWORD, typo];
        secrets.extend(stack.codes.iter().map(|(_, c)| c.as_str()));
        secrets.extend(cookies.iter().map(String::as_str));
        for secret in secrets {
            assert!(!log.contains(secret), "{} logged a secret ({secret})", process.name());
        }
    }
    for name in ["gateway", "dispatcher", "gpu-task"] {
        assert!(with_job.get(name).copied().unwrap_or(0) >= 2, "{name}'s lines about job {job}: {with_job:?}");
    }
}
