//! The stock ComfyUI editor (comfyui-frontend-package 1.27.10) in a real
//! headless Chromium, with the gateway as its server: participant 2 logs in,
//! opens a pre-loaded model-free workflow from the workflow browser, presses
//! Queue and sees the output image in the editor's queue panel (and on the
//! SaveImage node), with comfy-multi's queue badge showing while the job
//! waits; no request to the gateway fails. Then participant 5 logs in in the
//! same browser and its queue panel shows none of it, nor does its canvas
//! (the editor's browser-side state of participant 2 is dropped by
//! comfy-multi's extension).
//!
//! Driven by `tests/browser/editor.mjs` (playwright-core with Debian's
//! chromium). Screenshots go to `<target>/test-artifacts/` (or
//! `COMFY_MULTI_ARTIFACTS`); their paths are printed. Set
//! `COMFY_MULTI_SKIP_BROWSER=1` to skip.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use comfy_multi_tests::browser::{self, Browser};
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions, ADMIN_TOKEN};
use serde_json::{json, Value};

/// The name the workflow has in the workflow browser.
const WORKFLOW: &str = "Model-free smoke test";

/// `tests/browser/editor.mjs`, with the editor's commands.
struct Editor(Browser);

impl Editor {
    async fn start(url: &str, artifacts: &std::path::Path) -> Editor {
        let mut browser = Editor(Browser::spawn("editor.mjs", [OsStr::new(url), artifacts.as_os_str()]));
        browser.expect("STARTED").await;
        browser
    }

    /// The script's next line, which must start with `prefix`; returns the rest.
    async fn expect(&mut self, prefix: &str) -> String {
        let line = self.0.expect(prefix, Duration::from_secs(120)).await;
        line[prefix.len()..].trim().to_string()
    }

    /// Sends `command`; returns the rest of the answer line starting with `answer`.
    async fn ask(&mut self, command: &str, answer: &str) -> String {
        self.0.send(command).await;
        self.expect(answer).await
    }

    async fn shot(&mut self, name: &str) -> PathBuf {
        let path = PathBuf::from(self.ask(&format!("SHOT {name}"), "SHOT").await);
        println!("screenshot: {}", path.display());
        assert!(path.is_file());
        path
    }

    /// Fails if any request to the gateway failed or was answered >= 400.
    async fn no_failures(&mut self, when: &str) {
        let failures: Value = serde_json::from_str(&self.ask("FAILURES", "FAILURES").await).unwrap();
        assert_eq!(failures, json!([]), "failed requests to the gateway {when}");
    }
}

async fn admin(stack: &Stack, action: &str) {
    let response = reqwest::Client::new()
        .post(format!("{}/admin/api/{action}", stack.gateway_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{action}: {}", response.text().await.unwrap());
}

#[tokio::test]
async fn a_participant_runs_a_workflow_in_the_real_editor_and_nobody_else_sees_it() {
    if browser::skip() {
        return;
    }
    let stack = start(StackOptions { node_delay: Duration::from_millis(150), ..StackOptions::new(Executor::Local) }).await;
    // The instructor's pre-loaded workflow (the 7-node model-free graph in
    // the editor's format).
    let workflows = stack.data_dir.join("workflows");
    std::fs::create_dir_all(&workflows).unwrap();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workflows/model-free.workflow.json");
    std::fs::copy(&source, workflows.join(format!("{WORKFLOW}.json"))).unwrap();

    let artifacts = browser::artifacts_dir(env!("CARGO_TARGET_TMPDIR"));
    let mut browser = Editor::start(&stack.gateway_url, &artifacts).await;

    // Participant 2: log in, open the workflow.
    assert_eq!(browser.ask(&format!("LOGIN 2 {}", stack.code(2)), "READY").await, "2");
    assert_eq!(browser.ask(&format!("LOAD {WORKFLOW}"), "LOADED").await, "7");

    // Queue it while dispatching is paused: the badge shows its place.
    admin(&stack, "pause").await;
    let job = browser.ask("QUEUE", "QUEUED").await;
    let badge = browser.ask("BADGE", "BADGE").await;
    assert!(badge.starts_with("Queue: #1 of 1"), "{badge}");
    browser.shot("editor-2-waiting").await;

    // It runs; the output appears in the queue panel and on the node.
    admin(&stack, "resume").await;
    let src = browser.ask(&format!("RESULT {job}"), "RESULT").await;
    assert!(src.contains("/user/2/api/view?") && src.contains(&job), "{src}");
    browser.ask("NO_BADGE", "NO_BADGE").await;
    browser.shot("editor-2-result").await;
    browser.no_failures("while participant 2 ran a workflow").await;

    let entry = stack.finished(2, &job).await;
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
    assert_eq!(entry["prompt"][2]["7"]["class_type"], "SaveImage", "{entry:#}");

    // Participant 5, in the same browser: nothing of participant 2's.
    assert_eq!(browser.ask(&format!("LOGIN 5 {}", stack.code(5)), "READY").await, "5");
    assert_eq!(browser.ask("TASKS", "TASKS").await, "0");
    // Not even the graph participant 2 left open in this browser's storage.
    assert_eq!(browser.ask("NODES", "NODES").await, "0");
    browser.shot("editor-5-empty").await;
    browser.no_failures("while participant 5 looked").await;
    let history: Value = stack.get(5, "history").send().await.unwrap().json().await.unwrap();
    assert_eq!(history, json!({}));
    browser.ask("QUIT", "BYE").await;
}
