//! Runs the stand-in's allocations as local processes, the way Nomad's
//! `raw_exec` driver would, so that gpu-task (or any test program) sees what it
//! would see on a real Nomad client.
//!
//! Per task: a real alloc dir under the data dir (`alloc/`, `<task>/local`,
//! `<task>/secrets`, `<task>/tmp`, logs in `alloc/logs/<task>.stdout.0`), the
//! payload in `local/<DispatchPayload.File>` (none when empty), the stand-in's
//! own environment (raw_exec inherits the agent's) plus the task's `Env`,
//! `NOMAD_META_*` (original and upper-cased keys, cleaned), the `NOMAD_*`
//! runtime variables and `NVIDIA_VISIBLE_DEVICES` with the leased fake GPU
//! UUIDs. `${…}` runtime interpolations in command, args and env are
//! replaced. Each task runs in its own process group; a stop sends SIGTERM to
//! the group and SIGKILL after the task's `KillTimeout`. Templates are not
//! rendered (the stand-in has no Consul or Nomad variables to render them
//! from), and failed tasks are not restarted.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::state::{task_event, AllocRec, State, TaskRec};
use super::util::{clean_env_key, now_ns};
use super::Shared;

/// What one task needs to run.
struct TaskSpec {
    name: String,
    driver: String,
    command: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    kill_timeout: Duration,
    payload_file: Option<String>,
    restart_policy: Value,
}

/// Everything a runner reads from the state once, at start.
struct AllocSpec {
    tasks: Vec<TaskSpec>,
    payload: Vec<u8>,
    alloc_dir: PathBuf,
    stop: watch::Receiver<bool>,
}

/// A Go duration string of nanoseconds, as Nomad prints them (`24h0m0s`).
fn go_duration_string(ns: i64) -> String {
    let total = ns / 1_000_000_000;
    if total == 0 {
        return format!("{}ms", ns / 1_000_000);
    }
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// Replaces `${name}` with `vars[name]`; unknown names stay as they are.
pub fn interpolate(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                let name = after[..end].trim();
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&rest[start..start + 2 + end + 1]),
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads what the runner of `alloc_id` needs.
fn alloc_spec(st: &State, a: &AllocRec, data_dir: &Path) -> AllocSpec {
    let job = &a.job;
    let group = job["TaskGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["Name"] == json!(a.task_group))
        .cloned()
        .unwrap_or(Value::Null);
    let payload = st
        .jobs
        .get(&a.job_id)
        .map(|j| j.payload.clone())
        .unwrap_or_default();
    let alloc_dir = data_dir.join("alloc").join(&a.id);

    // Meta: job, then group, then task; unsent meta_optional keys are "".
    let mut meta = BTreeMap::new();
    for k in job["ParameterizedJob"]["MetaOptional"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        meta.insert(k.to_string(), String::new());
    }
    meta.extend(string_map(&job["Meta"]));
    meta.extend(string_map(&group["Meta"]));

    let mut vars = BTreeMap::new();
    vars.insert("node.unique.id".to_string(), st.node.id.clone());
    vars.insert("node.unique.name".to_string(), st.node.name.clone());
    vars.insert(
        "node.datacenter".to_string(),
        super::state::DATACENTER.to_string(),
    );
    vars.insert("node.region".to_string(), "global".to_string());
    vars.insert("node.class".to_string(), String::new());
    vars.insert("node.pool".to_string(), "default".to_string());
    let node = st.node_json();
    for (k, v) in string_map(&node["Attributes"]) {
        vars.insert(format!("attr.{k}"), v);
    }
    for (k, v) in string_map(&node["Meta"]) {
        vars.insert(format!("meta.{k}"), v);
    }

    let mut gpus = a.gpus.iter();
    let mut tasks = Vec::new();
    for t in group["Tasks"].as_array().into_iter().flatten() {
        let name = t["Name"].as_str().unwrap_or_default().to_string();
        let task_dir = alloc_dir.join(&name);
        let mut env = BTreeMap::new();
        let mut task_meta = meta.clone();
        task_meta.extend(string_map(&t["Meta"]));
        for (k, v) in &task_meta {
            env.insert(format!("NOMAD_META_{}", clean_env_key(k)), v.clone());
            env.insert(
                format!("NOMAD_META_{}", clean_env_key(&k.to_uppercase())),
                v.clone(),
            );
        }
        let short = a.id.split('-').next().unwrap_or_default().to_string();
        let index = a
            .name
            .rsplit('[')
            .next()
            .unwrap_or("0]")
            .trim_end_matches(']')
            .to_string();
        for (k, v) in [
            ("NOMAD_ALLOC_ID", a.id.clone()),
            ("NOMAD_SHORT_ALLOC_ID", short),
            ("NOMAD_ALLOC_NAME", a.name.clone()),
            ("NOMAD_ALLOC_INDEX", index),
            ("NOMAD_GROUP_NAME", a.task_group.clone()),
            ("NOMAD_TASK_NAME", name.clone()),
            ("NOMAD_JOB_ID", a.job_id.clone()),
            (
                "NOMAD_JOB_NAME",
                job["Name"].as_str().unwrap_or_default().to_string(),
            ),
            (
                "NOMAD_JOB_PARENT_ID",
                job["ParentID"].as_str().unwrap_or_default().to_string(),
            ),
            ("NOMAD_NAMESPACE", "default".to_string()),
            ("NOMAD_REGION", "global".to_string()),
            ("NOMAD_DC", super::state::DATACENTER.to_string()),
            (
                "NOMAD_ALLOC_DIR",
                alloc_dir.join("alloc").display().to_string(),
            ),
            (
                "NOMAD_TASK_DIR",
                task_dir.join("local").display().to_string(),
            ),
            (
                "NOMAD_SECRETS_DIR",
                task_dir.join("secrets").display().to_string(),
            ),
            (
                "NOMAD_CPU_LIMIT",
                t["Resources"]["CPU"].as_i64().unwrap_or(100).to_string(),
            ),
            (
                "NOMAD_MEMORY_LIMIT",
                t["Resources"]["MemoryMB"]
                    .as_i64()
                    .unwrap_or(300)
                    .to_string(),
            ),
        ] {
            env.insert(k.to_string(), v);
        }
        let want = super::state::gpus_wanted(&json!({ "Tasks": [t] })) as usize;
        let leased: Vec<String> = gpus.by_ref().take(want).cloned().collect();
        if !leased.is_empty() {
            env.insert("NVIDIA_VISIBLE_DEVICES".to_string(), leased.join(","));
        }
        let mut all_vars = vars.clone();
        all_vars.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        for (k, v) in string_map(&t["Env"]) {
            env.insert(k, interpolate(&v, &all_vars));
        }
        let command = interpolate(
            t["Config"]["command"].as_str().unwrap_or_default(),
            &all_vars,
        );
        let args = t["Config"]["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                interpolate(
                    a.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| a.to_string())
                        .as_str(),
                    &all_vars,
                )
            })
            .collect();
        tasks.push(TaskSpec {
            name,
            driver: t["Driver"].as_str().unwrap_or_default().to_string(),
            command,
            args,
            env,
            kill_timeout: Duration::from_nanos(t["KillTimeout"].as_u64().unwrap_or(5_000_000_000)),
            payload_file: t["DispatchPayload"]["File"]
                .as_str()
                .filter(|f| !f.is_empty())
                .map(str::to_string),
            restart_policy: t["RestartPolicy"].clone(),
        });
    }
    AllocSpec {
        tasks,
        payload,
        alloc_dir,
        stop: a.stop.subscribe(),
    }
}

/// Nomad's rule: failed if any task failed, else running if any runs, else
/// pending if any waits, else complete.
fn recompute(a: &mut AllocRec) {
    let (status, desc) = if a.tasks.values().any(|t| t.state == "dead" && t.failed) {
        ("failed", "Failed tasks")
    } else if a.tasks.values().any(|t| t.state == "running") {
        ("running", "Tasks are running")
    } else if a.tasks.values().any(|t| t.state == "pending") {
        ("pending", "No tasks have started")
    } else {
        ("complete", "All tasks have completed")
    };
    // A failed task stays failed even if a sibling is still being killed.
    a.client_status = status.into();
    a.client_description = desc.into();
}

/// Applies `f` to one task of an allocation and publishes the change. When
/// the allocation became terminal, its GPUs are released and blocked
/// evaluations retried; the allocations so placed are started.
fn update_task(shared: &Arc<Shared>, alloc_id: &str, task: &str, f: impl FnOnce(&mut TaskRec)) {
    let started = shared.change(|st, idx, events| {
        let Some(a) = st.allocs.get_mut(alloc_id) else {
            return vec![];
        };
        let all_dead = |a: &AllocRec| a.tasks.values().all(|t| t.state == "dead");
        let was_done = all_dead(a);
        if let Some(t) = a.tasks.get_mut(task) {
            f(t);
            // Like Nomad: when a task fails, its siblings are killed.
            if t.state == "dead" && t.failed {
                a.stop.send_replace(true);
            }
        }
        a.modify_index = idx;
        a.modify_time = now_ns();
        recompute(a);
        let now_done = all_dead(a);
        let job_id = a.job_id.clone();
        events.push(st.alloc_event("AllocationUpdated", alloc_id));
        let mut started = vec![];
        if now_done && !was_done {
            st.release(alloc_id);
            started = st.unblock(idx, events);
        }
        st.refresh_job_status(&job_id, idx);
        for id in &started {
            let jid = st
                .allocs
                .get(id)
                .map(|a| a.job_id.clone())
                .unwrap_or_default();
            st.refresh_job_status(&jid, idx);
        }
        started
    });
    shared.start_allocs(started);
}

fn push_event(t: &mut TaskRec, ev: Value) {
    if ev["FailsTask"] == json!(true) {
        t.failed = true;
    }
    t.events.push(ev);
}

/// Runs one allocation to its end.
pub(crate) async fn run_alloc(shared: Arc<Shared>, alloc_id: String) {
    let spec = {
        let st = shared.lock();
        let Some(a) = st.allocs.get(&alloc_id) else {
            return;
        };
        alloc_spec(&st, a, &shared.data_dir)
    };
    for t in &spec.tasks {
        update_task(&shared, &alloc_id, &t.name, |ts| {
            push_event(
                ts,
                task_event("Received", "Task received by client", json!({})),
            )
        });
    }
    let runs = spec
        .tasks
        .iter()
        .map(|t| run_task(&shared, &alloc_id, t, &spec));
    futures_util::future::join_all(runs).await;
}

/// Makes the alloc and task dirs and writes the payload.
fn setup_dirs(spec: &AllocSpec, task: &TaskSpec) -> std::io::Result<PathBuf> {
    let shared_dir = spec.alloc_dir.join("alloc");
    for d in ["logs", "data", "tmp"] {
        std::fs::create_dir_all(shared_dir.join(d))?;
    }
    let task_dir = spec.alloc_dir.join(&task.name);
    for d in ["local", "secrets", "tmp"] {
        std::fs::create_dir_all(task_dir.join(d))?;
    }
    if let Some(file) = &task.payload_file {
        if !spec.payload.is_empty() {
            let path = task_dir.join("local").join(file);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, &spec.payload)?;
        }
    }
    Ok(task_dir)
}

fn signal_group(pgid: i32, sig: Signal) {
    // ESRCH (group already gone) is the normal case after an exit.
    let _ = killpg(Pid::from_raw(pgid), sig);
}

async fn run_task(shared: &Arc<Shared>, alloc_id: &str, task: &TaskSpec, spec: &AllocSpec) {
    let mut stop = spec.stop.clone();
    let name = task.name.as_str();
    let dead = |failed: bool| {
        move |t: &mut TaskRec| {
            t.state = "dead";
            t.failed |= failed;
            t.finished_at = now_ns();
        }
    };
    if *stop.borrow() {
        update_task(shared, alloc_id, name, dead(false));
        return;
    }
    update_task(shared, alloc_id, name, |t| {
        push_event(
            t,
            task_event(
                "Task Setup",
                "Building Task Directory",
                json!({ "Message": "Building Task Directory", "Details": { "message": "Building Task Directory" } }),
            ),
        )
    });
    let task_dir = match setup_dirs(spec, task) {
        Ok(d) => d,
        Err(e) => {
            let msg = format!("failed to build task directory: {e}");
            update_task(shared, alloc_id, name, |t| {
                push_event(
                    t,
                    task_event(
                        "Setup Failure",
                        &msg,
                        json!({ "SetupError": msg, "FailsTask": true, "Details": { "setup_error": msg, "fails_task": "true" } }),
                    ),
                );
                dead(true)(t);
            });
            return;
        }
    };
    let fail_start = |msg: String| {
        move |t: &mut TaskRec| {
            push_event(
                t,
                task_event(
                    "Driver Failure",
                    &msg,
                    json!({ "DriverError": msg, "Details": { "driver_error": msg } }),
                ),
            );
            let reason = "Error was unrecoverable";
            push_event(
                t,
                task_event(
                    "Not Restarting",
                    reason,
                    json!({ "RestartReason": reason, "FailsTask": true, "Details": { "restart_reason": reason, "fails_task": "true" } }),
                ),
            );
            t.state = "dead";
            t.failed = true;
            t.finished_at = now_ns();
        }
    };
    if !matches!(task.driver.as_str(), "raw_exec" | "exec") {
        let msg = format!(
            "the Nomad stand-in runs only raw_exec and exec tasks, not {:?}",
            task.driver
        );
        update_task(shared, alloc_id, name, fail_start(msg));
        return;
    }
    let logs = spec.alloc_dir.join("alloc").join("logs");
    let open_log = |kind: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{name}.{kind}.0")))
    };
    let (stdout, stderr) = match (open_log("stdout"), open_log("stderr")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            update_task(
                shared,
                alloc_id,
                name,
                fail_start(format!("failed to open log files: {e}")),
            );
            return;
        }
    };
    // raw_exec resolves a relative command against the task dir first.
    let command = if !task.command.contains('/')
        || Path::new(&task.command).is_absolute()
        || !task_dir.join(&task.command).exists()
    {
        PathBuf::from(&task.command)
    } else {
        task_dir.join(&task.command)
    };
    let mut cmd = tokio::process::Command::new(&command);
    cmd.args(&task.args)
        .envs(&task.env)
        .current_dir(&task_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("failed to launch command with executor: rpc error: code = Unknown desc = exec: {:?}: {e}", task.command);
            update_task(shared, alloc_id, name, fail_start(msg));
            return;
        }
    };
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    {
        let mut st = shared.lock();
        if let Some(a) = st.allocs.get_mut(alloc_id) {
            a.pgids.insert(name.to_string(), pgid);
        }
    }
    tracing::debug!(alloc = alloc_id, task = name, pid = pgid, command = %command.display(), "task started");
    update_task(shared, alloc_id, name, |t| {
        push_event(
            t,
            task_event("Started", "Task started by client", json!({})),
        );
        t.state = "running";
        t.started_at = now_ns();
    });

    let mut killed = false;
    let status = tokio::select! {
        s = child.wait() => s,
        _ = super::flagged(&mut stop) => {
            killed = true;
            let kt = task.kill_timeout;
            let msg = format!("Sent interrupt. Waiting {} before force killing", go_duration_string(kt.as_nanos() as i64));
            update_task(shared, alloc_id, name, |t| {
                push_event(t, task_event("Killing", &msg, json!({ "KillTimeout": kt.as_nanos() as i64, "Details": { "kill_timeout": go_duration_string(kt.as_nanos() as i64) } })));
            });
            signal_group(pgid, Signal::SIGTERM);
            match tokio::time::timeout(kt, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // Like the executor destroying the task's cgroup: nothing it started survives.
    signal_group(pgid, Signal::SIGKILL);
    {
        let mut st = shared.lock();
        if let Some(a) = st.allocs.get_mut(alloc_id) {
            a.pgids.remove(name);
        }
    }
    let (code, signal) = match &status {
        // Like Nomad's executor: a signalled process exits with 128 + signal.
        Ok(s) => match s.signal() {
            Some(sig) => (128 + sig as i64, sig as i64),
            None => (s.code().unwrap_or(0) as i64, 0),
        },
        Err(_) => (-1, 0),
    };
    tracing::debug!(
        alloc = alloc_id,
        task = name,
        code,
        signal,
        killed,
        "task exited"
    );
    let mut display = format!("Exit Code: {code}");
    if signal != 0 {
        display.push_str(&format!(", Signal: {signal}"));
    }
    let failed = !killed && code != 0;
    let policy = task.restart_policy.clone();
    update_task(shared, alloc_id, name, move |t| {
        push_event(
            t,
            task_event(
                "Terminated",
                &display,
                json!({ "ExitCode": code, "Signal": signal, "Details": { "exit_code": code.to_string(), "signal": signal.to_string(), "oom_killed": "false" } }),
            ),
        );
        if killed {
            push_event(
                t,
                task_event("Killed", "Task successfully killed", json!({})),
            );
        } else if failed {
            let reason = format!(
                "Exceeded allowed attempts {} in interval {} and mode is \"{}\"",
                policy["Attempts"].as_i64().unwrap_or(0),
                go_duration_string(policy["Interval"].as_i64().unwrap_or(86_400_000_000_000)),
                policy["Mode"].as_str().unwrap_or("fail"),
            );
            push_event(
                t,
                task_event(
                    "Not Restarting",
                    &reason,
                    json!({ "RestartReason": reason, "FailsTask": true, "Details": { "restart_reason": reason, "fails_task": "true" } }),
                ),
            );
        }
        t.state = "dead";
        t.failed |= failed;
        t.finished_at = now_ns();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_known_names_only() {
        let vars: BTreeMap<String, String> = [
            ("NOMAD_TASK_DIR".to_string(), "/t".to_string()),
            ("node.unique.name".to_string(), "n1".to_string()),
        ]
        .into();
        assert_eq!(
            interpolate("${NOMAD_TASK_DIR}/x-${node.unique.name}", &vars),
            "/t/x-n1"
        );
        assert_eq!(
            interpolate("${unknown} $HOME ${", &vars),
            "${unknown} $HOME ${"
        );
    }

    #[test]
    fn prints_go_durations() {
        assert_eq!(go_duration_string(86_400_000_000_000), "24h0m0s");
        assert_eq!(go_duration_string(30_000_000_000), "30s");
        assert_eq!(go_duration_string(90_000_000_000), "1m30s");
    }
}
