//! The instructor's admin page (`/admin/`), through the real HTTP surface of
//! a whole stack (real Redis and Consul, the Nomad API stand-in with a fake
//! GPU, the ComfyUI stand-in, gateway, dispatcher, gpu-task).
//!
//! - API: the snapshot shows the queue in dispatch order, the running job
//!   with its progress, the stand-in's node with its GPU, Nomad and Consul
//!   reachable; every action works (pause, resume, mode, limits, raise and
//!   lower a job or a participant, cancel, accounts) and bad input gets a
//!   clear JSON 4xx; a participant's code or session gets nowhere; the
//!   websocket pushes a snapshot at once and again when a job is submitted.
//! - Browser: headless Chromium (Debian's) logs in, sees a submitted job's
//!   row appear without a reload, cancels it with its button, pauses and
//!   resumes dispatching and switches the mode with the controls, and saves a
//!   screenshot to `<target>/test-artifacts/admin-page.png`
//!   (`COMFY_MULTI_ARTIFACTS=dir` puts it elsewhere).
//!
//! The stack's own gateway is started before the Nomad stand-in and does not
//! know it, so these tests start a second gateway on the same Redis with the
//! dispatcher's environment (`EXECUTOR=nomad`, `NOMAD_ADDR`); the stack's
//! gateway shows the local-executor view.

use std::ffi::OsStr;
use std::time::Duration;

use comfy_multi_tests::browser::{self, Browser};
use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::wait_until;
use comfy_multi_tests::stack::{start, Executor, StackOptions, ADMIN_TOKEN};
use futures_util::StreamExt;
use reqwest::header::{CONTENT_TYPE, LOCATION, ORIGIN};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);


struct Admin {
    url: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(url: &str) -> Self {
        Admin { url: url.to_string(), http: reqwest::Client::new() }
    }

    async fn snapshot(&self) -> Value {
        let res =
            self.http.get(format!("{}/admin/api/snapshot", self.url)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(res.status(), 200);
        res.json().await.unwrap()
    }

    /// Polls the snapshot until `check` holds; returns that snapshot.
    async fn until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let last = std::sync::Mutex::new(Value::Null);
        let found = wait_until(what, WAIT, || async {
            let s = self.snapshot().await;
            let ok = check(&s);
            *last.lock().unwrap() = s.clone();
            ok.then_some(s)
        })
        .await;
        found.unwrap_or_else(|e| panic!("{e}; last snapshot: {:#}", last.lock().unwrap()))
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}/admin/api/{path}", self.url)).bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text:?}")))
    }

    async fn ok(&self, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.post(path, body).await;
        assert_eq!(status, 200, "{path}: {v}");
        v
    }

    /// A 4xx with a JSON error message containing `needle`.
    async fn refused(&self, path: &str, body: &str, status: u16, needle: &str) {
        let res = self
            .http
            .post(format!("{}/admin/api/{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{path} {body}");
        let v: Value = res.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{path}: no error message in {v}"));
        assert!(msg.contains(needle), "{path} {body}: {msg:?} should mention {needle:?}");
    }
}

fn queue_ids(s: &Value) -> Vec<String> {
    s["queue"].as_array().unwrap().iter().map(|q| q["id"].as_str().unwrap().to_string()).collect()
}

fn queued<'a>(s: &'a Value, id: &str) -> &'a Value {
    s["queue"].as_array().unwrap().iter().find(|q| q["id"] == id).unwrap_or_else(|| panic!("{id} not queued: {s:#}"))
}

fn running<'a>(s: &'a Value, id: &str) -> Option<&'a Value> {
    s["running"].as_array().unwrap().iter().find(|r| r["id"] == id)
}

fn participant(s: &Value, n: u32) -> &Value {
    s["participants"].as_array().unwrap().iter().find(|p| p["user"] == n).unwrap()
}

#[tokio::test]
async fn the_admin_api_shows_the_workshop_and_steers_it() {
    let stack =
        start(StackOptions { node_delay: Duration::from_millis(600), ..StackOptions::new(Executor::Nomad) }).await;
    let url = stack.gateway_url.clone();
    let admin = Admin::new(&url);
    let prompt = || json!({ "prompt": model_free_workflow() });


    // Pause: nothing is dispatched, the snapshot says so and why.
    admin.ok("pause", Some(json!({ "reason": "explaining the next step" }))).await;
    let s = admin.snapshot().await;
    assert_eq!(s["controls"]["paused"], true);
    assert_eq!(s["controls"]["pause_reason"], "explaining the next step");

    let a = stack.submit(1, prompt()).await;
    let b = stack.submit(2, prompt()).await;
    let s = admin.snapshot().await;
    assert_eq!(queue_ids(&s), [a.clone(), b.clone()], "fifo within a tier, fair across users");
    let qa = queued(&s, &a);
    assert_eq!(
        (qa["user"].as_u64(), qa["position"].as_u64(), qa["state"].as_str()),
        (Some(1), Some(1), Some("queued"))
    );
    assert_eq!(qa["tier"], 0);
    assert!(qa["waited_seconds"].is_u64());
    assert!(qa.get("estimated_wait_seconds").is_some());
    assert_eq!(queued(&s, &b)["position"], 2);
    assert_eq!(s["running"], json!([]));
    assert_eq!(participant(&s, 1)["online"], true, "user 1 just submitted with their code");
    assert_eq!(participant(&s, 1)["queued"], 1);
    assert_eq!(participant(&s, 4)["online"], false);

    // Raise and lower a job; raise and lower a participant.
    admin.ok(&format!("jobs/{b}/raise"), None).await;
    let s = admin.snapshot().await;
    assert_eq!(queue_ids(&s), [b.clone(), a.clone()]);
    assert_eq!((queued(&s, &b)["tier"].as_i64(), queued(&s, &b)["job_raised"].as_bool()), (Some(1), Some(true)));
    admin.ok(&format!("jobs/{b}/lower"), None).await;
    assert_eq!(queue_ids(&admin.snapshot().await), [a.clone(), b.clone()]);
    admin.ok("users/2/raise", None).await;
    let s = admin.snapshot().await;
    assert_eq!(queue_ids(&s), [b.clone(), a.clone()]);
    assert_eq!(queued(&s, &b)["user_raised"], true);
    assert_eq!(s["controls"]["raised_users"], json!([2]));
    assert_eq!(participant(&s, 2)["raised"], true);
    admin.ok("users/2/lower", None).await;
    assert_eq!(queue_ids(&admin.snapshot().await), [a.clone(), b.clone()]);
    let (status, err) = admin.post("users/99/raise", None).await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = admin.post(&format!("jobs/{}/raise", uuid::Uuid::new_v4()), None).await;
    assert_eq!(status, 404, "{err}");

    // Mode and limits.
    assert_eq!(admin.ok("mode", Some(json!({ "mode": "fifo" }))).await["mode"], "fifo");
    assert_eq!(admin.snapshot().await["controls"]["mode"], "fifo");
    admin.ok("mode", Some(json!({ "mode": "fair" }))).await;
    assert_eq!(admin.snapshot().await["controls"]["mode"], "fair");
    admin.refused("mode", r#"{"mode": "lifo"}"#, 400, "fifo").await;
    admin.refused("mode", "{}", 400, "fair").await;
    let before = admin.snapshot().await["controls"]["limits"].clone();
    admin.ok("limits", Some(json!({ "max_queued_per_user": 7 }))).await;
    let limits = admin.snapshot().await["controls"]["limits"].clone();
    assert_eq!(limits["max_queued_per_user"], 7);
    assert_eq!(limits["max_running_per_user"], before["max_running_per_user"]);
    assert_eq!(limits["max_queue"], before["max_queue"]);
    admin.refused("limits", r#"{"max_queue": 0}"#, 400, "max_queue").await;
    admin.refused("limits", r#"{"max_queued": 3}"#, 400, "max_queued").await;
    admin.refused("limits", "not json", 400, "body").await;
    admin.refused("limits", r#"{"max_queue": -1}"#, 400, "body").await;
    admin.refused("pause", r#"{"reason": 5}"#, 400, "body").await;

    // Still nothing dispatched while paused.
    let s = admin.snapshot().await;
    assert_eq!(s["running"], json!([]));
    assert_eq!(queue_ids(&s), [a.clone(), b.clone()]);

    // Cancel a queued job.
    let c = admin.ok(&format!("jobs/{b}/cancel"), None).await;
    assert_eq!(c["outcome"], "removed", "{c}");
    let s = admin.snapshot().await;
    assert_eq!(queue_ids(&s), [a.as_str()]);
    assert_eq!(participant(&s, 2)["cancelled"], 1);
    assert_eq!(s["recent"][0]["id"], b.as_str());
    assert_eq!(s["recent"][0]["state"], "cancelled");

    // Resume: A runs; the snapshot shows its progress and the GPU node.
    let r = admin.ok("resume", None).await;
    assert_eq!(r["paused"], false);
    let s = admin
        .until("job A running with progress on the stand-in's node", |s| {
            running(s, &a).is_some_and(|r| r["state"] == "running" && r["progress"]["node"].is_string())
                && s["cluster"]["nodes"][0]["allocations"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(s["controls"]["paused"], false);
    let ra = running(&s, &a).unwrap();
    assert_eq!(ra["user"], 1);
    assert!(ra["elapsed_seconds"].is_u64());
    assert!(ra["progress"].get("value").is_some() && ra["progress"].get("max").is_some());
    let cluster = &s["cluster"];
    assert_eq!(cluster["executor"], "nomad");
    assert_eq!(cluster["nomad_reachable"], true, "{cluster:#}");
    assert_eq!(cluster["consul_reachable"], true, "{cluster:#}");
    assert_eq!(cluster["nodes_scope"], "pool");
    let node = &cluster["nodes"][0];
    assert_eq!((node["status"].as_str(), node["eligibility"].as_str()), (Some("ready"), Some("eligible")));
    assert_eq!(node["drain"], false);
    let gpus = node["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 1, "{node}");
    assert!(gpus[0].as_str().unwrap().starts_with("GPU-"), "{node}");
    assert!(node["allocation_jobs"][0].as_str().unwrap().contains("dispatch"), "{node}");

    // Cancel the running job: it is stopped and ends cancelled.
    let c = admin.ok(&format!("jobs/{a}/cancel"), None).await;
    assert_eq!(c["outcome"], "stopping", "{c}");
    admin
        .until("job A to end cancelled", |s| {
            running(s, &a).is_none()
                && s["recent"].as_array().unwrap().iter().any(|j| j["id"] == a && j["state"] == "cancelled")
        })
        .await;
    let c = admin.ok(&format!("jobs/{a}/cancel"), None).await;
    assert_eq!(c["outcome"], "already_ended");

    // Metrics and the report downloads.
    let s = admin.until("the metrics to count both jobs", |s| s["metrics"]["totals"]["cancelled"] == 2).await;
    assert_eq!(s["metrics"]["totals"]["submitted"], 2, "{:#}", s["metrics"]);
    let res = admin.http.get(format!("{url}/admin/api/report.csv")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()[CONTENT_TYPE].to_str().unwrap().starts_with("text/csv"));
    assert!(res.headers()["content-disposition"].to_str().unwrap().contains("attachment"));
    let csv = res.text().await.unwrap();
    assert!(csv.starts_with("user,submitted,"), "{csv}");
    let res = admin.http.get(format!("{url}/admin/api/report.json")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert_eq!(report["totals"]["submitted"], 2);

    // Accounts: create, reset, disable, enable; codes are shown once.
    let created = admin.ok("accounts", None).await;
    assert_eq!(created["user"], 6, "the stack has 5 participants: {created}");
    let code = created["code"].as_str().unwrap().to_string();
    let as_user =
        |n: u32, code: &str| admin.http.get(format!("{url}/user/{n}/api/queue")).bearer_auth(code.to_string()).send();
    assert_eq!(as_user(6, &code).await.unwrap().status(), 200);
    let reset = admin.ok("accounts/6/reset", None).await;
    let new_code = reset["code"].as_str().unwrap().to_string();
    assert_ne!(new_code, code);
    assert_eq!(as_user(6, &code).await.unwrap().status(), 401);
    assert_eq!(as_user(6, &new_code).await.unwrap().status(), 200);
    assert_eq!(admin.ok("accounts/6/disable", None).await["enabled"], false);
    assert_eq!(as_user(6, &new_code).await.unwrap().status(), 403);
    let s = admin.snapshot().await;
    assert_eq!(participant(&s, 6)["enabled"], false);
    admin.ok("accounts/6/enable", None).await;
    assert_eq!(as_user(6, &new_code).await.unwrap().status(), 200);
    let list = admin.http.get(format!("{url}/admin/api/accounts")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let list: Value = list.json().await.unwrap();
    assert_eq!(list["accounts"].as_array().unwrap().len(), 6);
    assert!(!list.to_string().contains(&new_code), "codes are never listed");
    let (status, _) = admin.post("accounts/42/reset", None).await;
    assert_eq!(status, 404);

    // A page elsewhere cannot use the instructor's credentials.
    let res = admin
        .http
        .post(format!("{url}/admin/api/pause"))
        .bearer_auth(ADMIN_TOKEN)
        .header(ORIGIN, "https://elsewhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(admin.snapshot().await["controls"]["paused"], false);
}

/// Every admin route, as (method, path).
fn admin_routes(job: &str) -> Vec<(Method, String)> {
    let mut routes: Vec<(Method, String)> = [
        "/admin/",
        "/admin/admin.js",
        "/admin/admin.css",
        "/admin/ws",
        "/admin/api/snapshot",
        "/admin/api/report.json",
        "/admin/api/report.csv",
        "/admin/api/accounts",
        "/admin/api/whoami",
    ]
    .into_iter()
    .map(|p| (Method::GET, p.to_string()))
    .collect();
    for p in [
        format!("/admin/api/jobs/{job}/cancel"),
        format!("/admin/api/jobs/{job}/raise"),
        format!("/admin/api/jobs/{job}/lower"),
        "/admin/api/users/1/raise".into(),
        "/admin/api/users/1/lower".into(),
        "/admin/api/pause".into(),
        "/admin/api/resume".into(),
        "/admin/api/mode".into(),
        "/admin/api/limits".into(),
        "/admin/api/accounts".into(),
        "/admin/api/accounts/1/reset".into(),
        "/admin/api/accounts/1/disable".into(),
        "/admin/api/accounts/1/enable".into(),
    ] {
        routes.push((Method::POST, p));
    }
    routes
}

#[tokio::test]
async fn participants_get_nowhere_on_the_admin_routes() {
    let stack = start(StackOptions::new(Executor::Local)).await;
    // With the local executor the page says so instead of listing Nomad nodes.
    let local = Admin::new(&stack.gateway_url).snapshot().await;
    assert_eq!(local["cluster"]["executor"], "local", "{local:#}");
    assert!(local["cluster"]["note"].as_str().unwrap().contains("Local executor"));
    assert_eq!(local["cluster"]["nodes"], json!([]));
    let url = &stack.gateway_url;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let admin = Admin::new(url);
    admin.ok("pause", Some(json!({ "reason": "keep the job queued" }))).await;
    let job = stack.submit(1, json!({ "prompt": model_free_workflow() })).await;

    // A participant's session cookie, from the real login form.
    let res = http.post(format!("{url}/login")).form(&[("user", "1"), ("code", stack.code(1))]).send().await.unwrap();
    assert_eq!(res.status(), 303);
    let session = res.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    assert!(session.starts_with("cm_session="), "{session}");

    for (method, path) in admin_routes(&job) {
        let body = json!({ "mode": "fifo", "max_queue": 1, "reason": "x" });
        // The participant's code as bearer: refused with a JSON error.
        let res = http
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(stack.code(1))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        assert!(status == 401 || status == 403, "{method} {path} with a participant's code: {status}");
        let v: Value = res.json().await.unwrap_or_else(|_| panic!("{method} {path}: not JSON"));
        assert!(v["error"]["message"].is_string(), "{method} {path}: {v}");

        // The participant's session: API routes 401, pages to the login.
        let res = http
            .request(method.clone(), format!("{url}{path}"))
            .header("cookie", &session)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        if path.starts_with("/admin/api/") {
            assert_eq!(status, 401, "{method} {path} with a participant's session");
        } else {
            assert_eq!(status, 303, "{method} {path} with a participant's session");
            assert_eq!(res.headers()[LOCATION], "/admin/login");
        }

        // Nothing at all.
        let res = http.request(method.clone(), format!("{url}{path}")).json(&body).send().await.unwrap();
        let status = res.status().as_u16();
        assert!(status == 401 || status == 303, "{method} {path} without credentials: {status}");
    }

    // Nothing changed.
    let s = admin.snapshot().await;
    assert_eq!(s["controls"]["paused"], true);
    assert_eq!(s["controls"]["pause_reason"], "keep the job queued");
    assert_eq!(s["controls"]["mode"], "fair");
    assert_eq!(s["controls"]["raised_users"], json!([]));
    assert_eq!(queue_ids(&s), [job.as_str()]);
    assert_eq!(queued(&s, &job)["tier"], 0);
    assert_eq!(participant(&s, 1)["enabled"], true);
    assert_eq!(stack.get(1, "queue").send().await.unwrap().status(), 200, "user 1's code still works");

    // The websocket: the instructor gets a snapshot at once, and another when
    // a job is submitted; a participant's code gets no websocket.
    let ws_url = format!("{}/admin/ws", url.replacen("http", "ws", 1));
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", stack.code(1)).parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_err(), "a participant's code opens no admin websocket");
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = next_snapshot(&mut ws).await;
    assert_eq!(queue_ids(&first), [job.as_str()]);
    let second_job = stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let s = next_snapshot(&mut ws).await;
            if queue_ids(&s).contains(&second_job) {
                break;
            }
        }
    })
    .await
    .expect("the websocket pushes the new job");
    ws.close(None).await.ok();
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_snapshot(ws: &mut Ws) -> Value {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a websocket message").expect("open").unwrap();
        if let Message::Text(text) = msg {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v.get("error").is_none(), "{v}");
            return v;
        }
    }
}

// ---------------------------------------------------------------------------
// Headless Chromium
// ---------------------------------------------------------------------------

/// How long the admin script gets for each answer.
const BROWSER_WAIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn the_page_is_live_in_a_real_browser_and_cancels() {
    if browser::skip() {
        return;
    }
    let stack =
        start(StackOptions { node_delay: Duration::from_millis(900), ..StackOptions::new(Executor::Nomad) }).await;
    let url = stack.gateway_url.clone();
    let admin = Admin::new(&url);
    let prompt = || json!({ "prompt": model_free_workflow() });
    let shot = browser::artifacts_dir(env!("CARGO_TARGET_TMPDIR")).join("admin-page.png");
    let _ = std::fs::remove_file(&shot);

    let mut browser = Browser::spawn("admin.mjs", [OsStr::new(&url), OsStr::new(ADMIN_TOKEN), shot.as_os_str()]);
    browser.expect("READY", BROWSER_WAIT).await;

    // A job that runs, and one that waits behind it.
    let running_job = stack.submit(1, prompt()).await;
    admin.until("the first job to be in flight", |s| running(s, &running_job).is_some()).await;
    let waiting = stack.submit(2, prompt()).await;
    browser.send(&format!("WAIT_ROW {waiting}")).await;
    let seen = browser.expect("SEEN", BROWSER_WAIT).await;
    assert!(seen.ends_with(" queue") || seen.ends_with(" running"), "{seen}");

    // Its Cancel button.
    browser.send(&format!("CANCEL {waiting}")).await;
    browser.expect("CANCELLED", BROWSER_WAIT).await;
    let store = dispatcher::queue::Store::connect(&stack.redis_url).await.unwrap();
    let id: dispatcher::JobId = waiting.parse().unwrap();
    wait_until("the cancelled job to end cancelled", WAIT, || {
        let store = store.clone();
        async move { store.get(&id).await.ok()?.filter(|j| j.state == dispatcher::JobState::Cancelled) }
    })
    .await
    .unwrap();

    // The controls: pause (with a reason) and resume, switch the mode.
    browser.send("CLICK #pause").await;
    browser.expect("CLICKED", BROWSER_WAIT).await;
    browser.send("WAIT_TEXT #dispatch-state PAUSED").await;
    browser.expect("TEXT", BROWSER_WAIT).await;
    assert_eq!(admin.snapshot().await["controls"]["paused"], true);
    browser.send("CLICK #resume").await;
    browser.expect("CLICKED", BROWSER_WAIT).await;
    browser.send("WAIT_TEXT #dispatch-state Dispatching").await;
    browser.expect("TEXT", BROWSER_WAIT).await;
    browser.send(r#"CLICK button.mode[data-mode="fifo"]"#).await;
    browser.expect("CLICKED", BROWSER_WAIT).await;
    browser.send("WAIT_TEXT #mode-state First come").await;
    browser.expect("TEXT", BROWSER_WAIT).await;
    assert_eq!(admin.snapshot().await["controls"]["mode"], "fifo");
    browser.send(r#"CLICK button.mode[data-mode="fair"]"#).await;
    browser.expect("CLICKED", BROWSER_WAIT).await;
    browser.send("WAIT_TEXT #mode-state Fair").await;
    browser.expect("TEXT", BROWSER_WAIT).await;

    // Fill the page for the screenshot: more participants waiting.
    let mut more = Vec::new();
    for user in [3, 4, 5] {
        more.push(stack.submit(user, prompt()).await);
    }
    for id in &more {
        browser.send(&format!("WAIT_ROW {id}")).await;
        browser.expect("SEEN", BROWSER_WAIT).await;
    }
    browser.send("SCREENSHOT").await;
    browser.expect("SHOT", BROWSER_WAIT).await;
    browser.send("QUIT").await;
    browser.expect("BYE", BROWSER_WAIT).await;

    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", shot.display());
    assert!(png.len() > 10_000, "the screenshot is suspiciously small ({} bytes)", png.len());
    eprintln!("admin page screenshot: {}", shot.display());
}
