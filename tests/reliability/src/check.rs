//! The invariants checked once every job has ended: what "nothing lost"
//! means for comfy-multi, job by job.
//!
//! - no job lost: every acknowledged id is in the store;
//! - none stuck: every job is `succeeded`, `failed` or `cancelled`;
//! - a failed job says why (a non-empty `error`);
//! - ended exactly once: no job was seen to end twice, or to change after it ended;
//! - outputs exactly once: a succeeded job has its one image attached once,
//!   the gateway's history says the same, and `/view` serves a valid PNG;
//! - no double run: Nomad ran no job more often than its `attempts`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use dispatcher::job::{Job, JobState};
use dispatcher::nomad::NomadClient;
use futures_util::StreamExt;
use serde_json::Value;

use crate::users::{Submitted, OUTPUT_NODE};

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("job {id} of user {user} was acknowledged but is not in the store: lost ({})", redis_kill_after(*next_redis_kill_ms))]
    Lost { id: String, user: u32, next_redis_kill_ms: Option<u64> },
    #[error("job {id} is stuck {state} (attempt {attempts}, executor {executor_ref:?})")]
    Stuck { id: String, state: JobState, attempts: u32, executor_ref: Option<String> },
    #[error("job {id} failed without a reason")]
    FailedWithoutReason { id: String },
    #[error("job {id} was seen to end {ends:?} but is {state} now: not exactly one end")]
    EndedMoreThanOnce { id: String, ends: Vec<String>, state: JobState },
    #[error("job {id} succeeded with outputs {outputs}, not its one image once")]
    WrongOutputs { id: String, outputs: String },
    #[error("job {id}: the gateway's history disagrees with the store: {why}")]
    HistoryMismatch { id: String, why: String },
    #[error("job {id}: its output {file} is not a valid PNG through /view: {why}")]
    BadImage { id: String, file: String, why: String },
    #[error("job {id} ran {runs} times in Nomad but has {attempts} attempts: a double run")]
    MoreRunsThanAttempts { id: String, runs: u32, attempts: u32 },
}

fn redis_kill_after(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("Redis was SIGKILLed {ms} ms after the acknowledgement"),
        None => "no SIGKILL of Redis after the acknowledgement".into(),
    }
}

/// What the checks counted besides violations.
#[derive(Debug, Default)]
pub struct Findings {
    pub violations: Vec<Violation>,
    /// Output files on disk that no job lists: written by a run that was
    /// then lost (its retry wrote its own). Harmless, reported.
    pub orphan_files: usize,
    /// gpu-task runs per job, when the executor is Nomad.
    pub runs_checked: bool,
}

/// Everything the checks need of the stack.
pub struct Subject<'a> {
    pub gateway_url: &'a str,
    pub codes: &'a [(u32, String)],
    pub data_dir: &'a Path,
    pub nomad_url: Option<&'a str>,
}

impl Subject<'_> {
    fn code(&self, user: u32) -> &str {
        self.codes.iter().find(|(n, _)| *n == user).map(|(_, c)| c.as_str()).unwrap_or_default()
    }
}

/// Checks every job (`jobs`: all of the store's) against the invariants.
pub async fn check(
    subject: &Subject<'_>,
    jobs: &[Job],
    submitted: &[Submitted],
    ends: &BTreeMap<String, Vec<String>>,
    redis_kills: &[u64],
) -> anyhow::Result<Findings> {
    let mut findings = Findings::default();
    let v = &mut findings.violations;
    let by_id: BTreeMap<String, &Job> = jobs.iter().map(|j| (j.id.to_string(), j)).collect();
    for s in submitted {
        if !by_id.contains_key(&s.id) {
            let next_redis_kill_ms = redis_kills.iter().filter(|k| **k >= s.at).map(|k| k - s.at).min();
            v.push(Violation::Lost { id: s.id.clone(), user: s.user, next_redis_kill_ms });
        }
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?;
    for job in jobs {
        let id = job.id.to_string();
        if !job.state.is_terminal() {
            v.push(Violation::Stuck {
                id,
                state: job.state,
                attempts: job.attempts,
                executor_ref: job.executor_ref.clone(),
            });
            continue;
        }
        if job.state == JobState::Failed && job.error.as_deref().is_none_or(|e| e.trim().is_empty()) {
            v.push(Violation::FailedWithoutReason { id: id.clone() });
        }
        let seen = ends.get(&id).cloned().unwrap_or_default();
        if seen.len() > 1 || seen.first().is_some_and(|s| s != job.state.as_str()) {
            v.push(Violation::EndedMoreThanOnce { id: id.clone(), ends: seen, state: job.state });
        }
    }
    // What the gateway shows, a few jobs at a time.
    let ended = jobs.iter().filter(|j| j.state.is_terminal());
    let mut shown = futures_util::stream::iter(ended.map(|job| check_history(subject, &http, job))).buffer_unordered(8);
    while let Some(found) = shown.next().await {
        v.extend(found?);
    }
    if let Some(url) = subject.nomad_url {
        v.extend(check_runs(url, &by_id).await?);
        findings.runs_checked = true;
    }
    findings.orphan_files = orphan_files(subject.data_dir, jobs);
    Ok(findings)
}

/// The job's outputs in the store, in the gateway's history and on `/view`.
async fn check_history(subject: &Subject<'_>, http: &reqwest::Client, job: &Job) -> anyhow::Result<Option<Violation>> {
    let id = job.id.to_string();
    let base = format!("{}/user/{}/api", subject.gateway_url, job.user);
    let code = subject.code(job.user);
    let res = get(http.get(format!("{base}/history/{id}")).bearer_auth(code)).await?;
    let history: Value = res.error_for_status()?.json().await?;
    let entry = &history[&id];
    if entry.is_null() {
        return Ok(Some(Violation::HistoryMismatch { id, why: format!("no history entry for a {} job", job.state) }));
    }
    let shown = entry["outputs"].as_object().map_or(0, |o| o.len());
    if job.state != JobState::Succeeded {
        let stored = job.outputs.len();
        return Ok((shown != stored).then(|| Violation::HistoryMismatch {
            id,
            why: format!("{shown} output nodes shown, {stored} stored"),
        }));
    }
    let files: Vec<_> = job.outputs.values().flat_map(|kinds| kinds.values().flatten()).collect();
    let one = job.outputs.len() == 1 && job.outputs.get(OUTPUT_NODE).is_some_and(|k| k.len() == 1) && files.len() == 1;
    if !one {
        return Ok(Some(Violation::WrongOutputs { id, outputs: format!("{:?}", job.outputs) }));
    }
    let file = files[0];
    let listed = &entry["outputs"][OUTPUT_NODE]["images"];
    if listed.as_array().map(Vec::len) != Some(1) || listed[0]["filename"] != file.filename.as_str() {
        return Ok(Some(Violation::HistoryMismatch { id, why: format!("history lists {listed}, the store {file:?}") }));
    }
    let query = [("filename", &file.filename), ("subfolder", &file.subfolder), ("type", &file.kind)];
    let res = get(http.get(format!("{base}/view")).query(&query).bearer_auth(code)).await?;
    let status = res.status();
    let bytes = res.bytes().await?;
    let bad = |why: String| Some(Violation::BadImage { id: id.clone(), file: file.filename.clone(), why });
    if !status.is_success() {
        return Ok(bad(format!("/view answered {status}")));
    }
    Ok(match decode_png(&bytes) {
        Ok(()) => None,
        Err(why) => bad(why),
    })
}

/// Sends `req`, again (up to 5 s) while the gateway answers 5xx or cannot
/// be reached: its first request after a Redis restart may fail.
async fn get(req: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let give_up = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let res = req.try_clone().expect("a GET can be cloned").send().await;
        let retry = match &res {
            Ok(r) => r.status().is_server_error(),
            Err(_) => true,
        };
        if !retry || std::time::Instant::now() >= give_up {
            return res;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn decode_png(bytes: &[u8]) -> Result<(), String> {
    let mut reader = png::Decoder::new(bytes).read_info().map_err(|e| e.to_string())?;
    let mut buf = vec![0; reader.output_buffer_size()];
    reader.next_frame(&mut buf).map_err(|e| e.to_string())?;
    Ok(())
}

/// Counts Nomad's allocations per comfy-multi job (its child's meta
/// `job_id`): never more than the job's attempts.
async fn check_runs(nomad_url: &str, jobs: &BTreeMap<String, &Job>) -> anyhow::Result<Vec<Violation>> {
    let allocs: Vec<Value> =
        reqwest::get(format!("{nomad_url}/v1/allocations")).await?.error_for_status()?.json().await?;
    let mut per_child: BTreeMap<String, u32> = BTreeMap::new();
    for alloc in &allocs {
        if let Some(child) = alloc["JobID"].as_str() {
            *per_child.entry(child.to_string()).or_default() += 1;
        }
    }
    let nomad = NomadClient::new(nomad_url, None)?;
    let mut runs: BTreeMap<String, u32> = BTreeMap::new();
    for (child, n) in per_child {
        let Some(spec) = nomad.read_job(&child).await? else { continue };
        if let Some(id) = spec["Meta"]["job_id"].as_str() {
            *runs.entry(id.to_string()).or_default() += n;
        }
    }
    Ok(runs
        .into_iter()
        .filter_map(|(id, runs)| {
            let attempts = jobs.get(&id).map_or(0, |j| j.attempts);
            (runs > attempts).then_some(Violation::MoreRunsThanAttempts { id, runs, attempts })
        })
        .collect())
}

/// Output files under `<data_dir>/users/N/output/<job>/` that the job does not list.
fn orphan_files(data_dir: &Path, jobs: &[Job]) -> usize {
    jobs.iter()
        .map(|job| {
            let dir = data_dir.join("users").join(job.user.to_string()).join("output").join(job.id.to_string());
            let listed: Vec<&str> =
                job.outputs.values().flat_map(|k| k.values().flatten()).map(|f| f.filename.as_str()).collect();
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries.flatten().filter(|e| !listed.iter().any(|f| e.file_name() == *f)).count()
                })
                .unwrap_or(0)
        })
        .sum()
}
