//! One job, start to finish (design.md, "Data flow of one workflow", step 5).
//!
//! Get the workflow, tell the gateway the job started, find ComfyUI, open its
//! websocket, copy the participant's files the prompt refers to (the
//! payload's `inputs`) into ComfyUI's input folder under
//! `comfy-multi/u<user>/` and point the prompt at them, queue the prompt,
//! relay its messages (and, best effort, its binary previews) while watching
//! for its end (websocket, with a `/history` poll as the safety net), upload
//! the saved outputs and temp previews (`PreviewImage`), and report the
//! verdict. Every way this can go wrong ends in one
//! [`Failure`], whose text is the one-line reason the participant, the
//! instructor and the executor see.

use std::time::{Duration, Instant};

use dispatcher::consul::ConsulClient;
use dispatcher::contract::{Finished, OutputQuery};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::comfy::{Comfy, ComfyError};
use crate::discover::{self, DiscoverError};
use crate::env::{EnvError, TaskEnv};
use crate::gateway::{Gateway, GatewayError};
use crate::history::{self, Outcome, OutputFile, Verdict};
use crate::relay::{Relay, Relayed};
use crate::retry::Backoff;
use crate::socket::{self, SocketEvent};
use crate::stop::Stop;

/// How often `/history` is polled while the prompt runs.
const POLL_EVERY: Duration = Duration::from_millis(1500);
/// With the websocket down, how long ComfyUI may stay silent before the job
/// is given up as lost.
const LOST_AFTER: Duration = Duration::from_secs(30);
/// After interrupting on a stop, how long to wait for ComfyUI to confirm.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long the last relayed events may take before the final report.
const RELAY_FLUSH: Duration = Duration::from_secs(10);

/// `status.messages` event types (what ComfyUI's history keeps).
const STATUS_EVENTS: [&str; 5] =
    ["execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted"];

/// Why a job did not succeed. The text is the job's one-line error.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Env(#[from] EnvError),
    #[error("cannot get the workflow: {0}")]
    Workflow(GatewayError),
    #[error("the gateway did not accept the start of the job: {0}")]
    Start(GatewayError),
    #[error("cannot find ComfyUI: {0}")]
    Discover(DiscoverError),
    /// Unreachable, rejected (400), or an unexpected answer.
    #[error("{0}")]
    Comfy(#[from] ComfyError),
    /// ComfyUI's `execution_error`: `<node_type> (node <id>): <message>`.
    #[error("{0}")]
    Execution(String),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Unknown(String),
    #[error("lost ComfyUI at {url}: no answer for {secs} s ({reason})")]
    Lost { url: String, secs: u64, reason: String },
    #[error("cannot pass the input file {reference:?} to ComfyUI: {reason}")]
    Input { reference: String, reason: String },
    #[error("cannot save output {filename}: {reason}")]
    Output { filename: String, reason: String },
    #[error("stopped ({0})")]
    Stopped(&'static str),
}

impl Failure {
    /// Whether the failure is this run's, not the workflow's: ComfyUI could
    /// not be found or reached, or went silent. Another run may succeed, so
    /// the job is not failed; the dispatcher decides ([`EXIT_RETRY`]).
    pub fn retryable(&self) -> bool {
        match self {
            Failure::Discover(_) | Failure::Lost { .. } => true,
            Failure::Comfy(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// How gpu-task ends when not successful: exit code and the one line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub code: u8,
    pub line: String,
}

/// Exit code: the job failed (and the gateway knows why).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the failure could not be reported (or the environment is unusable).
pub const EXIT_UNREPORTED: u8 = 2;
/// Exit code: this run could not do the job (ComfyUI unreachable) and the
/// gateway was told why; the job stays in flight for the dispatcher to run
/// again or fail.
pub const EXIT_RETRY: u8 = 3;

/// The exit code after a stop by `signal`: 128 + its number, as a shell would show.
fn stop_code(signal: &str) -> u8 {
    match signal {
        "SIGINT" => 130,
        _ => 143,
    }
}

/// The exit and line for a job that ended with `result`, given whether the
/// final report reached the gateway.
pub fn exit_for(result: &Result<(), Failure>, report: Result<(), &GatewayError>) -> Result<(), Exit> {
    match (result, report) {
        (Ok(()), Ok(())) => Ok(()),
        (Ok(()), Err(e)) => {
            Err(Exit { code: EXIT_UNREPORTED, line: format!("succeeded, but cannot report it: {e}") })
        }
        (Err(f), report) => {
            let line = match report {
                Ok(()) => f.to_string(),
                Err(e) => format!("{f} (and cannot report it: {e})"),
            };
            let code = match (f, report) {
                (Failure::Stopped(sig), _) => stop_code(sig),
                (f, Ok(())) if f.retryable() => EXIT_RETRY,
                (_, Ok(())) => EXIT_FAILED,
                (_, Err(_)) => EXIT_UNREPORTED,
            };
            Err(Exit { code, line: history::one_line(&line) })
        }
    }
}

/// Runs the job described by `env`.
pub async fn run(env: TaskEnv, mut stop: Stop) -> Result<(), Exit> {
    tracing::info!(job = %env.job_id, user = %env.user_id, "gpu-task starting");
    let consul = ConsulClient::new(&env.consul_addr, env.consul_token.clone());
    let gateway_url = tokio::select! {
        biased;
        sig = stop.wait() => return Err(Exit { code: stop_code(sig), line: format!("stopped ({sig}) before finding the gateway") }),
        r = discover::gateway(&env, &consul) => r,
    }
    .map_err(|e| Exit { code: EXIT_UNREPORTED, line: history::one_line(&format!("cannot find the gateway: {e}")) })?;
    let ca = env.gateway_ca_certs().map_err(|e| Exit { code: EXIT_UNREPORTED, line: e.to_string() })?;
    let gateway = Gateway::new(&gateway_url, &env.job_id, env.internal_secret.clone(), ca);
    tracing::info!(gateway = %gateway.url(), "reporting to the gateway");

    let mut messages = Vec::new();
    let result = work(&env, &consul, &gateway, &mut stop, &mut messages).await;
    match &result {
        Ok(()) => tracing::info!("job succeeded"),
        Err(f) => tracing::warn!("job failed: {f}"),
    }
    let report = Finished {
        success: result.is_ok(),
        error: result.as_ref().err().map(|f| history::one_line(&f.to_string())),
        messages,
        retryable: result.as_ref().err().is_some_and(Failure::retryable),
    };
    // After a stop, Nomad's kill_timeout is running; and a gateway that was
    // just unreachable for half a minute will hardly be back: report briefly.
    let gateway_down = matches!(&result, Err(Failure::Workflow(e) | Failure::Start(e)) if e.is_transient());
    let backoff = if stop.fired().is_some() || gateway_down { Backoff::QUICK } else { Backoff::PATIENT };
    let reported =
        backoff.run("reporting the end", GatewayError::is_transient, || gateway.finished(&report)).await;
    exit_for(&result, reported.as_ref().map(|_| ()))
}

/// Returns early with [`Failure::Stopped`] when a signal comes first.
macro_rules! or_stop {
    ($stop:expr, $fut:expr) => {
        tokio::select! {
            biased;
            sig = $stop.wait() => return Err(Failure::Stopped(sig)),
            r = $fut => r,
        }
    };
}

async fn work(
    env: &TaskEnv,
    consul: &ConsulClient,
    gateway: &Gateway,
    stop: &mut Stop,
    messages: &mut Vec<Value>,
) -> Result<(), Failure> {
    let mut payload = match env.read_payload()? {
        Some(p) => p,
        None => {
            tracing::info!("no payload file: fetching the workflow from the gateway");
            or_stop!(
                stop,
                Backoff::PATIENT
                    .run("fetching the workflow", GatewayError::is_transient, || gateway.workflow())
            )
            .map_err(Failure::Workflow)?
        }
    };
    or_stop!(
        stop,
        Backoff::PATIENT.run("reporting the start", GatewayError::is_transient, || gateway.started())
    )
    .map_err(Failure::Start)?;

    let comfy = Comfy::new(&or_stop!(stop, discover::comfyui(env, consul)).map_err(Failure::Discover)?);
    let client_id = uuid::Uuid::new_v4().simple().to_string();
    let socket = or_stop!(
        stop,
        Backoff::QUICK.run("connecting to ComfyUI", ComfyError::is_transient, || comfy.connect(&client_id))
    )?;
    let (tx, rx) = mpsc::unbounded_channel();
    let _follower = AbortOnDrop(socket::follow(comfy.clone(), client_id.clone(), socket, tx));

    for reference in std::mem::take(&mut payload.inputs) {
        let stored = or_stop!(stop, pass_input(&comfy, gateway, &env.user_id, &reference))?;
        rewrite_references(&mut payload.prompt, &reference, &stored);
    }

    // Not raced with a stop: once sent, the prompt id is needed to cancel it.
    let sent_once = |e: &ComfyError| matches!(e, ComfyError::Unreachable { connect: true, .. });
    let prompt_id =
        Backoff::QUICK.run("queueing the prompt", sent_once, || comfy.submit(&client_id, &payload)).await?;
    tracing::info!(%prompt_id, comfyui = %comfy.url(), "prompt queued");

    let relay = Relay::start(gateway.clone());
    let mut follow = Follow::new(&comfy, &prompt_id, rx, &relay);
    let end = follow.watch(Some(stop), None).await;
    let verdict = match end {
        Ok(End::Verdict(v)) => v,
        Ok(End::Stopped(sig)) => {
            tracing::info!(%prompt_id, "interrupting the prompt");
            if let Err(e) = comfy.cancel(&prompt_id).await {
                tracing::warn!(error = %e, "cannot interrupt the prompt");
            }
            if let Ok(End::Verdict(v)) = follow.watch(None, Some(Instant::now() + STOP_GRACE)).await {
                *messages = v.messages;
            } else {
                *messages = std::mem::take(&mut follow.status_messages);
            }
            drop(follow);
            relay.finish(Duration::from_secs(2)).await;
            return Err(Failure::Stopped(sig));
        }
        Ok(End::TimedOut) => Verdict {
            outcome: Outcome::Unknown("gave up waiting for ComfyUI".into()),
            messages: Vec::new(),
            outputs: Vec::new(),
        },
        Err(f) => {
            *messages = std::mem::take(&mut follow.status_messages);
            drop(follow);
            relay.finish(RELAY_FLUSH).await;
            return Err(f);
        }
    };
    follow.tail(Duration::from_secs(1)).await;
    drop(follow);
    relay.finish(RELAY_FLUSH).await;
    *messages = verdict.messages;

    match verdict.outcome {
        Outcome::Success => {}
        Outcome::Error(line) => return Err(Failure::Execution(line)),
        Outcome::Interrupted => return Err(Failure::Interrupted),
        Outcome::Unknown(why) => return Err(Failure::Unknown(why)),
    }
    for file in verdict.outputs.iter().filter(|f| f.is_uploaded()) {
        or_stop!(stop, save_output(&comfy, gateway, file))?;
    }
    Ok(())
}

/// Aborts a background task when the flow is done with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How watching the prompt ended.
enum End {
    Verdict(Verdict),
    Stopped(&'static str),
    TimedOut,
}

/// What the websocket has said about the prompt so far.
struct Follow<'a> {
    comfy: &'a Comfy,
    prompt_id: &'a str,
    rx: mpsc::UnboundedReceiver<SocketEvent>,
    relay: &'a Relay,
    socket_open: bool,
    /// `executing` with `node: null` came: ComfyUI is done with the prompt.
    done: bool,
    error: Option<String>,
    interrupted: bool,
    success: bool,
    /// Files from `executed` messages (used if the history never shows).
    outputs: Vec<OutputFile>,
    /// `execution_*` messages as `[type, data]` (likewise).
    status_messages: Vec<Value>,
    last_contact: Instant,
}

impl<'a> Follow<'a> {
    fn new(
        comfy: &'a Comfy,
        prompt_id: &'a str,
        rx: mpsc::UnboundedReceiver<SocketEvent>,
        relay: &'a Relay,
    ) -> Self {
        Follow {
            comfy,
            prompt_id,
            rx,
            relay,
            socket_open: true,
            done: false,
            error: None,
            interrupted: false,
            success: false,
            outputs: Vec::new(),
            status_messages: Vec::new(),
            last_contact: Instant::now(),
        }
    }

    /// Relays the prompt's messages until it ends (or `stop` fires, or
    /// `deadline` passes).
    async fn watch(
        &mut self,
        mut stop: Option<&mut Stop>,
        deadline: Option<Instant>,
    ) -> Result<End, Failure> {
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut socket_gone = false;
        loop {
            let stopped = async {
                match stop.as_deref_mut() {
                    Some(s) => s.wait().await,
                    None => std::future::pending().await,
                }
            };
            let timed_out = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let poll_now = tokio::select! {
                biased;
                sig = stopped => return Ok(End::Stopped(sig)),
                _ = timed_out => return Ok(End::TimedOut),
                event = self.rx.recv(), if !socket_gone => match event {
                    Some(SocketEvent::Message { raw, value }) => {
                        self.last_contact = Instant::now();
                        self.on_message(raw, &value);
                        self.done
                    }
                    Some(SocketEvent::Binary(frame)) => {
                        self.on_binary(frame);
                        false
                    }
                    Some(SocketEvent::Closed(reason)) => {
                        tracing::warn!(%reason, "websocket to ComfyUI closed; polling its history");
                        self.socket_open = false;
                        true
                    }
                    Some(SocketEvent::Reopened) => {
                        self.socket_open = true;
                        true
                    }
                    None => {
                        socket_gone = true;
                        self.socket_open = false;
                        true
                    }
                },
                _ = poll.tick() => true,
            };
            if !poll_now {
                continue;
            }
            match self.history_after_end().await {
                Ok(Some(verdict)) => return Ok(End::Verdict(verdict)),
                Ok(None) => self.last_contact = Instant::now(),
                Err(e) => {
                    tracing::debug!(error = %e, "history poll failed");
                    let silent = self.last_contact.elapsed();
                    if !self.socket_open && silent >= LOST_AFTER {
                        return Err(Failure::Lost {
                            url: self.comfy.url().to_string(),
                            secs: silent.as_secs(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        }
    }

    /// The verdict once the prompt ended: from the history, or (when the
    /// websocket says it ended but the history will not show it) from what
    /// the websocket said.
    async fn history_after_end(&self) -> Result<Option<Verdict>, ComfyError> {
        if !self.done {
            return Ok(self.comfy.history(self.prompt_id).await?.map(|e| history::verdict(&e)));
        }
        // ComfyUI writes the history before it says `executing: null`; a few
        // tries cover a slow or flaky answer.
        let quick = Backoff { attempts: 5, ..Backoff::QUICK };
        let entry = quick
            .run(
                "reading the history",
                |_: &ComfyError| true,
                || async {
                    match self.comfy.history(self.prompt_id).await? {
                        Some(e) => Ok(e),
                        None => Err(ComfyError::Decode {
                            url: self.comfy.url().to_string(),
                            what: "/history",
                            reason: "no entry yet".into(),
                        }),
                    }
                },
            )
            .await;
        Ok(Some(match entry {
            Ok(e) => history::verdict(&e),
            Err(e) => {
                tracing::warn!(error = %e, "no history for the prompt; going by the websocket");
                self.socket_verdict()
            }
        }))
    }

    fn socket_verdict(&self) -> Verdict {
        let outcome = if let Some(line) = &self.error {
            Outcome::Error(line.clone())
        } else if self.interrupted {
            Outcome::Interrupted
        } else if self.success {
            Outcome::Success
        } else {
            Outcome::Unknown("ComfyUI ended the prompt without saying how, and has no history of it".into())
        };
        Verdict { outcome, messages: self.status_messages.clone(), outputs: self.outputs.clone() }
    }

    /// Relays the message if it is about our prompt, and notes what it says.
    fn on_message(&mut self, raw: String, value: &Value) {
        let data = &value["data"];
        if data["prompt_id"].as_str() != Some(self.prompt_id) {
            return;
        }
        let kind = value["type"].as_str().unwrap_or("").to_string();
        match kind.as_str() {
            "executing" if data["node"].is_null() => self.done = true,
            "execution_success" => self.success = true,
            "execution_error" => self.error = Some(history::execution_error_line(data)),
            "execution_interrupted" => self.interrupted = true,
            "executed" => {
                let node = match &data["node"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                self.outputs.extend(history::node_outputs(&node, &data["output"]));
            }
            _ => {}
        }
        if STATUS_EVENTS.contains(&kind.as_str()) {
            self.status_messages.push(Value::Array(vec![Value::String(kind.clone()), data.clone()]));
        }
        self.relay.send(Relayed { kind, raw });
    }

    /// Offers the frame to the relay if it is a preview of our prompt.
    fn on_binary(&mut self, frame: bytes::Bytes) {
        if crate::relay::is_preview_of(&frame, self.prompt_id) {
            self.relay.preview(frame);
        }
    }

    /// When the history showed the end before the websocket did, waits a
    /// little for the websocket's last messages so the editor gets them too.
    async fn tail(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.done && self.socket_open {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(SocketEvent::Message { raw, value })) => self.on_message(raw, &value),
                Ok(Some(SocketEvent::Binary(frame))) => self.on_binary(frame),
                Ok(Some(SocketEvent::Reopened)) => {}
                _ => return,
            }
        }
    }
}

/// Where a participant's file goes in ComfyUI's input folder: under
/// `comfy-multi/u<user>/<type>/`, so participants' files of the same name
/// never meet on the shared GPU node.
pub fn input_subfolder(user: &str, reference: &str) -> (String, String) {
    let (kind, path) = dispatcher::contract::split_file_reference(reference);
    let user: String = user.chars().filter(char::is_ascii_alphanumeric).collect();
    let (sub, name) = path.rsplit_once('/').unwrap_or(("", path));
    let mut folder = format!("comfy-multi/u{user}/{kind}");
    if !sub.is_empty() {
        folder.push('/');
        folder.push_str(sub);
    }
    (folder, name.to_string())
}

/// Copies one of the participant's files from the gateway into ComfyUI's
/// input folder; returns the value the prompt must use for it.
async fn pass_input(comfy: &Comfy, gateway: &Gateway, user: &str, reference: &str) -> Result<String, Failure> {
    let failed = |reason: String| Failure::Input { reference: reference.to_string(), reason };
    let bytes = Backoff::PATIENT
        .run("fetching an input file", GatewayError::is_transient, || gateway.input(reference))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let (folder, name) = input_subfolder(user, reference);
    let stored = Backoff::QUICK
        .run("uploading an input file", ComfyError::is_transient, || comfy.upload_input(&folder, &name, bytes.clone()))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tracing::info!(%reference, %stored, "input passed to ComfyUI");
    // An annotated reference stays annotated (now pointing at ComfyUI's input folder).
    let annotated = dispatcher::contract::split_file_reference(reference).1 != reference;
    Ok(if annotated { format!("{stored} [input]") } else { stored })
}

/// Replaces every string input value equal to `from` by `to`.
pub fn rewrite_references(prompt: &mut Value, from: &str, to: &str) {
    let Some(nodes) = prompt.as_object_mut() else { return };
    for node in nodes.values_mut() {
        let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else { continue };
        for value in inputs.values_mut() {
            if value.as_str() == Some(from) {
                *value = Value::String(to.to_string());
            }
        }
    }
}

/// Why one output could not be saved.
#[derive(Debug, thiserror::Error)]
enum SaveError {
    #[error("{0}")]
    Download(ComfyError),
    #[error("{0}")]
    Upload(GatewayError),
}

impl SaveError {
    fn is_transient(&self) -> bool {
        match self {
            SaveError::Download(e) => e.is_transient(),
            SaveError::Upload(e) => e.is_transient(),
        }
    }
}

/// Streams one output file from ComfyUI to the gateway, with retries (the
/// upload is idempotent).
async fn save_output(comfy: &Comfy, gateway: &Gateway, file: &OutputFile) -> Result<(), Failure> {
    let query = OutputQuery {
        node: file.node.clone(),
        kind: file.kind.clone(),
        filename: file.filename.clone(),
        index: file.index,
        folder_type: file.folder_type.clone(),
    };
    Backoff::PATIENT
        .run("saving an output", SaveError::is_transient, || async {
            let resp = comfy.view(file).await.map_err(SaveError::Download)?;
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = reqwest::Body::wrap_stream(resp.bytes_stream());
            gateway.upload(&query, content_type.as_deref(), body).await.map_err(SaveError::Upload)
        })
        .await
        .map_err(|e| Failure::Output { filename: file.filename.clone(), reason: e.to_string() })?;
    tracing::info!(node = %file.node, file = %file.filename, "output saved");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw_down() -> GatewayError {
        GatewayError::Unreachable { url: "http://gw:8080".into(), reason: "Connection refused".into() }
    }

    #[test]
    fn failure_lines() {
        let f = Failure::Comfy(ComfyError::Unreachable {
            url: "http://127.0.0.1:8188".into(),
            reason: "error sending request: Connection refused".into(),
            connect: true,
        });
        assert_eq!(
            f.to_string(),
            "cannot reach ComfyUI at http://127.0.0.1:8188: error sending request: Connection refused"
        );
        assert_eq!(
            Failure::Execution("KSampler (node 3): boom".into()).to_string(),
            "KSampler (node 3): boom"
        );
        assert_eq!(Failure::Interrupted.to_string(), "interrupted");
        assert_eq!(Failure::Stopped("SIGTERM").to_string(), "stopped (SIGTERM)");
        let f = Failure::Output {
            filename: "a.png".into(),
            reason: "the gateway at http://gw answered 413 to an output upload: too big".into(),
        };
        assert_eq!(
            f.to_string(),
            "cannot save output a.png: the gateway at http://gw answered 413 to an output upload: too big"
        );
    }

    #[test]
    fn inputs_land_in_the_participants_folder_and_the_prompt_follows() {
        assert_eq!(input_subfolder("3", "cat.png"), ("comfy-multi/u3/input".to_string(), "cat.png".to_string()));
        assert_eq!(
            input_subfolder("3", "clipspace/m.png [input]"),
            ("comfy-multi/u3/input/clipspace".to_string(), "m.png".to_string())
        );
        assert_eq!(input_subfolder("../3", "w/1.png [temp]"), ("comfy-multi/u3/temp/w".to_string(), "1.png".to_string()));
        let mut prompt = serde_json::json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
            "2": {"class_type": "Note", "inputs": {"text": "cat.png is a cat", "other": ["1", 0]}},
        });
        rewrite_references(&mut prompt, "cat.png", "comfy-multi/u3/input/cat.png");
        assert_eq!(prompt["1"]["inputs"]["image"], "comfy-multi/u3/input/cat.png");
        assert_eq!(prompt["2"]["inputs"]["text"], "cat.png is a cat");
    }

    #[test]
    fn exit_codes_and_lines() {
        assert_eq!(exit_for(&Ok(()), Ok(())), Ok(()));
        let e = exit_for(&Ok(()), Err(&gw_down())).unwrap_err();
        assert_eq!(e.code, EXIT_UNREPORTED);
        assert!(
            e.line.starts_with("succeeded, but cannot report it: cannot reach the gateway"),
            "{}",
            e.line
        );

        let e = exit_for(&Err(Failure::Interrupted), Ok(())).unwrap_err();
        assert_eq!(e, Exit { code: EXIT_FAILED, line: "interrupted".into() });

        let e = exit_for(&Err(Failure::Interrupted), Err(&gw_down())).unwrap_err();
        assert_eq!(e.code, EXIT_UNREPORTED);
        assert!(
            e.line
                .starts_with("interrupted (and cannot report it: cannot reach the gateway at http://gw:8080"),
            "{}",
            e.line
        );

        assert_eq!(exit_for(&Err(Failure::Stopped("SIGTERM")), Ok(())).unwrap_err().code, 143);
        assert_eq!(exit_for(&Err(Failure::Stopped("SIGINT")), Err(&gw_down())).unwrap_err().code, 130);

        let down = Failure::Comfy(ComfyError::Unreachable { url: "u".into(), reason: "refused".into(), connect: true });
        assert!(down.retryable());
        assert_eq!(exit_for(&Err(down), Ok(())).unwrap_err().code, EXIT_RETRY);
        assert!(!Failure::Execution("KSampler (node 3): oom".into()).retryable());

        let multi = Failure::Unknown("two\nlines".into());
        assert_eq!(exit_for(&Err(multi), Ok(())).unwrap_err().line, "two lines");
    }
}
