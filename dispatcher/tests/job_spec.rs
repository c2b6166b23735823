//! `nomad/comfy-workflow.nomad.hcl` and the dispatcher must agree: the job
//! name, the meta keys, the payload file, the task name. Parsed with hcl-rs,
//! so the two cannot drift apart unnoticed.

use dispatcher::contract::{META_OPTIONAL, META_REQUIRED, NOMAD_JOB, NOMAD_TASK, PAYLOAD_FILE};
use hcl::{Block, Body, Expression};

fn spec() -> Body {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../nomad/comfy-workflow.nomad.hcl");
    hcl::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn blocks<'a>(body: &'a Body, name: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
    body.blocks().filter(move |b| b.identifier() == name)
}

fn one<'a>(body: &'a Body, name: &'a str) -> &'a Block {
    let found: Vec<_> = blocks(body, name).collect();
    assert_eq!(found.len(), 1, "exactly one {name} block");
    found[0]
}

fn attr<'a>(body: &'a Body, name: &str) -> &'a Expression {
    body.attributes().find(|a| a.key() == name).map(|a| a.expr()).unwrap_or_else(|| panic!("no attribute {name}"))
}

fn strings(expr: &Expression) -> Vec<String> {
    match expr {
        Expression::Array(items) => items
            .iter()
            .map(|e| match e {
                Expression::String(s) => s.clone(),
                other => panic!("not a string: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

fn label(block: &Block) -> &str {
    block.labels().first().map(|l| l.as_str()).unwrap_or_default()
}

#[test]
fn parameterized_job_matches_the_dispatcher() {
    let body = spec();
    let job = one(&body, "job");
    assert_eq!(label(job), NOMAD_JOB);
    assert_eq!(attr(job.body(), "type"), &Expression::String("batch".into()));

    let params = one(job.body(), "parameterized");
    assert_eq!(strings(attr(params.body(), "meta_required")), META_REQUIRED);
    assert_eq!(strings(attr(params.body(), "meta_optional")), META_OPTIONAL);

    let group = one(job.body(), "group");
    for policy in ["restart", "reschedule"] {
        let b = one(group.body(), policy);
        assert_eq!(attr(b.body(), "attempts"), &Expression::Number(0.into()), "{policy} attempts must be 0");
    }
    let task = one(group.body(), "task");
    assert_eq!(label(task), NOMAD_TASK);
    let payload = one(task.body(), "dispatch_payload");
    assert_eq!(attr(payload.body(), "file"), &Expression::String(PAYLOAD_FILE.into()));

    // The GPU lease: a device "nvidia/gpu" whose count is a variable.
    let resources = one(task.body(), "resources");
    let device = one(resources.body(), "dynamic");
    assert_eq!(label(device), "device");
    assert_eq!(strings(attr(device.body(), "labels")), ["nvidia/gpu"]);
}

#[test]
fn every_variable_has_a_description_and_a_default() {
    let body = spec();
    let vars: Vec<_> = blocks(&body, "variable").collect();
    assert!(vars.len() >= 4);
    for v in vars {
        for key in ["description", "default", "type"] {
            assert!(v.body().attributes().any(|a| a.key() == key), "variable {} has no {key}", label(v));
        }
    }
    let names: Vec<_> = blocks(&body, "variable").map(label).collect();
    for needed in ["gpu_count", "node_pool", "node_name_pattern", "gpu_task_command"] {
        assert!(names.contains(&needed), "variable {needed} is missing");
    }
}
