//! The gateway's HTTP surface against bad input: every mistake gets a 4xx in
//! ComfyUI's error shape, nothing is stored, and the gateway keeps serving.

use std::time::Duration;

use comfy_multi_tests::harness::{bin_path, free_port, spawn_logged, wait_until, ChildGuard, Redis};
use dispatcher::queue::Store;
use reqwest::StatusCode;
use serde_json::{json, Value};

struct Gateway {
    url: String,
    codes: Vec<(u32, String)>,
    store: Store,
    _process: ChildGuard,
    _redis: Redis,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start() -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start().await.unwrap();
        let port = free_port();
        let mut cmd = tokio::process::Command::new(bin_path("gateway"));
        cmd.arg("serve")
            .env("REDIS_URL", &redis.url)
            .env("DATA_DIR", dir.path())
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("PARTICIPANTS", "5")
            .env("MAX_WORKFLOW_BYTES", "65536")
            .env("INTERNAL_SECRET", "secret-for-tests")
            .env_remove("ADMIN_TOKEN")
            .env_remove("COMFY_MULTI_CONFIG");
        let process = spawn_logged(cmd, "gateway");
        let url = format!("http://127.0.0.1:{port}");
        wait_until("the gateway to be healthy", Duration::from_secs(30), || {
            let url = format!("{url}/healthz");
            async move { reqwest::get(url).await.ok().filter(|r| r.status().is_success()) }
        })
        .await
        .unwrap();
        let codes = std::fs::read_to_string(dir.path().join("secrets/access-codes.txt"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(n, c)| (n.parse().unwrap(), c.to_string()))
            .collect();
        let store = Store::connect(&redis.url).await.unwrap();
        Gateway { url, codes, store, _process: process, _redis: redis, _dir: dir }
    }

    fn code(&self, n: u32) -> String {
        self.codes.iter().find(|(u, _)| *u == n).unwrap().1.clone()
    }

    async fn post_prompt(&self, user: u32, code: Option<&str>, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/user/{user}/api/prompt", self.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(code) = code {
            req = req.bearer_auth(code);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn nothing_stored(&self) {
        assert_eq!(self.store.queued_count().await.unwrap(), 0, "a refused submission must store nothing");
        for n in 1..=5 {
            assert!(self.store.user_jobs(n, 10).await.unwrap().is_empty());
        }
    }
}

/// ComfyUI's error shape: `{error: {type, message, details, extra_info}, node_errors}`.
fn assert_comfy_error(body: &Value) {
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"].get("details").is_some(), "{body}");
    assert!(body["error"]["extra_info"].is_object(), "{body}");
    assert!(body["node_errors"].is_object(), "{body}");
}

#[tokio::test]
async fn bad_submissions_get_clear_errors_and_store_nothing() {
    let gw = Gateway::start().await;
    let code = gw.code(2);
    let good = json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});

    // (what, participant, bearer code, body, expected status)
    type Case = (&'static str, u32, Option<String>, Vec<u8>, StatusCode);
    let cases: Vec<Case> = vec![
        ("malformed JSON", 2, Some(code.clone()), b"{\"prompt\": {".to_vec(), StatusCode::BAD_REQUEST),
        ("not an object", 2, Some(code.clone()), b"[1,2,3]".to_vec(), StatusCode::BAD_REQUEST),
        ("no prompt", 2, Some(code.clone()), b"{\"client_id\": \"x\"}".to_vec(), StatusCode::BAD_REQUEST),
        ("prompt not nodes", 2, Some(code.clone()), br#"{"prompt": [1, 2]}"#.to_vec(), StatusCode::BAD_REQUEST),
        ("node without class_type", 2, Some(code.clone()), br#"{"prompt": {"1": {"inputs": {}}}}"#.to_vec(), StatusCode::BAD_REQUEST),
        (
            "link to a missing node",
            2,
            Some(code.clone()),
            json!({"prompt": {"7": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}}}}).to_string().into_bytes(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "over the size limit",
            2,
            Some(code.clone()),
            json!({"prompt": good, "extra_data": {"pad": "x".repeat(70_000)}}).to_string().into_bytes(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        ("deeply nested", 2, Some(code.clone()), format!("{{\"prompt\": {}1{}}}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(), StatusCode::BAD_REQUEST),
        ("unknown user", 9, Some(code.clone()), json!({"prompt": good}).to_string().into_bytes(), StatusCode::NOT_FOUND),
        ("user zero", 0, Some(code.clone()), json!({"prompt": good}).to_string().into_bytes(), StatusCode::NOT_FOUND),
        ("wrong code", 3, Some(code.clone()), json!({"prompt": good}).to_string().into_bytes(), StatusCode::UNAUTHORIZED),
        ("no code", 2, None, json!({"prompt": good}).to_string().into_bytes(), StatusCode::UNAUTHORIZED),
    ];
    for (what, user, code, body, want) in cases {
        let (status, body) = gw.post_prompt(user, code.as_deref(), body).await;
        assert_eq!(status, want, "{what}: {body}");
        assert_comfy_error(&body);
    }
    gw.nothing_stored().await;

    // A missing link names the node and the target, as ComfyUI does.
    let (_, body) = gw
        .post_prompt(2, Some(&code), json!({"prompt": {"7": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}}}}).to_string())
        .await;
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(body["node_errors"]["7"]["errors"][0]["details"], "'99'");

    // Still serving, and a good prompt is accepted.
    let (status, body) = gw.post_prompt(2, Some(&code), json!({"prompt": good}).to_string()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["prompt_id"].is_string());
    assert_eq!(body["node_errors"], json!({}));
    assert_eq!(gw.store.queued_count().await.unwrap(), 1);
}

#[tokio::test]
async fn internal_api_needs_the_secret_and_views_are_scoped() {
    let gw = Gateway::start().await;
    let http = reqwest::Client::new();
    let job = gw
        .store
        .submit(dispatcher::queue::NewJob { user: 2, workflow: json!({}), extra_data: json!({}), priority: 0 })
        .await
        .unwrap();
    let workflow = format!("{}{}", gw.url, dispatcher::contract::internal::workflow(&job.id.to_string()));
    for secret in [None, Some("wrong"), Some(gw.code(2).as_str())] {
        let mut req = http.get(&workflow);
        if let Some(s) = secret {
            req = req.header(dispatcher::contract::INTERNAL_SECRET_HEADER, s);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "secret {secret:?}");
    }
    // With the secret: a queued job is not in flight yet.
    let res = http.get(&workflow).header(dispatcher::contract::INTERNAL_SECRET_HEADER, "secret-for-tests").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);

    // Traversal in view is refused; another user's job is not found.
    for bad in ["filename=../../secrets/admin-token", "filename=x.png&subfolder=../../2/output", "filename=%2E%2E%2Fx", "filename=/etc/passwd"] {
        let res = http
            .get(format!("{}/user/2/api/view?{bad}&type=output", gw.url))
            .bearer_auth(gw.code(2))
            .send()
            .await
            .unwrap();
        assert!(res.status() == StatusCode::BAD_REQUEST || res.status() == StatusCode::NOT_FOUND, "{bad}: {}", res.status());
    }
    let res = http
        .get(format!("{}/user/3/api/history/{}", gw.url, job.id))
        .bearer_auth(gw.code(3))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = http
        .get(format!("{}/user/2/api/history/{}", gw.url, job.id))
        .bearer_auth(gw.code(2))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({}), "not finished yet");
}

#[tokio::test]
async fn serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start().await.unwrap();
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let mut cmd = tokio::process::Command::new(bin_path("gateway"));
    cmd.arg("serve")
        .env("REDIS_URL", &redis.url)
        .env("DATA_DIR", dir.path().join("data"))
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEWAY_TLS_CERT", &cert_path)
        .env("GATEWAY_TLS_KEY", &key_path)
        .env_remove("COMFY_MULTI_CONFIG");
    let _process = spawn_logged(cmd, "gateway-tls");
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let res = wait_until("the gateway to answer over HTTPS", Duration::from_secs(30), || {
        let req = client.get(format!("https://localhost:{port}/healthz"));
        async move { req.send().await.ok() }
    })
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Plain HTTP on the same port is not served.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
}

#[tokio::test]
async fn half_a_tls_configuration_is_refused_with_a_clear_error() {
    let out = tokio::process::Command::new(bin_path("gateway"))
        .arg("serve")
        .env("GATEWAY_TLS_CERT", "/nonexistent/cert.pem")
        .env_remove("GATEWAY_TLS_KEY")
        .env_remove("COMFY_MULTI_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GATEWAY_TLS_KEY"), "{err}");
}
