//! Participants' settings and userdata files: what ComfyUI's
//! `app/user_manager.py` and `app/app_settings.py` keep per user, here per
//! participant, on disk so it survives restarts.
//!
//! | what | where |
//! | --- | --- |
//! | userdata files (`workflows/…`, `subgraphs/…`, `user.css`, …) | `<data_dir>/users/<n>/userdata/<path>` |
//! | settings (`GET/POST /settings`) | `<data_dir>/users/<n>/userdata/comfy.settings.json`, as in ComfyUI |
//! | pre-loaded workflows (read-only, everyone) | `<workflows_dir>/<path>`, seen as `workflows/<path>` |
//!
//! A participant's own file wins over a pre-loaded one of the same path.
//! Pre-loaded workflows cannot be deleted (403); writing one creates the
//! participant's own copy; moving one copies it. Writes are atomic (a hidden
//! temp file, then a rename), and a participant's settings change one at a
//! time, so two tabs saving settings at once lose nothing.
//!
//! Paths come URL-decoded from the route; one more decoding is applied when
//! they still contain `%`, as ComfyUI does. A path with `.` or `..`
//! components, a leading `/`, a backslash or a control character is refused
//! with 400 before anything touches the disk.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use serde_json::{json, Map, Value};

use crate::error::ApiError;

/// The settings file, inside the participant's userdata (ComfyUI's name).
pub const SETTINGS_FILE: &str = "comfy.settings.json";
/// The userdata folder pre-loaded workflows appear in.
pub const WORKFLOWS: &str = "workflows";

/// Participants' userdata and settings.
#[derive(Clone)]
pub struct UserData {
    data_dir: PathBuf,
    workflows_dir: PathBuf,
    /// One lock per participant around settings read-modify-write.
    settings_locks: Arc<Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>>,
}

/// A checked path relative to a participant's userdata root (`a/b.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath(Vec<String>);

impl RelPath {
    /// Checks a path a client sent (see the module doc). `what` names it in errors.
    pub fn parse(raw: &str, what: &str) -> Result<RelPath, ApiError> {
        let decoded;
        let raw = if raw.contains('%') {
            decoded = urlencoding::decode(raw)
                .map_err(|_| bad(what, raw, "it is not valid URL-encoded UTF-8"))?
                .into_owned();
            decoded.as_str()
        } else {
            raw
        };
        if raw.starts_with('/') {
            return Err(bad(what, raw, "it must be relative"));
        }
        if raw.len() > 1024 || raw.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(bad(what, raw, "it contains characters that are not allowed"));
        }
        let mut parts = Vec::new();
        for part in raw.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                return Err(bad(what, raw, "it must stay inside your own files"));
            }
            if part.len() > 255 {
                return Err(bad(what, raw, "a name in it is too long"));
            }
            parts.push(part.to_string());
        }
        if parts.is_empty() {
            return Err(bad(what, raw, "it is empty"));
        }
        Ok(RelPath(parts))
    }

    /// `a/b.json`.
    pub fn as_string(&self) -> String {
        self.0.join("/")
    }

    fn under(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(&self.0);
        path
    }

    /// The path inside the pre-loaded workflows folder, when this is
    /// `workflows/<something>`.
    fn in_workflows(&self) -> Option<RelPath> {
        (self.0.len() > 1 && self.0[0] == WORKFLOWS).then(|| RelPath(self.0[1..].to_vec()))
    }

    /// Whether this is the `workflows` folder itself.
    fn is_workflows(&self) -> bool {
        self.0.len() == 1 && self.0[0] == WORKFLOWS
    }
}

fn bad(what: &str, raw: &str, why: &str) -> ApiError {
    ApiError::bad_request("invalid_path", format!("{what} {raw:?} is not allowed: {why}"))
}

/// How a listing is asked for (`GET /userdata?dir=&recurse=&split=&full_info=`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ListOptions {
    pub recurse: bool,
    pub full_info: bool,
    pub split: bool,
}

/// Where a file a participant reads comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The participant's own file.
    Own(PathBuf),
    /// A pre-loaded workflow (read-only).
    Preloaded(PathBuf),
}

impl Found {
    pub fn path(&self) -> &Path {
        match self {
            Found::Own(p) | Found::Preloaded(p) => p,
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> ApiError {
    ApiError::Internal(format!("cannot access {}: {e}", path.display()))
}

fn millis(t: std::io::Result<std::time::SystemTime>) -> u64 {
    t.ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// ComfyUI's `get_file_info`: `{path, size, modified, created}` (ms).
fn file_info(path: &Path, rel: &str) -> Value {
    let meta = std::fs::metadata(path).ok();
    let size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
    let modified = meta.as_ref().map(|m| millis(m.modified())).unwrap_or(0);
    let created = meta.as_ref().map(|m| millis(m.created().or_else(|_| m.modified()))).unwrap_or(modified);
    json!({ "path": rel, "size": size, "modified": modified, "created": created })
}

/// The files under `dir` (relative paths with `/`), like Python's
/// `glob(dir/*)` or `glob(dir/**/*, recursive=True)`: hidden names skipped.
fn walk(dir: &Path, recurse: bool) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let path = entry.path();
            // Follows symlinks, as glob does (the instructor may link workflows in).
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {
                    out.insert(rel, path);
                }
                Ok(m) if m.is_dir() && recurse => stack.push((path, rel)),
                _ => {}
            }
        }
    }
    out
}

fn is_file(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(false)
}

/// Writes `bytes` to `path` atomically (hidden temp file + rename).
pub async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ApiError> {
    let dir = path.parent().ok_or_else(|| ApiError::Internal(format!("{} has no folder", path.display())))?;
    tokio::fs::create_dir_all(dir).await.map_err(|e| io_error(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.part", uuid::Uuid::new_v4().simple()));
    if let Err(e) = tokio::fs::write(&tmp, bytes).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io_error(&tmp, e));
    }
    tokio::fs::rename(&tmp, path).await.map_err(|e| io_error(path, e))
}

impl UserData {
    pub fn new(data_dir: impl Into<PathBuf>, workflows_dir: impl Into<PathBuf>) -> Self {
        UserData {
            data_dir: data_dir.into(),
            workflows_dir: workflows_dir.into(),
            settings_locks: Arc::default(),
        }
    }

    /// Participant `user`'s userdata root.
    pub fn root(&self, user: u32) -> PathBuf {
        self.data_dir.join("users").join(user.to_string()).join("userdata")
    }

    /// The pre-loaded workflows folder.
    pub fn workflows_dir(&self) -> &Path {
        &self.workflows_dir
    }

    /// `GET /userdata?dir=…`: the participant's files under `dir`, plus the
    /// pre-loaded workflows when `dir` is (inside) `workflows`. A folder that
    /// does not exist is an empty list.
    pub fn list(&self, user: u32, dir: &RelPath, opts: ListOptions) -> Vec<Value> {
        let own_dir = dir.under(&self.root(user));
        let mut files = walk(&own_dir, opts.recurse);
        let preloaded_dir = if dir.is_workflows() {
            Some(self.workflows_dir.clone())
        } else {
            dir.in_workflows().map(|rest| rest.under(&self.workflows_dir))
        };
        if let Some(pre) = preloaded_dir {
            for (rel, path) in walk(&pre, opts.recurse) {
                files.entry(rel).or_insert(path);
            }
        }
        files
            .into_iter()
            .map(|(rel, path)| {
                if opts.full_info {
                    file_info(&path, &rel)
                } else if opts.split {
                    let mut parts = vec![Value::String(rel.clone())];
                    parts.extend(rel.split('/').map(|p| Value::String(p.to_string())));
                    Value::Array(parts)
                } else {
                    Value::String(rel)
                }
            })
            .collect()
    }

    /// `GET /v2/userdata?path=`: every folder and file under `path` (the
    /// whole userdata when `None`) as `{name, path, type, size?, modified?}`
    /// (`modified` in seconds), folders first, then by name; pre-loaded
    /// workflows included. 404 when `path` is not there.
    pub fn tree(&self, user: u32, path: Option<&RelPath>) -> Result<Vec<Value>, ApiError> {
        let root = self.root(user);
        let mut sources: Vec<(PathBuf, String)> = Vec::new();
        match path {
            None => {
                sources.push((root.clone(), String::new()));
                sources.push((self.workflows_dir.clone(), WORKFLOWS.to_string()));
            }
            Some(p) => {
                sources.push((p.under(&root), p.as_string()));
                if p.is_workflows() {
                    sources.push((self.workflows_dir.clone(), p.as_string()));
                } else if let Some(rest) = p.in_workflows() {
                    sources.push((rest.under(&self.workflows_dir), p.as_string()));
                }
            }
        }
        let existing: Vec<_> = sources.into_iter().filter(|(dir, _)| dir.exists()).collect();
        if existing.is_empty() {
            return match path {
                None => Ok(Vec::new()),
                Some(p) => Err(ApiError::NotFound(format!("Requested path not found: {:?}", p.as_string()))),
            };
        }
        if existing.iter().all(|(dir, _)| !dir.is_dir()) {
            return Err(ApiError::bad_request("invalid_path", "Requested path is not a directory"));
        }
        let mut entries: BTreeMap<String, Value> = BTreeMap::new();
        if path.is_none() && self.workflows_dir.is_dir() {
            entries.insert(WORKFLOWS.into(), json!({"name": WORKFLOWS, "path": WORKFLOWS, "type": "directory"}));
        }
        for (dir, prefix) in existing {
            let mut stack = vec![(dir, prefix)];
            while let Some((folder, prefix)) = stack.pop() {
                let Ok(list) = std::fs::read_dir(&folder) else { continue };
                for entry in list.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue;
                    }
                    let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
                    let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
                    if meta.is_dir() {
                        entries.entry(rel.clone()).or_insert_with(|| json!({"name": name, "path": rel, "type": "directory"}));
                        stack.push((entry.path(), rel));
                    } else if meta.is_file() {
                        let modified = millis(meta.modified()) as f64 / 1000.0;
                        entries.entry(rel.clone()).or_insert_with(
                            || json!({"name": name, "path": rel, "type": "file", "size": meta.len(), "modified": modified}),
                        );
                    }
                }
            }
        }
        let mut out: Vec<Value> = entries.into_values().collect();
        out.sort_by_key(|e| (e["type"] != "directory", e["name"].as_str().unwrap_or_default().to_lowercase()));
        Ok(out)
    }

    /// The file `rel` as participant `user` sees it.
    pub fn find(&self, user: u32, rel: &RelPath) -> Option<Found> {
        let own = rel.under(&self.root(user));
        if is_file(&own) {
            return Some(Found::Own(own));
        }
        let pre = rel.in_workflows()?.under(&self.workflows_dir);
        is_file(&pre).then_some(Found::Preloaded(pre))
    }

    /// What `POST /userdata` and `move` answer: the path relative to the
    /// participant's root, or its file info.
    fn answer(&self, user: u32, rel: &RelPath, full_info: bool) -> Value {
        if full_info {
            file_info(&rel.under(&self.root(user)), &rel.as_string())
        } else {
            Value::String(rel.as_string())
        }
    }

    /// `POST /userdata/{file}`: stores `bytes`. 409 when `overwrite` is false
    /// and the participant already sees a file there (own or pre-loaded).
    pub async fn write(&self, user: u32, rel: &RelPath, bytes: &[u8], overwrite: bool, full_info: bool) -> Result<Value, ApiError> {
        if !overwrite && self.find(user, rel).is_some() {
            return Err(ApiError::Conflict("File already exists".into()));
        }
        write_atomic(&rel.under(&self.root(user)), bytes).await?;
        Ok(self.answer(user, rel, full_info))
    }

    /// `DELETE /userdata/{file}`.
    pub async fn delete(&self, user: u32, rel: &RelPath) -> Result<(), ApiError> {
        match self.find(user, rel) {
            Some(Found::Own(path)) => tokio::fs::remove_file(&path).await.map_err(|e| io_error(&path, e)),
            Some(Found::Preloaded(_)) => Err(read_only(rel)),
            None => Err(ApiError::NotFound(format!("no file {:?}", rel.as_string()))),
        }
    }

    /// `POST /userdata/{file}/move/{dest}`. A pre-loaded source is copied
    /// (it stays for everyone).
    pub async fn rename(&self, user: u32, from: &RelPath, to: &RelPath, overwrite: bool, full_info: bool) -> Result<Value, ApiError> {
        let source = self.find(user, from).ok_or_else(|| ApiError::NotFound(format!("no file {:?}", from.as_string())))?;
        if !overwrite && self.find(user, to).is_some() {
            return Err(ApiError::Conflict("File already exists".into()));
        }
        let dest = to.under(&self.root(user));
        match source {
            Found::Own(path) => {
                if let Some(dir) = dest.parent() {
                    tokio::fs::create_dir_all(dir).await.map_err(|e| io_error(dir, e))?;
                }
                tokio::fs::rename(&path, &dest).await.map_err(|e| io_error(&dest, e))?;
            }
            Found::Preloaded(path) => {
                let bytes = tokio::fs::read(&path).await.map_err(|e| io_error(&path, e))?;
                write_atomic(&dest, &bytes).await?;
            }
        }
        Ok(self.answer(user, to, full_info))
    }

    fn settings_lock(&self, user: u32) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.settings_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(user).or_default().clone()
    }

    fn settings_path(&self, user: u32) -> PathBuf {
        self.root(user).join(SETTINGS_FILE)
    }

    /// `GET /settings`: `{}` when there are none (or the file is corrupt, as ComfyUI).
    pub async fn settings(&self, user: u32) -> Map<String, Value> {
        let path = self.settings_path(user);
        match tokio::fs::read(&path).await {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(Value::Object(map)) => map,
                _ => {
                    tracing::error!(path = %path.display(), "the settings file is corrupted; starting from none");
                    Map::new()
                }
            },
            Err(_) => Map::new(),
        }
    }

    /// `POST /settings` (`changes` merged into the settings) and `POST
    /// /settings/{id}` (one key), atomically per participant.
    pub async fn update_settings(&self, user: u32, changes: Map<String, Value>) -> Result<(), ApiError> {
        let lock = self.settings_lock(user);
        let _guard = lock.lock().await;
        let mut settings = self.settings(user).await;
        settings.extend(changes);
        let text = serde_json::to_vec_pretty(&Value::Object(settings)).expect("JSON values serialize");
        write_atomic(&self.settings_path(user), &text).await
    }
}

fn read_only(rel: &RelPath) -> ApiError {
    ApiError::Limit {
        kind: "read_only",
        message: format!(
            "{:?} is a workflow the instructor pre-loaded for everyone; it cannot be deleted (save a copy under another name to change it)",
            rel.as_string()
        ),
        status: axum::http::StatusCode::FORBIDDEN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s, "file").unwrap()
    }

    #[test]
    fn paths_stay_inside() {
        for bad in ["..", "../x", "a/../../b", "/etc/passwd", "a\\b", "a\0b", "", "/", "%2e%2e/x", "a/./b", "..%2Fx"] {
            assert!(RelPath::parse(bad, "file").is_err(), "{bad:?}");
        }
        assert_eq!(rel("workflows/a b.json").as_string(), "workflows/a b.json");
        assert_eq!(rel("workflows%2Fa.json").as_string(), "workflows/a.json");
        assert_eq!(rel("subgraphs/").as_string(), "subgraphs");
        assert_eq!(rel("a//b").as_string(), "a/b");
        assert_eq!(rel("workflows/x.json").in_workflows(), Some(rel("x.json")));
        assert!(rel("workflows").is_workflows());
    }

    #[tokio::test]
    async fn own_files_win_and_preloaded_ones_are_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let pre = dir.path().join("pre");
        std::fs::create_dir_all(pre.join("course")).unwrap();
        std::fs::write(pre.join("intro.json"), "{\"pre\":1}").unwrap();
        std::fs::write(pre.join("course/day1.json"), "{}").unwrap();
        std::fs::write(pre.join(".hidden.json"), "{}").unwrap();
        let ud = UserData::new(dir.path().join("data"), &pre);
        let opts = ListOptions { recurse: true, full_info: false, split: false };
        assert_eq!(ud.list(2, &rel("workflows"), opts), vec![json!("course/day1.json"), json!("intro.json")]);
        assert_eq!(ud.list(2, &rel("subgraphs/"), opts), Vec::<Value>::new());
        let flat = ListOptions { recurse: false, ..opts };
        assert_eq!(ud.list(2, &rel("workflows"), flat), vec![json!("intro.json")]);
        assert_eq!(ud.list(2, &rel("workflows/course"), opts), vec![json!("day1.json")]);

        assert!(matches!(ud.find(2, &rel("workflows/intro.json")), Some(Found::Preloaded(_))));
        assert!(matches!(ud.delete(2, &rel("workflows/intro.json")).await, Err(ApiError::Limit { .. })));
        assert!(matches!(
            ud.write(2, &rel("workflows/intro.json"), b"{}", false, false).await,
            Err(ApiError::Conflict(_))
        ));
        let answer = ud.write(2, &rel("workflows/intro.json"), b"{\"own\":1}", true, false).await.unwrap();
        assert_eq!(answer, json!("workflows/intro.json"));
        let found = ud.find(2, &rel("workflows/intro.json")).unwrap();
        assert!(matches!(found, Found::Own(_)));
        assert_eq!(std::fs::read_to_string(found.path()).unwrap(), "{\"own\":1}");
        // Participant 5 still sees the instructor's.
        assert!(matches!(ud.find(5, &rel("workflows/intro.json")), Some(Found::Preloaded(_))));
        let full = ud.list(2, &rel("workflows"), ListOptions { full_info: true, ..opts });
        assert_eq!(full.len(), 2);
        assert_eq!(full[1]["path"], "intro.json");
        assert_eq!(full[1]["size"], 9);

        let tree = ud.tree(2, None).unwrap();
        let paths: Vec<&str> = tree.iter().map(|e| e["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["workflows/course", "workflows", "workflows/course/day1.json", "workflows/intro.json"]);
        assert_eq!(ud.tree(2, Some(&rel("workflows/course"))).unwrap()[0]["path"], "workflows/course/day1.json");
        assert!(matches!(ud.tree(2, Some(&rel("nothing"))), Err(ApiError::NotFound(_))));
        assert!(ud.tree(9, None).unwrap().iter().any(|e| e["path"] == "workflows/intro.json"));

        // Moving a pre-loaded workflow copies it.
        let moved = ud.rename(5, &rel("workflows/course/day1.json"), &rel("workflows/mine.json"), false, true).await.unwrap();
        assert_eq!(moved["path"], "workflows/mine.json");
        assert!(matches!(ud.find(5, &rel("workflows/course/day1.json")), Some(Found::Preloaded(_))));
        ud.delete(5, &rel("workflows/mine.json")).await.unwrap();
        assert!(ud.find(5, &rel("workflows/mine.json")).is_none());
    }

    #[tokio::test]
    async fn settings_merge() {
        let dir = tempfile::tempdir().unwrap();
        let ud = UserData::new(dir.path(), dir.path().join("wf"));
        assert!(ud.settings(1).await.is_empty());
        let mut a = Map::new();
        a.insert("Comfy.A".into(), json!(1));
        ud.update_settings(1, a).await.unwrap();
        let mut b = Map::new();
        b.insert("Comfy.B".into(), json!({"x": true}));
        ud.update_settings(1, b).await.unwrap();
        let s = ud.settings(1).await;
        assert_eq!(Value::Object(s), json!({"Comfy.A": 1, "Comfy.B": {"x": true}}));
        assert!(ud.settings(2).await.is_empty());
    }
}
