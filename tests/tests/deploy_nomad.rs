//! The Nomad deployment files in `nomad/` agree with each other and with the
//! code, and keep secrets out of the repository.
//!
//! Every `nomad/**/*.hcl` is parsed with hcl-rs (no Nomad binary is available
//! here, so `nomad job validate` cannot run), then:
//!
//! - each job file holds one job, named like the file, in its node pool
//!   (`control`: redis, gateway, dispatcher; `gpu`: comfyui, comfy-workflow);
//! - every variable has a type and a description, a default unless it is
//!   deliberately required, and is used;
//! - every `service` is registered in Consul with at least one check;
//! - service names, meta keys, payload file and task name match
//!   `dispatcher::contract`; the templates that render REDIS_URL read the
//!   service the redis job registers;
//! - the warm ComfyUI reserves no GPU (the workflow's device request is the
//!   lease) and its Consul tag, evaluated like Nomad does (HCL, then run-time
//!   interpolation of the node meta), names the GPU that gpu-task's
//!   `NVIDIA_VISIBLE_DEVICES` names;
//! - host volumes, drivers and binary paths the jobs use exist in the client
//!   config of their pool; the agents enable ACLs, mTLS and the NVIDIA plugin;
//! - the dispatcher's Nomad token is its workload identity, with the policy in
//!   `nomad/acl/`; the gateway's secrets come from Nomad variables;
//! - the environment the gateway and dispatcher get is documented;
//! - no file under `nomad/` holds a secret (attribute scan plus a text scan
//!   for keys, certificates, UUID and JWT tokens).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use dispatcher::consul::ServiceInstance;
use dispatcher::contract::{
    CONSUL_COMFYUI_SERVICE, CONSUL_GATEWAY_SERVICE, META_OPTIONAL, META_REQUIRED, NOMAD_JOB, NOMAD_TASK, PAYLOAD_FILE,
};
use hcl::eval::{Context, Evaluate, FuncArgs, FuncDef, ParamType};
use hcl::expr::{ObjectKey, TemplateExpr, TraversalOperator};
use hcl::{Block, Body, Expression, Value};

// ---------------------------------------------------------------- files ---

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo root")
}

struct HclFile {
    /// Path relative to the repository, e.g. `nomad/agent/server.hcl`.
    rel: String,
    text: String,
    body: Body,
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Every file under `nomad/`.
fn nomad_paths() -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(&repo().join("nomad"), &mut out);
    out
}

/// Every `nomad/**/*.hcl`, parsed.
fn hcl_files() -> Vec<HclFile> {
    let root = repo();
    nomad_paths()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "hcl"))
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let body: Body = hcl::parse(&text).unwrap_or_else(|e| panic!("{rel} does not parse: {e}"));
            HclFile { rel, text, body }
        })
        .collect()
}

fn file<'a>(files: &'a [HclFile], rel: &str) -> &'a HclFile {
    files.iter().find(|f| f.rel == rel).unwrap_or_else(|| panic!("{rel} is missing"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

// ------------------------------------------------------------- HCL helpers ---

fn label(block: &Block) -> &str {
    block.labels().first().map(|l| l.as_str()).unwrap_or_default()
}

/// Child blocks named `name`; `dynamic "name" { content { … } }` counts as
/// one, with its content as body.
fn blocks<'a>(body: &'a Body, name: &str) -> Vec<(&'a Block, &'a Body)> {
    let mut out = Vec::new();
    for b in body.blocks() {
        if b.identifier() == name {
            out.push((b, b.body()));
        } else if b.identifier() == "dynamic" && label(b) == name {
            let content = b.body().blocks().find(|c| c.identifier() == "content");
            out.push((b, content.map(|c| c.body()).unwrap_or_else(|| panic!("dynamic {name} without content"))));
        }
    }
    out
}

fn one<'a>(body: &'a Body, name: &str) -> &'a Body {
    let found = blocks(body, name);
    assert_eq!(found.len(), 1, "expected exactly one {name} block, found {}", found.len());
    found[0].1
}

fn attr<'a>(body: &'a Body, name: &str) -> Option<&'a Expression> {
    body.attributes().find(|a| a.key() == name).map(|a| a.expr())
}

fn must_attr<'a>(body: &'a Body, name: &str) -> &'a Expression {
    attr(body, name).unwrap_or_else(|| panic!("no attribute {name}"))
}

/// The text of a string literal or of a template (quoted or heredoc).
fn text(expr: &Expression) -> Option<String> {
    match expr {
        Expression::String(s) => Some(s.clone()),
        Expression::TemplateExpr(t) => Some(match t.as_ref() {
            TemplateExpr::QuotedString(s) => s.clone(),
            TemplateExpr::Heredoc(h) => h.template.clone(),
        }),
        _ => None,
    }
}

fn string(expr: &Expression) -> String {
    text(expr).unwrap_or_else(|| panic!("not a string: {expr:?}"))
}

fn strings(expr: &Expression) -> Vec<String> {
    match expr {
        Expression::Array(items) => items.iter().map(string).collect(),
        other => panic!("not an array: {other:?}"),
    }
}

/// `root.a.b` for a traversal such as `var.x` or `group.value`.
fn traversal_path(expr: &Expression) -> Option<String> {
    let Expression::Traversal(t) = expr else { return None };
    let Expression::Variable(root) = &t.expr else { return None };
    let mut path = root.as_str().to_string();
    for op in &t.operators {
        match op {
            TraversalOperator::GetAttr(id) => {
                path.push('.');
                path.push_str(id.as_str());
            }
            _ => return None,
        }
    }
    Some(path)
}

/// The `variable` blocks of a job file, by name.
fn variables(body: &Body) -> BTreeMap<String, &Body> {
    blocks(body, "variable").into_iter().map(|(b, body)| (label(b).to_string(), body)).collect()
}

/// A literal, or `var.x` resolved to the default of variable `x`.
fn resolve<'a>(expr: &'a Expression, vars: &BTreeMap<String, &'a Body>) -> &'a Expression {
    if let Some(path) = traversal_path(expr) {
        if let Some(name) = path.strip_prefix("var.") {
            let var = vars.get(name).unwrap_or_else(|| panic!("var.{name} is not declared"));
            return must_attr(var, "default");
        }
    }
    expr
}

fn resolve_string(expr: &Expression, vars: &BTreeMap<String, &Body>) -> String {
    string(resolve(expr, vars))
}

fn is_true(expr: Option<&Expression>) -> bool {
    matches!(expr, Some(Expression::Bool(true)))
}

/// Every block in `body`, recursively (dynamic content included), with its
/// effective name.
fn all_blocks<'a>(body: &'a Body, out: &mut Vec<(String, &'a Block, &'a Body)>) {
    for b in body.blocks() {
        if b.identifier() == "dynamic" {
            if let Some(content) = b.body().blocks().find(|c| c.identifier() == "content") {
                out.push((label(b).to_string(), b, content.body()));
                all_blocks(content.body(), out);
            }
        } else {
            out.push((b.identifier().to_string(), b, b.body()));
            all_blocks(b.body(), out);
        }
    }
}

fn named<'a>(body: &'a Body, name: &str) -> Vec<&'a Body> {
    let mut all = Vec::new();
    all_blocks(body, &mut all);
    all.into_iter().filter(|(n, _, _)| n == name).map(|(_, _, b)| b).collect()
}

/// A Go duration in nanoseconds (the stand-in's parser, Nomad's syntax).
fn duration(expr: &Expression) -> i64 {
    let s = string(expr);
    comfy_multi_tests::nomad::jobspec::go_duration_ns(&s).unwrap_or_else(|| panic!("not a duration: {s}"))
}

// ------------------------------------------------------------------- jobs ---

/// The job specs and the node pool each must run in.
const JOBS: [(&str, &str); 5] = [
    ("comfy-workflow", "gpu"),
    ("comfyui", "gpu"),
    ("gateway", "control"),
    ("dispatcher", "control"),
    ("redis", "control"),
];

/// Variables that deliberately have no default (the operator must pass them).
const REQUIRED_VARIABLES: [(&str, &str); 1] = [("gateway", "public_host")];

struct Job<'a> {
    name: String,
    file: &'a HclFile,
    vars: BTreeMap<String, &'a Body>,
    body: &'a Body,
}

fn jobs(files: &[HclFile]) -> Vec<Job<'_>> {
    files
        .iter()
        .filter(|f| f.body.blocks().any(|b| b.identifier() == "job"))
        .map(|f| {
            let found = blocks(&f.body, "job");
            assert_eq!(found.len(), 1, "{}: one job per file", f.rel);
            let name = label(found[0].0).to_string();
            Job { name, file: f, vars: variables(&f.body), body: found[0].1 }
        })
        .collect()
}

fn job<'a>(jobs: &'a [Job<'a>], name: &str) -> &'a Job<'a> {
    jobs.iter().find(|j| j.name == name).unwrap_or_else(|| panic!("no job {name}"))
}

fn client_config_of_pool<'a>(files: &'a [HclFile], pool: &str) -> &'a HclFile {
    match pool {
        "control" => file(files, "nomad/agent/client-control.hcl"),
        "gpu" => file(files, "nomad/agent/client-gpu.hcl"),
        other => panic!("no client config for pool {other}"),
    }
}

#[test]
fn every_file_parses_and_each_job_is_in_its_node_pool() {
    let files = hcl_files();
    for needed in [
        "nomad/agent/server.hcl",
        "nomad/agent/client-control.hcl",
        "nomad/agent/client-gpu.hcl",
        "nomad/acl/dispatcher.policy.hcl",
        "nomad/pools/control.hcl",
        "nomad/pools/gpu.hcl",
    ] {
        file(&files, needed);
    }
    let jobs = jobs(&files);
    let names: BTreeSet<_> = jobs.iter().map(|j| j.name.as_str()).collect();
    let expected: BTreeSet<_> = JOBS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, expected, "the job specs under nomad/");

    for j in &jobs {
        assert_eq!(j.file.rel, format!("nomad/{}.nomad.hcl", j.name), "job {} lives in its own file", j.name);
        let pool = resolve_string(must_attr(j.body, "node_pool"), &j.vars);
        let want = JOBS.iter().find(|(n, _)| *n == j.name).unwrap().1;
        assert_eq!(pool, want, "job {}'s node_pool", j.name);
        // The pool exists as a node pool spec and is the pool of a client.
        let pools: Vec<_> = files
            .iter()
            .filter(|f| f.rel.starts_with("nomad/pools/"))
            .flat_map(|f| blocks(&f.body, "node_pool").into_iter().map(|(b, _)| label(b).to_string()))
            .collect();
        assert!(pools.contains(&pool), "no nomad/pools/ spec for pool {pool}");
        let client = client_config_of_pool(&files, &pool);
        let client_pool = string(must_attr(one(&client.body, "client"), "node_pool"));
        assert_eq!(client_pool, pool, "{} serves pool {pool}", client.rel);
    }
}

#[test]
fn every_variable_is_typed_described_defaulted_and_used() {
    let files = hcl_files();
    for j in jobs(&files) {
        assert!(!j.vars.is_empty(), "{} declares its inputs as variables", j.file.rel);
        for (name, body) in &j.vars {
            let what = format!("{}: variable {name}", j.file.rel);
            assert!(attr(body, "type").is_some(), "{what} has no type");
            let description = attr(body, "description").map(string).unwrap_or_default();
            assert!(description.trim().len() >= 10, "{what} has no description");
            let required = REQUIRED_VARIABLES.contains(&(j.name.as_str(), name.as_str()));
            assert_eq!(attr(body, "default").is_none(), required, "{what}: a default unless deliberately required");
            assert!(j.file.text.contains(&format!("var.{name}")), "{what} is never used");
        }
    }
}

/// The parts of Nomad's own job validation that these specs could break:
/// update and restart timing (`UpdateStrategy.Validate`,
/// `RestartPolicy.Validate`), and what a system job may not have.
#[test]
fn update_and_restart_blocks_pass_nomads_validation() {
    let files = hcl_files();
    let minute = 60_000_000_000_i64;
    for j in jobs(&files) {
        for update in named(j.body, "update") {
            let min_healthy = attr(update, "min_healthy_time").map_or(10_000_000_000, duration);
            let healthy = attr(update, "healthy_deadline").map_or(5 * minute, duration);
            let progress = attr(update, "progress_deadline").map_or(10 * minute, duration);
            assert!(min_healthy < healthy, "{}: min_healthy_time < healthy_deadline", j.file.rel);
            assert!(progress == 0 || healthy < progress, "{}: healthy_deadline < progress_deadline", j.file.rel);
        }
        for restart in named(j.body, "restart") {
            let attempts = match must_attr(restart, "attempts") {
                Expression::Number(n) => n.as_i64().unwrap(),
                other => panic!("attempts: {other:?}"),
            };
            let mode = string(must_attr(restart, "mode"));
            if mode == "delay" {
                let delay = duration(must_attr(restart, "delay"));
                let interval = duration(must_attr(restart, "interval"));
                assert!(
                    attempts * delay <= interval,
                    "{}: {attempts} restarts of {delay}ns fit the interval",
                    j.file.rel
                );
            }
        }
        if string(must_attr(j.body, "type")) == "system" {
            for name in ["reschedule", "affinity", "spread", "migrate"] {
                assert!(named(j.body, name).is_empty(), "{}: a system job may not have {name}", j.file.rel);
            }
            for group in named(j.body, "group") {
                assert!(
                    attr(group, "count").is_none_or(|c| c == &Expression::Number(1.into())),
                    "{}: system groups run once per node",
                    j.file.rel
                );
            }
        }
    }
}

#[test]
fn every_service_is_in_consul_with_a_check() {
    let files = hcl_files();
    let mut seen = 0;
    for j in jobs(&files) {
        for service in named(j.body, "service") {
            seen += 1;
            let name = string(must_attr(service, "name"));
            let what = format!("{}: service {name}", j.file.rel);
            assert_eq!(string(must_attr(service, "provider")), "consul", "{what} is registered in Consul");
            let checks = blocks(service, "check");
            assert!(!checks.is_empty(), "{what} has no check");
            for (_, check) in checks {
                let kind = string(must_attr(check, "type"));
                assert!(attr(check, "interval").is_some() && attr(check, "timeout").is_some(), "{what}: check timing");
                if kind == "http" {
                    assert!(string(must_attr(check, "path")).starts_with('/'), "{what}: http check path");
                }
            }
        }
    }
    assert!(seen >= 3, "comfyui, comfy-gateway and redis are services");
}

/// The services of a job: name -> body.
fn services<'a>(j: &'a Job<'a>) -> BTreeMap<String, &'a Body> {
    named(j.body, "service").into_iter().map(|s| (string(must_attr(s, "name")), s)).collect()
}

fn check_paths(service: &Body) -> Vec<String> {
    blocks(service, "check").into_iter().filter_map(|(_, c)| attr(c, "path").map(string)).collect()
}

#[test]
fn service_names_and_checks_match_the_contract() {
    let files = hcl_files();
    let jobs = jobs(&files);

    let comfyui = services(job(&jobs, "comfyui"));
    assert_eq!(comfyui.keys().collect::<Vec<_>>(), [CONSUL_COMFYUI_SERVICE]);
    assert_eq!(check_paths(comfyui[CONSUL_COMFYUI_SERVICE]), ["/system_stats"]);

    let gateway_job = job(&jobs, "gateway");
    let gateway = services(gateway_job);
    assert_eq!(gateway.keys().collect::<Vec<_>>(), [CONSUL_GATEWAY_SERVICE]);
    let gw = gateway[CONSUL_GATEWAY_SERVICE];
    assert_eq!(check_paths(gw), ["/healthz"]);
    // gpu-task calls https://<address>:<port> when meta says so (ServiceInstance::base_url).
    assert_eq!(string(must_attr(one(gw, "meta"), "scheme")), "https");
    let check = blocks(gw, "check")[0].1;
    assert_eq!(string(must_attr(check, "protocol")), "https");
    assert_eq!(traversal_path(must_attr(gw, "address")).as_deref(), Some("var.public_host"));

    let redis = services(job(&jobs, "redis"));
    assert_eq!(redis.keys().collect::<Vec<_>>(), ["redis"]);
    let redis_check = blocks(redis["redis"], "check")[0].1;
    assert_eq!(string(must_attr(redis_check, "type")), "tcp");

    // Whoever needs Redis reads the service the redis job registers.
    for name in ["gateway", "dispatcher"] {
        let j = job(&jobs, name);
        let datas: Vec<String> = named(j.body, "template").into_iter().map(|t| string(must_attr(t, "data"))).collect();
        let redis_tpl =
            datas.iter().find(|d| d.contains("REDIS_URL=")).unwrap_or_else(|| panic!("{name} renders no REDIS_URL"));
        assert!(redis_tpl.contains(r#"service "redis""#), "{name}: REDIS_URL from Consul service redis");
        assert!(redis_tpl.contains("redis://{{ .Address }}:{{ .Port }}"), "{name}: REDIS_URL shape");
    }
}

#[test]
fn the_workflow_job_matches_the_dispatcher_contract() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let j = job(&jobs, NOMAD_JOB);
    assert_eq!(string(must_attr(j.body, "type")), "batch");
    let params = one(j.body, "parameterized");
    assert_eq!(strings(must_attr(params, "meta_required")), META_REQUIRED);
    assert_eq!(strings(must_attr(params, "meta_optional")), META_OPTIONAL);
    let group = one(j.body, "group");
    let (task_block, task) = blocks(group, "task")[0];
    assert_eq!(label(task_block), NOMAD_TASK);
    assert_eq!(string(must_attr(one(task, "dispatch_payload"), "file")), PAYLOAD_FILE);

    // The lease: a device "nvidia/gpu" whose count is var.gpu_count (default 1).
    let resources = one(task, "resources");
    let (device, content) = blocks(resources, "device")[0];
    assert_eq!(strings(must_attr(device.body(), "labels")), ["nvidia/gpu"]);
    assert!(attr(content, "count").is_some());
    assert_eq!(must_attr(j.vars["gpu_count"], "default"), &Expression::Number(1.into()));

    // gpu-task's secret comes from the variable the README tells to put.
    let data = string(must_attr(one(task, "template"), "data"));
    assert!(data.contains(r#"nomadVar "nomad/jobs/comfy-workflow""#));
    assert!(data.contains("INTERNAL_SECRET={{ .internal_secret }}"));
    assert!(data.contains("CONSUL_HTTP_TOKEN="), "gpu-task's Consul token (Nomad strips the client's own)");

    // The Nomad stand-in (what the other tests register) still reads it the
    // same way, template included.
    let parsed = comfy_multi_tests::nomad::jobspec::parse_job_hcl(&j.file.text, "").expect("stand-in parses the job");
    assert_eq!(parsed["ID"], NOMAD_JOB);
    assert_eq!(parsed["NodePool"], "gpu");
    let tmpl = parsed["TaskGroups"][0]["Tasks"][0]["Templates"][0]["EmbeddedTmpl"].as_str().unwrap_or_default();
    assert!(tmpl.contains("INTERNAL_SECRET=") && tmpl.contains("CONSUL_HTTP_TOKEN="), "{tmpl}");
}

// -------------------------------------------------------- ComfyUI and GPUs ---

fn range_fn(args: FuncArgs) -> Result<Value, String> {
    let n = args[0].as_u64().ok_or("range: not a whole number")?;
    Ok(Value::Array((0..n).map(Value::from).collect()))
}

/// Nomad's run-time interpolation of node meta: `${meta.k}` -> meta[k].
fn interpolate_node_meta(s: &str, meta: &BTreeMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${meta.") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 7..];
        let end = after.find('}').expect("closed interpolation");
        let key = &after[..end];
        out.push_str(meta.get(key).unwrap_or_else(|| panic!("node has no meta {key}")));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

fn instance(tags: Vec<String>) -> ServiceInstance {
    ServiceInstance {
        node: "gpu-node".into(),
        id: "comfyui".into(),
        address: "127.0.0.1".into(),
        port: 20000,
        tags,
        meta: BTreeMap::new(),
    }
}

#[test]
fn comfyui_runs_one_instance_per_gpu_tagged_with_the_uuid_gpu_task_leases() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let j = job(&jobs, "comfyui");

    // No device request anywhere: the workflow's device request is the lease,
    // and a ComfyUI holding the GPU would keep every workflow from placing.
    assert!(named(j.body, "device").is_empty(), "comfyui must not reserve nvidia/gpu");
    let workflow = job(&jobs, NOMAD_JOB);
    assert!(!named(workflow.body, "device").is_empty(), "comfy-workflow reserves the GPU");

    // HCL: local.gpu_uuid_refs with gpu_count = 2.
    let locals = one(&j.file.body, "locals");
    let mut ctx = Context::new();
    ctx.declare_var("var", hcl::value!({ gpu_count = 2 }));
    ctx.declare_func("range", FuncDef::builder().param(ParamType::Number).build(range_fn));
    let refs = must_attr(locals, "gpu_uuid_refs").evaluate(&ctx).expect("evaluate local.gpu_uuid_refs");
    let refs: Vec<String> = refs.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(refs, ["${meta.gpu_uuid_0}", "${meta.gpu_uuid_1}"], "HCL hands Nomad run-time meta references");

    // One group per GPU index, over those references.
    let groups = blocks(j.body, "group");
    assert_eq!(groups.len(), 1);
    let (dynamic, group) = groups[0];
    assert_eq!(dynamic.identifier(), "dynamic", "one group per GPU index");
    assert_eq!(traversal_path(must_attr(dynamic.body(), "for_each")).as_deref(), Some("local.gpu_uuid_refs"));
    let constraint = one(group, "constraint");
    assert_eq!(traversal_path(must_attr(constraint, "attribute")).as_deref(), Some("group.value"));
    assert_eq!(string(must_attr(constraint, "operator")), "regexp");

    let (_, task) = blocks(group, "task")[0];
    assert_eq!(string(must_attr(task, "driver")), "raw_exec");
    let env = one(task, "env");
    for key in ["CUDA_VISIBLE_DEVICES", "GPU_UUID"] {
        assert_eq!(traversal_path(must_attr(env, key)).as_deref(), Some("group.value"), "env {key}");
    }
    let script = named(task, "template")
        .into_iter()
        .map(|t| string(must_attr(t, "data")))
        .find(|d| d.contains("main.py"))
        .expect("start script");
    for needed in ["nvidia-smi -L", "$GPU_UUID", "--listen", "--port", "--output-directory"] {
        assert!(script.contains(needed), "start script lacks {needed}");
    }

    // Nomad: the tags of GPU 1, with the node meta the GPU node publishes.
    let service = one(task, "service");
    let mut group_ctx = Context::new();
    group_ctx.declare_var("group", hcl::value!({ key = 1, value = (refs[1].clone()) }));
    let tags = must_attr(service, "tags").evaluate(&group_ctx).expect("evaluate tags");
    let uuid0 = "GPU-0f3c2b1a-1111-2222-3333-444455556666";
    let uuid1 = "GPU-9a8b7c6d-aaaa-bbbb-cccc-ddddeeeeffff";
    let node_meta = BTreeMap::from([("gpu_uuid_0", uuid0), ("gpu_uuid_1", uuid1)]);
    let tags: Vec<String> =
        tags.as_array().unwrap().iter().map(|t| interpolate_node_meta(t.as_str().unwrap(), &node_meta)).collect();
    assert!(tags.contains(&format!("gpu={uuid1}")), "tags {tags:?}");

    // gpu-task (NVIDIA_VISIBLE_DEVICES=uuid1) picks this instance, not GPU 0's.
    let gpu1 = instance(tags);
    assert!(gpu1.has_tag_containing(uuid1));
    assert!(!gpu1.has_tag_containing(uuid0));

    // The node publishes exactly those meta keys (client-gpu.hcl says how).
    let client_gpu = file(&files, "nomad/agent/client-gpu.hcl");
    assert!(client_gpu.text.contains("gpu_uuid_%s") && client_gpu.text.contains("nvidia-smi --query-gpu=index,uuid"));
}

// --------------------------------------------------- clients and agents ---

#[test]
fn host_volumes_drivers_and_binaries_exist_on_the_pool_clients() {
    let files = hcl_files();
    for j in jobs(&files) {
        let pool = resolve_string(must_attr(j.body, "node_pool"), &j.vars);
        let client_file = client_config_of_pool(&files, &pool);
        let client = one(&client_file.body, "client");
        let host_volumes: BTreeMap<String, &Body> =
            blocks(client, "host_volume").into_iter().map(|(b, body)| (label(b).to_string(), body)).collect();

        for group in named(j.body, "group") {
            let mut declared = BTreeSet::new();
            for (b, volume) in blocks(group, "volume") {
                declared.insert(label(b).to_string());
                assert_eq!(string(must_attr(volume, "type")), "host");
                let source = string(must_attr(volume, "source"));
                let hv = host_volumes
                    .get(&source)
                    .unwrap_or_else(|| panic!("{}: host volume {source} is not in {}", j.file.rel, client_file.rel));
                if is_true(attr(hv, "read_only")) {
                    assert!(is_true(attr(volume, "read_only")), "{}: {source} is read-only on the client", j.file.rel);
                }
            }
            for (_, task) in blocks(group, "task") {
                let driver = string(must_attr(task, "driver"));
                let what = format!("{}: {driver} task", j.file.rel);
                let plugin = client_file
                    .body
                    .blocks()
                    .find(|b| b.identifier() == "plugin" && label(b) == driver)
                    .map(|b| one(b.body(), "config"));
                match driver.as_str() {
                    // raw_exec is off unless enabled.
                    "raw_exec" => assert!(
                        is_true(plugin.and_then(|c| attr(c, "enabled"))),
                        "{what}: raw_exec enabled on pool {pool}"
                    ),
                    // exec is on unless disabled.
                    "exec" => {
                        assert!(!matches!(plugin.and_then(|c| attr(c, "enabled")), Some(Expression::Bool(false))))
                    }
                    other => panic!("{what}: unexpected driver {other}"),
                }
                let mounts = blocks(task, "volume_mount");
                if driver == "raw_exec" {
                    assert!(mounts.is_empty(), "{what}: raw_exec cannot mount volumes");
                }
                for (_, m) in mounts {
                    let v = string(must_attr(m, "volume"));
                    assert!(declared.contains(&v), "{what}: volume_mount of undeclared volume {v}");
                }
                // An exec task's binary must be inside its chroot.
                if driver == "exec" {
                    let command = resolve_string(must_attr(one(task, "config"), "command"), &j.vars);
                    // Nomad's default chroot has /usr and /bin; chroot_env replaces it.
                    let chroot: Vec<String> = match attr(client, "chroot_env") {
                        Some(Expression::Object(map)) => map
                            .keys()
                            .map(|k| match k {
                                ObjectKey::Expression(e) => string(e),
                                ObjectKey::Identifier(i) => i.as_str().to_string(),
                                _ => String::new(),
                            })
                            .collect(),
                        Some(other) => panic!("chroot_env is not a map: {other:?}"),
                        None => vec!["/usr".into(), "/bin".into()],
                    };
                    assert!(
                        chroot.iter().any(|dir| command.starts_with(&format!("{}/", dir.trim_end_matches('/')))),
                        "{what}: {command} is outside the chroot ({chroot:?})"
                    );
                }
            }
        }
    }

    // raw_exec does not mount: ComfyUI is pointed at the host paths, which must
    // be those of the host volumes it claims.
    let jobs = jobs(&files);
    let comfyui = job(&jobs, "comfyui");
    let client = one(&file(&files, "nomad/agent/client-gpu.hcl").body, "client");
    let path_of = |name: &str| {
        let (_, hv) = blocks(client, "host_volume").into_iter().find(|(b, _)| label(b) == name).unwrap();
        string(must_attr(hv, "path"))
    };
    assert_eq!(
        resolve_string(must_attr(comfyui.vars["models_dir"], "default"), &comfyui.vars),
        path_of("comfyui-models")
    );
    assert_eq!(
        resolve_string(must_attr(comfyui.vars["output_dir"], "default"), &comfyui.vars),
        path_of("comfyui-output")
    );
}

#[test]
fn agents_enable_acls_mtls_and_the_nvidia_plugin() {
    let files = hcl_files();

    let server = file(&files, "nomad/agent/server.hcl");
    let s = one(&server.body, "server");
    assert!(is_true(attr(s, "enabled")));
    assert_eq!(must_attr(s, "bootstrap_expect"), &Expression::Number(1.into()));
    assert!(
        is_true(attr(one(s, "default_scheduler_config"), "memory_oversubscription_enabled")),
        "comfyui's memory_max = -1 needs it"
    );
    assert!(is_true(attr(one(&server.body, "acl"), "enabled")), "ACLs on");

    let gpu = file(&files, "nomad/agent/client-gpu.hcl");
    let client = one(&gpu.body, "client");
    assert_eq!(string(must_attr(client, "node_pool")), "gpu");
    assert!(is_true(attr(one(&gpu.body, "acl"), "enabled")), "ACLs on");
    let plugin_dir = string(must_attr(&gpu.body, "plugin_dir"));
    let nvidia = gpu
        .body
        .blocks()
        .find(|b| b.identifier() == "plugin" && label(b) == "nomad-device-nvidia")
        .expect("plugin \"nomad-device-nvidia\"");
    let config = one(nvidia.body(), "config");
    assert!(is_true(attr(config, "enabled")));
    assert!(attr(config, "fingerprint_period").is_some());

    // The image installs the plugin where the agent looks for it.
    let packer = repo().join("packer/gpu-node.pkr.hcl");
    if packer.exists() {
        let body: Body = hcl::parse(&std::fs::read_to_string(&packer).unwrap()).unwrap();
        let vars = variables(&body);
        if let Some(v) = vars.get("nomad_plugin_dir") {
            assert_eq!(string(must_attr(v, "default")), plugin_dir, "packer's nomad_plugin_dir");
        }
    }

    let control = file(&files, "nomad/agent/client-control.hcl");
    assert_eq!(string(must_attr(one(&control.body, "client"), "node_pool")), "control");

    // RPC is mutual TLS, with files that exist only on the hosts; HTTP is loopback.
    for f in [server, gpu] {
        let tls = one(&f.body, "tls");
        assert!(is_true(attr(tls, "rpc")), "{}: RPC over TLS", f.rel);
        assert!(is_true(attr(tls, "verify_server_hostname")), "{}", f.rel);
        for key in ["ca_file", "cert_file", "key_file"] {
            assert!(string(must_attr(tls, key)).starts_with("/etc/nomad.d/tls/"), "{}: {key}", f.rel);
        }
        assert_eq!(string(must_attr(one(&f.body, "addresses"), "http")), "127.0.0.1", "{}: HTTP on loopback", f.rel);
        assert_eq!(
            string(must_attr(one(&f.body, "advertise"), "http")),
            "127.0.0.1",
            "{}: Nomad will not derive a loopback advertise address",
            f.rel
        );
    }
}

#[test]
fn the_dispatcher_authenticates_with_its_workload_identity() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let j = job(&jobs, "dispatcher");
    let (_, task) = blocks(one(j.body, "group"), "task")[0];
    assert!(is_true(attr(one(task, "identity"), "env")), "NOMAD_TOKEN = workload identity");
    let env = one(task, "env");
    assert_eq!(string(must_attr(env, "EXECUTOR")), "nomad");
    assert!(attr(env, "NOMAD_TOKEN").is_none(), "no NOMAD_TOKEN besides the identity");
    for t in named(task, "template") {
        assert!(!string(must_attr(t, "data")).contains("NOMAD_TOKEN"), "no NOMAD_TOKEN besides the identity");
    }
    assert_eq!(resolve_string(must_attr(env, "NOMAD_JOB"), &j.vars), NOMAD_JOB);

    let policy = file(&files, "nomad/acl/dispatcher.policy.hcl");
    let ns = blocks(&policy.body, "namespace");
    assert_eq!(ns.len(), 1);
    assert_eq!(label(ns[0].0), "default");
    let caps = strings(must_attr(ns[0].1, "capabilities"));
    for cap in ["dispatch-job", "read-job", "submit-job"] {
        assert!(caps.contains(&cap.to_string()), "dispatcher policy lacks {cap}");
    }
    assert_eq!(string(must_attr(one(&policy.body, "node"), "policy")), "write", "node write for drain");

    // The command that attaches it is the same everywhere it is written down.
    let apply = "nomad acl policy apply -namespace default -job dispatcher";
    for (rel, t) in [
        ("nomad/dispatcher.nomad.hcl", j.file.text.clone()),
        ("nomad/acl/dispatcher.policy.hcl", policy.text.clone()),
        ("nomad/README.md", read("nomad/README.md")),
    ] {
        let flat = t.replace("\\\n", " ").replace("#", " ");
        let flat = flat.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains(apply), "{rel} shows `{apply} …`");
        assert!(flat.contains("comfy-dispatcher nomad/acl/dispatcher.policy.hcl"), "{rel}: policy name and file");
    }
}

#[test]
fn gateway_secrets_and_tls_come_from_outside_the_repository() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let j = job(&jobs, "gateway");
    let group = one(j.body, "group");
    let (_, task) = blocks(group, "task")[0];

    let secrets = named(task, "template")
        .into_iter()
        .find(|t| string(must_attr(t, "data")).contains("ADMIN_TOKEN="))
        .expect("a template renders ADMIN_TOKEN");
    let data = string(must_attr(secrets, "data"));
    assert!(data.contains(r#"nomadVar "nomad/jobs/gateway""#));
    assert!(data.contains("ADMIN_TOKEN={{ .admin_token }}") && data.contains("INTERNAL_SECRET={{ .internal_secret }}"));
    assert!(string(must_attr(secrets, "destination")).starts_with("secrets/"));
    assert!(is_true(attr(secrets, "env")));
    assert!(is_true(attr(secrets, "error_on_missing_key")), "a half-filled variable must not start the gateway");

    // Certificate and data dir: paths inside the mounted host volumes.
    let env = one(task, "env");
    let mounts: BTreeMap<String, String> = blocks(task, "volume_mount")
        .into_iter()
        .map(|(_, m)| (string(must_attr(m, "volume")), string(must_attr(m, "destination"))))
        .collect();
    let source_of = |volume: &str| {
        let (_, v) = blocks(group, "volume").into_iter().find(|(b, _)| label(b) == volume).unwrap();
        string(must_attr(v, "source"))
    };
    let dest_of = |source: &str| {
        mounts
            .iter()
            .find(|(v, _)| source_of(v) == source)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{source} not mounted"))
    };
    assert_eq!(string(must_attr(env, "DATA_DIR")), dest_of("comfy-data"));
    for key in ["GATEWAY_TLS_CERT", "GATEWAY_TLS_KEY"] {
        assert!(string(must_attr(env, key)).starts_with(&format!("{}/", dest_of("comfy-tls"))), "{key}");
    }

    // The README says how to put both variables, with the same secret.
    let readme = read("nomad/README.md");
    assert!(
        readme.contains("nomad var put nomad/jobs/gateway admin_token=@admin-token internal_secret=@internal-secret")
    );
    assert!(readme.contains("nomad var put nomad/jobs/comfy-workflow internal_secret=@internal-secret"));
}

#[test]
fn redis_keeps_an_append_only_file_on_its_host_volume() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let j = job(&jobs, "redis");
    let group = one(j.body, "group");
    let (_, task) = blocks(group, "task")[0];
    let config = one(task, "config");
    assert!(resolve_string(must_attr(config, "command"), &j.vars).ends_with("/redis-server"));
    let Expression::Array(args) = must_attr(config, "args") else { panic!("args") };
    let args: Vec<String> = args.iter().map(|a| text(resolve(a, &j.vars)).unwrap_or_default()).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    assert_eq!(flag("--appendonly").as_deref(), Some("yes"));
    assert_eq!(flag("--appendfsync").as_deref(), Some("always"));
    let (_, volume) = blocks(group, "volume")[0];
    assert_eq!(string(must_attr(volume, "source")), "redis-data");
    let (_, mount) = blocks(task, "volume_mount")[0];
    assert_eq!(flag("--dir"), Some(string(must_attr(mount, "destination"))), "the AOF is on the host volume");
}

/// Environment variable names a job sets: `env` keys and `NAME=` lines of
/// templates rendered with `env = true`.
fn env_names(task: &Body) -> BTreeSet<String> {
    let mut names: BTreeSet<String> =
        blocks(task, "env").into_iter().flat_map(|(_, e)| e.attributes().map(|a| a.key().to_string())).collect();
    for t in named(task, "template") {
        if !is_true(attr(t, "env")) {
            continue;
        }
        let data = string(must_attr(t, "data"));
        let bytes = data.as_bytes();
        for (i, _) in data.match_indices('=') {
            let start = data[..i]
                .rfind(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .map_or(0, |p| p + 1);
            let name = &data[start..i];
            let boundary = start == 0 || matches!(bytes[start - 1], b'\n' | b' ' | b'}');
            if name.len() >= 3 && boundary && name.starts_with(|c: char| c.is_ascii_uppercase()) {
                names.insert(name.to_string());
            }
        }
    }
    names
}

#[test]
fn the_environment_of_gateway_and_dispatcher_is_documented() {
    let files = hcl_files();
    let jobs = jobs(&files);
    let readme = read("README.md");
    let mut sources = String::new();
    for dir in ["dispatcher/src", "gateway/src"] {
        let mut paths = Vec::new();
        walk(&repo().join(dir), &mut paths);
        for p in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "rs")) {
            sources.push_str(&std::fs::read_to_string(p).unwrap());
        }
    }
    for name in ["gateway", "dispatcher"] {
        let j = job(&jobs, name);
        let (_, task) = blocks(one(j.body, "group"), "task")[0];
        let names = env_names(task);
        for needed in ["REDIS_URL", "DATA_DIR", "NOMAD_ADDR", "CONSUL_HTTP_ADDR"] {
            assert!(names.contains(needed), "{name} gets {needed}");
        }
        for var in names {
            // In the README's table, or read by the code (`"NAME"`, or a doc
            // comment such as RUST_LOG's in dispatcher::init_tracing).
            let documented = readme.contains(&format!("`{var}`"))
                || sources.contains(&format!("\"{var}\""))
                || sources.contains(&format!("`{var}`"));
            assert!(documented, "{name}: {var} is neither in README.md's configuration nor read by the code");
        }
    }
}

// ---------------------------------------------------------------- secrets ---

/// Attribute or variable names that hold secrets when given a literal value.
fn secret_like(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    let path_like =
        ["_file", "_path", "_dir", "_mode"].iter().any(|s| n.ends_with(s)) || n.starts_with("error_on_missing");
    !path_like
        && ["token", "secret", "password", "passwd", "encrypt", "key", "credential"].iter().any(|w| n.contains(w))
}

/// Literal values allowed under a secret-like name: nothing, paths, and
/// references resolved elsewhere (variables, Nomad/Consul templates).
fn harmless(value: &str) -> bool {
    let v = value.trim();
    v.is_empty()
        || v.starts_with('/')
        || v.starts_with("${")
        || v.starts_with("{{")
        || v.starts_with('@')
        || v.starts_with('<')
}

fn scan_expr(name: &str, expr: &Expression, where_: &str, out: &mut Vec<String>) {
    match expr {
        Expression::String(s) if secret_like(name) && !harmless(s) => out.push(format!("{where_}: {name} = \"{s}\"")),
        Expression::Object(obj) => {
            for (k, v) in obj {
                let key = match k {
                    ObjectKey::Identifier(id) => id.as_str().to_string(),
                    ObjectKey::Expression(e) => text(e).unwrap_or_default(),
                    _ => String::new(),
                };
                scan_expr(&key, v, where_, out);
            }
        }
        Expression::Array(items) => items.iter().for_each(|i| scan_expr(name, i, where_, out)),
        _ => {}
    }
    // NAME=value lines in templates: the value must come from a template call.
    if let Some(t) = text(expr) {
        for line in t.lines() {
            let line = line.trim().trim_start_matches(|c| c != '=' && c != '}' && !char::is_alphanumeric(c));
            let line = line.rsplit("}}").next().unwrap_or(line);
            if let Some((k, v)) = line.split_once('=') {
                let k = k.trim();
                if !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && secret_like(k)
                    && !harmless(v)
                {
                    out.push(format!("{where_}: template line {k}={v}"));
                }
            }
        }
    }
}

fn scan_body(body: &Body, where_: &str, out: &mut Vec<String>) {
    for a in body.attributes() {
        scan_expr(a.key(), a.expr(), where_, out);
    }
    for b in body.blocks() {
        let here = format!("{where_} > {} {}", b.identifier(), label(b));
        if b.identifier() == "variable" && secret_like(label(b)) {
            if let Some(d) = attr(b.body(), "default") {
                if text(d).is_some_and(|d| !harmless(&d)) {
                    out.push(format!("{here}: a secret-named variable with a default"));
                }
            }
        }
        scan_body(b.body(), &here, out);
    }
}

fn is_hex(c: char) -> bool {
    c.is_ascii_hexdigit()
}

/// Text patterns of secrets, whatever the file type.
fn scan_text(t: &str, where_: &str, out: &mut Vec<String>) {
    if t.contains("-----BEGIN") {
        out.push(format!("{where_}: a PEM block (-----BEGIN)"));
    }
    let chars: Vec<char> = t.chars().collect();
    // 32+ hex digits in a row: API tokens, `openssl rand -hex`, Nomad/Consul secrets.
    let mut run = 0;
    for (i, c) in chars.iter().enumerate() {
        run = if is_hex(*c) { run + 1 } else { 0 };
        if run == 32 {
            out.push(format!("{where_}: 32+ hex digits at char {}", i + 1 - 32));
        }
    }
    // UUIDs (8-4-4-4-12): Nomad and Consul ACL tokens look like this.
    let shape = [8, 4, 4, 4, 12];
    for start in 0..chars.len() {
        if start > 0 && (is_hex(chars[start - 1]) || chars[start - 1] == '-') {
            continue;
        }
        let mut i = start;
        let mut ok = true;
        for (n, len) in shape.iter().enumerate() {
            if i + len > chars.len() || !chars[i..i + len].iter().all(|c| is_hex(*c)) {
                ok = false;
                break;
            }
            i += len;
            if n < 4 {
                if chars.get(i) != Some(&'-') {
                    ok = false;
                    break;
                }
                i += 1;
            }
        }
        if ok && !chars.get(i).is_some_and(|c| is_hex(*c) || *c == '-') {
            out.push(format!("{where_}: a UUID-shaped token: {}", chars[start..i].iter().collect::<String>()));
        }
    }
    // JWTs (workload identities, OIDC tokens).
    for (i, _) in t.match_indices("eyJ") {
        let tail: String =
            t[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
        if tail.len() >= 40 && tail.matches('.').count() >= 2 {
            out.push(format!("{where_}: a JWT"));
        }
    }
    // token = "…" / encrypt = "…" style assignments with a literal value.
    for line in t.lines() {
        let l = line.trim_start_matches(|c: char| c == '#' || c == '/' || c.is_whitespace());
        if let Some((k, v)) = l.split_once('=') {
            let k = k.trim();
            let v = v.trim();
            if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && secret_like(k) && v.starts_with('"') {
                let inner = v.trim_matches(|c| c == '"' || c == ',');
                // printf formats, <placeholders>, and anything interpolated.
                let placeholder =
                    inner.starts_with('%') || inner.starts_with('<') || inner.contains("${") || inner.contains("{{");
                if !harmless(inner) && !placeholder {
                    out.push(format!("{where_}: {k} = {v}"));
                }
            }
        }
    }
}

#[test]
fn the_secret_scanner_catches_secrets_and_passes_references() {
    let leaks = [
        r#"consul { token = "3f9c1b2e-7d4a-4c1e-9b2a-0d5e6f7a8b9c" }"#,
        "server {\n  encrypt = \"k3bQh8Qy1Zq9n3m0d5XcWw==\"\n}\n",
        "task \"t\" {\n  env {\n    ADMIN_TOKEN = \"hunter2hunter2\"\n  }\n}\n",
        "variable \"internal_secret\" {\n  type = string\n  default = \"s3cr3t-value\"\n}\n",
        "template {\n  data = <<-EOT\n  INTERNAL_SECRET=plain-text-secret\n  EOT\n}\n",
        "# export NOMAD_TOKEN=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJnbG9iYWwifQ.c2lnbmF0dXJlLXNpZ25hdHVyZQ\n",
        "x = \"-----BEGIN PRIVATE KEY-----\"\n",
        "# internal_secret: 0c3e8f1a9b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e\n",
    ];
    for leak in leaks {
        let mut out = Vec::new();
        scan_text(leak, "sample", &mut out);
        if let Ok(body) = hcl::parse(leak) {
            scan_body(&body, "sample", &mut out);
        }
        assert!(!out.is_empty(), "not caught: {leak}");
    }
    let fine = [
        "tls {\n  key_file = \"/etc/nomad.d/tls/global-server-nomad-key.pem\"\n}\n",
        "template {\n  data = <<-EOT\n  ADMIN_TOKEN={{ .admin_token }}\n  EOT\n  error_on_missing_key = true\n}\n",
        "env {\n  GATEWAY_TLS_KEY = \"/tls/${var.tls_key_file}\"\n}\n",
        "variable \"tls_key_file\" {\n  type = string\n  default = \"privkey.pem\"\n}\n",
        "# printf 'consul {\\n  token = \"%s\"\\n}\\n' \"$TOKEN\"\n",
        "identity {\n  env = true\n}\n",
    ];
    for ok in fine {
        let mut out = Vec::new();
        scan_text(ok, "sample", &mut out);
        if let Ok(body) = hcl::parse(ok) {
            scan_body(&body, "sample", &mut out);
        }
        assert!(out.is_empty(), "false alarm on {ok}: {out:?}");
    }
}

#[test]
fn no_file_under_nomad_holds_a_secret() {
    let mut found = Vec::new();
    for f in hcl_files() {
        scan_body(&f.body, &f.rel, &mut found);
    }
    for p in nomad_paths() {
        let rel = p.strip_prefix(repo()).unwrap().to_string_lossy().into_owned();
        let Ok(t) = std::fs::read_to_string(&p) else {
            found.push(format!("{rel}: not text"));
            continue;
        };
        scan_text(&t, &rel, &mut found);
        let name = p.file_name().unwrap().to_string_lossy().to_lowercase();
        for bad in [".pem", ".key", ".crt", ".token", ".env", "gossip.hcl", "consul.hcl", "gpu-meta.hcl"] {
            if name.ends_with(bad) {
                found.push(format!("{rel}: a generated/secret file does not belong in the repository"));
            }
        }
    }
    assert!(found.is_empty(), "secrets in nomad/:\n{}", found.join("\n"));
}
