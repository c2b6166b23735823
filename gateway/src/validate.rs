//! Checks a submitted prompt before anything is stored.
//!
//! What can be known without running it: the prompt is an object of nodes,
//! each with a `class_type` the GPU node's ComfyUI has (when the gateway
//! knows its node types, from the cached `object_info`) and `inputs`; every
//! link points at a node that exists; the links have no cycle. Value ranges
//! are ComfyUI's to check (a job it refuses ends `failed` with ComfyUI's own
//! message). Errors use the types and shapes ComfyUI uses for the same
//! mistakes.

use std::collections::{HashMap, HashSet};

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Validates `prompt` (ComfyUI API format); `node_types`: the node types
/// ComfyUI has, when known.
pub fn prompt(prompt: &Value, node_types: Option<&HashSet<String>>) -> Result<(), ApiError> {
    let nodes = prompt.as_object().ok_or_else(|| {
        ApiError::bad_request("invalid_prompt", "the prompt must be an object of nodes: {\"id\": {\"class_type\", \"inputs\"}}")
    })?;
    if nodes.is_empty() {
        return Err(ApiError::bad_request("prompt_no_outputs", "Prompt has no nodes"));
    }
    let mut node_errors = Map::new();
    for (id, node) in nodes {
        let class_type = node.get("class_type").and_then(Value::as_str);
        let Some(class_type) = class_type else {
            return Err(ApiError::BadRequest {
                kind: "invalid_prompt",
                message: "Cannot execute because a node is missing the class_type property.".into(),
                details: format!("Node ID '#{id}'"),
            });
        };
        if node_types.is_some_and(|known| !known.contains(class_type)) {
            return Err(ApiError::BadRequest {
                kind: "invalid_prompt",
                message: format!("Cannot execute because node {class_type} does not exist."),
                details: format!("Node ID '#{id}'"),
            });
        }
        let inputs = match node.get("inputs") {
            None => continue,
            Some(Value::Object(inputs)) => inputs,
            Some(_) => {
                return Err(ApiError::BadRequest {
                    kind: "invalid_prompt",
                    message: format!("Node {class_type} has inputs that are not an object."),
                    details: format!("Node ID '#{id}'"),
                })
            }
        };
        let mut errors = Vec::new();
        for (input, value) in inputs {
            if let Some((target, _slot)) = link(value) {
                if !nodes.contains_key(target) {
                    errors.push(json!({
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": format!("'{target}'"),
                        "extra_info": {
                            "input_name": input,
                            "exception_message": format!("input {input} links to node {target}, which is not in the prompt"),
                            "exception_type": "KeyError",
                            "linked_node": value,
                        },
                    }));
                }
            }
        }
        if !errors.is_empty() {
            node_errors.insert(
                id.clone(),
                json!({ "errors": errors, "dependent_outputs": [], "class_type": class_type }),
            );
        }
    }
    if !node_errors.is_empty() {
        return Err(ApiError::InvalidPrompt {
            kind: "prompt_outputs_failed_validation",
            message: "Prompt outputs failed validation".into(),
            details: String::new(),
            node_errors: Value::Object(node_errors),
        });
    }
    match cycle(nodes) {
        None => Ok(()),
        Some(cycle) => {
            let path: Vec<String> = cycle.iter().map(|id| format!("#{id}")).collect();
            Err(ApiError::BadRequest {
                kind: "invalid_prompt",
                message: format!(
                    "Cannot execute because the prompt's links form a cycle: {} (a node cannot depend on its own output).",
                    path.join(" → ")
                ),
                details: format!("Node ID '#{}'", cycle[0]),
            })
        }
    }
}

/// A cycle of links, as the node ids along it (the first again at the
/// end), if there is one. Iterative, so a prompt of any length is fine.
fn cycle(nodes: &Map<String, Value>) -> Option<Vec<&str>> {
    let links = |id: &str| -> Vec<&str> {
        let inputs = nodes.get(id).and_then(|n| n.get("inputs")).and_then(Value::as_object);
        inputs.into_iter().flat_map(|i| i.values()).filter_map(link).map(|(target, _)| target).collect()
    };
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    for start in nodes.keys() {
        if marks.contains_key(start.as_str()) {
            continue;
        }
        // The path from `start`, each node with the links still to follow.
        let mut path: Vec<(&str, Vec<&str>)> = vec![(start.as_str(), links(start))];
        marks.insert(start.as_str(), Mark::Open);
        while let Some((_, pending)) = path.last_mut() {
            match pending.pop() {
                Some(next) => match marks.get(next) {
                    Some(Mark::Open) => {
                        let from = path.iter().position(|(id, _)| *id == next).expect("an open node is on the path");
                        let mut cycle: Vec<&str> = path[from..].iter().map(|(id, _)| *id).collect();
                        cycle.push(next);
                        return Some(cycle);
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(next, Mark::Open);
                        path.push((next, links(next)));
                    }
                },
                None => {
                    let (done, _) = path.pop().expect("the path is not empty");
                    marks.insert(done, Mark::Done);
                }
            }
        }
    }
    None
}

/// A link is `["node id", output slot]`.
fn link(value: &Value) -> Option<(&str, u64)> {
    match value.as_array()?.as_slice() {
        [Value::String(node), Value::Number(slot)] => Some((node, slot.as_u64()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_prompt_passes() {
        let p = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}},
                       "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}});
        prompt(&p, None).unwrap();
        let known: HashSet<String> = ["EmptyImage".to_string(), "SaveImage".to_string()].into();
        prompt(&p, Some(&known)).unwrap();
    }

    #[test]
    fn unknown_types_and_cycles_are_named() {
        let known: HashSet<String> = ["EmptyImage".to_string(), "SaveImage".to_string()].into();
        let p = json!({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "NoSuchNode", "inputs": {}}});
        let err = prompt(&p, Some(&known)).unwrap_err();
        assert_eq!(err.to_string(), "Cannot execute because node NoSuchNode does not exist.");
        prompt(&p, None).unwrap();

        let p = json!({"1": {"class_type": "A", "inputs": {"x": ["3", 0]}},
                       "2": {"class_type": "B", "inputs": {"x": ["1", 0]}},
                       "3": {"class_type": "C", "inputs": {"x": ["2", 0], "y": 1}},
                       "4": {"class_type": "D", "inputs": {"x": ["3", 0]}}});
        let err = prompt(&p, None).unwrap_err().to_string();
        assert!(err.contains("#1 → #3 → #2 → #1"), "{err}");
        assert!(prompt(&json!({"1": {"class_type": "A", "inputs": {"x": ["1", 0]}}}), None).unwrap_err().to_string().contains("#1 → #1"));
        // A long chain is no cycle, and needs no deep recursion.
        let mut chain = Map::new();
        for i in 0..20_000 {
            chain.insert(i.to_string(), json!({"class_type": "A", "inputs": {"x": [(i + 1).to_string(), 0]}}));
        }
        chain.insert("20000".into(), json!({"class_type": "A", "inputs": {}}));
        prompt(&Value::Object(chain), None).unwrap();
    }

    #[test]
    fn bad_prompts_are_named() {
        assert!(prompt(&json!([1, 2]), None).is_err());
        assert!(prompt(&json!({}), None).is_err());
        assert!(prompt(&json!({"1": {"inputs": {}}}), None).is_err());
        let err = prompt(&json!({"7": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}}}), None).unwrap_err();
        match err {
            ApiError::InvalidPrompt { node_errors, .. } => {
                assert_eq!(node_errors["7"]["errors"][0]["details"], "'99'");
                assert_eq!(node_errors["7"]["class_type"], "SaveImage");
            }
            other => panic!("{other:?}"),
        }
    }
}
