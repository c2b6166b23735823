//! Following ComfyUI's websocket in the background.
//!
//! The socket is how gpu-task learns promptly that its prompt ended, and the
//! source of the progress the participant sees. Reading it in its own task
//! means no message is lost while the flow is busy (e.g. waiting for
//! `/prompt` to answer, when ComfyUI may already be sending the first
//! events). If the socket drops, the task says so (the flow then polls
//! `/history` at once) and reconnects under the same client id, which
//! ComfyUI routes the prompt's messages to. Binary frames (previews) are
//! handed over as they are; the flow decides which are its prompt's.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::comfy::{Comfy, Socket};

/// What the socket task reports.
#[derive(Debug)]
pub enum SocketEvent {
    /// A JSON text message.
    Message { raw: String, value: Value },
    /// A binary frame (a preview), as received.
    Binary(bytes::Bytes),
    /// The socket closed or failed; reconnecting.
    Closed(String),
    /// The socket is open again.
    Reopened,
}

/// Reads `socket` (and its successors) until the receiver is dropped.
pub fn follow(
    comfy: Comfy,
    client_id: String,
    socket: Socket,
    tx: mpsc::UnboundedSender<SocketEvent>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut socket = socket;
        loop {
            let reason = read(&mut socket, &tx).await;
            if tx.send(SocketEvent::Closed(reason)).is_err() {
                return;
            }
            let mut delay = Duration::from_millis(500);
            socket = loop {
                tokio::time::sleep(delay).await;
                if tx.is_closed() {
                    return;
                }
                match comfy.connect(&client_id).await {
                    Ok(s) => break s,
                    Err(e) => tracing::debug!(error = %e, "websocket reconnect failed"),
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            };
            tracing::info!("websocket to ComfyUI reopened");
            if tx.send(SocketEvent::Reopened).is_err() {
                return;
            }
        }
    })
}

/// Forwards messages until the socket ends; returns why it ended.
async fn read(socket: &mut Socket, tx: &mpsc::UnboundedSender<SocketEvent>) -> String {
    while let Some(frame) = socket.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let raw = text.as_str().to_string();
                match serde_json::from_str::<Value>(&raw) {
                    Ok(value) => {
                        if tx.send(SocketEvent::Message { raw, value }).is_err() {
                            return "no longer needed".into();
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "ignored a websocket message that is not JSON"),
                }
            }
            Ok(Message::Binary(frame)) => {
                if tx.send(SocketEvent::Binary(frame)).is_err() {
                    return "no longer needed".into();
                }
            }
            // Pings are answered by tungstenite.
            Ok(Message::Close(frame)) => {
                return frame
                    .map(|f| format!("closed by ComfyUI: {} {}", f.code, f.reason))
                    .unwrap_or_else(|| "closed by ComfyUI".into())
            }
            Ok(_) => {}
            Err(e) => return e.to_string(),
        }
    }
    "the connection ended".into()
}
