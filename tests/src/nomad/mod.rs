//! Test equipment: stands in for Nomad's HTTP API (one server and one client
//! node with fake NVIDIA GPUs), faithful to the sample bodies and error texts in
//! `shared/nomad-api/`, and runs dispatched children as local processes the
//! way `raw_exec` would. Never shipped.
//!
//! Why: the dispatcher, gpu-task and the end-to-end tests must be exercised
//! against Nomad's real protocol (percent-encoded child ids, the 16 KiB payload
//! limit answered with a plain-text 500, idempotent dispatch, blocking queries,
//! the NDJSON event stream, GPU device leases that block placement), but no
//! Nomad binary is available where the tests run. Where a real `nomad` is on
//! `PATH`, [`dev_agent::DevAgent`] starts `nomad agent -dev` on free ports so
//! the same tests also run against it.
//!
//! What it implements: `POST /v1/jobs/parse` (the HCL2 subset of
//! [`jobspec`]), `POST/GET /v1/jobs`, `GET/DELETE /v1/job/:id`,
//! `/v1/job/:id/{allocations,summary,evaluations,versions,dispatch}`,
//! `/v1/allocation/:id`, `/v1/allocations`, `/v1/evaluation/:id`,
//! `/v1/event/stream`, `/v1/nodes`, `/v1/node/:id{,/allocations,/drain,/eligibility}`,
//! `/v1/status/leader`, `/v1/agent/self`. Every read carries `X-Nomad-Index`
//! and honours `?index=&wait=`.
//!
//! Known differences from Nomad, on purpose:
//! - one node (pool `default`, datacenter `dc1`) that accepts any job: node
//!   pools, datacenters and constraints are not checked;
//! - only `raw_exec`/`exec` tasks run (both as plain processes); templates are
//!   not rendered; failed tasks are not restarted or rescheduled;
//! - a dispatched child's `Payload` is stored as base64 of the raw bytes (Nomad
//!   snappy-compresses it first);
//! - a drain stops the allocations left at its deadline but places no
//!   replacement;
//! - ACL tokens are accepted and ignored.

pub mod dev_agent;
mod exec;
mod http;
pub mod jobspec;
mod state;
mod util;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::sync::watch;

pub use http::PAYLOAD_LIMIT;
use state::{Gpu, NodeRec, State};

/// Model name of the fake GPUs.
pub const GPU_MODEL: &str = "NVIDIA H100 80GB HBM3 (stand-in)";

/// What the stand-in simulates.
#[derive(Debug, Clone)]
pub struct StandinOptions {
    /// How many fake GPUs (`nvidia/gpu` devices with `GPU-…` UUIDs) the node has.
    pub gpus: usize,
    /// Where allocation dirs are made (`<data_dir>/alloc/<alloc id>/`).
    pub data_dir: PathBuf,
}

/// How the stand-in serves.
#[derive(Debug, Clone)]
pub struct StandinSettings {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Period of the event stream's `{}` heartbeat (Nomad: 30 s). The default
    /// is 1 s so that tests see heartbeats without waiting.
    pub heartbeat: Duration,
    /// Name of the node (Nomad dev agents use the host name).
    pub node_name: Option<String>,
}

impl Default for StandinSettings {
    fn default() -> Self {
        StandinSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            heartbeat: Duration::from_secs(1),
            node_name: None,
        }
    }
}

/// Resolves when `flag` is (or becomes) `true`, or its sender is gone.
pub(crate) async fn flagged(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|s| *s).await;
}

/// State shared by the HTTP handlers and the allocation runners.
pub(crate) struct Shared {
    state: Mutex<State>,
    pub data_dir: PathBuf,
    pub heartbeat: Duration,
    /// `true` once the stand-in is shutting down: nothing new starts.
    pub shutdown: watch::Sender<bool>,
}

impl Shared {
    /// The state; a panicked holder does not make it unusable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes one change at a new index and publishes its events.
    pub fn change<R>(&self, f: impl FnOnce(&mut State, u64, &mut Vec<Value>) -> R) -> R {
        let mut st = self.lock();
        let idx = st.bump();
        let mut events = Vec::new();
        let r = f(&mut st, idx, &mut events);
        st.publish(idx, events);
        r
    }

    /// Starts runners for newly placed allocations.
    pub fn start_allocs(self: &Arc<Self>, ids: Vec<String>) {
        if *self.shutdown.borrow() {
            return;
        }
        for id in ids {
            tokio::spawn(exec::run_alloc(self.clone(), id));
        }
    }

    /// Kills every running task's process group.
    fn kill_all(&self) {
        let st = self.lock();
        for a in st.allocs.values() {
            for pgid in a.pgids.values() {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(*pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A running Nomad stand-in. Stops, and kills its children, when dropped.
pub struct NomadStandin {
    /// `http://127.0.0.1:PORT`: what `NOMAD_ADDR` should be.
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl NomadStandin {
    /// Starts a stand-in on a free loopback port.
    pub async fn start(opts: StandinOptions) -> anyhow::Result<Self> {
        Self::start_with(opts, StandinSettings::default()).await
    }

    /// Starts a stand-in with explicit serving settings.
    pub async fn start_with(
        opts: StandinOptions,
        settings: StandinSettings,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("cannot create the data dir {}", opts.data_dir.display()))?;
        let data_dir = opts
            .data_dir
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", opts.data_dir.display()))?;
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let node = NodeRec {
            id: util::new_id(),
            name: settings.node_name.clone().unwrap_or_else(state::hostname),
            http_addr: addr.to_string(),
            gpus: (0..opts.gpus)
                .map(|_| Gpu {
                    uuid: format!("GPU-{}", util::new_id()),
                    leased_by: None,
                })
                .collect(),
            eligible: true,
            drain: None,
            drain_gen: 0,
            last_drain: Value::Null,
            events: vec![],
            create_index: 1,
            modify_index: 1,
        };
        let mut st = State::new(node);
        st.push_node_event("Cluster", "Node registered", 1);
        let reg = st.node_event("NodeRegistration");
        st.publish(1, vec![reg]);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(st),
            data_dir,
            heartbeat: settings.heartbeat,
            shutdown,
        });
        let app = http::router(shared.clone());
        let mut stop = shared.shutdown.subscribe();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                flagged(&mut stop).await;
            });
            if let Err(e) = serve.await {
                tracing::error!("Nomad stand-in server failed: {e}");
            }
        });
        tracing::info!(%addr, gpus = opts.gpus, "Nomad stand-in listening");
        Ok(NomadStandin {
            url: format!("http://{addr}"),
            addr,
            shared,
            server,
        })
    }

    /// The fake GPUs' UUIDs, in node order.
    pub fn gpu_uuids(&self) -> Vec<String> {
        self.shared
            .lock()
            .node
            .gpus
            .iter()
            .map(|g| g.uuid.clone())
            .collect()
    }

    /// The node's id.
    pub fn node_id(&self) -> String {
        self.shared.lock().node.id.clone()
    }

    /// The data dir (allocation dirs are under `alloc/`).
    pub fn data_dir(&self) -> PathBuf {
        self.shared.data_dir.clone()
    }

    /// The current index.
    pub fn index(&self) -> u64 {
        self.shared.lock().index
    }

    /// A snapshot of the stand-in's state, for debugging failed tests.
    pub fn dump(&self) -> Value {
        let st = self.shared.lock();
        json!({
            "index": st.index,
            "jobs": st.jobs.keys().collect::<Vec<_>>(),
            "allocs": st.allocs.values().map(|a| st.alloc_stub_json(a)).collect::<Vec<_>>(),
            "blocked": st.blocked,
        })
    }

    /// Stops serving and kills every task process. Also done on drop.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared.kill_all();
        self.server.abort();
    }
}

impl Drop for NomadStandin {
    fn drop(&mut self) {
        self.shutdown();
    }
}
