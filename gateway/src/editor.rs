//! The real ComfyUI editor (the pinned `comfyui-frontend-package`), served
//! per participant at `/user/{n}/`, so its `api_base` is `/user/{n}` and
//! every call it makes lands in the per-user API (`comfy`, `editor_api`).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /user/{n}` | 308 to `/user/{n}/` (the editor needs the slash to find its API) |
//! | `GET /user/{n}/` | the editor's `index.html` (`no-cache`); a browser that is not logged in as `n` is sent to `/login?user=n` (303) |
//! | `GET /user/{n}/user.css` | an empty stylesheet (ComfyUI: 404 unless the file exists) |
//! | `GET /user/{n}/extensions/comfy-multi/…` | the gateway's own extensions (`gateway/static/extensions/`, embedded) |
//! | `GET /user/{n}/favicon.ico` | the editor's favicon |
//! | `GET /user/{n}/…` | any other file of the editor (`assets/`, `extensions/core/`, `fonts/`, `cursor/`, `scripts/`, `materialdesignicons.min.css`) |
//! | `GET /assets/…` | the editor's `assets/` again: it names its favicons and an avatar by absolute path |
//!
//! The editor's files are public (they are the published frontend package):
//! only `index.html` and the API need a login. Text files (scripts, styles,
//! JSON, source maps) are sent gzip-compressed when the browser asks; each is
//! compressed once and kept in memory (up to 128 MiB in all; the editor's
//! main script alone is 11 MB, 20 browsers at once must not compress it 20
//! times). Vite's hashed files (`assets/<name>-<hash>.<ext>`) are
//! `immutable` for a year; other files of the package are cached for an
//! hour; the gateway's own extensions and `index.html` are revalidated on
//! every load.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use tower::ServiceExt;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, DefaultPredicate};

use crate::auth::Participant;
use crate::editor_api::ComfyInfo;
use crate::error::ApiError;
use crate::state::AppState;
use crate::userdata::UserData;

include!(concat!(env!("OUT_DIR"), "/own_extensions.rs"));

/// Where the gateway's own extensions appear: `/extensions/comfy-multi/…`.
pub const OWN_EXTENSIONS_PREFIX: &str = "extensions/comfy-multi";

/// `Cache-Control` of Vite's content-hashed files.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of the package's other files.
const HOUR: &str = "public, max-age=3600";
/// `Cache-Control` of what must be revalidated on every load.
const REVALIDATE: &str = "no-cache";

/// A model-free workflow in the editor's (UI) format, put into an empty
/// `workflows_dir` on first start as an example for the instructor.
pub const SAMPLE_WORKFLOW: (&str, &str) = ("model-free-example.json", include_str!("../workflows/model-free-example.json"));

/// What the editor routes need: the frontend, the participants' userdata,
/// and what the gateway knows of the GPU node's ComfyUI.
#[derive(Clone)]
pub struct Editor {
    inner: Arc<Inner>,
}

struct Inner {
    frontend_dir: Option<PathBuf>,
    userdata: UserData,
    comfy: ComfyInfo,
    /// `/extensions/...` paths the editor loads (the package's core
    /// extensions, then the gateway's own).
    extensions: Vec<String>,
    /// Compressed copies of the package's text files.
    gzip: GzipCache,
}

/// The most compressed bytes kept in memory.
const GZIP_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// One file, compressed, for the version of it on disk then.
struct Gzipped {
    modified: SystemTime,
    len: u64,
    bytes: Bytes,
}

#[derive(Default)]
struct GzipCache {
    files: Mutex<HashMap<PathBuf, Arc<Gzipped>>>,
    /// One compression per file at a time.
    flights: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl GzipCache {
    fn lookup(&self, path: &Path, modified: SystemTime, len: u64) -> Option<Arc<Gzipped>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.get(path).filter(|g| g.modified == modified && g.len == len).cloned()
    }

    /// The gzip of `path` (a file of `len` bytes, modified at `modified`),
    /// compressed now if needed; `None` when it cannot be read or the cache
    /// is full.
    async fn get(&self, path: &Path, modified: SystemTime, len: u64) -> Option<Arc<Gzipped>> {
        if let Some(g) = self.lookup(path, modified, len) {
            return Some(g);
        }
        let flight = self.flights.lock().unwrap_or_else(|e| e.into_inner()).entry(path.to_path_buf()).or_default().clone();
        let _guard = flight.lock().await;
        if let Some(g) = self.lookup(path, modified, len) {
            return Some(g);
        }
        let full = self.files.lock().unwrap_or_else(|e| e.into_inner()).values().map(|g| g.bytes.len()).sum::<usize>()
            >= GZIP_CACHE_BYTES;
        if full {
            return None;
        }
        let source = path.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let data = std::fs::read(&source)?;
            let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(data.len() / 4), flate2::Compression::default());
            encoder.write_all(&data)?;
            encoder.finish()
        })
        .await
        .ok()?
        .ok()?;
        let gz = Arc::new(Gzipped { modified, len, bytes: Bytes::from(bytes) });
        self.files.lock().unwrap_or_else(|e| e.into_inner()).insert(path.to_path_buf(), gz.clone());
        Some(gz)
    }
}

impl Editor {
    /// `frontend_dir`: the package's `static/` (None: not installed; the
    /// API still works, the page says what to install).
    pub fn new(frontend_dir: Option<PathBuf>, userdata: UserData, comfy: ComfyInfo) -> Editor {
        let frontend_dir = frontend_dir.filter(|d| {
            let ok = d.join("index.html").is_file();
            if !ok {
                tracing::warn!(dir = %d.display(), "no index.html in the frontend dir: the editor pages will say so");
            }
            ok
        });
        let mut extensions = frontend_dir.as_deref().map(core_extensions).unwrap_or_default();
        extensions.extend(own_extension_urls());
        Editor { inner: Arc::new(Inner { frontend_dir, userdata, comfy, extensions, gzip: GzipCache::default() }) }
    }

    pub fn frontend_dir(&self) -> Option<&Path> {
        self.inner.frontend_dir.as_deref()
    }

    pub fn userdata(&self) -> &UserData {
        &self.inner.userdata
    }

    pub fn comfy(&self) -> &ComfyInfo {
        &self.inner.comfy
    }

    /// `GET /extensions`: every extension the gateway serves.
    pub fn extensions(&self) -> &[String] {
        &self.inner.extensions
    }
}

/// The `.js` files under the package's `extensions/` as ComfyUI lists them
/// (`/extensions/core/x.js`), sorted.
fn core_extensions(frontend_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![frontend_dir.join("extensions")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "js") {
                if let Ok(rel) = path.strip_prefix(frontend_dir) {
                    let rel: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
                    out.push(format!("/{}", rel.join("/")));
                }
            }
        }
    }
    out.sort();
    out
}

/// The URL path (below `/user/{n}/`) of one of the gateway's own files:
/// `static/extensions/x.js` is `extensions/comfy-multi/x.js` (a file already
/// under a `comfy-multi/` folder is not prefixed twice).
fn own_extension_path(rel: &str) -> String {
    let rel = rel.strip_prefix("comfy-multi/").unwrap_or(rel);
    format!("{OWN_EXTENSIONS_PREFIX}/{rel}")
}

fn own_extension_urls() -> Vec<String> {
    OWN_EXTENSIONS
        .iter()
        .filter(|(rel, _)| rel.ends_with(".js"))
        .map(|(rel, _)| format!("/{}", own_extension_path(rel)))
        .collect()
}

/// Creates `workflows_dir` with the example workflow when it does not exist
/// yet (an instructor who empties it keeps it empty).
pub fn install_sample_workflows(workflows_dir: &Path) -> std::io::Result<bool> {
    if workflows_dir.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(workflows_dir)?;
    std::fs::write(workflows_dir.join(SAMPLE_WORKFLOW.0), SAMPLE_WORKFLOW.1)?;
    Ok(true)
}

/// The editor's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/user/{n}", get(add_slash))
        .route("/user/{n}/", get(index))
        .route("/user/{n}/index.html", get(index))
        .route("/user/{n}/user.css", get(|| async { empty_css() }))
        .route("/user/{n}/favicon.ico", get(favicon))
        .route("/user/{n}/extensions/comfy-multi/{*path}", get(own_extension))
        .route("/user/{n}/{*path}", get(static_file))
        // The editor names a few of its images by absolute path (the
        // favicon, its progress frames, the avatar fallback).
        .route("/assets/{*path}", get(root_asset))
}

/// gzip for text; not for what is compressed already (images, fonts, media).
pub fn compression() -> CompressionLayer<impl Predicate> {
    let predicate = DefaultPredicate::new()
        .and(SizeAbove::new(256))
        .and(NotForContentType::const_new("font/"))
        .and(NotForContentType::const_new("video/"))
        .and(NotForContentType::const_new("audio/"))
        .and(NotForContentType::const_new("application/octet-stream"));
    CompressionLayer::new().gzip(true).no_br().no_deflate().no_zstd().compress_when(predicate)
}

/// An empty stylesheet: `user.css` and `api/userdata/user.css` when the
/// participant has none (ComfyUI answers 404; the editor needs nothing).
pub fn empty_css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, REVALIDATE)],
        "",
    )
        .into_response()
}

async fn add_slash(UrlPath(n): UrlPath<String>, request: Request) -> Response {
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::permanent(&format!("/user/{}/{query}", urlencoding::encode(&n))).into_response()
}

fn html_error(status: StatusCode, title: &str, text: &str) -> Response {
    let body = crate::login::page(title, &format!("<p>{}</p>", crate::login::escape(text)));
    let mut res = (status, Html(body)).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `GET /user/{n}/`: the editor, for participant `n` only.
async fn index(
    participant: Result<Participant, ApiError>,
    UrlPath(n): UrlPath<String>,
    State(state): State<AppState>,
    request: Request,
) -> Response {
    match participant {
        Ok(_) => {}
        Err(ApiError::Unauthorized(_)) => {
            let mut res = Redirect::to(&format!("/login?user={}", urlencoding::encode(&n))).into_response();
            res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return res;
        }
        Err(e @ ApiError::NotFound(_)) => return html_error(StatusCode::NOT_FOUND, "No such participant", &e.to_string()),
        Err(e @ ApiError::Limit { .. }) => return html_error(StatusCode::FORBIDDEN, "Not allowed", &e.to_string()),
        Err(e) => return html_error(StatusCode::SERVICE_UNAVAILABLE, "Try again", &e.to_string()),
    }
    let Some(dir) = state.editor.frontend_dir() else {
        return html_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "The editor is not installed",
            "The gateway has no ComfyUI frontend to serve. The instructor installs it with scripts/install-deps.sh \
             and points the gateway at it (gateway.frontend_dir / COMFYUI_FRONTEND_DIR).",
        );
    };
    serve(&state.editor, dir, "index.html", request).await
}

async fn favicon(State(state): State<AppState>, request: Request) -> Response {
    match state.editor.frontend_dir() {
        Some(dir) => serve(&state.editor, dir, "assets/favicon.ico", request).await,
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn root_asset(State(state): State<AppState>, request: Request) -> Response {
    let rel = request.uri().path().trim_start_matches('/').to_string();
    match state.editor.frontend_dir() {
        Some(dir) => serve(&state.editor, dir, &rel, request).await,
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The part of the request path below `/user/{n}/`, still URL-encoded.
fn below_user(request: &Request) -> &str {
    let path = request.uri().path();
    path.splitn(4, '/').nth(3).unwrap_or("")
}

async fn static_file(State(state): State<AppState>, request: Request) -> Response {
    let rel = below_user(&request).to_string();
    match state.editor.frontend_dir() {
        Some(dir) => serve(&state.editor, dir, &rel, request).await,
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves `rel` (URL-encoded, relative) from `dir`: compressed from the
/// cache when the browser takes gzip and the file is text, else with
/// `ServeDir` (which refuses `..` and answers conditional and range
/// requests); then sets the cache policy.
async fn serve(editor: &Editor, dir: &Path, rel: &str, request: Request) -> Response {
    let (request, _) = request.into_parts();
    if let Some(response) = serve_gzipped(editor, dir, rel, &request).await {
        return response;
    }
    let mut builder = Request::builder().method(request.method.clone()).uri(format!("/{rel}"));
    for name in [header::IF_MODIFIED_SINCE, header::IF_UNMODIFIED_SINCE, header::RANGE, header::IF_RANGE] {
        if let Some(v) = request.headers.get(&name) {
            builder = builder.header(name, v.clone());
        }
    }
    let inner = builder.body(Body::empty()).expect("a valid request");
    let mut response = match tower_http::services::ServeDir::new(dir).append_index_html_on_directories(false).oneshot(inner).await {
        Ok(r) => r.into_response(),
        Err(e) => return ApiError::Internal(format!("cannot read the editor's files: {e}")).into_response(),
    };
    let status = response.status();
    if status.is_success() || status == StatusCode::NOT_MODIFIED {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache_policy(rel)));
        if text_type(rel).is_some() {
            response.headers_mut().insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
    }
    response
}

/// The content type of the package's text files (worth compressing).
fn text_type(rel: &str) -> Option<&'static str> {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    Some(match name.rsplit_once('.')?.1.to_ascii_lowercase().as_str() {
        "js" | "mjs" => "text/javascript",
        "css" => "text/css",
        "json" | "map" => "application/json",
        "html" => "text/html; charset=utf-8",
        "svg" => "image/svg+xml",
        "txt" => "text/plain; charset=utf-8",
        "ttf" => "font/ttf",
        "eot" => "application/vnd.ms-fontobject",
        "ico" => "image/x-icon",
        _ => return None,
    })
}

/// Whether the request takes gzip (`Accept-Encoding`, not `q=0`).
fn accepts_gzip(request: &axum::http::request::Parts) -> bool {
    request.headers.get_all(header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(|token| {
        let mut parts = token.split(';').map(str::trim);
        let coding = parts.next().unwrap_or_default();
        let refused = parts.any(|p| p.replace(' ', "") == "q=0" || p.replace(' ', "") == "q=0.0");
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// The file `rel` (URL-encoded) names inside `dir`, if it is a plain path
/// to an existing file.
fn file_in(dir: &Path, rel: &str) -> Option<PathBuf> {
    let decoded = urlencoding::decode(rel).ok()?;
    let mut path = dir.to_path_buf();
    for part in decoded.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.contains('\\') || part.contains('\0') {
            return None;
        }
        path.push(part);
    }
    Some(path)
}

async fn serve_gzipped(editor: &Editor, dir: &Path, rel: &str, request: &axum::http::request::Parts) -> Option<Response> {
    let content_type = text_type(rel)?;
    let ranged = request.headers.contains_key(header::RANGE);
    if ranged || !accepts_gzip(request) || !matches!(request.method, axum::http::Method::GET | axum::http::Method::HEAD) {
        return None;
    }
    let path = file_in(dir, rel)?;
    let meta = tokio::fs::metadata(&path).await.ok().filter(|m| m.is_file())?;
    let modified = meta.modified().ok()?;
    let secs = modified.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let etag = format!("\"gz-{:x}-{secs:x}\"", meta.len());
    let headers = [
        (header::CACHE_CONTROL, HeaderValue::from_static(cache_policy(rel))),
        (header::VARY, HeaderValue::from_static("accept-encoding")),
        (header::ETAG, HeaderValue::from_str(&etag).expect("ASCII")),
    ];
    let unchanged = request
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if unchanged {
        return Some((StatusCode::NOT_MODIFIED, headers).into_response());
    }
    let gz = editor.inner.gzip.get(&path, modified, meta.len()).await?;
    let body = if request.method == axum::http::Method::HEAD { Bytes::new() } else { gz.bytes.clone() };
    let mut response = (headers, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(gz.bytes.len()));
    Some(response)
}

/// The `Cache-Control` of one of the package's files.
pub fn cache_policy(rel: &str) -> &'static str {
    if rel == "index.html" {
        REVALIDATE
    } else if rel.starts_with("assets/") && is_hashed(rel) {
        IMMUTABLE
    } else {
        HOUR
    }
}

/// Whether a file name carries Vite's content hash: `name-XXXXXXXX.ext`,
/// eight URL-safe base64 characters with at least one capital or digit.
fn is_hashed(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let stem = name.split('.').next().unwrap_or(name);
    let bytes = stem.as_bytes();
    if bytes.len() < 10 || bytes[bytes.len() - 9] != b'-' {
        return false;
    }
    let hash = &bytes[bytes.len() - 8..];
    hash.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        && hash.iter().any(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// `GET /user/{n}/extensions/comfy-multi/{path}`: one of the gateway's own files.
async fn own_extension(UrlPath((_n, path)): UrlPath<(String, String)>) -> Response {
    let wanted = format!("{OWN_EXTENSIONS_PREFIX}/{path}");
    match OWN_EXTENSIONS.iter().find(|(rel, _)| own_extension_path(rel) == wanted) {
        Some((rel, bytes)) => {
            let content_type = match rel.rsplit('.').next() {
                Some("js" | "mjs") => "text/javascript; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                Some("json") => "application/json",
                Some("svg") => "image/svg+xml",
                Some("png") => "image/png",
                _ => "application/octet-stream",
            };
            ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, REVALIDATE)], *bytes).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_names() {
        for hashed in [
            "assets/index-BKeTeXLp.js",
            "assets/index-BKeTeXLp.js.map",
            "assets/UserPanel-DNsqlNG-.js",
            "assets/mathUtil-CTARWQ-l.js",
            "assets/primeicons-C6QP2o4f.woff2",
            "assets/manifest-CebUEmtR.json",
        ] {
            assert!(is_hashed(hashed), "{hashed}");
            assert_eq!(cache_policy(hashed), IMMUTABLE);
        }
        for plain in [
            "assets/favicon.ico",
            "assets/lib/vue/dist/vue.esm-browser.prod.js",
            "assets/sorted-custom-node-map.json",
            "assets/CREDIT.txt",
            "extensions/core/groupNode.js",
        ] {
            assert!(!is_hashed(plain), "{plain}");
        }
        assert_eq!(cache_policy("index.html"), "no-cache");
        assert_eq!(cache_policy("fonts/inter-latin-normal.woff2"), HOUR);
    }

    #[test]
    fn gzip_is_negotiated() {
        let req = |v: &str| Request::builder().header(header::ACCEPT_ENCODING, v).body(()).unwrap().into_parts().0;
        assert!(accepts_gzip(&req("gzip, deflate, br, zstd")));
        assert!(accepts_gzip(&req("br;q=1.0, gzip;q=0.8")));
        assert!(!accepts_gzip(&req("gzip;q=0")));
        assert!(!accepts_gzip(&req("br")));
        assert!(!accepts_gzip(&Request::new(()).into_parts().0));
        assert_eq!(file_in(Path::new("/s"), "assets/a%20b.js"), Some(PathBuf::from("/s/assets/a b.js")));
        assert_eq!(file_in(Path::new("/s"), "assets/..%2F..%2Fetc%2Fpasswd"), None);
        assert_eq!(file_in(Path::new("/s"), "a//b"), None);
        assert_eq!(text_type("assets/index-BKeTeXLp.js"), Some("text/javascript"));
        assert_eq!(text_type("fonts/x.woff2"), None);
    }

    #[test]
    fn own_extensions_live_under_comfy_multi() {
        assert_eq!(own_extension_path("queue.js"), "extensions/comfy-multi/queue.js");
        assert_eq!(own_extension_path("comfy-multi/queue.js"), "extensions/comfy-multi/queue.js");
    }

    #[test]
    fn the_sample_workflow_is_a_ui_graph() {
        let v: serde_json::Value = serde_json::from_str(SAMPLE_WORKFLOW.1).unwrap();
        assert!(v["nodes"].as_array().is_some_and(|n| n.len() == 7));
        assert!(v["links"].is_array());
    }
}
