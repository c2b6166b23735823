//! Which node runs next, and which nodes can come from the cache.
//!
//! Why a port: the recorded transcripts fix the order of `executing`
//! messages (3, 4, 1, 2, 5, 6, 7 for the model-free graph), and that order
//! falls out of ComfyUI's `ExecutionList` (`comfy_execution/graph.py`):
//! nodes are staged from the output backwards in input order, ready nodes
//! are kept in staging order, and `ux_friendly_pick_node` prefers output
//! nodes and nodes that feed them. The cache key is ComfyUI's input
//! signature: class, `IS_CHANGED` and inputs, with links replaced by the
//! signature of the linked node, so an identical graph (from any client)
//! is served from the cache.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use super::json::{Json, Map};
use super::nodes::Definition;

/// A link `[node_id, slot]` as ComfyUI's `is_link` sees it.
pub fn as_link(value: &Json) -> Option<(&str, i128)> {
    match value.as_array()?.as_slice() {
        [Json::String(id), slot] => match slot {
            Json::Number(n) if n.is_f64() => n.as_f64().map(|f| (id.as_str(), f as i128)),
            Json::Number(_) => slot.py_int().map(|s| (id.as_str(), s)),
            _ => None,
        },
        _ => None,
    }
}

/// The links of a node in input order: `(input name, from node, slot)`.
pub fn links(node: &Json) -> Vec<(String, String, i128)> {
    node.get("inputs")
        .and_then(Json::as_object)
        .map(|inputs| {
            inputs
                .iter()
                .filter_map(|(name, v)| as_link(v).map(|(id, slot)| (name.clone(), id.to_string(), slot)))
                .collect()
        })
        .unwrap_or_default()
}

fn is_output(prompt: &Map<Json>, id: &str) -> bool {
    prompt
        .get(id)
        .and_then(|n| n.get("class_type"))
        .and_then(Json::as_str)
        .and_then(Definition::of)
        .is_some_and(|d| d.is_output_node())
}

/// ComfyUI's `ExecutionList` without lazy inputs and subgraphs.
pub struct ExecutionList<'a> {
    prompt: &'a Map<Json>,
    /// Staged nodes in staging order (`pendingNodes`).
    pending: Vec<String>,
    block_count: HashMap<String, usize>,
    /// For each node, the nodes waiting on it, in link order.
    blocking: HashMap<String, Vec<String>>,
}

impl<'a> ExecutionList<'a> {
    /// An empty list over `prompt`.
    pub fn new(prompt: &'a Map<Json>) -> Self {
        ExecutionList { prompt, pending: Vec::new(), block_count: HashMap::new(), blocking: HashMap::new() }
    }

    /// `add_node`: stages `id` and, recursively, its uncached inputs.
    pub fn add_node(&mut self, id: &str, is_cached: &dyn Fn(&str) -> bool) {
        let mut stack = vec![id.to_string()];
        let mut edges: Vec<(String, String)> = Vec::new();
        while let Some(unique_id) = stack.pop() {
            if self.pending.contains(&unique_id) {
                continue;
            }
            self.pending.push(unique_id.clone());
            self.block_count.insert(unique_id.clone(), 0);
            self.blocking.insert(unique_id.clone(), Vec::new());
            let Some(node) = self.prompt.get(&unique_id) else { continue };
            for (_, from, _) in links(node) {
                // A link to a node that does not exist cannot pass validation
                // on a declared input; on an undeclared one it is ignored.
                if !self.prompt.contains_key(&from) {
                    continue;
                }
                if !is_cached(&from) {
                    stack.push(from.clone());
                }
                edges.push((from, unique_id.clone()));
            }
        }
        for (from, to) in edges {
            if is_cached(&from) {
                continue;
            }
            self.add_node(&from, is_cached);
            let waiting = self.blocking.entry(from).or_default();
            if !waiting.contains(&to) {
                waiting.push(to.clone());
                *self.block_count.entry(to).or_default() += 1;
            }
        }
    }

    /// Whether nothing is left to run.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// `stage_node_execution`: the next node, or `Err(nodes)` on a cycle.
    pub fn next(&self) -> Result<Option<String>, Vec<String>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let ready: Vec<&String> = self.pending.iter().filter(|id| self.block_count.get(*id) == Some(&0)).collect();
        if ready.is_empty() {
            return Err(self.pending.clone());
        }
        Ok(Some(self.ux_friendly_pick(&ready).clone()))
    }

    /// ComfyUI's `ux_friendly_pick_node`.
    fn ux_friendly_pick<'b>(&self, ready: &[&'b String]) -> &'b String {
        let output = |id: &str| is_output(self.prompt, id);
        let blocked = |id: &str| self.blocking.get(id).cloned().unwrap_or_default();
        if let Some(id) = ready.iter().find(|id| output(id)) {
            return id;
        }
        if let Some(id) = ready.iter().find(|id| blocked(id).iter().any(|b| output(b))) {
            return id;
        }
        if let Some(id) = ready.iter().find(|id| blocked(id).iter().any(|b| blocked(b).iter().any(|b1| output(b1)))) {
            return id;
        }
        ready[0]
    }

    /// `complete_node_execution`: unblocks what waited on `id`.
    pub fn complete(&mut self, id: &str) {
        self.pending.retain(|p| p != id);
        for waiting in self.blocking.remove(id).unwrap_or_default() {
            if let Some(count) = self.block_count.get_mut(&waiting) {
                *count = count.saturating_sub(1);
            }
        }
    }
}

/// Cache keys of every node in `prompt` (ComfyUI's `CacheKeySetInputSignature`).
///
/// `is_changed(node)` is the node's `IS_CHANGED` value. Nodes on a cycle
/// get a key of their own that never matches.
pub fn signatures(prompt: &Map<Json>, is_changed: &dyn Fn(&str) -> Json) -> HashMap<String, String> {
    fn sig(
        id: &str,
        prompt: &Map<Json>,
        is_changed: &dyn Fn(&str) -> Json,
        memo: &mut HashMap<String, String>,
        visiting: &mut HashSet<String>,
    ) -> String {
        if let Some(s) = memo.get(id) {
            return s.clone();
        }
        let Some(node) = prompt.get(id) else { return format!("missing:{id}") };
        if !visiting.insert(id.to_string()) {
            return format!("cycle:{}", uuid::Uuid::new_v4());
        }
        let class = node.get("class_type").cloned().unwrap_or_default();
        let mut inputs: Vec<(String, Json)> = node
            .get("inputs")
            .and_then(Json::as_object)
            .map(|i| i.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        inputs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut parts = vec![class, is_changed(id)];
        for (name, value) in inputs {
            let value = match as_link(&value) {
                Some((from, slot)) => Json::Array(vec![
                    "ANCESTOR".into(),
                    sig(from, prompt, is_changed, memo, visiting).into(),
                    Json::from(slot as i64),
                ]),
                None => value,
            };
            parts.push(Json::Array(vec![name.into(), value]));
        }
        visiting.remove(id);
        let text = Json::Array(parts).to_string();
        // Two differently seeded 64-bit hashes keep keys short in deep graphs.
        let mut key = String::new();
        for seed in [0u8, 1] {
            let mut h = DefaultHasher::new();
            seed.hash(&mut h);
            text.hash(&mut h);
            key.push_str(&format!("{:016x}", h.finish()));
        }
        memo.insert(id.to_string(), key.clone());
        key
    }
    let mut memo = HashMap::new();
    let mut visiting = HashSet::new();
    for id in prompt.keys() {
        sig(id, prompt, is_changed, &mut memo, &mut visiting);
    }
    memo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_free() -> Map<Json> {
        let text = crate::comfyui::MODEL_FREE_JSON;
        match Json::parse(text.as_bytes()).unwrap() {
            Json::Object(o) => o,
            _ => unreachable!(),
        }
    }

    #[test]
    fn order_matches_the_recording() {
        let prompt = model_free();
        let mut list = ExecutionList::new(&prompt);
        list.add_node("7", &|_| false);
        let mut order = Vec::new();
        while let Some(id) = list.next().unwrap() {
            list.complete(&id);
            order.push(id);
        }
        assert_eq!(order, ["3", "4", "1", "2", "5", "6", "7"]);
    }

    #[test]
    fn cached_inputs_are_not_staged() {
        let prompt = model_free();
        let mut list = ExecutionList::new(&prompt);
        list.add_node("7", &|id| id != "7");
        assert_eq!(list.next().unwrap().as_deref(), Some("7"));
    }

    #[test]
    fn signatures_follow_content_not_ids() {
        let prompt = model_free();
        let a = signatures(&prompt, &|_| Json::Bool(false));
        let mut other = prompt.clone();
        other
            .get_mut("1")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .get_mut("inputs")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert("color", Json::from(0i64));
        let b = signatures(&other, &|_| Json::Bool(false));
        assert_eq!(a["3"], b["3"]);
        assert_ne!(a["1"], b["1"]);
        assert_ne!(a["7"], b["7"], "a changed ancestor changes the key");
    }
}
