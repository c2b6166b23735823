//! gpu-task as a real process, against the ComfyUI stand-in and a fake
//! gateway that records every internal API call.
//!
//! Why a fake gateway: these tests are about what gpu-task says to the
//! gateway (the contract in `dispatcher::contract::internal`), which a
//! recording server shows directly; the real gateway has its own tests.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::any;
use axum::Router;
use comfy_multi_tests::comfyui::{model_free_workflow, ComfyUi, Options};
use dispatcher::contract::{Finished, OutputQuery, WorkflowPayload, INTERNAL_SECRET_HEADER, PAYLOAD_FILE};
use serde_json::{json, Value};
use tokio::sync::Notify;

const SECRET: &str = "test-secret";
/// Generous upper bound for anything to happen; tests wait on conditions.
const DEADLINE: Duration = Duration::from_secs(60);

/// One call gpu-task made.
#[derive(Debug, Clone)]
struct Call {
    method: Method,
    /// The last path segment: workflow, started, events, outputs, finished.
    what: String,
    query: Option<String>,
    secret: Option<String>,
    body: Bytes,
}

impl Call {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone)]
struct Gateway {
    calls: Arc<Mutex<Vec<Call>>>,
    changed: Arc<Notify>,
    /// What `GET workflow` answers.
    workflow: Arc<Mutex<Option<WorkflowPayload>>>,
}

impl Gateway {
    async fn start() -> (Gateway, String) {
        let gw = Gateway { calls: Arc::default(), changed: Arc::default(), workflow: Arc::default() };
        let app = Router::new().route("/_internal/jobs/{job}/{what}", any(record)).with_state(gw.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (gw, url)
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits until `cond` holds for the calls so far.
    async fn wait_for(&self, what: &str, cond: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                let calls = self.calls();
                if cond(&calls) {
                    return calls;
                }
                notified.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("gateway never saw {what}; calls: {:#?}", self.calls()))
    }
}

async fn record(
    State(gw): State<Gateway>,
    UrlPath((_job, what)): UrlPath<(String, String)>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let secret = headers.get(INTERNAL_SECRET_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    gw.calls.lock().unwrap().push(Call { method, what: what.clone(), query, secret, body });
    gw.changed.notify_waiters();
    if what == "workflow" {
        return match gw.workflow.lock().unwrap().clone() {
            Some(w) => (StatusCode::OK, serde_json::to_string(&w).unwrap()),
            None => (StatusCode::NOT_FOUND, "no workflow".into()),
        };
    }
    (StatusCode::NO_CONTENT, String::new())
}

/// A running ComfyUI stand-in with its own dirs.
struct Comfy {
    url: String,
    dirs: tempfile::TempDir,
    _comfy: ComfyUi,
}

async fn comfyui(node_delay: Duration) -> Comfy {
    let dirs = tempfile::tempdir().unwrap();
    let opts = Options {
        output_dir: dirs.path().join("output"),
        input_dir: dirs.path().join("input"),
        node_delay,
    };
    std::fs::create_dir_all(&opts.output_dir).unwrap();
    std::fs::create_dir_all(&opts.input_dir).unwrap();
    let comfy = ComfyUi::start(opts).await.unwrap();
    Comfy { url: comfy.url.clone(), dirs, _comfy: comfy }
}

/// A port nobody listens on (it was free a moment ago).
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

/// gpu-task with the environment a Nomad dispatch gives it.
fn gpu_task(task_dir: &Path, comfy_url: &str, gateway_url: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gpu-task"));
    cmd.env_clear()
        .env("NOMAD_META_job_id", "job-1")
        .env("NOMAD_META_JOB_ID", "job-1")
        .env("NOMAD_META_user_id", "7")
        .env("NOMAD_META_USER_ID", "7")
        .env("NOMAD_TASK_DIR", task_dir)
        .env("COMFYUI_URL", comfy_url)
        .env("GATEWAY_URL", gateway_url)
        // Must not be needed: both URLs are given.
        .env("CONSUL_HTTP_ADDR", dead_url())
        .env("INTERNAL_SECRET", SECRET)
        .env("RUST_LOG", "gpu_task=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn write_payload(task_dir: &Path, prompt: Value) {
    let payload = WorkflowPayload::from_job(prompt, json!({"extra_pnginfo": {"workflow": {}}}));
    std::fs::write(task_dir.join(PAYLOAD_FILE), serde_json::to_vec(&payload).unwrap()).unwrap();
}

/// Waits for the process to exit; returns its exit code and stderr.
async fn finish(child: tokio::process::Child) -> (Option<i32>, String) {
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("gpu-task did not exit in time")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Shown when a test fails (cargo captures it otherwise).
    eprintln!("--- gpu-task stderr ({:?}) ---\n{stderr}", out.status);
    (out.status.code(), stderr)
}

fn last_line(stderr: &str) -> &str {
    stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

fn finished(calls: &[Call]) -> Finished {
    let call = calls.iter().find(|c| c.what == "finished").expect("no finished report");
    serde_json::from_slice(&call.body).unwrap()
}

#[tokio::test]
async fn success_uploads_the_png_and_reports() {
    let comfy = comfyui(Duration::ZERO).await;
    let (gw, gw_url) = Gateway::start().await;
    let task_dir = tempfile::tempdir().unwrap();
    write_payload(task_dir.path(), model_free_workflow());

    let child = gpu_task(task_dir.path(), &comfy.url, &gw_url).spawn().unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");

    let calls = gw.calls();
    assert!(calls.iter().all(|c| c.secret.as_deref() == Some(SECRET)), "every call carries the secret");
    let order: Vec<&str> = calls.iter().map(|c| c.what.as_str()).collect();
    assert_eq!(order.first(), Some(&"started"), "{order:?}");
    assert_eq!(order.last(), Some(&"finished"), "{order:?}");
    assert!(!order.contains(&"workflow"), "the payload file was there: {order:?}");

    // Events: ComfyUI's messages as received, with ComfyUI's prompt id.
    let events: Vec<Value> = calls.iter().filter(|c| c.what == "events").map(Call::json).collect();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    for t in ["execution_start", "executed", "execution_success"] {
        assert!(types.contains(&t), "no {t} relayed: {types:?}");
    }
    let prompt_id = events[0]["data"]["prompt_id"].as_str().unwrap().to_string();
    assert!(events.iter().all(|e| e["data"]["prompt_id"] == prompt_id.as_str()), "only its own prompt");
    assert!(
        events.iter().any(|e| e["type"] == "executing" && e["data"]["node"].is_null()),
        "the end (`executing` with node null) is relayed too: {types:?}"
    );

    // The PNG.
    let uploads: Vec<&Call> = calls.iter().filter(|c| c.what == "outputs").collect();
    assert_eq!(uploads.len(), 1, "{order:?}");
    assert_eq!(uploads[0].method, Method::PUT);
    let q: OutputQuery = serde_urlencoded_query(uploads[0].query.as_deref().unwrap());
    assert_eq!(q.kind, "images");
    assert!(q.filename.ends_with(".png"), "{q:?}");
    assert_eq!(q.index, 0);
    assert!(uploads[0].body.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    let report = finished(&calls);
    assert!(report.success, "{report:?}");
    assert_eq!(report.error, None);
    assert!(report.messages.iter().any(|m| m[0] == "execution_success"), "{:?}", report.messages);
}

#[tokio::test]
async fn without_payload_file_the_workflow_comes_from_the_gateway() {
    let comfy = comfyui(Duration::ZERO).await;
    let (gw, gw_url) = Gateway::start().await;
    *gw.workflow.lock().unwrap() =
        Some(WorkflowPayload::from_job(model_free_workflow(), Value::Null));
    let task_dir = tempfile::tempdir().unwrap();

    let child = gpu_task(task_dir.path(), &comfy.url, &gw_url).spawn().unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    let calls = gw.calls();
    assert_eq!(calls[0].what, "workflow");
    assert!(finished(&calls).success);
}

#[tokio::test]
async fn unreachable_comfyui_fails_fast_with_the_reason() {
    let (gw, gw_url) = Gateway::start().await;
    let task_dir = tempfile::tempdir().unwrap();
    write_payload(task_dir.path(), model_free_workflow());
    let comfy_url = dead_url();

    let started = std::time::Instant::now();
    let child = gpu_task(task_dir.path(), &comfy_url, &gw_url).spawn().unwrap();
    let (code, stderr) = finish(child).await;
    let took = started.elapsed();

    assert_eq!(code, Some(3), "a retryable failure: stderr:\n{stderr}");
    let expected = format!("cannot reach ComfyUI at {comfy_url}: ");
    let report = finished(&gw.calls());
    assert!(!report.success);
    assert!(report.retryable, "not the workflow's fault: another run may succeed");
    assert!(report.error.as_deref().unwrap_or("").starts_with(&expected), "{report:?}");
    assert!(last_line(&stderr).starts_with(&expected), "stderr:\n{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?} to give up");
}

#[tokio::test]
async fn a_rejected_prompt_fails_with_comfyuis_message() {
    let comfy = comfyui(Duration::ZERO).await;
    let (gw, gw_url) = Gateway::start().await;
    let task_dir = tempfile::tempdir().unwrap();
    let mut prompt = model_free_workflow();
    prompt["2"]["class_type"] = json!("NoSuchNode");
    write_payload(task_dir.path(), prompt);

    let child = gpu_task(task_dir.path(), &comfy.url, &gw_url).spawn().unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    let report = finished(&gw.calls());
    assert!(!report.retryable, "a refused workflow would be refused again");
    assert!(!report.success);
    let error = report.error.unwrap_or_default();
    assert!(error.starts_with("ComfyUI rejected the workflow: "), "{error}");
    assert!(error.contains("NoSuchNode"), "{error}");
    assert_eq!(last_line(&stderr), error);
    assert!(!gw.calls().iter().any(|c| c.what == "outputs"));
}

#[tokio::test]
async fn an_execution_error_names_the_node() {
    let comfy = comfyui(Duration::ZERO).await;
    // An "image" ComfyUI cannot decode: LoadImage passes validation, fails when run.
    std::fs::write(comfy.dirs.path().join("input").join("broken.png"), b"not a png").unwrap();
    let (gw, gw_url) = Gateway::start().await;
    let task_dir = tempfile::tempdir().unwrap();
    write_payload(
        task_dir.path(),
        json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
        }),
    );

    let child = gpu_task(task_dir.path(), &comfy.url, &gw_url).spawn().unwrap();
    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(1), "stderr:\n{stderr}");
    let calls = gw.calls();
    let report = finished(&calls);
    assert!(!report.success);
    let error = report.error.unwrap_or_default();
    assert!(error.starts_with("LoadImage (node 1): "), "{error}");
    assert_eq!(last_line(&stderr), error);
    assert!(report.messages.iter().any(|m| m[0] == "execution_error"), "{:?}", report.messages);
    let relayed_error = calls.iter().any(|c| c.what == "events" && c.json()["type"] == "execution_error");
    assert!(relayed_error, "execution_error is relayed");
}

#[tokio::test]
async fn sigterm_interrupts_its_own_prompt() {
    let comfy = comfyui(Duration::from_millis(700)).await;
    let (gw, gw_url) = Gateway::start().await;
    let task_dir = tempfile::tempdir().unwrap();
    write_payload(task_dir.path(), model_free_workflow());

    let child = gpu_task(task_dir.path(), &comfy.url, &gw_url).spawn().unwrap();
    // Running: ComfyUI has started executing a node.
    let calls = gw
        .wait_for("a node executing", |calls| {
            calls.iter().any(|c| {
                c.what == "events" && c.json()["type"] == "executing" && !c.json()["data"]["node"].is_null()
            })
        })
        .await;
    let prompt_id = calls.iter().find(|c| c.what == "events").unwrap().json()["data"]["prompt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();

    let (code, stderr) = finish(child).await;
    assert_eq!(code, Some(143), "stderr:\n{stderr}");
    assert_eq!(last_line(&stderr), "stopped (SIGTERM)");
    let report = finished(&gw.calls());
    assert!(!report.success);
    assert_eq!(report.error.as_deref(), Some("stopped (SIGTERM)"));
    assert!(report.messages.iter().any(|m| m[0] == "execution_interrupted"), "{:?}", report.messages);
    assert!(!gw.calls().iter().any(|c| c.what == "outputs"));

    // ComfyUI interrupted that prompt: its history says so.
    let url = format!("{}/history/{prompt_id}", comfy.url);
    let interrupted = async {
        loop {
            let history: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            let messages = history[&prompt_id]["status"]["messages"].as_array().cloned().unwrap_or_default();
            if messages.iter().any(|m| m[0] == "execution_interrupted") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await; // polling interval, not synchronization
        }
    };
    tokio::time::timeout(DEADLINE, interrupted).await.expect("ComfyUI never recorded the interrupt");
}

/// Decodes an [`OutputQuery`] from a query string.
fn serde_urlencoded_query(query: &str) -> OutputQuery {
    let pairs: std::collections::HashMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), urlencoding::decode(v).unwrap().into_owned()))
        .collect();
    OutputQuery {
        node: pairs["node"].clone(),
        kind: pairs["kind"].clone(),
        filename: pairs["filename"].clone(),
        index: pairs["index"].parse().unwrap(),
        folder_type: pairs.get("type").cloned().unwrap_or_else(|| "output".into()),
    }
}
