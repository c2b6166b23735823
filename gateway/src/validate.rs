//! Checks a submitted prompt before anything is stored.
//!
//! Only what can be known without the GPU node: the prompt is an object of
//! nodes, each with a `class_type` and `inputs`, and every link points at a
//! node that exists. Node types and value ranges are ComfyUI's to check (a job
//! it refuses ends `failed` with ComfyUI's own message). Errors use the types
//! and shapes ComfyUI uses for the same mistakes.

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// Validates `prompt` (ComfyUI API format).
pub fn prompt(prompt: &Value) -> Result<(), ApiError> {
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
    if node_errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidPrompt {
            kind: "prompt_outputs_failed_validation",
            message: "Prompt outputs failed validation".into(),
            details: String::new(),
            node_errors: Value::Object(node_errors),
        })
    }
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
        prompt(&p).unwrap();
    }

    #[test]
    fn bad_prompts_are_named() {
        assert!(prompt(&json!([1, 2])).is_err());
        assert!(prompt(&json!({})).is_err());
        assert!(prompt(&json!({"1": {"inputs": {}}})).is_err());
        let err = prompt(&json!({"7": {"class_type": "SaveImage", "inputs": {"images": ["99", 0]}}})).unwrap_err();
        match err {
            ApiError::InvalidPrompt { node_errors, .. } => {
                assert_eq!(node_errors["7"]["errors"][0]["details"], "'99'");
                assert_eq!(node_errors["7"]["class_type"], "SaveImage");
            }
            other => panic!("{other:?}"),
        }
    }
}
