//! The stock editor's server, per participant, through the real HTTP surface:
//! every request the 1.27.10 editor makes (`editor-requests.json`) succeeds
//! under `/user/N/`, its files are served and cached right, settings and
//! userdata persist and stay private, the GPU node's `object_info` outlives
//! the GPU node, uploads are checked, and a job reads an uploaded image.
//!
//! Needs the pinned editor (`scripts/install-deps.sh` unpacks it;
//! `COMFYUI_FRONTEND_DIR` or the cache path) and `cargo build --workspace --bins`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_multi_tests::comfyui::json::Json;
use comfy_multi_tests::comfyui::{model_free_workflow, ComfyUi, Options};
use comfy_multi_tests::harness::{bin_path, cache_dir, free_port, spawn_logged, ChildGuard, Redis};
use comfy_multi_tests::stack::{stack, Executor, Stack};
use reqwest::header::{ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn frontend_dir() -> PathBuf {
    let dir = std::env::var_os("COMFYUI_FRONTEND_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("frontend/1.27.10/comfyui_frontend_package/static"));
    assert!(
        dir.join("index.html").is_file(),
        "the pinned ComfyUI editor is not at {}: run scripts/install-deps.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// A PNG of one colour.
fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().unwrap();
        let data: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
        writer.write_image_data(&data).unwrap();
    }
    out
}

/// Width, height and the first pixel (RGBA) of a PNG.
fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let mut first = buf[..channels].to_vec();
    if channels == 3 {
        first.push(255);
    }
    (info.width, info.height, first)
}

/// How a test authenticates as a participant.
#[derive(Clone)]
enum Auth {
    Bearer(String),
    Cookie(String),
}

impl Auth {
    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::Bearer(code) => req.bearer_auth(code),
            Auth::Cookie(cookie) => req.header(reqwest::header::COOKIE, cookie),
        }
    }
}

/// Logs participant `n` in through `/login`; returns the `Cookie` header value.
async fn login(base: &str, n: u32, code: &str) -> String {
    let resp = no_redirects()
        .post(format!("{base}/login"))
        .form(&[("user", n.to_string()), ("code", code.to_string())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], format!("/user/{n}/"));
    let set = resp.headers()[SET_COOKIE].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

/// Uploads `bytes` as `name` for participant `n` (fields as the editor sends).
async fn upload(
    base: &str,
    n: u32,
    auth: &Auth,
    route: &str,
    name: &str,
    bytes: Vec<u8>,
    fields: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut form = reqwest::multipart::Form::new()
        .part("image", reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()));
    for (k, v) in fields {
        form = form.text(k.to_string(), v.to_string());
    }
    let resp = auth.apply(reqwest::Client::new().post(format!("{base}/user/{n}/api/{route}"))).multipart(form).send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

// ---------------------------------------------------------------------------
// A gateway of our own (Redis + gateway), restartable, for persistence and
// caching.
// ---------------------------------------------------------------------------

struct Gateway {
    url: String,
    codes: Vec<(u32, String)>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    process: Option<ChildGuard>,
    _redis: Redis,
}

impl Gateway {
    /// With ComfyUI at `comfyui_url`, pre-loaded workflows from `workflows`.
    async fn start(comfyui_url: &str, workflows: &Path) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start().await.unwrap();
        let env: Vec<(String, String)> = [
            ("REDIS_URL", redis.url.clone()),
            ("DATA_DIR", dir.path().join("data").display().to_string()),
            ("PARTICIPANTS", "5".into()),
            ("INTERNAL_SECRET", "editor-test-secret".into()),
            ("ADMIN_TOKEN", "editor-test-admin".into()),
            ("COMFYUI_URL", comfyui_url.into()),
            ("COMFYUI_FRONTEND_DIR", frontend_dir().display().to_string()),
            ("WORKFLOWS_DIR", workflows.display().to_string()),
            // Nothing listens there: ComfyUI is COMFYUI_URL.
            ("CONSUL_HTTP_ADDR", format!("http://127.0.0.1:{}", free_port())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut gw = Gateway { url: String::new(), codes: Vec::new(), env, dir, process: None, _redis: redis };
        gw.launch().await;
        gw.codes = std::fs::read_to_string(gw.data_dir().join("secrets/access-codes.txt"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, c)| (n.parse().unwrap(), c.to_string()))
            .collect();
        gw
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn launch(&mut self) {
        let port = free_port();
        let mut cmd = tokio::process::Command::new(bin_path("gateway"));
        cmd.arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env_remove("COMFY_MULTI_CONFIG")
            .env_remove("NOMAD_TOKEN");
        self.process = Some(spawn_logged(cmd, "gateway"));
        self.url = format!("http://127.0.0.1:{port}");
        comfy_multi_tests::stack::wait_healthy(&reqwest::Client::new(), &self.url).await;
    }

    /// Stops the gateway (SIGKILL: nothing gets a chance to flush) and starts it again.
    async fn restart(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
        self.launch().await;
    }

    fn auth(&self, n: u32) -> Auth {
        Auth::Bearer(self.codes.iter().find(|(u, _)| *u == n).unwrap().1.clone())
    }

    fn get(&self, n: u32, path: &str) -> reqwest::RequestBuilder {
        self.auth(n).apply(reqwest::Client::new().get(format!("{}/user/{n}/api/{path}", self.url)))
    }

    fn post(&self, n: u32, path: &str) -> reqwest::RequestBuilder {
        self.auth(n).apply(reqwest::Client::new().post(format!("{}/user/{n}/api/{path}", self.url)))
    }

    async fn json(&self, n: u32, path: &str) -> Value {
        let resp = self.get(n, path).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        resp.json().await.unwrap()
    }
}

/// A folder of pre-loaded workflows: the instructor's `intro.json`.
fn preloaded() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("intro.json"), r#"{"nodes": [], "links": [], "version": 0.4}"#).unwrap();
    dir
}

// ---------------------------------------------------------------------------
// The editor's own requests
// ---------------------------------------------------------------------------

/// `/user/2/...` for a URL of the recording.
fn rewrite(url: &str) -> String {
    if url == "/" {
        "/user/2/".into()
    } else {
        format!("/user/2{url}")
    }
}

async fn replay(stack: &Stack, auth: &Auth) {
    let requests: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/comfyui-samples/editor-requests.json")).unwrap(),
    )
    .unwrap();
    let http = no_redirects();
    let mut job = None;
    let mut checked = 0;
    for r in &requests {
        let (Some(method), Some(url)) = (r["method"].as_str(), r["url"].as_str()) else { continue };
        // Failed fetches (aborted, offline api.comfy.org), blobs and the websocket are not requests to the server.
        if method.is_empty() || !url.starts_with('/') {
            continue;
        }
        let mut path = rewrite(url);
        if url.starts_with("/api/view?") {
            // The recording's file name; ours is in the job's history.
            let id: String = job.clone().expect("the run queued a prompt first");
            let entry = stack.finished(2, &id).await;
            assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
            let image = &entry["outputs"]["7"]["images"][0];
            path = format!(
                "/user/2/api/view?filename={}&subfolder={}&type=output&rand=0.5",
                image["filename"].as_str().unwrap(),
                image["subfolder"].as_str().unwrap()
            );
        }
        let req = match method {
            "GET" => http.get(format!("{}{path}", stack.gateway_url)),
            "POST" if url == "/api/prompt" => http.post(format!("{}{path}", stack.gateway_url)).json(&json!({
                "client_id": "editor-test",
                "prompt": model_free_workflow(),
                "extra_data": {"extra_pnginfo": {"workflow": {}}},
            })),
            other => panic!("unexpected {other} {url} in the recording"),
        };
        let resp = auth.apply(req).send().await.unwrap();
        let status = resp.status();
        let body = resp.bytes().await.unwrap();
        assert!(status.is_success(), "{method} {path} answered {status}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
        if url == "/api/prompt" {
            let answer: Value = serde_json::from_slice(&body).unwrap();
            job = Some(answer["prompt_id"].as_str().unwrap().to_string());
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} requests replayed");
}

#[tokio::test]
async fn every_request_of_the_editor_succeeds_for_a_participant() {
    let frontend = frontend_dir();
    let stack = stack(Executor::Local).await;
    let base = stack.gateway_url.clone();
    let http = no_redirects();

    // The page needs its slash, and a login.
    let resp = http.get(format!("{base}/user/2")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.headers()[LOCATION], "/user/2/");
    let resp = http.get(format!("{base}/user/2/")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[LOCATION], "/login?user=2");
    assert_eq!(http.get(format!("{base}/user/2/api/settings")).send().await.unwrap().status(), 401);
    let cookie = login(&base, 2, stack.code(2)).await;
    // Participant 2's session is not participant 3's.
    let resp = http.get(format!("{base}/user/3/")).header(reqwest::header::COOKIE, &cookie).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);

    replay(&stack, &Auth::Bearer(stack.code(2).to_string())).await;
    replay(&stack, &Auth::Cookie(cookie.clone())).await;

    // The page is the editor's index.html, revalidated on every load.
    let resp = http.get(format!("{base}/user/2/")).header(reqwest::header::COOKIE, &cookie).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[CACHE_CONTROL], "no-cache");
    let index = resp.text().await.unwrap();
    assert_eq!(index, std::fs::read_to_string(frontend.join("index.html")).unwrap());

    // Every asset index.html names: hashed, immutable, gzip when asked.
    let assets: Vec<&str> = index
        .split(['"', '\''])
        .filter(|s| s.starts_with("./assets/") && !s.starts_with("./assets/lib/"))
        .collect();
    assert!(assets.len() >= 3, "{assets:?}");
    for asset in &assets {
        let url = format!("{base}/user/2/{}", asset.trim_start_matches("./"));
        let resp = http.get(&url).header(ACCEPT_ENCODING, "gzip").send().await.unwrap();
        assert_eq!(resp.status(), 200, "{url}");
        assert_eq!(resp.headers()[CACHE_CONTROL], "public, max-age=31536000, immutable", "{url}");
        assert_eq!(resp.headers()[CONTENT_ENCODING], "gzip", "{url}");
        let plain = http.get(&url).send().await.unwrap();
        assert!(plain.headers().get(CONTENT_ENCODING).is_none());
        let on_disk = std::fs::read(frontend.join(asset.trim_start_matches("./"))).unwrap();
        assert_eq!(plain.bytes().await.unwrap().as_ref(), on_disk.as_slice(), "{url}");
    }
    // Files outside assets/ are the package's too; no login needed.
    for file in ["materialdesignicons.min.css", "fonts/materialdesignicons-webfont.woff2", "cursor/colorSelect.png", "scripts/api.js"] {
        let resp = http.get(format!("{base}/user/2/{file}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{file}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), std::fs::read(frontend.join(file)).unwrap().as_slice());
    }
    assert_eq!(http.get(format!("{base}/user/2/assets/..%2F..%2Fetc%2Fpasswd")).send().await.unwrap().status(), 404);
    assert_eq!(http.get(format!("{base}/user/2/no-such-file.js")).send().await.unwrap().status(), 404);

    // Every extension the editor is told to load is there.
    let list: Vec<String> = Auth::Cookie(cookie.clone())
        .apply(http.get(format!("{base}/user/2/api/extensions")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.iter().any(|e| e == "/extensions/core/groupNode.js"), "{list:?}");
    for ext in &list {
        let resp = http.get(format!("{base}/user/2{ext}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{ext}");
        assert!(resp.headers()[CONTENT_TYPE].to_str().unwrap().contains("javascript"), "{ext}");
    }

    // What the editor would 404 on at a real server is an empty answer here.
    let get = |path: &str| Auth::Cookie(cookie.clone()).apply(http.get(format!("{base}/user/2/{path}")));
    let css = get("api/userdata/user.css").send().await.unwrap();
    assert_eq!((css.status(), css.headers()[CONTENT_TYPE].to_str().unwrap()), (StatusCode::OK, "text/css; charset=utf-8"));
    assert_eq!(get("templates/index.json").send().await.unwrap().json::<Value>().await.unwrap(), json!([]));
    assert_eq!(
        get("api/userdata/workflows%2F.index.json").send().await.unwrap().json::<Value>().await.unwrap(),
        json!({"favorites": []}),
        "the workflow bookmarks"
    );
    // The editor names its favicons by absolute path.
    for file in ["assets/favicon.ico", "assets/images/favicon_progress_16x16/frame_9.png"] {
        let resp = http.get(format!("{base}/{file}")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "/{file}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), std::fs::read(frontend.join(file)).unwrap().as_slice());
    }
    let listing: Value = get("api/userdata?dir=workflows&recurse=true&split=false&full_info=true").send().await.unwrap().json().await.unwrap();
    assert_eq!(listing[0]["path"], "model-free-example.json", "the shipped example is pre-loaded: {listing}");
    // A route the editor does not call is ComfyUI's 404, not an error.
    assert_eq!(get("api/no/such/route").send().await.unwrap().status(), 404);
    assert_eq!(http.get(format!("{base}/user/2/api/no/such/route")).send().await.unwrap().status(), 401);
}

// ---------------------------------------------------------------------------
// Settings and userdata
// ---------------------------------------------------------------------------

#[tokio::test]
async fn settings_and_userdata_round_trip_persist_and_stay_private() {
    let workflows = preloaded();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut gw = Gateway::start(&dead, workflows.path()).await;

    assert_eq!(gw.json(2, "users").await, json!({"storage": "server", "migrated": true}));
    assert_eq!(gw.json(2, "settings").await, json!({}));
    let r = gw.post(2, "settings").json(&json!({"Comfy.ColorPalette": "light", "Comfy.A": 1})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = gw.post(2, "settings/Comfy.A").json(&json!({"nested": [1, 2]})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.json(2, "settings").await, json!({"Comfy.ColorPalette": "light", "Comfy.A": {"nested": [1, 2]}}));
    assert_eq!(gw.json(2, "settings/Comfy.ColorPalette").await, json!("light"));
    assert_eq!(gw.json(2, "settings/Comfy.Unknown").await, Value::Null);
    assert_eq!(gw.post(2, "settings").body("[1]").send().await.unwrap().status(), 400);

    // Empty listings are empty, not 404.
    let list = "userdata?dir=workflows&recurse=true&split=false&full_info=true";
    assert_eq!(gw.json(2, "userdata?dir=subgraphs%2F&recurse=true&split=false&full_info=true").await, json!([]));
    let mine = gw.json(2, list).await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert_eq!(mine[0]["path"], "intro.json");

    // Save, refuse to overwrite, read back, list, rename.
    let graph = json!({"nodes": [{"id": 1}], "links": [], "version": 0.4});
    let r = gw.post(2, "userdata/workflows%2Fmine.json?overwrite=false&full_info=true").json(&graph).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["path"], "workflows/mine.json");
    assert_eq!(info["size"], graph.to_string().len());
    assert!(info["modified"].as_u64().unwrap() > 1_600_000_000_000, "ms: {info}");
    let r = gw.post(2, "userdata/workflows%2Fmine.json?overwrite=false").json(&graph).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(gw.json(2, "userdata/workflows%2Fmine.json").await, graph);
    let paths = |v: Value| -> Vec<String> { v.as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect() };
    assert_eq!(paths(gw.json(2, list).await), ["intro.json", "mine.json"]);
    let tree = gw.json(2, "v2/userdata").await;
    assert_eq!(paths(tree), ["workflows", "comfy.settings.json", "workflows/intro.json", "workflows/mine.json"]);
    assert_eq!(gw.get(2, "v2/userdata?path=..%2F..").send().await.unwrap().status(), 400);
    let r = gw.post(2, "userdata/workflows%2Fmine.json/move/workflows%2Fday%201%2Fkept.json?overwrite=false&full_info=true").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["path"], "workflows/day 1/kept.json");
    assert_eq!(paths(gw.json(2, list).await), ["day 1/kept.json", "intro.json"]);
    assert_eq!(gw.json(2, "userdata?dir=workflows&recurse=false&split=false&full_info=false").await, json!(["intro.json"]));
    assert_eq!(
        gw.json(2, "userdata?dir=workflows&recurse=true&split=true&full_info=false").await,
        json!([["day 1/kept.json", "day 1", "kept.json"], ["intro.json", "intro.json"]])
    );

    // The pre-loaded workflow: readable, not deletable; a save makes one's own copy.
    let intro = gw.json(2, "userdata/workflows%2Fintro.json").await;
    assert_eq!(intro["version"], 0.4);
    assert_eq!(gw.auth(2).apply(reqwest::Client::new().delete(format!("{}/user/2/api/userdata/workflows%2Fintro.json", gw.url))).send().await.unwrap().status(), 403);
    let r = gw.post(2, "userdata/workflows%2Fintro.json?overwrite=true").json(&json!({"own": true})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.json(2, "userdata/workflows%2Fintro.json").await, json!({"own": true}));

    // Traversal is refused before anything happens.
    for bad in ["..%2F..%2Fsecrets%2Fadmin-token", "%2E%2E%2Fx.json", "workflows%2F..%2F..%2F..%2Fx.json", "%252E%252E%252Fx.json"] {
        let r = gw.get(2, &format!("userdata/{bad}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "GET {bad}");
        let r = gw.post(2, &format!("userdata/{bad}")).body("{}").send().await.unwrap();
        assert_eq!(r.status(), 400, "POST {bad}");
    }
    assert_eq!(gw.get(2, "userdata?dir=..%2F..&recurse=true").send().await.unwrap().status(), 400);
    assert!(!gw.data_dir().join("users/x.json").exists() && !gw.data_dir().join("x.json").exists());

    // Participant 5 sees none of it.
    assert_eq!(gw.json(5, "settings").await, json!({}));
    assert_eq!(paths(gw.json(5, list).await), ["intro.json"]);
    assert_eq!(gw.json(5, "userdata/workflows%2Fintro.json").await["version"], 0.4);
    assert_eq!(gw.get(5, "userdata/workflows%2Fday%201%2Fkept.json").send().await.unwrap().status(), 404);
    assert_eq!(gw.auth(5).apply(reqwest::Client::new().get(format!("{}/user/2/api/settings", gw.url))).send().await.unwrap().status(), 401);

    // A killed and restarted gateway still has everything.
    gw.restart().await;
    assert_eq!(gw.json(2, "settings").await, json!({"Comfy.ColorPalette": "light", "Comfy.A": {"nested": [1, 2]}}));
    assert_eq!(paths(gw.json(2, list).await), ["day 1/kept.json", "intro.json"]);
    assert_eq!(gw.json(2, "userdata/workflows%2Fday%201%2Fkept.json").await, graph);
    let r = gw.auth(2).apply(reqwest::Client::new().delete(format!("{}/user/2/api/userdata/workflows%2Fday%201%2Fkept.json", gw.url))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(gw.get(2, "userdata/workflows%2Fday%201%2Fkept.json").send().await.unwrap().status(), 404);
}

// ---------------------------------------------------------------------------
// What the GPU node says, cached
// ---------------------------------------------------------------------------

#[tokio::test]
async fn object_info_outlives_comfyui_and_lists_each_participants_own_images() {
    let scratch = tempfile::tempdir().unwrap();
    let comfy = ComfyUi::start(Options::new(scratch.path().join("out"), scratch.path().join("in"))).await.unwrap();
    // A file in the GPU node's own input folder is nobody's to pick.
    std::fs::write(scratch.path().join("in/gpu-node.png"), png(2, 2, [0, 0, 0])).unwrap();
    let workflows = preloaded();
    let mut gw = Gateway::start(&comfy.url, workflows.path()).await;

    let info = gw.json(2, "object_info").await;
    assert!(info["EmptyImage"]["input"]["required"]["width"].is_array(), "the stand-in's nodes");
    assert_eq!(info["LoadImage"]["input"]["required"]["image"][0], json!([]));
    // Exactly ComfyUI's answer, key order included, but for the picker.
    let direct = reqwest::get(format!("{}/object_info", comfy.url)).await.unwrap().bytes().await.unwrap();
    let mut direct = Json::parse(&direct).unwrap();
    let picker = direct
        .as_object_mut()
        .and_then(|m| m.get_mut("LoadImage"))
        .and_then(|d| d.as_object_mut())
        .and_then(|d| d.get_mut("input"))
        .and_then(|d| d.as_object_mut())
        .and_then(|d| d.get_mut("required"))
        .and_then(|d| d.as_object_mut())
        .and_then(|d| d.get_mut("image"))
        .unwrap();
    let Json::Array(spec) = picker else { panic!("LoadImage's image is a list") };
    assert_eq!(spec[0], Json::Array(vec![Json::String("gpu-node.png".into())]));
    spec[0] = Json::Array(Vec::new());
    let via_gateway = gw.get(2, "object_info").send().await.unwrap().bytes().await.unwrap();
    assert!(Json::parse(&via_gateway).unwrap() == direct, "the gateway changed more than the picker");
    let (status, answer) = upload(&gw.url, 2, &gw.auth(2), "upload/image", "mine.png", png(4, 4, [9, 9, 9]), &[]).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"name": "mine.png", "subfolder": "", "type": "input"})));
    let info = gw.json(2, "object_info").await;
    assert_eq!(info["LoadImage"]["input"]["required"]["image"][0], json!(["mine.png"]));
    assert_eq!(gw.json(5, "object_info").await["LoadImage"]["input"]["required"]["image"][0], json!([]));
    let one = gw.json(2, "object_info/LoadImage").await;
    assert_eq!(one.as_object().unwrap().len(), 1);
    assert_eq!(one["LoadImage"]["input"]["required"]["image"][0], json!(["mine.png"]));
    assert_eq!(gw.json(2, "object_info/NoSuchNode").await, json!({}));
    let stats = gw.json(2, "system_stats").await;
    assert_eq!(stats["system"]["comfyui_version"], "0.3.64");
    assert_eq!(gw.json(2, "embeddings").await, json!([]));
    assert_eq!(gw.json(2, "experiment/models").await, json!([]), "the stand-in has no model routes: empty");
    assert_eq!(gw.json(2, "features").await["supports_preview_metadata"], true);
    assert_eq!(gw.json(2, "i18n").await, json!({}));
    assert!(gw.data_dir().join("cache/object_info.json").is_file());

    // ComfyUI goes away: the copy in memory, then the one on disk, answer.
    comfy.stop(Duration::from_secs(5)).await;
    let r = gw.get(2, "object_info").header(ACCEPT_ENCODING, "gzip").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_ENCODING], "gzip");
    gw.restart().await;
    let info = gw.json(2, "object_info").await;
    assert!(info["EmptyImage"].is_object());
    assert_eq!(info["LoadImage"]["input"]["required"]["image"][0], json!(["mine.png"]));
    assert_eq!(gw.json(2, "system_stats").await["system"]["comfyui_version"], "0.3.64");

    // With no copy at all: a clear 503 for object_info, stand-ins for the rest.
    let fresh = Gateway::start(&format!("http://127.0.0.1:{}", free_port()), workflows.path()).await;
    let r = fresh.get(2, "object_info").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("object_info"), "{body}");
    let stats = fresh.json(2, "system_stats").await;
    assert_eq!(stats["system"]["required_frontend_version"], "1.27.10");
    assert_eq!(stats["devices"], json!([]));
    assert_eq!(fresh.json(2, "embeddings").await, json!([]));
    assert_eq!(fresh.json(2, "experiment/models").await, json!([]));
}

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

#[tokio::test]
async fn uploads_are_checked_deduplicated_and_private() {
    let workflows = preloaded();
    let gw = Gateway::start(&format!("http://127.0.0.1:{}", free_port()), workflows.path()).await;
    let (url, auth) = (gw.url.clone(), gw.auth(2));
    let input = gw.data_dir().join("users/2/input");
    let stored = || -> Vec<String> {
        let mut all = Vec::new();
        for entry in walk(&gw.data_dir().join("users")) {
            all.push(entry.strip_prefix(gw.data_dir()).unwrap().display().to_string());
        }
        all
    };

    // Refused, and nothing stored.
    let red = png(8, 6, [200, 10, 10]);
    for (name, bytes, fields) in [
        ("notes.png", b"just some text, not an image".to_vec(), vec![]),
        ("../evil.png", red.clone(), vec![]),
        ("a/b.png", red.clone(), vec![]),
        ("..", red.clone(), vec![]),
        (".hidden.png", red.clone(), vec![]),
        ("page.html", red.clone(), vec![]),
        ("ok.png", red.clone(), vec![("subfolder", "../../secrets")]),
        ("ok.png", red.clone(), vec![("type", "output")]),
    ] {
        let (status, body) = upload(&url, 2, &auth, "upload/image", name, bytes, &fields).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name} {fields:?}: {body}");
    }
    assert_eq!(stored(), Vec::<String>::new());

    // Stored, with ComfyUI's names.
    let blue = png(8, 6, [10, 10, 200]);
    let (s, a) = upload(&url, 2, &auth, "upload/image", "cat.png", red.clone(), &[]).await;
    assert_eq!((s, a), (StatusCode::OK, json!({"name": "cat.png", "subfolder": "", "type": "input"})));
    let (_, a) = upload(&url, 2, &auth, "upload/image", "cat.png", blue.clone(), &[]).await;
    assert_eq!(a["name"], "cat (1).png");
    let (_, a) = upload(&url, 2, &auth, "upload/image", "cat.png", red.clone(), &[]).await;
    assert_eq!(a["name"], "cat.png", "the same bytes reuse the name");
    let (_, a) = upload(&url, 2, &auth, "upload/image", "cat.png", blue.clone(), &[("overwrite", "true")]).await;
    assert_eq!(a["name"], "cat.png");
    let (_, a) = upload(&url, 2, &auth, "upload/image", "image.png", red.clone(), &[("subfolder", "pasted")]).await;
    assert_eq!(a, json!({"name": "image.png", "subfolder": "pasted", "type": "input"}));
    let (_, a) = upload(&url, 2, &auth, "upload/image", "1.png", red.clone(), &[("subfolder", "webcam"), ("type", "temp")]).await;
    assert_eq!(a, json!({"name": "1.png", "subfolder": "webcam", "type": "temp"}));
    assert_eq!(std::fs::read(input.join("cat.png")).unwrap(), blue);

    // view serves them to their owner only.
    let view = |n: u32, q: &str| gw.auth(n).apply(reqwest::Client::new().get(format!("{url}/user/{n}/api/view?{q}")));
    let r = view(2, "filename=cat.png&type=input&subfolder=").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CONTENT_TYPE], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), blue.as_slice());
    assert_eq!(view(2, "filename=image.png&type=input&subfolder=pasted").send().await.unwrap().status(), 200);
    assert_eq!(view(5, "filename=cat.png&type=input&subfolder=").send().await.unwrap().status(), 404);
    let listed: Value = gw.json(2, "userdata?dir=workflows&recurse=true").await;
    assert_eq!(listed, json!(["intro.json"]), "uploads are not userdata");
    let files: Value = gw.auth(2).apply(reqwest::Client::new().get(format!("{url}/user/2/internal/files/input"))).send().await.unwrap().json().await.unwrap();
    let mut files: Vec<String> = serde_json::from_value(files).unwrap();
    files.sort();
    assert_eq!(files, ["cat (1).png", "cat.png"]);

    // A mask puts its alpha onto the original, stored as the editor asks.
    let mut mask = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut mask, 8, 6);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let data: Vec<u8> = (0..48).flat_map(|_| [0, 0, 0, 77]).collect();
        encoder.write_header().unwrap().write_image_data(&data).unwrap();
    }
    let original = json!({"filename": "cat.png", "subfolder": "", "type": "input"}).to_string();
    let (s, a) = upload(&url, 2, &auth, "upload/mask", "clipspace-mask-1.png", mask.clone(), &[
        ("original_ref", original.as_str()),
        ("type", "input"),
        ("subfolder", "clipspace"),
    ])
    .await;
    assert_eq!((s, &a), (StatusCode::OK, &json!({"name": "clipspace-mask-1.png", "subfolder": "clipspace", "type": "input"})));
    let masked = std::fs::read(input.join("clipspace/clipspace-mask-1.png")).unwrap();
    assert_eq!(decode(&masked), (8, 6, vec![10, 10, 200, 77]));
    // Another participant's original is not found.
    let (s, _) = upload(&url, 5, &gw.auth(5), "upload/mask", "m.png", mask, &[("original_ref", original.as_str())]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(!gw.data_dir().join("users/5").exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// A job that loads uploaded images
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_job_loads_the_participants_uploaded_images() {
    let stack = stack(Executor::Local).await;
    let base = stack.gateway_url.clone();
    let auth = Auth::Bearer(stack.code(3).to_string());
    let (s, a) = upload(&base, 3, &auth, "upload/image", "photo.png", png(64, 48, [255, 0, 255]), &[]).await;
    assert_eq!((s, a["name"].as_str()), (StatusCode::OK, Some("photo.png")));
    let (s, _) = upload(&base, 3, &auth, "upload/image", "image.png", png(20, 10, [0, 0, 0]), &[("subfolder", "pasted")]).await;
    assert_eq!(s, StatusCode::OK);

    let workflow = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "pasted/image.png [input]"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "pasted"}},
    });
    let id = stack.submit(3, json!({"prompt": workflow, "client_id": "editor-test"})).await;
    let entry = stack.finished(3, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
    // The history shows the prompt as submitted.
    assert_eq!(entry["prompt"][2]["1"]["inputs"]["image"], "photo.png");
    for (node, size, pixel) in [("3", (64, 48), [0, 255, 0, 255]), ("5", (20, 10), [0, 0, 0, 255])] {
        let image = &entry["outputs"][node]["images"][0];
        let q = format!(
            "view?filename={}&subfolder={}&type=output",
            image["filename"].as_str().unwrap(),
            image["subfolder"].as_str().unwrap()
        );
        let resp = stack.get(3, &q).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let (w, h, first) = decode(&resp.bytes().await.unwrap());
        assert_eq!(((w, h), first), (size, pixel.to_vec()), "node {node}");
    }

    // Participant 4 has no photo.png: ComfyUI is never given 3's.
    let id = stack.submit(4, json!({"prompt": {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "stolen"}},
    }})).await;
    let entry = stack.finished(4, &id).await;
    assert_eq!(entry["status"]["status_str"], "error", "{entry:#}");
}
