//! ComfyUI's prompt validation (`execution.validate_prompt` and
//! `validate_inputs` of 0.3.64), including its quirks, so that a rejected
//! prompt gets the same 400 body from the stand-in as from ComfyUI.
//!
//! Why a port and not a sketch: gpu-task and the gateway show ComfyUI's
//! `node_errors` to participants, and the recorded bodies
//! (`*-prompt-response.json`) have details that only fall out of ComfyUI's
//! exact algorithm: a link to a missing node is reported on the *linking*
//! node with its consumer's input, as a caught `KeyError`; an upstream error
//! leaves the output's own `details` empty; every failed node lists every
//! failed output in `dependent_outputs`.
//!
//! Validation converts widget values in place (`"512"` → `512` for an INT),
//! as ComfyUI does, so the queue and history hold the converted prompt.

use std::collections::HashSet;

use super::json::{jobj, Json, Map};
use super::nodes::{Category, Definition, Kind};
use super::paths::Dirs;

/// A prompt ComfyUI would run.
#[derive(Debug)]
pub struct Accepted {
    /// Output nodes that validated, in prompt order (`outputs_to_execute`).
    pub outputs: Vec<String>,
    /// Errors of outputs that did not validate (a 200 may carry some).
    pub node_errors: Map<Json>,
}

/// A prompt ComfyUI would refuse with 400.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// `{type, message, details, extra_info}`.
    pub error: Json,
    /// Per-node errors.
    pub node_errors: Map<Json>,
}

impl Rejected {
    /// The 400 body: `{"error": …, "node_errors": …}`.
    pub fn body(&self) -> Json {
        jobj! { "error" => self.error.clone(), "node_errors" => Json::Object(self.node_errors.clone()) }
    }

    /// A rejection without node errors.
    pub fn plain(kind: &str, message: &str, details: &str) -> Rejected {
        Rejected { error: error(kind, message, details, Json::Object(Map::new())), node_errors: Map::new() }
    }
}

/// `{type, message, details, extra_info}`.
fn error(kind: &str, message: &str, details: &str, extra_info: Json) -> Json {
    jobj! { "type" => kind, "message" => message, "details" => details, "extra_info" => extra_info }
}

/// A Python exception raised during validation.
#[derive(Debug, Clone)]
struct PyErr {
    kind: &'static str,
    message: String,
    /// The frame that raised it (`traceback.format_tb` form).
    frame: String,
}

/// The frame of the recursive call that catches an inner exception (recorded).
const FRAME_RECURSE: &str = "  File \"ComfyUI/execution.py\", line 808, in validate_inputs\n    r = await validate_inputs(prompt_id, prompt, o_id, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";
/// The frame that looks up a linked node (recorded).
const FRAME_LINKED_NODE: &str = "  File \"ComfyUI/execution.py\", line 788, in validate_inputs\n    o_class_type = prompt[o_id]['class_type']\n                   ~~~~~~^^^^^^\n";
/// The frame that reads the linked output's type (line number not recorded).
const FRAME_LINKED_SLOT: &str =
    "  File \"ComfyUI/execution.py\", line 790, in validate_inputs\n    received_type = r[val[1]]\n                    ~^^^^^^^^\n";
/// The frame that reads a node's inputs (line number not recorded).
const FRAME_INPUTS: &str =
    "  File \"ComfyUI/execution.py\", line 738, in validate_inputs\n    inputs = prompt[unique_id]['inputs']\n";
/// `validate_prompt`'s call of `validate_inputs` (line number not recorded).
const FRAME_VALIDATE_PROMPT: &str = "  File \"ComfyUI/execution.py\", line 1009, in validate_prompt\n    m = await validate_inputs(prompt_id, prompt, o, validated)\n        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n";

/// One entry of ComfyUI's `validated` dict.
#[derive(Debug, Clone)]
struct Outcome {
    ok: bool,
    reasons: Vec<Json>,
}

struct Validator<'a> {
    prompt: &'a mut Map<Json>,
    dirs: &'a Dirs,
    validated: Map<Outcome>,
    in_progress: HashSet<String>,
}

/// Validates `prompt` like ComfyUI's `validate_prompt`, converting widget
/// values in place. `partial` is `partial_execution_targets`.
pub fn validate_prompt(prompt: &mut Map<Json>, partial: Option<&[Json]>, dirs: &Dirs) -> Result<Accepted, Rejected> {
    let mut outputs: Vec<String> = Vec::new();
    for (id, node) in prompt.iter() {
        let node_id = format!("Node ID '#{id}'");
        let Some(class_type) = node.get("class_type") else {
            return Err(Rejected::plain(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                &node_id,
            ));
        };
        let Some(def) = class_type.as_str().and_then(Definition::of) else {
            return Err(Rejected::plain(
                "invalid_prompt",
                &format!("Cannot execute because node {} does not exist.", class_type.py_str()),
                &node_id,
            ));
        };
        let targeted = partial.is_none_or(|targets| targets.iter().any(|t| t.as_str() == Some(id)));
        if def.is_output_node() && targeted && !outputs.contains(id) {
            outputs.push(id.clone());
        }
    }
    if outputs.is_empty() {
        return Err(Rejected::plain("prompt_no_outputs", "Prompt has no outputs", ""));
    }

    let mut v = Validator { prompt, dirs, validated: Map::new(), in_progress: HashSet::new() };
    let mut good = Vec::new();
    let mut failures: Vec<(String, Vec<Json>)> = Vec::new();
    // node id -> (errors, dependent_outputs, class_type)
    let mut node_errors: Map<(Vec<Json>, Vec<String>, String)> = Map::new();
    for o in &outputs {
        let outcome = match v.validate_inputs(o) {
            Ok(outcome) => outcome,
            Err(ex) => {
                let reasons = vec![error(
                    "exception_during_validation",
                    "Exception when validating node",
                    &ex.message,
                    jobj! {
                        "exception_type" => ex.kind,
                        "traceback" => Json::Array(vec![FRAME_VALIDATE_PROMPT.into(), ex.frame.clone().into()]),
                    },
                )];
                let outcome = Outcome { ok: false, reasons };
                v.validated.insert(o.clone(), outcome.clone());
                outcome
            }
        };
        if outcome.ok {
            good.push(o.clone());
            continue;
        }
        tracing::warn!(output = %o, "failed to validate prompt for output");
        failures.push((o.clone(), outcome.reasons.clone()));
        // As ComfyUI: every failed node so far gets this output as dependent.
        for (node_id, result) in v.validated.iter() {
            if result.ok || result.reasons.is_empty() {
                continue;
            }
            if !node_errors.contains_key(node_id) {
                let class_type =
                    v.prompt.get(node_id).and_then(|n| n.get("class_type")).map(Json::py_str).unwrap_or_default();
                node_errors.insert(node_id.clone(), (result.reasons.clone(), Vec::new(), class_type));
            }
            if let Some(entry) = node_errors.get_mut(node_id) {
                entry.1.push(o.clone());
            }
        }
    }
    let node_errors: Map<Json> = node_errors
        .into_iter()
        .map(|(id, (errors, dependent, class_type))| {
            let dependent = Json::Array(dependent.into_iter().map(Json::String).collect());
            (
                id,
                jobj! { "errors" => Json::Array(errors), "dependent_outputs" => dependent, "class_type" => class_type },
            )
        })
        .collect();
    if good.is_empty() {
        let details: Vec<String> = failures
            .iter()
            .flat_map(|(_, reasons)| reasons.iter())
            .map(|r| {
                let field = |k: &str| r.get(k).map(Json::py_str).unwrap_or_default();
                format!("{}: {}", field("message"), field("details"))
            })
            .collect();
        return Err(Rejected {
            error: error(
                "prompt_outputs_failed_validation",
                "Prompt outputs failed validation",
                &details.join("\n"),
                Json::Object(Map::new()),
            ),
            node_errors,
        });
    }
    Ok(Accepted { outputs: good, node_errors })
}

impl Validator<'_> {
    /// `validate_inputs(prompt_id, prompt, unique_id, validated)`.
    fn validate_inputs(&mut self, unique_id: &str) -> Result<Outcome, PyErr> {
        if let Some(done) = self.validated.get(unique_id) {
            return Ok(done.clone());
        }
        if !self.in_progress.insert(unique_id.to_string()) {
            // Python recurses until it hits its recursion limit.
            return Err(PyErr {
                kind: "RecursionError",
                message: "maximum recursion depth exceeded".into(),
                frame: FRAME_RECURSE.into(),
            });
        }
        let result = self.validate_node(unique_id);
        self.in_progress.remove(unique_id);
        let outcome = result?;
        self.validated.insert(unique_id.to_string(), outcome.clone());
        Ok(outcome)
    }

    fn validate_node(&mut self, unique_id: &str) -> Result<Outcome, PyErr> {
        let node = self.prompt.get(unique_id).cloned().unwrap_or_default();
        let class_type = node.get("class_type").and_then(Json::as_str).unwrap_or_default().to_string();
        let inputs = match node.get("inputs") {
            Some(Json::Object(inputs)) => inputs.clone(),
            Some(other) => {
                return Err(PyErr {
                    kind: "TypeError",
                    message: format!("argument of type '{}' is not iterable", other.py_type_name()),
                    frame: FRAME_INPUTS.into(),
                })
            }
            None => return Err(PyErr { kind: "KeyError", message: "'inputs'".into(), frame: FRAME_INPUTS.into() }),
        };
        let (Some(def), Some(kind)) = (Definition::of(&class_type), Kind::of(&class_type)) else {
            // Unknown classes were refused before validation started.
            return Ok(Outcome { ok: false, reasons: Vec::new() });
        };
        let custom = kind.validate_inputs_args();
        let mut errors: Vec<Json> = Vec::new();
        let mut valid = true;
        let mut converted: Vec<(String, Json)> = Vec::new();

        for x in def.declared_inputs() {
            let Some(info) = def.input(&x) else { continue };
            let Some(val) = inputs.get(&x) else {
                if info.category == Category::Required {
                    errors.push(error(
                        "required_input_missing",
                        "Required input is missing",
                        &x,
                        jobj! { "input_name" => x.as_str() },
                    ));
                }
                continue;
            };
            if let Json::Array(link) = val {
                if link.len() != 2 {
                    errors.push(error(
                        "bad_linked_input",
                        "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        &x,
                        jobj! { "input_name" => x.as_str(), "input_config" => info.config(), "received_value" => val.clone() },
                    ));
                    continue;
                }
                let o_id = self.linked_node(&link[0])?;
                let received = self.linked_type(&o_id, &link[1])?;
                if !validate_node_input(&received, &info.kind) {
                    errors.push(error(
                        "return_type_mismatch",
                        "Return type mismatch between linked nodes",
                        &format!(
                            "{x}, received_type({}) mismatch input_type({})",
                            received.py_str(),
                            info.kind.py_str()
                        ),
                        jobj! {
                            "input_name" => x.as_str(),
                            "input_config" => info.config(),
                            "received_type" => received.clone(),
                            "linked_node" => val.clone(),
                        },
                    ));
                    continue;
                }
                match self.validate_inputs(&o_id) {
                    Ok(r) if !r.ok => valid = false,
                    Ok(_) => {}
                    Err(ex) => {
                        valid = false;
                        let reasons = vec![error(
                            "exception_during_inner_validation",
                            "Exception when validating inner node",
                            &ex.message,
                            jobj! {
                                "input_name" => x.as_str(),
                                "input_config" => info.config(),
                                "exception_message" => ex.message.as_str(),
                                "exception_type" => ex.kind,
                                "traceback" => Json::Array(vec![FRAME_RECURSE.into(), ex.frame.clone().into()]),
                                "linked_node" => val.clone(),
                            },
                        )];
                        self.validated.insert(o_id.clone(), Outcome { ok: false, reasons });
                    }
                }
                continue;
            }

            // A widget value: unwrap {"__value__": …}, convert, check.
            let mut val = match val {
                Json::Object(o) if o.contains_key("__value__") => o.get("__value__").cloned().unwrap_or_default(),
                other => other.clone(),
            };
            match convert(info.type_name(), &val) {
                Ok(Some(v)) => val = v,
                Ok(None) => {}
                Err(ex) => {
                    errors.push(error(
                        "invalid_input_type",
                        &format!("Failed to convert an input value to a {} value", info.kind.py_str()),
                        &format!("{x}, {}, {ex}", val.py_str()),
                        jobj! {
                            "input_name" => x.as_str(),
                            "input_config" => info.config(),
                            "received_value" => val.clone(),
                            "exception_message" => ex.as_str(),
                        },
                    ));
                    continue;
                }
            }
            converted.push((x.clone(), val.clone()));
            if custom.contains(&x.as_str()) {
                continue;
            }
            if let (Some(min), Some(v)) = (info.extra.get("min").and_then(Json::py_number), val.py_number()) {
                if v < min {
                    errors.push(range_error("value_smaller_than_min", "smaller than min", &x, &info, &val));
                    continue;
                }
            }
            if let (Some(max), Some(v)) = (info.extra.get("max").and_then(Json::py_number), val.py_number()) {
                if v > max {
                    errors.push(range_error("value_bigger_than_max", "bigger than max", &x, &info, &val));
                    continue;
                }
            }
            if let Json::Array(options) = &info.kind {
                if !options.iter().any(|o| o.py_eq(&val)) {
                    let (list_info, config) = if options.len() > 20 {
                        (format!("(list of length {})", options.len()), Json::Null)
                    } else {
                        (info.kind.py_repr(), info.config())
                    };
                    errors.push(error(
                        "value_not_in_list",
                        "Value not in list",
                        &format!("{x}: '{}' not in {list_info}", val.py_str()),
                        jobj! { "input_name" => x.as_str(), "input_config" => config, "received_value" => val.clone() },
                    ));
                    continue;
                }
            }
        }

        // Write the conversions back, as ComfyUI's `inputs[x] = val` does.
        if let Some(Json::Object(inputs)) =
            self.prompt.get_mut(unique_id).and_then(|n| n.as_object_mut()).and_then(|n| n.get_mut("inputs"))
        {
            for (x, v) in &converted {
                inputs.insert(x.clone(), v.clone());
            }
        }

        // VALIDATE_INPUTS for the inputs it takes (widget values only).
        for name in custom {
            if let Some((_, value)) = converted.iter().find(|(x, _)| x == name) {
                if let Some(reason) = kind.validate_input(name, value, self.dirs) {
                    errors.push(error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        &format!("{name} - {reason}"),
                        jobj! { "input_name" => *name },
                    ));
                }
            }
        }

        Ok(Outcome { ok: errors.is_empty() && valid, reasons: errors })
    }

    /// `prompt[o_id]['class_type']` on a link: the linked node's id.
    fn linked_node(&self, o_id: &Json) -> Result<String, PyErr> {
        let raise = |kind, message| PyErr { kind, message, frame: FRAME_LINKED_NODE.into() };
        match o_id {
            Json::String(id) if self.prompt.contains_key(id) => Ok(id.clone()),
            Json::Array(_) | Json::Object(_) => {
                Err(raise("TypeError", format!("unhashable type: '{}'", o_id.py_type_name())))
            }
            other => Err(raise("KeyError", other.py_repr())),
        }
    }

    /// `RETURN_TYPES[val[1]]` of the linked node.
    fn linked_type(&self, o_id: &str, slot: &Json) -> Result<Json, PyErr> {
        let raise = |kind, message| PyErr { kind, message, frame: FRAME_LINKED_SLOT.into() };
        let class = self.prompt.get(o_id).and_then(|n| n.get("class_type")).and_then(Json::as_str).unwrap_or_default();
        let types = Definition::of(class).map_or(&[][..], |d| d.output_types());
        let Some(index) = slot.py_int() else {
            return Err(raise(
                "TypeError",
                format!("tuple indices must be integers or slices, not {}", slot.py_type_name()),
            ));
        };
        let len = types.len() as i128;
        let at = if index < 0 { index + len } else { index };
        if at < 0 || at >= len {
            return Err(raise("IndexError", "tuple index out of range".into()));
        }
        Ok(types[at as usize].clone())
    }
}

fn range_error(kind: &str, words: &str, x: &str, info: &super::nodes::InputInfo, val: &Json) -> Json {
    let limit = if kind == "value_smaller_than_min" { "min" } else { "max" };
    let bound = info.extra.get(limit).map(Json::py_str).unwrap_or_default();
    error(
        kind,
        &format!("Value {} {words} of {bound}", val.py_str()),
        x,
        jobj! { "input_name" => x, "input_config" => info.config(), "received_value" => val.clone() },
    )
}

/// `validate_node_input(received_type, input_type)`.
fn validate_node_input(received: &Json, input: &Json) -> bool {
    if received == input {
        return true;
    }
    let (Some(r), Some(i)) = (received.as_str(), input.as_str()) else { return false };
    if r == "*" || i == "*" {
        return true;
    }
    let split = |s: &str| s.split(',').map(|t| t.trim().to_string()).collect::<HashSet<_>>();
    !split(r).is_disjoint(&split(i))
}

/// ComfyUI's `int(val)` / `float(val)` / `str(val)` / `bool(val)` by input
/// type. `Ok(None)` means no conversion applies; `Err` is `str(exception)`.
fn convert(kind: Option<&str>, val: &Json) -> Result<Option<Json>, String> {
    Ok(Some(match kind {
        Some("INT") => py_int(val)?,
        Some("FLOAT") => Json::from(py_float(val)?),
        Some("STRING") => Json::String(val.py_str()),
        Some("BOOLEAN") => Json::Bool(val.truthy()),
        _ => return Ok(None),
    }))
}

/// Python's `int(x)` for JSON values.
fn py_int(val: &Json) -> Result<Json, String> {
    if let Some(i) = val.py_int() {
        return Ok(int_json(i));
    }
    match val {
        Json::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.is_nan() {
                Err("cannot convert float NaN to integer".into())
            } else if f.is_infinite() {
                Err("cannot convert float infinity to integer".into())
            } else {
                Ok(int_json(f.trunc() as i128))
            }
        }
        Json::String(s) => {
            let t = s.trim();
            let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
            let well_formed = !digits.is_empty()
                && !digits.starts_with('_')
                && !digits.ends_with('_')
                && !digits.contains("__")
                && digits.chars().all(|c| c.is_ascii_digit() || c == '_');
            match t.replace('_', "").parse::<i128>() {
                Ok(i) if well_formed => Ok(int_json(i)),
                _ => Err(format!("invalid literal for int() with base 10: {}", val.py_repr())),
            }
        }
        other => Err(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            other.py_type_name()
        )),
    }
}

fn int_json(i: i128) -> Json {
    match i64::try_from(i) {
        Ok(v) => Json::from(v),
        Err(_) => Json::from(i as f64),
    }
}

/// Python's `float(x)` for JSON values (non-finite results are refused: JSON
/// cannot carry them back).
fn py_float(val: &Json) -> Result<f64, String> {
    if let Some(f) = val.py_number() {
        return Ok(f);
    }
    match val {
        Json::String(s) => {
            let t = s.trim();
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(f),
                _ => Err(format!("could not convert string to float: {}", val.py_repr())),
            }
        }
        other => Err(format!("float() argument must be a string or a real number, not '{}'", other.py_type_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_conversions() {
        assert_eq!(py_int(&Json::from("12")).unwrap(), Json::from(12i64));
        assert_eq!(py_int(&Json::from(" 1_000 ")).unwrap(), Json::from(1000i64));
        assert_eq!(py_int(&Json::from(2.9)).unwrap(), Json::from(2i64));
        assert_eq!(py_int(&Json::from("1.5")).unwrap_err(), "invalid literal for int() with base 10: '1.5'");
        assert_eq!(
            py_int(&Json::Null).unwrap_err(),
            "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
        );
        assert_eq!(py_float(&Json::from("0.25")).unwrap(), 0.25);
        assert_eq!(py_float(&Json::from("x")).unwrap_err(), "could not convert string to float: 'x'");
    }

    #[test]
    fn node_input_types() {
        assert!(validate_node_input(&Json::from("IMAGE"), &Json::from("IMAGE")));
        assert!(validate_node_input(&Json::from("IMAGE,MASK"), &Json::from("MASK")));
        assert!(!validate_node_input(&Json::from("MASK"), &Json::from("IMAGE")));
    }
}
