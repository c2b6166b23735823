//! Forwarding ComfyUI's websocket messages to the gateway.
//!
//! The participant's editor shows progress from these messages, relayed by
//! the gateway. Posting them must never hold up the job, and a sampler can
//! emit progress faster than a slow link can carry it; so posting happens in
//! its own task, and when messages pile up, stale progress is dropped (only
//! the newest `progress` / `progress_state` of a backlog matters). Every
//! other message (`execution_*`, `executing`, `executed`, ...) is sent, in
//! order, with retries.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;
use crate::retry::Backoff;

/// Message types whose newer instance makes older ones worthless.
const SUPERSEDED: [&str; 2] = ["progress", "progress_state"];

/// Retries for messages that must arrive.
const MUST_ARRIVE: Backoff =
    Backoff { attempts: 5, first: Duration::from_millis(250), max: Duration::from_secs(4) };

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
}

impl Relay {
    /// Starts relaying to `gateway`.
    pub fn start(gateway: Gateway) -> Relay {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(gateway, rx));
        Relay { tx, task }
    }

    /// Queues one message.
    pub fn send(&self, message: Relayed) {
        let _ = self.tx.send(message);
    }

    /// Waits (at most `limit`) until everything queued has been posted, so
    /// that the final report comes after the last event.
    pub async fn finish(self, limit: Duration) {
        drop(self.tx);
        let mut task = self.task;
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

    #[test]
    fn a_lone_progress_is_kept() {
        assert_eq!(coalesce(vec![m("progress", 1)]), vec![m("progress", 1)]);
    }
}
