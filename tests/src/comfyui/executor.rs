//! Runs queued prompts one at a time, the way ComfyUI's `prompt_worker` and
//! `PromptExecutor.execute_async` do, and says what they say.
//!
//! Why it exists: the message sequence is the contract (checked against
//! `shared/comfyui-samples/*.ws-transcript.json`):
//! `execution_start`, `execution_cached`, then per node `progress_state`
//! (running), `executing`, `executed` (output nodes), `progress_state`
//! (finished); then `execution_success` (or `execution_interrupted` /
//! `execution_error`), the queue `status`, and `executing` with `node: null`.
//! A node whose cache key is known is not run again: it gets only
//! `executed` with the earlier UI output and a finished `progress_state`.
//!
//! Messages for a prompt go to the socket of its `client_id`. Without a
//! client id ComfyUI sends no `execution_*`/`executing`/`executed` at all,
//! but broadcasts `progress_state` and `execution_interrupted`; so does this.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::graph::{as_link, signatures, ExecutionList};
use super::json::{Json, Map};
use super::messages::{
    Executed, ExecutionCached, ExecutionError, ExecutionInterrupted, HistoryEntry, HistoryStatus, Meta, NodeProgress,
    ProgressState, PromptEvent, QueueItem, StatusData, StatusMessage, UiOutput,
};
use super::nodes::{Arg, Args, Ctx, Definition, Kind, NodeError, Value};
use super::paths::Dirs;
use super::state::{client_of, Shared, To};

/// One node's cached results (ComfyUI's `outputs` and `ui` caches).
#[derive(Clone)]
struct Cached {
    outputs: Arc<Vec<Value>>,
    ui: Option<UiOutput>,
}

/// The executor's cache, keyed by input signature. Like ComfyUI's default
/// ("classic") cache it keeps only what the current prompt can use.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, Cached>,
}

/// Runs prompts from the queue until the task is aborted.
pub async fn run(shared: Arc<Shared>) {
    let mut cache = Cache::default();
    loop {
        let item = shared.take().await;
        tracing::info!(prompt_id = %item.prompt_id, "executing prompt");
        let started = std::time::Instant::now();
        let entry = execute(&shared, &item, &mut cache).await;
        tracing::info!(prompt_id = %item.prompt_id, status = entry.status.status_str, elapsed = ?started.elapsed(), "prompt done");
        shared.finish(entry);
    }
}

/// Milliseconds since the epoch, as in ComfyUI's `timestamp` fields.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Why a prompt stopped early.
enum Stop {
    Interrupted { node: String },
    Failed { node: String, error: NodeError, inputs: Json },
}

/// The messaging side of one run: ComfyUI's `add_message`, the progress
/// registry and the routing by client id.
struct Run<'a> {
    shared: &'a Shared,
    prompt_id: String,
    client: Option<String>,
    messages: Vec<StatusMessage>,
    progress: Map<NodeProgress>,
}

impl Run<'_> {
    fn to(&self) -> To<'_> {
        self.client.as_deref().map_or(To::All, To::Client)
    }

    /// `add_message`: recorded for the history; sent to the client, or to
    /// everyone when `broadcast` and the prompt has no client.
    fn add_message(&mut self, event: &'static str, data: StatusData, broadcast: bool) {
        if self.client.is_some() || broadcast {
            self.shared.send(event, &data, self.to());
        }
        self.messages.push(StatusMessage(event, data));
    }

    /// Sends to the client only (`if server.client_id is not None`).
    fn to_client<T: Serialize>(&self, event: &str, data: &T) {
        if let Some(client) = &self.client {
            self.shared.send(event, data, To::Client(client));
        }
    }

    fn entry(&mut self, node: &str) -> &mut NodeProgress {
        if !self.progress.contains_key(node) {
            self.progress.insert(
                node,
                NodeProgress {
                    value: Json::from(0i64),
                    max: Json::from(1i64),
                    state: "pending",
                    node_id: node.into(),
                    prompt_id: self.prompt_id.clone(),
                    display_node_id: node.into(),
                    parent_node_id: None,
                    real_node_id: node.into(),
                },
            );
        }
        // Just inserted if it was missing.
        self.progress.get_mut(node).expect("progress entry exists")
    }

    fn send_progress(&self) {
        let nodes: Map<NodeProgress> =
            self.progress.iter().filter(|(_, p)| p.state != "pending").map(|(k, v)| (k.clone(), v.clone())).collect();
        self.shared.send("progress_state", &ProgressState { prompt_id: &self.prompt_id, nodes: &nodes }, self.to());
    }

    fn start_progress(&mut self, node: &str) {
        let entry = self.entry(node);
        entry.state = "running";
        entry.value = Json::from(0.0);
        entry.max = Json::from(1.0);
        self.send_progress();
    }

    fn finish_progress(&mut self, node: &str) {
        let entry = self.entry(node);
        entry.state = "finished";
        entry.value = entry.max.clone();
        self.send_progress();
    }
}

/// Everything a node call needs, owned, so it can run on a blocking thread.
struct Call {
    kind: Kind,
    args: Args,
    dirs: Dirs,
    prompt: Map<Json>,
    extra_pnginfo: Option<Json>,
}

impl Call {
    fn run(self) -> (Result<super::nodes::Ran, NodeError>, Args) {
        let ctx = Ctx { dirs: &self.dirs, prompt: &self.prompt, extra_pnginfo: self.extra_pnginfo.as_ref() };
        (self.kind.run(&ctx, &self.args), self.args)
    }
}

async fn execute(shared: &Shared, item: &QueueItem, cache: &mut Cache) -> HistoryEntry {
    let prompt = &item.prompt;
    let mut run = Run {
        shared,
        prompt_id: item.prompt_id.clone(),
        client: client_of(item),
        messages: Vec::new(),
        progress: Map::new(),
    };
    run.add_message(
        "execution_start",
        StatusData::Prompt(PromptEvent { prompt_id: run.prompt_id.clone(), timestamp: now_ms() }),
        false,
    );

    let class_of =
        |id: &str| prompt.get(id).and_then(|n| n.get("class_type")).and_then(Json::as_str).unwrap_or("").to_string();
    let keys = signatures(prompt, &|id| {
        let inputs =
            prompt.get(id).and_then(|n| n.get("inputs")).and_then(Json::as_object).cloned().unwrap_or_default();
        Kind::of(&class_of(id)).map_or(Json::Bool(false), |k| k.is_changed(&inputs, &shared.dirs))
    });
    let key = |id: &str| keys.get(id).cloned().unwrap_or_default();
    let live: std::collections::HashSet<&String> = keys.values().collect();
    cache.entries.retain(|k, _| live.contains(k));

    let cached_nodes: Vec<String> = prompt.keys().filter(|id| cache.entries.contains_key(&key(id))).cloned().collect();
    run.add_message(
        "execution_cached",
        StatusData::Cached(ExecutionCached {
            nodes: cached_nodes,
            prompt_id: run.prompt_id.clone(),
            timestamp: now_ms(),
        }),
        false,
    );

    let current_outputs: Vec<String> = prompt.keys().cloned().collect();
    let extra_pnginfo = item.extra_data.get("extra_pnginfo").cloned();
    let mut list = ExecutionList::new(prompt);
    for output in &item.outputs {
        let entries = &cache.entries;
        list.add_node(output, &|id| entries.contains_key(&key(id)));
    }

    let mut executed: Vec<String> = Vec::new();
    let mut stop: Option<Stop> = None;
    loop {
        let id = match list.next() {
            Ok(Some(id)) => id,
            Ok(None) => break,
            Err(cycle) => {
                let node = cycle.first().cloned().unwrap_or_default();
                let error = NodeError {
                    exception_type: "graph.DependencyCycleError".into(),
                    message: "Dependency cycle detected".into(),
                };
                stop = Some(Stop::Failed { node, error, inputs: Json::Array(Vec::new()) });
                break;
            }
        };
        let class = class_of(&id);
        let node_key = key(&id);

        if let Some(hit) = cache.entries.get(&node_key) {
            run.to_client(
                "executed",
                &Executed { node: &id, display_node: &id, output: hit.ui.as_ref(), prompt_id: &run.prompt_id },
            );
            run.finish_progress(&id);
            list.complete(&id);
            continue;
        }

        run.start_progress(&id);
        if let Some(client) = &run.client {
            shared.send_executing(client, &id, &run.prompt_id);
        }

        let (Some(kind), Some(def)) = (Kind::of(&class), Definition::of(&class)) else {
            let error = NodeError { exception_type: "KeyError".into(), message: format!("'{class}'") };
            stop = Some(Stop::Failed { node: id, error, inputs: Json::Object(Map::new()) });
            break;
        };
        let args = Args::new(kind, gather_inputs(prompt, &id, def, &cache.entries, &keys, extra_pnginfo.as_ref()));

        shared.interruptible_delay(shared.node_delay).await;
        if shared.is_interrupted() {
            stop = Some(Stop::Interrupted { node: id });
            break;
        }

        let call = Call {
            kind,
            args,
            dirs: shared.dirs.clone(),
            prompt: prompt.clone(),
            extra_pnginfo: extra_pnginfo.clone(),
        };
        let (result, args) = match tokio::task::spawn_blocking(move || call.run()).await {
            Ok(done) => done,
            Err(join) => {
                let error =
                    NodeError { exception_type: "RuntimeError".into(), message: format!("node task failed: {join}") };
                stop = Some(Stop::Failed { node: id, error, inputs: Json::Object(Map::new()) });
                break;
            }
        };
        let ran = match result {
            Ok(ran) => ran,
            Err(error) => {
                tracing::warn!(node = %id, %class, %error, "node failed");
                let inputs = Json::from_serialize(&args.formatted()).unwrap_or_default();
                stop = Some(Stop::Failed { node: id, error, inputs });
                break;
            }
        };
        let ui = ran.ui.clone();
        cache.entries.insert(node_key, Cached { outputs: Arc::new(ran.outputs), ui });
        if let Some(ui) = &ran.ui {
            run.to_client(
                "executed",
                &Executed { node: &id, display_node: &id, output: Some(ui), prompt_id: &run.prompt_id },
            );
        }
        run.finish_progress(&id);
        executed.push(id.clone());
        list.complete(&id);
    }

    let success = stop.is_none();
    match stop {
        None => {
            run.add_message(
                "execution_success",
                StatusData::Prompt(PromptEvent { prompt_id: run.prompt_id.clone(), timestamp: now_ms() }),
                false,
            );
        }
        Some(Stop::Interrupted { node }) => {
            tracing::info!(prompt_id = %run.prompt_id, %node, "processing interrupted");
            let data = ExecutionInterrupted {
                prompt_id: run.prompt_id.clone(),
                node_type: class_of(&node),
                node_id: node,
                executed: executed.clone(),
                timestamp: now_ms(),
            };
            run.add_message("execution_interrupted", StatusData::Interrupted(data), true);
        }
        Some(Stop::Failed { node, error, inputs }) => {
            let function = Kind::of(&class_of(&node)).map_or("execute", |k| k.function());
            let traceback = vec![format!(
                "  File \"comfyui-standin\", in {function}\n    (the ComfyUI stand-in raised {})\n",
                error.exception_type
            )];
            let data = ExecutionError {
                prompt_id: run.prompt_id.clone(),
                node_type: class_of(&node),
                node_id: node,
                executed: executed.clone(),
                // ComfyUI appends a tip line, empty unless out of memory.
                exception_message: format!("{}\n", error.message),
                exception_type: error.exception_type.clone(),
                traceback,
                current_inputs: inputs,
                current_outputs: current_outputs.clone(),
                timestamp: now_ms(),
            };
            run.add_message("execution_error", StatusData::Error(data), false);
        }
    }

    let mut outputs = Map::new();
    let mut meta = Map::new();
    for id in prompt.keys() {
        if let Some(ui) = cache.entries.get(&key(id)).and_then(|c| c.ui.clone()) {
            outputs.insert(id.clone(), ui);
            meta.insert(id.clone(), Meta::of(id));
        }
    }
    HistoryEntry {
        prompt: item.clone(),
        outputs,
        status: HistoryStatus {
            status_str: if success { "success" } else { "error" },
            completed: success,
            messages: run.messages,
        },
        meta,
    }
}

/// ComfyUI's `get_input_data`: linked inputs from the cache, declared
/// widget values as given, hidden inputs from the prompt and extra data.
fn gather_inputs(
    prompt: &Map<Json>,
    id: &str,
    def: Definition,
    cache: &HashMap<String, Cached>,
    keys: &HashMap<String, String>,
    extra_pnginfo: Option<&Json>,
) -> Map<Arg> {
    let mut args = Map::new();
    let inputs = prompt.get(id).and_then(|n| n.get("inputs")).and_then(Json::as_object).cloned().unwrap_or_default();
    for (name, value) in inputs.iter() {
        if let Some((from, slot)) = as_link(value) {
            let outputs = keys.get(from).and_then(|k| cache.get(k)).map(|c| c.outputs.clone());
            if let Some(outputs) = outputs {
                let len = outputs.len() as i128;
                let at = if slot < 0 { slot + len } else { slot };
                if (0..len).contains(&at) {
                    args.insert(name.clone(), Arg::Value(outputs[at as usize].clone()));
                }
            }
        } else if def.input(name).is_some() {
            args.insert(name.clone(), Arg::Literal(value.clone()));
        }
    }
    for (name, kind) in def.hidden_inputs() {
        match kind.as_str() {
            "PROMPT" => args.insert(name, Arg::Literal(Json::Object(prompt.clone()))),
            "EXTRA_PNGINFO" => args.insert(name, Arg::Literal(extra_pnginfo.cloned().unwrap_or_default())),
            _ => {}
        }
    }
    args
}
