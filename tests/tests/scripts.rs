//! `scripts/start.sh` brings the local stack up, the README's submission
//! works against it, and `scripts/stop.sh` leaves nothing running.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use comfy_multi_tests::harness::{bin_path, wait_until};
use serde_json::{json, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `KEY=value` lines as `set -a; . stack.env` would read them.
fn read_env(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// Whether any process of the group led by `pid` is still there.
fn group_alive(pid: i32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    kill(Pid::from_raw(-pid), None).is_ok() || kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn start_serves_the_readme_submission_and_stop_leaves_nothing() {
    let state = tempfile::tempdir().unwrap();
    let bin_dir = bin_path("gateway").parent().unwrap().to_path_buf();
    let script = |name: &str| {
        let mut cmd = tokio::process::Command::new(repo().join("scripts").join(name));
        cmd.current_dir(repo())
            .env("COMFY_MULTI_STATE", state.path())
            .env("COMFY_MULTI_BIN", &bin_dir)
            .env("PATH", format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default()));
        for var in ["COMFYUI_URL", "EXECUTOR", "NOMAD_ADDR", "REDIS_URL", "DATA_DIR", "ADMIN_TOKEN", "INTERNAL_SECRET"] {
            cmd.env_remove(var);
        }
        cmd
    };

    let started = script("start.sh").output().await.unwrap();
    let say = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    let pids: Vec<i32> = std::fs::read_dir(state.path().join("pids"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()?.trim().parse().ok()).collect()
        })
        .unwrap_or_default();
    // Whatever happens next, stop what was started.
    struct Stop<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let stop_path = repo().join("scripts/stop.sh");
    let state_path = state.path().to_path_buf();
    let _guard = Stop(move || {
        let _ = std::process::Command::new(&stop_path).env("COMFY_MULTI_STATE", &state_path).output();
    });
    assert!(started.status.success(), "start.sh failed:\n{}", say(&started));
    assert_eq!(pids.len(), 5, "redis, consul, comfyui-standin, gateway, dispatcher:\n{}", say(&started));

    let env = read_env(&state.path().join("stack.env"));
    let gateway = env["GATEWAY_URL"].clone();
    let code = env["USER_CODES"]
        .split(' ')
        .find_map(|pair| pair.strip_prefix("3:"))
        .expect("a code for participant 3")
        .to_string();
    assert!(!env["ADMIN_TOKEN"].is_empty());

    let workflow: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("tests/workflows/model-free.json")).unwrap()).unwrap();
    let http = reqwest::Client::new();
    let answer: Value = http
        .post(format!("{gateway}/user/3/api/prompt"))
        .bearer_auth(&code)
        .json(&json!({ "prompt": workflow }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["prompt_id"].as_str().expect("a prompt id").to_string();
    let entry = wait_until("the job to finish", Duration::from_secs(60), || {
        let req = http.get(format!("{gateway}/user/3/api/history/{id}")).bearer_auth(&code);
        let id = id.clone();
        async move {
            let h: Value = req.send().await.ok()?.json().await.ok()?;
            h.get(&id).cloned()
        }
    })
    .await
    .unwrap();
    assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
    let image = &entry["outputs"]["7"]["images"][0];
    let png = http
        .get(format!("{gateway}/user/3/api/view"))
        .query(&[("filename", image["filename"].as_str().unwrap()), ("subfolder", &id), ("type", "output")])
        .bearer_auth(&code)
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), 200);
    assert!(png.bytes().await.unwrap().starts_with(b"\x89PNG"));

    let stopped = script("stop.sh").output().await.unwrap();
    assert!(stopped.status.success(), "stop.sh failed:\n{}", say(&stopped));
    for pid in pids {
        assert!(!group_alive(pid), "process group {pid} survived stop.sh");
    }
    assert!(!state.path().join("stack.env").exists());
}
