//! The Nomad stand-in's cluster state: jobs, evaluations, allocations, one
//! node with fake GPUs, the raft-like index and the event buffer.
//!
//! Everything changes under one lock, and every change bumps the index,
//! records its events (as Nomad's event stream would send them) and wakes
//! blocking queries. Rendering to JSON follows the sample bodies in
//! `shared/nomad-api` field by field.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::util::{new_id, now_ns, now_secs, rfc3339};

/// How many event batches the stand-in keeps for late subscribers.
const EVENT_BUFFER: usize = 10_000;

/// Datacenter of the stand-in's one node.
pub const DATACENTER: &str = "dc1";

/// A stored job.
pub struct JobRec {
    /// Nomad's JSON job, canonicalized, with its indexes and status.
    pub job: Value,
    /// The dispatch payload (children only), not compressed.
    pub payload: Vec<u8>,
}

impl JobRec {
    pub fn str(&self, key: &str) -> &str {
        self.job
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
    pub fn is_parameterized_parent(&self) -> bool {
        !self.job["ParameterizedJob"].is_null() && self.job["Dispatched"] != json!(true)
    }
    pub fn stopped(&self) -> bool {
        self.job["Stop"] == json!(true)
    }
}

/// A stored evaluation.
pub struct EvalRec {
    pub id: String,
    pub job_id: String,
    pub priority: i64,
    pub job_type: String,
    pub triggered_by: String,
    pub status: String,
    pub status_description: String,
    pub previous_eval: String,
    pub blocked_eval: String,
    pub failed_tg_allocs: BTreeMap<String, Value>,
    pub queued: BTreeMap<String, u64>,
    pub create_index: u64,
    pub modify_index: u64,
    pub snapshot_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
}

/// A task's state inside an allocation.
#[derive(Clone)]
pub struct TaskRec {
    /// `pending`, `running` or `dead`.
    pub state: &'static str,
    pub failed: bool,
    pub started_at: i64,
    pub finished_at: i64,
    pub events: Vec<Value>,
}

/// A stored allocation.
pub struct AllocRec {
    pub id: String,
    pub eval_id: String,
    pub name: String,
    pub job_id: String,
    pub task_group: String,
    /// The job as it was when the allocation was placed.
    pub job: Value,
    pub desired_status: String,
    pub desired_description: String,
    pub client_status: String,
    pub client_description: String,
    pub tasks: BTreeMap<String, TaskRec>,
    /// The GPU UUIDs leased to it, released when it is terminal.
    pub gpus: Vec<String>,
    pub metrics: Value,
    pub create_index: u64,
    pub modify_index: u64,
    pub alloc_modify_index: u64,
    pub create_time: i64,
    pub modify_time: i64,
    /// Process groups of its running tasks.
    pub pgids: BTreeMap<String, i32>,
    /// Set to `true` to stop its tasks (SIGTERM, then SIGKILL after KillTimeout).
    pub stop: watch::Sender<bool>,
}

impl AllocRec {
    pub fn is_terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
    }
}

/// One fake GPU.
pub struct Gpu {
    pub uuid: String,
    pub leased_by: Option<String>,
}

/// The stand-in's one node.
pub struct NodeRec {
    pub id: String,
    pub name: String,
    pub http_addr: String,
    pub gpus: Vec<Gpu>,
    pub eligible: bool,
    pub drain: Option<Value>,
    /// Bumped by every drain update, so an old drain's watcher knows to quit.
    pub drain_gen: u64,
    pub last_drain: Value,
    pub events: Vec<Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// The whole cluster.
pub struct State {
    pub index: u64,
    pub jobs: BTreeMap<String, JobRec>,
    pub evals: BTreeMap<String, EvalRec>,
    pub allocs: BTreeMap<String, AllocRec>,
    pub node: NodeRec,
    /// Event batches `(index, line)`, oldest first.
    pub events: VecDeque<(u64, Value)>,
    /// Blocked evaluations, in the order they will be retried.
    pub blocked: Vec<String>,
    pub index_tx: watch::Sender<u64>,
}

/// Why the placement of one allocation failed.
enum Infeasible {
    NoNode,
    MissingDevices,
    DevicesBusy,
}

/// How many GPUs the task group asks for (`nvidia/gpu`, `gpu`, `nvidia/gpu/<model>`).
pub fn gpus_wanted(group: &Value) -> u64 {
    let mut n = 0;
    for task in group["Tasks"].as_array().into_iter().flatten() {
        for dev in task["Resources"]["Devices"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = dev["Name"].as_str().unwrap_or_default();
            let parts: Vec<&str> = name.split('/').collect();
            let is_gpu = matches!(
                parts.as_slice(),
                ["gpu"] | ["nvidia", "gpu"] | ["nvidia", "gpu", _]
            );
            if is_gpu {
                n += dev["Count"].as_u64().unwrap_or(1);
            }
        }
    }
    n
}

/// A full set of task event fields, as the samples show them.
pub fn task_event(kind: &str, display: &str, extra: Value) -> Value {
    let mut ev = json!({
        "Type": kind,
        "Time": now_ns(),
        "Details": {},
        "DisplayMessage": display,
        "DiskLimit": 0,
        "DownloadError": "",
        "DriverError": "",
        "DriverMessage": "",
        "ExitCode": 0,
        "FailedSibling": "",
        "FailsTask": false,
        "GenericSource": "",
        "KillError": "",
        "KillReason": "",
        "KillTimeout": 0,
        "Message": "",
        "RestartReason": "",
        "SetupError": "",
        "Signal": 0,
        "StartDelay": 0,
        "TaskSignal": "",
        "TaskSignalReason": "",
        "ValidationError": "",
        "VaultError": "",
    });
    if let (Some(ev), Value::Object(extra)) = (ev.as_object_mut(), extra) {
        ev.extend(extra);
    }
    ev
}

fn metrics(
    node_available: u64,
    evaluated: u64,
    filtered: u64,
    exhausted: u64,
    constraint: Option<&str>,
    dimension: Option<&str>,
    node_id: Option<&str>,
) -> Value {
    json!({
        "NodesEvaluated": evaluated,
        "NodesFiltered": filtered,
        "NodesAvailable": { DATACENTER: node_available },
        "NodesInPool": node_available,
        "ClassFiltered": null,
        "ConstraintFiltered": constraint.map(|c| json!({ c: 1 })),
        "NodesExhausted": exhausted,
        "ClassExhausted": null,
        "DimensionExhausted": dimension.map(|d| json!({ d: 1 })),
        "QuotaExhausted": null,
        "ResourcesExhausted": null,
        "Scores": node_id.map(|n| json!({ format!("{n}.binpack"): 0.5 })),
        "ScoreMetaData": null,
        "AllocationTime": 12_345,
        "CoalescedFailures": 0,
    })
}

impl State {
    pub fn new(node: NodeRec) -> State {
        let (index_tx, _) = watch::channel(node.create_index);
        State {
            index: node.create_index,
            jobs: BTreeMap::new(),
            evals: BTreeMap::new(),
            allocs: BTreeMap::new(),
            node,
            events: VecDeque::new(),
            blocked: Vec::new(),
            index_tx,
        }
    }

    /// Starts a change: the index it will carry.
    pub fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Records the events of the change at `index` and wakes waiters.
    pub fn publish(&mut self, index: u64, events: Vec<Value>) {
        if !events.is_empty() {
            let events: Vec<Value> = events
                .into_iter()
                .map(|mut e| {
                    e["Index"] = json!(index);
                    e
                })
                .collect();
            self.events
                .push_back((index, json!({ "Index": index, "Events": events })));
            while self.events.len() > EVENT_BUFFER {
                self.events.pop_front();
            }
        }
        self.index_tx.send_replace(self.index);
    }

    fn event(topic: &str, kind: &str, key: &str, filter_keys: Value, payload: Value) -> Value {
        json!({
            "Topic": topic,
            "Type": kind,
            "Key": key,
            "Namespace": "default",
            "FilterKeys": filter_keys,
            "Index": 0,
            "Payload": payload,
        })
    }

    pub fn job_event(&self, kind: &str, job_id: &str) -> Value {
        let job = self
            .jobs
            .get(job_id)
            .map(|j| j.job.clone())
            .unwrap_or(Value::Null);
        Self::event("Job", kind, job_id, Value::Null, json!({ "Job": job }))
    }

    pub fn alloc_event(&self, kind: &str, alloc_id: &str) -> Value {
        let Some(a) = self.allocs.get(alloc_id) else {
            return Value::Null;
        };
        let alloc = self.alloc_json(a, false);
        Self::event(
            "Allocation",
            kind,
            alloc_id,
            json!([a.job_id, ""]),
            json!({ "Allocation": alloc }),
        )
    }

    pub fn eval_event(&self, eval_id: &str) -> Value {
        let Some(e) = self.evals.get(eval_id) else {
            return Value::Null;
        };
        Self::event(
            "Evaluation",
            "EvaluationUpdated",
            eval_id,
            json!([e.job_id, ""]),
            json!({ "Evaluation": self.eval_json(e) }),
        )
    }

    pub fn node_event(&self, kind: &str) -> Value {
        Self::event(
            "Node",
            kind,
            &self.node.id,
            Value::Null,
            json!({ "Node": self.node_json() }),
        )
    }

    // -----------------------------------------------------------------------
    // Scheduling
    // -----------------------------------------------------------------------

    /// Creates an evaluation for `job_id` and places what it can. Returns the
    /// evaluation id and the allocations to start.
    pub fn evaluate(
        &mut self,
        job_id: &str,
        triggered_by: &str,
        index: u64,
        events: &mut Vec<Value>,
    ) -> (String, Vec<String>) {
        let (priority, job_type) = match self.jobs.get(job_id) {
            Some(j) => (
                j.job["Priority"].as_i64().unwrap_or(50),
                j.str("Type").to_string(),
            ),
            None => (50, "batch".to_string()),
        };
        let now = now_ns();
        let eval = EvalRec {
            id: new_id(),
            job_id: job_id.to_string(),
            priority,
            job_type,
            triggered_by: triggered_by.to_string(),
            status: "complete".into(),
            status_description: String::new(),
            previous_eval: String::new(),
            blocked_eval: String::new(),
            failed_tg_allocs: BTreeMap::new(),
            queued: BTreeMap::new(),
            create_index: index,
            modify_index: index,
            snapshot_index: index,
            create_time: now,
            modify_time: now,
        };
        let eval_id = eval.id.clone();
        self.evals.insert(eval_id.clone(), eval);
        let (placed, failed, queued) = self.place(job_id, &eval_id, index, events);
        if !failed.is_empty() {
            let blocked_id = new_id();
            let blocked = EvalRec {
                id: blocked_id.clone(),
                job_id: job_id.to_string(),
                priority,
                job_type: self.evals[&eval_id].job_type.clone(),
                triggered_by: "queued-allocs".into(),
                status: "blocked".into(),
                status_description: "created to place remaining allocations".into(),
                previous_eval: eval_id.clone(),
                blocked_eval: String::new(),
                failed_tg_allocs: failed.clone(),
                queued: queued.clone(),
                create_index: index,
                modify_index: index,
                snapshot_index: index,
                create_time: now,
                modify_time: now,
            };
            self.evals.insert(blocked_id.clone(), blocked);
            self.blocked.push(blocked_id.clone());
            if let Some(e) = self.evals.get_mut(&eval_id) {
                e.blocked_eval = blocked_id.clone();
                e.failed_tg_allocs = failed;
                e.queued = queued;
            }
            events.push(self.eval_event(&blocked_id));
        }
        events.push(self.eval_event(&eval_id));
        (eval_id, placed)
    }

    /// Places the missing allocations of `job_id` for evaluation `eval_id`.
    /// Returns the placed ids, the failures per group and the queued counts.
    #[allow(clippy::type_complexity)]
    fn place(
        &mut self,
        job_id: &str,
        eval_id: &str,
        index: u64,
        events: &mut Vec<Value>,
    ) -> (Vec<String>, BTreeMap<String, Value>, BTreeMap<String, u64>) {
        let mut placed = Vec::new();
        let mut failed = BTreeMap::new();
        let mut queued = BTreeMap::new();
        let Some(job) = self.jobs.get(job_id) else {
            return (placed, failed, queued);
        };
        if job.stopped() || job.is_parameterized_parent() || !job.job["Periodic"].is_null() {
            return (placed, failed, queued);
        }
        let job_json = job.job.clone();
        for group in job_json["TaskGroups"].as_array().into_iter().flatten() {
            let tg = group["Name"].as_str().unwrap_or_default().to_string();
            let count = group["Count"].as_u64().unwrap_or(1);
            let existing = self
                .allocs
                .values()
                .filter(|a| a.job_id == job_id && a.task_group == tg)
                .count() as u64;
            let wanted = gpus_wanted(group);
            let mut failures = 0;
            let mut reason = None;
            for i in existing..count {
                match self.place_one(&job_json, group, &tg, i, wanted, eval_id, index) {
                    Ok(id) => {
                        events.push(self.alloc_event("PlanResult", &id));
                        placed.push(id);
                    }
                    Err(why) => {
                        failures += 1;
                        reason.get_or_insert(why);
                    }
                }
            }
            if let Some(why) = reason {
                let mut m = match why {
                    Infeasible::NoNode => metrics(0, 0, 0, 0, None, None, None),
                    Infeasible::MissingDevices => {
                        metrics(1, 1, 1, 0, Some("missing devices"), None, None)
                    }
                    Infeasible::DevicesBusy => metrics(
                        1,
                        1,
                        0,
                        1,
                        None,
                        Some("devices: no devices match request"),
                        None,
                    ),
                };
                m["CoalescedFailures"] = json!(failures - 1);
                failed.insert(tg.clone(), m);
                queued.insert(tg, failures);
            }
        }
        (placed, failed, queued)
    }

    #[allow(clippy::too_many_arguments)]
    fn place_one(
        &mut self,
        job: &Value,
        group: &Value,
        tg: &str,
        i: u64,
        gpus: u64,
        eval_id: &str,
        index: u64,
    ) -> Result<String, Infeasible> {
        if !self.node.eligible || self.node.drain.is_some() {
            return Err(Infeasible::NoNode);
        }
        if (self.node.gpus.len() as u64) < gpus {
            return Err(Infeasible::MissingDevices);
        }
        let free: Vec<usize> = self
            .node
            .gpus
            .iter()
            .enumerate()
            .filter(|(_, g)| g.leased_by.is_none())
            .map(|(i, _)| i)
            .collect();
        if (free.len() as u64) < gpus {
            return Err(Infeasible::DevicesBusy);
        }
        let id = new_id();
        let mut leased = Vec::new();
        for &gi in free.iter().take(gpus as usize) {
            self.node.gpus[gi].leased_by = Some(id.clone());
            leased.push(self.node.gpus[gi].uuid.clone());
        }
        let tasks = group["Tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let name = t["Name"].as_str().unwrap_or_default().to_string();
                (
                    name,
                    TaskRec {
                        state: "pending",
                        failed: false,
                        started_at: 0,
                        finished_at: 0,
                        events: vec![],
                    },
                )
            })
            .collect();
        let now = now_ns();
        let (stop, _) = watch::channel(false);
        let job_id = job["ID"].as_str().unwrap_or_default().to_string();
        let alloc = AllocRec {
            id: id.clone(),
            eval_id: eval_id.to_string(),
            name: format!("{job_id}.{tg}[{i}]"),
            job_id,
            task_group: tg.to_string(),
            job: job.clone(),
            desired_status: "run".into(),
            desired_description: String::new(),
            client_status: "pending".into(),
            client_description: "No tasks have started".into(),
            tasks,
            gpus: leased,
            metrics: metrics(1, 1, 0, 0, None, None, Some(&self.node.id)),
            create_index: index,
            modify_index: index,
            alloc_modify_index: index,
            create_time: now,
            modify_time: now,
            pgids: BTreeMap::new(),
            stop,
        };
        self.allocs.insert(id.clone(), alloc);
        Ok(id)
    }

    /// Retries the blocked evaluations (a GPU freed, the node became
    /// eligible). Returns the allocations to start.
    pub fn unblock(&mut self, index: u64, events: &mut Vec<Value>) -> Vec<String> {
        let mut started = Vec::new();
        let blocked = std::mem::take(&mut self.blocked);
        for eval_id in blocked {
            let Some(job_id) = self.evals.get(&eval_id).map(|e| e.job_id.clone()) else {
                continue;
            };
            let (placed, failed, queued) = self.place(&job_id, &eval_id, index, events);
            started.extend(placed);
            let done = failed.is_empty();
            if let Some(e) = self.evals.get_mut(&eval_id) {
                e.modify_index = index;
                e.modify_time = now_ns();
                e.snapshot_index = index;
                if done {
                    e.status = "complete".into();
                    e.status_description = String::new();
                    e.failed_tg_allocs.clear();
                    e.queued = queued;
                } else {
                    e.failed_tg_allocs = failed;
                    e.queued = queued;
                }
            }
            if done {
                events.push(self.eval_event(&eval_id));
            } else {
                self.blocked.push(eval_id);
            }
        }
        started
    }

    /// Releases the GPUs of a terminal allocation.
    pub fn release(&mut self, alloc_id: &str) {
        for g in &mut self.node.gpus {
            if g.leased_by.as_deref() == Some(alloc_id) {
                g.leased_by = None;
            }
        }
    }

    /// Recomputes a job's Status from its allocations and blocked evaluations.
    pub fn refresh_job_status(&mut self, job_id: &str, index: u64) {
        let has_blocked = self.blocked.iter().any(|e| {
            self.evals
                .get(e)
                .map(|e| e.job_id == job_id)
                .unwrap_or(false)
        });
        let allocs: Vec<&AllocRec> = self
            .allocs
            .values()
            .filter(|a| a.job_id == job_id)
            .collect();
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        let status = if job.is_parameterized_parent() || !job.job["Periodic"].is_null() {
            if job.stopped() {
                "dead"
            } else {
                "running"
            }
        } else if allocs.iter().any(|a| a.client_status == "running") {
            "running"
        } else if allocs.iter().any(|a| !a.is_terminal())
            || (has_blocked || allocs.is_empty()) && !job.stopped()
        {
            "pending"
        } else {
            "dead"
        };
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.job["Status"] != json!(status) {
            job.job["Status"] = json!(status);
            job.job["ModifyIndex"] = json!(index);
        }
    }

    /// Stops a job: its allocations are told to stop, blocked evaluations are
    /// cancelled. Returns the evaluation id.
    pub fn stop_job(&mut self, job_id: &str, index: u64, events: &mut Vec<Value>) -> String {
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.job["Stop"] = json!(true);
            job.job["JobModifyIndex"] = json!(index);
            job.job["ModifyIndex"] = json!(index);
            let v = job.job["Version"].as_u64().unwrap_or(0);
            job.job["Version"] = json!(v + 1);
        }
        events.push(self.job_event("JobDeregistered", job_id));
        let blocked: Vec<String> = self
            .blocked
            .iter()
            .filter(|e| {
                self.evals
                    .get(*e)
                    .map(|e| e.job_id == job_id)
                    .unwrap_or(false)
            })
            .cloned()
            .collect();
        self.blocked.retain(|e| !blocked.contains(e));
        for id in &blocked {
            if let Some(e) = self.evals.get_mut(id) {
                e.status = "cancelled".into();
                e.status_description = "evaluation for job is stopped".into();
                e.modify_index = index;
                e.modify_time = now_ns();
            }
            events.push(self.eval_event(id));
        }
        let (eval_id, _) = self.evaluate(job_id, "job-deregister", index, events);
        let to_stop: Vec<String> = self
            .allocs
            .values()
            .filter(|a| a.job_id == job_id && !a.is_terminal())
            .map(|a| a.id.clone())
            .collect();
        for id in to_stop {
            self.stop_alloc(&id, "alloc not needed as job is stopped", index, events);
        }
        self.refresh_job_status(job_id, index);
        eval_id
    }

    /// Tells an allocation to stop.
    pub fn stop_alloc(&mut self, alloc_id: &str, why: &str, index: u64, events: &mut Vec<Value>) {
        if let Some(a) = self.allocs.get_mut(alloc_id) {
            a.desired_status = "stop".into();
            a.desired_description = why.into();
            a.modify_index = index;
            a.alloc_modify_index = index;
            a.modify_time = now_ns();
            // The allocation's runner sees this and kills its tasks.
            a.stop.send_replace(true);
            events.push(self.alloc_event("PlanResult", alloc_id));
        }
    }

    // -----------------------------------------------------------------------
    // Rendering
    // -----------------------------------------------------------------------

    pub fn task_states_json(a: &AllocRec) -> Value {
        let states: serde_json::Map<String, Value> = a
            .tasks
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    json!({
                        "State": t.state,
                        "Failed": t.failed,
                        "Restarts": 0,
                        "LastRestart": rfc3339(0),
                        "StartedAt": rfc3339(t.started_at),
                        "FinishedAt": rfc3339(t.finished_at),
                        "Events": t.events,
                        "TaskHandle": null,
                    }),
                )
            })
            .collect();
        Value::Object(states)
    }

    /// The allocation as `GET /v1/allocation/:id` shows it; `with_job` false
    /// gives the event-stream form (`Job` null).
    pub fn alloc_json(&self, a: &AllocRec, with_job: bool) -> Value {
        let mut task_resources = serde_json::Map::new();
        let mut allocated_tasks = serde_json::Map::new();
        let mut lifecycles = serde_json::Map::new();
        let (mut cpu, mut mem) = (0, 0);
        let group = a.job["TaskGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["Name"] == json!(a.task_group))
            .cloned()
            .unwrap_or(Value::Null);
        let mut gpus = a.gpus.iter();
        for t in group["Tasks"].as_array().into_iter().flatten() {
            let name = t["Name"].as_str().unwrap_or_default().to_string();
            let tcpu = t["Resources"]["CPU"].as_i64().unwrap_or(100);
            let tmem = t["Resources"]["MemoryMB"].as_i64().unwrap_or(300);
            cpu += tcpu;
            mem += tmem;
            let want = gpus_wanted(&json!({ "Tasks": [t] })) as usize;
            let ids: Vec<String> = gpus.by_ref().take(want).cloned().collect();
            let devices = if ids.is_empty() {
                Value::Null
            } else {
                json!([{ "Vendor": "nvidia", "Type": "gpu", "Name": super::GPU_MODEL, "DeviceIDs": ids }])
            };
            task_resources.insert(
                name.clone(),
                json!({ "CPU": tcpu, "MemoryMB": tmem, "DiskMB": 0, "IOPS": 0, "Networks": null }),
            );
            allocated_tasks.insert(
                name.clone(),
                json!({ "Cpu": { "CpuShares": tcpu, "ReservedCores": null }, "Memory": { "MemoryMB": tmem, "MemoryMaxMB": 0 }, "Networks": null, "Devices": devices }),
            );
            lifecycles.insert(name, Value::Null);
        }
        let disk = group["EphemeralDisk"]["SizeMB"].as_i64().unwrap_or(300);
        json!({
            "ID": a.id,
            "Namespace": "default",
            "EvalID": a.eval_id,
            "Name": a.name,
            "NodeID": self.node.id,
            "NodeName": self.node.name,
            "JobID": a.job_id,
            "Job": if with_job { a.job.clone() } else { Value::Null },
            "TaskGroup": a.task_group,
            "Resources": { "CPU": cpu, "MemoryMB": mem, "DiskMB": disk, "IOPS": 0, "Networks": null },
            "SharedResources": { "CPU": 0, "MemoryMB": 0, "DiskMB": disk, "Networks": null },
            "TaskResources": task_resources,
            "AllocatedResources": {
                "Tasks": allocated_tasks,
                "TaskLifecycles": lifecycles,
                "Shared": { "DiskMB": disk, "Networks": null, "Ports": null },
            },
            "Metrics": a.metrics,
            "DesiredStatus": a.desired_status,
            "DesiredDescription": a.desired_description,
            "DesiredTransition": { "Migrate": null, "Reschedule": null, "ForceReschedule": null, "NoShutdownDelay": null },
            "ClientStatus": a.client_status,
            "ClientDescription": a.client_description,
            "TaskStates": Self::task_states_json(a),
            "AllocStates": null,
            "PreviousAllocation": "",
            "NextAllocation": "",
            "DeploymentID": "",
            "DeploymentStatus": null,
            "RescheduleTracker": null,
            "NetworkStatus": null,
            "FollowupEvalID": "",
            "PreemptedAllocations": null,
            "PreemptedByAllocation": "",
            "CreateIndex": a.create_index,
            "ModifyIndex": a.modify_index,
            "AllocModifyIndex": a.alloc_modify_index,
            "CreateTime": a.create_time,
            "ModifyTime": a.modify_time,
        })
    }

    /// The allocation as allocation lists show it.
    pub fn alloc_stub_json(&self, a: &AllocRec) -> Value {
        json!({
            "ID": a.id,
            "EvalID": a.eval_id,
            "Name": a.name,
            "Namespace": "default",
            "NodeID": self.node.id,
            "NodeName": self.node.name,
            "JobID": a.job_id,
            "JobType": a.job["Type"],
            "JobVersion": a.job["Version"],
            "TaskGroup": a.task_group,
            "DesiredStatus": a.desired_status,
            "DesiredDescription": a.desired_description,
            "DesiredTransition": { "Migrate": null, "Reschedule": null, "ForceReschedule": null, "NoShutdownDelay": null },
            "ClientStatus": a.client_status,
            "ClientDescription": a.client_description,
            "TaskStates": Self::task_states_json(a),
            "DeploymentStatus": null,
            "FollowupEvalID": "",
            "NextAllocation": "",
            "PreviousAllocation": "",
            "RescheduleTracker": null,
            "PreemptedAllocations": null,
            "PreemptedByAllocation": "",
            "CreateIndex": a.create_index,
            "ModifyIndex": a.modify_index,
            "CreateTime": a.create_time,
            "ModifyTime": a.modify_time,
        })
    }

    fn eval_stub_json(e: &EvalRec) -> Value {
        json!({
            "ID": e.id,
            "Priority": e.priority,
            "Type": e.job_type,
            "TriggeredBy": e.triggered_by,
            "Namespace": "default",
            "JobID": e.job_id,
            "NodeID": "",
            "DeploymentID": "",
            "Status": e.status,
            "StatusDescription": e.status_description,
            "WaitUntil": null,
            "NextEval": "",
            "PreviousEval": e.previous_eval,
            "BlockedEval": e.blocked_eval,
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index,
            "CreateTime": e.create_time,
            "ModifyTime": e.modify_time,
        })
    }

    /// The evaluation as `GET /v1/evaluation/:id` shows it (with RelatedEvals).
    pub fn eval_json(&self, e: &EvalRec) -> Value {
        let related: Vec<Value> = self
            .evals
            .values()
            .filter(|o| {
                o.id != e.id
                    && (o.id == e.previous_eval
                        || o.id == e.blocked_eval
                        || o.previous_eval == e.id)
            })
            .map(Self::eval_stub_json)
            .collect();
        let failed = if e.failed_tg_allocs.is_empty() {
            Value::Null
        } else {
            json!(e.failed_tg_allocs)
        };
        json!({
            "ID": e.id,
            "Namespace": "default",
            "Priority": e.priority,
            "Type": e.job_type,
            "TriggeredBy": e.triggered_by,
            "JobID": e.job_id,
            "JobModifyIndex": self.jobs.get(&e.job_id).map(|j| j.job["JobModifyIndex"].clone()).unwrap_or(json!(0)),
            "NodeID": "",
            "NodeModifyIndex": 0,
            "DeploymentID": "",
            "Status": e.status,
            "StatusDescription": e.status_description,
            "Wait": 0,
            "WaitUntil": null,
            "NextEval": "",
            "PreviousEval": e.previous_eval,
            "BlockedEval": e.blocked_eval,
            "RelatedEvals": related,
            "FailedTGAllocs": failed,
            "ClassEligibility": null,
            "EscapedComputedClass": false,
            "QuotaLimitReached": "",
            "AnnotatePlan": false,
            "QueuedAllocations": e.queued,
            "LeaderACL": "",
            "SnapshotIndex": e.snapshot_index,
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index,
            "CreateTime": e.create_time,
            "ModifyTime": e.modify_time,
        })
    }

    pub fn job_summary_json(&self, job_id: &str) -> Option<Value> {
        let job = self.jobs.get(job_id)?;
        let mut summary = serde_json::Map::new();
        for g in job.job["TaskGroups"].as_array().into_iter().flatten() {
            let tg = g["Name"].as_str().unwrap_or_default();
            let count = |status: &str| {
                self.allocs
                    .values()
                    .filter(|a| {
                        a.job_id == job_id && a.task_group == tg && a.client_status == status
                    })
                    .count()
            };
            let queued: u64 = self
                .blocked
                .iter()
                .filter_map(|e| self.evals.get(e))
                .filter(|e| e.job_id == job_id)
                .map(|e| e.queued.get(tg).copied().unwrap_or(0))
                .sum();
            summary.insert(
                tg.to_string(),
                json!({
                    "Queued": queued,
                    "Complete": count("complete"),
                    "Failed": count("failed"),
                    "Running": count("running"),
                    "Starting": count("pending"),
                    "Lost": count("lost"),
                    "Unknown": count("unknown"),
                }),
            );
        }
        let children = if job.is_parameterized_parent() || !job.job["Periodic"].is_null() {
            let kids = self.jobs.values().filter(|j| j.str("ParentID") == job_id);
            let (mut p, mut r, mut d) = (0, 0, 0);
            for k in kids {
                match k.str("Status") {
                    "running" => r += 1,
                    "dead" => d += 1,
                    _ => p += 1,
                }
            }
            json!({ "Pending": p, "Running": r, "Dead": d })
        } else {
            Value::Null
        };
        Some(json!({
            "JobID": job_id,
            "Namespace": "default",
            "Summary": summary,
            "Children": children,
            "CreateIndex": job.job["CreateIndex"],
            "ModifyIndex": self.index,
        }))
    }

    pub fn job_stub_json(&self, job: &JobRec) -> Value {
        let j = &job.job;
        json!({
            "ID": j["ID"],
            "ParentID": j["ParentID"],
            "Name": j["Name"],
            "Namespace": j["Namespace"],
            "Datacenters": j["Datacenters"],
            "NodePool": j["NodePool"],
            "Multiregion": j["Multiregion"],
            "Type": j["Type"],
            "Priority": j["Priority"],
            "Periodic": !j["Periodic"].is_null(),
            "ParameterizedJob": !j["ParameterizedJob"].is_null(),
            "Stop": j["Stop"],
            "Status": j["Status"],
            "StatusDescription": j["StatusDescription"],
            "JobSummary": self.job_summary_json(j["ID"].as_str().unwrap_or_default()),
            "CreateIndex": j["CreateIndex"],
            "ModifyIndex": j["ModifyIndex"],
            "JobModifyIndex": j["JobModifyIndex"],
            "SubmitTime": j["SubmitTime"],
        })
    }

    fn gpu_devices_json(&self) -> Value {
        if self.node.gpus.is_empty() {
            return Value::Null;
        }
        let instances: Vec<Value> = self
            .node
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| json!({ "ID": g.uuid, "Healthy": true, "HealthDescription": "", "Locality": { "PciBusID": format!("00000000:{:02X}:00.0", i + 1) } }))
            .collect();
        json!([{
            "Vendor": "nvidia",
            "Type": "gpu",
            "Name": super::GPU_MODEL,
            "Attributes": {
                "bar1": { "Int": 131_072, "Unit": "MiB" },
                "cores_clock": { "Int": 1980, "Unit": "MHz" },
                "display_state": { "String": "Disabled" },
                "driver_version": { "String": "550.00 (stand-in)" },
                "memory": { "Int": 81_559, "Unit": "MiB" },
                "power": { "Int": 700, "Unit": "W" },
            },
            "Instances": instances,
        }])
    }

    fn drivers_json() -> Value {
        let healthy = |attrs: Value| json!({ "Attributes": attrs, "Detected": true, "Healthy": true, "HealthDescription": "Healthy", "UpdateTime": rfc3339(now_ns()) });
        json!({
            "raw_exec": healthy(json!({ "driver.raw_exec": "true" })),
            "exec": healthy(json!({ "driver.exec": "true" })),
        })
    }

    fn node_attributes(&self) -> Value {
        let host = hostname();
        json!({
            "cpu.arch": std::env::consts::ARCH,
            "cpu.numcores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string(),
            "driver.raw_exec": "1",
            "driver.exec": "1",
            "kernel.name": std::env::consts::OS,
            "nomad.version": "1.9.0-standin",
            "os.name": std::env::consts::OS,
            "unique.hostname": host,
            "unique.network.ip-address": "127.0.0.1",
            "unique.advertise.address": self.node.http_addr,
        })
    }

    /// The node as `GET /v1/node/:id` shows it.
    pub fn node_json(&self) -> Value {
        let n = &self.node;
        json!({
            "ID": n.id,
            "SecretID": "",
            "Datacenter": DATACENTER,
            "Name": n.name,
            "HTTPAddr": n.http_addr,
            "TLSEnabled": false,
            "Attributes": self.node_attributes(),
            "NodeResources": {
                "Cpu": { "CpuShares": 4000 },
                "Memory": { "MemoryMB": 16_000 },
                "Disk": { "DiskMB": 100_000 },
                "Networks": [],
                "NodeNetworks": [],
                "Devices": self.gpu_devices_json(),
            },
            "ReservedResources": {
                "Cpu": { "CpuShares": 0 },
                "Memory": { "MemoryMB": 0 },
                "Disk": { "DiskMB": 0 },
                "Networks": { "ReservedHostPorts": "" },
            },
            "Links": {},
            "Meta": { "connect.log_level": "info" },
            "NodeClass": "",
            "NodePool": "default",
            "ComputedClass": "v1:0000000000000000000",
            "Drain": n.drain.is_some(),
            "DrainStrategy": n.drain.clone().unwrap_or(Value::Null),
            "LastDrain": n.last_drain,
            "SchedulingEligibility": if n.eligible { "eligible" } else { "ineligible" },
            "Status": "ready",
            "StatusDescription": "",
            "StatusUpdatedAt": now_secs(),
            "Events": n.events,
            "Drivers": Self::drivers_json(),
            "HostVolumes": {},
            "HostNetworks": {},
            "CSIControllerPlugins": null,
            "CSINodePlugins": null,
            "CreateIndex": n.create_index,
            "ModifyIndex": n.modify_index,
        })
    }

    /// The node as `GET /v1/nodes` lists it.
    pub fn node_stub_json(&self) -> Value {
        let n = &self.node;
        json!({
            "Address": "127.0.0.1",
            "ID": n.id,
            "Attributes": null,
            "Datacenter": DATACENTER,
            "Name": n.name,
            "NodeClass": "",
            "NodePool": "default",
            "Version": "1.9.0-standin",
            "Drain": n.drain.is_some(),
            "SchedulingEligibility": if n.eligible { "eligible" } else { "ineligible" },
            "Status": "ready",
            "StatusDescription": "",
            "Drivers": Self::drivers_json(),
            "HostVolumes": null,
            "NodeResources": null,
            "ReservedResources": null,
            "LastDrain": n.last_drain,
            "CreateIndex": n.create_index,
            "ModifyIndex": n.modify_index,
        })
    }

    /// Allocations of the node that are not terminal.
    pub fn live_allocs(&self) -> BTreeSet<String> {
        self.allocs
            .values()
            .filter(|a| !a.is_terminal())
            .map(|a| a.id.clone())
            .collect()
    }

    /// A node event as `Events` of a node shows it.
    pub fn push_node_event(&mut self, subsystem: &str, message: &str, index: u64) {
        self.node.events.push(json!({
            "Message": message,
            "Subsystem": subsystem,
            "Details": null,
            "Timestamp": rfc3339(now_ns()),
            "CreateIndex": index,
        }));
    }
}

/// This machine's host name (the node name of a `nomad agent -dev`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nomad-standin".into())
}
