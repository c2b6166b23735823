//! The one configuration file, read with hcl-rs, plus environment overrides.
//!
//! Every setting has a default that works on a laptop, so an empty (or
//! missing) file is a valid configuration. Precedence, lowest first: built-in
//! default, the HCL file (`COMFY_MULTI_CONFIG`), the environment variable named
//! next to each field. The README lists them all.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::{Limits, Mode};

/// Which executor runs jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// gpu-task as a local child process per job (single machine).
    Local,
    /// A dispatch of the parameterized Nomad job per job.
    Nomad,
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `REDIS_URL`: where jobs and the queue live.
    pub redis_url: String,
    /// `DATA_DIR`: outputs, inputs and generated secrets live under it.
    pub data_dir: PathBuf,
    pub gateway: GatewayConfig,
    pub dispatcher: DispatcherConfig,
    pub nomad: NomadConfig,
    pub consul: ConsulConfig,
    pub queue: QueueConfig,
}

/// Scheduling defaults. The instructor can change each of them live; their
/// change (stored in Redis) then wins over this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// `QUEUE_MODE`: `fair` (round-robin across users) or `fifo`.
    pub mode: Mode,
    /// `MAX_QUEUED_PER_USER`: waiting jobs one participant may have.
    pub max_queued_per_user: u32,
    /// `MAX_RUNNING_PER_USER`: jobs of one participant in flight at once.
    pub max_running_per_user: u32,
    /// `MAX_QUEUE`: waiting jobs in all; more are refused with 429.
    pub max_queue: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let l = Limits::default();
        QueueConfig {
            mode: Mode::Fair,
            max_queued_per_user: l.max_queued_per_user,
            max_running_per_user: l.max_running_per_user,
            max_queue: l.max_queue,
        }
    }
}

impl QueueConfig {
    /// The configured limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_queued_per_user: self.max_queued_per_user,
            max_running_per_user: self.max_running_per_user,
            max_queue: self.max_queue,
        }
    }
}

/// Settings of the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `GATEWAY_LISTEN`: address and port to listen on.
    pub listen: String,
    /// `PARTICIPANTS`: participants 1..=N get an access code on first start.
    pub participants: u32,
    /// `MAX_WORKFLOW_BYTES`: the largest prompt request body accepted.
    pub max_workflow_bytes: usize,
    /// `MAX_OUTPUT_BYTES`: the largest output file gpu-task may upload.
    pub max_output_bytes: usize,
    /// `ADMIN_TOKEN`: the instructor's token. Generated into
    /// `<data_dir>/secrets/admin-token` on first start when unset.
    pub admin_token: Option<String>,
    /// `INTERNAL_SECRET`: shared by the gateway and gpu-task. Generated into
    /// `<data_dir>/secrets/internal-secret` on first start when unset.
    pub internal_secret: Option<String>,
    /// `GATEWAY_TLS_CERT`: PEM certificate chain; with `tls_key`, the gateway
    /// serves HTTPS itself.
    pub tls_cert: Option<PathBuf>,
    /// `GATEWAY_TLS_KEY`: PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// `GATEWAY_REDIRECT_ADDR`: with HTTPS, a second address (e.g.
    /// `0.0.0.0:80`) where plain HTTP is answered with a redirect to HTTPS.
    /// None by default.
    pub redirect_addr: Option<String>,
    /// `SESSION_HOURS`: how long a login (session cookie) lasts; fractions
    /// are fine (`0.5` is 30 minutes).
    pub session_hours: f64,
    /// `ADMIN_PASSWORD`: a password for `/admin/login`, besides the admin
    /// token. None by default.
    pub admin_password: Option<String>,
    /// `COMFYUI_FRONTEND_DIR`: the `static/` folder of the pinned
    /// `comfyui-frontend-package` the gateway serves at `/user/{n}/`.
    /// Default: where `scripts/install-deps.sh` unpacks it, if it is there.
    pub frontend_dir: Option<PathBuf>,
    /// `WORKFLOWS_DIR`: workflows the instructor drops in (UI format), shown
    /// read-only in every participant's workflow list. Default:
    /// `<data_dir>/workflows` (see [`Config::workflows_dir`]).
    pub workflows_dir: Option<PathBuf>,
    /// `COMFYUI_URL`: the GPU node's ComfyUI, which the gateway asks for
    /// `object_info` and `system_stats`. Default: Consul service `comfyui`.
    pub comfyui_url: Option<String>,
}

/// Settings of the dispatcher.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DispatcherConfig {
    /// `EXECUTOR`: `local` or `nomad`.
    pub executor: ExecutorKind,
    /// `SLOTS`: jobs in flight at most (the number of GPUs).
    pub slots: usize,
    /// `GPU_TASK_BIN`: the gpu-task program the local executor runs.
    pub gpu_task_bin: PathBuf,
    /// `WORK_DIR`: where the local executor makes each job's task dir.
    pub work_dir: Option<PathBuf>,
    /// `MAX_ATTEMPTS`: runs a job may get when they end without a result
    /// (gpu-task crashed, node lost) before it fails.
    pub max_attempts: u32,
    /// `RECONCILE_SECONDS`: how often the dispatcher compares the jobs Redis
    /// has in flight with the executor's runs (also once at start).
    pub reconcile_seconds: u64,
    /// `DISPATCHER_METRICS_ADDR`: where `dispatcher run` serves Prometheus
    /// `/metrics` (unauthenticated: bind it to loopback or a private
    /// address). None (off) by default.
    pub metrics_addr: Option<String>,
}

/// How to reach Nomad.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NomadConfig {
    /// `NOMAD_ADDR`
    pub addr: String,
    /// `NOMAD_TOKEN`: an ACL token, when ACLs are on.
    pub token: Option<String>,
    /// `NOMAD_JOB`: the parameterized job to dispatch.
    pub job: String,
    /// `NOMAD_GPU_NODE_POOL`: the node pool of the GPU node(s), drained by
    /// `dispatcher drain`.
    pub gpu_node_pool: String,
}

/// How to reach Consul.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsulConfig {
    /// `CONSUL_HTTP_ADDR`
    pub addr: String,
    /// `CONSUL_HTTP_TOKEN`
    pub token: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            redis_url: "redis://127.0.0.1:6379".into(),
            data_dir: PathBuf::from("data"),
            gateway: GatewayConfig::default(),
            dispatcher: DispatcherConfig::default(),
            nomad: NomadConfig::default(),
            consul: ConsulConfig::default(),
            queue: QueueConfig::default(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:8080".into(),
            participants: 20,
            max_workflow_bytes: 2 * 1024 * 1024,
            max_output_bytes: 512 * 1024 * 1024,
            admin_token: None,
            internal_secret: None,
            tls_cert: None,
            tls_key: None,
            redirect_addr: None,
            session_hours: 12.0,
            admin_password: None,
            frontend_dir: None,
            workflows_dir: None,
            comfyui_url: None,
        }
    }
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            executor: ExecutorKind::Local,
            slots: 1,
            gpu_task_bin: PathBuf::from("gpu-task"),
            work_dir: None,
            max_attempts: 3,
            reconcile_seconds: 15,
            metrics_addr: None,
        }
    }
}

impl Default for NomadConfig {
    fn default() -> Self {
        NomadConfig {
            addr: "http://127.0.0.1:4646".into(),
            token: None,
            job: crate::contract::NOMAD_JOB.into(),
            gpu_node_pool: "gpu".into(),
        }
    }
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig { addr: "http://127.0.0.1:8500".into(), token: None }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: hcl::Error },
    #[error("environment variable {var}={value:?} is not valid: {why}")]
    Env { var: &'static str, value: String, why: String },
}

impl Config {
    /// Loads the file named by `path` (or by `COMFY_MULTI_CONFIG`; none is
    /// fine), then applies the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os("COMFY_MULTI_CONFIG").map(PathBuf::from);
        let mut config = match path.map(Path::to_path_buf).or(from_env) {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        Ok(config)
    }

    /// Parses one HCL file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        hcl::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Applies environment overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, value: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.parse().map_err(|e: T::Err| ConfigError::Env { var, value, why: e.to_string() })
        }
        if let Some(v) = get("REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = get("DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("GATEWAY_LISTEN") {
            self.gateway.listen = v;
        }
        if let Some(v) = get("PARTICIPANTS") {
            self.gateway.participants = parse("PARTICIPANTS", v)?;
        }
        if let Some(v) = get("MAX_WORKFLOW_BYTES") {
            self.gateway.max_workflow_bytes = parse("MAX_WORKFLOW_BYTES", v)?;
        }
        if let Some(v) = get("MAX_OUTPUT_BYTES") {
            self.gateway.max_output_bytes = parse("MAX_OUTPUT_BYTES", v)?;
        }
        if let Some(v) = get("ADMIN_TOKEN") {
            self.gateway.admin_token = Some(v);
        }
        if let Some(v) = get("INTERNAL_SECRET") {
            self.gateway.internal_secret = Some(v);
        }
        if let Some(v) = get("GATEWAY_TLS_CERT") {
            self.gateway.tls_cert = Some(v.into());
        }
        if let Some(v) = get("GATEWAY_TLS_KEY") {
            self.gateway.tls_key = Some(v.into());
        }
        if let Some(v) = get("GATEWAY_REDIRECT_ADDR") {
            self.gateway.redirect_addr = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("DISPATCHER_METRICS_ADDR") {
            self.dispatcher.metrics_addr = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("SESSION_HOURS") {
            self.gateway.session_hours = parse("SESSION_HOURS", v)?;
        }
        if !(self.gateway.session_hours.is_finite() && self.gateway.session_hours > 0.0) {
            return Err(ConfigError::Env {
                var: "SESSION_HOURS",
                value: self.gateway.session_hours.to_string(),
                why: "a session must last a positive number of hours".into(),
            });
        }
        if let Some(v) = get("ADMIN_PASSWORD") {
            self.gateway.admin_password = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("COMFYUI_FRONTEND_DIR").filter(|v| !v.is_empty()) {
            self.gateway.frontend_dir = Some(v.into());
        }
        if self.gateway.frontend_dir.is_none() {
            self.gateway.frontend_dir = default_frontend_dir(&get).filter(|d| d.join("index.html").is_file());
        }
        if let Some(v) = get("WORKFLOWS_DIR").filter(|v| !v.is_empty()) {
            self.gateway.workflows_dir = Some(v.into());
        }
        if let Some(v) = get("COMFYUI_URL").filter(|v| !v.is_empty()) {
            self.gateway.comfyui_url = Some(v);
        }
        if self.gateway.tls_cert.is_some() != self.gateway.tls_key.is_some() {
            return Err(ConfigError::Env {
                var: "GATEWAY_TLS_CERT",
                value: format!("{:?} / GATEWAY_TLS_KEY={:?}", self.gateway.tls_cert, self.gateway.tls_key),
                why: "HTTPS needs both the certificate and its key (or neither, for plain HTTP)".into(),
            });
        }
        if self.gateway.redirect_addr.is_some() && self.gateway.tls_cert.is_none() {
            return Err(ConfigError::Env {
                var: "GATEWAY_REDIRECT_ADDR",
                value: self.gateway.redirect_addr.clone().unwrap_or_default(),
                why: "the HTTP-to-HTTPS redirect needs HTTPS (GATEWAY_TLS_CERT and GATEWAY_TLS_KEY)".into(),
            });
        }
        if let Some(v) = get("QUEUE_MODE") {
            self.queue.mode = v.parse().map_err(|e: crate::policy::UnknownMode| ConfigError::Env {
                var: "QUEUE_MODE",
                value: v.clone(),
                why: e.to_string(),
            })?;
        }
        if let Some(v) = get("MAX_QUEUED_PER_USER") {
            self.queue.max_queued_per_user = parse("MAX_QUEUED_PER_USER", v)?;
        }
        if let Some(v) = get("MAX_RUNNING_PER_USER") {
            self.queue.max_running_per_user = parse("MAX_RUNNING_PER_USER", v)?;
        }
        if let Some(v) = get("MAX_QUEUE") {
            self.queue.max_queue = parse("MAX_QUEUE", v)?;
        }
        if let Some(v) = get("EXECUTOR") {
            self.dispatcher.executor = match v.as_str() {
                "local" => ExecutorKind::Local,
                "nomad" => ExecutorKind::Nomad,
                _ => {
                    return Err(ConfigError::Env {
                        var: "EXECUTOR",
                        value: v,
                        why: "expected `local` or `nomad`".into(),
                    })
                }
            };
        }
        if let Some(v) = get("SLOTS") {
            self.dispatcher.slots = parse("SLOTS", v)?;
        }
        if let Some(v) = get("GPU_TASK_BIN") {
            self.dispatcher.gpu_task_bin = v.into();
        }
        if let Some(v) = get("MAX_ATTEMPTS") {
            self.dispatcher.max_attempts = parse("MAX_ATTEMPTS", v)?;
        }
        if let Some(v) = get("RECONCILE_SECONDS") {
            self.dispatcher.reconcile_seconds = parse("RECONCILE_SECONDS", v)?;
        }
        if self.dispatcher.reconcile_seconds == 0 {
            return Err(ConfigError::Env {
                var: "RECONCILE_SECONDS",
                value: "0".into(),
                why: "reconciliation needs a period of at least 1 second".into(),
            });
        }
        if let Some(v) = get("WORK_DIR") {
            self.dispatcher.work_dir = Some(v.into());
        }
        if let Some(v) = get("NOMAD_ADDR") {
            self.nomad.addr = v;
        }
        if let Some(v) = get("NOMAD_TOKEN") {
            self.nomad.token = Some(v);
        }
        if let Some(v) = get("NOMAD_JOB") {
            self.nomad.job = v;
        }
        if let Some(v) = get("NOMAD_GPU_NODE_POOL") {
            self.nomad.gpu_node_pool = v;
        }
        if let Some(v) = get("CONSUL_HTTP_ADDR") {
            self.consul.addr = with_scheme(v);
        }
        if let Some(v) = get("CONSUL_HTTP_TOKEN") {
            self.consul.token = Some(v);
        }
        if self.dispatcher.slots == 0 {
            return Err(ConfigError::Env {
                var: "SLOTS",
                value: "0".into(),
                why: "at least one slot is needed to run anything".into(),
            });
        }
        Ok(())
    }
}

impl Config {
    /// Where the pre-loaded workflows are: `gateway.workflows_dir`, else
    /// `<data_dir>/workflows`.
    pub fn workflows_dir(&self) -> PathBuf {
        self.gateway.workflows_dir.clone().unwrap_or_else(|| self.data_dir.join("workflows"))
    }
}

/// The pinned editor's version (`comfyui-frontend-package`), as
/// `scripts/install-deps.sh` installs it.
pub const FRONTEND_VERSION: &str = "1.27.10";

/// Where `scripts/install-deps.sh` unpacks the editor:
/// `${COMFY_MULTI_CACHE:-$HOME/.cache/comfy-multi}/frontend/<version>/comfyui_frontend_package/static`.
fn default_frontend_dir(get: &impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let cache = match get("COMFY_MULTI_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(get("HOME").filter(|v| !v.is_empty())?).join(".cache").join("comfy-multi"),
    };
    Some(cache.join("frontend").join(FRONTEND_VERSION).join("comfyui_frontend_package").join("static"))
}

/// Consul's own tools accept `CONSUL_HTTP_ADDR` without a scheme.
fn with_scheme(addr: String) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr
    } else {
        format!("http://{addr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let c: Config = hcl::from_str("").unwrap();
        assert_eq!(c.gateway.participants, 20);
        assert_eq!(c.dispatcher.executor, ExecutorKind::Local);
    }

    #[test]
    fn file_then_env() {
        let mut c: Config = hcl::from_str(
            r#"
            redis_url = "redis://10.0.0.1:6379"
            dispatcher {
              executor = "nomad"
              slots    = 2
            }
            "#,
        )
        .unwrap();
        assert_eq!(c.dispatcher.slots, 2);
        assert_eq!(c.dispatcher.executor, ExecutorKind::Nomad);
        c.apply_env(|k| (k == "SLOTS").then(|| "4".to_string())).unwrap();
        assert_eq!(c.dispatcher.slots, 4);
        assert_eq!(c.redis_url, "redis://10.0.0.1:6379");
    }

    #[test]
    fn editor_settings() {
        let dir = tempfile::tempdir().unwrap();
        let static_dir = dir.path().join("frontend/1.27.10/comfyui_frontend_package/static");
        std::fs::create_dir_all(&static_dir).unwrap();
        let cache = dir.path().display().to_string();
        let mut c = Config::default();
        c.apply_env(|k| (k == "COMFY_MULTI_CACHE").then(|| cache.clone())).unwrap();
        // No index.html yet: not an editor.
        assert_eq!(c.gateway.frontend_dir, None);
        std::fs::write(static_dir.join("index.html"), "<html>").unwrap();
        let mut c = Config::default();
        c.apply_env(|k| (k == "COMFY_MULTI_CACHE").then(|| cache.clone())).unwrap();
        assert_eq!(c.gateway.frontend_dir.as_deref(), Some(static_dir.as_path()));
        assert_eq!(c.workflows_dir(), PathBuf::from("data/workflows"));
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "COMFYUI_FRONTEND_DIR" => Some("/srv/editor".into()),
            "WORKFLOWS_DIR" => Some("/srv/workflows".into()),
            "COMFYUI_URL" => Some("http://gpu:8188".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.gateway.frontend_dir, Some(PathBuf::from("/srv/editor")));
        assert_eq!(c.workflows_dir(), PathBuf::from("/srv/workflows"));
        assert_eq!(c.gateway.comfyui_url.as_deref(), Some("http://gpu:8188"));
    }

    #[test]
    fn bad_values_say_which() {
        let mut c = Config::default();
        let err = c.apply_env(|k| (k == "EXECUTOR").then(|| "k8s".to_string())).unwrap_err();
        assert!(err.to_string().contains("EXECUTOR"), "{err}");
        assert!(hcl::from_str::<Config>("slotz = 3").is_err());
    }

    #[test]
    fn observability_settings() {
        let c = Config::default();
        assert_eq!((c.gateway.redirect_addr, c.dispatcher.metrics_addr), (None, None), "both off by default");
        let c: Config = hcl::from_str(
            "gateway {\n tls_cert = \"/tls/fullchain.pem\"\n tls_key = \"/tls/privkey.pem\"\n redirect_addr = \"0.0.0.0:80\"\n}\n\
             dispatcher {\n metrics_addr = \"127.0.0.1:9464\"\n}\n",
        )
        .unwrap();
        assert_eq!(c.gateway.redirect_addr.as_deref(), Some("0.0.0.0:80"));
        assert_eq!(c.dispatcher.metrics_addr.as_deref(), Some("127.0.0.1:9464"));
        let mut off = c.clone();
        off.apply_env(|k| (k == "DISPATCHER_METRICS_ADDR").then(String::new)).unwrap();
        assert_eq!(off.dispatcher.metrics_addr, None, "an empty value turns it off");
        let mut c = Config::default();
        let err = c.apply_env(|k| (k == "GATEWAY_REDIRECT_ADDR").then(|| "0.0.0.0:80".into())).unwrap_err();
        assert!(err.to_string().contains("GATEWAY_REDIRECT_ADDR") && err.to_string().contains("HTTPS"), "{err}");
    }
}
