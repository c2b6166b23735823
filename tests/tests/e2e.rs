//! The walking skeleton end to end: a participant's workflow becomes an output
//! image through the gateway, Redis, the dispatcher, (Nomad's API,) gpu-task
//! and ComfyUI — all real processes, found through a real Consul dev agent.
//!
//! `COMFYUI_URL` points the test at a real ComfyUI instead of the stand-in.

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::harness::free_port;
use comfy_multi_tests::nomad::dev_agent::nomad_binary;
use comfy_multi_tests::stack::{stack, stack_with, Executor};
use serde_json::{json, Value};

async fn workflow_becomes_an_image(executor: Executor) {
    let stack = stack(executor).await;
    let id = stack.submit(3, json!({ "prompt": model_free_workflow(), "client_id": "e2e" })).await;
    let entry = stack.finished(3, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    let image = &entry["outputs"]["7"]["images"][0];
    let view = format!(
        "view?filename={}&subfolder={}&type=output",
        image["filename"].as_str().unwrap(),
        image["subfolder"].as_str().unwrap()
    );
    let png = stack.get(3, &view).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (256, 256));

    // Participant 4 sees none of it.
    assert_eq!(stack.get(4, &view).send().await.unwrap().status(), 404);
    assert_eq!(stack.get(4, &format!("history/{id}")).send().await.unwrap().status(), 404);
    let own: Value = stack.get(4, "history").send().await.unwrap().json().await.unwrap();
    assert_eq!(own, json!({}));
}

#[tokio::test]
async fn workflow_becomes_an_image_with_the_local_executor() {
    workflow_becomes_an_image(Executor::Local).await;
}

#[tokio::test]
async fn workflow_becomes_an_image_through_nomad() {
    workflow_becomes_an_image(Executor::Nomad).await;
}

#[tokio::test]
async fn workflow_becomes_an_image_through_a_real_nomad() {
    if nomad_binary().is_none() {
        println!("note: no `nomad` on PATH; skipping the real-Nomad variant of the end-to-end test");
        return;
    }
    workflow_becomes_an_image(Executor::RealNomad).await;
}

/// A workflow that ends in `PreviewImage`: its temp file is uploaded and
/// served under `type=temp`, to its participant only.
#[tokio::test]
async fn a_preview_image_is_served_as_temp() {
    let stack = stack(Executor::Local).await;
    let workflow = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 255}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}
    });
    let id = stack.submit(3, json!({ "prompt": workflow })).await;
    let entry = stack.finished(3, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    let image = &entry["outputs"]["2"]["images"][0];
    assert_eq!(image["type"], "temp", "history: {entry:#}");
    assert_eq!(image["subfolder"], id.as_str(), "history: {entry:#}");
    let view = format!("view?filename={}&subfolder={id}&type=temp", image["filename"].as_str().unwrap());
    let png = stack.get(3, &view).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    let bytes = png.bytes().await.unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes.to_vec()));
    let info = decoder.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (64, 48));

    assert_eq!(stack.get(4, &view).send().await.unwrap().status(), 404);
}

/// A workflow over Nomad's 16 KiB payload limit is dispatched without a
/// payload; gpu-task fetches it from the gateway.
#[tokio::test]
async fn a_large_workflow_is_fetched_from_the_gateway() {
    let stack = stack(Executor::Nomad).await;
    let note = "x".repeat(20 * 1024);
    let id = stack
        .submit(2, json!({ "prompt": model_free_workflow(), "extra_data": { "extra_pnginfo": { "note": note } } }))
        .await;
    let entry = stack.finished(2, &id).await;
    assert_eq!(entry["status"]["status_str"], "success", "history: {entry:#}");
    assert_eq!(entry["prompt"][3]["extra_pnginfo"]["note"].as_str().map(str::len), Some(20 * 1024));
}

/// The error a participant reads in the history: the last execution message.
fn error_message(entry: &Value) -> String {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m[0] == "execution_error"))
        .map(|m| m[1]["exception_message"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// A workflow ComfyUI refuses ends `failed` with ComfyUI's own message
/// (a value out of range: the gateway leaves those to ComfyUI; unknown node
/// types it refuses itself, see `bad_input.rs`).
#[tokio::test]
async fn a_workflow_comfyui_refuses_fails_with_its_message() {
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = stack(executor).await;
        let mut workflow = model_free_workflow();
        workflow["5"]["inputs"]["x"] = json!(100_000);
        let id = stack.submit(1, json!({ "prompt": workflow })).await;
        let entry = stack.finished(1, &id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        let message = error_message(&entry);
        assert!(message.contains("bigger than max"), "message: {message:?}; history: {entry:#}");
    }
}

/// gpu-task that cannot reach ComfyUI fails the job fast, saying so.
#[tokio::test]
async fn unreachable_comfyui_fails_the_job_with_that_reason() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    for executor in [Executor::Local, Executor::Nomad] {
        let stack = stack_with(executor, Some(dead.clone())).await;
        let id = stack.submit(5, json!({ "prompt": model_free_workflow() })).await;
        let entry = stack.finished(5, &id).await;
        assert_eq!(entry["status"]["status_str"], "error");
        let message = error_message(&entry);
        assert!(message.contains("cannot reach ComfyUI"), "message: {message:?}; history: {entry:#}");
    }
}
