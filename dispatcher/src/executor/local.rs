//! The local executor: gpu-task as a child process per job.
//!
//! The single-machine default, and the way to run comfy-multi without Nomad.
//! The child gets the environment a Nomad allocation would give it
//! (`NOMAD_META_*`, a task dir whose `local/` holds the payload file), so
//! gpu-task cannot tell the difference. At most `slots` children run at once.
//!
//! gpu-task outlives a dispatcher that is killed: each task dir holds a
//! `run.json` (pid, executor ref), so a restarted dispatcher finds the runs
//! still going ([`Executor::runs`], and [`Executor::start`] of the same
//! attempt) and follows them to their end instead of running the job twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};

use serde::{Deserialize, Serialize};

use super::{attempt_of_token, meta_for, payload_for, Executor, ExecutorError, Outcome, Run, Started};
use crate::contract::{NOMAD_JOB, NOMAD_TASK, PAYLOAD_FILE};
use crate::job::{Job, JobId};

/// How long gpu-task gets after SIGTERM before SIGKILL (Nomad's kill_timeout).
const KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a run started by an earlier dispatcher is checked for its end.
const ORPHAN_POLL: Duration = Duration::from_millis(300);
/// The file in a job's dir naming its running gpu-task.
const RUN_FILE: &str = "run.json";

struct Child {
    pid: Option<u32>,
    outcome: watch::Receiver<Option<Outcome>>,
    /// A stop was sent: not a run to adopt or count any more.
    stopping: bool,
}

/// What `run.json` says of the gpu-task running a job.
#[derive(Debug, Serialize, Deserialize)]
struct RunFile {
    pid: u32,
    executor_ref: String,
}

/// Whether `pid` is a live (not zombie) gpu-task of job `job`: its
/// environment names the job, so a reused pid is not mistaken for it.
fn is_live_run(pid: u32, job: &JobId) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let state = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()));
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    let needle = format!("NOMAD_META_job_id={job}");
    std::fs::read(proc.join("environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
}

/// The job and attempt of a reference `local:<job id>.<attempt>`.
fn parse_reference(reference: &str) -> Option<(JobId, Option<u32>)> {
    let token = reference.strip_prefix("local:")?;
    let id = token.split_once('.').map_or(token, |(id, _)| id).parse().ok()?;
    Some((id, attempt_of_token(token)))
}

/// Runs gpu-task locally.
pub struct LocalExecutor {
    gpu_task_bin: PathBuf,
    work_dir: PathBuf,
    slots: Arc<Semaphore>,
    children: Arc<Mutex<HashMap<String, Child>>>,
}

impl LocalExecutor {
    /// `gpu_task_bin` is run for each job, in a task dir under `work_dir`.
    pub fn new(gpu_task_bin: PathBuf, work_dir: PathBuf, slots: usize) -> Self {
        LocalExecutor {
            gpu_task_bin,
            work_dir,
            slots: Arc::new(Semaphore::new(slots.max(1))),
            children: Arc::default(),
        }
    }

    fn reference(job: &Job) -> String {
        format!("local:{}", super::dispatch_token(job))
    }

    async fn spawn(&self, job: &Job, permit: OwnedSemaphorePermit) -> Result<Child, ExecutorError> {
        let alloc_dir = self.work_dir.join(job.id.to_string());
        let task_dir = alloc_dir.join(NOMAD_TASK);
        let local = task_dir.join("local");
        let secrets = task_dir.join("secrets");
        for dir in [&local, &secrets, &alloc_dir.join("alloc")] {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                ExecutorError::Unavailable(format!("cannot create task dir {}: {e}", dir.display()))
            })?;
        }
        if let Some(payload) = payload_for(job) {
            let path = local.join(PAYLOAD_FILE);
            tokio::fs::write(&path, payload).await.map_err(|e| {
                ExecutorError::Unavailable(format!("cannot write payload {}: {e}", path.display()))
            })?;
        }
        let mut cmd = Command::new(&self.gpu_task_bin);
        for (key, value) in meta_for(job) {
            cmd.env(format!("NOMAD_META_{key}"), &value);
            cmd.env(format!("NOMAD_META_{}", key.to_uppercase()), &value);
        }
        cmd.env("NOMAD_JOB_ID", format!("{NOMAD_JOB}/dispatch-local-{}", job.id))
            .env("NOMAD_JOB_PARENT_ID", NOMAD_JOB)
            .env("NOMAD_TASK_NAME", NOMAD_TASK)
            .env("NOMAD_ALLOC_ID", uuid::Uuid::new_v4().to_string())
            .env("NOMAD_ALLOC_DIR", alloc_dir.join("alloc"))
            .env("NOMAD_TASK_DIR", &local)
            .env("NOMAD_SECRETS_DIR", &secrets)
            .current_dir(&task_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            ExecutorError::Rejected(format!(
                "cannot run gpu-task at {}: {e} (set GPU_TASK_BIN)",
                self.gpu_task_bin.display()
            ))
        })?;
        let pid = child.id();
        if let Some(pid) = pid {
            let record = RunFile { pid, executor_ref: Self::reference(job) };
            let text = serde_json::to_vec(&record).expect("a run file serializes");
            if let Err(e) = tokio::fs::write(alloc_dir.join(RUN_FILE), text).await {
                tracing::warn!(job = %job.id, "cannot write {RUN_FILE}; a restarted dispatcher will not find this run: {e}");
            }
        }
        let stderr = child.stderr.take();
        let (tx, rx) = watch::channel(None);
        let job_id = job.id;
        tokio::spawn(async move {
            let _permit = permit;
            let mut last_line = String::new();
            if let Some(stderr) = stderr {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(job = %job_id, "gpu-task: {line}");
                    if !line.trim().is_empty() {
                        last_line = line;
                    }
                }
            }
            let outcome = match child.wait().await {
                Ok(status) if status.success() => Outcome::Completed,
                Ok(status) => Outcome::Failed {
                    reason: match std::os::unix::process::ExitStatusExt::signal(&status) {
                        // Killed: whatever it last logged is not its reason.
                        Some(signal) => format!("gpu-task was killed by signal {signal}"),
                        // It prints its one-line reason last.
                        None if !last_line.is_empty() => last_line,
                        None => format!("gpu-task exited with {status}"),
                    },
                },
                Err(e) => Outcome::Lost { reason: format!("lost the gpu-task process: {e}") },
            };
            let _ = tokio::fs::remove_dir_all(&alloc_dir).await;
            let _ = tx.send(Some(outcome));
        });
        Ok(Child { pid, outcome: rx, stopping: false })
    }

    /// The run `reference` left by an earlier dispatcher, if its gpu-task
    /// still runs: followed from now on (by polling its pid).
    fn adopt_orphan(&self, reference: &str) -> Option<Child> {
        let (job, _) = parse_reference(reference)?;
        let dir = self.work_dir.join(job.to_string());
        let record: RunFile = match std::fs::read(dir.join(RUN_FILE)).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(record)) => record,
            other => {
                tracing::debug!(%reference, "no run left on disk: {other:?}");
                return None;
            }
        };
        if record.executor_ref != reference || !is_live_run(record.pid, &job) {
            tracing::debug!(%reference, ?record, "the run on disk is another or over");
            return None;
        }
        tracing::info!(%reference, pid = record.pid, "following a gpu-task started before the dispatcher restarted");
        let permit = self.slots.clone().try_acquire_owned().ok();
        let (tx, rx) = watch::channel(None);
        let pid = record.pid;
        tokio::spawn(async move {
            let _permit = permit;
            while is_live_run(pid, &job) {
                tokio::time::sleep(ORPHAN_POLL).await;
            }
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tx.send(Some(Outcome::Lost {
                reason: format!("gpu-task (pid {pid}, started before the dispatcher restarted) ended without a result"),
            }));
        });
        Some(Child { pid: Some(pid), outcome: rx, stopping: false })
    }

    /// Adopts every live run left on disk by an earlier dispatcher, and
    /// removes the task dirs of those that ended.
    async fn scan_orphans(&self, children: &mut HashMap<String, Child>) {
        let Ok(mut dir) = tokio::fs::read_dir(&self.work_dir).await else { return };
        while let Ok(Some(entry)) = dir.next_entry().await {
            let Ok(bytes) = tokio::fs::read(entry.path().join(RUN_FILE)).await else { continue };
            let Ok(record) = serde_json::from_slice::<RunFile>(&bytes) else { continue };
            if children.contains_key(&record.executor_ref) {
                continue;
            }
            match self.adopt_orphan(&record.executor_ref) {
                Some(child) => {
                    children.insert(record.executor_ref, child);
                }
                None => {
                    let _ = tokio::fs::remove_dir_all(entry.path()).await;
                }
            }
        }
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn start(&self, job: &Job) -> Result<Started, ExecutorError> {
        let reference = Self::reference(job);
        let mut children = self.children.lock().await;
        if !children.contains_key(&reference) {
            // Started by a dispatcher that was killed before it could record it.
            if let Some(orphan) = self.adopt_orphan(&reference) {
                children.insert(reference.clone(), orphan);
                return Ok(Started { executor_ref: reference, index: 0 });
            }
            let permit = self
                .slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| ExecutorError::Unavailable("every local slot is busy".into()))?;
            let child = self.spawn(job, permit).await?;
            children.insert(reference.clone(), child);
        }
        Ok(Started { executor_ref: reference, index: 0 })
    }

    async fn wait(&self, started: &Started) -> Result<Outcome, ExecutorError> {
        let rx = {
            let mut children = self.children.lock().await;
            if !children.contains_key(&started.executor_ref) {
                if let Some(orphan) = self.adopt_orphan(&started.executor_ref) {
                    children.insert(started.executor_ref.clone(), orphan);
                }
            }
            children.get(&started.executor_ref).map(|c| c.outcome.clone())
        };
        let Some(mut rx) = rx else {
            return Ok(Outcome::Lost {
                reason: "the local gpu-task process is gone (the dispatcher restarted)".into(),
            });
        };
        let outcome = loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                break outcome;
            }
            if rx.changed().await.is_err() {
                break Outcome::Lost { reason: "lost the gpu-task process".into() };
            }
        };
        self.children.lock().await.remove(&started.executor_ref);
        Ok(outcome)
    }

    async fn stop(&self, executor_ref: &str) -> Result<(), ExecutorError> {
        let (pid, mut rx) = {
            let mut children = self.children.lock().await;
            if !children.contains_key(executor_ref) {
                if let Some(orphan) = self.adopt_orphan(executor_ref) {
                    children.insert(executor_ref.to_string(), orphan);
                }
            }
            match children.get_mut(executor_ref) {
                Some(c) => {
                    c.stopping = true;
                    (c.pid, c.outcome.clone())
                }
                None => return Ok(()),
            }
        };
        let Some(pid) = pid else { return Ok(()) };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = tokio::time::timeout(KILL_TIMEOUT, async {
            while rx.borrow_and_update().is_none() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        if exited.is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        Ok(())
    }

    async fn runs(&self) -> Result<Vec<Run>, ExecutorError> {
        let mut children = self.children.lock().await;
        self.scan_orphans(&mut children).await;
        Ok(children
            .iter()
            .filter(|(_, c)| !c.stopping && c.outcome.borrow().is_none())
            .filter_map(|(reference, _)| {
                let (job_id, attempt) = parse_reference(reference)?;
                Some(Run { executor_ref: reference.clone(), job_id, attempt })
            })
            .collect())
    }
}
