//! Test equipment: a real `nomad agent -dev` on free loopback ports, for the
//! tests that can run against real Nomad as well as the stand-in.
//!
//! Used only when a `nomad` binary is on `PATH` (nothing here builds or
//! downloads one). The agent's `raw_exec` driver is enabled, its data dir is
//! temporary, and it is stopped (with its tasks) when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A running `nomad agent -dev`.
pub struct DevAgent {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    child: Child,
    dir: tempfile::TempDir,
}

/// The `nomad` binary on `PATH`, if any.
pub fn nomad_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("nomad"))
        .find(|p| p.is_file())
}

impl DevAgent {
    /// Starts a dev agent when `nomad` is on `PATH`; `None` (after printing a
    /// note naming `what` is skipped) when it is not.
    pub async fn start_if_available(what: &str) -> Option<anyhow::Result<DevAgent>> {
        Self::start_if_available_with_env(what, &[]).await
    }

    /// Like [`DevAgent::start_if_available`]; the agent (and so every
    /// `raw_exec` task, which inherits it) gets `envs` in its environment.
    pub async fn start_if_available_with_env(
        what: &str,
        envs: &[(String, String)],
    ) -> Option<anyhow::Result<DevAgent>> {
        match nomad_binary() {
            Some(bin) => Some(Self::start_with_env(bin, envs).await),
            None => {
                println!("note: no `nomad` on PATH; skipping the real-Nomad variant of {what}");
                None
            }
        }
    }

    /// Starts `bin agent -dev` and waits (60 s at most) until its node is
    /// ready with a healthy `raw_exec` driver.
    pub async fn start(bin: PathBuf) -> anyhow::Result<DevAgent> {
        Self::start_with_env(bin, &[]).await
    }

    /// [`DevAgent::start`] with extra environment variables for the agent.
    pub async fn start_with_env(bin: PathBuf, envs: &[(String, String)]) -> anyhow::Result<DevAgent> {
        let dir = tempfile::tempdir()?;
        use crate::harness::free_port;
        let (http, rpc, serf) = (free_port(), free_port(), free_port());
        let config = format!(
            r#"
bind_addr = "127.0.0.1"
data_dir  = "{data}"
ports {{
  http = {http}
  rpc  = {rpc}
  serf = {serf}
}}
client {{
  enabled   = true
  alloc_dir = "{alloc}"
}}
plugin "raw_exec" {{
  config {{
    enabled = true
  }}
}}
"#,
            data = dir.path().join("data").display(),
            alloc = dir.path().join("data").join("alloc").display(),
        );
        let config_path = dir.path().join("agent.hcl");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(&bin)
            .args(["agent", "-dev", "-bind=127.0.0.1"])
            .arg(format!("-config={}", config_path.display()))
            .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut agent = DevAgent {
            url: format!("http://127.0.0.1:{http}"),
            child,
            dir,
        };
        agent.wait_ready(Duration::from_secs(60)).await?;
        Ok(agent)
    }

    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let http = reqwest::Client::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "nomad agent -dev exited ({status}); log: {}",
                    self.log_tail()
                );
            }
            let nodes: Option<serde_json::Value> =
                match http.get(format!("{}/v1/nodes", self.url)).send().await {
                    Ok(r) if r.status().is_success() => r.json().await.ok(),
                    _ => None,
                };
            let ready = nodes
                .as_ref()
                .and_then(|n| n.as_array())
                .map(|list| {
                    list.iter().any(|n| {
                        n["Status"] == "ready"
                            && n["Drivers"]["raw_exec"]["Healthy"] == serde_json::Value::Bool(true)
                    })
                })
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nomad agent -dev at {} not ready after {limit:?}; log: {}",
                    self.url,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The agent's data dir; allocation dirs are under `alloc/<alloc id>/`
    /// (set explicitly as the client's `alloc_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        // SIGINT lets the agent stop its tasks; SIGKILL if it lingers.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
