//! Watches every `comfy_multi.job_ended` event on the users' event channels
//! (`cm:events:*`, published in the same atomic step as the state change),
//! so the checks can see a job that ended twice, or ended one way and then
//! changed. Subscribes again by itself after a Redis restart; events published
//! while Redis was away are simply not seen, so this can only ever find too
//! many ends, never prove one is missing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;

/// The terminal states each job was seen to enter, in order.
pub type Ends = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// Follows the end events until the task is aborted. A subscription's
/// message stream does not end when Redis goes away (it just stays silent),
/// so a PING every half second finds a dead one and subscribes again.
pub async fn follow(client: redis::Client, ends: Ends) {
    loop {
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            if pubsub.psubscribe("cm:events:*").await.is_ok() {
                listen(&mut pubsub, &ends).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records end events until the subscription stops answering PINGs.
async fn listen(pubsub: &mut redis::aio::PubSub, ends: &Ends) {
    loop {
        // Messages until a quiet half second, then a PING.
        {
            let mut messages = pubsub.on_message();
            while let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), messages.next()).await {
                match msg {
                    Some(msg) => record(&msg, ends),
                    None => return,
                }
            }
        }
        let alive = tokio::time::timeout(Duration::from_secs(2), pubsub.ping::<redis::Value>()).await;
        if !matches!(alive, Ok(Ok(_))) {
            return;
        }
    }
}

fn record(msg: &redis::Msg, ends: &Ends) {
    let Ok(payload) = msg.get_payload::<String>() else { return };
    let Ok(event) = serde_json::from_str::<Value>(&payload) else { return };
    if event["type"] != "comfy_multi.job_ended" {
        return;
    }
    let data = &event["data"];
    if let (Some(id), Some(state)) = (data["prompt_id"].as_str(), data["state"].as_str()) {
        ends.lock().unwrap().entry(id.to_string()).or_default().push(state.to_string());
    }
}
