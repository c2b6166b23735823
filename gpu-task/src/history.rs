//! Reading ComfyUI's verdict on a prompt.
//!
//! ComfyUI's `GET /history/{prompt_id}` entry is the authoritative end of a
//! prompt: it says whether it succeeded, why not (its `status.messages`
//! replay `execution_error` / `execution_interrupted`), and which files each
//! node produced. The websocket says the same things as they happen, but a
//! socket can drop a message; the history cannot. This module turns both into
//! the few facts gpu-task acts on. Pure functions, tested against recordings
//! of a real ComfyUI (`shared/comfyui-samples/`).

use serde_json::Value;

/// One file a node produced, as ComfyUI lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// The node that produced it.
    pub node: String,
    /// The kind of output (`images`, `gifs`, `audio`, `video`, ...).
    pub kind: String,
    /// Its position in the node's list of that kind.
    pub index: u32,
    pub filename: String,
    pub subfolder: String,
    /// ComfyUI's folder type: `output`, `temp` (previews) or `input`.
    pub folder_type: String,
}

impl OutputFile {
    /// Whether the file is a result worth keeping: saved outputs are, temp
    /// previews and echoed inputs are not.
    pub fn is_saved_output(&self) -> bool {
        self.folder_type == "output"
    }

    /// Whether gpu-task uploads the file to the gateway: saved outputs and
    /// temp previews (`PreviewImage`, which the editor shows), not echoed inputs.
    pub fn is_uploaded(&self) -> bool {
        self.is_saved_output() || self.folder_type == "temp"
    }
}

/// How ComfyUI says a prompt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// `execution_error`: the one-line reason.
    Error(String),
    Interrupted,
    /// Ended without success and without saying why.
    Unknown(String),
}

/// What one history entry says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub outcome: Outcome,
    /// `status.messages`: `[event, data]` pairs.
    pub messages: Vec<Value>,
    /// Every file listed in `outputs`, in node order.
    pub outputs: Vec<OutputFile>,
}

/// The entry for `prompt_id` in a `GET /history/{prompt_id}` answer
/// (`{}` while the prompt has not ended).
pub fn entry<'a>(answer: &'a Value, prompt_id: &str) -> Option<&'a Value> {
    answer.get(prompt_id).filter(|e| e.is_object())
}

/// Reads one history entry.
pub fn verdict(entry: &Value) -> Verdict {
    let status = &entry["status"];
    let messages = status["messages"].as_array().cloned().unwrap_or_default();
    let status_str = status["status_str"].as_str().unwrap_or("");
    let outcome = if status_str == "success" {
        Outcome::Success
    } else {
        outcome_from_messages(&messages).unwrap_or_else(|| {
            Outcome::Unknown(format!(
                "ComfyUI ended the prompt without success (status {:?}, completed {})",
                status_str,
                status["completed"].as_bool().unwrap_or(false)
            ))
        })
    };
    Verdict { outcome, messages, outputs: outputs(&entry["outputs"]) }
}

/// The failure an `[event, data]` list reports, if any.
fn outcome_from_messages(messages: &[Value]) -> Option<Outcome> {
    messages.iter().find_map(|m| match m[0].as_str()? {
        "execution_error" => Some(Outcome::Error(execution_error_line(&m[1]))),
        "execution_interrupted" => Some(Outcome::Interrupted),
        _ => None,
    })
}

/// `<node_type> (node <id>): <exception_message>`, on one line, from an
/// `execution_error` message's data.
pub fn execution_error_line(data: &Value) -> String {
    let node_type = data["node_type"].as_str().unwrap_or("unknown node");
    let node_id = match &data["node_id"] {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    };
    let message = data["exception_message"].as_str().unwrap_or("").trim();
    let message = if message.is_empty() {
        data["exception_type"].as_str().unwrap_or("failed").to_string()
    } else {
        message.to_string()
    };
    one_line(&format!("{node_type} (node {node_id}): {message}"))
}

/// Every file in a history entry's `outputs` (`{node: {kind: [file, ...]}}`),
/// sorted by node id (numerically where the ids are numbers).
pub fn outputs(outputs: &Value) -> Vec<OutputFile> {
    let Some(nodes) = outputs.as_object() else { return Vec::new() };
    let mut ids: Vec<&String> = nodes.keys().collect();
    ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.to_string()));
    ids.into_iter().flat_map(|id| node_outputs(id, &nodes[id.as_str()])).collect()
}

/// The files in one node's output (a history `outputs[node]`, or the
/// `output` of an `executed` message). Kinds that are not lists of files
/// (`animated: [true]`, `text: ["..."]`) are skipped.
pub fn node_outputs(node: &str, output: &Value) -> Vec<OutputFile> {
    let Some(kinds) = output.as_object() else { return Vec::new() };
    let mut files = Vec::new();
    for (kind, list) in kinds {
        let Some(list) = list.as_array() else { continue };
        for (index, item) in list.iter().enumerate() {
            let Some(filename) = item.get("filename").and_then(Value::as_str) else { continue };
            files.push(OutputFile {
                node: node.to_string(),
                kind: kind.clone(),
                index: index as u32,
                filename: filename.to_string(),
                subfolder: item.get("subfolder").and_then(Value::as_str).unwrap_or("").to_string(),
                folder_type: item.get("type").and_then(Value::as_str).unwrap_or("output").to_string(),
            });
        }
    }
    files
}

/// `text` with its whitespace runs (newlines included) made single spaces,
/// cut to a length that fits a log line.
pub fn one_line(text: &str) -> String {
    const MAX: usize = 600;
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.chars().count() <= MAX {
        joined
    } else {
        let mut cut: String = joined.chars().take(MAX).collect();
        cut.push('…');
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Value {
        let path = format!("{}/../tests/fixtures/comfyui-samples/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn only_entry(answer: &Value) -> (&String, &Value) {
        answer.as_object().unwrap().iter().next().unwrap()
    }

    #[test]
    fn fresh_run_succeeds_with_one_png() {
        let answer = sample("fresh.history.json");
        let (id, _) = only_entry(&answer);
        let v = verdict(entry(&answer, id).unwrap());
        assert_eq!(v.outcome, Outcome::Success);
        assert_eq!(v.messages.len(), 3);
        assert_eq!(v.messages[0][0], "execution_start");
        assert_eq!(
            v.outputs,
            [OutputFile {
                node: "7".into(),
                kind: "images".into(),
                index: 0,
                filename: "smoke_00002_.png".into(),
                subfolder: "".into(),
                folder_type: "output".into(),
            }]
        );
        assert!(v.outputs[0].is_saved_output());
    }

    #[test]
    fn cached_run_still_lists_the_earlier_file() {
        let answer = sample("cached.history.json");
        let (_, e) = only_entry(&answer);
        let v = verdict(e);
        assert_eq!(v.outcome, Outcome::Success);
        assert_eq!(v.outputs.len(), 1);
        assert_eq!(v.outputs[0].filename, "smoke_00002_.png");
    }

    #[test]
    fn interrupted_run_has_no_outputs() {
        let answer = sample("interrupted.history.json");
        let (_, e) = only_entry(&answer);
        let v = verdict(e);
        assert_eq!(v.outcome, Outcome::Interrupted);
        assert!(v.outputs.is_empty());
        assert_eq!(v.messages.last().unwrap()[0], "execution_interrupted");
    }

    #[test]
    fn not_ended_yet_is_no_entry() {
        let answer: Value = serde_json::json!({});
        assert!(entry(&answer, "x").is_none());
    }

    #[test]
    fn execution_error_is_one_line() {
        let entry = serde_json::json!({
            "outputs": {},
            "status": {"status_str": "error", "completed": false, "messages": [
                ["execution_start", {"prompt_id": "p", "timestamp": 1}],
                ["execution_error", {
                    "prompt_id": "p", "node_id": "4", "node_type": "KSampler",
                    "executed": ["1"], "exception_type": "torch.OutOfMemoryError",
                    "exception_message": "CUDA out of memory.\nTried to allocate 2.00 GiB",
                    "traceback": ["..."], "current_inputs": {}, "current_outputs": [], "timestamp": 2
                }]
            ]}
        });
        let v = verdict(&entry);
        assert_eq!(
            v.outcome,
            Outcome::Error("KSampler (node 4): CUDA out of memory. Tried to allocate 2.00 GiB".into())
        );
        let bare = serde_json::json!({"node_id": 9, "exception_type": "ValueError"});
        assert_eq!(execution_error_line(&bare), "unknown node (node 9): ValueError");
    }

    #[test]
    fn unknown_failure_says_the_status() {
        let entry =
            serde_json::json!({"status": {"status_str": "error", "completed": false, "messages": []}});
        match verdict(&entry).outcome {
            Outcome::Unknown(why) => assert!(why.contains("\"error\""), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_kind_of_file_list_counts_and_others_are_skipped() {
        let outputs_json = serde_json::json!({
            "12": {"gifs": [{"filename": "v_00001.mp4", "subfolder": "vid", "type": "output", "format": "video/h264-mp4"}]},
            "3": {
                "images": [
                    {"filename": "ComfyUI_temp_a_00001_.png", "subfolder": "", "type": "temp"},
                    {"filename": "keep_00001_.png", "subfolder": "", "type": "output"}
                ],
                "animated": [false],
                "text": ["hello"]
            },
            "9:2": {"audio": [{"filename": "a.flac", "subfolder": "audio", "type": "output"}]}
        });
        let files = outputs(&outputs_json);
        let names: Vec<_> =
            files.iter().map(|f| (f.node.as_str(), f.kind.as_str(), f.index, f.filename.as_str())).collect();
        assert_eq!(
            names,
            [
                ("3", "images", 0, "ComfyUI_temp_a_00001_.png"),
                ("3", "images", 1, "keep_00001_.png"),
                ("12", "gifs", 0, "v_00001.mp4"),
                ("9:2", "audio", 0, "a.flac"),
            ]
        );
        let saved: Vec<_> =
            files.iter().filter(|f| f.is_saved_output()).map(|f| f.filename.as_str()).collect();
        assert_eq!(saved, ["keep_00001_.png", "v_00001.mp4", "a.flac"]);
        assert!(files[0].is_uploaded(), "temp previews are uploaded too");
        assert_eq!(files[2].subfolder, "vid");
    }

    #[test]
    fn one_line_collapses_and_cuts() {
        assert_eq!(one_line(" a\n b\t\tc "), "a b c");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), 601);
    }
}
