//! The HTTP and websocket routes of ComfyUI 0.3.64 that the project talks
//! to, each also under `/api/…` like the real server, and the handle that
//! starts and stops the stand-in.
//!
//! Why it exists: gpu-task and the gateway speak to ComfyUI over these
//! routes; tests run them against this server, so status codes, bodies and
//! headers follow ComfyUI's `server.py` (see `shared/comfyui-api.md` B.1).
//! Deliberate differences are listed in the module docs of [`super`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::executor;
use super::json::{dumps_python, jobj, Json, Map};
use super::messages::{QueueItem, FEATURE_FLAGS, MAX_UPLOAD_SIZE};
use super::nodes::{node_info, object_info};
use super::paths::{content_type, is_within, lexical_join, normpath, split, Dirs};
use super::state::Shared;
use super::validate::{validate_prompt, Rejected};
use super::Options;

/// Extra-data keys ComfyUI keeps out of the queue and history.
const SENSITIVE_EXTRA_DATA_KEYS: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];

/// State of the axum handlers.
#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
}

/// A running ComfyUI stand-in. Dropping it stops it: the listener closes,
/// websockets end, the executor stops and the temp directory is removed.
pub struct ComfyUi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    executor: JoinHandle<()>,
    _temp: tempfile::TempDir,
}

impl ComfyUi {
    /// Starts the stand-in in this process on a free loopback port.
    pub async fn start(opts: Options) -> anyhow::Result<ComfyUi> {
        ComfyUi::bind(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts the stand-in listening on `listen` (port 0 picks a free one).
    pub async fn bind(listen: SocketAddr, opts: Options) -> anyhow::Result<ComfyUi> {
        anyhow::ensure!(!opts.output_dir.as_os_str().is_empty(), "the output directory is not set");
        anyhow::ensure!(!opts.input_dir.as_os_str().is_empty(), "the input directory is not set");
        let output = ready_dir(&opts.output_dir)?;
        let input = ready_dir(&opts.input_dir)?;
        let temp = tempfile::Builder::new()
            .prefix("comfyui-standin-temp-")
            .tempdir()
            .context("creating the temp directory")?;
        let dirs = Dirs { output, input, temp: temp.path().canonicalize().context("resolving the temp directory")? };

        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        let shared = Arc::new(Shared::new(dirs, opts.node_delay));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let app = router(App { shared: shared.clone(), shutdown: shutdown_rx.clone() });

        let executor = tokio::spawn(executor::run(shared));
        let mut stop = shutdown_rx;
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the ComfyUI stand-in stopped serving");
            }
        });
        tracing::info!(%addr, "ComfyUI stand-in listening");
        Ok(ComfyUi { url: format!("http://{addr}"), addr, shutdown, server: Some(server), executor, _temp: temp })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops and waits (up to `grace`) until open connections are closed.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        self.executor.abort();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(grace, server).await;
        }
    }
}

impl Drop for ComfyUi {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.executor.abort();
    }
}

/// Creates `dir` if needed and returns its absolute, resolved path.
fn ready_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))
}

fn routes() -> Router<App> {
    Router::new()
        .route("/ws", get(websocket))
        .route("/embeddings", get(|| async { json(StatusCode::OK, &Vec::<String>::new()) }))
        .route("/extensions", get(|| async { json(StatusCode::OK, &Vec::<String>::new()) }))
        .route("/features", get(|| async { json(StatusCode::OK, &FEATURE_FLAGS) }))
        .route("/system_stats", get(system_stats))
        .route("/prompt", get(get_prompt).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{prompt_id}", get(get_history_entry))
        .route("/interrupt", post(post_interrupt))
        .route("/free", post(|| async { StatusCode::OK }))
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/object_info", get(get_object_info))
        .route("/object_info/{node_class}", get(get_node_info))
}

fn router(app: App) -> Router {
    Router::new()
        .merge(routes())
        .nest("/api", routes())
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_SIZE as usize))
        .with_state(app)
}

/// `web.json_response`: Python's `json.dumps` text.
fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    let mut response = (status, dumps_python(body)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    response
}

/// A 400 with ComfyUI's error body.
fn rejected(r: &Rejected) -> Response {
    json(StatusCode::BAD_REQUEST, &r.body())
}

/// A JSON request body as ComfyUI's `request.json()` reads it (any content type).
fn body_object(body: &Bytes) -> Option<Map<Json>> {
    match Json::parse(body) {
        Ok(Json::Object(o)) => Some(o),
        _ => None,
    }
}

async fn get_prompt(State(app): State<App>) -> Response {
    json(StatusCode::OK, &app.shared.queue_info())
}

/// `POST /prompt` (server.py `post_prompt`).
async fn post_prompt(State(app): State<App>, body: Bytes) -> Response {
    tracing::info!("got prompt");
    let Some(request) = body_object(&body) else {
        // ComfyUI answers 500 here; a 400 says the same more politely.
        return rejected(&Rejected::plain("invalid_prompt", "The request body is not a JSON object.", ""));
    };
    let number = match request.get("number") {
        Some(n) => match n.py_number().or_else(|| n.as_str().and_then(|s| s.trim().parse().ok())) {
            Some(f) => Json::from(f),
            None => return rejected(&Rejected::plain("invalid_prompt", "number is not a number", &n.py_str())),
        },
        None => Json::from(app.shared.next_number(request.get("front").is_some_and(Json::truthy))),
    };
    let Some(prompt) = request.get("prompt") else {
        return rejected(&Rejected::plain("no_prompt", "No prompt provided", "No prompt provided"));
    };
    let prompt_id = request.get("prompt_id").map(Json::py_str).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let Json::Object(mut prompt) = prompt.clone() else {
        // ComfyUI fails with a 500 on a prompt that is not an object.
        return rejected(&Rejected::plain(
            "invalid_prompt",
            "Cannot execute because the prompt is not an object.",
            prompt.py_type_name(),
        ));
    };
    let partial = request.get("partial_execution_targets").and_then(Json::as_array).map(Vec::as_slice);
    let valid = validate_prompt(&mut prompt, partial, &app.shared.dirs);
    let mut extra_data = match request.get("extra_data") {
        None => Map::new(),
        Some(Json::Object(o)) => o.clone(),
        Some(other) => {
            return rejected(&Rejected::plain("invalid_prompt", "extra_data is not an object", other.py_type_name()))
        }
    };
    if let Some(client_id) = request.get("client_id") {
        extra_data.insert("client_id", client_id.clone());
    }
    match valid {
        Ok(accepted) => {
            for key in SENSITIVE_EXTRA_DATA_KEYS {
                extra_data.remove(key);
            }
            app.shared.put(QueueItem {
                number: number.clone(),
                prompt_id: prompt_id.clone(),
                prompt,
                extra_data,
                outputs: accepted.outputs,
            });
            json(
                StatusCode::OK,
                &jobj! { "prompt_id" => prompt_id, "number" => number, "node_errors" => Json::Object(accepted.node_errors) },
            )
        }
        Err(rejection) => {
            tracing::warn!(error = %rejection.error, "invalid prompt");
            rejected(&rejection)
        }
    }
}

/// `GET /queue`: running and pending items as 5-tuples.
async fn get_queue(State(app): State<App>) -> Response {
    #[derive(Serialize)]
    struct Queue {
        queue_running: Vec<QueueItem>,
        queue_pending: Vec<QueueItem>,
    }
    let (queue_running, queue_pending) = app.shared.queue();
    json(StatusCode::OK, &Queue { queue_running, queue_pending })
}

/// `POST /queue {clear?, delete?}`.
async fn post_queue(State(app): State<App>, body: Bytes) -> Response {
    let Some(request) = body_object(&body) else { return StatusCode::BAD_REQUEST.into_response() };
    if request.get("clear").is_some_and(Json::truthy) {
        app.shared.wipe_queue();
    }
    for id in request.get("delete").and_then(Json::as_array).into_iter().flatten() {
        if let Some(id) = id.as_str() {
            app.shared.delete_queued(id);
        }
    }
    StatusCode::OK.into_response()
}

/// `GET /history?max_items=&offset=`.
async fn get_history(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let parse = |key: &str| q.get(key).map(|v| v.trim().parse::<i64>());
    let max_items = match parse("max_items") {
        None => None,
        Some(Ok(n)) => Some(n.max(0) as usize),
        Some(Err(_)) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let offset = match parse("offset") {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return StatusCode::BAD_REQUEST.into_response(),
    };
    json(StatusCode::OK, &app.shared.history(max_items, offset))
}

/// `GET /history/{prompt_id}`: `{id: entry}` or `{}`.
async fn get_history_entry(State(app): State<App>, UrlPath(prompt_id): UrlPath<String>) -> Response {
    let mut out = Map::new();
    if let Some(entry) = app.shared.history_of(&prompt_id) {
        out.insert(prompt_id, entry);
    }
    json(StatusCode::OK, &out)
}

/// `POST /history {clear?, delete?}`.
async fn post_history(State(app): State<App>, body: Bytes) -> Response {
    let Some(request) = body_object(&body) else { return StatusCode::BAD_REQUEST.into_response() };
    if request.get("clear").is_some_and(Json::truthy) {
        app.shared.wipe_history();
    }
    for id in request.get("delete").and_then(Json::as_array).into_iter().flatten() {
        if let Some(id) = id.as_str() {
            app.shared.delete_history(id);
        }
    }
    StatusCode::OK.into_response()
}

/// `POST /interrupt {prompt_id?}`: targeted only if that prompt is running.
async fn post_interrupt(State(app): State<App>, body: Bytes) -> Response {
    let request = body_object(&body).unwrap_or_default();
    match request.get("prompt_id").filter(|id| id.truthy()) {
        Some(id) => {
            let id = id.as_str().unwrap_or("\u{0}");
            if app.shared.interrupt(Some(id)) {
                tracing::info!(prompt_id = id, "interrupting prompt");
            } else {
                tracing::info!(prompt_id = id, "prompt is not currently running, skipping interrupt");
            }
        }
        None => {
            tracing::info!("global interrupt (no prompt_id specified)");
            app.shared.interrupt(None);
        }
    }
    StatusCode::OK.into_response()
}

/// `GET /view?filename=&subfolder=&type=`: a file from output/input/temp.
/// `preview` and `channel` are accepted but the file is sent as stored.
async fn view(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let dirs = &app.shared.dirs;
    let Some(filename) = q.get("filename") else { return StatusCode::NOT_FOUND.into_response() };
    let (name, annotated) = dirs.annotated(filename);
    if name.is_empty() || name.starts_with('/') || name.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let Some(base) = annotated.or_else(|| dirs.by_type(q.get("type").map_or("output", String::as_str))) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut folder = base.to_path_buf();
    if let Some(subfolder) = q.get("subfolder") {
        let full = lexical_join(base, subfolder);
        if !is_within(base, &full) {
            return StatusCode::FORBIDDEN.into_response();
        }
        folder = full;
    }
    let name = split(name).1;
    let path = folder.join(name);
    if !path.is_file() {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let disposition = format!("filename=\"{name}\"");
            let mut response = bytes.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
            if let Ok(v) = HeaderValue::from_str(&disposition) {
                headers.insert(header::CONTENT_DISPOSITION, v);
            }
            response
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a file for /view");
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

/// `POST /upload/image` (multipart `image`, `type`, `subfolder`, `overwrite`).
async fn upload_image(State(app): State<App>, mut multipart: Multipart) -> Response {
    let mut image: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                let file_name = field.file_name().map(str::to_string);
                let Ok(bytes) = field.bytes().await else { return StatusCode::BAD_REQUEST.into_response() };
                match (name.as_str(), file_name) {
                    ("image", Some(file_name)) => image = Some((file_name, bytes)),
                    (_, _) => {
                        fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "bad multipart upload");
                return StatusCode::BAD_REQUEST.into_response();
            }
        }
    }
    let Some((mut filename, bytes)) = image else { return StatusCode::BAD_REQUEST.into_response() };
    if filename.is_empty() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let kind = fields.get("type").cloned().unwrap_or_else(|| "input".into());
    let Some(base) = app.shared.dirs.by_type(&kind) else { return StatusCode::BAD_REQUEST.into_response() };
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let folder = lexical_join(base, &normpath(&subfolder));
    let mut path = lexical_join(&folder, &filename);
    if !is_within(base, &path) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    if let Err(e) = tokio::fs::create_dir_all(&folder).await {
        tracing::warn!(error = %e, "cannot create the upload folder");
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let overwrite = matches!(fields.get("overwrite").map(String::as_str), Some("true" | "1"));
    let mut duplicate = false;
    if !overwrite {
        let (stem, ext) = splitext(&filename);
        let mut i = 1;
        while path.exists() {
            // Same bytes under the same name: reuse the file (ComfyUI compares hashes).
            if tokio::fs::read(&path).await.is_ok_and(|existing| existing == bytes.as_ref()) {
                duplicate = true;
                break;
            }
            filename = format!("{stem} ({i}){ext}");
            path = folder.join(&filename);
            i += 1;
        }
    }
    if !duplicate {
        if let Err(e) = tokio::fs::write(&path, &bytes).await {
            tracing::warn!(path = %path.display(), error = %e, "cannot store an upload");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    json(StatusCode::OK, &jobj! { "name" => filename, "subfolder" => subfolder, "type" => kind })
}

/// `os.path.splitext`: the extension is the last dot-part of the last path
/// component, unless that component starts with its only dots.
fn splitext(name: &str) -> (String, String) {
    let start = name.rfind('/').map_or(0, |i| i + 1);
    let last = &name[start..];
    let leading = last.len() - last.trim_start_matches('.').len();
    match last.rfind('.') {
        Some(dot) if dot >= leading => (name[..start + dot].to_string(), last[dot..].to_string()),
        _ => (name.to_string(), String::new()),
    }
}

async fn get_object_info(State(app): State<App>) -> Response {
    json(StatusCode::OK, &object_info(&app.shared.dirs))
}

async fn get_node_info(State(app): State<App>, UrlPath(node_class): UrlPath<String>) -> Response {
    let mut out = Map::new();
    if let Some(info) = node_info(&node_class, &app.shared.dirs) {
        out.insert(node_class, info);
    }
    json(StatusCode::OK, &out)
}

/// `GET /system_stats` in ComfyUI's shape; the values describe this process
/// (a CPU "device" with the machine's memory, like ComfyUI with `--cpu`).
async fn system_stats() -> Response {
    let (total, free) = memory();
    let argv: Vec<Json> = std::env::args().map(Json::String).collect();
    let stand_in = "n/a (ComfyUI stand-in)";
    let body = jobj! {
        "system" => jobj! {
            "os" => "posix",
            "ram_total" => total,
            "ram_free" => free,
            "comfyui_version" => "0.3.64",
            "required_frontend_version" => "1.27.10",
            "installed_templates_version" => Json::Null,
            "required_templates_version" => "0.1.95",
            "python_version" => stand_in,
            "pytorch_version" => stand_in,
            "embedded_python" => false,
            "argv" => Json::Array(argv),
        },
        "devices" => Json::Array(vec![jobj! {
            "name" => "cpu",
            "type" => "cpu",
            "index" => Json::Null,
            "vram_total" => total,
            "vram_free" => free,
            "torch_vram_total" => total,
            "torch_vram_free" => free,
        }]),
    };
    json(StatusCode::OK, &body)
}

/// Total and available memory in bytes from `/proc/meminfo` (0 if unknown).
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// `GET /ws?clientId=`.
async fn websocket(
    State(app): State<App>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sid = q
        .get("clientId")
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    upgrade.on_upgrade(move |socket| serve_socket(app, sid, socket))
}

/// One websocket: ComfyUI's greeting, the `feature_flags` exchange, then
/// whatever the server sends this client until either side closes.
async fn serve_socket(app: App, sid: String, socket: WebSocket) {
    let (conn, mut outbox) = app.shared.connect(&sid);
    tracing::debug!(%sid, conn, "websocket connected");
    let (mut sink, mut stream) = socket.split();
    let mut shutdown = app.shutdown.clone();
    let mut first_message = true;
    while !*shutdown.borrow() {
        tokio::select! {
            out = outbox.recv() => match out {
                Some(text) => {
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                // A newer socket took this client id.
                None => break,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => match Json::parse(text.as_bytes()) {
                    Ok(message) => {
                        if first_message && message.get("type").and_then(Json::as_str) == Some("feature_flags") {
                            tracing::info!(%sid, flags = %message.get("data").cloned().unwrap_or_default(), "feature flags negotiated");
                            app.shared.reply(&sid, conn, "feature_flags", &FEATURE_FLAGS);
                        }
                        first_message = false;
                    }
                    Err(_) => tracing::warn!(%sid, "invalid JSON received from a websocket client"),
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
    app.shared.disconnect(&sid, conn);
    tracing::debug!(%sid, conn, "websocket closed");
}

#[cfg(test)]
mod tests {
    use super::splitext;

    #[test]
    fn splitext_like_python() {
        assert_eq!(splitext("a.png"), ("a".into(), ".png".into()));
        assert_eq!(splitext("a.tar.gz"), ("a.tar".into(), ".gz".into()));
        assert_eq!(splitext(".hidden"), (".hidden".into(), "".into()));
        assert_eq!(splitext("dir.d/file"), ("dir.d/file".into(), "".into()));
    }
}
