//! Prometheus metrics: the names every comfy-multi process uses, the
//! functions that move them, and the text they are scraped as.
//!
//! Each process (gateway, dispatcher) has its own registry, installed on
//! first use through the `metrics` facade and rendered by
//! `metrics-exporter-prometheus` ([`render`]). Code that counts something
//! calls one function here (`submitted`, `dispatched`, ...), so the names and
//! labels are defined exactly once. The README's "Metrics" section lists
//! them.
//!
//! Where the numbers come from:
//! - counters and histograms move where the event happens (a submit, a
//!   dispatch, a Nomad API error, a job's end, a websocket message);
//! - the gauges of jobs by state and queue length per mode and tier are set
//!   from Redis at scrape time ([`set_job_states`], [`set_queue_lengths`]);
//! - `comfy_multi_component_up` is set from a [`crate::health::Report`]
//!   ([`set_health`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::job::{Job, JobState};
use crate::policy::Mode;

/// Prompts accepted into the queue.
pub const SUBMITS: &str = "comfy_multi_submits_total";
/// Prompts refused, by `reason` (the error kind: `invalid_prompt`, `queue_full`, ...).
pub const REJECTIONS: &str = "comfy_multi_rejections_total";
/// Jobs by `state`, from Redis at scrape time.
pub const JOBS: &str = "comfy_multi_jobs";
/// Queued jobs by `mode` (the current scheduling mode) and `tier`, at scrape time.
pub const QUEUE_LENGTH: &str = "comfy_multi_queue_length";
/// Seconds from submit to dispatch, observed when a job ends.
pub const QUEUE_WAIT: &str = "comfy_multi_queue_wait_seconds";
/// Seconds from gpu-task's start to the job's end, observed when a job ends, by `state`.
pub const RUN_TIME: &str = "comfy_multi_run_seconds";
/// Jobs handed to the executor.
pub const DISPATCHES: &str = "comfy_multi_dispatches_total";
/// Jobs the dispatch loop holds (dispatched or running).
pub const IN_FLIGHT: &str = "comfy_multi_jobs_in_flight";
/// Failed calls to Nomad's HTTP API, by `kind` (`unreachable`, `4xx`, `5xx`).
pub const NOMAD_ERRORS: &str = "comfy_multi_nomad_api_errors_total";
/// Open websockets, by `socket` (`editor`, `admin`).
pub const OPEN_SOCKETS: &str = "comfy_multi_open_websockets";
/// Websocket messages sent, by `socket` (`editor`, `admin`).
pub const WS_SENT: &str = "comfy_multi_websocket_messages_sent_total";
/// 1 when `component` (redis, nomad, consul, comfyui, dispatcher) answers, else 0.
pub const COMPONENT_UP: &str = "comfy_multi_component_up";

/// Queue waits: a workshop's range, from instant to an hour.
const WAIT_BUCKETS: [f64; 12] = [0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0];
/// Run times: a workflow on one GPU, seconds to tens of minutes.
const RUN_BUCKETS: [f64; 11] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// This process's registry, installed as the global `metrics` recorder on
/// first call. Idempotent; every other function here calls it.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT.into()), &WAIT_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(RUN_TIME.into()), &RUN_BUCKETS))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SUBMITS, "Prompts accepted into the queue.");
    describe_counter!(REJECTIONS, "Prompts refused, by reason.");
    describe_gauge!(JOBS, "Jobs by state (read from Redis at scrape time).");
    describe_gauge!(QUEUE_LENGTH, "Queued jobs by scheduling mode and priority tier (read from Redis at scrape time).");
    describe_histogram!(QUEUE_WAIT, Unit::Seconds, "Seconds from submit to dispatch, observed when a job ends.");
    describe_histogram!(RUN_TIME, Unit::Seconds, "Seconds from gpu-task's start to the job's end, observed when a job ends.");
    describe_counter!(DISPATCHES, "Jobs handed to the executor.");
    describe_gauge!(IN_FLIGHT, "Jobs the dispatch loop holds (dispatched or running).");
    describe_counter!(NOMAD_ERRORS, "Failed calls to Nomad's HTTP API, by kind.");
    describe_gauge!(OPEN_SOCKETS, "Open websockets: editors and admin pages.");
    describe_counter!(WS_SENT, "Websocket messages sent, by socket kind.");
    describe_gauge!(COMPONENT_UP, "1 when the component answers, else 0.");
    // Present (at 0) from the start, so a rate() has a base.
    metrics::counter!(SUBMITS).absolute(0);
    metrics::counter!(DISPATCHES).absolute(0);
}

/// The Prometheus text exposition of this process's metrics.
pub fn render() -> String {
    install().render()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A prompt was accepted.
pub fn submitted() {
    install();
    metrics::counter!(SUBMITS).increment(1);
}

/// A prompt was refused for `reason`.
pub fn rejected(reason: &'static str) {
    install();
    metrics::counter!(REJECTIONS, "reason" => reason).increment(1);
}

/// A job handed to the executor.
pub fn dispatched() {
    install();
    metrics::counter!(DISPATCHES).increment(1);
}

/// How many jobs the dispatch loop holds now.
pub fn set_in_flight(n: usize) {
    install();
    metrics::gauge!(IN_FLIGHT).set(n as f64);
}

/// A failed call to Nomad's API: `unreachable`, or the answer's status class.
pub fn nomad_error(status: Option<u16>) {
    install();
    let kind = match status {
        None => "unreachable",
        Some(s) if s >= 500 => "5xx",
        Some(_) => "4xx",
    };
    metrics::counter!(NOMAD_ERRORS, "kind" => kind).increment(1);
}

/// Job `job` (as it was before its end) ends in `to` at `now_ms`: observes
/// its queue wait and its run time.
pub fn job_ended(job: &Job, to: JobState, now_ms: u64) {
    install();
    if let Some(dispatched) = job.dispatched_at {
        let wait = dispatched.saturating_sub(job.created_at) as f64 / 1000.0;
        metrics::histogram!(QUEUE_WAIT).record(wait);
    }
    if let Some(started) = job.started_at {
        let run = now_ms.saturating_sub(started) as f64 / 1000.0;
        metrics::histogram!(RUN_TIME, "state" => to.as_str()).record(run);
    }
}

/// A websocket message sent on a `socket` (`editor`, `admin`).
pub fn websocket_sent(socket: &'static str) {
    install();
    metrics::counter!(WS_SENT, "socket" => socket).increment(1);
}

/// An open websocket, counted in `comfy_multi_open_websockets{socket}` for
/// as long as this value lives.
pub struct OpenSocket(&'static str);

impl OpenSocket {
    pub fn new(socket: &'static str) -> Self {
        install();
        metrics::gauge!(OPEN_SOCKETS, "socket" => socket).increment(1.0);
        OpenSocket(socket)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics::gauge!(OPEN_SOCKETS, "socket" => self.0).decrement(1.0);
    }
}

/// The health of each component (`redis`, `nomad`, `consul`, `comfyui`,
/// `dispatcher`) as [`crate::health`] knows it:
/// `comfy_multi_component_up{component}` is 1 (up), 0 (down) or -1 (not
/// known yet, e.g. no gpu-task has talked to ComfyUI).
pub fn set_health(report: &crate::health::Report) {
    install();
    for (component, gauge) in report.gauges() {
        metrics::gauge!(COMPONENT_UP, "component" => component.as_str()).set(gauge as f64);
    }
}

/// Jobs by state, as counted in Redis; states with no job are 0.
pub fn set_job_states(counts: &HashMap<JobState, u64>) {
    install();
    for state in JobState::ALL {
        let n = counts.get(&state).copied().unwrap_or(0);
        metrics::gauge!(JOBS, "state" => state.as_str()).set(n as f64);
    }
}

/// Queued jobs per priority tier under the current `mode`; the other mode,
/// and the normal and front tiers when empty, read 0.
pub fn set_queue_lengths(mode: Mode, by_tier: &BTreeMap<i64, u64>) {
    install();
    let mut tiers = by_tier.clone();
    for tier in [0, crate::policy::FRONT_TIER] {
        tiers.entry(tier).or_insert(0);
    }
    for m in [Mode::Fifo, Mode::Fair] {
        for (tier, n) in &tiers {
            let n = if m == mode { *n } else { 0 };
            metrics::gauge!(QUEUE_LENGTH, "mode" => m.as_str(), "tier" => tier.to_string()).set(n as f64);
        }
    }
}

/// Serves [`render`] at `GET /metrics` on `listener` until `shutdown`
/// completes: the dispatcher's metrics endpoint (`dispatcher.metrics_addr`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(|| async { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_their_labels() {
        submitted();
        rejected("queue_full");
        use crate::health::{Component, Observation, Report};
        let report = Report {
            components: [
                (Component::Redis, Observation::now(Ok(()))),
                (Component::Nomad, Observation::now(Err("refused".into()))),
            ]
            .into(),
        };
        set_health(&report);
        set_queue_lengths(Mode::Fair, &BTreeMap::from([(1, 2)]));
        let text = render();
        assert!(text.contains("comfy_multi_submits_total "), "{text}");
        assert!(text.contains(r#"comfy_multi_rejections_total{reason="queue_full"} "#), "{text}");
        assert!(text.contains(r#"comfy_multi_component_up{component="redis"} 1"#), "{text}");
        assert!(text.contains(r#"comfy_multi_component_up{component="nomad"} 0"#), "{text}");
        assert!(text.contains(r#"comfy_multi_queue_length{mode="fair",tier="1"} 2"#), "{text}");
        assert!(text.contains(r#"comfy_multi_queue_length{mode="fifo",tier="1"} 0"#), "{text}");
        assert!(text.contains(r#"comfy_multi_queue_length{mode="fair",tier="0"} 0"#), "{text}");
    }
}
