//! HCL2 job specs to Nomad's JSON job, for the stand-in's `POST /v1/jobs/parse`,
//! and the defaults Nomad fills into every registered job ("canonicalize").
//!
//! Covers the subset of HCL2 that `nomad/*.nomad.hcl` use: `variable` blocks
//! (defaults, values from a variables file converted by declared type),
//! `var.x` references, conditionals and operators (via hcl-rs evaluation),
//! `dynamic` blocks with `for_each`/`labels`/`content`, and the job, group,
//! task, constraint, parameterized, restart, reschedule, resources, device,
//! config, env, meta, template and dispatch_payload blocks. Like Nomad,
//! runtime interpolations (`${node.*}`, `${attr.*}`, `${meta.*}`, `${env.*}`,
//! `${NOMAD_*}`) are kept as literal strings. Functions (`format`, `concat`,
//! ...) and `locals` are not supported: parsing such a file fails with a
//! message that says so.

use std::collections::BTreeMap;

use hcl::eval::{Context, Evaluate};
use hcl::expr::{Expression, TemplateExpr};
use hcl::{Block, Body};
use serde_json::{json, Map, Value};

/// Roots of interpolations that Nomad resolves at run time, on the client.
const RUNTIME_ROOTS: [&str; 5] = ["node.", "attr.", "meta.", "env.", "NOMAD_"];

/// A Go duration (`30s`, `1m30s`, `250ms`, `24h`) in nanoseconds.
pub fn go_duration_ns(s: &str) -> Option<i64> {
    let s = s.trim();
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * factor;
    }
    Some(total as i64)
}

/// A duration attribute: a Go duration string, or a number of nanoseconds.
fn duration_value(v: &Value) -> Result<i64, String> {
    match v {
        Value::String(s) => {
            go_duration_ns(s).ok_or_else(|| format!("{s:?} is not a duration (like \"30s\")"))
        }
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("{n} is not a duration")),
        other => Err(format!("{other} is not a duration")),
    }
}

/// A block after evaluation: attributes as JSON values, nested blocks in order.
#[derive(Debug, Default, Clone)]
struct Evaluated {
    attrs: BTreeMap<String, Value>,
    blocks: Vec<(String, Vec<String>, Evaluated)>,
}

impl Evaluated {
    fn blocks<'a>(
        &'a self,
        ident: &'a str,
    ) -> impl Iterator<Item = (&'a [String], &'a Evaluated)> + 'a {
        self.blocks
            .iter()
            .filter(move |(i, _, _)| i == ident)
            .map(|(_, l, b)| (l.as_slice(), b))
    }
    fn block<'a>(&'a self, ident: &'a str) -> Option<&'a Evaluated> {
        self.blocks(ident).next().map(|(_, b)| b)
    }
    fn str(&self, key: &str) -> Option<String> {
        match self.attrs.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
    fn int(&self, key: &str) -> Result<Option<i64>, String> {
        match self.attrs.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| format!("{key} = {n} is not a whole number")),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| format!("{key} = {s:?} is not a number")),
            Some(other) => Err(format!("{key} = {other} is not a number")),
        }
    }
    fn bool(&self, key: &str) -> Option<bool> {
        self.attrs.get(key).and_then(Value::as_bool)
    }
    fn dur(&self, key: &str) -> Result<Option<i64>, String> {
        match self.attrs.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => duration_value(v)
                .map(Some)
                .map_err(|e| format!("{key}: {e}")),
        }
    }
    fn strings(&self, key: &str) -> Option<Vec<String>> {
        match self.attrs.get(key)? {
            Value::Array(a) => Some(
                a.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect(),
            ),
            Value::String(s) => Some(vec![s.clone()]),
            _ => None,
        }
    }
    /// Attributes plus nested blocks (as lists of objects), for free-form
    /// blocks such as a task's `config`.
    fn to_object(&self) -> Value {
        let mut m: Map<String, Value> = self
            .attrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (ident, _, b) in &self.blocks {
            let entry = m
                .entry(ident.clone())
                .or_insert_with(|| Value::Array(vec![]));
            if let Value::Array(a) = entry {
                a.push(b.to_object());
            }
        }
        Value::Object(m)
    }
}

/// Inserts `$` before runtime interpolations so hcl-rs keeps them literal:
/// `${node.unique.name}` → `$${node.unique.name}` (HCL's escape for `${`).
fn escape_runtime(template: &str) -> String {
    let mut out = String::with_capacity(template.len() + 8);
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < template.len() {
        let rest = &template[i..];
        if rest.starts_with("${") && !(i > 0 && bytes[i - 1] == b'$') {
            let inner = rest[2..].trim_start();
            if RUNTIME_ROOTS.iter().any(|r| inner.starts_with(r)) {
                out.push('$');
            }
        }
        let ch = rest.chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn escape_expr(expr: &mut Expression) {
    match expr {
        Expression::TemplateExpr(t) => match t.as_mut() {
            TemplateExpr::QuotedString(s) => *s = escape_runtime(s),
            TemplateExpr::Heredoc(h) => h.template = escape_runtime(&h.template),
        },
        Expression::Array(items) => items.iter_mut().for_each(escape_expr),
        Expression::Object(obj) => obj.values_mut().for_each(escape_expr),
        Expression::Parenthesis(e) => escape_expr(e),
        Expression::Conditional(c) => {
            escape_expr(&mut c.true_expr);
            escape_expr(&mut c.false_expr);
        }
        _ => {}
    }
}

fn eval_expr(expr: &Expression, ctx: &Context, what: &str) -> Result<Value, String> {
    let mut expr = expr.clone();
    escape_expr(&mut expr);
    let v: hcl::Value = expr.evaluate(ctx).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("undefined function") {
            format!("{what}: {msg} (the Nomad stand-in supports no HCL functions)")
        } else {
            format!("{what}: {msg}")
        }
    })?;
    serde_json::to_value(v).map_err(|e| format!("{what}: {e}"))
}

fn eval_body(body: &Body, ctx: &Context, path: &str) -> Result<Evaluated, String> {
    let mut out = Evaluated::default();
    for attr in body.attributes() {
        let v = eval_expr(&attr.expr, ctx, &format!("{path}.{}", attr.key()))?;
        out.attrs.insert(attr.key().to_string(), v);
    }
    for block in body.blocks() {
        if block.identifier() == "dynamic" {
            expand_dynamic(block, ctx, path, &mut out)?;
        } else {
            let labels = block
                .labels()
                .iter()
                .map(|l| l.as_str().to_string())
                .collect();
            let b = eval_body(block.body(), ctx, &format!("{path}.{}", block.identifier()))?;
            out.blocks.push((block.identifier().to_string(), labels, b));
        }
    }
    Ok(out)
}

/// `dynamic "name" { for_each = …; iterator = …; labels = […]; content { … } }`.
fn expand_dynamic(
    block: &Block,
    ctx: &Context,
    path: &str,
    out: &mut Evaluated,
) -> Result<(), String> {
    let name = block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .ok_or_else(|| format!("{path}: a dynamic block needs a label"))?;
    let what = format!("{path}.dynamic \"{name}\"");
    let body = block.body();
    let attr = |key: &str| {
        body.attributes()
            .find(|a| a.key() == key)
            .map(|a| a.expr.clone())
    };
    let for_each = attr("for_each").ok_or_else(|| format!("{what}: for_each is required"))?;
    let iterator = match attr("iterator") {
        Some(Expression::Variable(v)) => v.to_string(),
        Some(_) => return Err(format!("{what}: iterator must be a bare name")),
        None => name.clone(),
    };
    let content = body
        .blocks()
        .find(|b| b.identifier() == "content")
        .ok_or_else(|| format!("{what}: a content block is required"))?;
    let items: Vec<(Value, Value)> = match eval_expr(&for_each, ctx, &what)? {
        Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| (json!(i), v))
            .collect(),
        Value::Object(o) => o.into_iter().map(|(k, v)| (json!(k), v)).collect(),
        Value::Null => vec![],
        other => {
            return Err(format!(
                "{what}: for_each must be a list, set or map, not {other}"
            ))
        }
    };
    for (key, value) in items {
        let mut inner = ctx.clone();
        let it: hcl::Value = serde_json::from_value(json!({ "key": key, "value": value }))
            .map_err(|e| format!("{what}: {e}"))?;
        inner.declare_var(iterator.as_str(), it);
        let labels = match attr("labels") {
            Some(expr) => match eval_expr(&expr, &inner, &what)? {
                Value::Array(a) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect(),
                other => return Err(format!("{what}: labels must be a list, not {other}")),
            },
            None => vec![],
        };
        let b = eval_body(content.body(), &inner, &format!("{path}.{name}"))?;
        out.blocks.push((name.clone(), labels, b));
    }
    Ok(())
}

/// Converts a variable's value to its declared type, as `nomad job run -var`
/// does for string values (`-var gpu_count=0` gives the number 0).
fn convert_to_type(name: &str, ty: Option<&str>, v: Value) -> Result<Value, String> {
    let bad = |v: &Value, t: &str| format!("Invalid value for variable {name:?}: {v} is not a {t}");
    match (ty, v) {
        (Some("number"), Value::String(s)) => {
            if let Ok(i) = s.trim().parse::<i64>() {
                Ok(json!(i))
            } else {
                s.trim()
                    .parse::<f64>()
                    .map(|f| json!(f))
                    .map_err(|_| bad(&Value::String(s.clone()), "number"))
            }
        }
        (Some("bool"), Value::String(s)) => match s.trim() {
            "true" => Ok(json!(true)),
            "false" => Ok(json!(false)),
            _ => Err(bad(&Value::String(s.clone()), "bool")),
        },
        (Some("string"), Value::Number(n)) => Ok(json!(n.to_string())),
        (Some("string"), Value::Bool(b)) => Ok(json!(b.to_string())),
        (Some(t), Value::String(s))
            if t.starts_with("list")
                || t.starts_with("set")
                || t.starts_with("map")
                || t.starts_with("object")
                || t.starts_with("tuple") =>
        {
            let body = hcl::parse(&format!("v = {s}"))
                .map_err(|e| format!("Invalid value for variable {name:?}: {e}"))?;
            let expr = body
                .attributes()
                .next()
                .map(|a| a.expr.clone())
                .ok_or_else(|| bad(&Value::String(s.clone()), t))?;
            eval_expr(&expr, &Context::new(), name)
        }
        (_, v) => Ok(v),
    }
}

/// The declared type of a `variable` block, as text (`number`, `list(string)`).
fn type_name(block: &Block) -> Option<String> {
    let expr = block
        .body()
        .attributes()
        .find(|a| a.key() == "type")?
        .expr
        .clone();
    match expr {
        Expression::Variable(v) => Some(v.to_string()),
        Expression::FuncCall(f) => Some(format!("{}(…)", f.name.name)),
        _ => None,
    }
}

/// Parses an HCL2 job spec with an HCL2 variables file (`name = value` lines)
/// into Nomad's JSON job, canonicalized. Errors read like Nomad's.
pub fn parse_job_hcl(hcl_text: &str, variables: &str) -> Result<Value, String> {
    let body = hcl::parse(hcl_text).map_err(|e| format!("error parsing job: {e}"))?;
    let given: BTreeMap<String, Value> = if variables.trim().is_empty() {
        BTreeMap::new()
    } else {
        let vars = hcl::parse(variables).map_err(|e| format!("error parsing variables: {e}"))?;
        vars.attributes()
            .map(|a| {
                Ok((
                    a.key().to_string(),
                    eval_expr(&a.expr, &Context::new(), a.key())?,
                ))
            })
            .collect::<Result<_, String>>()?
    };
    let mut values = Map::new();
    for block in body.blocks().filter(|b| b.identifier() == "variable") {
        let name = block
            .labels()
            .first()
            .map(|l| l.as_str().to_string())
            .ok_or("a variable block needs a name")?;
        let ty = type_name(block);
        let value = match given.get(&name) {
            Some(v) => convert_to_type(&name, ty.as_deref(), v.clone())?,
            None => match block.body().attributes().find(|a| a.key() == "default") {
                Some(a) => eval_expr(
                    &a.expr,
                    &Context::new(),
                    &format!("variable {name:?} default"),
                )?,
                None => {
                    return Err(format!(
                        "Required variable {name:?} is not set: the variable has no default value"
                    ))
                }
            },
        };
        values.insert(name, value);
    }
    for name in given.keys() {
        if !values.contains_key(name) {
            return Err(format!("Undefined -var variable: A {name:?} variable was passed in but was not found in known variables. To declare variable {name:?}, place this block in your job specification file"));
        }
    }
    if body.blocks().any(|b| b.identifier() == "locals") {
        return Err("locals blocks are not supported by the Nomad stand-in".into());
    }
    let mut ctx = Context::new();
    let vars: hcl::Value =
        serde_json::from_value(Value::Object(values)).map_err(|e| e.to_string())?;
    ctx.declare_var("var", vars);

    let mut jobs = body.blocks().filter(|b| b.identifier() == "job");
    let job_block = jobs.next().ok_or("error parsing job: no job block found")?;
    if jobs.next().is_some() {
        return Err("error parsing job: only one job block is allowed".into());
    }
    let id = job_block
        .labels()
        .first()
        .map(|l| l.as_str().to_string())
        .ok_or("error parsing job: the job block needs a name")?;
    let job = eval_body(job_block.body(), &ctx, "job")?;
    let mut out = job_json(&id, &job)?;
    canonicalize_job(&mut out);
    Ok(out)
}

fn constraints(b: &Evaluated) -> Value {
    let list: Vec<Value> = b
        .blocks("constraint")
        .map(|(_, c)| {
            let operand = c.str("operator").unwrap_or_else(|| "=".into());
            json!({
                "LTarget": c.str("attribute").unwrap_or_default(),
                "RTarget": c.str("value").unwrap_or_default(),
                "Operand": operand,
            })
        })
        .collect();
    if list.is_empty() {
        Value::Null
    } else {
        Value::Array(list)
    }
}

fn string_map(b: Option<&Evaluated>) -> Value {
    match b {
        None => Value::Null,
        Some(b) => Value::Object(
            b.attrs
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        Value::String(
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string()),
                        ),
                    )
                })
                .collect(),
        ),
    }
}

fn job_json(id: &str, job: &Evaluated) -> Result<Value, String> {
    let mut out = json!({
        "ID": id,
        "Name": job.str("name").unwrap_or_else(|| id.to_string()),
        "Type": job.str("type").unwrap_or_else(|| "service".into()),
        "Priority": job.int("priority")?.unwrap_or(50),
        "Region": job.str("region"),
        "Namespace": job.str("namespace"),
        "NodePool": job.str("node_pool"),
        "AllAtOnce": job.bool("all_at_once").unwrap_or(false),
        "Datacenters": job.strings("datacenters"),
        "Constraints": constraints(job),
        "Meta": string_map(job.block("meta")),
    });
    if let Some(p) = job.block("parameterized") {
        out["ParameterizedJob"] = json!({
            "Payload": p.str("payload").unwrap_or_else(|| "optional".into()),
            "MetaRequired": p.strings("meta_required"),
            "MetaOptional": p.strings("meta_optional"),
        });
    }
    let mut groups = Vec::new();
    for (labels, g) in job.blocks("group") {
        groups.push(group_json(labels.first().cloned().unwrap_or_default(), g)?);
    }
    out["TaskGroups"] = Value::Array(groups);
    Ok(out)
}

fn group_json(name: String, g: &Evaluated) -> Result<Value, String> {
    let mut out = json!({
        "Name": name,
        "Count": g.int("count")?.unwrap_or(1),
        "Constraints": constraints(g),
        "Meta": string_map(g.block("meta")),
    });
    if let Some(r) = g.block("restart") {
        out["RestartPolicy"] = json!({
            "Attempts": r.int("attempts")?,
            "Interval": r.dur("interval")?,
            "Delay": r.dur("delay")?,
            "Mode": r.str("mode"),
            "RenderTemplates": r.bool("render_templates"),
        });
    }
    if let Some(r) = g.block("reschedule") {
        out["ReschedulePolicy"] = json!({
            "Attempts": r.int("attempts")?,
            "Interval": r.dur("interval")?,
            "Delay": r.dur("delay")?,
            "DelayFunction": r.str("delay_function"),
            "MaxDelay": r.dur("max_delay")?,
            "Unlimited": r.bool("unlimited"),
        });
    }
    if let Some(d) = g.block("ephemeral_disk") {
        out["EphemeralDisk"] = json!({ "SizeMB": d.int("size")?, "Sticky": d.bool("sticky"), "Migrate": d.bool("migrate") });
    }
    let mut tasks = Vec::new();
    for (labels, t) in g.blocks("task") {
        tasks.push(task_json(labels.first().cloned().unwrap_or_default(), t)?);
    }
    out["Tasks"] = Value::Array(tasks);
    Ok(out)
}

fn task_json(name: String, t: &Evaluated) -> Result<Value, String> {
    let mut out = json!({
        "Name": name,
        "Driver": t.str("driver").unwrap_or_default(),
        "User": t.str("user").unwrap_or_default(),
        "Config": t.block("config").map(Evaluated::to_object).unwrap_or(Value::Null),
        "Env": string_map(t.block("env")),
        "Meta": string_map(t.block("meta")),
        "Constraints": constraints(t),
        "KillTimeout": t.dur("kill_timeout")?,
        "KillSignal": t.str("kill_signal").unwrap_or_default(),
        "Leader": t.bool("leader").unwrap_or(false),
    });
    if let Some(p) = t.block("dispatch_payload") {
        out["DispatchPayload"] = json!({ "File": p.str("file").unwrap_or_default() });
    }
    if let Some(r) = t.block("resources") {
        let devices: Vec<Value> = r
            .blocks("device")
            .map(|(labels, d)| {
                Ok(json!({
                    "Name": labels.first().cloned().unwrap_or_default(),
                    "Count": d.int("count")?.unwrap_or(1),
                    "Constraints": constraints(d),
                    "Affinities": null,
                }))
            })
            .collect::<Result<_, String>>()?;
        out["Resources"] = json!({
            "CPU": r.int("cpu")?,
            "Cores": r.int("cores")?,
            "MemoryMB": r.int("memory")?,
            "MemoryMaxMB": r.int("memory_max")?,
            "Devices": if devices.is_empty() { Value::Null } else { Value::Array(devices) },
        });
    }
    let templates: Vec<Value> = t
        .blocks("template")
        .map(|(_, tp)| {
            Ok(json!({
                "SourcePath": tp.str("source").unwrap_or_default(),
                "DestPath": tp.str("destination").unwrap_or_default(),
                "EmbeddedTmpl": tp.str("data").unwrap_or_default(),
                "ChangeMode": tp.str("change_mode").unwrap_or_else(|| "restart".into()),
                "ChangeSignal": tp.str("change_signal").unwrap_or_default(),
                "Splay": tp.dur("splay")?.unwrap_or(5_000_000_000),
                "Perms": tp.str("perms").unwrap_or_else(|| "0644".into()),
                "LeftDelim": tp.str("left_delimiter").unwrap_or_else(|| "{{".into()),
                "RightDelim": tp.str("right_delimiter").unwrap_or_else(|| "}}".into()),
                "Envvars": tp.bool("env").unwrap_or(false),
                "ErrMissingKey": tp.bool("error_on_missing_key").unwrap_or(false),
            }))
        })
        .collect::<Result<_, String>>()?;
    if !templates.is_empty() {
        out["Templates"] = Value::Array(templates);
    }
    Ok(out)
}

/// Sets `obj[key] = value` when the key is missing or null.
fn default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    match obj.get(key) {
        None | Some(Value::Null) => {
            obj.insert(key.to_string(), value);
        }
        _ => {}
    }
}

/// Sets the keys of `defaults` that are missing or null in `obj[key]`
/// (creating it as an object when it is missing or null).
fn merge_defaults(obj: &mut Map<String, Value>, key: &str, defaults: Value) {
    let target = obj.entry(key.to_string()).or_insert(Value::Null);
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let (Some(t), Value::Object(d)) = (target.as_object_mut(), defaults) {
        for (k, v) in d {
            default(t, &k, v);
        }
    }
}

/// Fills Nomad's defaults into a JSON job (as `api.Job.Canonicalize` does for
/// the fields we use), so that parse and register give complete jobs with
/// every field of the samples in `shared/nomad-api`.
pub fn canonicalize_job(job: &mut Value) {
    let Some(obj) = job.as_object_mut() else {
        return;
    };
    let id = obj
        .get("ID")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let batch = matches!(
        obj.get("Type").and_then(Value::as_str),
        Some("batch") | Some("sysbatch")
    );
    for (k, v) in [
        ("Region", json!("global")),
        ("Namespace", json!("default")),
        ("Name", json!(id)),
        ("Type", json!("service")),
        ("Priority", json!(50)),
        ("AllAtOnce", json!(false)),
        ("Datacenters", json!(["*"])),
        ("NodePool", json!("default")),
        ("ConsulToken", json!("")),
        ("ConsulNamespace", json!("")),
        ("VaultToken", json!("")),
        ("VaultNamespace", json!("")),
        ("NomadTokenID", json!("")),
        ("Stop", json!(false)),
        ("ParentID", json!("")),
        ("Dispatched", json!(false)),
        ("DispatchIdempotencyToken", json!("")),
        ("Status", json!("")),
        ("StatusDescription", json!("")),
        ("Stable", json!(false)),
        ("Version", json!(0)),
        ("CreateIndex", json!(0)),
        ("ModifyIndex", json!(0)),
        ("JobModifyIndex", json!(0)),
    ] {
        default(obj, k, v);
    }
    for k in [
        "Constraints",
        "Affinities",
        "Spreads",
        "Update",
        "Multiregion",
        "Periodic",
        "ParameterizedJob",
        "Reschedule",
        "Migrate",
        "Meta",
        "Payload",
        "SubmitTime",
        "UI",
    ] {
        obj.entry(k.to_string()).or_insert(Value::Null);
    }
    if let Some(p) = obj
        .get_mut("ParameterizedJob")
        .and_then(Value::as_object_mut)
    {
        default(p, "Payload", json!("optional"));
        p.entry("MetaRequired").or_insert(Value::Null);
        p.entry("MetaOptional").or_insert(Value::Null);
    }
    let restart_default = if batch {
        json!({ "Attempts": 3, "Interval": 86_400_000_000_000_i64, "Delay": 15_000_000_000_i64, "Mode": "fail", "RenderTemplates": false })
    } else {
        json!({ "Attempts": 2, "Interval": 1_800_000_000_000_i64, "Delay": 15_000_000_000_i64, "Mode": "fail", "RenderTemplates": false })
    };
    let reschedule_default = if batch {
        json!({ "Attempts": 1, "Interval": 86_400_000_000_000_i64, "Delay": 5_000_000_000_i64, "DelayFunction": "constant", "MaxDelay": 0, "Unlimited": false })
    } else {
        json!({ "Attempts": 0, "Interval": 0, "Delay": 30_000_000_000_i64, "DelayFunction": "exponential", "MaxDelay": 3_600_000_000_000_i64, "Unlimited": true })
    };
    let groups = obj.entry("TaskGroups").or_insert(json!([]));
    if groups.is_null() {
        *groups = json!([]);
    }
    for g in groups.as_array_mut().into_iter().flatten() {
        let Some(g) = g.as_object_mut() else { continue };
        default(g, "Count", json!(1));
        merge_defaults(g, "RestartPolicy", restart_default.clone());
        merge_defaults(g, "ReschedulePolicy", reschedule_default.clone());
        merge_defaults(
            g,
            "EphemeralDisk",
            json!({ "Sticky": false, "SizeMB": 300, "Migrate": false }),
        );
        for k in [
            "Constraints",
            "Affinities",
            "Spreads",
            "Volumes",
            "Update",
            "Migrate",
            "Networks",
            "Meta",
            "Services",
            "ShutdownDelay",
            "StopAfterClientDisconnect",
            "MaxClientDisconnect",
            "Scaling",
            "Consul",
            "Disconnect",
        ] {
            g.entry(k.to_string()).or_insert(Value::Null);
        }
        let group_restart = g.get("RestartPolicy").cloned().unwrap_or(Value::Null);
        let tasks = g.entry("Tasks").or_insert(json!([]));
        if tasks.is_null() {
            *tasks = json!([]);
        }
        for t in tasks.as_array_mut().into_iter().flatten() {
            let Some(t) = t.as_object_mut() else { continue };
            for (k, v) in [
                ("User", json!("")),
                ("KillTimeout", json!(5_000_000_000_i64)),
                ("KillSignal", json!("")),
                ("ShutdownDelay", json!(0)),
                ("Leader", json!(false)),
                ("Kind", json!("")),
            ] {
                default(t, k, v);
            }
            default(t, "RestartPolicy", group_restart.clone());
            merge_defaults(
                t,
                "LogConfig",
                json!({ "MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": false }),
            );
            merge_defaults(
                t,
                "Resources",
                json!({ "CPU": 100, "Cores": 0, "MemoryMB": 300, "MemoryMaxMB": 0, "DiskMB": null, "Networks": null, "Devices": null, "IOPS": 0 }),
            );
            for k in [
                "Lifecycle",
                "Config",
                "Constraints",
                "Affinities",
                "Spreads",
                "Env",
                "Services",
                "Meta",
                "Artifacts",
                "Vault",
                "Templates",
                "DispatchPayload",
                "VolumeMounts",
                "ScalingPolicies",
                "Identity",
            ] {
                t.entry(k.to_string()).or_insert(Value::Null);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration_ns("30s"), Some(30_000_000_000));
        assert_eq!(go_duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(go_duration_ns("250ms"), Some(250_000_000));
        assert_eq!(go_duration_ns("0"), Some(0));
        assert_eq!(go_duration_ns("5"), None);
        assert_eq!(go_duration_ns("s"), None);
    }

    #[test]
    fn runtime_interpolations_stay_literal() {
        assert_eq!(
            escape_runtime("${node.unique.name}"),
            "$${node.unique.name}"
        );
        assert_eq!(escape_runtime("$${node.x}"), "$${node.x}");
        assert_eq!(
            escape_runtime("${var.x}-${NOMAD_META_a}"),
            "${var.x}-$${NOMAD_META_a}"
        );
    }

    #[test]
    fn parses_a_small_job() {
        let hcl = r#"
            variable "n" {
              type    = number
              default = 1
            }
            job "j" {
              type = "batch"
              constraint {
                attribute = "${attr.kernel.name}"
                value     = "linux"
              }
              group "g" {
                task "t" {
                  driver = "raw_exec"
                  config {
                    command = "/bin/sh"
                    args    = ["-c", "exit ${var.n}"]
                  }
                  resources {
                    dynamic "device" {
                      for_each = var.n > 0 ? [var.n] : []
                      labels   = ["nvidia/gpu"]
                      content {
                        count = device.value
                      }
                    }
                  }
                }
              }
            }
        "#;
        let job = parse_job_hcl(hcl, "n = \"2\"\n").unwrap();
        assert_eq!(job["Constraints"][0]["LTarget"], "${attr.kernel.name}");
        let task = &job["TaskGroups"][0]["Tasks"][0];
        assert_eq!(task["Config"]["args"][1], "exit 2");
        assert_eq!(
            task["Resources"]["Devices"][0],
            json!({"Name": "nvidia/gpu", "Count": 2, "Constraints": null, "Affinities": null})
        );
        assert_eq!(task["KillTimeout"], 5_000_000_000_i64);
        let job = parse_job_hcl(hcl, "n = 0").unwrap();
        assert_eq!(
            job["TaskGroups"][0]["Tasks"][0]["Resources"]["Devices"],
            Value::Null
        );
        assert!(parse_job_hcl(hcl, "m = 1")
            .unwrap_err()
            .contains("Undefined -var variable"));
        assert!(parse_job_hcl(hcl, "n = \"x\"")
            .unwrap_err()
            .contains("not a number"));
    }
}
