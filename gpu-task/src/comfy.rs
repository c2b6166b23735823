//! Client of the warm ComfyUI on this GPU node: its HTTP API and websocket.
//!
//! ComfyUI is shared by every job that runs on its GPU (one at a time), so
//! gpu-task only ever touches its own prompt: it queues it under its own
//! client id, cancels it by prompt id (never a global interrupt), and reads
//! back only its own history entry and files. Shapes follow ComfyUI's
//! `server.py` as recorded in `shared/comfyui-samples/`.

use std::time::Duration;

use dispatcher::contract::WorkflowPayload;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::gateway::{describe, root_cause};
use crate::history::{self, one_line, OutputFile};

/// Timeout of the small calls (`/prompt`, `/history`, `/interrupt`).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the websocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The websocket to ComfyUI.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a call to ComfyUI failed.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    /// Transport failure. `connect` is true when nothing reached ComfyUI, so
    /// sending again cannot duplicate anything.
    #[error("cannot reach ComfyUI at {url}: {reason}")]
    Unreachable { url: String, reason: String, connect: bool },
    /// `POST /prompt` answered 400: ComfyUI's validation message.
    #[error("ComfyUI rejected the workflow: {0}")]
    Rejected(String),
    /// Any other error status.
    #[error("ComfyUI at {url} answered {status} to {what}: {body}")]
    Status { url: String, what: String, status: u16, body: String },
    /// An answer that is not what ComfyUI sends.
    #[error("ComfyUI at {url} sent an unreadable answer to {what}: {reason}")]
    Decode { url: String, what: &'static str, reason: String },
}

impl ComfyError {
    /// Whether trying again later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            ComfyError::Unreachable { .. } => true,
            ComfyError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            ComfyError::Rejected(_) | ComfyError::Decode { .. } => false,
        }
    }
}

/// One ComfyUI server.
#[derive(Debug, Clone)]
pub struct Comfy {
    base: String,
    http: reqwest::Client,
}

impl Comfy {
    /// A client for the ComfyUI at `base` (`http://host:8188`, maybe with a path).
    pub fn new(base: &str) -> Comfy {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(Duration::from_secs(120))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Comfy { base: base.trim_end_matches('/').to_string(), http }
    }

    /// ComfyUI's address.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, e: &reqwest::Error) -> ComfyError {
        ComfyError::Unreachable { url: self.base.clone(), reason: describe(e), connect: e.is_connect() }
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ComfyError> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ComfyError::Status {
            url: self.base.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            body: one_line(&body),
        })
    }

    /// `ws(s)://…/ws?clientId=<client_id>`.
    pub fn ws_url(&self, client_id: &str) -> String {
        let base = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            format!("ws://{}", self.base)
        };
        format!("{base}/ws?clientId={}", urlencoding::encode(client_id))
    }

    /// Opens the websocket under `client_id` and, like the editor, first
    /// sends the client's feature flags.
    pub async fn connect(&self, client_id: &str) -> Result<Socket, ComfyError> {
        let url = self.ws_url(client_id);
        let unreachable =
            |reason: String| ComfyError::Unreachable { url: self.base.clone(), reason, connect: true };
        let (mut socket, _) =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
                .await
                .map_err(|_| unreachable(format!("no websocket handshake within {CONNECT_TIMEOUT:?}")))?
                .map_err(|e| unreachable(root_cause(&e)))?;
        let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
        socket.send(Message::text(flags.to_string())).await.map_err(|e| unreachable(root_cause(&e)))?;
        Ok(socket)
    }

    /// `POST /prompt`: queues the workflow for `client_id`'s socket and
    /// returns ComfyUI's prompt id.
    pub async fn submit(&self, client_id: &str, payload: &WorkflowPayload) -> Result<String, ComfyError> {
        let extra_data = if payload.extra_data.is_object() { payload.extra_data.clone() } else { json!({}) };
        let body = json!({"prompt": payload.prompt, "client_id": client_id, "extra_data": extra_data});
        let req = self.http.post(format!("{}/prompt", self.base)).timeout(CALL_TIMEOUT).json(&body);
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(&e))?;
        if status.as_u16() == 400 {
            return Err(ComfyError::Rejected(rejection_message(&text)));
        }
        if !status.is_success() {
            return Err(ComfyError::Status {
                url: self.base.clone(),
                what: "/prompt".into(),
                status: status.as_u16(),
                body: one_line(&text),
            });
        }
        let decode = |reason: String| ComfyError::Decode { url: self.base.clone(), what: "/prompt", reason };
        let answer: Value = serde_json::from_str(&text).map_err(|e| decode(e.to_string()))?;
        answer["prompt_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| decode(format!("no prompt_id in {}", one_line(&text))))
    }

    /// `POST /upload/image` (`type=input`, `overwrite=true`): stores `bytes`
    /// as `subfolder/filename` in ComfyUI's input folder. Returns the
    /// `subfolder/name` ComfyUI says it stored (it may rename).
    pub async fn upload_input(&self, subfolder: &str, filename: &str, bytes: Vec<u8>) -> Result<String, ComfyError> {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(bytes).file_name(filename.to_string()))
            .text("type", "input")
            .text("subfolder", subfolder.to_string())
            .text("overwrite", "true");
        let req = self.http.post(format!("{}/upload/image", self.base)).timeout(CALL_TIMEOUT * 3).multipart(form);
        let resp = self.send("/upload/image", req).await?;
        let decode = |reason: String| ComfyError::Decode { url: self.base.clone(), what: "/upload/image", reason };
        let answer: Value = resp.json().await.map_err(|e| decode(e.to_string()))?;
        let name = answer["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| decode(format!("no name in {answer}")))?;
        let sub = answer["subfolder"].as_str().unwrap_or(subfolder).trim_matches('/');
        Ok(if sub.is_empty() { name.to_string() } else { format!("{sub}/{name}") })
    }

    /// `GET /history/{prompt_id}`: the prompt's entry once it has ended.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<Value>, ComfyError> {
        let path = format!("/history/{}", urlencoding::encode(prompt_id));
        let req = self.http.get(format!("{}{path}", self.base)).timeout(CALL_TIMEOUT);
        let resp = self.send(&path, req).await?;
        let answer: Value = resp.json().await.map_err(|e| ComfyError::Decode {
            url: self.base.clone(),
            what: "/history",
            reason: e.to_string(),
        })?;
        Ok(history::entry(&answer, prompt_id).cloned())
    }

    /// `GET /view`: one output file, as a streaming response.
    pub async fn view(&self, file: &OutputFile) -> Result<reqwest::Response, ComfyError> {
        let req = self.http.get(format!("{}/view", self.base)).query(&[
            ("filename", file.filename.as_str()),
            ("subfolder", file.subfolder.as_str()),
            ("type", file.folder_type.as_str()),
        ]);
        self.send(&format!("/view of {}", file.filename), req).await
    }

    /// Stops `prompt_id` and only it: removes it from the queue if it is
    /// still waiting (`POST /queue {delete}`), interrupts it if it is running
    /// (`POST /interrupt {prompt_id}`; ComfyUI ignores it otherwise).
    pub async fn cancel(&self, prompt_id: &str) -> Result<(), ComfyError> {
        let delete = self
            .http
            .post(format!("{}/queue", self.base))
            .timeout(Duration::from_secs(5))
            .json(&json!({"delete": [prompt_id]}));
        let deleted = self.send("/queue delete", delete).await;
        let interrupt = self
            .http
            .post(format!("{}/interrupt", self.base))
            .timeout(Duration::from_secs(5))
            .json(&json!({"prompt_id": prompt_id}));
        self.send("/interrupt", interrupt).await?;
        deleted.map(drop)
    }
}

/// ComfyUI's 400 answer to `/prompt` as one line: its error message, plus
/// each failing node as `<class_type> (node <id>) input <name>: <message>`.
pub fn rejection_message(body: &str) -> String {
    let Ok(answer) = serde_json::from_str::<Value>(body) else {
        return one_line(if body.trim().is_empty() { "400 with no reason given" } else { body });
    };
    let error = &answer["error"];
    let mut text = match error {
        Value::String(s) => s.clone(),
        _ => error["message"].as_str().unwrap_or("the workflow is not valid").to_string(),
    };
    if let Some(details) = error["details"].as_str().filter(|d| !d.trim().is_empty()) {
        text.push_str(&format!(" ({details})"));
    }
    let mut nodes = Vec::new();
    if let Some(node_errors) = answer["node_errors"].as_object() {
        let mut ids: Vec<&String> = node_errors.keys().collect();
        ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.to_string()));
        for id in ids {
            let node = &node_errors[id.as_str()];
            let class_type = node["class_type"].as_str().unwrap_or("node");
            for e in node["errors"].as_array().into_iter().flatten() {
                let input = e["extra_info"]["input_name"].as_str();
                let mut line = format!("{class_type} (node {id})");
                if let Some(input) = input {
                    line.push_str(&format!(" input {input}"));
                }
                line.push_str(": ");
                line.push_str(e["message"].as_str().unwrap_or("invalid"));
                if let Some(details) =
                    e["details"].as_str().filter(|d| !d.trim().is_empty() && Some(*d) != input)
                {
                    line.push_str(&format!(" ({details})"));
                }
                nodes.push(line);
            }
        }
    }
    if !nodes.is_empty() {
        text = format!("{}: {}", text.trim_end_matches('.'), nodes.join("; "));
    }
    one_line(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_body(name: &str) -> String {
        let path = format!("{}/../tests/fixtures/comfyui-samples/{name}", env!("CARGO_MANIFEST_DIR"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["body"].to_string()
    }

    #[test]
    fn rejections_read_like_comfyui() {
        assert_eq!(
            rejection_message(&sample_body("unknown-node.prompt-response.json")),
            "Cannot execute because node NoSuchNode does not exist. (Node ID '#2')"
        );
        assert_eq!(
            rejection_message(&sample_body("odd-input.prompt-response.json")),
            "Prompt outputs failed validation: ImageCompositeMasked (node 5) input x: Value 100000 bigger than max of 16384"
        );
        assert_eq!(
            rejection_message(&sample_body("missing-link.prompt-response.json")),
            "Prompt outputs failed validation: ImageScale (node 6) input images: Exception when validating inner node ('99')"
        );
        assert_eq!(rejection_message("oops\nbad"), "oops bad");
        assert_eq!(rejection_message(""), "400 with no reason given");
        let err = ComfyError::Rejected(rejection_message(&sample_body("unknown-node.prompt-response.json")));
        assert!(err.to_string().starts_with("ComfyUI rejected the workflow: Cannot execute"), "{err}");
    }

    #[test]
    fn websocket_url() {
        assert_eq!(Comfy::new("http://127.0.0.1:8188/").ws_url("abc"), "ws://127.0.0.1:8188/ws?clientId=abc");
        assert_eq!(Comfy::new("https://gpu/comfy").ws_url("a b"), "wss://gpu/comfy/ws?clientId=a%20b");
    }

    #[test]
    fn unreachable_error_line() {
        let e = ComfyError::Unreachable {
            url: "http://127.0.0.1:8188".into(),
            reason: "Connection refused".into(),
            connect: true,
        };
        assert_eq!(e.to_string(), "cannot reach ComfyUI at http://127.0.0.1:8188: Connection refused");
        assert!(e.is_transient());
    }
}
