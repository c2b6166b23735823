//! The participants: each submits its share of jobs through the gateway's
//! real HTTP API (`POST /user/N/api/prompt`), as the editor does, and cancels
//! some of them at a random point (`POST /user/N/api/jobs/ID/cancel`).
//!
//! Like a person at the editor, a participant tries again when the gateway
//! is away or says the queue is full. A submit whose answer never came (the
//! gateway or Redis was killed mid-request) may or may not have queued a job:
//! it is counted as *unanswered*, and the checks then look at every job in
//! the store, not only at the acknowledged ones.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A job the gateway acknowledged.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub user: u32,
    pub id: String,
    /// When the gateway acknowledged it (ms since the epoch).
    pub at: u64,
}

/// What the participants did, shared with the run.
#[derive(Default)]
pub struct Log {
    pub submitted: Mutex<Vec<Submitted>>,
    /// Submits that got no answer (the job may or may not exist).
    pub unanswered: Mutex<u32>,
    /// Jobs whose cancel the gateway confirmed (they had not ended yet),
    /// with when (ms since the epoch).
    pub cancelled: Mutex<Vec<(String, u64)>>,
}

/// How the participants behave.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// Longest pause between a participant's submits.
    pub think: Duration,
    /// Share of jobs their participant cancels.
    pub cancel_share: f64,
    /// Longest wait before such a cancel.
    pub cancel_after: Duration,
}

/// The access details of one participant.
#[derive(Clone)]
pub struct Participant {
    pub user: u32,
    pub code: String,
    pub gateway_url: String,
}

/// How long a participant keeps retrying one request before giving up.
const PATIENCE: Duration = Duration::from_secs(120);

/// The workflow every participant submits: two fast nodes making a small
/// PNG, so a run costs little more than gpu-task's own start.
pub fn workflow(user: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": user * 4099}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": format!("rel-u{user}")}}
    })
}

/// The node of [`workflow`] whose image is the job's one output.
pub const OUTPUT_NODE: &str = "2";

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(15)).build().expect("an HTTP client")
}

/// Submits jobs as `who` until `more` says stop (it is asked before each
/// submit with the number submitted so far); cancels some of them.
pub async fn participate(
    who: Participant,
    seed: u64,
    behaviour: Behaviour,
    log: Arc<Log>,
    mut more: impl FnMut(usize) -> bool,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let client = http();
    let mut cancels = tokio::task::JoinSet::new();
    let mut count = 0;
    while more(count) {
        let pause = rng.gen_range(Duration::ZERO..=behaviour.think);
        tokio::time::sleep(pause).await;
        let Some(id) = submit(&client, &who, &log).await else {
            tracing::warn!(user = who.user, "gave up submitting after {PATIENCE:?}");
            break;
        };
        count += 1;
        let at = dispatcher::job::now_ms();
        log.submitted.lock().unwrap().push(Submitted { user: who.user, id: id.clone(), at });
        if rng.gen_bool(behaviour.cancel_share) {
            // Half of them once the job runs, the others after a while.
            let when_running = rng.gen_bool(0.5);
            let after = rng.gen_range(Duration::ZERO..=behaviour.cancel_after);
            let (client, who, log) = (client.clone(), who.clone(), log.clone());
            cancels.spawn(async move {
                if !when_running {
                    tokio::time::sleep(after).await;
                } else if !runs(&client, &who, &id).await {
                    return;
                }
                if cancel(&client, &who, &id).await {
                    log.cancelled.lock().unwrap().push((id, dispatcher::job::now_ms()));
                }
            });
        }
    }
    while cancels.join_next().await.is_some() {}
}

/// One acknowledged submit (retrying what a person would retry); `None`
/// after [`PATIENCE`].
async fn submit(client: &reqwest::Client, who: &Participant, log: &Log) -> Option<String> {
    let url = format!("{}/user/{}/api/prompt", who.gateway_url, who.user);
    let body = json!({ "prompt": workflow(who.user), "client_id": format!("reliability-{}", who.user) });
    let give_up = Instant::now() + PATIENCE;
    while Instant::now() < give_up {
        match client.post(&url).bearer_auth(&who.code).json(&body).send().await {
            Ok(res) if res.status().is_success() => match res.json::<Value>().await {
                Ok(answer) => match answer["prompt_id"].as_str() {
                    Some(id) => return Some(id.to_string()),
                    None => tracing::error!(user = who.user, "a submit answered without a prompt_id: {answer}"),
                },
                // The answer was cut off: the job may exist.
                Err(_) => *log.unanswered.lock().unwrap() += 1,
            },
            // The queue limits: wait a moment for the own jobs to move.
            Ok(res) if res.status() == 400 || res.status() == 429 => {
                tokio::time::sleep(Duration::from_millis(800)).await;
            }
            // A server error may come after the job was stored.
            Ok(_) => *log.unanswered.lock().unwrap() += 1,
            // Refused: the request never reached a gateway.
            Err(e) if e.is_connect() => {}
            Err(_) => *log.unanswered.lock().unwrap() += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Waits until job `id` shows as running in its owner's queue
/// (`GET /user/N/api/queue`); false if it ended first or never ran.
async fn runs(client: &reqwest::Client, who: &Participant, id: &str) -> bool {
    let queue_url = format!("{}/user/{}/api/queue", who.gateway_url, who.user);
    let history_url = format!("{}/user/{}/api/history/{id}", who.gateway_url, who.user);
    let give_up = Instant::now() + PATIENCE;
    while Instant::now() < give_up {
        let get = |url: &str| client.get(url).bearer_auth(&who.code).send();
        if let Ok(queue) = get(&queue_url).await {
            if let Ok(queue) = queue.json::<Value>().await {
                let running = queue["queue_running"].as_array().cloned().unwrap_or_default();
                if running.iter().any(|entry| entry[1] == id) {
                    return true;
                }
            }
        }
        if let Ok(history) = get(&history_url).await {
            if history.json::<Value>().await.is_ok_and(|h| h.get(id).is_some()) {
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Cancels job `id` as its owner; true if the gateway said it cancelled it
/// (false: it had ended already).
async fn cancel(client: &reqwest::Client, who: &Participant, id: &str) -> bool {
    let url = format!("{}/user/{}/api/jobs/{id}/cancel", who.gateway_url, who.user);
    let give_up = Instant::now() + PATIENCE;
    while Instant::now() < give_up {
        match client.post(&url).bearer_auth(&who.code).json(&json!({})).send().await {
            Ok(res) if res.status().is_success() => {
                return res.json::<Value>().await.is_ok_and(|answer| answer["cancelled"] == true);
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}
