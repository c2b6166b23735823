//! The whole local stack, started by a test: real Redis and Consul, the
//! ComfyUI stand-in (or `COMFYUI_URL`), the gateway, the dispatcher with the
//! chosen executor (local, the Nomad stand-in, or a real `nomad agent -dev`)
//! and gpu-task, as real processes. Dropping the [`Stack`] stops everything.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::comfyui::{ComfyUi, Options};
use crate::harness::{bin_path, free_port, spawn_logged, wait_until, ChildGuard, Consul, Redis};
use crate::nomad::dev_agent::{nomad_binary, DevAgent};

/// The internal secret every stack shares with its gpu-tasks.
pub const INTERNAL_SECRET: &str = "e2e-internal-secret";
/// The admin token of every stack.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// Which executor the dispatcher uses.
#[derive(Clone, Copy, Debug)]
pub enum Executor {
    Local,
    /// The Nomad API stand-in.
    Nomad,
    /// A real `nomad agent -dev`, when `nomad` is on PATH.
    RealNomad,
}

/// How to start a stack.
#[derive(Clone, Debug)]
pub struct StackOptions {
    pub executor: Executor,
    /// Where gpu-task finds ComfyUI (else `COMFYUI_URL`, else the stand-in).
    pub comfyui_url: Option<String>,
    /// The stand-in's delay per executed node, so jobs take a while.
    pub node_delay: Duration,
    /// `PARTICIPANTS`: participants 1..=N get a code.
    pub participants: u32,
}

impl StackOptions {
    pub fn new(executor: Executor) -> Self {
        StackOptions { executor, comfyui_url: None, node_delay: Duration::ZERO, participants: 5 }
    }
}

/// Everything the test started; dropping it stops it all.
pub struct Stack {
    pub gateway_url: String,
    /// `(n, access code)` of every participant.
    pub codes: Vec<(u32, String)>,
    /// The environment the dispatcher runs with, for running its CLI
    /// (`dispatcher status`, `drain`, ...) against this stack.
    pub dispatcher_env: Vec<(String, String)>,
    pub redis_url: String,
    /// The services' `DATA_DIR` (the gateway's pre-loaded workflows are in
    /// its `workflows/`).
    pub data_dir: PathBuf,
    /// Nomad's address, with a Nomad executor.
    pub nomad_url: Option<String>,
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

/// A stack with `executor` and the defaults.
pub async fn stack(executor: Executor) -> Stack {
    start(StackOptions::new(executor)).await
}

/// A stack where gpu-task finds ComfyUI at `comfyui_url`.
pub async fn stack_with(executor: Executor, comfyui_url: Option<String>) -> Stack {
    start(StackOptions { comfyui_url, ..StackOptions::new(executor) }).await
}

/// Starts a stack.
pub async fn start(opts: StackOptions) -> Stack {
    let StackOptions { executor, comfyui_url, node_delay, participants } = opts;
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
                node_delay,
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
    let mut env: Vec<(String, String)> = [
        ("REDIS_URL", redis.url.clone()),
        ("DATA_DIR", data_dir.display().to_string()),
        ("CONSUL_HTTP_ADDR", consul.addr.clone()),
        ("INTERNAL_SECRET", INTERNAL_SECRET.to_string()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("PARTICIPANTS", participants.to_string()),
        // The stand-ins' node is in the default pool.
        ("NOMAD_GPU_NODE_POOL", "default".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(url) = &comfy_env {
        env.push(("COMFYUI_URL".into(), url.clone()));
    }
    let common_env = env.clone();
    let common = move |cmd: &mut tokio::process::Command| {
        cmd.envs(common_env.iter().map(|(k, v)| (k, v)))
            .env_remove("GATEWAY_URL")
            .env_remove("NOMAD_TOKEN")
            .env_remove("COMFY_MULTI_CONFIG");
    };

    // The executor first, so the gateway (admin page) and the dispatcher both know it.
    let mut real_nomad = None;
    let mut nomad_addr = None;
    match executor {
        Executor::Local => {
            env.push(("EXECUTOR".into(), "local".into()));
            env.push(("GPU_TASK_BIN".into(), bin_path("gpu-task").display().to_string()));
        }
        Executor::Nomad => {
            let mut nomad = tokio::process::Command::new(bin_path("nomad-standin"));
            common(&mut nomad);
            nomad.args(["--listen", "127.0.0.1:0", "--gpus", "1", "--data-dir"]).arg(dir.path().join("nomad"));
            let (guard, nomad_url) = start_listening(nomad, "nomad-standin").await;
            processes.push(guard);
            register_job(&nomad_url, &["gpu_count=1", "node_pool=default"]).await;
            nomad_addr = Some(nomad_url);
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
            nomad_addr = Some(agent.url.clone());
            real_nomad = Some(agent);
        }
    }
    if let Some(url) = &nomad_addr {
        env.push(("EXECUTOR".into(), "nomad".into()));
        env.push(("NOMAD_ADDR".into(), url.clone()));
    }
    let mut gateway = tokio::process::Command::new(bin_path("gateway"));
    common(&mut gateway);
    gateway.envs(env.iter().map(|(k, v)| (k, v)));
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
    dispatcher.arg("run").envs(env.iter().map(|(k, v)| (k, v)));
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
        dispatcher_env: env,
        redis_url: redis.url.clone(),
        data_dir,
        nomad_url: nomad_addr,
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
    /// The ComfyUI stand-in's URL, when the stack started one.
    pub fn comfyui_url(&self) -> Option<&str> {
        self._comfy.as_ref().map(|c| c.url.as_str())
    }

    /// The pid of the stack's process named `name` (`gateway`, `dispatcher`,
    /// `nomad-standin`, `redis-server`), e.g. to read its `/proc` figures.
    pub fn pid(&self, name: &str) -> Option<u32> {
        if name == "redis-server" {
            return self._redis.child().map(|c| c.pid());
        }
        self._processes.iter().find(|p| p.name() == name).map(|p| p.pid())
    }

    pub fn code(&self, user: u32) -> &str {
        &self.codes.iter().find(|(n, _)| *n == user).expect("a code for every participant").1
    }

    pub fn get(&self, user: u32, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .get(format!("{}/user/{user}/api/{path}", self.gateway_url))
            .bearer_auth(self.code(user))
    }
}

impl Stack {
    /// Submits `body` as participant `user`; returns the job id.
    pub async fn submit(&self, user: u32, body: Value) -> String {
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
    pub async fn finished(&self, user: u32, id: &str) -> Value {
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

