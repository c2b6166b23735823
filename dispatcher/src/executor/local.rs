//! The local executor: gpu-task as a child process per job.
//!
//! The single-machine default, and the way to run comfy-multi without Nomad.
//! The child gets the environment a Nomad allocation would give it
//! (`NOMAD_META_*`, a task dir whose `local/` holds the payload file), so
//! gpu-task cannot tell the difference. At most `slots` children run at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};

use super::{meta_for, payload_for, Executor, ExecutorError, Outcome, Started};
use crate::contract::{NOMAD_JOB, NOMAD_TASK, PAYLOAD_FILE};
use crate::job::Job;

/// How long gpu-task gets after SIGTERM before SIGKILL (Nomad's kill_timeout).
const KILL_TIMEOUT: Duration = Duration::from_secs(30);

struct Child {
    pid: Option<u32>,
    outcome: watch::Receiver<Option<Outcome>>,
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
        Ok(Child { pid, outcome: rx })
    }
}

#[async_trait]
impl Executor for LocalExecutor {
    async fn start(&self, job: &Job) -> Result<Started, ExecutorError> {
        let reference = Self::reference(job);
        let mut children = self.children.lock().await;
        if !children.contains_key(&reference) {
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
        let rx = self.children.lock().await.get(&started.executor_ref).map(|c| c.outcome.clone());
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
        let (pid, mut rx) = match self.children.lock().await.get(executor_ref) {
            Some(c) => (c.pid, c.outcome.clone()),
            None => return Ok(()),
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
}
