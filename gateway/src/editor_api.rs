//! The rest of the ComfyUI server API the stock editor (1.27.10) calls, per
//! participant: users, settings, userdata, node definitions, system info,
//! uploads. Like [`crate::comfy`], every route exists at `/user/{n}/api/X`
//! and `/user/{n}/X`, needs the participant's login ([`Participant`]), and
//! answers in ComfyUI's shapes (`shared/comfyui-samples/`).
//!
//! | route | answer |
//! | --- | --- |
//! | `GET users` | `{"storage":"server","migrated":true}`: one user, no user-select screen |
//! | `GET/POST settings`, `GET/POST settings/{id}` | the participant's settings ([`crate::userdata`]) |
//! | `GET userdata?dir=&recurse=&split=&full_info=` | the participant's files under `dir` plus the pre-loaded workflows; `[]` when there are none |
//! | `GET/POST/DELETE userdata/{file}`, `POST userdata/{file}/move/{dest}` | ComfyUI's `user_manager` semantics (`overwrite`, `full_info`); `user.css`, `comfy.templates.json` and `workflows/.index.json` read as empty when absent |
//! | `GET v2/userdata?path=` | folders and files, pre-loaded workflows included |
//! | `GET object_info`, `GET object_info/{class}` | the GPU node's, cached (below), with the image/video/audio pickers listing the participant's own input files |
//! | `GET embeddings`, `GET experiment/models[/{folder}]` | the GPU node's, cached; `[]` when unknown |
//! | `GET system_stats` | the GPU node's, cached for a minute; a stand-in of the same shape when it never answered |
//! | `GET extensions` | the editor's core extensions and the gateway's own (`/extensions/comfy-multi/…`) |
//! | `GET features`, `GET i18n`, `GET workflow_templates` | as ComfyUI without custom nodes |
//! | `POST free`, `POST history` | 200, nothing done (the GPU node and its history are shared) |
//! | `POST upload/image`, `POST upload/mask` | into the participant's `input/` (or `temp/`), see below |
//! | `GET templates/index.json` (no `/api`) | `[]`: no template package is installed |
//! | `GET internal/logs…`, `internal/folder_paths`, `internal/files/{type}` (no `/api`) | empty logs, `{}`, the participant's own files |
//! | anything else under `/user/{n}/api/` | 404, as ComfyUI says for a route it does not have |
//!
//! # What the GPU node tells, and how it is cached
//!
//! `object_info` (large and slow), `system_stats`, `embeddings` and the
//! model lists come from the warm ComfyUI ([`ComfyInfo`]: `COMFYUI_URL`, else
//! a passing instance of Consul service `comfyui`). Each answer is kept in
//! memory and in `<data_dir>/cache/<name>.json`. A fresh copy (10 minutes;
//! `system_stats` one) is served as is; a stale one is served at once while
//! one background request refreshes it; with no copy at all the request
//! waits for ComfyUI. When ComfyUI is down the last copy is served, from
//! disk after a restart; only `object_info` without any copy is a 503.
//!
//! # Uploads
//!
//! `upload/image` and `upload/mask` take ComfyUI's multipart fields (`image`,
//! `type` = `input` (default) or `temp`, `subfolder`, `overwrite`,
//! `original_ref`) and store into `<data_dir>/users/N/<type>/<subfolder>/`.
//! The name must be one plain file name (no folders, no leading dot, no
//! active-content extension such as `.html` or `.svg`, nothing of that
//! percent-encoded) and the bytes must be an image, video or audio file the
//! editor uploads (checked by their magic bytes), an image whole (a PNG up
//! to its `IEND`, other images with a readable header); otherwise 400 and
//! nothing is stored. Over [`MAX_UPLOAD_BYTES`] is 413. Without `overwrite`, an
//! existing file with other bytes makes the name `name (1).png`, as ComfyUI
//! does; the same bytes reuse the name. `upload/mask` puts the uploaded
//! mask's alpha onto the original image (`original_ref`, one of the
//! participant's files) and stores the result as PNG.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, patch, post};
use axum::{Json, Router};
use dispatcher::consul::ConsulClient;
use dispatcher::contract::{split_file_reference, CONSUL_COMFYUI_SERVICE};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tower::ServiceExt;

use crate::auth::Participant;
use crate::error::{ApiError, JsonBody, RawBody};
use crate::files::{safe_name, safe_subfolder, Files};
use crate::state::AppState;
use crate::userdata::{write_atomic, ListOptions, RelPath};

/// The largest upload (ComfyUI's default `--max-upload-size`).
pub const MAX_UPLOAD_BYTES: usize = 100 * 1024 * 1024;
/// The largest userdata file (a saved workflow).
pub const MAX_USERDATA_BYTES: usize = 32 * 1024 * 1024;
/// How long a copy of `object_info` (and the model lists) counts as fresh.
pub const OBJECT_INFO_TTL: Duration = Duration::from_secs(600);
/// How long a copy of `system_stats` counts as fresh.
pub const SYSTEM_STATS_TTL: Duration = Duration::from_secs(60);
/// How long a submission waits for ComfyUI's node types when the gateway
/// has no copy of them.
pub const NODE_TYPES_WAIT: Duration = Duration::from_secs(3);
/// After a failed refresh, how long until the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// What the GPU node's ComfyUI says, cached
// ---------------------------------------------------------------------------

/// Answers of the GPU node's ComfyUI, cached in memory and on disk.
#[derive(Clone)]
pub struct ComfyInfo {
    inner: Arc<InfoInner>,
}

struct InfoInner {
    url: Option<String>,
    consul: Option<ConsulClient>,
    http: reqwest::Client,
    cache_dir: PathBuf,
    entries: std::sync::Mutex<HashMap<String, Cached>>,
    /// One fetch per path at a time.
    flights: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When a refresh of a path last failed.
    failed: std::sync::Mutex<HashMap<String, Instant>>,
    /// The node types of the `object_info` copy they were read from.
    node_types: std::sync::Mutex<Option<(Bytes, Arc<HashSet<String>>)>>,
}

#[derive(Clone)]
struct Cached {
    /// ComfyUI's JSON text, as it sent it (key order kept).
    body: Bytes,
    fetched: SystemTime,
}

/// What one request to ComfyUI gave.
enum Fetched {
    Body(Bytes),
    /// 404: this ComfyUI has no such route.
    Absent,
    Failed(String),
}

impl ComfyInfo {
    /// `url`: `COMFYUI_URL` (else a passing `comfyui` instance in `consul`);
    /// copies go to `cache_dir`.
    pub fn new(url: Option<String>, consul: Option<ConsulClient>, cache_dir: PathBuf) -> ComfyInfo {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ComfyInfo {
            inner: Arc::new(InfoInner {
                url: url.map(|u| u.trim_end_matches('/').to_string()),
                consul,
                http,
                cache_dir,
                entries: Default::default(),
                flights: Default::default(),
                failed: Default::default(),
                node_types: Default::default(),
            }),
        }
    }

    async fn base_url(&self) -> Result<String, String> {
        if let Some(url) = &self.inner.url {
            return Ok(url.clone());
        }
        let Some(consul) = &self.inner.consul else {
            return Err("neither COMFYUI_URL nor Consul is configured".into());
        };
        let instances = consul.healthy(CONSUL_COMFYUI_SERVICE, None).await.map_err(|e| e.to_string())?;
        instances
            .first()
            .map(|i| i.base_url())
            .ok_or_else(|| format!("no passing instance of Consul service {CONSUL_COMFYUI_SERVICE:?} (is the GPU node up?)"))
    }

    async fn fetch(&self, path: &str) -> Fetched {
        let base = match self.base_url().await {
            Ok(b) => b,
            Err(e) => return Fetched::Failed(format!("cannot find ComfyUI: {e}")),
        };
        let url = format!("{base}/{path}");
        let resp = match self.inner.http.get(&url).send().await {
            Ok(r) => r,
            Err(e) => return Fetched::Failed(format!("cannot reach ComfyUI at {base}: {}", root_cause(&e))),
        };
        match resp.status() {
            s if s.is_success() => match resp.bytes().await {
                Ok(body) => match readable_json(body) {
                    Ok(body) => Fetched::Body(body),
                    Err(e) => Fetched::Failed(format!("ComfyUI at {base} sent an unreadable /{path}: {e}")),
                },
                Err(e) => Fetched::Failed(format!("cannot read /{path} from ComfyUI at {base}: {}", root_cause(&e))),
            },
            StatusCode::NOT_FOUND => Fetched::Absent,
            s => Fetched::Failed(format!("ComfyUI at {base} answered {s} to /{path}")),
        }
    }

    fn disk_path(&self, path: &str) -> PathBuf {
        let name: String =
            path.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        self.inner.cache_dir.join(format!("{name}.json"))
    }

    fn memory(&self, path: &str) -> Option<Cached> {
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner()).get(path).cloned()
    }

    fn load_disk_copy(&self, path: &str) -> Option<Cached> {
        let file = self.disk_path(path);
        let body = readable_json(Bytes::from(std::fs::read(&file).ok()?)).ok()?;
        let fetched = std::fs::metadata(&file).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        let cached = Cached { body, fetched };
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_string(), cached.clone());
        tracing::info!(path, file = %file.display(), "loaded ComfyUI's answer from the disk cache");
        Some(cached)
    }

    async fn store(&self, path: &str, body: Bytes) -> Bytes {
        let cached = Cached { body: body.clone(), fetched: SystemTime::now() };
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_string(), cached);
        self.inner.failed.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
        let file = self.disk_path(path);
        if let Err(e) = write_atomic(&file, &body).await {
            tracing::warn!(file = %file.display(), "cannot write the cache file: {e}");
        }
        body
    }

    fn flight(&self, path: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner.flights.lock().unwrap_or_else(|e| e.into_inner()).entry(path.to_string()).or_default().clone()
    }

    fn recently_failed(&self, path: &str) -> bool {
        self.inner.failed.lock().unwrap_or_else(|e| e.into_inner()).get(path).is_some_and(|t| t.elapsed() < RETRY_AFTER)
    }

    fn note_failure(&self, path: &str, why: &str) {
        tracing::warn!(path, "cannot refresh ComfyUI's answer: {why}");
        self.inner.failed.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_string(), Instant::now());
    }

    /// Refreshes `path` in the background, unless a fetch runs already or
    /// the last one failed moments ago.
    fn refresh_later(&self, path: &str, absent: Option<&'static str>) {
        if self.recently_failed(path) {
            return;
        }
        let Ok(guard) = self.flight(path).try_lock_owned() else { return };
        let this = self.clone();
        let path = path.to_string();
        tokio::spawn(async move {
            let _guard = guard;
            match this.fetch(&path).await {
                Fetched::Body(body) => {
                    this.store(&path, body).await;
                }
                Fetched::Absent => match absent {
                    Some(d) => {
                        this.store(&path, Bytes::from_static(d.as_bytes())).await;
                    }
                    None => this.note_failure(&path, "ComfyUI answered 404"),
                },
                Fetched::Failed(why) => this.note_failure(&path, &why),
            }
        });
    }

    /// ComfyUI's answer to `GET /{path}` (JSON text): a fresh copy, else a
    /// stale one (refreshed in the background), else asked now. `absent` is
    /// the answer when this ComfyUI has no such route (404). The error says
    /// why there is no answer at all.
    pub async fn get(&self, path: &str, ttl: Duration, absent: Option<&'static str>) -> Result<Bytes, String> {
        if let Some(c) = self.memory(path).or_else(|| self.load_disk_copy(path)) {
            let fresh = c.fetched.elapsed().map(|age| age < ttl).unwrap_or(true);
            if !fresh {
                self.refresh_later(path, absent);
            }
            return Ok(c.body);
        }
        let flight = self.flight(path);
        let _guard = flight.lock().await;
        if let Some(c) = self.memory(path) {
            return Ok(c.body);
        }
        match self.fetch(path).await {
            Fetched::Body(body) => Ok(self.store(path, body).await),
            Fetched::Absent => match absent {
                Some(d) => Ok(self.store(path, Bytes::from_static(d.as_bytes())).await),
                None => Err(format!("ComfyUI has no /{path}")),
            },
            Fetched::Failed(why) => {
                self.note_failure(path, &why);
                Err(why)
            }
        }
    }

    /// The node types the GPU node's ComfyUI has (the names in its
    /// `object_info`), for checking a prompt before it is queued: from the
    /// copy at hand, else from ComfyUI if it answers within
    /// [`NODE_TYPES_WAIT`]. `None` when they are not known, so participants
    /// can still queue while the GPU node is down (ComfyUI checks then).
    pub async fn node_types(&self) -> Option<Arc<HashSet<String>>> {
        const PATH: &str = "object_info";
        let have_copy = self.memory(PATH).is_some() || self.disk_path(PATH).is_file();
        if !have_copy && self.recently_failed(PATH) {
            return None;
        }
        let body = match tokio::time::timeout(NODE_TYPES_WAIT, self.get(PATH, OBJECT_INFO_TTL, None)).await {
            Ok(Ok(body)) => body,
            Ok(Err(_)) => return None,
            Err(_) => {
                self.note_failure(PATH, &format!("no answer within {NODE_TYPES_WAIT:?}"));
                return None;
            }
        };
        let mut memo = self.inner.node_types.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((from, types)) = memo.as_ref() {
            if from.as_ptr() == body.as_ptr() && from.len() == body.len() {
                return Some(types.clone());
            }
        }
        let names: HashMap<String, serde::de::IgnoredAny> = serde_json::from_slice(&body).ok()?;
        let types = Arc::new(names.into_keys().collect::<HashSet<_>>());
        *memo = Some((body, types.clone()));
        Some(types)
    }
}

/// `body` if it is JSON; Python's `json.dumps` may also write the bare
/// tokens `NaN`, `Infinity` and `-Infinity`, which become `null`, `1e308`
/// and `-1e308` (a custom node's unbounded input, say).
fn readable_json(body: Bytes) -> Result<Bytes, serde_json::Error> {
    match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        Ok(_) => Ok(body),
        Err(e) => {
            let fixed = python_tokens(&body);
            if fixed.len() == body.len() && fixed == body.as_ref() {
                return Err(e);
            }
            serde_json::from_slice::<serde::de::IgnoredAny>(&fixed)?;
            Ok(Bytes::from(fixed))
        }
    }
}

fn python_tokens(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let (mut i, mut in_string, mut escaped) = (0, false, false);
    while i < body.len() {
        let b = body[i];
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        let rest = &body[i..];
        let (token, with): (&[u8], &[u8]) = if rest.starts_with(b"-Infinity") {
            (b"-Infinity", b"-1e308")
        } else if rest.starts_with(b"Infinity") {
            (b"Infinity", b"1e308")
        } else if rest.starts_with(b"NaN") {
            (b"NaN", b"null")
        } else {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
            i += 1;
            continue;
        };
        out.extend_from_slice(with);
        i += token.len();
    }
    out
}

/// A JSON object whose members keep their order and their text: ComfyUI's
/// answers pass through the gateway unchanged, except what is patched.
#[derive(Debug)]
pub struct Ordered(pub Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Ordered(members))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl Serialize for Ordered {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A JSON answer from its text.
fn raw_json(body: impl Into<Body>) -> Response {
    ([(header::CONTENT_TYPE, "application/json; charset=utf-8")], body.into()).into_response()
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

// ---------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------

/// The routes of this module.
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for prefix in ["/user/{n}/api", "/user/{n}"] {
        router = router
            .route(&format!("{prefix}/users"), get(users))
            .route(&format!("{prefix}/settings"), get(settings).post(post_settings))
            .route(&format!("{prefix}/settings/{{id}}"), get(setting).post(post_setting))
            .route(&format!("{prefix}/userdata"), get(list_userdata))
            .route(
                &format!("{prefix}/userdata/{{file}}"),
                get(get_userdata).post(post_userdata).delete(delete_userdata),
            )
            .route(&format!("{prefix}/userdata/{{file}}/move/{{dest}}"), post(move_userdata))
            .route(&format!("{prefix}/v2/userdata"), get(userdata_tree))
            .route(&format!("{prefix}/object_info"), get(object_info))
            .route(&format!("{prefix}/object_info/{{class}}"), get(object_info_one))
            .route(&format!("{prefix}/embeddings"), get(embeddings))
            .route(&format!("{prefix}/extensions"), get(extensions))
            .route(&format!("{prefix}/system_stats"), get(system_stats))
            .route(&format!("{prefix}/features"), get(features))
            .route(&format!("{prefix}/i18n"), get(|_: Participant| async { Json(json!({})) }))
            .route(&format!("{prefix}/workflow_templates"), get(|_: Participant| async { Json(json!({})) }))
            .route(&format!("{prefix}/experiment/models"), get(model_folders))
            .route(&format!("{prefix}/experiment/models/{{folder}}"), get(models_in))
            .route(&format!("{prefix}/free"), post(|_: Participant| async { StatusCode::OK }))
            .route(&format!("{prefix}/history"), post(|_: Participant| async { StatusCode::OK }))
            .route(
                &format!("{prefix}/upload/image"),
                post(upload_image).layer(DefaultBodyLimit::max(MAX_UPLOAD_REQUEST)),
            )
            .route(
                &format!("{prefix}/upload/mask"),
                post(upload_mask).layer(DefaultBodyLimit::max(MAX_UPLOAD_REQUEST)),
            );
    }
    router
        .route("/user/{n}/api/{*rest}", any(absent))
        .route("/user/{n}/templates/index.json", get(|| async { Json(json!([])) }))
        .route("/user/{n}/templates/{*rest}", get(|| async { StatusCode::NOT_FOUND }))
        .route("/user/{n}/internal/logs", get(|_: Participant| async { Json(json!("")) }))
        .route(
            "/user/{n}/internal/logs/raw",
            get(|_: Participant| async { Json(json!({"entries": [], "size": {"cols": 80, "rows": 24}})) }),
        )
        .route("/user/{n}/internal/logs/subscribe", patch(|_: Participant| async { StatusCode::OK }))
        .route("/user/{n}/internal/folder_paths", get(|_: Participant| async { Json(json!({})) }))
        .route("/user/{n}/internal/files/{kind}", get(internal_files))
        .route("/user/{n}/internal/{*rest}", any(absent))
        .layer(crate::editor::compression())
}

/// A route ComfyUI does not have (or not for participants): its 404.
async fn absent(_: Participant, request: Request) -> ApiError {
    ApiError::NotFound(format!("404: Not Found ({} {})", request.method(), request.uri().path()))
}

async fn users(_: Participant) -> Json<Value> {
    Json(json!({ "storage": "server", "migrated": true }))
}

async fn settings(Participant(user): Participant, State(state): State<AppState>) -> Json<Value> {
    Json(Value::Object(state.editor.userdata().settings(user).await))
}

async fn setting(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, id)): UrlPath<(String, String)>,
) -> Json<Value> {
    Json(state.editor.userdata().settings(user).await.remove(&id).unwrap_or(Value::Null))
}

async fn post_settings(
    Participant(user): Participant,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Value>,
) -> Result<StatusCode, ApiError> {
    let Value::Object(changes) = body else {
        return Err(ApiError::bad_request("invalid_settings", "settings are a JSON object"));
    };
    state.editor.userdata().update_settings(user, changes).await?;
    Ok(StatusCode::OK)
}

async fn post_setting(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, id)): UrlPath<(String, String)>,
    JsonBody(value): JsonBody<Value>,
) -> Result<StatusCode, ApiError> {
    let mut change = Map::new();
    change.insert(id, value);
    state.editor.userdata().update_settings(user, change).await?;
    Ok(StatusCode::OK)
}

/// A query flag as ComfyUI reads it: `"true"` (any case) is true.
fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

async fn list_userdata(
    Participant(user): Participant,
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let dir = q.get("dir").map(String::as_str).unwrap_or_default();
    if dir.is_empty() {
        return Err(ApiError::bad_request("invalid_path", "Directory not provided"));
    }
    let dir = RelPath::parse(dir, "directory")?;
    let opts = ListOptions { recurse: flag(&q, "recurse"), full_info: flag(&q, "full_info"), split: flag(&q, "split") };
    Ok(Json(state.editor.userdata().list(user, &dir, opts)))
}

async fn userdata_tree(
    Participant(user): Participant,
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Value>>, ApiError> {
    let path = q.get("path").map(String::as_str).filter(|p| !p.trim_matches('/').is_empty());
    let path = path.map(|p| RelPath::parse(p, "path")).transpose()?;
    Ok(Json(state.editor.userdata().tree(user, path.as_ref())?))
}

async fn get_userdata(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, file)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let rel = RelPath::parse(&file, "file")?;
    let name = rel.as_string();
    let Some(found) = state.editor.userdata().find(user, &rel) else {
        return match name.as_str() {
            "user.css" => Ok(crate::editor::empty_css()),
            // The old "node templates" store: none yet is an empty list.
            "comfy.templates.json" => Ok(Json(json!([])).into_response()),
            // The workflow sidebar's bookmarks: none yet.
            "workflows/.index.json" => Ok(Json(json!({"favorites": []})).into_response()),
            _ => Err(ApiError::NotFound(format!("no file {name:?}"))),
        };
    };
    let bytes = tokio::fs::read(found.path())
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read {}: {e}", found.path().display())))?;
    // Userdata is whatever the participant stored: never rendered inline
    // (as newer ComfyUI does), except the participant's own stylesheet.
    let (content_type, disposition) = if name == "user.css" {
        ("text/css; charset=utf-8", "inline")
    } else if name.ends_with(".json") {
        ("application/json", "attachment")
    } else {
        ("application/octet-stream", "attachment")
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        bytes,
    )
        .into_response())
}

async fn post_userdata(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, file)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    RawBody(body): RawBody<MAX_USERDATA_BYTES>,
) -> Result<Json<Value>, ApiError> {
    let rel = RelPath::parse(&file, "file")?;
    let overwrite = q.get("overwrite").map(String::as_str) != Some("false");
    let answer = state.editor.userdata().write(user, &rel, &body, overwrite, flag(&q, "full_info")).await?;
    Ok(Json(answer))
}

async fn delete_userdata(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, file)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let rel = RelPath::parse(&file, "file")?;
    state.editor.userdata().delete(user, &rel).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn move_userdata(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, file, dest)): UrlPath<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let from = RelPath::parse(&file, "file")?;
    let to = RelPath::parse(&dest, "destination")?;
    let overwrite = q.get("overwrite").map(String::as_str) != Some("false");
    Ok(Json(state.editor.userdata().rename(user, &from, &to, overwrite, flag(&q, "full_info")).await?))
}

// ---------------------------------------------------------------------------
// Node definitions and what the GPU node has
// ---------------------------------------------------------------------------

fn no_object_info(why: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "the node definitions (object_info) are not available: the GPU node's ComfyUI did not answer ({why}) \
         and the gateway has no copy yet. Reload the page once the GPU node is up."
    ))
}

/// Which of the participant's files a picker input lists (`image_upload`,
/// `video_upload`, `audio_upload`), if it is one that picks from `input/`.
fn picker_kind(options: &Value) -> Option<MediaKind> {
    let folder = options.get("image_folder").and_then(Value::as_str).unwrap_or("input");
    if folder != "input" {
        return None;
    }
    let on = |k: &str| options.get(k).and_then(Value::as_bool) == Some(true);
    if on("image_upload") {
        Some(MediaKind::Image)
    } else if on("video_upload") {
        Some(MediaKind::Video)
    } else if on("audio_upload") {
        Some(MediaKind::Audio)
    } else {
        None
    }
}

/// Replaces the file list of one input spec (`[list, {image_upload}]` or
/// `["COMBO", {video_upload, options}]`) with the participant's `files`;
/// whether it was a picker.
fn patch_spec(spec: &mut Value, files: &HashMap<MediaKind, Vec<String>>) -> bool {
    let Some(spec) = spec.as_array_mut() else { return false };
    let Some(kind) = spec.get(1).and_then(picker_kind) else { return false };
    let list = Value::Array(files.get(&kind).into_iter().flatten().map(|f| Value::String(f.clone())).collect());
    if spec[0].is_array() {
        spec[0] = list;
        true
    } else if let Some(options) = spec[1].get_mut("options").filter(|o| o.is_array()) {
        *options = list;
        true
    } else {
        false
    }
}

/// One node definition with its pickers listing `files`; everything else
/// (key order included) as ComfyUI sent it.
fn patch_def(def: &RawValue, files: &HashMap<MediaKind, Vec<String>>) -> Result<Box<RawValue>, serde_json::Error> {
    let mut def: Ordered = serde_json::from_str(def.get())?;
    for (_, input) in def.0.iter_mut().filter(|(k, _)| k == "input") {
        let mut groups: Ordered = serde_json::from_str(input.get())?;
        for (_, group) in groups.0.iter_mut().filter(|(g, _)| g == "required" || g == "optional") {
            let mut specs: Ordered = serde_json::from_str(group.get())?;
            for (_, spec) in specs.0.iter_mut() {
                if !spec.get().contains("_upload") {
                    continue;
                }
                let mut value: Value = serde_json::from_str(spec.get())?;
                if patch_spec(&mut value, files) {
                    *spec = serde_json::value::to_raw_value(&value)?;
                }
            }
            *group = serde_json::value::to_raw_value(&specs)?;
        }
        *input = serde_json::value::to_raw_value(&groups)?;
    }
    serde_json::value::to_raw_value(&def)
}

/// A definition patched for the participant; as sent when it is not the
/// shape expected.
fn patched(def: &RawValue, files: &HashMap<MediaKind, Vec<String>>) -> Box<RawValue> {
    if !def.get().contains("_upload") {
        return def.to_owned();
    }
    patch_def(def, files).unwrap_or_else(|_| def.to_owned())
}

/// The participant's files directly in their `input/`, by kind, sorted (what
/// ComfyUI's LoadImage lists of its own input folder).
fn input_files(files: &Files, user: u32) -> HashMap<MediaKind, Vec<String>> {
    let mut out: HashMap<MediaKind, Vec<String>> = HashMap::new();
    let Ok(dir) = files.user_dir(user, "input") else { return out };
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        if let Some(kind) = MediaKind::of_name(&name) {
            out.entry(kind).or_default().push(name);
        }
    }
    for list in out.values_mut() {
        list.sort();
    }
    out
}

fn parse_object_info(body: &[u8]) -> Result<Ordered, ApiError> {
    serde_json::from_slice(body).map_err(|e| no_object_info(&format!("its object_info is not a JSON object: {e}")))
}

async fn object_info(Participant(user): Participant, State(state): State<AppState>) -> Result<Response, ApiError> {
    let body = state.editor.comfy().get("object_info", OBJECT_INFO_TTL, None).await.map_err(|e| no_object_info(&e))?;
    let files = input_files(&state.files, user);
    let mut info = parse_object_info(&body)?;
    for (_, def) in info.0.iter_mut() {
        *def = patched(def, &files);
    }
    let text = serde_json::to_vec(&info).map_err(|e| ApiError::Internal(format!("cannot encode object_info: {e}")))?;
    Ok(raw_json(text))
}

async fn object_info_one(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, class)): UrlPath<(String, String)>,
) -> Result<Response, ApiError> {
    let body = state.editor.comfy().get("object_info", OBJECT_INFO_TTL, None).await.map_err(|e| no_object_info(&e))?;
    let info = parse_object_info(&body)?;
    let one = match info.0.iter().find(|(k, _)| *k == class) {
        Some((k, def)) => Ordered(vec![(k.clone(), patched(def, &input_files(&state.files, user)))]),
        None => Ordered(Vec::new()),
    };
    let text = serde_json::to_vec(&one).map_err(|e| ApiError::Internal(format!("cannot encode object_info: {e}")))?;
    Ok(raw_json(text))
}

/// A list ComfyUI answers, or `[]` when it never did.
async fn cached_list(state: &AppState, path: &str) -> Response {
    match state.editor.comfy().get(path, OBJECT_INFO_TTL, Some("[]")).await {
        Ok(body) => raw_json(body),
        Err(_) => raw_json("[]"),
    }
}

async fn embeddings(_: Participant, State(state): State<AppState>) -> Response {
    cached_list(&state, "embeddings").await
}

async fn model_folders(_: Participant, State(state): State<AppState>) -> Response {
    cached_list(&state, "experiment/models").await
}

async fn models_in(
    _: Participant,
    State(state): State<AppState>,
    UrlPath((_n, folder)): UrlPath<(String, String)>,
) -> Response {
    let plain = !folder.is_empty() && folder.len() <= 64 && folder.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !plain {
        return raw_json("[]");
    }
    cached_list(&state, &format!("experiment/models/{folder}")).await
}

async fn extensions(_: Participant, State(state): State<AppState>) -> Json<Vec<String>> {
    Json(state.editor.extensions().to_vec())
}

async fn system_stats(_: Participant, State(state): State<AppState>) -> Response {
    match state.editor.comfy().get("system_stats", SYSTEM_STATS_TTL, None).await {
        Ok(body) => raw_json(body),
        Err(why) => Json(json!({
            "system": {
                "os": std::env::consts::OS,
                "ram_total": 0,
                "ram_free": 0,
                "comfyui_version": "unknown (GPU node not reachable)",
                "required_frontend_version": dispatcher::config::FRONTEND_VERSION,
                "python_version": "",
                "pytorch_version": "",
                "embedded_python": false,
                "argv": [],
                "comfy_multi_note": why,
            },
            "devices": [],
        }))
        .into_response(),
    }
}

async fn features(_: Participant) -> Json<Value> {
    Json(json!({ "supports_preview_metadata": true, "max_upload_size": MAX_UPLOAD_BYTES }))
}

/// `GET internal/files/{type}`: the participant's own files of that type,
/// newest first (ComfyUI lists its whole folder).
async fn internal_files(
    Participant(user): Participant,
    State(state): State<AppState>,
    UrlPath((_n, kind)): UrlPath<(String, String)>,
) -> Result<Json<Vec<String>>, ApiError> {
    let dir = state.files.user_dir(user, &kind)?;
    let mut found: Vec<(SystemTime, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            let t = e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            (t, e.file_name().to_string_lossy().into_owned())
        })
        .filter(|(_, n)| !n.starts_with('.'))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(Json(found.into_iter().map(|(_, n)| n).collect()))
}

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

/// What a picker lists, by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    Image,
    Video,
    Audio,
}

impl MediaKind {
    /// By extension, as ComfyUI's `filter_files_content_types` does by MIME type.
    pub fn of_name(name: &str) -> Option<MediaKind> {
        let ext = name.rsplit_once('.')?.1.to_ascii_lowercase();
        match ext.as_str() {
            "png" | "jpg" | "jpeg" | "webp" | "gif" | "bmp" | "tif" | "tiff" | "avif" | "heic" | "heif" | "jfif" => {
                Some(MediaKind::Image)
            }
            "mp4" | "webm" | "mov" | "mkv" | "avi" | "m4v" => Some(MediaKind::Video),
            "wav" | "mp3" | "flac" | "ogg" | "oga" | "opus" | "m4a" | "aac" => Some(MediaKind::Audio),
            _ => None,
        }
    }
}

/// What the bytes are, by their magic numbers: the images, videos, sounds
/// and 3D models the editor uploads. `None` for anything else.
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, magic: &[u8]| bytes.len() >= offset + magic.len() && &bytes[offset..offset + magic.len()] == magic;
    Some(if at(0, b"\x89PNG\r\n\x1a\n") {
        "png"
    } else if at(0, b"\xff\xd8\xff") {
        "jpeg"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "gif"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "webp"
    } else if at(0, b"BM") && bytes.len() > 26 {
        "bmp"
    } else if at(0, b"II*\0") || at(0, b"MM\0*") {
        "tiff"
    } else if at(4, b"ftyp") {
        "iso-bmff (mp4, mov, avif, heic, m4a)"
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        "matroska (webm, mkv)"
    } else if at(0, b"RIFF") && (at(8, b"WAVE") || at(8, b"AVI ")) {
        "riff (wav, avi)"
    } else if at(0, b"fLaC") {
        "flac"
    } else if at(0, b"OggS") {
        "ogg"
    } else if at(0, b"ID3") || (bytes.len() > 2 && bytes[0] == 0xff && (bytes[1] & 0xe0) == 0xe0) {
        "mp3"
    } else if at(0, b"glTF") {
        "glb"
    } else {
        return None;
    })
}

/// Extensions a browser would run or render as a page, refused whatever
/// the bytes are (`/view` serves files with the type their name says).
fn active_content(name: &str) -> bool {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    matches!(
        ext.as_str(),
        "html" | "htm" | "xhtml" | "shtml" | "xht" | "svg" | "svgz" | "js" | "mjs" | "css" | "xml" | "xsl" | "xslt" | "php" | "pdf"
    )
}

/// An upload's multipart fields.
struct Upload {
    filename: String,
    bytes: Bytes,
    fields: HashMap<String, String>,
}

/// The largest upload request: the file and ComfyUI's other fields.
const MAX_UPLOAD_REQUEST: usize = MAX_UPLOAD_BYTES + 1024 * 1024;

/// Reads an upload request. One that says it is over the limit
/// (`Content-Length`) is refused before anything is parsed, once the client
/// has sent it (see [`crate::error::read_body`]).
async fn read_upload(request: Request) -> Result<Upload, ApiError> {
    let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|l| l > MAX_UPLOAD_REQUEST as u64) {
        crate::error::drain(request.into_body().into_data_stream()).await;
        return Err(too_large_upload());
    }
    let multipart: Result<Multipart, MultipartRejection> = Multipart::from_request(request, &()).await;
    let mut multipart = multipart.map_err(|e| ApiError::bad_request("invalid_upload", format!("not a multipart upload: {e}")))?;
    let mut image = None;
    let mut fields = HashMap::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e)),
        };
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = field.bytes().await.map_err(multipart_error)?;
        if bytes.len() > MAX_UPLOAD_BYTES {
            return Err(too_large_upload());
        }
        match (name.as_str(), file_name) {
            ("image", Some(file_name)) => image = Some((file_name, bytes)),
            _ => {
                fields.insert(name, String::from_utf8_lossy(&bytes).into_owned());
            }
        }
    }
    let Some((filename, bytes)) = image else {
        return Err(ApiError::bad_request("invalid_upload", "the upload has no `image` file field"));
    };
    Ok(Upload { filename, bytes, fields })
}

fn too_large_upload() -> ApiError {
    ApiError::TooLarge(format!("uploads are limited to {} MiB", MAX_UPLOAD_BYTES / (1024 * 1024)))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large_upload()
    } else {
        ApiError::bad_request("invalid_upload", format!("the upload could not be read: {e}"))
    }
}

/// Where an upload goes: `(folder, type, subfolder as sent)`; checks the name.
fn upload_target(files: &Files, user: u32, upload: &Upload) -> Result<(PathBuf, String, String), ApiError> {
    let kind = upload.fields.get("type").map(String::as_str).filter(|t| !t.is_empty()).unwrap_or("input");
    if kind != "input" && kind != "temp" {
        return Err(ApiError::bad_request("invalid_type", format!("uploads go to `input` or `temp`, not {kind:?}")));
    }
    let subfolder = upload.fields.get("subfolder").cloned().unwrap_or_default();
    let dir = files.user_dir(user, kind)?.join(safe_subfolder(&subfolder)?);
    safe_name(&upload.filename)?;
    if active_content(&upload.filename) {
        return Err(ApiError::bad_request(
            "invalid_filename",
            format!("{:?}: files of this type cannot be uploaded (images, videos and audio only)", upload.filename),
        ));
    }
    Ok((dir, kind.to_string(), subfolder))
}

/// The bytes are a media file (by their magic numbers); an image the
/// gateway can read must also be whole: a PNG up to its `IEND` chunk, any
/// other readable image with a readable header.
fn check_media(filename: &str, bytes: &[u8]) -> Result<(), ApiError> {
    let Some(kind) = sniff(bytes) else {
        return Err(ApiError::bad_request(
            "invalid_image",
            format!("{filename:?} is not an image, video or audio file this editor can use"),
        ));
    };
    let whole = match kind {
        "png" => complete_png(bytes),
        "jpeg" | "gif" | "webp" | "bmp" => image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .is_ok_and(|r| r.into_dimensions().is_ok()),
        _ => true,
    };
    if !whole {
        return Err(ApiError::bad_request(
            "invalid_image",
            format!("{filename:?} is not a whole {kind} image (truncated or damaged); upload it again"),
        ));
    }
    Ok(())
}

/// Whether `bytes` are a PNG whose chunks run whole from the signature to
/// the `IEND` chunk.
fn complete_png(bytes: &[u8]) -> bool {
    let mut at = 8;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let Some(end) = at.checked_add(12).and_then(|a| a.checked_add(len)) else { return false };
        if end > bytes.len() {
            return false;
        }
        if &header[4..8] == b"IEND" {
            return true;
        }
        at = end;
    }
    false
}

/// `os.path.splitext` of a plain name.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    }
}

/// Stores `bytes` as `dir/name`, or, without `overwrite`, under the first
/// free `name (i).ext` (an existing file with the same bytes is reused).
/// Returns the name used.
async fn store_upload(dir: &Path, name: &str, bytes: &[u8], overwrite: bool) -> Result<String, ApiError> {
    let io = |p: &Path, e: std::io::Error| ApiError::Internal(format!("cannot store the upload in {}: {e}", p.display()));
    tokio::fs::create_dir_all(dir).await.map_err(|e| io(dir, e))?;
    if overwrite {
        write_atomic(&dir.join(name), bytes).await?;
        return Ok(name.to_string());
    }
    let tmp = dir.join(format!(".upload.{}.part", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&tmp, bytes).await.map_err(|e| io(&tmp, e))?;
    let (stem, ext) = split_ext(name);
    let mut result = Err(ApiError::Conflict(format!("too many files named like {name:?}")));
    for i in 0..10_000u32 {
        let candidate = if i == 0 { name.to_string() } else { format!("{stem} ({i}){ext}") };
        let path = dir.join(&candidate);
        if tokio::fs::symlink_metadata(&path).await.is_ok() {
            if tokio::fs::read(&path).await.is_ok_and(|existing| existing == bytes) {
                result = Ok(candidate);
                break;
            }
            continue;
        }
        // A hard link never replaces: two uploads of one name cannot clash.
        match tokio::fs::hard_link(&tmp, &path).await {
            Ok(()) => {
                result = Ok(candidate);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                result = Err(io(&path, e));
                break;
            }
        }
    }
    let _ = tokio::fs::remove_file(&tmp).await;
    result
}

fn overwrite_of(upload: &Upload) -> bool {
    matches!(upload.fields.get("overwrite").map(String::as_str), Some("true" | "1"))
}

/// `POST upload/image`.
async fn upload_image(
    Participant(user): Participant,
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let upload = read_upload(request).await?;
    let (dir, kind, subfolder) = upload_target(&state.files, user, &upload)?;
    check_media(&upload.filename, &upload.bytes)?;
    let name = store_upload(&dir, &upload.filename, &upload.bytes, overwrite_of(&upload)).await?;
    tracing::info!(user, %name, %subfolder, %kind, bytes = upload.bytes.len(), "upload stored");
    Ok(Json(json!({ "name": name, "subfolder": subfolder, "type": kind })))
}

/// `POST upload/mask`: the mask's alpha onto the original (`original_ref`).
async fn upload_mask(
    Participant(user): Participant,
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let upload = read_upload(request).await?;
    let (dir, kind, subfolder) = upload_target(&state.files, user, &upload)?;
    check_media(&upload.filename, &upload.bytes)?;
    let reference: Value = upload
        .fields
        .get("original_ref")
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| ApiError::bad_request("invalid_upload", "a mask upload needs `original_ref` (JSON)"))?;
    let original_name = reference["filename"].as_str().unwrap_or_default();
    let (annotated, name) = split_file_reference(original_name);
    let kind_of_original = if name != original_name {
        annotated
    } else {
        reference["type"].as_str().filter(|t| !t.is_empty()).unwrap_or("output")
    };
    let original_sub = reference["subfolder"].as_str().unwrap_or_default();
    let original = state.files.resolve(user, kind_of_original, original_sub, name).map_err(|_| {
        ApiError::bad_request("invalid_upload", format!("the image the mask belongs to ({original_name:?}) is not among your files"))
    })?;
    let original_bytes = tokio::fs::read(&original)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read {}: {e}", original.display())))?;
    let mask = upload.bytes.clone();
    let composite = tokio::task::spawn_blocking(move || apply_mask(&original_bytes, &mask))
        .await
        .map_err(|e| ApiError::Internal(format!("mask task failed: {e}")))??;
    let stored = store_upload(&dir, &upload.filename, &composite, overwrite_of(&upload)).await?;
    Ok(Json(json!({ "name": stored, "subfolder": subfolder, "type": kind })))
}

/// The original image with the mask's alpha channel, as PNG (ComfyUI's
/// `upload_mask`).
pub fn apply_mask(original: &[u8], mask: &[u8]) -> Result<Vec<u8>, ApiError> {
    let unreadable = |what: &str, e: image::ImageError| ApiError::bad_request("invalid_image", format!("cannot read the {what}: {e}"));
    let mut image = image::load_from_memory(original).map_err(|e| unreadable("original image", e))?.to_rgba8();
    let mask = image::load_from_memory(mask).map_err(|e| unreadable("mask", e))?.to_rgba8();
    if image.dimensions() != mask.dimensions() {
        return Err(ApiError::bad_request(
            "invalid_image",
            format!("the mask is {:?} pixels, the image {:?}", mask.dimensions(), image.dimensions()),
        ));
    }
    for (pixel, m) in image.pixels_mut().zip(mask.pixels()) {
        pixel.0[3] = m.0[3];
    }
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::Internal(format!("cannot encode the masked image: {e}")))?;
    Ok(out.into_inner())
}

// ---------------------------------------------------------------------------
// The participant's files a prompt refers to (for gpu-task)
// ---------------------------------------------------------------------------

/// The file a reference such as `cat.png`, `clipspace/m.png [input]` or
/// `webcam/1.png [temp]` names among participant `user`'s files; 400/404
/// when it is not a safe name of an existing file.
pub fn resolve_reference(files: &Files, user: u32, reference: &str) -> Result<PathBuf, ApiError> {
    let (kind, path) = split_file_reference(reference);
    let (sub, name) = path.rsplit_once('/').unwrap_or(("", path));
    files.resolve(user, kind, sub, name)
}

/// Every string input value of `prompt` that names one of participant
/// `user`'s files (checked now, at submit time), each once, in prompt order.
pub fn referenced_inputs(files: &Files, user: u32, prompt: &Value) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let nodes = prompt.as_object().into_iter().flat_map(|m| m.values());
    for node in nodes {
        let Some(inputs) = node.get("inputs").and_then(Value::as_object) else { continue };
        for value in inputs.values() {
            let Some(s) = value.as_str() else { continue };
            if s.is_empty() || s.len() > 1024 || seen.contains(s) {
                continue;
            }
            if resolve_reference(files, user, s).is_ok() {
                seen.insert(s.to_string());
                out.push(s.to_string());
            }
        }
    }
    out
}

/// Serves a file with `ServeFile` (conditional and range requests).
pub async fn serve_file(path: PathBuf, uri: axum::http::Uri) -> Result<Response, ApiError> {
    let inner = Request::builder().uri(uri).body(Body::empty()).expect("a valid request");
    let mut response = tower_http::services::ServeFile::new(path)
        .oneshot(inner)
        .await
        .map_err(|e| ApiError::Internal(format!("cannot read file: {e}")))?
        .into_response();
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_is_told_by_its_bytes() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("png"));
        assert_eq!(sniff(b"\xff\xd8\xff\xe0"), Some("jpeg"));
        assert!(sniff(b"RIFF\0\0\0\0WEBPVP8 ").is_some());
        assert!(sniff(b"\0\0\0\x18ftypmp42").is_some());
        assert_eq!(sniff(b"hello, world"), None);
        assert_eq!(sniff(b"<svg xmlns="), None);
        assert_eq!(sniff(b""), None);
        assert!(active_content("x.HTML"));
        assert!(active_content("a.svg"));
        assert!(!active_content("a.png"));
    }

    #[test]
    fn only_whole_images_pass() {
        let mut png = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])).write_to(&mut png, image::ImageFormat::Png).unwrap();
        let png = png.into_inner();
        assert!(check_media("a.png", &png).is_ok());
        assert!(check_media("a.png", &png[..png.len() - 1]).is_err());
        assert!(check_media("a.png", &png[..png.len() / 2]).is_err());
        assert!(check_media("a.png", &png[..8]).is_err());
        assert!(check_media("a.jpg", b"\xff\xd8\xff\xe0 not really").is_err());
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3])).write_to(&mut jpeg, image::ImageFormat::Jpeg).unwrap();
        assert!(check_media("a.jpg", jpeg.get_ref()).is_ok());
    }

    #[test]
    fn names_and_kinds() {
        assert_eq!(split_ext("a.b.png"), ("a.b", ".png"));
        assert_eq!(split_ext("noext"), ("noext", ""));
        assert_eq!(MediaKind::of_name("x.JPG"), Some(MediaKind::Image));
        assert_eq!(MediaKind::of_name("x.mp4"), Some(MediaKind::Video));
        assert_eq!(MediaKind::of_name("x.txt"), None);
    }

    #[tokio::test]
    async fn uploads_get_free_names() {
        let dir = tempfile::tempdir().unwrap();
        let a = store_upload(dir.path(), "x.png", b"one", false).await.unwrap();
        let same = store_upload(dir.path(), "x.png", b"one", false).await.unwrap();
        let other = store_upload(dir.path(), "x.png", b"two", false).await.unwrap();
        let third = store_upload(dir.path(), "x.png", b"three", false).await.unwrap();
        assert_eq!((a.as_str(), same.as_str(), other.as_str(), third.as_str()), ("x.png", "x.png", "x (1).png", "x (2).png"));
        let over = store_upload(dir.path(), "x.png", b"four", true).await.unwrap();
        assert_eq!(over, "x.png");
        assert_eq!(std::fs::read(dir.path().join("x.png")).unwrap(), b"four");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 3, "no temp files left: {names:?}");
    }

    #[test]
    fn pickers_list_the_participants_files_and_nothing_else_changes() {
        let def = r#"{"input": {"required": {"image": [["example.png"], {"image_upload": true}], "other": ["INT", {"default": 1}]}, "optional": {"video": ["COMBO", {"video_upload": true, "options": []}], "out": ["COMBO", {"image_upload": true, "image_folder": "output", "options": ["x"]}]}}, "input_order": {"required": ["image", "other"]}, "name": "N"}"#;
        let mut files = HashMap::new();
        files.insert(MediaKind::Image, vec!["a.png".to_string()]);
        files.insert(MediaKind::Video, vec!["v.mp4".to_string()]);
        let raw: Box<RawValue> = serde_json::from_str(def).unwrap();
        let out = patched(&raw, &files);
        assert_eq!(
            out.get(),
            r#"{"input":{"required":{"image":[["a.png"],{"image_upload":true}],"other":["INT", {"default": 1}]},"optional":{"video":["COMBO",{"options":["v.mp4"],"video_upload":true}],"out":["COMBO", {"image_upload": true, "image_folder": "output", "options": ["x"]}]}},"input_order":{"required": ["image", "other"]},"name":"N"}"#
        );
        let untouched: Box<RawValue> = serde_json::from_str(r#"{"z": 1, "a": {"y": 2, "b": 3}}"#).unwrap();
        assert_eq!(patched(&untouched, &files).get(), r#"{"z": 1, "a": {"y": 2, "b": 3}}"#);
        // Key order survives a whole object_info.
        let info: Ordered = serde_json::from_str(r#"{"ZNode": {"x": 1}, "ANode": {"b": 1, "a": 2}}"#).unwrap();
        assert_eq!(serde_json::to_string(&info).unwrap(), r#"{"ZNode":{"x": 1},"ANode":{"b": 1, "a": 2}}"#);
    }

    #[test]
    fn python_json_is_read() {
        let body = Bytes::from_static(br#"{"a": Infinity, "b": -Infinity, "c": NaN, "s": "NaN Infinity \" x"}"#);
        let fixed = readable_json(body).unwrap();
        let v: Value = serde_json::from_slice(&fixed).unwrap();
        assert_eq!(v["a"], json!(1e308));
        assert_eq!(v["b"], json!(-1e308));
        assert_eq!(v["c"], Value::Null);
        assert_eq!(v["s"], "NaN Infinity \" x");
        assert!(readable_json(Bytes::from_static(b"not json")).is_err());
    }

    #[test]
    fn masks_become_alpha() {
        let mut original = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(2, 1, image::Rgb([10, 20, 30])).write_to(&mut original, image::ImageFormat::Png).unwrap();
        let mut mask = std::io::Cursor::new(Vec::new());
        image::RgbaImage::from_fn(2, 1, |x, _| image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }]))
            .write_to(&mut mask, image::ImageFormat::Png)
            .unwrap();
        let out = apply_mask(original.get_ref(), mask.get_ref()).unwrap();
        let img = image::load_from_memory(&out).unwrap().to_rgba8();
        assert_eq!(img.get_pixel(0, 0).0, [10, 20, 30, 0]);
        assert_eq!(img.get_pixel(1, 0).0, [10, 20, 30, 255]);
        let mut small = std::io::Cursor::new(Vec::new());
        image::RgbaImage::new(1, 1).write_to(&mut small, image::ImageFormat::Png).unwrap();
        assert!(apply_mask(original.get_ref(), small.get_ref()).is_err());
    }
}
