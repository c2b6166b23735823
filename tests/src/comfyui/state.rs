//! The server's shared state: the prompt queue, the history, the connected
//! websockets and the interrupt flag (ComfyUI's `PromptQueue`, `PromptServer`
//! sockets and `nodes.interrupt_processing`).
//!
//! Why one lock: ComfyUI's clients read meaning from message *order* (a
//! `status` after `execution_success`, `executing null` last). Every queue
//! change and the messages it causes happen under one mutex, and each socket
//! has one ordered channel, so the order a client sees is the order of the
//! changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use super::json::{Json, Map};
use super::messages::{frame, Executing, ExecutingResume, HistoryEntry, QueueInfo, QueueItem, Status};
use super::paths::Dirs;

/// ComfyUI's `MAXIMUM_HISTORY_SIZE`.
const MAXIMUM_HISTORY_SIZE: usize = 10_000;

/// Where an execution message goes: ComfyUI sends to the prompt's
/// `client_id`, or to every socket when the id is `None`.
#[derive(Clone, Copy, Debug)]
pub enum To<'a> {
    /// Every connected socket.
    All,
    /// The socket with this client id, if connected.
    Client(&'a str),
}

struct Socket {
    conn: u64,
    tx: mpsc::UnboundedSender<String>,
}

#[derive(Default)]
struct Inner {
    /// The next `number` (ComfyUI's `PromptServer.number`).
    number: i64,
    /// Pending prompts, in execution order.
    pending: Vec<QueueItem>,
    /// The running prompt.
    running: Option<QueueItem>,
    /// Finished prompts in completion order.
    history: Vec<(String, HistoryEntry)>,
    sockets: HashMap<String, Socket>,
    next_conn: u64,
    /// `client_id` of the running prompt (ComfyUI's `server.client_id`).
    client: Option<String>,
    /// The node the running prompt shows (ComfyUI's `server.last_node_id`).
    last_node: Option<String>,
}

/// State shared by the HTTP handlers, the websockets and the executor.
pub struct Shared {
    /// Where files live.
    pub dirs: Dirs,
    /// Artificial delay per executed node.
    pub node_delay: Duration,
    inner: Mutex<Inner>,
    interrupted: AtomicBool,
    interrupt_wake: Notify,
    work: Notify,
}

impl Shared {
    /// Empty state.
    pub fn new(dirs: Dirs, node_delay: Duration) -> Shared {
        Shared {
            dirs,
            node_delay,
            inner: Mutex::new(Inner::default()),
            interrupted: AtomicBool::new(false),
            interrupt_wake: Notify::new(),
            work: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not take the stand-in down with it.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the next `number` (every POST /prompt takes one, valid or not).
    pub fn next_number(&self, front: bool) -> i64 {
        let mut inner = self.lock();
        let n = inner.number;
        inner.number += 1;
        if front {
            -n
        } else {
            n
        }
    }

    /// `get_queue_info()`.
    pub fn queue_info(&self) -> QueueInfo {
        let inner = self.lock();
        QueueInfo::new(remaining(&inner))
    }

    /// Queues a prompt, tells every socket, wakes the executor.
    pub fn put(&self, item: QueueItem) {
        let mut inner = self.lock();
        let key = sort_key(&item);
        let at = inner.pending.partition_point(|p| sort_key(p) <= key);
        inner.pending.insert(at, item);
        queue_updated(&inner);
        drop(inner);
        self.work.notify_one();
    }

    /// Waits for the next prompt and marks it running. Clears the interrupt
    /// flag in the same step, so an interrupt aimed at this prompt once it
    /// shows as running is never lost.
    pub async fn take(&self) -> QueueItem {
        loop {
            {
                let mut inner = self.lock();
                if inner.running.is_none() && !inner.pending.is_empty() {
                    let item = inner.pending.remove(0);
                    inner.running = Some(item.clone());
                    inner.client = client_of(&item);
                    self.interrupted.store(false, Ordering::SeqCst);
                    queue_updated(&inner);
                    return item;
                }
            }
            self.work.notified().await;
        }
    }

    /// Sends an execution message for the running prompt.
    pub fn send<T: Serialize>(&self, kind: &str, data: &T, to: To<'_>) {
        let inner = self.lock();
        send(&inner, &frame(kind, data), to);
    }

    /// Sends `executing` for `node` and remembers it for reconnecting clients.
    pub fn send_executing(&self, client: &str, node: &str, prompt_id: &str) {
        let mut inner = self.lock();
        inner.last_node = Some(node.to_string());
        let data = Executing { node: Some(node.into()), display_node: Some(node.into()), prompt_id: prompt_id.into() };
        send(&inner, &frame("executing", &data), To::Client(client));
    }

    /// `task_done` plus `executing null`: moves the running prompt to the
    /// history, tells every socket about the queue, then tells the client
    /// its prompt is done.
    pub fn finish(&self, entry: HistoryEntry) {
        let mut inner = self.lock();
        let prompt_id = entry.prompt.prompt_id.clone();
        inner.running = None;
        inner.last_node = None;
        let client = inner.client.take();
        if inner.history.len() > MAXIMUM_HISTORY_SIZE {
            inner.history.remove(0);
        }
        // A dict assignment: a repeated prompt id keeps its place.
        match inner.history.iter_mut().find(|(id, _)| *id == prompt_id) {
            Some(slot) => slot.1 = entry,
            None => inner.history.push((prompt_id.clone(), entry)),
        }
        queue_updated(&inner);
        if let Some(client) = client {
            let done = Executing { node: None, display_node: None, prompt_id };
            send(&inner, &frame("executing", &done), To::Client(&client));
        }
        drop(inner);
        self.work.notify_one();
    }

    /// `POST /interrupt`: with a prompt id only if that prompt runs.
    pub fn interrupt(&self, prompt_id: Option<&str>) -> bool {
        let inner = self.lock();
        let hit = match prompt_id {
            Some(id) => inner.running.as_ref().is_some_and(|r| r.prompt_id == id),
            None => true,
        };
        if hit {
            self.interrupted.store(true, Ordering::SeqCst);
            self.interrupt_wake.notify_one();
        }
        hit
    }

    /// Whether an interrupt is pending (`throw_exception_if_processing_interrupted`).
    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }

    /// Waits `delay`, returning early when an interrupt arrives.
    pub async fn interruptible_delay(&self, delay: Duration) {
        if delay.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + delay;
        while !self.is_interrupted() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.interrupt_wake.notified() => {}
            }
        }
    }

    /// `GET /queue`: `(running, pending)`.
    pub fn queue(&self) -> (Vec<QueueItem>, Vec<QueueItem>) {
        let inner = self.lock();
        (inner.running.iter().cloned().collect(), inner.pending.clone())
    }

    /// `POST /queue {clear}`.
    pub fn wipe_queue(&self) {
        let mut inner = self.lock();
        inner.pending.clear();
        queue_updated(&inner);
    }

    /// `POST /queue {delete}` for one pending prompt.
    pub fn delete_queued(&self, prompt_id: &str) {
        let mut inner = self.lock();
        if let Some(at) = inner.pending.iter().position(|p| p.prompt_id == prompt_id) {
            inner.pending.remove(at);
            queue_updated(&inner);
        }
    }

    /// `GET /history?max_items=&offset=` (ComfyUI's `get_history`).
    pub fn history(&self, max_items: Option<usize>, offset: Option<i64>) -> Map<HistoryEntry> {
        let inner = self.lock();
        let len = inner.history.len() as i64;
        let mut offset = offset.unwrap_or(-1);
        if offset < 0 {
            if let Some(max) = max_items {
                offset = len - max as i64;
            }
        }
        let mut out = Map::new();
        for (i, (id, entry)) in inner.history.iter().enumerate() {
            if i as i64 >= offset {
                out.insert(id.clone(), entry.clone());
                if max_items.is_some_and(|max| out.len() >= max) {
                    break;
                }
            }
        }
        out
    }

    /// `GET /history/{id}`.
    pub fn history_of(&self, prompt_id: &str) -> Option<HistoryEntry> {
        self.lock().history.iter().find(|(id, _)| id == prompt_id).map(|(_, e)| e.clone())
    }

    /// `POST /history {clear}`.
    pub fn wipe_history(&self) {
        self.lock().history.clear();
    }

    /// `POST /history {delete}` for one prompt.
    pub fn delete_history(&self, prompt_id: &str) {
        self.lock().history.retain(|(id, _)| id != prompt_id);
    }

    /// Registers a websocket under `sid`, replacing an older one, and queues
    /// the greeting: `status` with the sid, and `executing` if this client's
    /// prompt is running.
    pub fn connect(&self, sid: &str) -> (u64, mpsc::UnboundedReceiver<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        inner.next_conn += 1;
        let conn = inner.next_conn;
        let status = Status { status: QueueInfo::new(remaining(&inner)), sid: Some(sid.to_string()) };
        let _ = tx.send(frame("status", &status));
        if inner.client.as_deref() == Some(sid) {
            if let Some(node) = inner.last_node.clone() {
                let _ = tx.send(frame("executing", &ExecutingResume { node }));
            }
        }
        inner.sockets.insert(sid.to_string(), Socket { conn, tx });
        (conn, rx)
    }

    /// Queues a message for one connection (the `feature_flags` answer).
    pub fn reply<T: Serialize>(&self, sid: &str, conn: u64, kind: &str, data: &T) {
        let inner = self.lock();
        if let Some(socket) = inner.sockets.get(sid).filter(|s| s.conn == conn) {
            let _ = socket.tx.send(frame(kind, data));
        }
    }

    /// Forgets a closed websocket, unless a newer one took its client id.
    pub fn disconnect(&self, sid: &str, conn: u64) {
        let mut inner = self.lock();
        if inner.sockets.get(sid).is_some_and(|s| s.conn == conn) {
            inner.sockets.remove(sid);
        }
    }
}

/// Pending plus running.
fn remaining(inner: &Inner) -> usize {
    inner.pending.len() + usize::from(inner.running.is_some())
}

/// `queue_updated()`: a `status` without sid to every socket.
fn queue_updated(inner: &Inner) {
    let status = Status { status: QueueInfo::new(remaining(inner)), sid: None };
    send(inner, &frame("status", &status), To::All);
}

fn send(inner: &Inner, text: &str, to: To<'_>) {
    match to {
        To::All => {
            for socket in inner.sockets.values() {
                let _ = socket.tx.send(text.to_string());
            }
        }
        To::Client(sid) => {
            if let Some(socket) = inner.sockets.get(sid) {
                let _ = socket.tx.send(text.to_string());
            }
        }
    }
}

/// The heap order of ComfyUI's queue: by number, then by prompt id.
fn sort_key(item: &QueueItem) -> (OrderedF64, String) {
    let n = match &item.number {
        Json::Number(n) => n.as_f64().unwrap_or(0.0),
        _ => 0.0,
    };
    (OrderedF64(n), item.prompt_id.clone())
}

/// The client a prompt's messages go to. A non-string `client_id` (which
/// ComfyUI would keep as is) matches no socket.
pub fn client_of(item: &QueueItem) -> Option<String> {
    match item.extra_data.get("client_id") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(other) => Some(format!("\u{0}{other}")),
    }
}

/// An `f64` with a total order, for sorting the queue.
#[derive(Clone, Copy, Debug)]
struct OrderedF64(f64);

impl PartialEq for OrderedF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for OrderedF64 {}

impl PartialOrd for OrderedF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A handle type so callers can share the state.
pub type State = Arc<Shared>;
