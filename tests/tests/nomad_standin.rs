//! The Nomad stand-in checked against `shared/nomad-api` (shapes of its
//! answers, error texts, the payload limit, idempotent dispatch, GPU leases
//! that block placement), and the dispatcher's Nomad client and executor
//! checked against the stand-in.
//!
//! Tests that do not need fake GPUs also run against a real `nomad agent -dev`
//! when `nomad` is on PATH; otherwise they print a note and skip that variant.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use comfy_multi_tests::nomad::dev_agent::DevAgent;
use comfy_multi_tests::nomad::{NomadStandin, StandinOptions, StandinSettings};
use dispatcher::contract;
use dispatcher::executor::nomad::NomadExecutor;
use dispatcher::executor::{Executor, ExecutorError, Outcome};
use dispatcher::nomad::{AllocationStub, NomadClient, NomadError, TerminalStatus};
use dispatcher::{Job, JobState};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// How long any one condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(60);

fn sample(name: &str) -> Value {
    let path = format!(
        "{}/fixtures/nomad-api/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn sample_lines(name: &str) -> Vec<Value> {
    let path = format!(
        "{}/fixtures/nomad-api/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------
// Shape comparison: every key of the sample is in the answer, with the same
// JSON type (null matches anything: the samples and Nomad leave many unset).
// ---------------------------------------------------------------------------

/// Objects keyed by names (not by field names): compare their values' shapes.
const MAPS: [&str; 20] = [
    "Config",
    "Meta",
    "Env",
    "TaskStates",
    "TaskResources",
    "NodesAvailable",
    "Scores",
    "Attributes",
    "Drivers",
    "HostVolumes",
    "HostNetworks",
    "Links",
    "Summary",
    "Details",
    "FailedTGAllocs",
    "ConstraintFiltered",
    "DimensionExhausted",
    "GetterOptions",
    "QueuedAllocations",
    "ClassEligibility",
];

/// Objects whose values differ in type by design (a task's driver config).
const FREE_FORM: [&str; 2] = ["Config", "Details"];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn shape(sample: &Value, actual: &Value, path: &str, errs: &mut Vec<String>) {
    match (sample, actual) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(s), Value::Object(a)) => {
            let last = path.rsplit(['.', ']']).next().unwrap_or_default();
            // Device attributes are typed unions ({Int,Unit}, {String}, ...).
            if FREE_FORM.contains(&last) || path.ends_with("Devices[].Attributes") {
                return;
            }
            if MAPS.contains(&last) {
                if let (Some(sv), Some(av)) = (s.values().next(), a.values().next()) {
                    shape(sv, av, &format!("{path}.*"), errs);
                }
                return;
            }
            for (k, sv) in s {
                match a.get(k) {
                    None => errs.push(format!("{path}.{k} is missing")),
                    Some(av) => shape(sv, av, &format!("{path}.{k}"), errs),
                }
            }
        }
        (Value::Array(s), Value::Array(a)) => {
            if let Some(av) = a.first() {
                for sv in s {
                    shape(sv, av, &format!("{path}[]"), errs);
                }
            }
        }
        (s, a) if kind(s) == kind(a) => {}
        (s, a) => errs.push(format!(
            "{path}: the sample has {}, the stand-in {}",
            kind(s),
            kind(a)
        )),
    }
}

fn assert_shape(sample_name: &str, sample: &Value, actual: &Value) {
    let mut errs = Vec::new();
    shape(sample, actual, "", &mut errs);
    assert!(
        errs.is_empty(),
        "{sample_name}: the stand-in's answer differs:\n{}\nanswer: {actual:#}",
        errs.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Targets: the stand-in, and a real dev agent when there is one.
// ---------------------------------------------------------------------------

struct Target {
    name: &'static str,
    url: String,
    client: NomadClient,
    standin: Option<NomadStandin>,
    /// Where the target makes allocation dirs (`<alloc_root>/<alloc id>/`).
    alloc_root: std::path::PathBuf,
    _agent: Option<DevAgent>,
    _dir: tempfile::TempDir,
}

impl Target {
    fn standin(&self) -> &NomadStandin {
        self.standin
            .as_ref()
            .expect("only the stand-in variant has this")
    }
}

async fn standin_target(gpus: usize, heartbeat: Duration) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let settings = StandinSettings {
        heartbeat,
        ..Default::default()
    };
    let standin = NomadStandin::start_with(
        StandinOptions {
            gpus,
            data_dir: dir.path().join("nomad"),
        },
        settings,
    )
    .await
    .unwrap();
    let client = NomadClient::new(&standin.url, None).unwrap();
    Target {
        name: "stand-in",
        url: standin.url.clone(),
        client,
        alloc_root: standin.data_dir().join("alloc"),
        standin: Some(standin),
        _agent: None,
        _dir: dir,
    }
}

/// The stand-in (1 GPU) and, when `nomad` is on PATH, a real dev agent.
async fn targets(what: &str) -> Vec<Target> {
    let mut out = vec![standin_target(1, Duration::from_secs(1)).await];
    if let Some(agent) = DevAgent::start_if_available(what).await {
        let agent = agent.expect("nomad agent -dev should start");
        let client = NomadClient::new(&agent.url, None).unwrap();
        out.push(Target {
            name: "nomad -dev",
            url: agent.url.clone(),
            client,
            standin: None,
            alloc_root: agent.data_dir().join("alloc"),
            _agent: Some(agent),
            _dir: tempfile::tempdir().unwrap(),
        });
    }
    out
}

/// A shell script for the probe job: records its environment, runs the
/// `script` meta when given, then acts on the payload (absent → exit 7,
/// `"fail"` → exit 4, `"sleep"` → sleep until stopped).
const PROBE_SCRIPT: &str = r#"d="$NOMAD_ALLOC_DIR"
env > "$d/env.tmp" && mv "$d/env.tmp" "$d/env.txt"
echo "$NVIDIA_VISIBLE_DEVICES" > "$d/gpus.tmp" && mv "$d/gpus.tmp" "$d/gpus.txt"
if [ -n "$NOMAD_META_script" ]; then eval "$NOMAD_META_script"; fi
f="$NOMAD_TASK_DIR/workflow.json"
[ -f "$f" ] || exit 7
cp "$f" "$NOMAD_ALLOC_DIR/payload.copy"
grep -q '"fail"' "$f" && exit 4
grep -q '"sleep"' "$f" && exec sleep 60
exit 0"#;

/// A parameterized batch job with the contract's meta (plus `script`) whose
/// task runs [`PROBE_SCRIPT`] with raw_exec, asking for `gpus` GPUs.
fn probe_job(id: &str, gpus: u64) -> Value {
    let devices = if gpus == 0 {
        Value::Null
    } else {
        json!([{ "Name": "nvidia/gpu", "Count": gpus }])
    };
    json!({
        "ID": id,
        "Name": id,
        "Type": "batch",
        "Datacenters": ["*"],
        "ParameterizedJob": {
            "Payload": "optional",
            "MetaRequired": contract::META_REQUIRED,
            "MetaOptional": [contract::META_PRIORITY, "script"],
        },
        "TaskGroups": [{
            "Name": "workflow",
            "Count": 1,
            "RestartPolicy": { "Attempts": 0, "Mode": "fail", "Interval": 86_400_000_000_000_i64, "Delay": 15_000_000_000_i64 },
            "ReschedulePolicy": { "Attempts": 0, "Unlimited": false },
            "Tasks": [{
                "Name": contract::NOMAD_TASK,
                "Driver": "raw_exec",
                "Config": { "command": "/bin/sh", "args": ["-c", PROBE_SCRIPT] },
                "KillTimeout": 2_000_000_000_i64,
                "DispatchPayload": { "File": contract::PAYLOAD_FILE },
                "Resources": { "CPU": 100, "MemoryMB": 64, "Devices": devices },
            }],
        }],
    })
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut m: BTreeMap<String, String> = [("job_id", "j-1"), ("user_id", "7")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    m.extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    m
}

async fn register_probe(client: &NomadClient, id: &str, gpus: u64) {
    client
        .register_job(&probe_job(id, gpus))
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"));
}

/// Waits (blocking queries, with a deadline) until `pred` holds for the job's allocations.
async fn wait_allocs(
    client: &NomadClient,
    job: &str,
    what: &str,
    pred: impl Fn(&[AllocationStub]) -> bool,
) -> Vec<AllocationStub> {
    let end = Instant::now() + DEADLINE;
    let mut index = 0;
    loop {
        let remaining = end.saturating_duration_since(Instant::now());
        assert!(!remaining.is_zero(), "timed out waiting for {job}: {what}");
        let block = (index > 0).then(|| (index, remaining.min(Duration::from_secs(5))));
        let (allocs, idx) = client.job_allocations(job, block).await.unwrap();
        if pred(&allocs) {
            return allocs;
        }
        index = idx;
    }
}

async fn follow(client: &NomadClient, child: &str, index: u64) -> dispatcher::nomad::Terminal {
    tokio::time::timeout(DEADLINE, client.follow_to_end(child, index))
        .await
        .unwrap_or_else(|_| panic!("{child} did not end within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("following {child}: {e}"))
}

fn alloc_file(t: &Target, alloc_id: &str, name: &str) -> String {
    let path = t.alloc_root.join(alloc_id).join("alloc").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Waits (with a deadline) until the task of `alloc_id` has written `name`
/// into its alloc dir.
async fn wait_alloc_file(t: &Target, alloc_id: &str, name: &str) {
    let path = t.alloc_root.join(alloc_id).join("alloc").join(name);
    let end = Instant::now() + DEADLINE;
    while !path.exists() {
        assert!(Instant::now() < end, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn status_body(e: &NomadError) -> (u16, &str) {
    match e {
        NomadError::Status { status, body } => (*status, body.as_str()),
        other => panic!("expected a status error, got {other}"),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_have_the_shapes_of_the_samples() {
    let t = standin_target(1, Duration::from_millis(200)).await;
    let c = &t.client;
    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", t.url);
        async move {
            let r = http.get(&url).send().await.unwrap();
            assert!(r.status().is_success(), "GET {url}: {}", r.status());
            assert!(
                r.headers().contains_key("X-Nomad-Index"),
                "GET {url} has no X-Nomad-Index"
            );
            r.json::<Value>().await.unwrap()
        }
    };

    let parse_req = sample("job.parse.request.json");
    let parsed = http
        .post(format!("{}/v1/jobs/parse", t.url))
        .json(&parse_req)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_shape(
        "job.parse.response",
        &sample("job.parse.response.json"),
        &parsed,
    );

    let reg = http
        .post(format!("{}/v1/jobs", t.url))
        .json(&json!({ "Job": probe_job("shapes", 1) }))
        .send()
        .await
        .unwrap();
    assert!(reg.status().is_success());
    assert_shape(
        "job.register.response",
        &sample("job.register.response.json"),
        &reg.json().await.unwrap(),
    );
    assert_shape(
        "job.read.response",
        &sample("job.read.response.json"),
        &get("/v1/job/shapes".into()).await,
    );
    assert_shape(
        "jobs.list.response",
        &sample("jobs.list.response.json"),
        &get("/v1/jobs".into()).await,
    );

    let d = http
        .post(format!("{}/v1/job/shapes/dispatch", t.url))
        .json(&json!({ "Meta": meta(&[("script", "exec sleep 60")]), "Payload": "e30=" }))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_shape("dispatch.response", &sample("dispatch.response.json"), &d);
    let child = d["DispatchedJobID"].as_str().unwrap().to_string();
    assert!(child.starts_with("shapes/dispatch-"), "{child}");
    let enc = urlencoding::encode(&child).into_owned();
    assert_shape(
        "job.summary.response",
        &sample("job.summary.response.json"),
        &get("/v1/job/shapes/summary".into()).await,
    );

    let allocs = wait_allocs(c, &child, "running", |a| {
        a.iter().any(|a| a.client_status == "running")
    })
    .await;
    let list = get(format!("/v1/job/{enc}/allocations")).await;
    assert_shape(
        "job.allocations.response",
        &sample("job.allocations.response.json"),
        &list,
    );
    assert_shape(
        "allocations.list.response",
        &sample("allocations.list.response.json"),
        &get("/v1/allocations".into()).await,
    );
    // Nomad matches the decoded path, so an unencoded child id works too.
    assert_eq!(get(format!("/v1/job/{child}/allocations")).await, list);
    let alloc = get(format!("/v1/allocation/{}", allocs[0].id)).await;
    assert_shape(
        "allocation.read.response",
        &sample("allocation.read.response.json"),
        &alloc,
    );
    assert_eq!(alloc["Job"]["ID"], json!(child));
    assert_eq!(
        alloc["AllocatedResources"]["Tasks"]["gpu-task"]["Devices"][0]["DeviceIDs"],
        json!(t.standin().gpu_uuids())
    );
    assert_shape(
        "evaluation.read.response",
        &sample("evaluation.read.response.json"),
        &get(format!("/v1/evaluation/{}", d["EvalID"].as_str().unwrap())).await,
    );

    let nodes = get("/v1/nodes".into()).await;
    let node_id = nodes[0]["ID"].as_str().unwrap().to_string();
    let node = get(format!("/v1/node/{node_id}")).await;
    assert_shape(
        "node.read.response",
        &sample("node.read.response.json"),
        &node,
    );
    for (path, req, resp) in [
        (
            "eligibility",
            "node.eligibility.request.json",
            "node.eligibility.response.json",
        ),
        ("eligibility", "", "node.eligibility.response.json"),
    ] {
        let body = if req.is_empty() {
            json!({ "Eligibility": "eligible" })
        } else {
            sample(req)
        };
        let r = http
            .post(format!("{}/v1/node/{node_id}/{path}", t.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        assert_shape(resp, &sample(resp), &r.json().await.unwrap());
    }

    let stop = http
        .delete(format!("{}/v1/job/{enc}", t.url))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_shape(
        "job.stop.response",
        &sample("job.stop.response.json"),
        &stop,
    );
    let ended = follow(c, &child, 0).await;
    assert_eq!(ended.status, TerminalStatus::Stopped, "{ended:?}");

    // Errors: plain text, statuses and bodies of errors.plain-text.json.
    for (path, status, body) in [
        ("/v1/job/nope".to_string(), 404, "job not found"),
        ("/v1/allocation/nope".to_string(), 404, "alloc not found"),
        ("/v1/evaluation/nope".to_string(), 404, "eval not found"),
        ("/v1/node/nope".to_string(), 404, "node not found"),
        ("/v1/jobs?index=x".to_string(), 400, "Invalid index"),
        (
            "/v1/jobs?index=1&wait=soon".to_string(),
            400,
            "Invalid wait time",
        ),
    ] {
        let r = http.get(format!("{}{path}", t.url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"),
            "{path}"
        );
        assert_eq!(r.text().await.unwrap(), body, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_sends_heartbeats_and_allocation_events() {
    let t = standin_target(1, Duration::from_millis(200)).await;
    register_probe(&t.client, "events", 0).await;
    let d = t
        .client
        .dispatch("events", &meta(&[("script", "exit 0")]), None, "tok-events")
        .await
        .unwrap();
    let child = d.dispatched_job_id.clone();
    let url = format!(
        "{}/v1/event/stream?index=1&topic=Allocation:{}",
        t.url,
        urlencoding::encode(&child)
    );
    let resp = reqwest::get(&url).await.unwrap();
    assert!(resp.status().is_success());
    let mut bytes = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut lines: Vec<Value> = Vec::new();
    let end = Instant::now() + DEADLINE;
    // Until the allocation is terminal and a heartbeat came after it.
    let done = |lines: &[Value]| {
        let terminal = lines.iter().position(|l| {
            l["Events"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["Payload"]["Allocation"]["ClientStatus"] == json!("complete"))
        });
        terminal
            .map(|i| lines[i + 1..].iter().any(|l| l == &json!({})))
            .unwrap_or(false)
    };
    while !done(&lines) {
        let chunk = tokio::time::timeout_at(end.into(), bytes.next())
            .await
            .expect("event stream went silent")
            .expect("event stream ended")
            .unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            lines.push(serde_json::from_slice(&line).unwrap());
        }
    }
    assert_eq!(lines[0], json!({}), "the first line is a heartbeat");
    let samples = sample_lines("event-stream.allocation.synthesized.ndjson");
    let batch = lines
        .iter()
        .find(|l| l["Events"][0]["Type"] == json!("AllocationUpdated"))
        .expect("an AllocationUpdated event");
    assert_shape("event-stream.allocation.synthesized", &samples[1], batch);
    for l in lines.iter().filter(|l| *l != &json!({})) {
        for e in l["Events"].as_array().unwrap() {
            assert_eq!(e["Topic"], "Allocation");
            assert_eq!(e["FilterKeys"][0], json!(child));
            assert!(e["Payload"]["Allocation"]["Job"].is_null());
        }
    }
    // Job events, as the sample's JobRegistered-like Node event has them.
    let resp = reqwest::get(format!("{}/v1/event/stream?index=1&topic=Node", t.url))
        .await
        .unwrap();
    let mut bytes = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut node_line = None;
    while node_line.is_none() {
        let chunk = tokio::time::timeout_at(end.into(), bytes.next())
            .await
            .expect("silent")
            .expect("ended")
            .unwrap();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Value =
                serde_json::from_slice(&buf.drain(..=pos).collect::<Vec<u8>>()).unwrap();
            if line != json!({}) {
                node_line = Some(line);
            }
        }
    }
    let node_sample = sample_lines("event-stream.sample.ndjson");
    assert_shape(
        "event-stream.sample",
        &node_sample[1],
        node_line.as_ref().unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limit_is_16_kib_and_dispatch_checks_match_nomad() {
    for t in targets("the payload limit test").await {
        let c = &t.client;
        register_probe(c, "limit", 0).await;
        let ok = c
            .dispatch(
                "limit",
                &meta(&[("script", "exit 0")]),
                Some(&vec![b'x'; 16_384]),
                "limit-ok",
            )
            .await;
        let ok = ok.unwrap_or_else(|e| panic!("[{}] 16384 bytes must be accepted: {e}", t.name));
        let e = c
            .dispatch("limit", &meta(&[]), Some(&vec![b'x'; 16_385]), "limit-big")
            .await
            .unwrap_err();
        let (status, body) = status_body(&e);
        assert_eq!(status, 500, "[{}] {e}", t.name);
        assert!(
            body.contains("Payload exceeds maximum size; 16385 > 16384"),
            "[{}] {body}",
            t.name
        );
        assert!(!e.is_transient());

        for (m, want) in [
            (
                BTreeMap::from([("user_id".to_string(), "7".to_string())]),
                "Dispatch did not provide required meta keys: [job_id]",
            ),
            (
                meta(&[("foo", "1")]),
                "Dispatch request included unpermitted metadata keys: [foo]",
            ),
        ] {
            let e = c.dispatch("limit", &m, None, "").await.unwrap_err();
            let (status, body) = status_body(&e);
            assert_eq!(status, 500, "[{}] {e}", t.name);
            assert!(body.contains(want), "[{}] {body}", t.name);
        }
        let e = c
            .dispatch("no-such-job", &meta(&[]), None, "")
            .await
            .unwrap_err();
        assert!(
            status_body(&e).1.contains("parameterized job not found"),
            "[{}] {e}",
            t.name
        );
        let end = follow(c, &ok.dispatched_job_id, ok.index).await;
        assert_eq!(end.status, TerminalStatus::Complete, "[{}] {end:?}", t.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_is_idempotent_by_token() {
    for t in targets("the idempotent dispatch test").await {
        let c = &t.client;
        register_probe(c, "idem", 0).await;
        let m = meta(&[("script", "exit 0")]);
        let first = c
            .dispatch("idem", &m, Some(b"{}"), "token-1")
            .await
            .unwrap();
        assert!(!first.eval_id.is_empty());
        let again = c
            .dispatch("idem", &m, Some(b"{}"), "token-1")
            .await
            .unwrap();
        assert_eq!(
            again.dispatched_job_id, first.dispatched_job_id,
            "[{}]",
            t.name
        );
        assert_eq!(
            (again.eval_id.as_str(), again.eval_create_index),
            ("", 0),
            "[{}]",
            t.name
        );
        let other = c
            .dispatch("idem", &m, Some(b"{}"), "token-2")
            .await
            .unwrap();
        assert_ne!(other.dispatched_job_id, first.dispatched_job_id);
        let job = c
            .read_job(&first.dispatched_job_id)
            .await
            .unwrap()
            .expect("the child exists");
        assert_eq!(job["ParentID"], "idem");
        assert_eq!(job["Dispatched"], true);
        assert_eq!(job["Meta"]["job_id"], "j-1");
        for child in [&first.dispatched_job_id, &other.dispatched_job_id] {
            assert_eq!(
                follow(c, child, first.index).await.status,
                TerminalStatus::Complete
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gpu_job_is_blocked_until_the_gpu_frees() {
    let t = standin_target(1, Duration::from_secs(1)).await;
    let c = &t.client;
    register_probe(c, "gpu", 1).await;
    let gpu = t.standin().gpu_uuids()[0].clone();
    assert!(gpu.starts_with("GPU-"), "{gpu}");

    let a = c
        .dispatch(
            "gpu",
            &meta(&[("script", "exec sleep 60")]),
            Some(b"{}"),
            "a",
        )
        .await
        .unwrap();
    let a_allocs = wait_allocs(c, &a.dispatched_job_id, "running", |l| {
        l.iter().any(|x| x.client_status == "running")
    })
    .await;
    let b = c
        .dispatch("gpu", &meta(&[("script", "exit 0")]), Some(b"{}"), "b")
        .await
        .unwrap();
    assert!(
        c.job_allocations(&b.dispatched_job_id, None)
            .await
            .unwrap()
            .0
            .is_empty(),
        "b must wait for the GPU"
    );
    let eval = c.evaluation(&b.eval_id).await.unwrap();
    assert_eq!(eval.status, "complete");
    let blocked = c.evaluation(&eval.blocked_eval).await.unwrap();
    assert_eq!(blocked.status, "blocked");
    assert_eq!(blocked.triggered_by, "queued-allocs");
    let m = &blocked.failed_tg_allocs["workflow"];
    assert_eq!(
        m.dimension_exhausted["devices: no devices match request"], 1,
        "{m:?}"
    );
    let raw: Value = reqwest::get(format!("{}/v1/evaluation/{}", t.url, blocked.id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_shape(
        "evaluation.blocked-missing-devices",
        &sample("evaluation.blocked-missing-devices.synthesized.json"),
        &raw,
    );
    wait_alloc_file(&t, &a_allocs[0].id, "gpus.txt").await;
    assert_eq!(alloc_file(&t, &a_allocs[0].id, "gpus.txt").trim(), gpu);

    c.stop_job(&a.dispatched_job_id, false).await.unwrap();
    let a_end = follow(c, &a.dispatched_job_id, a.index).await;
    assert_eq!(a_end.status, TerminalStatus::Stopped, "{a_end:?}");
    let b_end = follow(c, &b.dispatched_job_id, b.index).await;
    assert_eq!(b_end.status, TerminalStatus::Complete, "{b_end:?}");
    let b_alloc = b_end.alloc_id.unwrap();
    assert_eq!(
        c.allocation(&b_alloc).await.unwrap().eval_id,
        blocked.id,
        "placed by the blocked evaluation"
    );
    assert_eq!(alloc_file(&t, &b_alloc, "gpus.txt").trim(), gpu);
    assert_eq!(c.evaluation(&blocked.id).await.unwrap().status, "complete");

    // A node without GPUs: "missing devices", forever; a purged child is gone.
    let t0 = standin_target(0, Duration::from_secs(1)).await;
    register_probe(&t0.client, "gpu", 1).await;
    let d = t0
        .client
        .dispatch("gpu", &meta(&[]), None, "x")
        .await
        .unwrap();
    let e = t0.client.evaluation(&d.eval_id).await.unwrap();
    assert_eq!(
        e.failed_tg_allocs["workflow"].constraint_filtered["missing devices"],
        1
    );
    assert_eq!(
        e.failed_tg_allocs["workflow"].summary(),
        "missing devices (1 node)"
    );
    t0.client
        .stop_job(&d.dispatched_job_id, true)
        .await
        .unwrap();
    let end = follow(&t0.client, &d.dispatched_job_id, d.index).await;
    assert_eq!(end.status, TerminalStatus::Gone, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_get_the_environment_and_payload_of_raw_exec() {
    let t = standin_target(2, Duration::from_secs(1)).await;
    let c = &t.client;
    register_probe(c, "env", 1).await;
    let payload = br#"{"prompt":{"1":{"class_type":"X"}}}"#;
    let d = c
        .dispatch("env", &meta(&[("priority", "3")]), Some(payload), "e")
        .await
        .unwrap();
    let end = follow(c, &d.dispatched_job_id, d.index).await;
    assert_eq!(end.status, TerminalStatus::Complete, "{end:?}");
    let alloc = end.alloc_id.unwrap();
    assert_eq!(alloc_file(&t, &alloc, "payload.copy").as_bytes(), payload);
    let env: BTreeMap<String, String> = alloc_file(&t, &alloc, "env.txt")
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    for (k, v) in [
        ("NOMAD_META_job_id", "j-1"),
        ("NOMAD_META_JOB_ID", "j-1"),
        ("NOMAD_META_user_id", "7"),
        ("NOMAD_META_priority", "3"),
        ("NOMAD_META_script", ""),
        ("NOMAD_JOB_PARENT_ID", "env"),
        ("NOMAD_TASK_NAME", contract::NOMAD_TASK),
    ] {
        assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(env["NOMAD_JOB_ID"], d.dispatched_job_id);
    assert_eq!(env["NOMAD_ALLOC_ID"], alloc);
    assert!(env["NOMAD_TASK_DIR"].ends_with("/gpu-task/local"));
    assert!(env.contains_key("NOMAD_SECRETS_DIR") && env.contains_key("NOMAD_ALLOC_DIR"));
    assert_eq!(env["NVIDIA_VISIBLE_DEVICES"].split(',').count(), 1);
    assert!(t
        .standin()
        .gpu_uuids()
        .contains(&env["NVIDIA_VISIBLE_DEVICES"]));
    // The stand-in's own environment is inherited, as raw_exec inherits the agent's.
    assert!(env.contains_key("PATH"));

    // No payload: no file.
    let d = c
        .dispatch("env", &meta(&[]), None, "no-payload")
        .await
        .unwrap();
    let end = follow(c, &d.dispatched_job_id, d.index).await;
    assert_eq!(
        (end.status, end.reason.as_str()),
        (TerminalStatus::Failed, "gpu-task exited with code 7")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_spec_parses_to_the_contract() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nomad/comfy-workflow.nomad.hcl"
    );
    let hcl = std::fs::read_to_string(path).unwrap();
    for t in targets("the job spec parse test").await {
        let c = &t.client;
        let job = c
            .parse_job(&hcl, &BTreeMap::new())
            .await
            .unwrap_or_else(|e| panic!("[{}] {e}", t.name));
        assert_eq!(job["ID"], contract::NOMAD_JOB);
        assert_eq!(job["Type"], "batch");
        assert_eq!(job["NodePool"], "gpu");
        let pj = &job["ParameterizedJob"];
        assert_eq!(
            pj["MetaRequired"],
            json!(contract::META_REQUIRED),
            "[{}]",
            t.name
        );
        assert_eq!(
            pj["MetaOptional"],
            json!(contract::META_OPTIONAL),
            "[{}]",
            t.name
        );
        assert_eq!(pj["Payload"], "optional");
        assert_eq!(
            job["Constraints"][0]["LTarget"], "${node.unique.name}",
            "[{}] runtime interpolations stay",
            t.name
        );
        let group = &job["TaskGroups"][0];
        assert_eq!(group["RestartPolicy"]["Attempts"], 0);
        assert_eq!(group["ReschedulePolicy"]["Attempts"], 0);
        let task = &group["Tasks"][0];
        assert_eq!(task["Name"], contract::NOMAD_TASK);
        assert_eq!(task["Driver"], "raw_exec");
        assert_eq!(task["DispatchPayload"]["File"], contract::PAYLOAD_FILE);
        assert_eq!(task["KillTimeout"], 30_000_000_000_i64);
        assert_eq!(task["Resources"]["Devices"][0]["Name"], "nvidia/gpu");
        assert_eq!(task["Resources"]["Devices"][0]["Count"], 1);
        assert_eq!(task["Templates"][0]["DestPath"], "secrets/comfy-multi.env");

        let vars: BTreeMap<String, String> = [
            ("gpu_count", "0"),
            ("node_pool", "default"),
            ("gpu_task_command", "/bin/true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let local = c.parse_job(&hcl, &vars).await.unwrap();
        let task = &local["TaskGroups"][0]["Tasks"][0];
        assert!(
            task["Resources"]["Devices"].is_null() || task["Resources"]["Devices"] == json!([]),
            "[{}] {task}",
            t.name
        );
        assert_eq!(local["NodePool"], "default");
        assert_eq!(task["Config"]["command"], "/bin/true");
        let e = c
            .parse_job(
                &hcl,
                &BTreeMap::from([("no_such_var".to_string(), "1".to_string())]),
            )
            .await
            .unwrap_err();
        assert_eq!(status_body(&e).0, 400, "[{}] {e}", t.name);
        c.register_job(&local)
            .await
            .unwrap_or_else(|e| panic!("[{}] register: {e}", t.name));

        if t.standin.is_some() {
            // The template would block on a real agent (no Nomad variable);
            // the stand-in does not render templates, so it can run it.
            let d = c
                .dispatch(
                    contract::NOMAD_JOB,
                    &meta(&[("priority", "0")]),
                    Some(b"{}"),
                    "spec",
                )
                .await
                .unwrap();
            assert_eq!(
                follow(c, &d.dispatched_job_id, d.index).await.status,
                TerminalStatus::Complete
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_to_end_reports_how_children_ended() {
    for t in targets("the follow_to_end test").await {
        let c = &t.client;
        register_probe(c, "follow", 0).await;
        let cases = [
            (
                "exit 3",
                TerminalStatus::Failed,
                "gpu-task exited with code 3",
            ),
            (
                "exit 0",
                TerminalStatus::Complete,
                "gpu-task exited with code 0",
            ),
            (
                "kill -KILL $$",
                TerminalStatus::Failed,
                "gpu-task was killed by signal 9",
            ),
        ];
        for (script, status, reason) in cases {
            let d = c
                .dispatch("follow", &meta(&[("script", script)]), Some(b"{}"), script)
                .await
                .unwrap();
            let end = follow(c, &d.dispatched_job_id, d.index).await;
            assert_eq!(
                (end.status, end.reason.as_str()),
                (status, reason),
                "[{}] {script}",
                t.name
            );
        }
        // After the end, following again still answers (from the allocation list).
        let d = c
            .dispatch(
                "follow",
                &meta(&[("script", "exit 5")]),
                Some(b"{}"),
                "late",
            )
            .await
            .unwrap();
        let first = follow(c, &d.dispatched_job_id, d.index).await;
        let again = follow(c, &d.dispatched_job_id, d.index).await;
        assert_eq!((first.status, &first.reason), (again.status, &again.reason));

        // Stopped while running.
        let d = c
            .dispatch(
                "follow",
                &meta(&[("script", "exec sleep 60")]),
                Some(b"{}"),
                "stop",
            )
            .await
            .unwrap();
        wait_allocs(c, &d.dispatched_job_id, "running", |l| {
            l.iter().any(|a| a.client_status == "running")
        })
        .await;
        c.stop_job(&d.dispatched_job_id, false).await.unwrap();
        let end = follow(c, &d.dispatched_job_id, d.index).await;
        assert_eq!(end.status, TerminalStatus::Stopped, "[{}] {end:?}", t.name);
        assert!(
            end.reason.contains("stopped"),
            "[{}] {}",
            t.name,
            end.reason
        );

        // A task that ignores SIGTERM is killed after its kill_timeout (2 s).
        let script = r#"trap '' TERM; : > "$NOMAD_ALLOC_DIR/trapped"; sleep 60"#;
        let d = c
            .dispatch(
                "follow",
                &meta(&[("script", script)]),
                Some(b"{}"),
                "stubborn",
            )
            .await
            .unwrap();
        let allocs = wait_allocs(c, &d.dispatched_job_id, "running", |l| {
            l.iter().any(|a| a.client_status == "running")
        })
        .await;
        wait_alloc_file(&t, &allocs[0].id, "trapped").await;
        let asked = Instant::now();
        c.stop_job(&d.dispatched_job_id, false).await.unwrap();
        let end = follow(c, &d.dispatched_job_id, d.index).await;
        assert_eq!(end.status, TerminalStatus::Stopped, "[{}] {end:?}", t.name);
        assert!(
            end.reason.contains("killed by signal 9"),
            "[{}] {}",
            t.name,
            end.reason
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(1900),
            "[{}] SIGKILL came before the kill_timeout",
            t.name
        );

        // With the event stream treated as dead at once, blocking queries carry on.
        let impatient = NomadClient::new(&t.url, None)
            .unwrap()
            .with_stream_idle_timeout(Duration::from_millis(1));
        let d = c
            .dispatch(
                "follow",
                &meta(&[("script", "sleep 0.3; exit 2")]),
                Some(b"{}"),
                "fallback",
            )
            .await
            .unwrap();
        let end = follow(&impatient, &d.dispatched_job_id, d.index).await;
        assert_eq!(
            (end.status, end.reason.as_str()),
            (TerminalStatus::Failed, "gpu-task exited with code 2"),
            "[{}]",
            t.name
        );
    }
}

fn job(workflow: Value) -> Job {
    Job {
        id: uuid::Uuid::new_v4(),
        user: 7,
        number: 1,
        workflow,
        extra_data: Value::Null,
        state: JobState::Dispatched,
        priority: 0,
        created_at: 0,
        dispatched_at: None,
        started_at: None,
        finished_at: None,
        outputs: Default::default(),
        error: None,
        attempts: 1,
        executor_ref: None,
        messages: vec![],
        cancel_requested: false,
        progress: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nomad_executor_starts_waits_and_stops() {
    for t in targets("the NomadExecutor test").await {
        register_probe(&t.client, "exec-probe", 0).await;
        let ex = NomadExecutor::new(t.client.clone(), "exec-probe");

        let ok = job(json!({ "1": { "class_type": "SaveImage", "inputs": {} } }));
        let started = ex.start(&ok).await.unwrap();
        assert!(
            started.executor_ref.starts_with("exec-probe/dispatch-"),
            "{started:?}"
        );
        let again = ex.start(&ok).await.unwrap();
        assert_eq!(
            again.executor_ref, started.executor_ref,
            "[{}] start is idempotent by job id",
            t.name
        );
        assert_eq!(
            ex.wait(&started).await.unwrap(),
            Outcome::Completed,
            "[{}]",
            t.name
        );

        let bad = job(json!({ "mode": "fail" }));
        let s = ex.start(&bad).await.unwrap();
        assert_eq!(
            ex.wait(&s).await.unwrap(),
            Outcome::Failed {
                reason: "gpu-task exited with code 4".into()
            },
            "[{}]",
            t.name
        );

        // Larger than the payload limit: dispatched without payload (gpu-task fetches it).
        let big = job(json!({ "blob": "x".repeat(20_000) }));
        let s = ex.start(&big).await.unwrap();
        assert_eq!(
            ex.wait(&s).await.unwrap(),
            Outcome::Failed {
                reason: "gpu-task exited with code 7".into()
            },
            "[{}] no payload file",
            t.name
        );

        let long = job(json!({ "mode": "sleep" }));
        let s = ex.start(&long).await.unwrap();
        wait_allocs(&t.client, &s.executor_ref, "running", |l| {
            l.iter().any(|a| a.client_status == "running")
        })
        .await;
        ex.stop(&s.executor_ref).await.unwrap();
        match ex.wait(&s).await.unwrap() {
            Outcome::Failed { reason } => {
                assert!(reason.contains("stopped"), "[{}] {reason}", t.name)
            }
            other => panic!(
                "[{}] a stopped job must not count as completed: {other:?}",
                t.name
            ),
        }
        ex.stop("exec-probe/dispatch-0-00000000")
            .await
            .expect("stopping an unknown child is not an error");

        // A job that Nomad does not know: the operator must register it; jobs wait.
        let missing = NomadExecutor::new(t.client.clone(), "not-registered");
        assert!(matches!(
            missing.start(&ok).await,
            Err(ExecutorError::Unavailable(_))
        ));
    }
    // Nomad unreachable: Unavailable, with a hint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ex = NomadExecutor::new(
        NomadClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap(),
        "x",
    );
    match ex.start(&job(json!({}))).await {
        Err(ExecutorError::Unavailable(msg)) => assert!(msg.contains("NOMAD_ADDR"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_drain_and_eligibility() {
    let t = standin_target(1, Duration::from_secs(1)).await;
    let c = &t.client;
    let nodes = c.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    let node = c.node(&nodes[0].id).await.unwrap();
    assert_eq!(node.device_ids("nvidia", "gpu"), t.standin().gpu_uuids());
    assert_eq!(node.stub.scheduling_eligibility, "eligible");

    register_probe(c, "drain", 1).await;
    c.set_node_eligibility(&node.stub.id, false).await.unwrap();
    let d = c
        .dispatch(
            "drain",
            &meta(&[("script", "exec sleep 60")]),
            Some(b"{}"),
            "d",
        )
        .await
        .unwrap();
    let e = c.evaluation(&d.eval_id).await.unwrap();
    assert_eq!(
        e.failed_tg_allocs["workflow"].nodes_evaluated, 0,
        "an ineligible node is not considered: {e:?}"
    );
    c.set_node_eligibility(&node.stub.id, true).await.unwrap();
    wait_allocs(c, &d.dispatched_job_id, "placed and running", |l| {
        l.iter().any(|a| a.client_status == "running")
    })
    .await;

    c.drain_node(&node.stub.id, Some(Duration::from_millis(200)))
        .await
        .unwrap();
    let end = follow(c, &d.dispatched_job_id, d.index).await;
    assert_eq!(
        end.status,
        TerminalStatus::Lost,
        "a drain deadline migrates the allocation: {end:?}"
    );
    assert!(end.reason.contains("migrated"), "{}", end.reason);
    let deadline = Instant::now() + DEADLINE;
    let mut index = 0;
    loop {
        let n = c.node(&node.stub.id).await.unwrap();
        if !n.stub.drain {
            assert_eq!(
                n.stub.scheduling_eligibility, "ineligible",
                "a drained node stays ineligible"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the drain did not complete");
        // Wait for the next change instead of polling.
        let (_, i) = c
            .job_allocations(
                &d.dispatched_job_id,
                Some((index.max(1), Duration::from_secs(2))),
            )
            .await
            .unwrap();
        index = i;
    }
    let e = c.set_node_eligibility(&node.stub.id, true).await;
    assert!(e.is_ok());
}
