//! The editor's websocket, `GET /user/{n}/ws`, through the whole stack: the
//! gateway speaks ComfyUI's protocol to each participant about their own
//! jobs only (`shared/comfyui-api.md` B.3 and 9.2, `gateway::ws`).
//!
//! Messages come from real gpu-task processes relaying the ComfyUI
//! stand-in's websocket; tests wait on messages (with deadlines as a guard
//! against hanging), never on sleeps.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use comfy_multi_tests::comfyui::model_free_workflow;
use comfy_multi_tests::stack::{start, Executor, Stack, StackOptions, ADMIN_TOKEN, INTERNAL_SECRET};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

/// The longest any single message may take to come.
const MESSAGE_DEADLINE: Duration = Duration::from_secs(90);

fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/comfyui-samples/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))).unwrap()
}

fn ws_url(stack: &Stack, user: u32, client_id: Option<&str>) -> String {
    let base = stack.gateway_url.replacen("http://", "ws://", 1);
    match client_id {
        Some(id) => format!("{base}/user/{user}/ws?clientId={id}"),
        None => format!("{base}/user/{user}/ws"),
    }
}

/// The model-free workflow with its own colour, so ComfyUI never answers it
/// from its cache.
fn fresh_workflow() -> Value {
    let mut w = model_free_workflow();
    w["1"]["inputs"]["color"] = json!(rand::random::<u32>() % 0xFF_FFFF);
    w
}

/// One editor's socket.
struct Socket {
    user: u32,
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Socket {
    /// Connects as participant `user` with their code as bearer.
    async fn connect(stack: &Stack, user: u32, client_id: Option<&str>) -> Socket {
        let mut request = ws_url(stack, user, client_id).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", stack.code(user)).parse().unwrap());
        let (stream, response) = connect_async(request).await.unwrap_or_else(|e| panic!("user {user}: {e}"));
        assert_eq!(response.status(), 101);
        Socket { user, stream }
    }

    /// The next JSON message.
    async fn next(&mut self) -> Value {
        loop {
            let next = tokio::time::timeout(MESSAGE_DEADLINE, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("user {}: no message for {MESSAGE_DEADLINE:?}", self.user));
            let frame = match next {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => panic!("user {}: {e}", self.user),
                None => panic!("user {}: the socket closed", self.user),
            };
            match frame {
                Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
                Message::Binary(_) => panic!("user {}: unexpected binary frame", self.user),
                Message::Close(c) => panic!("user {}: closed: {c:?}", self.user),
                _ => {}
            }
        }
    }

    /// The next binary frame; JSON messages before it are passed to `text`.
    async fn next_binary(&mut self, mut text: impl FnMut(Value)) -> Vec<u8> {
        loop {
            let next = tokio::time::timeout(MESSAGE_DEADLINE, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("user {}: no binary frame for {MESSAGE_DEADLINE:?}", self.user));
            match next {
                Some(Ok(Message::Binary(frame))) => return frame.to_vec(),
                Some(Ok(Message::Text(t))) => text(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(c))) => panic!("user {}: closed: {c:?}", self.user),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("user {}: {e}", self.user),
                None => panic!("user {}: the socket closed", self.user),
            }
        }
    }

    async fn send(&mut self, message: Value) {
        self.stream.send(Message::Text(message.to_string().into())).await.unwrap();
    }

    /// The connect `status`: returns the sid.
    async fn hello(&mut self, remaining: u64) -> String {
        let hello = self.next().await;
        assert_eq!(hello["type"], "status", "{hello}");
        assert_eq!(hello["data"]["status"]["exec_info"]["queue_remaining"], remaining, "{hello}");
        hello["data"]["sid"].as_str().expect("a sid on connect").to_string()
    }

    /// Every message up to and including the `executing` with `node: null`
    /// of `prompt_id`.
    async fn until_end(&mut self, prompt_id: &str) -> Vec<Value> {
        let mut got = Vec::new();
        loop {
            let m = self.next().await;
            let end = is_end(&m, prompt_id);
            got.push(m);
            if end {
                return got;
            }
        }
    }
}

fn is_end(m: &Value, prompt_id: &str) -> bool {
    m["type"] == "executing" && m["data"]["node"].is_null() && m["data"]["prompt_id"] == prompt_id
}

/// The execution messages as `type` or `type:node`, without `status` and
/// without the progress messages gpu-task may thin out under load.
fn signature(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| !matches!(m["type"].as_str(), Some("status" | "feature_flags" | "progress" | "progress_state")))
        .filter(|m| m.get("data").is_some())
        .map(|m| {
            let kind = m["type"].as_str().unwrap_or("?");
            match kind {
                "executing" | "executed" => format!("{kind}:{}", m["data"]["node"].as_str().unwrap_or("null")),
                _ => kind.to_string(),
            }
        })
        .collect()
}

fn prompt_ids(messages: &[Value]) -> HashSet<String> {
    messages.iter().filter_map(|m| m["data"]["prompt_id"].as_str().map(str::to_string)).collect()
}

fn statuses(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m["type"] == "status")
        .map(|m| m["data"]["status"]["exec_info"]["queue_remaining"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn the_editor_socket_speaks_comfyuis_protocol_to_each_participant_alone() {
    let stack = start(StackOptions { node_delay: Duration::from_millis(30), ..StackOptions::new(Executor::Local) }).await;

    // No credentials, or a wrong code: 401, and no upgrade.
    for auth in [None, Some("Bearer nope-nope-nope")] {
        let mut request = ws_url(&stack, 2, None).into_client_request().unwrap();
        if let Some(a) = auth {
            request.headers_mut().insert("authorization", a.parse().unwrap());
        }
        match connect_async(request).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401, "{auth:?}"),
            Err(e) => panic!("{auth:?}: {e}"),
            Ok(_) => panic!("{auth:?}: the socket opened"),
        }
    }
    // Participant 2's code does not open participant 3's socket.
    let mut request = ws_url(&stack, 3, None).into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {}", stack.code(2)).parse().unwrap());
    assert!(matches!(connect_async(request).await, Err(tungstenite::Error::Http(r)) if r.status() == 401));

    // A made-up client id is replaced; the status carries the user's own count.
    let mut two = Socket::connect(&stack, 2, Some("0123456789abcdef0123456789abcdef")).await;
    let sid = two.hello(0).await;
    assert_ne!(sid, "0123456789abcdef0123456789abcdef");
    assert_eq!(sid.len(), 32, "{sid}");
    // The client's first message, feature_flags, is answered with the server's.
    two.send(json!({ "type": "feature_flags", "data": { "supports_preview_metadata": true, "max_upload_size": 1 } }))
        .await;
    let flags = two.next().await;
    assert_eq!(flags, json!({ "type": "feature_flags", "data": fixture("get-features.json")["body"] }));

    // Participant 2 keeps its id when reconnecting; participant 3 cannot take it.
    let mut again = Socket::connect(&stack, 2, Some(&sid)).await;
    assert_eq!(again.hello(0).await, sid);
    drop(again);
    let mut three = Socket::connect(&stack, 3, Some(&sid)).await;
    let three_sid = three.hello(0).await;
    assert_ne!(three_sid, sid, "participant 3 got participant 2's client id");

    // A job of 2: its messages reach 2's socket, tagged with the job id, in
    // the order ComfyUI sends them.
    let job = stack.submit(2, json!({ "prompt": fresh_workflow(), "client_id": sid })).await;
    let messages = two.until_end(&job).await;
    assert_eq!(prompt_ids(&messages), HashSet::from([job.clone()]), "{messages:#?}");
    let recorded = fixture("fresh.ws-transcript.json");
    let recorded: Vec<Value> = recorded.as_array().unwrap().iter().filter(|m| m.get("type").is_some()).cloned().collect();
    assert_eq!(signature(&messages), signature(&recorded), "{messages:#?}");
    assert_eq!(signature(&messages).first().map(String::as_str), Some("execution_start"));
    let counts = statuses(&messages);
    assert_eq!(counts.first(), Some(&1), "a status right after the submit: {messages:#?}");
    // After the end, the user's queue is empty again.
    let after = two.next().await;
    assert_eq!(after["type"], "status", "{after}");
    assert_eq!(after["data"]["status"]["exec_info"]["queue_remaining"], 0);
    assert!(after["data"].get("sid").is_none());

    // `executed` names the file where the gateway serves it, and it is there.
    let executed = messages.iter().find(|m| m["type"] == "executed").unwrap();
    let image = &executed["data"]["output"]["images"][0];
    assert_eq!(image["subfolder"], job.as_str(), "{executed}");
    assert_eq!(image["type"], "output");
    let view = format!("view?filename={}&subfolder={job}&type=output", image["filename"].as_str().unwrap());
    let png = stack.get(2, &view).send().await.unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");

    // Participant 3's socket got none of it: its own job's messages are the
    // first (the gateway relays in order, so anything of 2's would come first).
    let job3 = stack.submit(3, json!({ "prompt": fresh_workflow(), "client_id": three_sid })).await;
    let messages3 = three.until_end(&job3).await;
    assert_eq!(prompt_ids(&messages3), HashSet::from([job3.clone()]), "{messages3:#?}");
    assert_eq!(signature(&messages3).first().map(String::as_str), Some("execution_start"));

    // A job ComfyUI refuses: gpu-task relays nothing, the gateway still ends
    // the prompt for the editor, with the reason.
    let mut refused = fresh_workflow();
    refused["5"]["inputs"]["x"] = json!(100_000);
    let bad = stack.submit(2, json!({ "prompt": refused })).await;
    let messages = two.until_end(&bad).await;
    assert_eq!(prompt_ids(&messages), HashSet::from([bad.clone()]), "{messages:#?}");
    let error = messages.iter().find(|m| m["type"] == "execution_error").expect("an execution_error");
    assert!(!error["data"]["exception_message"].as_str().unwrap().is_empty(), "{error}");
    assert_eq!(statuses(&messages).last(), Some(&0), "{messages:#?}");
    let history = stack.finished(2, &bad).await;
    assert_eq!(history["status"]["status_str"], "error");

    // A job cancelled while it waits: only the count changes, as in ComfyUI.
    let paused = reqwest::Client::new()
        .post(format!("{}/admin/api/pause", stack.gateway_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "reason": "test" }))
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success(), "{}", paused.text().await.unwrap());
    let waiting = stack.submit(2, json!({ "prompt": fresh_workflow() })).await;
    assert_eq!(statuses(&[two.next().await]), [1]);
    let cancel = reqwest::Client::new()
        .post(format!("{}/user/2/api/queue", stack.gateway_url))
        .bearer_auth(stack.code(2))
        .json(&json!({ "delete": [waiting] }))
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
    let after = two.next().await;
    assert_eq!(statuses(std::slice::from_ref(&after)), [0], "{after}");
}

#[tokio::test]
async fn a_hundred_editors_each_get_their_own_progress_and_nobody_elses() {
    let stack = start(StackOptions {
        node_delay: Duration::from_millis(5),
        participants: 100,
        ..StackOptions::new(Executor::Local)
    })
    .await;
    let stack = std::sync::Arc::new(stack);

    // 100 sockets, one per participant.
    let mut sockets = Vec::new();
    for chunk in (1..=100u32).collect::<Vec<_>>().chunks(20) {
        let opened = futures_util::future::join_all(chunk.iter().map(|&n| {
            let stack = stack.clone();
            async move {
                let mut s = Socket::connect(&stack, n, None).await;
                let sid = s.hello(0).await;
                (s, sid)
            }
        }))
        .await;
        sockets.extend(opened);
    }
    let sids: HashSet<&String> = sockets.iter().map(|(_, sid)| sid).collect();
    assert_eq!(sids.len(), 100, "every socket has its own client id");

    // Several jobs from several participants, some two each.
    let submitters = [3u32, 17, 42, 58, 99, 17, 99, 64];
    let mut jobs: HashMap<u32, Vec<String>> = HashMap::new();
    for &user in &submitters {
        let id = stack.submit(user, json!({ "prompt": fresh_workflow() })).await;
        jobs.entry(user).or_default().push(id);
    }

    // Every socket reads until it has seen the end of each of its jobs and
    // then a `status` with something queued: the sentinel submitted below,
    // after every job ended. The gateway fans out in Redis's order, so
    // anything of someone else's would have come before it.
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(mut socket, _)| {
            let own = jobs.get(&socket.user).cloned().unwrap_or_default();
            tokio::spawn(async move {
                let mut ended: HashSet<String> = HashSet::new();
                let mut got = Vec::new();
                loop {
                    let m = socket.next().await;
                    if m["type"] == "executing" && m["data"]["node"].is_null() {
                        ended.insert(m["data"]["prompt_id"].as_str().unwrap_or_default().to_string());
                    }
                    let sentinel = m["type"] == "status"
                        && m["data"]["status"]["exec_info"]["queue_remaining"].as_u64() >= Some(1)
                        && own.iter().all(|id| ended.contains(id));
                    got.push(m);
                    if sentinel {
                        return (socket.user, got);
                    }
                }
            })
        })
        .collect();

    for (user, ids) in &jobs {
        for id in ids {
            let entry = stack.finished(*user, id).await;
            assert_eq!(entry["status"]["status_str"], "success", "{entry:#}");
        }
    }
    // The sentinel: with dispatching paused, every participant queues one.
    let paused = reqwest::Client::new()
        .post(format!("{}/admin/api/pause", stack.gateway_url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "reason": "test" }))
        .send()
        .await
        .unwrap();
    assert!(paused.status().is_success());
    for user in 1..=100 {
        stack.submit(user, json!({ "prompt": fresh_workflow() })).await;
    }

    for reader in readers {
        let (user, got) = reader.await.unwrap();
        let own: HashSet<String> = jobs.get(&user).cloned().unwrap_or_default().into_iter().collect();
        assert_eq!(prompt_ids(&got), own, "participant {user} got others' messages (or missed its own): {got:#?}");
        for id in &own {
            let mine: Vec<Value> = got.iter().filter(|m| m["data"]["prompt_id"] == id.as_str()).cloned().collect();
            let sig = signature(&mine);
            assert_eq!(sig.first().map(String::as_str), Some("execution_start"), "{user} {id}: {sig:?}");
            assert_eq!(sig.last().map(String::as_str), Some("executing:null"), "{user} {id}: {sig:?}");
            assert!(sig.contains(&"executed:7".to_string()), "{user} {id}: {sig:?}");
            assert!(sig.contains(&"execution_success".to_string()), "{user} {id}: {sig:?}");
        }
    }
}

/// A preview frame (type 4) gpu-task posts for a running job reaches its
/// participant's sockets as a binary frame with the job id as `prompt_id`,
/// and nobody else's.
#[tokio::test]
async fn previews_reach_their_participant_alone() {
    let stack = start(StackOptions { node_delay: Duration::from_secs(2), ..StackOptions::new(Executor::Local) }).await;
    let mut two = Socket::connect(&stack, 2, None).await;
    two.hello(0).await;
    let mut three = Socket::connect(&stack, 3, None).await;
    three.hello(0).await;

    let job = stack.submit(2, json!({ "prompt": fresh_workflow() })).await;
    loop {
        let m = two.next().await;
        if m["type"] == "execution_start" {
            break;
        }
    }

    let meta = json!({ "node_id": "2", "display_node_id": "2", "parent_node_id": null, "real_node_id": "2",
        "prompt_id": "comfyuis-own-prompt-id", "image_type": "image/jpeg" })
    .to_string();
    let mut frame = 4u32.to_be_bytes().to_vec();
    frame.extend((meta.len() as u32).to_be_bytes());
    frame.extend(meta.as_bytes());
    frame.extend(b"\xff\xd8\xff\xe0jpeg");
    let internal = |path: &str| format!("{}/_internal/jobs/{job}/{path}", stack.gateway_url);
    let http = reqwest::Client::new();
    // Without the secret: refused.
    let refused = http.post(internal("preview")).body(frame.clone()).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let posted = http
        .post(internal("preview"))
        .header("x-comfy-multi-secret", INTERNAL_SECRET)
        .body(frame.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 204, "{}", posted.text().await.unwrap());

    let got = two.next_binary(|m| assert_eq!(m["data"]["prompt_id"].as_str().unwrap_or(job.as_str()), job)).await;
    assert_eq!(&got[..4], &4u32.to_be_bytes());
    let len = u32::from_be_bytes(got[4..8].try_into().unwrap()) as usize;
    let got_meta: Value = serde_json::from_slice(&got[8..8 + len]).unwrap();
    assert_eq!(got_meta["prompt_id"], job.as_str());
    assert_eq!(got_meta["node_id"], "2");
    assert_eq!(&got[8 + len..], b"\xff\xd8\xff\xe0jpeg");

    // Participant 3: the status of its own submit comes first (the gateway
    // fans out in Redis's order), with no binary frame before it.
    stack.submit(3, json!({ "prompt": fresh_workflow() })).await;
    let status = three.next().await;
    assert_eq!(status["type"], "status", "{status}");
}
