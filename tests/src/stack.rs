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
use crate::proxy::Proxy;

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
    /// Extra environment for every service (e.g. `LOG_FORMAT=json`).
    pub env: Vec<(String, String)>,
    /// Serve the gateway over HTTPS with these files ([`crate::tls`]); gpu-task
    /// then reaches it at `GATEWAY_URL` trusting `GATEWAY_CA_CERT`.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Redis's AOF `appendfsync` policy: `always`, as deployed, by default
    /// (the reliability suite can run `everysec` to show what it loses).
    pub redis_appendfsync: &'static str,
    /// The services reach Nomad and Consul through [`Proxy`]s the test can
    /// cut ([`Stack::nomad_proxy`], [`Stack::consul_proxy`]).
    pub proxies: bool,
}

impl StackOptions {
    pub fn new(executor: Executor) -> Self {
        StackOptions {
            executor,
            comfyui_url: None,
            node_delay: Duration::ZERO,
            participants: 5,
            env: Vec::new(),
            tls: None,
            redis_appendfsync: "always",
            proxies: false,
        }
    }
}

/// Everything the test started; dropping it stops it all.
pub struct Stack {
    pub gateway_url: String,
    gateway_port: u16,
    gateway_tls: Option<crate::tls::TlsFiles>,
    /// A client for the gateway (trusting its test CA under HTTPS).
    pub http: reqwest::Client,
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
    /// With [`StackOptions::proxies`] and a Nomad executor: the services'
    /// way to Nomad (`nomad_url` is the direct one, for the test).
    pub nomad_proxy: Option<Proxy>,
    /// With [`StackOptions::proxies`]: the services' way to Consul.
    pub consul_proxy: Option<Proxy>,
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
    let StackOptions { executor, comfyui_url, node_delay, participants, env: extra_env, tls, redis_appendfsync, proxies } = opts;
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_with_appendfsync(redis_appendfsync).await.unwrap();
    let consul = Consul::start().await.unwrap();
    let consul_proxy = match proxies {
        true => Some(Proxy::start(([127, 0, 0, 1], consul.http_port).into()).await.unwrap()),
        false => None,
    };
    let http = match &tls {
        Some(files) => crate::tls::client(&std::fs::read_to_string(&files.ca).unwrap()),
        None => reqwest::Client::new(),
    };
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
    let gateway_url = match tls {
        Some(_) => format!("https://localhost:{gateway_port}"),
        None => format!("http://127.0.0.1:{gateway_port}"),
    };
    let mut env: Vec<(String, String)> = [
        ("REDIS_URL", redis.url.clone()),
        ("DATA_DIR", data_dir.display().to_string()),
        ("CONSUL_HTTP_ADDR", consul_proxy.as_ref().map_or(consul.addr.clone(), Proxy::url)),
        ("INTERNAL_SECRET", INTERNAL_SECRET.to_string()),
        ("ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("PARTICIPANTS", participants.to_string()),
        // The stand-ins' node is in the default pool.
        ("NOMAD_GPU_NODE_POOL", "default".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(extra_env)
    .collect();
    if let Some(url) = &comfy_env {
        env.push(("COMFYUI_URL".into(), url.clone()));
    }

    // The executor first, so the gateway (admin page) and the dispatcher both know it.
    let mut real_nomad = None;
    let mut nomad_addr = None;
    match executor {
        Executor::Local => {
            env.push(("EXECUTOR".into(), "local".into()));
            env.push(("GPU_TASK_BIN".into(), bin_path("gpu-task").display().to_string()));
        }
        Executor::Nomad => {
            let mut nomad = service_command("nomad-standin", &env);
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
    let mut nomad_proxy = None;
    if let (Some(url), true) = (&nomad_addr, proxies) {
        let upstream = url.trim_start_matches("http://").parse().expect("Nomad at http://IP:PORT");
        nomad_proxy = Some(Proxy::start(upstream).await.unwrap());
    }
    if let Some(url) = &nomad_addr {
        env.push(("EXECUTOR".into(), "nomad".into()));
        env.push(("NOMAD_ADDR".into(), nomad_proxy.as_ref().map_or(url.clone(), Proxy::url)));
    }
    processes.push(spawn_logged(gateway_command(&env, gateway_port, tls.as_ref()), "gateway"));
    wait_healthy(&http, &gateway_url).await;
    match &tls {
        None => {
            consul
                .register_service("comfy-gateway", "gateway-test", gateway_port, &[], Some(&format!("{gateway_url}/healthz")))
                .await
                .unwrap();
            consul.wait_passing("comfy-gateway").await.unwrap();
        }
        Some(files) => {
            env.push(("GATEWAY_URL".into(), gateway_url.clone()));
            env.push(("GATEWAY_CA_CERT".into(), files.ca.display().to_string()));
        }
    }

    processes.push(spawn_logged(dispatcher_command(&env), "dispatcher"));

    let codes = std::fs::read_to_string(data_dir.join("secrets/access-codes.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(n, c)| (n.parse().unwrap(), c.to_string()))
        .collect();
    Stack {
        gateway_url,
        gateway_port,
        gateway_tls: tls,
        http,
        codes,
        dispatcher_env: env,
        redis_url: redis.url.clone(),
        data_dir,
        nomad_url: nomad_addr,
        nomad_proxy,
        consul_proxy,
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
    /// The process `name` (`gateway`, `dispatcher`, ...) started last.
    pub fn process(&self, name: &str) -> &ChildGuard {
        self._processes.iter().rev().find(|p| p.name() == name).unwrap_or_else(|| panic!("no process {name}"))
    }

    /// Every service process this stack started (their logs, pids).
    pub fn processes(&self) -> &[ChildGuard] {
        &self._processes
    }

    /// The pid of the stack's process named `name` (`gateway`, `dispatcher`,
    /// `nomad-standin`, `redis-server`), e.g. to read its `/proc` figures.
    pub fn pid(&self, name: &str) -> Option<u32> {
        if name == "redis-server" {
            return self._redis.child().map(|c| c.pid());
        }
        self._processes.iter().rev().find(|p| p.name() == name).map(|p| p.pid())
    }

    pub fn code(&self, user: u32) -> &str {
        &self.codes.iter().find(|(n, _)| *n == user).expect("a code for every participant").1
    }

    pub fn get(&self, user: u32, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}/user/{user}/api/{path}", self.gateway_url))
            .bearer_auth(self.code(user))
    }
}

impl Stack {
    /// Submits `body` as participant `user`; returns the job id.
    pub async fn submit(&self, user: u32, body: Value) -> String {
        let answer: Value = self
            .http
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


/// A process of the stack (`gateway`, `dispatcher`, `nomad-standin`) with the
/// stack's environment `env` (which may set `GATEWAY_URL`, under HTTPS) and
/// nothing of the test's own that would mislead it.
fn service_command(bin: &str, env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin_path(bin));
    cmd.env_remove("GATEWAY_URL")
        .env_remove("NOMAD_TOKEN")
        .env_remove("COMFY_MULTI_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

/// `gateway serve` on loopback `port`, over HTTPS with `tls`.
fn gateway_command(env: &[(String, String)], port: u16, tls: Option<&crate::tls::TlsFiles>) -> tokio::process::Command {
    let mut cmd = service_command("gateway", env);
    cmd.arg("serve").env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"));
    if let Some(files) = tls {
        cmd.env("GATEWAY_TLS_CERT", &files.cert).env("GATEWAY_TLS_KEY", &files.key);
    }
    cmd
}

/// `dispatcher run`.
fn dispatcher_command(env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = service_command("dispatcher", env);
    cmd.arg("run");
    cmd
}

/// Waits (up to 30 s) until the gateway at `gateway_url` answers `/healthz` with a success.
pub async fn wait_healthy(http: &reqwest::Client, gateway_url: &str) {
    wait_until("the gateway to be healthy", Duration::from_secs(30), || {
        let (http, url) = (http.clone(), format!("{gateway_url}/healthz"));
        async move { http.get(url).send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await
    .unwrap();
}

/// Killing and restarting the stack's services, for the failure tests and
/// the reliability suite (`tests/reliability/`). A restarted service gets the
/// same environment, port and data as the one it replaces.
impl Stack {
    /// The guard of the service `name` started last (`gateway`, `dispatcher`, `nomad-standin`).
    fn service(&mut self, name: &str) -> &mut ChildGuard {
        self._processes.iter_mut().rev().find(|p| p.name() == name).unwrap_or_else(|| panic!("no {name} in the stack"))
    }

    /// SIGKILLs the service `name` alone (no shutdown of any kind), not its
    /// process group: a local gpu-task outlives its dispatcher as a Nomad
    /// allocation would. Returns once it is gone. The old guard stays, so
    /// the stack still cleans up what it left.
    pub async fn kill_service(&mut self, name: &str) {
        let guard = self.service(name);
        let pid = nix::unistd::Pid::from_raw(guard.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = tokio::time::timeout(Duration::from_secs(10), guard.child_mut().wait()).await;
    }

    /// Starts `dispatcher run` with the stack's environment plus `extra`.
    pub fn start_dispatcher(&mut self, extra: &[(&str, &str)]) {
        let mut cmd = dispatcher_command(&self.dispatcher_env);
        cmd.envs(extra.iter().copied());
        self._processes.push(spawn_logged(cmd, "dispatcher"));
    }

    /// Starts the gateway (again) on its port, data dir and Redis; returns
    /// once it is healthy.
    pub async fn start_gateway(&mut self) {
        let cmd = gateway_command(&self.dispatcher_env, self.gateway_port, self.gateway_tls.as_ref());
        self._processes.push(spawn_logged(cmd, "gateway"));
        wait_healthy(&self.http, &self.gateway_url).await;
    }

    /// SIGKILLs the gateway and starts it again ([`Stack::start_gateway`]).
    pub async fn restart_gateway(&mut self) {
        self.kill_service("gateway").await;
        self.start_gateway().await;
    }

    /// SIGKILLs Redis (no shutdown, no final fsync of the AOF).
    pub fn kill_redis(&mut self) {
        self._redis.kill();
    }

    /// Starts Redis again on its port and dir (it replays its AOF) and waits
    /// until it answers.
    pub async fn start_redis(&mut self) -> anyhow::Result<()> {
        self._redis.restart().await
    }

    /// The log tail of service `name` (`gateway`, `dispatcher`,
    /// `redis-server`), for failure messages.
    pub fn service_log_tail(&mut self, name: &str, lines: usize) -> String {
        match name {
            "redis-server" => self._redis.log_tail(lines),
            _ => self.service(name).log_tail(lines),
        }
    }

    /// The admin page's snapshot (`GET /admin/api/snapshot`).
    pub async fn admin_snapshot(&self) -> Value {
        let req = self.http.get(format!("{}/admin/api/snapshot", self.gateway_url));
        let res = req.bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        res.error_for_status().unwrap().json().await.unwrap()
    }

    /// Starts the Nomad stand-in again on its old address (after
    /// [`Stack::kill_service`]`("nomad-standin")`), with the workflow job
    /// registered again (a new stand-in knows nothing).
    pub async fn restart_nomad_standin(&mut self) {
        let url = self.nomad_url.clone().expect("a stack with the Nomad stand-in");
        let mut cmd = service_command("nomad-standin", &self.dispatcher_env);
        cmd.args(["--listen", url.trim_start_matches("http://"), "--gpus", "1", "--data-dir"])
            .arg(self._dir.path().join("nomad-again"));
        let (guard, _) = start_listening(cmd, "nomad-standin").await;
        self._processes.push(guard);
        register_job(&url, &["gpu_count=1", "node_pool=default"]).await;
    }

    /// The ComfyUI stand-in's address, when the stack started one.
    pub fn comfyui_url(&self) -> Option<String> {
        self._comfy.as_ref().map(|c| c.url.clone())
    }
}
