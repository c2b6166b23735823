//! The walking skeleton end to end: a participant's workflow becomes an output
//! image through the gateway, Redis, the dispatcher, (Nomad's API,) gpu-task
//! and ComfyUI — all real processes, found through a real Consul dev agent.
//!
//! `COMFYUI_URL` points the test at a real ComfyUI instead of the stand-in.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use comfy_multi_tests::comfyui::{model_free_workflow, ComfyUi, Options};
use comfy_multi_tests::harness::{bin_path, free_port, spawn_logged, wait_until, ChildGuard, Consul, Redis};
use comfy_multi_tests::nomad::dev_agent::{nomad_binary, DevAgent};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

const INTERNAL_SECRET: &str = "e2e-internal-secret";
const ADMIN_TOKEN: &str = "e2e-admin-token";

#[derive(Clone, Copy)]
enum Executor {
    Local,
    /// The Nomad API stand-in.
    Nomad,
    /// A real `nomad agent -dev`, when `nomad` is on PATH.
    RealNomad,
}

/// Everything the test started; dropping it stops it all.
struct Stack {
    gateway_url: String,
    codes: Vec<(u32, String)>,
    _comfy: Option<ComfyUi>,
    _nomad: Option<DevAgent>,
    _processes: Vec<ChildGuard>,
    _consul: Consul,
    _redis: Redis,
    _dir: tempfile::TempDir,
}

/// Starts a stand-in binary that prints `listening on http://ADDR` first.
async fn start_listening(cmd: tokio::process::Command, name: &str) -> (ChildGuard, String) {
    let mut cmd = cmd;
    cmd.stdout(Stdio::piped());
    let mut guard = spawn_logged(cmd, name);
    let stdout = guard.take_stdout().expect("stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{name} did not say where it listens: {}", guard.log_tail(20)))
        .unwrap()
        .unwrap_or_else(|| panic!("{name} exited: {}", guard.log_tail(20)));
    let url = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("{name} said {line:?}")).trim().to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (guard, url)
}

async fn stack(executor: Executor) -> Stack {
    stack_with(executor, None).await
}

/// The stack; `comfyui_url` overrides where gpu-task finds ComfyUI.
async fn stack_with(executor: Executor, comfyui_url: Option<String>) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start().await.unwrap();
    let consul = Consul::start().await.unwrap();
    let http = reqwest::Client::new();
    let mut processes = Vec::new();

    // ComfyUI: a real one if COMFYUI_URL says so, else the stand-in, in Consul.
    let (comfy, comfy_env) = match comfyui_url.ok_or(()).or_else(|_| std::env::var("COMFYUI_URL")) {
        Ok(url) => (None, Some(url)),
        Err(_) => {
            let comfy = ComfyUi::start(Options {
                output_dir: dir.path().join("comfy-out"),
                input_dir: dir.path().join("comfy-in"),
                node_delay: Duration::ZERO,
            })
            .await
            .unwrap();
            let port: u16 = comfy.url.rsplit(':').next().unwrap().parse().unwrap();
            let check = format!("{}/system_stats", comfy.url);
            consul.register_service("comfyui", "comfyui-test", port, &["GPU-test"], Some(&check)).await.unwrap();
            consul.wait_passing("comfyui").await.unwrap();
            (Some(comfy), None)
        }
    };

    let data_dir = dir.path().join("data");
    let gateway_port = free_port();
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    let common = |cmd: &mut tokio::process::Command| {
        cmd.env("REDIS_URL", &redis.url)
            .env("DATA_DIR", &data_dir)
            .env("CONSUL_HTTP_ADDR", &consul.addr)
            .env("INTERNAL_SECRET", INTERNAL_SECRET)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("PARTICIPANTS", "5")
            .env_remove("GATEWAY_URL")
            .env_remove("COMFY_MULTI_CONFIG");
        if let Some(url) = &comfy_env {
            cmd.env("COMFYUI_URL", url);
        }
    };

    let mut gateway = tokio::process::Command::new(bin_path("gateway"));
    common(&mut gateway);
    gateway.arg("serve").env("GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}"));
    processes.push(spawn_logged(gateway, "gateway"));
    wait_until("the gateway to be healthy", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{gateway_url}/healthz"));
        async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await
    .unwrap();
    consul
        .register_service("comfy-gateway", "gateway-test", gateway_port, &[], Some(&format!("{gateway_url}/healthz")))
        .await
        .unwrap();
    consul.wait_passing("comfy-gateway").await.unwrap();

    let mut dispatcher = tokio::process::Command::new(bin_path("dispatcher"));
    common(&mut dispatcher);
    dispatcher.arg("run");
    let mut real_nomad = None;
    match executor {
        Executor::Local => {
            dispatcher.env("EXECUTOR", "local").env("GPU_TASK_BIN", bin_path("gpu-task"));
        }
        Executor::Nomad => {
            let mut nomad = tokio::process::Command::new(bin_path("nomad-standin"));
            common(&mut nomad);
            nomad.args(["--listen", "127.0.0.1:0", "--gpus", "1", "--data-dir"]).arg(dir.path().join("nomad"));
            let (guard, nomad_url) = start_listening(nomad, "nomad-standin").await;
            processes.push(guard);
            register_job(&nomad_url, &["gpu_count=1", "node_pool=default"]).await;
            dispatcher.env("EXECUTOR", "nomad").env("NOMAD_ADDR", &nomad_url);
        }
        Executor::RealNomad => {
            // raw_exec tasks inherit the agent's environment.
            let mut envs = vec![
                ("CONSUL_HTTP_ADDR".to_string(), consul.addr.clone()),
                ("INTERNAL_SECRET".to_string(), INTERNAL_SECRET.to_string()),
            ];
            if let Some(url) = &comfy_env {
                envs.push(("COMFYUI_URL".into(), url.clone()));
            }
            let bin = nomad_binary().expect("only called with nomad on PATH");
            let agent = DevAgent::start_with_env(bin, &envs).await.unwrap();
            register_job(&agent.url, &["gpu_count=0", "node_pool=default"]).await;
            dispatcher.env("EXECUTOR", "nomad").env("NOMAD_ADDR", &agent.url);
            real_nomad = Some(agent);
        }
    }
    processes.push(spawn_logged(dispatcher, "dispatcher"));
    
    let codes = std::fs::read_to_string(data_dir.join("secrets/access-codes.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, c)| (n.parse().unwrap(), c.to_string()))
        .collect();
    Stack {
        gateway_url,
        codes,
        _comfy: comfy,
        _nomad: real_nomad,
        _processes: processes,
        _consul: consul,
        _redis: redis,
        _dir: dir,
    }
}

/// `dispatcher register-job` of the workflow job, as an operator would run it.
async fn register_job(nomad_url: &str, vars: &[&str]) {
    let mut cmd = tokio::process::Command::new(bin_path("dispatcher"));
    cmd.args(["register-job", &repo_file("nomad/comfy-workflow.nomad.hcl")]);
    for var in vars {
        cmd.args(["--var", var]);
    }
    let status = cmd
        .arg("--var")
        .arg(format!("gpu_task_command={}", bin_path("gpu-task").display()))
        .env("NOMAD_ADDR", nomad_url)
        .env_remove("NOMAD_TOKEN")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "dispatcher register-job failed");
}

fn repo_file(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path).display().to_string()
}

impl Stack {
    fn code(&self, user: u32) -> &str {
        &self.codes.iter().find(|(n, _)| *n == user).expect("a code for every participant").1
    }

    fn get(&self, user: u32, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(format!("{}/user/{user}/api/{path}", self.gateway_url))
            .bearer_auth(self.code(user))
    }
}

impl Stack {
    /// Submits `body` as participant `user`; returns the job id.
    async fn submit(&self, user: u32, body: Value) -> String {
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/user/{user}/api/prompt", self.gateway_url))
            .bearer_auth(self.code(user))
            .json(&body)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["node_errors"], json!({}));
        answer["prompt_id"].as_str().unwrap().to_string()
    }

    /// Waits until job `id` has a history entry; returns it.
    async fn finished(&self, user: u32, id: &str) -> Value {
        let history = wait_until("the job to finish", Duration::from_secs(90), || {
            let req = self.get(user, &format!("history/{id}"));
            async move {
                let h: Value = req.send().await.ok()?.json().await.ok()?;
                let done = h.as_object().is_some_and(|m| !m.is_empty());
                done.then_some(h)
            }
        })
        .await
        .unwrap();
        history[id].clone()
    }
}

async fn workflow_becomes_an_image(executor: Executor) {
    let stack = stack(executor).await;
    let id = stack.submit(3, json!({ "prompt": model_free_workflow(), "client_id": "e2e" })).await;
    let entry = stack.finished(3, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    let image = &entry["outputs"]["7"]["images"][0];
    let view = format!(
        "view?filename={}&subfolder={}&type=output",
        image["filename"].as_str().unwrap(),
        image["subfolder"].as_str().unwrap()
    );
    let png = stack.get(3, &view).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (256, 256));

    // Participant 4 sees none of it.
    assert_eq!(stack.get(4, &view).send().await.unwrap().status(), 404);
    assert_eq!(stack.get(4, &format!("history/{id}")).send().await.unwrap().status(), 404);
    let own: Value = stack.get(4, "history").send().await.unwrap().json().await.unwrap();
    assert_eq!(own, json!({}));
}

#[tokio::test]
async fn workflow_becomes_an_image_with_the_local_executor() {
    workflow_becomes_an_image(Executor::Local).await;
}

#[tokio::test]
async fn workflow_becomes_an_image_through_nomad() {
    workflow_becomes_an_image(Executor::Nomad).await;
}

#[tokio::test]
async fn workflow_becomes_an_image_through_a_real_nomad() {
    if nomad_binary().is_none() {
        println!("note: no `nomad` on PATH; skipping the real-Nomad variant of the end-to-end test");
        return;
    }
    workflow_becomes_an_image(Executor::RealNomad).await;
}

/// A workflow over Nomad's 16 KiB payload limit is dispatched without a
/// payload; gpu-task fetches it from the gateway.
#[tokio::test]
async fn a_large_workflow_is_fetched_from_the_gateway() {
    let stack = stack(Executor::Nomad).await;
    let note = "x".repeat(20 * 1024);
    let id = stack
        .submit(2, json!({ "prompt": model_free_workflow(), "extra_data": { "extra_pnginfo": { "note": note } } }))
        .await;
    let entry = stack.finished(2, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    assert_eq!(entry["prompt"][3]["extra_pnginfo"]["note"].as_str().map(str::len), Some(20 * 1024));
}

/// The error a participant reads in the history: the last execution message.
fn error_message(entry: &Value) -> String {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m[0] == "execution_error"))
        .map(|m| m[1]["exception_message"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// A workflow ComfyUI refuses ends `failed` with ComfyUI's own message.
#[tokio::test]
async fn a_workflow_comfyui_refuses_fails_with_its_message() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = stack(executor).await;
        let mut workflow = model_free_workflow();
        workflow["2"]["class_type"] = json!("NoSuchNode");
        let id = stack.submit(1, json!({ "prompt": workflow })).await;
        let entry = stack.finished(1, &id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        let message = error_message(&entry);
        assert!(message.contains("NoSuchNode"), "message: {message:?}; history: {entry:#}");
    }
}

/// gpu-task that cannot reach ComfyUI fails the job fast, saying so.
#[tokio::test]
async fn unreachable_comfyui_fails_the_job_with_that_reason() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = stack_with(executor, Some(dead.clone())).await;
        let id = stack.submit(5, json!({ "prompt": model_free_workflow() })).await;
        let entry = stack.finished(5, &id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        let message = error_message(&entry);
        assert!(message.contains("cannot reach ComfyUI"), "message: {message:?}; history: {entry:#}");
    }
}
