//! The stand-in's HTTP API: the routes, their blocking queries, their plain
//! text errors (statuses and bodies from `shared/nomad-api/errors.plain-text.json`)
//! and the NDJSON event stream.
//!
//! Job paths are matched like Nomad does it: on the percent-decoded path, by
//! suffix (`/allocations`, `/summary`, `/dispatch`, ...), so child ids with a
//! `/` work both encoded (`%2F`) and not.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as AxState};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

use super::jobspec::{canonicalize_job, go_duration_ns, parse_job_hcl};
use super::state::{State, DATACENTER};
use super::util::{new_id, now_ns, now_secs, rfc3339};
use super::Shared;

/// Nomad's limit on a dispatch payload, in bytes after base64 decoding.
pub const PAYLOAD_LIMIT: usize = 16 * 1024;

type Q = Query<Vec<(String, String)>>;

fn q<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A JSON answer with Nomad's query-meta headers.
fn reply(index: u64, body: Value) -> Response {
    (
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/json".to_string(),
            ),
            ("X-Nomad-Index", index.max(1).to_string()),
            ("X-Nomad-LastContact", "0".to_string()),
            ("X-Nomad-KnownLeader", "true".to_string()),
        ],
        body.to_string(),
    )
        .into_response()
}

/// A plain-text error, as Nomad sends them.
fn err(status: u16, msg: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg.into(),
    )
        .into_response()
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/jobs", get(jobs_list).post(jobs_register))
        .route("/v1/jobs/parse", post(jobs_parse))
        .route("/v1/job/{*rest}", any(job_any))
        .route("/v1/allocations", get(allocs_list))
        .route("/v1/allocation/{id}", get(alloc_read))
        .route("/v1/evaluation/{id}", get(eval_read))
        .route("/v1/event/stream", get(event_stream))
        .route("/v1/nodes", get(nodes_list))
        .route("/v1/node/{*rest}", any(node_any))
        .route(
            "/v1/status/leader",
            get(|| async { reply(1, json!("127.0.0.1:4647")) }),
        )
        .route("/v1/agent/self", get(agent_self))
        .fallback(|| async { err(404, "404 page not found") })
        .with_state(shared)
}

/// Waits as a blocking query does: until the index passes `?index=` or
/// `?wait=` (default 5m, at most 10m) has passed.
async fn block(shared: &Shared, query: &[(String, String)]) -> Result<(), Response> {
    let Some(index) = q(query, "index") else {
        return Ok(());
    };
    let index: u64 = index.parse().map_err(|_| err(400, "Invalid index"))?;
    let wait = match q(query, "wait") {
        None => Duration::from_secs(300),
        Some(w) => Duration::from_nanos(
            go_duration_ns(w)
                .filter(|n| *n >= 0)
                .ok_or_else(|| err(400, "Invalid wait time"))? as u64,
        ),
    }
    .min(Duration::from_secs(600));
    if index == 0 {
        return Ok(());
    }
    let mut rx = shared.lock().index_tx.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if *rx.borrow_and_update() > index {
            return Ok(());
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = super::flagged(&mut shutdown) => return Ok(()),
        }
    }
}

/// The request body as JSON, or Nomad's 400 text.
fn parse_body(body: &Bytes) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("Failed to decode request: {e}"))
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

async fn jobs_list(AxState(sh): AxState<Arc<Shared>>, Query(query): Q) -> Response {
    if let Err(r) = block(&sh, &query).await {
        return r;
    }
    let prefix = q(&query, "prefix").unwrap_or_default();
    let st = sh.lock();
    let list: Vec<Value> = st
        .jobs
        .values()
        .filter(|j| j.str("ID").starts_with(prefix))
        .map(|j| st.job_stub_json(j))
        .collect();
    reply(st.index, Value::Array(list))
}

async fn jobs_parse(AxState(_sh): AxState<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return err(400, e),
    };
    let Some(hcl) = req.get("JobHCL").and_then(Value::as_str) else {
        return err(400, "Job spec is empty");
    };
    if req.get("hclv1").and_then(Value::as_bool) == Some(true) {
        return err(400, "HCLv1 is not supported by the Nomad stand-in");
    }
    let vars = req
        .get("Variables")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match parse_job_hcl(hcl, vars) {
        Ok(job) => reply(0, job),
        Err(e) => err(400, e),
    }
}

/// The validation Nomad does on register that matters to us.
fn validate_job(job: &Value) -> Result<(), String> {
    let mut problems = Vec::new();
    let groups = job["TaskGroups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        problems.push("Missing job task groups".to_string());
    }
    if !matches!(
        job["Type"].as_str(),
        Some("batch" | "service" | "system" | "sysbatch")
    ) {
        problems.push(format!("Invalid job type: {}", job["Type"]));
    }
    for g in &groups {
        let gname = g["Name"].as_str().unwrap_or_default();
        let tasks = g["Tasks"].as_array().cloned().unwrap_or_default();
        if tasks.is_empty() {
            problems.push(format!(
                "Task group {gname} validation failed: Missing tasks for task group"
            ));
        }
        for t in &tasks {
            if t["Driver"].as_str().unwrap_or_default().is_empty() {
                problems.push(format!("Task group {gname} validation failed: Task {} validation failed: Missing task driver", t["Name"].as_str().unwrap_or_default()));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let list: String = problems.iter().map(|p| format!("\n\t* {p}")).collect();
    Err(format!(
        "{n} error{} occurred:{list}\n\n",
        if n == 1 { "" } else { "s" }
    ))
}

async fn jobs_register(AxState(sh): AxState<Arc<Shared>>, body: Bytes) -> Response {
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(e) => return err(400, e),
    };
    let mut job = match req.get("Job") {
        Some(j) if j.is_object() => j.clone(),
        _ => return err(400, "Job must be specified"),
    };
    if job
        .get("ID")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        return err(400, "Job ID hasn't been provided");
    }
    canonicalize_job(&mut job);
    if let Err(e) = validate_job(&job) {
        return err(500, e);
    }
    let (index, resp, started) = sh.change(|st, idx, events| {
        let (resp, started) = register(st, job, idx, events);
        (idx, resp, started)
    });
    sh.start_allocs(started);
    reply(index, resp)
}

/// Stores a job and, unless it is a parameterized or periodic parent, evaluates it.
fn register(
    st: &mut State,
    mut job: Value,
    idx: u64,
    events: &mut Vec<Value>,
) -> (Value, Vec<String>) {
    let id = job["ID"].as_str().unwrap_or_default().to_string();
    let (create_index, version) = match st.jobs.get(&id) {
        Some(old) => (
            old.job["CreateIndex"].as_u64().unwrap_or(idx),
            old.job["Version"].as_u64().unwrap_or(0) + 1,
        ),
        None => (idx, 0),
    };
    job["CreateIndex"] = json!(create_index);
    job["ModifyIndex"] = json!(idx);
    job["JobModifyIndex"] = json!(idx);
    job["Version"] = json!(version);
    job["SubmitTime"] = json!(now_ns());
    job["Status"] = json!("pending");
    let payload = st
        .jobs
        .get(&id)
        .map(|j| j.payload.clone())
        .unwrap_or_default();
    st.jobs
        .insert(id.clone(), super::state::JobRec { job, payload });
    events.push(st.job_event("JobRegistered", &id));
    let rec = &st.jobs[&id];
    let (eval_id, started) = if rec.is_parameterized_parent() || !rec.job["Periodic"].is_null() {
        (String::new(), vec![])
    } else {
        st.evaluate(&id, "job-register", idx, events)
    };
    st.refresh_job_status(&id, idx);
    let eval_index = if eval_id.is_empty() { 0 } else { idx };
    let resp = json!({
        "EvalID": eval_id,
        "EvalCreateIndex": eval_index,
        "JobModifyIndex": idx,
        "Warnings": "",
        "Index": idx,
        "LastContact": 0,
        "KnownLeader": false,
    });
    (resp, started)
}

/// `/v1/job/<id>[/<suffix>]`, matched on the decoded path like Nomad.
async fn job_any(
    AxState(sh): AxState<Arc<Shared>>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Q,
    body: Bytes,
) -> Response {
    const SUFFIXES: [&str; 5] = [
        "/allocations",
        "/summary",
        "/dispatch",
        "/evaluations",
        "/versions",
    ];
    let (id, suffix) = match SUFFIXES.iter().find(|s| rest.ends_with(*s)) {
        Some(s) => (&rest[..rest.len() - s.len()], *s),
        None => (rest.as_str(), ""),
    };
    match (suffix, &method) {
        ("", &Method::GET) => job_read(&sh, id, &query).await,
        ("", &Method::DELETE) => job_stop(&sh, id, &query),
        ("/allocations", &Method::GET) => job_allocations(&sh, id, &query).await,
        ("/summary", &Method::GET) => job_summary(&sh, id, &query).await,
        ("/evaluations", &Method::GET) => job_evaluations(&sh, id, &query).await,
        ("/versions", &Method::GET) => job_versions(&sh, id, &query).await,
        ("/dispatch", &Method::POST | &Method::PUT) => job_dispatch(&sh, id, &query, &body),
        ("", &Method::POST | &Method::PUT) => err(405, "Invalid method: job updates are not supported by the Nomad stand-in; use POST /v1/jobs"),
        _ => err(405, "Invalid method"),
    }
}

async fn job_read(sh: &Shared, id: &str, query: &[(String, String)]) -> Response {
    if let Err(r) = block(sh, query).await {
        return r;
    }
    let st = sh.lock();
    match st.jobs.get(id) {
        Some(j) => reply(st.index, j.job.clone()),
        None => err(404, "job not found"),
    }
}

async fn job_versions(sh: &Shared, id: &str, query: &[(String, String)]) -> Response {
    if let Err(r) = block(sh, query).await {
        return r;
    }
    let st = sh.lock();
    match st.jobs.get(id) {
        Some(j) => reply(
            st.index,
            json!({ "Versions": [j.job.clone()], "Diffs": null }),
        ),
        None => err(404, "job versions not found"),
    }
}

async fn job_allocations(sh: &Shared, id: &str, query: &[(String, String)]) -> Response {
    if let Err(r) = block(sh, query).await {
        return r;
    }
    let st = sh.lock();
    let mut list: Vec<&super::state::AllocRec> =
        st.allocs.values().filter(|a| a.job_id == id).collect();
    list.sort_by_key(|a| a.create_index);
    let list: Vec<Value> = list.into_iter().map(|a| st.alloc_stub_json(a)).collect();
    reply(st.index, Value::Array(list))
}

async fn job_evaluations(sh: &Shared, id: &str, query: &[(String, String)]) -> Response {
    if let Err(r) = block(sh, query).await {
        return r;
    }
    let st = sh.lock();
    let list: Vec<Value> = st
        .evals
        .values()
        .filter(|e| e.job_id == id)
        .map(|e| st.eval_json(e))
        .collect();
    reply(st.index, Value::Array(list))
}

async fn job_summary(sh: &Shared, id: &str, query: &[(String, String)]) -> Response {
    if let Err(r) = block(sh, query).await {
        return r;
    }
    let st = sh.lock();
    match st.job_summary_json(id) {
        Some(s) => reply(st.index, s),
        None => err(404, "job not found"),
    }
}

fn job_stop(sh: &Arc<Shared>, id: &str, query: &[(String, String)]) -> Response {
    let purge = q(query, "purge") == Some("true");
    let mut st = sh.lock();
    if !st.jobs.contains_key(id) {
        return err(404, "job not found");
    }
    let idx = st.bump();
    let mut events = vec![];
    let eval_id = st.stop_job(id, idx, &mut events);
    if purge {
        st.jobs.remove(id);
    }
    st.publish(idx, events);
    reply(
        idx,
        json!({ "EvalID": eval_id, "EvalCreateIndex": idx, "JobModifyIndex": idx }),
    )
}

/// `POST /v1/job/:id/dispatch`, with Nomad's checks in Nomad's order.
fn job_dispatch(
    sh: &Arc<Shared>,
    parent_id: &str,
    query: &[(String, String)],
    body: &Bytes,
) -> Response {
    let req = if body.is_empty() {
        json!({})
    } else {
        match parse_body(body) {
            Ok(v) => v,
            Err(e) => return err(400, e),
        }
    };
    if let Some(body_id) = req.get("JobID").and_then(Value::as_str) {
        if !body_id.is_empty() && body_id != parent_id {
            return err(400, "Job ID does not match");
        }
    }
    let payload = match req.get("Payload") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => match base64::engine::general_purpose::STANDARD.decode(s) {
            Ok(p) => p,
            Err(e) => {
                return err(
                    400,
                    format!("Failed to decode request: illegal base64 data ({e})"),
                )
            }
        },
        Some(_) => {
            return err(
                400,
                "Failed to decode request: Payload must be a base64 string",
            )
        }
    };
    let meta: BTreeMap<String, String> = match req.get("Meta") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(m) => match serde_json::from_value(m.clone()) {
            Ok(m) => m,
            Err(e) => return err(400, format!("Failed to decode request: {e}")),
        },
    };
    let token = q(query, "idempotency_token")
        .or_else(|| req.get("IdempotencyToken").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();

    let mut st = sh.lock();
    let Some(parent) = st.jobs.get(parent_id) else {
        return err(500, "parameterized job not found");
    };
    if parent.job["ParameterizedJob"].is_null() || parent.job["Dispatched"] == json!(true) {
        return err(
            500,
            format!("Specified job {parent_id:?} is not a parameterized job"),
        );
    }
    if parent.stopped() {
        return err(500, format!("Specified job {parent_id:?} is stopped"));
    }
    let pj = &parent.job["ParameterizedJob"];
    let mode = pj["Payload"].as_str().unwrap_or("optional");
    if mode == "required" && payload.is_empty() {
        return err(
            500,
            "Payload is not provided but required by parameterized job",
        );
    }
    if mode == "forbidden" && !payload.is_empty() {
        return err(500, "Payload provided but forbidden by parameterized job");
    }
    if payload.len() > PAYLOAD_LIMIT {
        return err(
            500,
            format!(
                "Payload exceeds maximum size; {} > {}",
                payload.len(),
                PAYLOAD_LIMIT
            ),
        );
    }
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    };
    let required = list(&pj["MetaRequired"]);
    let optional = list(&pj["MetaOptional"]);
    let unpermitted: Vec<&str> = meta
        .keys()
        .filter(|k| !required.contains(k) && !optional.contains(k))
        .map(String::as_str)
        .collect();
    if !unpermitted.is_empty() {
        return err(
            500,
            format!(
                "Dispatch request included unpermitted metadata keys: [{}]",
                unpermitted.join(" ")
            ),
        );
    }
    let missing: Vec<&str> = required
        .iter()
        .filter(|k| !meta.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return err(
            500,
            format!(
                "Dispatch did not provide required meta keys: [{}]",
                missing.join(" ")
            ),
        );
    }
    if !token.is_empty() {
        let existing = st
            .jobs
            .values()
            .find(|j| j.str("ParentID") == parent_id && j.str("DispatchIdempotencyToken") == token);
        if let Some(child) = existing {
            let resp = json!({
                "Index": st.index,
                "JobCreateIndex": child.job["CreateIndex"],
                "EvalCreateIndex": 0,
                "EvalID": "",
                "DispatchedJobID": child.job["ID"],
            });
            return reply(st.index, resp);
        }
    }

    let mut child = parent.job.clone();
    let hex: String = new_id().chars().filter(|c| *c != '-').take(8).collect();
    let child_id = format!("{parent_id}/dispatch-{}-{hex}", now_secs());
    child["ID"] = json!(child_id);
    child["Name"] = json!(child_id);
    child["ParentID"] = json!(parent_id);
    child["Dispatched"] = json!(true);
    child["DispatchIdempotencyToken"] = json!(token);
    child["Payload"] = if payload.is_empty() {
        Value::Null
    } else {
        json!(base64::engine::general_purpose::STANDARD.encode(&payload))
    };
    let mut merged: serde_json::Map<String, Value> =
        child["Meta"].as_object().cloned().unwrap_or_default();
    merged.extend(meta.into_iter().map(|(k, v)| (k, Value::String(v))));
    child["Meta"] = Value::Object(merged);

    let idx = st.bump();
    let mut events = vec![];
    let (_, started) = register(&mut st, child, idx, &mut events);
    if let Some(rec) = st.jobs.get_mut(&child_id) {
        rec.payload = payload;
    }
    let eval_id = st
        .evals
        .values()
        .find(|e| e.job_id == child_id && e.triggered_by == "job-register")
        .map(|e| e.id.clone())
        .unwrap_or_default();
    st.refresh_job_status(parent_id, idx);
    st.publish(idx, events);
    drop(st);
    sh.start_allocs(started);
    tracing::debug!(parent = parent_id, child = %child_id, "dispatched");
    reply(
        idx,
        json!({ "Index": idx, "JobCreateIndex": idx, "EvalCreateIndex": idx, "EvalID": eval_id, "DispatchedJobID": child_id }),
    )
}

// ---------------------------------------------------------------------------
// Allocations, evaluations
// ---------------------------------------------------------------------------

async fn allocs_list(AxState(sh): AxState<Arc<Shared>>, Query(query): Q) -> Response {
    if let Err(r) = block(&sh, &query).await {
        return r;
    }
    let st = sh.lock();
    let list: Vec<Value> = st.allocs.values().map(|a| st.alloc_stub_json(a)).collect();
    reply(st.index, Value::Array(list))
}

async fn alloc_read(
    AxState(sh): AxState<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Q,
) -> Response {
    if let Err(r) = block(&sh, &query).await {
        return r;
    }
    let st = sh.lock();
    match st.allocs.get(&id) {
        Some(a) => reply(st.index, st.alloc_json(a, true)),
        None => err(404, "alloc not found"),
    }
}

async fn eval_read(
    AxState(sh): AxState<Arc<Shared>>,
    Path(id): Path<String>,
    Query(query): Q,
) -> Response {
    if let Err(r) = block(&sh, &query).await {
        return r;
    }
    let st = sh.lock();
    match st.evals.get(&id) {
        Some(e) => reply(st.index, st.eval_json(e)),
        None => err(404, "eval not found"),
    }
}

// ---------------------------------------------------------------------------
// Event stream
// ---------------------------------------------------------------------------

/// Whether `event` matches one of `topics` (`(topic, key)`, `*` wildcards).
fn matches(event: &Value, topics: &[(String, String)]) -> bool {
    let topic = event["Topic"].as_str().unwrap_or_default();
    let key = event["Key"].as_str().unwrap_or_default();
    let filter_keys: Vec<&str> = event["FilterKeys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    topics.iter().any(|(t, k)| {
        (t == "*" || t == topic) && (k == "*" || k == key || filter_keys.contains(&k.as_str()))
    })
}

async fn event_stream(AxState(sh): AxState<Arc<Shared>>, Query(query): Q) -> Response {
    let index: u64 = match q(&query, "index").map(str::parse).transpose() {
        Ok(i) => i.unwrap_or(0),
        Err(_) => return err(400, "Invalid index"),
    };
    let mut topics: Vec<(String, String)> = query
        .iter()
        .filter(|(k, _)| k == "topic")
        .map(|(_, v)| match v.split_once(':') {
            Some((t, k)) => (t.to_string(), k.to_string()),
            None => (v.clone(), "*".to_string()),
        })
        .collect();
    if topics.is_empty() {
        topics.push(("*".into(), "*".into()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (mut index_rx, current) = {
        let st = sh.lock();
        (st.index_tx.subscribe(), st.index)
    };
    let heartbeat = sh.heartbeat;
    let mut shutdown = sh.shutdown.subscribe();
    tokio::spawn(async move {
        // Events at or after `index`; with index 0, only new ones.
        let mut last = if index == 0 { current } else { index - 1 };
        if tx.send(Bytes::from_static(b"{}\n")).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            let lines: Vec<Bytes> = {
                let st = sh.lock();
                let lines = st
                    .events
                    .iter()
                    .filter(|(i, _)| *i > last)
                    .filter_map(|(i, batch)| {
                        let events: Vec<Value> = batch["Events"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|e| matches(e, &topics))
                            .cloned()
                            .collect();
                        (!events.is_empty()).then(|| {
                            Bytes::from(format!("{}\n", json!({ "Index": i, "Events": events })))
                        })
                    })
                    .collect();
                last = last.max(st.index);
                lines
            };
            for line in lines {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = index_rx.changed() => if r.is_err() { return },
                _ = tick.tick() => if tx.send(Bytes::from_static(b"{}\n")).await.is_err() { return },
                _ = super::flagged(&mut shutdown) => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-Nomad-Index", current.to_string())
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| err(500, "cannot build the event stream"))
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

async fn nodes_list(AxState(sh): AxState<Arc<Shared>>, Query(query): Q) -> Response {
    if let Err(r) = block(&sh, &query).await {
        return r;
    }
    let st = sh.lock();
    reply(st.index, json!([st.node_stub_json()]))
}

async fn node_any(
    AxState(sh): AxState<Arc<Shared>>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Q,
    body: Bytes,
) -> Response {
    let (id, suffix) = match rest.split_once('/') {
        Some((id, s)) => (id.to_string(), s.to_string()),
        None => (rest.clone(), String::new()),
    };
    if sh.lock().node.id != id {
        return err(404, "node not found");
    }
    match (suffix.as_str(), &method) {
        ("", &Method::GET) => {
            if let Err(r) = block(&sh, &query).await {
                return r;
            }
            let st = sh.lock();
            reply(st.index, st.node_json())
        }
        ("allocations", &Method::GET) => {
            if let Err(r) = block(&sh, &query).await {
                return r;
            }
            let st = sh.lock();
            let list: Vec<Value> = st.allocs.values().map(|a| st.alloc_json(a, true)).collect();
            reply(st.index, Value::Array(list))
        }
        ("drain", &Method::POST | &Method::PUT) => match parse_body(&body) {
            Ok(req) => node_drain(&sh, req),
            Err(e) => err(400, e),
        },
        ("eligibility", &Method::POST | &Method::PUT) => match parse_body(&body) {
            Ok(req) => node_eligibility(&sh, req),
            Err(e) => err(400, e),
        },
        _ => err(405, "Invalid method"),
    }
}

fn node_update_reply(idx: u64) -> Response {
    reply(
        idx,
        json!({ "EvalCreateIndex": 0, "EvalIDs": null, "Index": idx, "NodeModifyIndex": idx }),
    )
}

fn node_drain(sh: &Arc<Shared>, req: Value) -> Response {
    let spec = req.get("DrainSpec").cloned().unwrap_or(Value::Null);
    let meta = req.get("Meta").cloned().unwrap_or(Value::Null);
    let mark_eligible = req
        .get("MarkEligible")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (idx, started, watch) = sh.change(|st, idx, events| {
        let now = now_ns();
        st.node.drain_gen += 1;
        st.node.modify_index = idx;
        let mut started = vec![];
        let mut watch = None;
        if spec.is_null() {
            st.node.drain = None;
            st.node.last_drain["Status"] = json!("canceled");
            st.node.last_drain["UpdatedAt"] = json!(rfc3339(now));
            if mark_eligible {
                st.node.eligible = true;
            }
            st.push_node_event("Drain", "Node drain strategy cancelled", idx);
            if st.node.eligible {
                started = st.unblock(idx, events);
            }
        } else {
            let deadline = spec["Deadline"].as_i64().unwrap_or(0);
            let force = if deadline > 0 { rfc3339(now + deadline) } else if deadline < 0 { rfc3339(now) } else { rfc3339(0) };
            st.node.drain = Some(json!({
                "Deadline": deadline,
                "IgnoreSystemJobs": spec["IgnoreSystemJobs"].as_bool().unwrap_or(false),
                "ForceDeadline": force,
                "StartedAt": rfc3339(now),
            }));
            st.node.eligible = false;
            st.node.last_drain = json!({ "AccessorID": "", "Meta": meta, "StartedAt": rfc3339(now), "Status": "draining", "UpdatedAt": rfc3339(now) });
            st.push_node_event("Drain", "Node drain strategy set", idx);
            let after = if deadline < 0 { Some(Duration::ZERO) } else if deadline > 0 { Some(Duration::from_nanos(deadline as u64)) } else { None };
            watch = Some((st.node.drain_gen, after));
        }
        events.push(st.node_event("NodeDrain"));
        (idx, started, watch)
    });
    sh.start_allocs(started);
    if let Some((generation, after)) = watch {
        tokio::spawn(watch_drain(sh.clone(), generation, after));
    }
    node_update_reply(idx)
}

/// Ends a drain when the node has no live allocation; at the deadline, tells
/// the ones left to stop (they are "migrated": no replacement is placed, as
/// the stand-in has no other node).
async fn watch_drain(sh: Arc<Shared>, generation: u64, after: Option<Duration>) {
    let deadline = after.map(|d| tokio::time::Instant::now() + d);
    let mut index_rx = sh.lock().index_tx.subscribe();
    let mut shutdown = sh.shutdown.subscribe();
    let mut deadline_done = false;
    loop {
        let finished = sh.change(|st, idx, events| {
            if st.node.drain_gen != generation || st.node.drain.is_none() {
                return true;
            }
            let live = st.live_allocs();
            if live.is_empty() {
                st.node.drain = None;
                st.node.modify_index = idx;
                st.node.last_drain["Status"] = json!("complete");
                st.node.last_drain["UpdatedAt"] = json!(rfc3339(now_ns()));
                st.push_node_event("Drain", "Node drain complete", idx);
                events.push(st.node_event("NodeDrain"));
                return true;
            }
            if !deadline_done
                && deadline
                    .map(|d| tokio::time::Instant::now() >= d)
                    .unwrap_or(false)
            {
                deadline_done = true;
                for id in live {
                    st.stop_alloc(&id, "alloc is being migrated", idx, events);
                }
            }
            false
        });
        if finished {
            return;
        }
        let sleep = async {
            match deadline {
                Some(d) if !deadline_done => tokio::time::sleep_until(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            r = index_rx.changed() => if r.is_err() { return },
            _ = sleep => {},
            _ = super::flagged(&mut shutdown) => return,
        }
    }
}

fn node_eligibility(sh: &Arc<Shared>, req: Value) -> Response {
    let eligible = match req.get("Eligibility").and_then(Value::as_str) {
        Some("eligible") => true,
        Some("ineligible") => false,
        other => {
            return err(
                400,
                format!(
                    "invalid scheduling eligibility {:?}",
                    other.unwrap_or_default()
                ),
            )
        }
    };
    if eligible && sh.lock().node.drain.is_some() {
        return err(
            500,
            "can not set node's scheduling eligibility to eligible while it is draining",
        );
    }
    let (idx, started) = sh.change(|st, idx, events| {
        st.node.eligible = eligible;
        st.node.modify_index = idx;
        let msg = if eligible {
            "Node marked as eligible for scheduling"
        } else {
            "Node marked as ineligible for scheduling"
        };
        st.push_node_event("Cluster", msg, idx);
        events.push(st.node_event("NodeEligibility"));
        let started = if eligible {
            st.unblock(idx, events)
        } else {
            vec![]
        };
        (idx, started)
    });
    sh.start_allocs(started);
    node_update_reply(idx)
}

async fn agent_self(AxState(sh): AxState<Arc<Shared>>) -> Response {
    let st = sh.lock();
    reply(
        st.index,
        json!({
            "config": { "Datacenter": DATACENTER, "Region": "global", "NodeName": st.node.name, "Version": { "Version": "1.9.0", "VersionPrerelease": "standin" } },
            "member": { "Name": format!("{}.global", st.node.name), "Addr": "127.0.0.1", "Status": "alive", "Tags": { "dc": DATACENTER, "region": "global" } },
            "stats": {},
        }),
    )
}
