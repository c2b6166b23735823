//! HTTPS with the workshop's own certificate (made here, at test time, by a
//! test CA): a whole job over HTTPS and `wss`, certificate renewals picked up
//! on SIGHUP and on a file change without dropping open websockets, bad
//! renewals that keep the served certificate, start-up refusals that name
//! the file, and the HTTP-to-HTTPS redirect.

use std::path::Path;
use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::{bin_path, free_port, spawn_logged, wait_until, ChildGuard, Redis};
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions};
use comfy_multi_tests::tls::{client, connect_wss, served_serial, TestCa, TlsFiles, Wss};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until a new connection to `stack`'s gateway is served certificate `serial`.
async fn wait_serial(stack: &Stack, serial: u64) {
    let url = format!("{}/healthz", stack.gateway_url);
    let last = std::sync::Mutex::new(None);
    let found = wait_until(&format!("certificate serial {serial} to be served"), WAIT, || {
        let (http, url, last) = (stack.http.clone(), url.clone(), &last);
        async move {
            let s = served_serial(&http, &url).await.ok();
            *last.lock().unwrap() = s;
            (s == Some(serial)).then_some(())
        }
    })
    .await;
    found.unwrap_or_else(|e| {
        let log = stack.process("gateway").log_tail(20);
        panic!("{e}; last served {:?}; gateway log:\n{log}", last.lock().unwrap())
    });
}

/// Moves `content` into place at `path` the way a renewal tool does: write
/// beside it, then rename over it (replacing a symlink too).
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The next JSON message on `socket` (skipping binary frames).
async fn next_json(socket: &mut Wss) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, socket.next()).await.expect("a websocket message in time");
        match msg.expect("the socket stays open").expect("a websocket frame") {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Close(frame) => panic!("the socket closed: {frame:?}"),
            _ => {}
        }
    }
}

/// Submits a job for participant 3 through `stack` and reads `socket` until
/// the job's end; returns the job id and the messages about it.
async fn job_over(stack: &Stack, socket: &mut Wss, sid: &str) -> (String, Vec<Value>) {
    // Its own colour, so ComfyUI runs it rather than answering from its cache.
    let mut workflow = model_free_workflow();
    workflow["1"]["inputs"]["color"] = json!(rand::random::<u32>() % 0xFF_FFFF);
    let job = stack.submit(3, json!({ "prompt": workflow, "client_id": sid })).await;
    let mut about = Vec::new();
    loop {
        let m = next_json(socket).await;
        if m["data"]["prompt_id"] != job.as_str() {
            continue;
        }
        about.push(m.clone());
        let end = m["type"] == "execution_success"
            || m["type"] == "execution_error"
            || (m["type"] == "executing" && m["data"]["node"].is_null());
        if end {
            return (job, about);
        }
    }
}

/// How many times the gateway has said it kept the old certificate.
fn kept_count(gateway: &ChildGuard) -> usize {
    gateway.log().matches("cannot be used, keeping the one being served").count()
}

#[tokio::test]
async fn a_job_runs_over_https_and_renewals_swap_the_certificate_under_open_sockets() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    // As certbot lays it out: the served names are symlinks into an archive.
    let (live, archive) = (dir.path().join("live"), dir.path().join("archive"));
    std::fs::create_dir_all(&live).unwrap();
    let issued = ca.write(&{ std::fs::create_dir_all(&archive).unwrap(); archive.clone() }, 1);
    let files = TlsFiles { cert: live.join("fullchain.pem"), key: live.join("privkey.pem"), ca: issued.ca.clone() };
    std::os::unix::fs::symlink(&issued.cert, &files.cert).unwrap();
    std::os::unix::fs::symlink(&issued.key, &files.key).unwrap();

    let stack = start(StackOptions { tls: Some(files.clone()), ..StackOptions::new(Executor::Local) }).await;
    assert!(stack.gateway_url.starts_with("https://"), "{}", stack.gateway_url);
    wait_serial(&stack, 1).await;

    // A wss socket gets the job's progress; the job succeeds; its image is served.
    let ws_url = format!("{}/user/3/ws?clientId=https-test", stack.gateway_url.replacen("https://", "wss://", 1));
    let mut socket = connect_wss(&ca.pem, &ws_url, stack.code(3)).await.unwrap();
    let hello = next_json(&mut socket).await;
    let sid = hello["data"]["sid"].as_str().expect("a sid").to_string();
    let (job, about) = job_over(&stack, &mut socket, &sid).await;
    assert!(
        about.iter().any(|m| m["type"] == "executing" && !m["data"]["node"].is_null()),
        "progress for the job over wss: {about:#?}"
    );
    let entry = stack.finished(3, &job).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    let image = &entry["outputs"]["7"]["images"][0];
    let view = format!("view?filename={}&subfolder={}&type=output", image["filename"].as_str().unwrap(), job);
    let png = stack.get(3, &view).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");

    // SIGHUP: the files changed where no watch sees it (the symlinks' targets).
    let (cert, key) = ca.issue(2);
    std::fs::write(&issued.key, key).unwrap();
    std::fs::write(&issued.cert, cert).unwrap();
    let gateway = stack.process("gateway");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(gateway.pid() as i32), nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_serial(&stack, 2).await;
    assert!(gateway.log().contains("SIGHUP"), "the reload says why: {}", gateway.log_tail(10));

    // A renewal moved into place: picked up by the file watch alone.
    let (cert, key) = ca.issue(3);
    replace(&files.key, &key);
    replace(&files.cert, &cert);
    wait_serial(&stack, 3).await;

    // Bad renewals keep serving serial 3, and say why, naming the file.
    replace(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n");
    wait_until("the bad certificate to be refused", WAIT, || async { (kept_count(gateway) >= 1).then_some(()) })
        .await
        .unwrap();
    let log = gateway.log();
    assert!(log.contains("fullchain.pem") && log.contains("not start with a valid certificate"), "{}", gateway.log_tail(10));
    let (other_cert, _) = ca.issue(4);
    replace(&files.cert, &other_cert);
    wait_until("the mismatched key to be refused", WAIT, || async { (kept_count(gateway) >= 2).then_some(()) })
        .await
        .unwrap();
    let log = gateway.log();
    assert!(log.contains("fullchain.pem") && log.contains("does not belong"), "{}", gateway.log_tail(10));
    assert_eq!(served_serial(&stack.http, &format!("{}/healthz", stack.gateway_url)).await.unwrap(), 3);

    // A good renewal after bad ones is served again.
    let (cert, key) = ca.issue(5);
    replace(&files.key, &key);
    replace(&files.cert, &cert);
    wait_serial(&stack, 5).await;

    // The socket opened before all this still works: it gets the next job.
    let (_, about) = job_over(&stack, &mut socket, &sid).await;
    assert!(about.iter().any(|m| m["type"] == "executing"), "{about:#?}");
}

/// Runs `gateway serve` with `GATEWAY_TLS_CERT`/`KEY` = `cert`, `key`;
/// returns (success, stderr).
async fn start_with(cert: &Path, key: &Path) -> (bool, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(bin_path("gateway"))
            .arg("serve")
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("GATEWAY_TLS_CERT", cert)
            .env("GATEWAY_TLS_KEY", key)
            // Nothing else is reached before the certificate is checked.
            .env("REDIS_URL", format!("redis://127.0.0.1:{}", free_port()))
            .env_remove("COMFY_MULTI_CONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the gateway gives up at once")
    .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_certificate_that_cannot_be_served_stops_the_start_naming_the_file() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let good = ca.write(dir.path(), 1);
    let other = ca.write(&{ let d = dir.path().join("other"); std::fs::create_dir_all(&d).unwrap(); d }, 2);
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "this is not PEM\n").unwrap();
    let missing = dir.path().join("missing.pem");

    let cases: [(&Path, &Path, &str, &str); 5] = [
        (&missing, &good.key, "missing.pem", "cannot read"),
        (&junk, &good.key, "junk.pem", "no certificate"),
        (&good.cert, &junk, "junk.pem", "no usable private key"),
        (&good.cert, &missing, "missing.pem", "cannot read"),
        (&good.cert, &other.key, "does not belong", "gateway.crt"),
    ];
    for (cert, key, names, problem) in cases {
        let (ok, stderr) = start_with(cert, key).await;
        assert!(!ok, "started with {cert:?} / {key:?}");
        assert!(stderr.contains(names) && stderr.contains(problem), "{cert:?} / {key:?}: {stderr}");
    }

    // Half a configuration (a certificate, no key) is a configuration error.
    let out = tokio::process::Command::new(bin_path("gateway"))
        .arg("serve")
        .env("GATEWAY_TLS_CERT", &good.cert)
        .env_remove("GATEWAY_TLS_KEY")
        .env_remove("COMFY_MULTI_CONFIG")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GATEWAY_TLS_KEY"), "{stderr}");
}

#[tokio::test]
async fn plain_http_on_the_redirect_address_is_sent_to_https() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let files = ca.write(dir.path(), 7);
    let redis = Redis::start().await.unwrap();
    let (port, redirect_port) = (free_port(), free_port());
    let mut cmd = tokio::process::Command::new(bin_path("gateway"));
    cmd.arg("serve")
        .env("REDIS_URL", &redis.url)
        .env("DATA_DIR", dir.path().join("data"))
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("GATEWAY_REDIRECT_ADDR", format!("127.0.0.1:{redirect_port}"))
        .env("GATEWAY_TLS_CERT", &files.cert)
        .env("GATEWAY_TLS_KEY", &files.key)
        .env_remove("COMFY_MULTI_CONFIG");
    let gateway = spawn_logged(cmd, "gateway-redirect");
    let http = client(&ca.pem);
    let base = format!("https://localhost:{port}");
    wait_until("the gateway to answer over HTTPS", WAIT, || {
        let req = http.get(format!("{base}/healthz"));
        async move { req.send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", gateway.log_tail(20)));

    let res = http.get(format!("http://localhost:{redirect_port}/healthz?x=1")).send().await.unwrap();
    assert_eq!(res.status(), 308);
    let location = res.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(location, format!("https://localhost:{port}/healthz?x=1"));
    assert_eq!(served_serial(&http, &location).await.unwrap(), 7);
}
