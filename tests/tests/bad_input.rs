//! Bad input through the real HTTP surface of a whole stack (issue 5, "Bad
//! input"): malformed, truncated, huge and deeply nested JSON; prompts with
//! unknown node types, cycles or links to missing nodes; path traversal in
//! `view`, uploads and userdata; another participant's jobs, files and client
//! ids; forged or missing sessions; the internal API without its secret;
//! oversized and non-image uploads.
//!
//! Every case is checked the same way ([`Probe::refused`]): the status is the
//! expected 4xx, the body is ComfyUI's error shape with a message that names
//! the problem, nothing was stored (no job in Redis changed or appeared, no
//! file under the gateway's data folder changed or appeared — a half-written
//! upload would show), and the gateway still answers a valid request. A panic
//! in a handler shows as a request without an answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::wait_until;
use comfy_multi_tests::stack::{stack, Executor, Stack, ADMIN_TOKEN, INTERNAL_SECRET};
use dispatcher::contract::{internal, INTERNAL_SECRET_HEADER};
use dispatcher::queue::Store;
use futures_util::StreamExt;
use reqwest::multipart::{Form, Part};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// What the gateway has stored: every job (state, whether a cancel was
/// asked, outputs) and every file under its data folder (size), except the
/// cache of ComfyUI's answers.
#[derive(Debug, PartialEq)]
struct Snapshot {
    jobs: BTreeMap<String, String>,
    files: BTreeMap<PathBuf, u64>,
}

/// A stack and what the cases need to look at it.
struct Probe {
    stack: Stack,
    store: Store,
    http: reqwest::Client,
}

impl Probe {
    async fn start() -> Probe {
        let stack = stack(Executor::Local).await;
        let store = Store::connect(&stack.redis_url).await.unwrap();
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Probe { stack, store, http }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.stack.gateway_url)
    }

    /// A request to `/user/{user}/api/{path}` with `user`'s access code.
    fn api(&self, method: Method, user: u32, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(&format!("/user/{user}/api/{path}"))).bearer_auth(self.stack.code(user))
    }

    async fn snapshot(&self) -> Snapshot {
        let jobs = self
            .store
            .all_jobs()
            .await
            .unwrap()
            .into_iter()
            .map(|j| (j.id.to_string(), format!("{:?} cancel={} outputs={}", j.state, j.cancel_requested, json!(j.outputs))))
            .collect();
        let mut files = BTreeMap::new();
        walk(&self.stack.data_dir, &self.stack.data_dir, &mut files);
        Snapshot { jobs, files }
    }

    /// The gateway answers its health check and a valid participant request.
    async fn still_serves(&self, what: &str) {
        let health = self.http.get(self.url("/healthz")).send().await;
        assert!(
            health.as_ref().is_ok_and(|r| r.status() == StatusCode::OK),
            "{what}: the gateway stopped serving: {health:?}"
        );
        let queue = self.api(Method::GET, 1, "queue").send().await.unwrap();
        assert_eq!(queue.status(), StatusCode::OK, "{what}: a valid request failed after it");
        let queue: Value = queue.json().await.unwrap();
        assert!(queue["queue_pending"].is_array(), "{what}: {queue}");
    }

    /// Sends `request` and checks it is refused with `want`, a ComfyUI error
    /// whose message contains `names` (case-insensitive), that nothing was
    /// stored and that the gateway still serves. Returns the error body.
    async fn refused(&self, what: &str, request: RequestBuilder, want: StatusCode, names: &str) -> Value {
        let before = self.snapshot().await;
        let res = request.send().await.unwrap_or_else(|e| panic!("{what}: no answer (a panic?): {e:?}"));
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        assert_eq!(status, want, "{what}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not ComfyUI's error shape: {text:?}"));
        assert_comfy_error(what, &body);
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.to_lowercase().contains(&names.to_lowercase()),
            "{what}: the message {message:?} does not name the problem ({names:?})"
        );
        assert_eq!(self.snapshot().await, before, "{what}: something was stored");
        self.still_serves(what).await;
        body
    }

    /// Waits until the dispatcher has nothing queued or running.
    async fn idle(&self) {
        wait_until("every job to end", Duration::from_secs(90), || async {
            let jobs = self.store.all_jobs().await.ok()?;
            jobs.iter().all(|j| j.state.is_terminal()).then_some(())
        })
        .await
        .unwrap();
    }

    /// Uploads `bytes` as `name` into `user`'s input folder; the stored name.
    async fn upload(&self, user: u32, name: &str, bytes: Vec<u8>) -> String {
        let res = self.api(Method::POST, user, "upload/image").multipart(image_form(name, bytes)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json::<Value>().await.unwrap()["name"].as_str().unwrap().to_string()
    }

    /// The `sid` the editor socket of `user` gets when it asks for `client_id`.
    async fn socket_sid(&self, user: u32, code: &str, client_id: &str) -> Result<String, StatusCode> {
        let base = self.stack.gateway_url.replacen("http://", "ws://", 1);
        let mut request = format!("{base}/user/{user}/ws?clientId={client_id}").into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {code}").parse().unwrap());
        let (mut stream, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(ok) => ok,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => return Err(StatusCode::from_u16(r.status().as_u16()).unwrap()),
            Err(e) => panic!("user {user}: {e}"),
        };
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("a status on connect");
            if let Some(Ok(Message::Text(text))) = frame {
                let hello: Value = serde_json::from_str(text.as_str()).unwrap();
                return Ok(hello["data"]["sid"].as_str().expect("a sid").to_string());
            }
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, u64>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if rel == Path::new("cache") {
            continue;
        }
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk(root, &path, out);
        } else {
            out.insert(rel, meta.len());
        }
    }
}

/// ComfyUI's error shape: `{error: {type, message, details, extra_info}, node_errors}`.
fn assert_comfy_error(what: &str, body: &Value) {
    assert!(body["error"]["type"].as_str().is_some_and(|t| !t.is_empty()), "{what}: {body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {body}");
    assert!(body["error"]["details"].is_string(), "{what}: {body}");
    assert!(body["error"]["extra_info"].is_object(), "{what}: {body}");
    assert!(body["node_errors"].is_object(), "{what}: {body}");
}

/// A real `w`×`h` PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    let pixels: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 % 251) as u8).collect();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    out
}

/// ComfyUI's upload form: the `image` file field, plus `fields`. File names
/// go as they are (no percent-encoding by the client).
fn upload_form(name: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> Form {
    let mut form = Form::new()
        .percent_encode_noop()
        .part("image", Part::bytes(bytes).file_name(name.to_string()).mime_str("image/png").unwrap());
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    form
}

fn image_form(name: &str, bytes: Vec<u8>) -> Form {
    upload_form(name, bytes, &[])
}

fn prompt_body(prompt: Value) -> String {
    json!({ "prompt": prompt, "client_id": "bad-input" }).to_string()
}

/// JSON that is malformed, truncated, huge or nested 10,000 deep; prompts
/// with unknown node types, cycles, links to missing nodes.
#[tokio::test]
async fn bad_json_and_bad_prompts_are_refused() {
    let p = Probe::start().await;
    let good = prompt_body(model_free_workflow());
    let post = |path: &str, body: Vec<u8>| p.api(Method::POST, 2, path).header("content-type", "application/json").body(body);

    // The body itself.
    let deep_array = format!("{{\"prompt\": {{\"1\": {{\"class_type\": \"SaveImage\", \"inputs\": {{\"images\": {}1{}}}}}}}}}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_object = format!("{}{{}}{}", "{\"a\": ".repeat(10_000), "}".repeat(10_000));
    let huge = format!("{{\"prompt\": {}, \"extra_data\": {{\"pad\": \"{}\"}}}}", model_free_workflow(), "x".repeat(50 << 20));
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        ("malformed JSON", b"{\"prompt\": {\"1\": {class_type: EmptyImage}}}".to_vec(), StatusCode::BAD_REQUEST, "not valid JSON"),
        ("truncated JSON", good.as_bytes()[..good.len() / 2].to_vec(), StatusCode::BAD_REQUEST, "not valid JSON"),
        ("empty body", Vec::new(), StatusCode::BAD_REQUEST, "not valid JSON"),
        ("not UTF-8", b"{\"prompt\": \"\xff\xfe\"}".to_vec(), StatusCode::BAD_REQUEST, "not valid JSON"),
        ("a 50 MiB body", huge.into_bytes(), StatusCode::PAYLOAD_TOO_LARGE, "limit"),
        ("arrays nested 10,000 deep", deep_array.into_bytes(), StatusCode::BAD_REQUEST, "nested too deeply"),
        ("objects nested 10,000 deep", deep_object.into_bytes(), StatusCode::BAD_REQUEST, "nested too deeply"),
        ("no prompt", b"{\"client_id\": \"x\"}".to_vec(), StatusCode::BAD_REQUEST, "No prompt provided"),
        ("not an object", b"[1,2,3]".to_vec(), StatusCode::BAD_REQUEST, "must be a JSON object"),
        ("a prompt that is not nodes", br#"{"prompt": [1, 2]}"#.to_vec(), StatusCode::BAD_REQUEST, "object of nodes"),
        ("a node without class_type", br#"{"prompt": {"1": {"inputs": {}}}}"#.to_vec(), StatusCode::BAD_REQUEST, "class_type"),
    ];
    for (what, body, want, names) in cases {
        p.refused(&format!("POST prompt, {what}"), post("prompt", body), want, names).await;
    }

    // Participants that do not exist, with a real participant's code.
    for (user, names) in [(9, "no participant 9"), (0, "no participant 0")] {
        let url = p.url(&format!("/user/{user}/api/prompt"));
        let request = p.http.post(url).bearer_auth(p.stack.code(2)).header("content-type", "application/json");
        p.refused(&format!("POST prompt as participant {user}"), request.body(good.clone()), StatusCode::NOT_FOUND, names).await;
    }

    // The prompt: ComfyUI's own answers (shared/comfyui-samples/).
    let mut unknown = model_free_workflow();
    unknown["2"]["class_type"] = json!("NoSuchNode");
    let body = p.refused("unknown node type", post("prompt", prompt_body(unknown).into_bytes()), StatusCode::BAD_REQUEST, "NoSuchNode").await;
    assert_eq!(body["error"]["type"], "invalid_prompt", "{body}");
    assert_eq!(body["error"]["message"], "Cannot execute because node NoSuchNode does not exist.", "{body}");
    assert_eq!(body["error"]["details"], "Node ID '#2'", "{body}");

    let mut missing = model_free_workflow();
    missing["6"]["inputs"]["image"] = json!(["99", 0]);
    let body = p.refused("link to a missing node", post("prompt", prompt_body(missing).into_bytes()), StatusCode::BAD_REQUEST, "failed validation").await;
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation", "{body}");
    assert_eq!(body["node_errors"]["6"]["errors"][0]["details"], "'99'", "{body}");
    assert_eq!(body["node_errors"]["6"]["class_type"], "ImageScale", "{body}");

    let mut cycle = model_free_workflow();
    cycle["2"]["inputs"]["image"] = json!(["6", 0]);
    let body = p.refused("a cycle", post("prompt", prompt_body(cycle).into_bytes()), StatusCode::BAD_REQUEST, "cycle").await;
    assert_eq!(body["error"]["type"], "invalid_prompt", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    for node in ["#2", "#5", "#6"] {
        assert!(message.contains(node), "the cycle's nodes are named: {message}");
    }
    let mut own = model_free_workflow();
    own["6"]["inputs"]["image"] = json!(["6", 0]);
    p.refused("a node linked to itself", post("prompt", prompt_body(own).into_bytes()), StatusCode::BAD_REQUEST, "cycle").await;

    // The other JSON bodies participants send.
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let bodies = [
        ("queue", "delete", "JSON of the wrong shape"),
        ("interrupt", "prompt_id", "JSON of the wrong shape"),
        ("jobs/cancel", "job_ids", "JSON of the wrong shape"),
        ("settings", "Comfy.Theme", "nested too deeply"),
        ("settings/Comfy.Theme", "value", "nested too deeply"),
    ];
    for (path, field, names) in bodies {
        p.refused(&format!("POST {path}, malformed JSON"), post(path, format!("{{\"{field}\" 1}}").into_bytes()), StatusCode::BAD_REQUEST, "not valid JSON").await;
        let body = format!("{{\"{field}\": {deep}}}");
        p.refused(&format!("POST {path}, nested 10,000 deep"), post(path, body.into_bytes()), StatusCode::BAD_REQUEST, names).await;
    }
    p.refused("POST settings, 50 MiB", post("settings", vec![b' '; 50 << 20]), StatusCode::PAYLOAD_TOO_LARGE, "limit").await;
    p.refused("POST userdata, 50 MiB", post("userdata/workflows%2Fbig.json", vec![b' '; 50 << 20]), StatusCode::PAYLOAD_TOO_LARGE, "limit").await;

    // Still serving real work: a good prompt runs to the end.
    let id = p.stack.submit(2, json!({ "prompt": model_free_workflow() })).await;
    let entry = p.stack.finished(2, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
}

/// `../`, absolute paths, encoded and double-encoded variants, backslashes
/// and NUL in `view`, uploads and userdata.
#[tokio::test]
async fn path_traversal_is_refused() {
    let p = Probe::start().await;
    // Something worth reaching: participant 3's file, the gateway's secrets.
    let theirs = p.upload(3, "theirs.png", png(4, 4)).await;
    assert!(p.stack.data_dir.join("secrets/access-codes.txt").is_file());

    let bad_names = [
        ("../", "../../../secrets/access-codes.txt", "not an allowed"),
        ("../ into another user", "../../3/input/theirs.png", "not an allowed"),
        ("absolute", "/etc/passwd", "not an allowed"),
        ("encoded", "%2e%2e%2f%2e%2e%2f%2e%2e%2fsecrets%2faccess-codes.txt", "not an allowed"),
        ("double-encoded", "%252e%252e%252fsecrets%252faccess-codes.txt", "not an allowed"),
        ("backslashes", "..\\..\\..\\secrets\\access-codes.txt", "not an allowed"),
        ("NUL", "theirs.png%00.png", "not an allowed"),
        ("dot-dot", "..", "not an allowed"),
    ];
    for (what, name, names) in bad_names {
        // `name` goes into the query as is: `%2e` arrives decoded once.
        let req = p.api(Method::GET, 2, &format!("view?filename={name}&type=input"));
        p.refused(&format!("view, filename {what}"), req, StatusCode::BAD_REQUEST, names).await;
        let req = p.api(Method::GET, 2, &format!("view?filename={theirs}&subfolder={name}&type=input"));
        p.refused(&format!("view, subfolder {what}"), req, StatusCode::BAD_REQUEST, names).await;
    }
    let req = p.api(Method::GET, 2, "view?filename=access-codes.txt&type=../../secrets");
    p.refused("view, type ../", req, StatusCode::BAD_REQUEST, "unknown file type").await;
    let req = p.api(Method::GET, 2, "view?type=input");
    p.refused("view, no filename", req, StatusCode::BAD_REQUEST, "not an allowed").await;

    // Uploads: the file name, the subfolder and the type.
    let raw_names = [
        ("../", "../../3/input/evil.png"),
        ("absolute", "/tmp/evil.png"),
        ("encoded", "..%2f..%2f3%2finput%2fevil.png"),
        ("double-encoded", "..%252f..%252fevil.png"),
        ("encoded inside a name", "x%2f..%2f..%2f3%2finput%2fevil.png"),
        ("double-encoded inside a name", "x%252f%252e%252e%252fevil.png"),
        ("backslashes", "..\\..\\evil.png"),
        ("hidden", ".evil.png"),
    ];
    for endpoint in ["upload/image", "upload/mask"] {
        for (what, name) in raw_names {
            let form = upload_form(name, png(4, 4), &[("original_ref", r#"{"filename": "theirs.png", "type": "input"}"#)]);
            let req = p.api(Method::POST, 3, endpoint).multipart(form);
            p.refused(&format!("{endpoint}, file name {what}"), req, StatusCode::BAD_REQUEST, "not an allowed").await;
            let form = upload_form("evil.png", png(4, 4), &[("subfolder", name), ("original_ref", r#"{"filename": "theirs.png", "type": "input"}"#)]);
            let req = p.api(Method::POST, 3, endpoint).multipart(form);
            p.refused(&format!("{endpoint}, subfolder {what}"), req, StatusCode::BAD_REQUEST, "not").await;
        }
        let form = upload_form("evil.png", png(4, 4), &[("subfolder", "/etc"), ("original_ref", r#"{"filename": "theirs.png"}"#)]);
        p.refused(&format!("{endpoint}, absolute subfolder"), p.api(Method::POST, 3, endpoint).multipart(form), StatusCode::BAD_REQUEST, "relative").await;
        let form = upload_form("evil.png", png(4, 4), &[("type", "../../secrets")]);
        p.refused(&format!("{endpoint}, type ../"), p.api(Method::POST, 3, endpoint).multipart(form), StatusCode::BAD_REQUEST, "input").await;
    }
    let form = upload_form("mask.png", png(4, 4), &[("original_ref", r#"{"filename": "../../../secrets/access-codes.txt", "type": "input"}"#)]);
    p.refused("upload/mask, original_ref ../", p.api(Method::POST, 3, "upload/mask").multipart(form), StatusCode::BAD_REQUEST, "not among your files").await;
    let req = p.api(Method::GET, 2, "../internal/files/..%2F..%2Fsecrets");
    p.refused("internal/files, type ../", req, StatusCode::BAD_REQUEST, "unknown file type").await;

    // Userdata: the path is one URL segment (`%2F` for `/`).
    let bad_paths = [
        ("../", "..%2F..%2F..%2Fsecrets%2Faccess-codes.txt"),
        ("../ into another user", "..%2F..%2F3%2Fuserdata%2Fcomfy.settings.json"),
        ("absolute", "%2Fetc%2Fpasswd"),
        ("double-encoded", "%252e%252e%252f%252e%252e%252fsecrets%252faccess-codes.txt"),
        ("backslashes", "..%5C..%5Csecrets%5Caccess-codes.txt"),
        ("NUL", "workflows%2Fa%00.json"),
        ("workflows/../../", "workflows%2F..%2F..%2F..%2Fsecrets%2Faccess-codes.txt"),
    ];
    for (what, path) in bad_paths {
        for method in [Method::GET, Method::POST, Method::DELETE] {
            let req = p.api(method.clone(), 2, &format!("userdata/{path}")).body("{}");
            p.refused(&format!("{method} userdata, {what}"), req, StatusCode::BAD_REQUEST, "not allowed").await;
        }
        let req = p.api(Method::POST, 2, &format!("userdata/workflows%2Fa.json/move/{path}"));
        p.refused(&format!("move userdata, {what}"), req, StatusCode::BAD_REQUEST, "not allowed").await;
        let req = p.api(Method::GET, 2, &format!("userdata?dir={path}"));
        p.refused(&format!("list userdata, {what}"), req, StatusCode::BAD_REQUEST, "not allowed").await;
        let req = p.api(Method::GET, 2, &format!("v2/userdata?path={path}"));
        p.refused(&format!("v2 userdata, {what}"), req, StatusCode::BAD_REQUEST, "not allowed").await;
    }
}

/// Another participant's job ids, files, client ids and sessions.
#[tokio::test]
async fn another_participants_things_stay_theirs() {
    let p = Probe::start().await;
    // Participant 2's job waits in the queue (dispatching paused).
    p.store.pause("bad input test").await.unwrap();
    let queued = p.stack.submit(2, json!({ "prompt": model_free_workflow() })).await;

    let not_found = StatusCode::NOT_FOUND;
    p.refused("history of another's job", p.api(Method::GET, 3, &format!("history/{queued}")), not_found, "no job").await;
    let req = p.api(Method::POST, 3, "interrupt").json(&json!({ "prompt_id": queued }));
    p.refused("interrupt another's job", req, not_found, "no job").await;
    p.refused("cancel another's job", p.api(Method::POST, 3, &format!("jobs/{queued}/cancel")), not_found, "no job").await;
    // ComfyUI's `POST /queue {delete}` and `jobs/cancel` skip ids they do not
    // have (200); another's job is one of those.
    let before = p.snapshot().await;
    let res = p.api(Method::POST, 3, "queue").json(&json!({ "delete": [queued] })).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let res = p.api(Method::POST, 3, "jobs/cancel").json(&json!({ "job_ids": [queued] })).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap(), json!({ "cancelled": false }));
    assert_eq!(p.snapshot().await, before, "another's queue edits changed nothing");
    let res = p.api(Method::GET, 2, &format!("history/{queued}")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the owner still sees it");

    // Its outputs, once it ran.
    p.store.resume().await.unwrap();
    let entry = p.stack.finished(2, &queued).await;
    p.idle().await;
    let image = &entry["outputs"]["7"]["images"][0];
    let (file, sub) = (image["filename"].as_str().unwrap(), image["subfolder"].as_str().unwrap());
    let view = format!("view?filename={file}&subfolder={sub}&type=output");
    assert_eq!(p.api(Method::GET, 2, &view).send().await.unwrap().status(), StatusCode::OK, "the owner sees it");
    p.refused("view another's output", p.api(Method::GET, 3, &view), not_found, "no file").await;
    p.refused("history of another's finished job", p.api(Method::GET, 3, &format!("history/{queued}")), not_found, "no job").await;

    // Another's uploaded file, by name.
    let mine = p.upload(2, "mine.png", png(4, 4)).await;
    p.refused("view another's upload", p.api(Method::GET, 3, &format!("view?filename={mine}&type=input")), not_found, "no file").await;
    let form = upload_form("mask.png", png(4, 4), &[("original_ref", &json!({ "filename": mine, "type": "input" }).to_string())]);
    p.refused("mask onto another's upload", p.api(Method::POST, 3, "upload/mask").multipart(form), StatusCode::BAD_REQUEST, "not among your files").await;

    // Another's websocket client id: replaced by a fresh one.
    let two = p.socket_sid(2, p.stack.code(2), "").await.unwrap();
    assert_eq!(p.socket_sid(2, p.stack.code(2), &two).await.unwrap(), two, "the owner keeps their client id");
    let three = p.socket_sid(3, p.stack.code(3), &two).await.unwrap();
    assert_ne!(three, two, "participant 3 must not get participant 2's client id");
    assert_eq!(p.socket_sid(3, p.stack.code(2), &two).await, Err(StatusCode::UNAUTHORIZED), "2's code at 3's socket");

    // Sessions: a real one of participant 2, used as 3; forged, malformed, missing ones.
    let login = p
        .http
        .post(p.url("/login"))
        .form(&[("user", "2"), ("code", p.stack.code(2))])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    let session = set_cookie.split(';').next().unwrap().to_string();
    assert!(session.starts_with("cm_session="), "{set_cookie}");
    let queue = |user: u32| p.http.get(p.url(&format!("/user/{user}/api/queue")));
    assert_eq!(queue(2).header("cookie", &session).send().await.unwrap().status(), StatusCode::OK, "the session works for 2");
    let unauthorized = StatusCode::UNAUTHORIZED;
    p.refused("2's session at 3", queue(3).header("cookie", &session), unauthorized, "logged in as participant 2").await;
    let forged = format!("cm_session={}", "0123456789abcdef".repeat(4));
    p.refused("a forged session", queue(2).header("cookie", forged), unauthorized, "log in again").await;
    p.refused("a malformed session", queue(2).header("cookie", "cm_session=../../etc/passwd"), unauthorized, "log in again").await;
    p.refused("no session", queue(2), unauthorized, "log in first").await;
    p.refused("2's code at 3", queue(3).bearer_auth(p.stack.code(2)), unauthorized, "wrong access code").await;
    p.refused("2's code submitting as 3", p.http.post(p.url("/user/3/api/prompt")).bearer_auth(p.stack.code(2)).body(prompt_body(model_free_workflow())), unauthorized, "wrong access code").await;
    p.refused("no session, upload", p.http.post(p.url("/user/2/api/upload/image")).multipart(image_form("x.png", png(4, 4))), unauthorized, "log in first").await;
}

/// The internal API without its secret; oversized and non-image uploads.
#[tokio::test]
async fn the_internal_api_needs_its_secret_and_uploads_must_be_media() {
    let p = Probe::start().await;
    p.store.pause("bad input test").await.unwrap();
    let job = p.stack.submit(1, json!({ "prompt": model_free_workflow() })).await;

    let outputs = format!("{}?node=7&kind=images&index=0&filename=evil.png&type=output", internal::outputs(&job));
    let routes = [
        (Method::GET, internal::workflow(&job), Vec::new()),
        (Method::POST, internal::started(&job), Vec::new()),
        (Method::POST, internal::events(&job), json!({"type": "progress", "data": {"value": 1, "max": 2}}).to_string().into_bytes()),
        (Method::PUT, outputs, png(4, 4)),
        (Method::POST, internal::preview(&job), [1u32.to_be_bytes().as_slice(), &1u32.to_be_bytes(), &png(4, 4)].concat()),
        (Method::POST, internal::finished(&job), json!({"success": true}).to_string().into_bytes()),
        (Method::GET, internal::input(&job, "theirs.png"), Vec::new()),
    ];
    let wrong_secret = format!("{INTERNAL_SECRET}x");
    let secrets: [(&str, Option<(&str, &str)>); 5] = [
        ("no secret", None),
        ("a wrong secret", Some((INTERNAL_SECRET_HEADER, "not-the-secret"))),
        ("the secret and more", Some((INTERNAL_SECRET_HEADER, &wrong_secret))),
        ("a participant's code", Some(("authorization", &format!("Bearer {}", p.stack.code(1))))),
        ("the admin token", Some(("authorization", &format!("Bearer {ADMIN_TOKEN}")))),
    ];
    for (method, path, body) in &routes {
        for (what, header) in &secrets {
            let mut req = p.http.request(method.clone(), p.url(path)).header("content-type", "application/json").body(body.clone());
            if let Some((k, v)) = header {
                req = req.header(*k, *v);
            }
            p.refused(&format!("{method} {path} with {what}"), req, StatusCode::UNAUTHORIZED, INTERNAL_SECRET_HEADER).await;
        }
    }
    // With the secret it answers (the job waits, so it is not in flight).
    let res = p.http.get(p.url(&internal::workflow(&job))).header(INTERNAL_SECRET_HEADER, INTERNAL_SECRET).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);

    // Uploads: too large, not media, not a complete image.
    let mut oversized = png(4, 4);
    oversized.resize(100 * 1024 * 1024 + 512 * 1024, 0);
    let req = p.api(Method::POST, 1, "upload/image").multipart(image_form("big.png", oversized));
    p.refused("an upload just over 100 MiB", req, StatusCode::PAYLOAD_TOO_LARGE, "100 MiB").await;
    let mut huge = png(4, 4);
    huge.resize(110 * 1024 * 1024, 0);
    let req = p.api(Method::POST, 1, "upload/image").multipart(image_form("huge.png", huge));
    p.refused("a 110 MiB upload", req, StatusCode::PAYLOAD_TOO_LARGE, "100 MiB").await;

    let full = png(64, 64);
    let not_images: [(&str, &str, Vec<u8>); 6] = [
        ("text named .png", "notes.png", b"just some text, not a picture\n".to_vec()),
        ("a truncated PNG", "cut.png", full[..full.len() / 2].to_vec()),
        ("a PNG without its end", "noend.png", full[..full.len() - 12].to_vec()),
        ("PNG magic then garbage", "magic.png", [&full[..8], b"garbage garbage garbage garbage".as_slice()].concat()),
        ("an empty file", "empty.png", Vec::new()),
        ("HTML with PNG bytes", "page.html", full.clone()),
    ];
    for endpoint in ["upload/image", "upload/mask"] {
        for (what, name, bytes) in &not_images {
            let form = upload_form(name, bytes.clone(), &[("original_ref", r#"{"filename": "x.png", "type": "input"}"#)]);
            let req = p.api(Method::POST, 1, endpoint).multipart(form);
            p.refused(&format!("{endpoint}: {what}"), req, StatusCode::BAD_REQUEST, name).await;
        }
    }
    let req = p.api(Method::POST, 1, "upload/image").json(&json!({"image": "x.png"}));
    p.refused("an upload that is not multipart", req, StatusCode::BAD_REQUEST, "multipart").await;
    let req = p.api(Method::POST, 1, "upload/image").multipart(Form::new().text("subfolder", "x"));
    p.refused("an upload without a file", req, StatusCode::BAD_REQUEST, "image").await;

    // A good upload still works.
    assert_eq!(p.upload(1, "fine.png", full).await, "fine.png");
}
