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

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions, ADMIN_TOKEN};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The name the workflow has in the workflow browser.
const WORKFLOW: &str = "Model-free smoke test";

/// Where test artifacts go: `COMFY_MULTI_ARTIFACTS`, else
/// `<target>/test-artifacts`.
fn artifacts_dir() -> PathBuf {
    match std::env::var_os("COMFY_MULTI_ARTIFACTS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("<target>/tmp has a parent")
            .join("test-artifacts"),
    }
}

/// `node tests/browser/editor.mjs ...` in its own process group, killed with
/// its Chromium when dropped.
struct Browser {
    child: tokio::process::Child,
    pgid: i32,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    async fn start(url: &str, artifacts: &std::path::Path) -> Browser {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
        for (path, fix) in [
            (PathBuf::from("/usr/bin/chromium"), "Debian's chromium"),
            (dir.join("node_modules/playwright-core/package.json"), "tests/browser/node_modules (npm ci)"),
        ] {
            assert!(path.exists(), "{} is missing: run scripts/install-deps.sh, which installs {fix}", path.display());
        }
        let mut cmd = tokio::process::Command::new("node");
        cmd.arg(dir.join("editor.mjs"))
            .arg(url)
            .arg(artifacts)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("node (Node.js) must be installed: run scripts/install-deps.sh");
        let pgid = child.id().unwrap() as i32;
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut browser = Browser { child, pgid, stdin, lines };
        browser.expect("STARTED").await;
        browser
    }

    /// The script's next line, which must start with `prefix`; returns the rest.
    async fn expect(&mut self, prefix: &str) -> String {
        let line = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser script said nothing for 120 s (waiting for {prefix})"))
            .unwrap()
            .unwrap_or_else(|| panic!("the browser script ended before {prefix}"));
        let rest = line.strip_prefix(prefix).unwrap_or_else(|| panic!("the browser script: {line}"));
        rest.trim().to_string()
    }

    /// Sends `command`; returns the rest of the answer line starting with `answer`.
    async fn ask(&mut self, command: &str, answer: &str) -> String {
        self.stdin.write_all(format!("{command}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
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

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.start_kill();
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
    if std::env::var_os("COMFY_MULTI_SKIP_BROWSER").is_some() {
        eprintln!("COMFY_MULTI_SKIP_BROWSER is set: skipping the headless Chromium test");
        return;
    }
    let stack = start(StackOptions { node_delay: Duration::from_millis(150), ..StackOptions::new(Executor::Local) }).await;
    // The instructor's pre-loaded workflow (the 7-node model-free graph in
    // the editor's format).
    let workflows = stack.data_dir.join("workflows");
    std::fs::create_dir_all(&workflows).unwrap();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("workflows/model-free.workflow.json");
    std::fs::copy(&source, workflows.join(format!("{WORKFLOW}.json"))).unwrap();

    let artifacts = artifacts_dir();
    let mut browser = Browser::start(&stack.gateway_url, &artifacts).await;

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
