//! The whole-stack benchmark behind `scripts/bench.sh` (issue 7): starts real
//! Redis, the gateway, the dispatcher and the stand-ins ([`stack`]), puts
//! load on them, and prints each figure as a line `name: value unit (load)`,
//! followed by where the time went. Test equipment: never shipped, never part
//! of `cargo test` (a `harness = false` bench target, run by `cargo bench`).
//!
//! Two stacks, one after the other:
//!
//! - **A**, the local executor, 100 participants: gateway RSS idle and with
//!   100 editor websockets; gateway CPU while those sockets get progress at
//!   10 messages/s each (published on the gateway's Redis fan-out channels,
//!   `cm:events:<n>`, as the internal API does); the GPU idle gap between
//!   jobs (from the ComfyUI stand-in's own `execution_start` /
//!   `execution_success` timestamps); lookups and submits with `wrk`.
//! - **B**, the Nomad stand-in: the dispatcher's reaction, from a job's
//!   terminal state (its `finished_at` in Redis) to the next dispatch request
//!   the stand-in received (the child's `SubmitTime`).
//!
//! Environment: `BENCH_SECONDS` (each wrk run, default 30),
//! `BENCH_FANOUT_SECONDS` (default 20), `BENCH_JOBS` (jobs run for the idle
//! gap and the reaction, default 40), `BENCH_APPENDFSYNC` (Redis's AOF policy:
//! `always`, as deployed, by default; `everysec` to see what it costs), `BENCH_ONLY` (a comma list of
//! `sockets`, `gap`, `lookups`, `submit`, `reaction`: only those), `BENCH_PERF`
//! (set: print the gateway's hottest functions under each HTTP load, from
//! `perf record -e cpu-clock`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::wait_until;
use comfy_multi_tests::stack::{self, Executor, Stack, StackOptions};
use dispatcher::job::{Job, JobId};
use dispatcher::policy::Limits;
use dispatcher::queue::Store;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = env_u64("BENCH_SECONDS", 30);
    let fanout_seconds = env_u64("BENCH_FANOUT_SECONDS", 20);
    let jobs = env_u64("BENCH_JOBS", 40) as usize;
    let appendfsync = match std::env::var("BENCH_APPENDFSYNC").as_deref() {
        Ok("everysec") => "everysec",
        Ok("no") => "no",
        Ok("always") | Err(_) => "always",
        Ok(other) => anyhow::bail!("BENCH_APPENDFSYNC={other}: expected always, everysec or no"),
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "# comfy-multi bench: {} cores, load average {} (other work on the machine skews wall-clock figures), Redis appendfsync {appendfsync}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only.split(',').any(|p| p.trim() == part);
    if run("sockets") || run("gap") || run("lookups") || run("submit") {
        let stack = stack::start(StackOptions {
            participants: 100,
            redis_appendfsync: appendfsync,
            ..StackOptions::new(Executor::Local)
        }).await;
        let gateway = stack.pid("gateway").context("the gateway's pid")?;
        let store = Store::connect(&stack.redis_url).await?;
        figure("gateway_rss_idle", rss_mb(gateway)?, "MB", "just started, no client");
        if run("sockets") {
            websockets(&stack, gateway, fanout_seconds).await?;
        }
        if run("gap") || run("lookups") {
            let finished = idle_gap(&stack, &store, jobs).await?;
            if run("lookups") {
                lookups(&stack, &store, &finished, seconds).await?;
            }
        }
        if run("submit") {
            submits(&stack, &store, seconds).await?;
        }
    }
    if run("reaction") {
        let stack = stack::start(StackOptions {
            participants: 20,
            redis_appendfsync: appendfsync,
            ..StackOptions::new(Executor::Nomad)
        }).await;
        let store = Store::connect(&stack.redis_url).await?;
        reaction(&stack, &store, jobs).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Figures and /proc
// ---------------------------------------------------------------------------

/// The `p`-th percentile (nearest rank) of `values`.
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn figure(name: &str, value: f64, unit: &str, load: &str) {
    println!("{name}: {value:.1} {unit} ({load})");
}

/// Resident memory of `pid`, MB.
fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// CPU time (user + system) `pid` has used, in seconds (USER_HZ = 100).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based).
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / 100.0)
}

/// CPU used by a set of processes over a stretch of work.
struct CpuMeter {
    pids: Vec<(&'static str, u32)>,
    start: Vec<f64>,
}

impl CpuMeter {
    fn start(stack: &Stack, names: &[&'static str]) -> anyhow::Result<Self> {
        let pids: Vec<(&'static str, u32)> = names.iter().filter_map(|n| Some((*n, stack.pid(n)?))).collect();
        let start = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect::<anyhow::Result<_>>()?;
        Ok(CpuMeter { pids, start })
    }

    /// `(name, cpu seconds)` since the start.
    fn stop(&self) -> anyhow::Result<Vec<(&'static str, f64)>> {
        self.pids.iter().zip(&self.start).map(|((n, p), s)| Ok((*n, cpu_seconds(*p)? - s))).collect()
    }
}

/// Redis' own accounting: calls and microseconds per command.
async fn command_stats(store_url: &str) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let client = redis::Client::open(store_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let field = |k: &str| {
            rest.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
        };
        out.insert(name.to_string(), (field("calls"), field("usec")));
    }
    Ok(out)
}

/// Prints where a load's time went: CPU per request of each process, and
/// Redis' busiest commands.
fn print_costs(
    prefix: &str,
    requests: u64,
    cpu: &[(&str, f64)],
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) {
    let requests = requests.max(1) as f64;
    for (name, seconds) in cpu {
        println!("  {prefix}.cpu.{name}: {:.1} us/request", seconds * 1e6 / requests);
    }
    let mut cmds: Vec<(String, u64, u64)> = after
        .iter()
        .map(|(k, (c, u))| {
            let (c0, u0) = before.get(k).copied().unwrap_or((0, 0));
            (k.clone(), c - c0, u - u0)
        })
        .filter(|(_, c, _)| *c > 0)
        .collect();
    cmds.sort_by_key(|(_, _, u)| std::cmp::Reverse(*u));
    for (name, calls, usec) in cmds.into_iter().take(6) {
        println!(
            "  {prefix}.redis.{name}: {:.2} calls/request, {:.1} us/call",
            calls as f64 / requests,
            usec as f64 / calls as f64
        );
    }
}

/// With `BENCH_PERF` set: a sampling profile of the gateway (`perf record -e
/// cpu-clock`, which works where hardware counters do not) over a load.
struct Profile {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

impl Profile {
    fn start(pid: u32, seconds: u64) -> anyhow::Result<Profile> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("perf.data");
        let child = tokio::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "999", "-p", &pid.to_string(), "-o"])
            .arg(&file)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("BENCH_PERF is set but `perf` cannot run")?;
        Ok(Profile { child, _dir: dir, file })
    }

    /// Prints the gateway's hottest symbols.
    async fn print(mut self, name: &str) -> anyhow::Result<()> {
        self.child.wait().await?;
        let out = tokio::process::Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", "dso,symbol", "--percent-limit", "1", "-i"])
            .arg(&self.file)
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).take(25) {
            let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
            println!("  {name}.perf: {}", line.trim_end_matches(" - -"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------

/// What wrk asks for, and as whom.
struct Target {
    code: String,
    path: String,
}

struct WrkResult {
    requests: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    failed: u64,
}

/// A Lua long string that cannot end early.
fn lua_string(s: &str) -> String {
    let mut eq = String::from("=");
    while s.contains(&format!("]{eq}]")) {
        eq.push('=');
    }
    format!("[{eq}[{s}]{eq}]")
}

/// Runs wrk (one thread, `connections` connections) for `seconds` over the
/// `targets` in turn, each with its participant's access code.
async fn wrk(
    url: &str,
    method: &str,
    body: Option<&str>,
    targets: &[Target],
    connections: usize,
    seconds: u64,
) -> anyhow::Result<WrkResult> {
    let mut script = String::from("local targets = {\n");
    for t in targets {
        script.push_str(&format!(
            "  {{ path = {}, auth = {} }},\n",
            lua_string(&t.path),
            lua_string(&format!("Bearer {}", t.code))
        ));
    }
    script.push_str("}\n");
    script.push_str(&format!("local body = {}\n", body.map(lua_string).unwrap_or_else(|| "nil".into())));
    script.push_str(&format!("local method = {}\n", lua_string(method)));
    script.push_str(
        r#"local i = 0
request = function()
  i = i + 1
  local t = targets[(i % #targets) + 1]
  local headers = { ["Authorization"] = t.auth }
  if body then headers["Content-Type"] = "application/json" end
  return wrk.format(method, t.path, headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %.0f %.0f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"#,
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("load.lua");
    std::fs::write(&path, script)?;
    let out = tokio::process::Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--timeout", "10s", "-s"])
        .arg(&path)
        .arg(url)
        .output()
        .await
        .context("cannot run wrk (scripts/install-deps.sh installs it)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WRK "))
        .with_context(|| format!("wrk said: {stdout}{}", String::from_utf8_lossy(&out.stderr)))?;
    let v: Vec<f64> = line.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    Ok(WrkResult {
        requests: v[0] as u64,
        seconds: v[1] / 1e6,
        p50_ms: v[2] / 1e3,
        p99_ms: v[3] / 1e3,
        failed: (v[4] + v[5]) as u64,
    })
}

/// Runs one wrk load and prints its figures and costs.
async fn http_load(
    stack: &Stack,
    name: &str,
    load: &str,
    method: &str,
    body: Option<&str>,
    targets: &[Target],
    seconds: u64,
) -> anyhow::Result<WrkResult> {
    let meter = CpuMeter::start(stack, &["gateway", "redis-server", "dispatcher"])?;
    let before = command_stats(&stack.redis_url).await?;
    let profile = match std::env::var_os("BENCH_PERF") {
        Some(_) => Some(Profile::start(stack.pid("gateway").context("the gateway's pid")?, seconds)?),
        None => None,
    };
    let r = wrk(&stack.gateway_url, method, body, targets, 20, seconds).await?;
    let cpu = meter.stop()?;
    let after = command_stats(&stack.redis_url).await?;
    if let Some(profile) = profile {
        profile.print(name).await?;
    }
    let rate = r.requests as f64 / r.seconds;
    figure(&format!("{name}_rate"), rate, "req/s", load);
    figure(&format!("{name}_p50"), r.p50_ms, "ms", load);
    figure(&format!("{name}_p99"), r.p99_ms, "ms", load);
    if r.failed > 0 {
        println!("  {name}.failed: {} of {} requests (non-2xx or socket errors)", r.failed, r.requests);
    }
    print_costs(name, r.requests, &cpu, &before, &after);
    Ok(r)
}

// ---------------------------------------------------------------------------
// The loads
// ---------------------------------------------------------------------------

/// 100 editors' websockets: RSS with them open, and the gateway's CPU while
/// each gets progress at 10 messages/s.
async fn websockets(stack: &Stack, gateway: u32, seconds: u64) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_base = stack.gateway_url.replacen("http://", "ws://", 1);
    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    for (user, code) in stack.codes.iter().take(100) {
        let mut request = format!("{ws_base}/user/{user}/ws").into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {code}").parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(request).await.context("editor websocket")?;
        let (mut write, mut read) = socket.split();
        let (received, ready) = (received.clone(), ready_tx.clone());
        readers.push(tokio::spawn(async move {
            // The first message is the participant's status.
            if let Some(Ok(_)) = read.next().await {
                let _ = ready.send(());
            }
            while let Some(Ok(m)) = read.next().await {
                if m.is_text() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = write.close().await;
        }));
    }
    let sockets = readers.len();
    for _ in 0..sockets {
        ready_rx.recv().await.context("a socket closed before its status")?;
    }
    figure("gateway_rss_sockets", rss_mb(gateway)?, "MB", &format!("{sockets} editor websockets open, idle"));

    // Progress to every socket, 10 messages/s each, the way gpu-task's relay publishes it.
    let client = redis::Client::open(stack.redis_url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let prompt = JobId::new_v4().to_string();
    let cpu0 = cpu_seconds(gateway)?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let ticks = seconds * 10;
    for k in 0..ticks {
        tick.tick().await;
        let mut pipe = redis::pipe();
        for (user, _) in stack.codes.iter().take(sockets) {
            let message = json!({ "type": "progress", "data": {
                "value": k % 20 + 1, "max": 20, "prompt_id": prompt, "node": "3" } });
            pipe.publish(dispatcher::queue::events_channel(*user), message.to_string()).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    let expected = ticks * sockets as u64;
    let _ = wait_until("the sockets to get every message", Duration::from_secs(10), || {
        let n = received.load(Ordering::Relaxed);
        async move { (n >= expected).then_some(()) }
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(gateway)? - cpu0;
    let got = received.load(Ordering::Relaxed);
    figure(
        "gateway_cpu_fanout",
        100.0 * cpu / elapsed,
        "% of one core",
        &format!("{sockets} sockets × 10 progress messages/s for {seconds} s; {got} of {expected} delivered"),
    );
    println!("  fanout.cpu.gateway: {:.1} us/message delivered", cpu * 1e6 / got.max(1) as f64);
    for r in readers {
        r.abort();
    }
    Ok(())
}

fn workflow(variant: usize) -> Value {
    let mut w = model_free_workflow();
    // A different colour per job, so ComfyUI's cache never skips the work.
    w["1"]["inputs"]["color"] = json!(variant % 0xFFFFFF);
    w
}

/// Submits `count` jobs round-robin over participants 1..=users while
/// dispatching is paused, so the queue is full when it resumes.
async fn queue_up(stack: &Stack, store: &Store, count: usize, users: u32) -> anyhow::Result<Vec<JobId>> {
    store.pause("bench: filling the queue").await?;
    let mut ids = Vec::new();
    for i in 0..count {
        let user = (i as u32 % users) + 1;
        let id = stack.submit(user, json!({ "prompt": workflow(i) })).await;
        ids.push(id.parse()?);
    }
    Ok(ids)
}

/// Waits until every job in `ids` has ended; returns their records.
async fn run_all(store: &Store, ids: &[JobId]) -> anyhow::Result<Vec<Job>> {
    store.resume().await?;
    let jobs = wait_until("every bench job to end", Duration::from_secs(600), || async {
        let mut jobs = Vec::new();
        for id in ids {
            let job = store.get(id).await.ok()??;
            if !job.state.is_terminal() {
                return None;
            }
            jobs.push(job);
        }
        Some(jobs)
    })
    .await?;
    let failed: Vec<_> = jobs.iter().filter(|j| j.state != dispatcher::job::JobState::Succeeded).collect();
    if !failed.is_empty() {
        bail!("{} bench jobs did not succeed, e.g. {:?}", failed.len(), failed[0].error);
    }
    Ok(jobs)
}

/// Milliseconds between `b` and `a`, if both are known.
fn ms_between(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    Some(b? as f64 - a? as f64)
}

fn print_stage(prefix: &str, stage: &str, values: &[f64]) {
    if !values.is_empty() {
        println!("  {prefix}.{stage}: p50 {:.1} ms, p99 {:.1} ms", percentile(values, 50.0), percentile(values, 99.0));
    }
}

/// A job and ComfyUI's (start, end) of its prompt, ms.
struct Ran<'a> {
    job: &'a Job,
    comfy: (u64, u64),
}

/// A job the Nomad stand-in ran: when it got the dispatch request, and when
/// gpu-task exited (ms).
struct Dispatched<'a> {
    job: &'a Job,
    request: u64,
    exit: Option<u64>,
}

/// The GPU idle gap with the local executor: ComfyUI's end of one prompt to
/// its start of the next while jobs wait. Returns the finished jobs.
async fn idle_gap(stack: &Stack, store: &Store, count: usize) -> anyhow::Result<Vec<Job>> {
    let users = 20;
    let ids = queue_up(stack, store, count, users).await?;
    let mut jobs = run_all(store, &ids).await?;
    let comfy = stack.comfyui_url().context("the ComfyUI stand-in")?;
    let history: Value = reqwest::get(format!("{comfy}/history?max_items=100000")).await?.json().await?;
    // ComfyUI's own times of each prompt, in the order it ran them.
    let mut runs: Vec<(u64, u64)> = history
        .as_object()
        .context("history is an object")?
        .values()
        .filter_map(|entry| {
            let mut start = None;
            let mut end = None;
            for m in entry["status"]["messages"].as_array()? {
                let t = m[1]["timestamp"].as_u64();
                match m[0].as_str()? {
                    "execution_start" => start = t,
                    "execution_success" | "execution_error" | "execution_interrupted" => end = t,
                    _ => {}
                }
            }
            Some((start?, end?))
        })
        .collect();
    runs.sort();
    jobs.sort_by_key(|j| j.started_at);
    let gaps: Vec<f64> = runs.windows(2).map(|w| w[1].0 as f64 - w[0].1 as f64).collect();
    let load = format!("{count} jobs queued by 20 participants, local executor, 1 slot, ComfyUI stand-in");
    figure("gpu_idle_gap_p50", percentile(&gaps, 50.0), "ms", &load);
    figure("gpu_idle_gap_p99", percentile(&gaps, 99.0), "ms", &load);
    if runs.len() == jobs.len() {
        // With one slot, the i-th prompt ComfyUI ran is the i-th job started.
        let ran: Vec<Ran> = jobs.iter().zip(&runs).map(|(job, comfy)| Ran { job, comfy: *comfy }).collect();
        let pairs: Vec<(&Ran, &Ran)> = ran.windows(2).map(|w| (&w[0], &w[1])).collect();
        let stage = |name: &str, f: &dyn Fn(&Ran, &Ran) -> Option<f64>| {
            print_stage("gap", name, &pairs.iter().filter_map(|(a, b)| f(a, b)).collect::<Vec<_>>())
        };
        stage("comfy_end->job_finished", &|a, _| ms_between(Some(a.comfy.1), a.job.finished_at));
        stage("job_finished->next_dispatched", &|a, b| ms_between(a.job.finished_at, b.job.dispatched_at));
        stage("next_dispatched->next_started", &|_, b| ms_between(b.job.dispatched_at, b.job.started_at));
        stage("next_started->comfy_start", &|_, b| ms_between(b.job.started_at, Some(b.comfy.0)));
    } else {
        println!("  gap: ComfyUI ran {} prompts for {} jobs; no per-stage breakdown", runs.len(), jobs.len());
    }
    Ok(jobs)
}

/// History of a finished job and the participant's queue (with 3 jobs
/// waiting each), through wrk.
async fn lookups(stack: &Stack, store: &Store, finished: &[Job], seconds: u64) -> anyhow::Result<()> {
    let users: Vec<u32> = (1..=20).collect();
    // Three waiting jobs per participant, as the workshop's limit allows.
    queue_up(stack, store, users.len() * 3, users.len() as u32).await?;
    let mut history = Vec::new();
    for user in &users {
        let job = finished.iter().find(|j| j.user == *user).context("a finished job of every participant")?;
        history.push(Target {
            code: stack.code(*user).to_string(),
            path: format!("/user/{user}/api/history/{}", job.id),
        });
    }
    let queue: Vec<Target> = users
        .iter()
        .map(|u| Target { code: stack.code(*u).to_string(), path: format!("/user/{u}/api/queue") })
        .collect();
    let per_user = finished.len() / users.len();
    let load = |what: &str| {
        format!("GET {what}, 20 participants ({per_user} finished + 3 waiting jobs each), 20 connections, {seconds} s")
    };
    http_load(stack, "lookup_history", &load("/user/N/api/history/<id>"), "GET", None, &history, seconds).await?;
    http_load(stack, "lookup_queue", &load("/user/N/api/queue"), "GET", None, &queue, seconds).await?;
    Ok(())
}

/// Participants' submits through the gateway, dispatching paused (limits
/// raised so none is refused: the queue is not what is measured).
async fn submits(stack: &Stack, store: &Store, seconds: u64) -> anyhow::Result<()> {
    store.pause("bench: submits").await?;
    store.set_limits(Limits { max_queued_per_user: u32::MAX / 2, max_running_per_user: 1, max_queue: u32::MAX / 2 }).await?;
    let targets: Vec<Target> = (1..=20)
        .map(|u| Target { code: stack.code(u).to_string(), path: format!("/user/{u}/api/prompt") })
        .collect();
    let body = json!({ "prompt": model_free_workflow(), "client_id": "bench" }).to_string();
    let load = format!(
        "POST /user/N/api/prompt ({} B model-free workflow), 20 participants, 20 connections, {seconds} s, dispatching paused",
        body.len()
    );
    let r = http_load(stack, "submit", &load, "POST", Some(&body), &targets, seconds).await?;
    let queued = store.queued_count().await?;
    println!("  submit.queued_after: {queued} jobs ({} accepted by wrk's count)", r.requests - r.failed);
    Ok(())
}

/// The dispatcher's reaction with the Nomad stand-in: from a job's terminal
/// state to the next dispatch request.
async fn reaction(stack: &Stack, store: &Store, count: usize) -> anyhow::Result<()> {
    let ids = queue_up(stack, store, count, 20).await?;
    let jobs = run_all(store, &ids).await?;
    let nomad = stack.nomad_url.as_deref().context("the Nomad stand-in")?;
    let children: Vec<Value> = reqwest::get(format!("{nomad}/v1/jobs")).await?.json().await?;
    let submitted: HashMap<String, u64> = children
        .iter()
        .filter_map(|c| Some((c["ID"].as_str()?.to_string(), c["SubmitTime"].as_u64()? / 1_000_000)))
        .collect();
    let allocs: Vec<Value> = reqwest::get(format!("{nomad}/v1/allocations")).await?.json().await?;
    let exited: HashMap<String, u64> = allocs
        .iter()
        .filter(|a| a["ClientStatus"] == "complete" || a["ClientStatus"] == "failed")
        .filter_map(|a| Some((a["JobID"].as_str()?.to_string(), a["ModifyTime"].as_u64()? / 1_000_000)))
        .collect();
    let mut runs: Vec<Dispatched> = jobs
        .iter()
        .filter_map(|job| {
            let child = job.executor_ref.as_ref()?;
            Some(Dispatched { job, request: *submitted.get(child)?, exit: exited.get(child).copied() })
        })
        .collect();
    runs.sort_by_key(|r| r.request);
    let pairs: Vec<(&Dispatched, &Dispatched)> = runs.windows(2).map(|w| (&w[0], &w[1])).collect();
    let reactions: Vec<f64> =
        pairs.iter().filter_map(|(a, b)| ms_between(a.job.finished_at, Some(b.request))).collect();
    let load = format!("{} jobs queued by 20 participants, Nomad stand-in with 1 GPU, event stream", runs.len());
    figure("dispatcher_reaction_p50", percentile(&reactions, 50.0), "ms", &load);
    figure("dispatcher_reaction_p99", percentile(&reactions, 99.0), "ms", &load);
    let stage = |name: &str, f: &dyn Fn(&Dispatched, &Dispatched) -> Option<f64>| {
        print_stage("reaction", name, &pairs.iter().filter_map(|(a, b)| f(a, b)).collect::<Vec<_>>())
    };
    stage("job_finished->gpu_task_exit", &|a, _| ms_between(a.job.finished_at, a.exit));
    stage("gpu_task_exit->next_popped", &|a, b| ms_between(a.exit, b.job.dispatched_at));
    stage("next_popped->dispatch_request", &|_, b| ms_between(b.job.dispatched_at, Some(b.request)));
    Ok(())
}
