//! What the environment tells gpu-task.
//!
//! gpu-task has no configuration file and no arguments: a Nomad dispatch (or
//! the local executor, which imitates one) hands it everything through the
//! environment and the task dir. This module reads all of it in one place,
//! through a lookup function so tests need not touch the process environment.

use std::path::{Path, PathBuf};

use dispatcher::contract::{WorkflowPayload, META_JOB_ID, META_USER_ID, PAYLOAD_FILE};

/// Consul's default agent address.
pub const DEFAULT_CONSUL_ADDR: &str = "http://127.0.0.1:8500";

/// Everything gpu-task takes from its environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEnv {
    /// `NOMAD_META_job_id`: the comfy-multi job to run.
    pub job_id: String,
    /// `NOMAD_META_user_id`: the participant (for logs only).
    pub user_id: String,
    /// `NOMAD_TASK_DIR`: the task's `local/` dir, where the payload file is.
    pub task_dir: Option<PathBuf>,
    /// `COMFYUI_URL`: ComfyUI's address, instead of asking Consul.
    pub comfyui_url: Option<String>,
    /// `GATEWAY_URL`: the gateway's address, instead of asking Consul.
    pub gateway_url: Option<String>,
    /// `GATEWAY_CA_CERT`: a PEM file of CA certificates trusted for the
    /// gateway's HTTPS besides the public roots (a private CA, a test's).
    pub gateway_ca: Option<PathBuf>,
    /// `CONSUL_HTTP_ADDR`, with a scheme.
    pub consul_addr: String,
    /// `CONSUL_HTTP_TOKEN`.
    pub consul_token: Option<String>,
    /// `INTERNAL_SECRET`: sent on every call to the gateway's internal API.
    pub internal_secret: Option<String>,
    /// The GPU UUIDs in `NVIDIA_VISIBLE_DEVICES` (the leased GPUs).
    pub gpu_uuids: Vec<String>,
}

/// Why the environment is not usable.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A required dispatch meta key is missing.
    #[error("{var} is not set: run gpu-task as a dispatched {job} job, or set it by hand", job = dispatcher::contract::NOMAD_JOB)]
    Missing { var: String },
    /// The payload file exists but cannot be read.
    #[error("cannot read the workflow payload {path}: {source}")]
    ReadPayload { path: PathBuf, source: std::io::Error },
    /// `GATEWAY_CA_CERT` cannot be read or holds no certificate.
    #[error("GATEWAY_CA_CERT {path}: {why}")]
    GatewayCa { path: PathBuf, why: String },
    /// The payload file is not a workflow payload.
    #[error("the workflow payload {path} is not valid: {source}")]
    BadPayload { path: PathBuf, source: serde_json::Error },
}

impl TaskEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<TaskEnv, EnvError> {
        TaskEnv::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the environment through `get`. Empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<TaskEnv, EnvError> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let meta = |key: &str| {
            get(&format!("NOMAD_META_{key}"))
                .or_else(|| get(&format!("NOMAD_META_{}", key.to_uppercase())))
                .ok_or_else(|| EnvError::Missing { var: format!("NOMAD_META_{key}") })
        };
        Ok(TaskEnv {
            job_id: meta(META_JOB_ID)?,
            user_id: meta(META_USER_ID)?,
            task_dir: get("NOMAD_TASK_DIR").map(PathBuf::from),
            comfyui_url: get("COMFYUI_URL").map(|u| u.trim_end_matches('/').to_string()),
            gateway_url: get("GATEWAY_URL").map(|u| u.trim_end_matches('/').to_string()),
            gateway_ca: get("GATEWAY_CA_CERT").map(PathBuf::from),
            consul_addr: with_scheme(get("CONSUL_HTTP_ADDR").as_deref().unwrap_or(DEFAULT_CONSUL_ADDR)),
            consul_token: get("CONSUL_HTTP_TOKEN"),
            internal_secret: get("INTERNAL_SECRET"),
            gpu_uuids: get("NVIDIA_VISIBLE_DEVICES").as_deref().map(gpu_uuids).unwrap_or_default(),
        })
    }

    /// The CA certificates of `GATEWAY_CA_CERT`, if set.
    pub fn gateway_ca_certs(&self) -> Result<Vec<reqwest::Certificate>, EnvError> {
        let Some(path) = &self.gateway_ca else { return Ok(Vec::new()) };
        let bad = |why: String| EnvError::GatewayCa { path: path.clone(), why };
        let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(format!("not PEM certificates ({e})")))?;
        if certs.is_empty() {
            return Err(bad("holds no PEM certificate".into()));
        }
        Ok(certs)
    }

    /// Where Nomad writes the dispatch payload, if there is a task dir.
    pub fn payload_path(&self) -> Option<PathBuf> {
        self.task_dir.as_deref().map(|d| d.join(PAYLOAD_FILE))
    }

    /// The dispatch payload, or `None` when there is none (it was too large
    /// for Nomad, so the gateway has it). Nomad writes no file for an empty
    /// payload; an empty file counts as none too.
    pub fn read_payload(&self) -> Result<Option<WorkflowPayload>, EnvError> {
        match self.payload_path() {
            Some(path) => read_payload_file(&path),
            None => Ok(None),
        }
    }
}

fn read_payload_file(path: &Path) -> Result<Option<WorkflowPayload>, EnvError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(EnvError::ReadPayload { path: path.into(), source }),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| EnvError::BadPayload { path: path.into(), source })
}

/// The GPU UUIDs (`GPU-…`, `MIG-…`) in a `NVIDIA_VISIBLE_DEVICES` value.
/// `all`, `none`, `void` and bare indices name no UUID.
pub fn gpu_uuids(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|d| {
            let lower = d.to_ascii_lowercase();
            lower.starts_with("gpu-") || lower.starts_with("mig-")
        })
        .map(str::to_string)
        .collect()
}

/// Consul's own tools accept `CONSUL_HTTP_ADDR` without a scheme.
fn with_scheme(addr: &str) -> String {
    let addr = addr.trim_end_matches('/');
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<TaskEnv, EnvError> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TaskEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn the_gateway_ca_file_is_read_or_named_in_the_error() {
        let meta = [("NOMAD_META_job_id", "j1"), ("NOMAD_META_user_id", "7")];
        assert!(env(&meta).unwrap().gateway_ca_certs().unwrap().is_empty(), "none by default");
        let dir = tempfile::tempdir().unwrap();
        let (missing, junk, good) = (dir.path().join("missing.pem"), dir.path().join("junk.pem"), dir.path().join("ca.pem"));
        std::fs::write(&junk, "not a certificate").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["ca".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(&good, cert.pem()).unwrap();
        let with = |path: &Path| {
            let mut pairs = meta.to_vec();
            let path = path.display().to_string();
            pairs.push(("GATEWAY_CA_CERT", &path));
            env(&pairs).unwrap().gateway_ca_certs()
        };
        assert_eq!(with(&good).unwrap().len(), 1);
        for bad in [&missing, &junk] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("GATEWAY_CA_CERT") && e.contains(&bad.display().to_string()), "{e}");
        }
    }

    #[test]
    fn nomad_meta_and_defaults() {
        let e = env(&[("NOMAD_META_job_id", "j1"), ("NOMAD_META_user_id", "7")]).unwrap();
        assert_eq!(e.job_id, "j1");
        assert_eq!(e.user_id, "7");
        assert_eq!(e.consul_addr, "http://127.0.0.1:8500");
        assert_eq!(e.comfyui_url, None);
        assert_eq!(e.gateway_url, None);
        assert!(e.gpu_uuids.is_empty());
        assert_eq!(e.payload_path(), None);
        assert_eq!(e.read_payload().unwrap(), None);
    }

    #[test]
    fn uppercased_meta_is_accepted() {
        let e = env(&[("NOMAD_META_JOB_ID", "j2"), ("NOMAD_META_USER_ID", "3")]).unwrap();
        assert_eq!((e.job_id.as_str(), e.user_id.as_str()), ("j2", "3"));
    }

    #[test]
    fn missing_or_empty_meta_names_the_variable() {
        let err = env(&[("NOMAD_META_user_id", "7")]).unwrap_err();
        assert!(err.to_string().starts_with("NOMAD_META_job_id is not set"), "{err}");
        let err = env(&[("NOMAD_META_job_id", "j"), ("NOMAD_META_user_id", " ")]).unwrap_err();
        assert!(err.to_string().starts_with("NOMAD_META_user_id is not set"), "{err}");
    }

    #[test]
    fn overrides_and_consul() {
        let e = env(&[
            ("NOMAD_META_job_id", "j"),
            ("NOMAD_META_user_id", "1"),
            ("COMFYUI_URL", "http://127.0.0.1:8188/"),
            ("GATEWAY_URL", "http://10.0.0.1:8080"),
            ("CONSUL_HTTP_ADDR", "10.0.0.1:8500"),
            ("CONSUL_HTTP_TOKEN", "tok"),
            ("INTERNAL_SECRET", "s3cret"),
            ("NVIDIA_VISIBLE_DEVICES", "GPU-aaaa-1111, GPU-bbbb-2222"),
        ])
        .unwrap();
        assert_eq!(e.comfyui_url.as_deref(), Some("http://127.0.0.1:8188"));
        assert_eq!(e.gateway_url.as_deref(), Some("http://10.0.0.1:8080"));
        assert_eq!(e.consul_addr, "http://10.0.0.1:8500");
        assert_eq!(e.consul_token.as_deref(), Some("tok"));
        assert_eq!(e.internal_secret.as_deref(), Some("s3cret"));
        assert_eq!(e.gpu_uuids, ["GPU-aaaa-1111", "GPU-bbbb-2222"]);
    }

    #[test]
    fn visible_devices_without_uuids() {
        for v in ["all", "none", "void", "0,1", ""] {
            assert!(gpu_uuids(v).is_empty(), "{v}");
        }
        assert_eq!(gpu_uuids("MIG-1234"), ["MIG-1234"]);
    }

    #[test]
    fn payload_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let e =
            env(&[("NOMAD_META_job_id", "j"), ("NOMAD_META_user_id", "1"), ("NOMAD_TASK_DIR", d)]).unwrap();
        // No file: the gateway has the workflow.
        assert_eq!(e.read_payload().unwrap(), None);
        let path = dir.path().join(PAYLOAD_FILE);
        std::fs::write(&path, "").unwrap();
        assert_eq!(e.read_payload().unwrap(), None);
        std::fs::write(&path, r#"{"prompt":{"1":{"class_type":"EmptyImage","inputs":{}}}}"#).unwrap();
        let p = e.read_payload().unwrap().unwrap();
        assert_eq!(p.prompt["1"]["class_type"], "EmptyImage");
        assert!(p.extra_data.is_null());
        std::fs::write(&path, "{not json").unwrap();
        let err = e.read_payload().unwrap_err();
        assert!(err.to_string().contains("is not valid"), "{err}");
    }
}
