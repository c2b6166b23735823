//! Forwarding ComfyUI's websocket messages to the gateway.
//!
//! The participant's editor shows progress from these messages, relayed by
//! the gateway. Posting them must never hold up the job, and a sampler can
//! emit progress faster than a slow link can carry it; so posting happens in
//! its own task, and when messages pile up, stale progress is dropped (only
//! the newest `progress` / `progress_state` of a backlog matters). Every
//! other message (`execution_*`, `executing`, `executed`, ...) is sent, in
//! order, with retries.
//!
//! Binary previews (`shared/comfyui-api.md` 9.2: type 1, and type 4 of the
//! job's prompt) go their own way, best effort: at most one every
//! [`PREVIEW_EVERY`], one try each, and while one is being posted only the
//! newest waits (older ones are dropped). They never hold up the job or the
//! messages.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::gateway::Gateway;
use crate::retry::Backoff;

/// Message types whose newer instance makes older ones worthless.
const SUPERSEDED: [&str; 2] = ["progress", "progress_state"];

/// Retries for messages that must arrive.
const MUST_ARRIVE: Backoff =
    Backoff { attempts: 5, first: Duration::from_millis(250), max: Duration::from_secs(4) };

/// The shortest time between two previews posted.
const PREVIEW_EVERY: Duration = Duration::from_millis(200);

/// Binary frame type: `PREVIEW_IMAGE` (4-byte image type + image).
const PREVIEW_IMAGE: u32 = 1;
/// Binary frame type: `PREVIEW_IMAGE_WITH_METADATA` (4-byte JSON length +
/// JSON with `prompt_id` + image).
const PREVIEW_IMAGE_WITH_METADATA: u32 = 4;

/// Whether a binary frame from ComfyUI is a preview of `prompt_id`'s: type 4
/// naming it, or type 1 (sent only to the client whose prompt runs, i.e.
/// gpu-task's own). Anything else (other types, malformed) is not relayed.
pub fn is_preview_of(frame: &[u8], prompt_id: &str) -> bool {
    let word = |at: usize| frame.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    match word(0) {
        Some(PREVIEW_IMAGE) => frame.len() > 8,
        Some(PREVIEW_IMAGE_WITH_METADATA) => {
            let Some(len) = word(4) else { return false };
            let Some(meta) = frame.get(8..).and_then(|rest| rest.get(..len as usize)) else { return false };
            serde_json::from_slice::<Value>(meta).is_ok_and(|m| m["prompt_id"].as_str() == Some(prompt_id))
        }
        _ => false,
    }
}

/// One message to relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Relayed {
    /// The message's `type`.
    pub kind: String,
    /// The message exactly as ComfyUI sent it.
    pub raw: String,
}

/// The sending side; dropping it (see [`Relay::finish`]) lets the task drain.
pub struct Relay {
    tx: mpsc::UnboundedSender<Relayed>,
    task: JoinHandle<()>,
    previews: watch::Sender<Option<Bytes>>,
    preview_task: JoinHandle<()>,
}

impl Relay {
    /// Starts relaying to `gateway`.
    pub fn start(gateway: Gateway) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let (previews, preview_rx) = watch::channel(None);
        let preview_task = tokio::spawn(run_previews(gateway.clone(), preview_rx));
        let task = tokio::spawn(run(gateway, rx));
        Relay { tx, task, previews, preview_task }
    }

    /// Queues one message.
    pub fn send(&self, message: Relayed) {
        let _ = self.tx.send(message);
    }

    /// Offers one preview frame (see [`is_preview_of`]); it replaces one
    /// still waiting.
    pub fn preview(&self, frame: Bytes) {
        self.previews.send_replace(Some(frame));
    }

    /// Waits (at most `limit`) until everything queued has been posted, so
    /// that the final report comes after the last event. Previews still
    /// waiting are dropped.
    pub async fn finish(self, limit: Duration) {
        let Relay { tx, task, previews, preview_task } = self;
        preview_task.abort();
        drop(previews);
        drop(tx);
        let mut task = task;
        if tokio::time::timeout(limit, &mut task).await.is_err() {
            tracing::warn!("gave up relaying the last events after {limit:?}");
            task.abort();
        }
    }
}

async fn run(gateway: Gateway, mut rx: mpsc::UnboundedReceiver<Relayed>) {
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut backlog = vec![first];
        while let Ok(more) = rx.try_recv() {
            backlog.push(more);
        }
        for message in coalesce(backlog) {
            let droppable = SUPERSEDED.contains(&message.kind.as_str());
            let backoff = if droppable { Backoff { attempts: 1, ..MUST_ARRIVE } } else { MUST_ARRIVE };
            let result = backoff
                .run(
                    "relaying an event",
                    |e: &crate::gateway::GatewayError| e.is_transient(),
                    || gateway.event(&message.raw),
                )
                .await;
            if let Err(e) = result {
                if droppable {
                    tracing::debug!(error = %e, kind = %message.kind, "dropped a progress event");
                } else if !warned {
                    // Progress is cosmetic: the final report is what counts.
                    tracing::warn!(error = %e, kind = %message.kind, "cannot relay events to the gateway");
                    warned = true;
                }
            }
        }
    }
}

/// Posts the newest preview, one try each, at most one per [`PREVIEW_EVERY`].
async fn run_previews(gateway: Gateway, mut rx: watch::Receiver<Option<Bytes>>) {
    while rx.changed().await.is_ok() {
        let Some(frame) = rx.borrow_and_update().clone() else { continue };
        let next = tokio::time::Instant::now() + PREVIEW_EVERY;
        if let Err(e) = gateway.preview(frame).await {
            tracing::debug!(error = %e, "dropped a preview");
        }
        tokio::time::sleep_until(next).await;
    }
}

/// The backlog with every superseded message removed: a `progress` or
/// `progress_state` is kept only if no later one of its type follows.
pub fn coalesce(backlog: Vec<Relayed>) -> Vec<Relayed> {
    let mut keep = vec![true; backlog.len()];
    let mut seen: Vec<&str> = Vec::new();
    for (i, m) in backlog.iter().enumerate().rev() {
        if SUPERSEDED.contains(&m.kind.as_str()) {
            if seen.contains(&m.kind.as_str()) {
                keep[i] = false;
            } else {
                seen.push(&m.kind);
            }
        }
    }
    backlog.into_iter().zip(keep).filter_map(|(m, k)| k.then_some(m)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kind: &str, n: u32) -> Relayed {
        Relayed { kind: kind.into(), raw: format!("{kind}{n}") }
    }

    #[test]
    fn keeps_everything_but_stale_progress() {
        let backlog = vec![
            m("progress", 1),
            m("executing", 1),
            m("progress", 2),
            m("progress_state", 1),
            m("executed", 1),
            m("progress_state", 2),
            m("progress", 3),
            m("execution_success", 1),
        ];
        let raws: Vec<String> = coalesce(backlog).into_iter().map(|m| m.raw).collect();
        assert_eq!(raws, ["executing1", "executed1", "progress_state2", "progress3", "execution_success1"]);
    }

    fn frame(kind: u32, meta: Option<&str>) -> Vec<u8> {
        let mut f = kind.to_be_bytes().to_vec();
        match meta {
            Some(meta) => {
                f.extend((meta.len() as u32).to_be_bytes());
                f.extend(meta.as_bytes());
            }
            None => f.extend(1u32.to_be_bytes()),
        }
        f.extend(b"\xff\xd8jpeg");
        f
    }

    #[test]
    fn only_previews_of_the_prompt_are_relayed() {
        let ours = r#"{"node_id":"3","display_node_id":"3","parent_node_id":null,"real_node_id":"3","prompt_id":"p1","image_type":"image/jpeg"}"#;
        assert!(is_preview_of(&frame(4, Some(ours)), "p1"));
        assert!(!is_preview_of(&frame(4, Some(ours)), "p2"), "another prompt's");
        assert!(is_preview_of(&frame(1, None), "p1"), "type 1 comes to our client id only");
        assert!(!is_preview_of(&frame(3, None), "p1"), "other binary types");
        let mut cut = frame(4, Some(ours));
        cut.truncate(20);
        assert!(!is_preview_of(&cut, "p1"), "metadata longer than the frame");
        assert!(!is_preview_of(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff], "p1"));
        assert!(!is_preview_of(&[0, 0], "p1"));
        assert!(!is_preview_of(&frame(1, None)[..8], "p1"), "no image");
    }

    #[test]
    fn a_lone_progress_is_kept() {
        assert_eq!(coalesce(vec![m("progress", 1)]), vec![m("progress", 1)]);
    }
}
