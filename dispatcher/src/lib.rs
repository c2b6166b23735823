//! comfy-multi's shared model, and the engine behind the `dispatcher` CLI.
//!
//! Every other part (the gateway, gpu-task, the test equipment) builds on this
//! crate, so that a job, its states and its storage are defined exactly once.
//!
//! # Layout
//!
//! - [`contract`]: names that other programs rely on: the Nomad job's meta keys
//!   and payload file, the internal API that gpu-task calls on the gateway, and
//!   the Consul service names. Changing one means changing every user.
//! - [`job`]: the job record and its state machine (`queued → dispatched →
//!   running → succeeded | failed | cancelled`, plus requeue). Every state
//!   change in the system is checked here.
//! - [`policy`]: which queued job goes next. FIFO today; the seam where fair
//!   share and priority plug in.
//! - [`queue`]: Redis storage of jobs and of the queue, with the atomic
//!   operations (Lua) that keep concurrent gateways and dispatchers honest.
//! - [`config`]: the one HCL configuration file, with environment overrides and
//!   laptop-friendly defaults.
//! - [`nomad`]: a small client for the parts of Nomad's HTTP API we use.
//! - [`consul`]: finding healthy services (the warm ComfyUI, the gateway).
//! - [`executor`]: how a job is actually run: as a dispatched Nomad job, or as
//!   a local child process; both behind one trait.
//! - [`drain`]: emptying the GPU before teardown, and resuming after.
//! - [`health`]: what is down (Redis, Nomad, Consul, ComfyUI, the
//!   dispatcher) and since when, for `/healthz` and the admin page.
//! - [`estimate`]: queue positions and estimated waits.
//! - [`report`]: the post-workshop report (waits, run times, peak
//!   participants, failures, GPU busy), as JSON or CSV.
//! - [`metrics`]: the Prometheus metrics every process exposes (names,
//!   counters, the dispatcher's `/metrics` listener).
//! - [`run`]: the dispatch loop: keep at most `slots` jobs in flight, follow
//!   each to its end, and make sure every job ends in a terminal state.

pub mod config;
pub mod consul;
pub mod contract;
pub mod drain;
pub mod estimate;
pub mod executor;
pub mod health;
pub mod job;
pub mod metrics;
pub mod nomad;
pub mod policy;
pub mod queue;
pub mod report;
pub mod run;

pub use job::{Job, JobId, JobState};

/// Logs to stderr through `tracing`; `RUST_LOG` filters (default `info`);
/// `LOG_FORMAT=json` writes one JSON object per line (with the fields of the
/// spans it is in, e.g. a job's `job_id` and `user_id`), anything else the
/// human-readable format. Every comfy-multi binary calls this first.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (gpu-task whose dispatcher was killed) must not
        // turn every log line into a panic.
        .log_internal_errors(false);
    let _ = if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().try_init()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).try_init()
    };
}

/// The span every log line about one job is in: `job_id` and `user_id`, in
/// the gateway, the dispatcher and gpu-task alike, so `grep <job id>` over
/// their logs tells the job's whole story.
#[macro_export]
macro_rules! job_span {
    ($job_id:expr, $user_id:expr) => {
        ::tracing::info_span!("job", job_id = %$job_id, user_id = %$user_id)
    };
}

/// Completes on SIGINT or SIGTERM: how every long-running comfy-multi
/// service learns it should stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
