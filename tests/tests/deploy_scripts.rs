//! The deploy scripts (`scripts/deploy-control.sh`, `gpu-up.sh`,
//! `gpu-down.sh`, `status.sh`) and the GPU image (`packer/`).
//!
//! - Every deploy script's `--dry-run` works with a clean environment (only
//!   PATH and a temporary, empty HOME), prints its key steps in order, masks
//!   secrets, and leaves HOME and the deploy folders untouched.
//! - `gpu-down.sh` refuses to delete the instance when the drain fails,
//!   unless `--force` (with stub tools, no network).
//! - shellcheck passes on `scripts/*.sh` and `packer/scripts/*.sh`.
//! - `packer validate` and `packer fmt -check` accept the template (Packer
//!   1.6.6, offline, HOME and PACKER_CACHE_DIR in a temp dir), and the
//!   provisioning scripts' defaults equal the template's pins.
//! - Each provisioning script's `--check` fails on this machine (not a GPU
//!   node) and says what is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Folders the deploy scripts write to in a real run; a dry run must not create them.
const DEPLOY_PATHS: &[&str] = &[
    "/etc/comfy-multi",
    "/var/lib/comfy-multi",
    "/opt/comfy-multi",
    "/srv/comfy-multi",
    "/etc/nomad.d",
    "/etc/consul.d",
];

fn existing_deploy_paths() -> Vec<&'static str> {
    DEPLOY_PATHS.iter().copied().filter(|p| Path::new(p).exists()).collect()
}

/// Runs `bash scripts/<script> <args>` with only PATH and a fresh HOME (plus
/// `env`), asserts it touched neither HOME nor the deploy folders, and
/// returns its output.
fn run_script(script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let before = existing_deploy_paths();
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("scripts").join(script))
        .args(args)
        .current_dir(repo())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .env("HOME", home.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let left: Vec<_> = std::fs::read_dir(home.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{script} {args:?} wrote into HOME: {left:?}\n{}", text(&out));
    assert_eq!(existing_deploy_paths(), before, "{script} {args:?} created deploy folders\n{}", text(&out));
    out
}

fn dry_run(script: &str, env: &[(&str, &str)]) -> String {
    let out = run_script(script, &["--dry-run"], env);
    let said = text(&out);
    assert!(out.status.success(), "{script} --dry-run failed:\n{said}");
    said
}

/// Asserts that `needles` occur in `hay` in this order; returns their positions.
fn in_order(hay: &str, needles: &[&str]) -> Vec<usize> {
    let mut from = 0;
    let mut at = Vec::new();
    for n in needles {
        let i = hay[from..]
            .find(n)
            .map(|i| i + from)
            .unwrap_or_else(|| panic!("expected {n:?} (after byte {from}) in:\n{hay}"));
        at.push(i);
        from = i + n.len();
    }
    at
}

const SECRET: &str = "s3cret-client-secret-value";
const TOKEN: &str = "tok-0123456789-abcdef";

#[test]
fn deploy_control_dry_run_prints_the_whole_setup() {
    let said = dry_run("deploy-control.sh", &[]);
    in_order(
        &said,
        &[
            "(dry run) PUBLIC_HOST is not set: using the placeholder",
            "apt-get install",
            "redis-server",
            "packer/scripts/consul.sh",
            "packer/scripts/nomad.sh --no-device-plugin",
            "consul/server.hcl /etc/consul.d/consul.hcl",
            "consul/gen-secrets.sh",
            "consul acl bootstrap",
            "consul acl policy create -name gpu-task",
            "consul acl token create",
            "nomad tls ca create",
            "nomad/agent/server.hcl /etc/nomad.d/server.hcl",
            "nomad/agent/client-control.hcl /etc/nomad.d/client.hcl",
            "nomad acl bootstrap",
            "nomad/acl/dispatcher.policy.hcl",
            "nomad node pool apply",
            "nomad var put -force nomad/jobs/gateway",
            "nomad var put -force nomad/jobs/comfy-workflow",
            "nomad job run -detach",
            "nomad/redis.nomad.hcl",
            "nomad/gateway.nomad.hcl",
            "register-job",
            "nomad/comfy-workflow.nomad.hcl",
            "nomad/dispatcher.nomad.hcl",
            "nomad/comfyui.nomad.hcl",
            "dry run: nothing was changed",
        ],
    );
    // With a real-looking setting, the setting is used and tokens stay masked.
    let said = dry_run("deploy-control.sh", &[("PUBLIC_HOST", "comfy.example.org"), ("NOMAD_TOKEN", TOKEN)]);
    assert!(said.contains("public_host=comfy.example.org"), "{said}");
    assert!(!said.contains(TOKEN), "the Nomad token leaked:\n{said}");
    assert!(said.contains("NOMAD_TOKEN=***"), "{said}");
}

#[test]
fn gpu_up_dry_run_creates_the_instance_through_the_api_and_waits_for_nomad() {
    let said = dry_run(
        "gpu-up.sh",
        &[
            ("VERDA_CLIENT_ID", "client-id-1"),
            ("VERDA_CLIENT_SECRET", SECRET),
            ("CONSUL_HTTP_TOKEN", TOKEN),
            ("CONTROL_ADDR", "203.0.113.10"),
            ("VERDA_BASE_VOLUME_ID", "base-vol-1"),
            ("GPU_HOSTNAME", "comfy-gpu-test"),
            ("VERDA_SSH_KEY_IDS", "key-a,key-b"),
        ],
    );
    in_order(
        &said,
        &[
            "consul acl token create",
            "-policy-name consul-agent",
            "consul acl token create",
            "-policy-name nomad-client",
            "----- first-boot script -----",
            "put /etc/consul.d/consul.hcl",
            "put /etc/consul.d/join.hcl",
            "retry_join = [\"203.0.113.10\"]",
            "put /etc/nomad.d/client.hcl",
            "node_pool = \"gpu\"",
            "203.0.113.10:4647",
            "gpu-meta.hcl",
            "systemctl enable --now consul",
            "systemctl enable --now nomad",
            "----- end of first-boot script -----",
            "HTTP POST https://api.verda.com/v1/oauth2/token",
            "\"grant_type\":\"client_credentials\"",
            "HTTP GET https://api.verda.com/v1/volumes/base-vol-1",
            "HTTP PUT https://api.verda.com/v1/volumes {\"action\":\"clone\",\"id\":\"base-vol-1\"",
            "HTTP POST https://api.verda.com/v1/scripts",
            "HTTP POST https://api.verda.com/v1/instances",
            "\"hostname\":\"comfy-gpu-test\"",
            "\"ssh_key_ids\":[\"key-a\",\"key-b\"]",
            "write /var/lib/comfy-multi/gpu/comfy-gpu-test.env",
            "to be running",
            "Nomad node comfy-gpu-test ready with an nvidia/gpu device",
            "HTTP DELETE https://api.verda.com/v1/scripts/",
            "dispatcher resume",
            "dry run: nothing was created",
        ],
    );
    assert!(!said.contains(SECRET), "the Verda client secret leaked:\n{said}");
    assert!(!said.contains(TOKEN), "the Consul token leaked:\n{said}");
    assert!(said.contains("\"client_secret\":\"***\""), "{said}");
    assert!(said.contains("agent = \"***\""), "the node's agent token is not masked:\n{said}");
}

#[test]
fn gpu_up_dry_run_without_settings_says_it_uses_placeholders() {
    let said = dry_run("gpu-up.sh", &[]);
    for needle in [
        "(dry run) CONTROL_ADDR is not set",
        "(dry run) VERDA_BASE_VOLUME_ID is not set",
        "(dry run) no Verda credentials in the environment",
        "HTTP POST https://api.verda.com/v1/instances",
    ] {
        assert!(said.contains(needle), "expected {needle:?} in:\n{said}");
    }
}

#[test]
fn gpu_down_dry_run_drains_before_it_deletes() {
    let said = dry_run(
        "gpu-down.sh",
        &[("VERDA_CLIENT_SECRET", SECRET), ("VERDA_CLIENT_ID", "client-id-1"), ("NOMAD_TOKEN", TOKEN)],
    );
    let at = in_order(
        &said,
        &[
            "dispatcher drain --deadline 10m",
            "consul acl token delete",
            "HTTP POST https://api.verda.com/v1/oauth2/token",
            "HTTP PUT https://api.verda.com/v1/instances {\"action\":\"delete\"",
            "\"delete_permanently\":true",
            "dry run: nothing was changed",
        ],
    );
    assert!(at[0] < at[3]);
    assert!(!said.contains(SECRET) && !said.contains(TOKEN), "a secret leaked:\n{said}");

    let said = dry_run("gpu-down.sh", &[("DRAIN_DEADLINE", "90s")]);
    assert!(said.contains("dispatcher drain --deadline 90s"), "{said}");
}

#[test]
fn status_dry_run_lists_every_section() {
    let said = dry_run("status.sh", &[("GATEWAY_URL", "https://comfy.example.org")]);
    in_order(
        &said,
        &[
            "nomad node status",
            "nomad job status",
            "consul members",
            "https://comfy.example.org/healthz",
            "dispatcher",
            " status",
            "dry run: nothing was run",
        ],
    );
}

#[test]
fn every_deploy_script_has_help_and_refuses_unknown_arguments() {
    for script in ["deploy-control.sh", "gpu-up.sh", "gpu-down.sh", "status.sh"] {
        let out = run_script(script, &["--help"], &[]);
        let said = text(&out);
        assert!(out.status.success(), "{script} --help failed:\n{said}");
        assert!(said.contains(script) && said.contains("--dry-run"), "{script} --help:\n{said}");

        let out = run_script(script, &["--no-such-flag"], &[]);
        let said = text(&out);
        assert!(!out.status.success(), "{script} accepted an unknown flag:\n{said}");
        assert!(said.contains("unknown argument") && said.contains("how to fix"), "{script}:\n{said}");
    }
    let out = Command::new("bash").arg(repo().join("scripts/deploy-lib.sh")).output().unwrap();
    assert!(!out.status.success(), "deploy-lib.sh must refuse to run on its own");
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A real `gpu-down.sh` run against stub tools: the dispatcher's drain fails.
/// Without --force nothing is deleted (no HTTP request at all); with --force it
/// goes on to the Verda API (whose stub refuses the login, ending the run).
#[test]
fn gpu_down_refuses_to_delete_when_the_drain_fails_unless_forced() {
    if !is_root() {
        eprintln!("skipped: gpu-down.sh's real mode needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    let state = tmp.path().join("state");
    let secrets = tmp.path().join("secrets");
    let log = tmp.path().join("calls.log");
    for d in [&bin, &state.join("gpu"), &secrets] {
        std::fs::create_dir_all(d).unwrap();
    }
    let stub = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $*\" >>'{}'\n{body}\n", log.display())).unwrap();
        std::process::Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    };
    stub("dispatcher", "echo 'dispatcher: cannot reach Redis' >&2; exit 1");
    stub("curl", "exit 22");
    stub("consul", "exit 0");
    stub("jq", "exit 0");
    std::fs::write(
        state.join("gpu/comfy-gpu-x.env"),
        "GPU_HOSTNAME=comfy-gpu-x\nVERDA_INSTANCE_ID=inst-1\nVERDA_OS_VOLUME_ID=vol-1\nVERDA_SCRIPT_ID=\nCONSUL_TOKEN_ACCESSORS=acc-1 acc-2\n",
    )
    .unwrap();
    std::fs::write(secrets.join("nomad-management.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(secrets.join("consul-management.token"), format!("{TOKEN}\n")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let run = |args: &[&str]| {
        std::fs::write(&log, "").unwrap();
        let out = Command::new("bash")
            .arg(repo().join("scripts/gpu-down.sh"))
            .args(args)
            .env_clear()
            .env("PATH", &path)
            .env("HOME", tmp.path())
            .env("STATE_DIR", &state)
            .env("SECRETS_DIR", &secrets)
            .env("DEPLOY_ENV", tmp.path().join("none.env"))
            .env("DISPATCHER", bin.join("dispatcher"))
            .env("VERDA_CLIENT_ID", "client-id-1")
            .env("VERDA_CLIENT_SECRET", SECRET)
            .output()
            .unwrap();
        (out, std::fs::read_to_string(&log).unwrap())
    };

    let (out, calls) = run(&[]);
    let said = text(&out);
    assert!(!out.status.success(), "gpu-down.sh went on after a failed drain:\n{said}");
    assert!(said.contains("refusing to delete") && said.contains("--force"), "{said}");
    assert!(calls.contains("dispatcher drain --deadline 10m"), "{calls}");
    assert!(!calls.contains("curl"), "an HTTP request was made after a failed drain: {calls}");
    assert!(!calls.contains("consul acl token delete"), "{calls}");
    assert!(state.join("gpu/comfy-gpu-x.env").exists(), "the record was removed");
    assert!(!said.contains(TOKEN), "{said}");

    let (out, calls) = run(&["--force"]);
    let said = text(&out);
    assert!(said.contains("deleting anyway because of --force"), "{said}");
    assert!(calls.contains("consul acl token delete -id acc-1"), "{calls}");
    assert!(calls.contains("https://api.verda.com/v1/oauth2/token"), "--force did not go on to the API: {calls}");
    assert!(!calls.contains(SECRET) && !calls.contains(TOKEN), "a secret was on a command line: {calls}");
    assert!(!out.status.success(), "the stub API refuses the login:\n{said}");
}

#[test]
fn shellcheck_passes_on_the_deploy_and_packer_scripts() {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["scripts", "packer/scripts"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sh") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 10, "{files:?}");
    let out = Command::new("shellcheck")
        .args(&files)
        .output()
        .expect("shellcheck not found: scripts/install-deps.sh installs it");
    assert!(out.status.success(), "shellcheck:\n{}", text(&out));

    // scripts/test.sh checks the same scripts (and consul/'s) in CI.
    let test_sh = std::fs::read_to_string(repo().join("scripts/test.sh")).unwrap();
    assert!(
        test_sh.contains("packer/scripts/*.sh") && test_sh.contains("consul/*.sh"),
        "scripts/test.sh's shellcheck list"
    );
}

fn packer(args: &[&str], home: &Path) -> Output {
    Command::new("packer")
        .args(args)
        .current_dir(repo())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("PACKER_CACHE_DIR", home.join("cache"))
        .env("CHECKPOINT_DISABLE", "1")
        .output()
        .expect("packer not found: scripts/install-deps.sh installs Debian's packer")
}

#[test]
fn packer_validates_and_formats_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let template = "packer/gpu-node.pkr.hcl";
    let out = packer(&["fmt", "-check", template], tmp.path());
    assert!(out.status.success(), "packer fmt -check {template}:\n{}", text(&out));

    // validate checks the SSH key file and the uploaded files exist: dummies.
    let key = tmp.path().join("id_ed25519");
    let keygen = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).output();
    let gpu_task = tmp.path().join("gpu-task");
    std::fs::write(&gpu_task, "#!/bin/sh\n").unwrap();
    let out = match keygen {
        Ok(o) if o.status.success() => packer(
            &[
                "validate",
                "-var",
                "ssh_host=192.0.2.10",
                "-var",
                &format!("ssh_private_key_file={}", key.display()),
                "-var",
                &format!("gpu_task_binary={}", gpu_task.display()),
                template,
            ],
            tmp.path(),
        ),
        _ => {
            eprintln!("ssh-keygen unavailable: packer validate -syntax-only");
            packer(&["validate", "-syntax-only", "-var", "ssh_host=192.0.2.10", template], tmp.path())
        }
    };
    assert!(out.status.success(), "packer validate {template}:\n{}", text(&out));
}

/// The `default` of every `variable` block of the Packer template.
fn packer_defaults() -> BTreeMap<String, String> {
    let src = std::fs::read_to_string(repo().join("packer/gpu-node.pkr.hcl")).unwrap();
    let body: hcl::Body = hcl::from_str(&src).expect("gpu-node.pkr.hcl parses as HCL");
    let mut out = BTreeMap::new();
    for block in body.blocks().filter(|b| b.identifier() == "variable") {
        let name = block.labels()[0].as_str().to_string();
        let description = block.body().attributes().find(|a| a.key() == "description");
        assert!(description.is_some(), "variable {name} has no description");
        if let Some(attr) = block.body().attributes().find(|a| a.key() == "default") {
            if let hcl::Expression::String(s) = attr.expr() {
                out.insert(name, s.clone());
            }
        }
    }
    out
}

/// `VAR=${VAR:-default}` assignments of a provisioning script.
fn script_defaults(script: &str) -> BTreeMap<String, String> {
    let src = std::fs::read_to_string(repo().join("packer/scripts").join(script)).unwrap();
    src.lines()
        .filter_map(|l| {
            let (var, rest) = l.split_once('=')?;
            let inner = rest.strip_prefix("${")?.strip_suffix('}')?;
            let (v2, default) = inner.split_once(":-")?;
            (v2 == var).then(|| (var.to_string(), default.to_string()))
        })
        .collect()
}

#[test]
fn the_scripts_defaults_are_the_templates_pins() {
    let pins = packer_defaults();
    let pairs = [
        ("nvidia.sh", "NVIDIA_DRIVER_MAJOR", "nvidia_driver_major"),
        ("nomad.sh", "NOMAD_VERSION", "nomad_version"),
        ("nomad.sh", "NOMAD_SHA256", "nomad_sha256"),
        ("nomad.sh", "NOMAD_DEVICE_NVIDIA_VERSION", "nomad_device_nvidia_version"),
        ("nomad.sh", "NOMAD_PLUGIN_DIR", "nomad_plugin_dir"),
        ("consul.sh", "CONSUL_VERSION", "consul_version"),
        ("consul.sh", "CONSUL_DEB", "consul_deb"),
        ("consul.sh", "CONSUL_SHA256", "consul_sha256"),
        ("comfyui.sh", "COMFYUI_COMMIT", "comfyui_commit"),
        ("comfyui.sh", "COMFYUI_REPO", "comfyui_repo"),
        ("comfyui.sh", "TORCH_PINS", "torch_pins"),
    ];
    for (script, var, pin) in pairs {
        let defaults = script_defaults(script);
        assert_eq!(defaults.get(var), pins.get(pin), "{script} {var} vs gpu-node.pkr.hcl variable {pin}");
    }
    for (pin, len) in [("nomad_sha256", 64), ("consul_sha256", 64), ("comfyui_commit", 40)] {
        let v = &pins[pin];
        assert!(v.len() == len && v.chars().all(|c| c.is_ascii_hexdigit()), "{pin} = {v:?}");
    }
    // The image puts the plugin where the GPU client looks for it.
    let client = repo().join("nomad/agent/client-gpu.hcl");
    if client.exists() {
        let body: hcl::Body = hcl::from_str(&std::fs::read_to_string(&client).unwrap()).unwrap();
        let plugin_dir = body.attributes().find(|a| a.key() == "plugin_dir").map(|a| a.expr().clone());
        assert_eq!(plugin_dir, Some(hcl::Expression::String(pins["nomad_plugin_dir"].clone())));
    }
}

#[test]
fn the_model_manifest_pins_every_file() {
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("packer/models.json")).unwrap()).unwrap();
    let models = doc["models"].as_array().expect("{\"models\": [...]}");
    assert!(!models.is_empty());
    for m in models {
        let sha = m["sha256"].as_str().unwrap();
        assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()), "{m}");
        assert!(m["url"].as_str().unwrap().starts_with("https://"), "{m}");
        let name = m["name"].as_str().unwrap();
        assert!(!name.is_empty() && !name.contains('/'), "{m}");
        assert!(!m["target"].as_str().unwrap().contains(".."), "{m}");
    }
}

/// This machine is not a GPU node: every `--check` fails and says why.
#[test]
fn provisioning_checks_fail_here_and_say_what_is_missing() {
    let cases = [
        ("nvidia.sh", "nvidia-smi"),
        ("nomad.sh", "/usr/local/bin/nomad"),
        ("consul.sh", "/usr/local/bin/consul"),
        ("comfyui.sh", "/opt/comfyui"),
        ("gpu-task.sh", "/usr/local/bin/gpu-task"),
        ("models.sh", "v1-5-pruned-emaonly.safetensors"),
    ];
    for (script, missing) in cases {
        let home = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(repo().join("packer/scripts").join(script))
            .arg("--check")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .output()
            .unwrap();
        let said = text(&out);
        assert!(!out.status.success(), "{script} --check passed on a machine that is no GPU node:\n{said}");
        assert!(said.contains("FAILED") && said.contains(missing), "{script} --check should name {missing:?}:\n{said}");
        assert!(said.contains("how to fix"), "{script} --check gives no fix:\n{said}");

        let out = Command::new("bash").arg(repo().join("packer/scripts").join(script)).arg("--help").output().unwrap();
        assert!(out.status.success() && text(&out).contains("--check"), "{script} --help:\n{}", text(&out));
    }
}

/// A Verda API stand-in: the calls gpu-up.sh and gpu-down.sh make, with the
/// shapes of Verda's public API (OAuth2 client credentials, volume clone,
/// startup scripts, instances; ids answered as plain text or a JSON list).
mod verda_standin {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use serde_json::{json, Value};

    pub const ACCESS_TOKEN: &str = "verda-access-token-42";

    #[derive(Default)]
    pub struct Fake {
        /// (method, path, body) of every authorized request, in order.
        pub requests: Vec<(String, String, String)>,
        clone_gets: u32,
        instance_gets: u32,
        deleted: bool,
    }

    pub type Shared = Arc<Mutex<Fake>>;

    async fn handle(State(fake): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let body = String::from_utf8_lossy(&body).to_string();
        let path = uri.path().to_string();
        if method == Method::POST && path == "/v1/oauth2/token" {
            let b: Value = serde_json::from_str(&body).unwrap_or_default();
            if b["grant_type"] != "client_credentials" || b["client_secret"] != super::SECRET {
                return (StatusCode::UNAUTHORIZED, "{\"code\":\"unauthorized_request\"}").into_response();
            }
            fake.lock().unwrap().requests.push((method.to_string(), path, String::new()));
            return axum::Json(json!({"access_token": ACCESS_TOKEN, "refresh_token": "r", "expires_in": 3600,
                "scope": "cloud-api-v1", "token_type": "Bearer"}))
            .into_response();
        }
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if auth != format!("Bearer {ACCESS_TOKEN}") {
            return (StatusCode::UNAUTHORIZED, "{\"code\":\"unauthorized_request\"}").into_response();
        }
        let mut f = fake.lock().unwrap();
        f.requests.push((method.to_string(), path.clone(), body.clone()));
        match (method.as_str(), path.as_str()) {
            ("GET", "/v1/volumes/base-1") => {
                axum::Json(json!({"id": "base-1", "location": "FIN-02", "status": "detached", "is_os_volume": true}))
                    .into_response()
            }
            ("PUT", "/v1/volumes") => axum::Json(json!(["clone-1"])).into_response(),
            ("GET", "/v1/volumes/clone-1") => {
                f.clone_gets += 1;
                let status = if f.clone_gets < 2 { "cloning" } else { "detached" };
                axum::Json(json!({"id": "clone-1", "location": "FIN-02", "status": status})).into_response()
            }
            ("POST", "/v1/scripts") => "script-1".into_response(),
            ("DELETE", "/v1/scripts/script-1") => StatusCode::OK.into_response(),
            ("POST", "/v1/instances") => (StatusCode::ACCEPTED, "inst-1").into_response(),
            ("GET", "/v1/instances/inst-1") if f.deleted => {
                (StatusCode::NOT_FOUND, "{\"code\":\"not_found\"}").into_response()
            }
            ("GET", "/v1/instances/inst-1") => {
                f.instance_gets += 1;
                let status = if f.instance_gets < 2 { "provisioning" } else { "running" };
                axum::Json(json!({"id": "inst-1", "status": status, "ip": "198.51.100.7",
                    "hostname": "comfy-gpu-t", "os_volume_id": "clone-1"}))
                .into_response()
            }
            ("PUT", "/v1/instances") => {
                f.deleted = true;
                StatusCode::ACCEPTED.into_response()
            }
            _ => (StatusCode::NOT_FOUND, "{\"code\":\"not_found\"}").into_response(),
        }
    }

    /// Serves the stand-in on a free loopback port; returns its API base URL.
    pub async fn start() -> (String, Shared) {
        let fake: Shared = Arc::default();
        let app = axum::Router::new().fallback(handle).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/v1"), fake)
    }
}

/// gpu-up.sh and then gpu-down.sh for real, against the Verda API stand-in
/// and stub consul / nomad / dispatcher commands (which log their calls).
#[tokio::test(flavor = "multi_thread")]
async fn gpu_up_then_gpu_down_against_a_verda_api_standin() {
    if !is_root() {
        eprintln!("skipped: the real mode of gpu-up.sh / gpu-down.sh needs root");
        return;
    }
    let (api, fake) = verda_standin::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let bin = t.join("bin");
    for d in ["bin", "state", "secrets", "consul-gpu/tls", "nomad-tls"] {
        std::fs::create_dir_all(t.join(d)).unwrap();
    }
    let log = t.join("calls.log");
    let stub = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\necho \"{name} $*\" >>'{}'\n{body}\n", log.display())).unwrap();
        Command::new("chmod").arg("+x").arg(&p).status().unwrap();
    };
    stub(
        "consul",
        r#"case "$*" in *"token create"*"consul-agent"*) echo '{"SecretID":"agent-secret-0001","AccessorID":"agent-acc"}';; *"token create"*) echo '{"SecretID":"nomad-secret-0002","AccessorID":"nomad-acc"}';; esac"#,
    );
    stub(
        "nomad",
        r#"case "$*" in
  "node status -json") echo '[{"ID":"node-1","Name":"comfy-gpu-t","Status":"ready"}]';;
  "node status -json node-1") echo '{"NodeResources":{"Devices":[{"Vendor":"nvidia","Type":"gpu","Instances":[{"ID":"GPU-1"}]}]}}';;
esac"#,
    );
    stub("dispatcher", "exit 0");
    for f in ["consul-gpu/gossip.hcl", "consul-gpu/tls.hcl", "consul-gpu/tls/consul-agent-ca.pem"] {
        std::fs::write(t.join(f), format!("# {f}\n")).unwrap();
    }
    for f in ["nomad-agent-ca.pem", "global-client-nomad.pem", "global-client-nomad-key.pem"] {
        std::fs::write(t.join("nomad-tls").join(f), format!("# {f}\n")).unwrap();
    }
    std::fs::write(t.join("secrets/consul-management.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(t.join("secrets/nomad-management.token"), format!("{TOKEN}\n")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let script = |name: &str| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(repo().join("scripts").join(name))
            .current_dir(repo())
            .env_clear()
            .env("PATH", &path)
            .env("HOME", t)
            .env("STATE_DIR", t.join("state"))
            .env("SECRETS_DIR", t.join("secrets"))
            .env("DEPLOY_ENV", t.join("none.env"))
            .env("DISPATCHER", bin.join("dispatcher"))
            .env("CONSUL_GPU_DIR", t.join("consul-gpu"))
            .env("NOMAD_TLS_DIR", t.join("nomad-tls"))
            .env("VERDA_API", &api)
            .env("VERDA_CLIENT_ID", "client-id-1")
            .env("VERDA_CLIENT_SECRET", SECRET)
            .env("CONTROL_ADDR", "203.0.113.5")
            .env("VERDA_BASE_VOLUME_ID", "base-1")
            .env("VERDA_SSH_KEY_IDS", "key-a")
            .env("GPU_HOSTNAME", "comfy-gpu-t")
            .env("POLL_INTERVAL", "1")
            .env("UP_TIMEOUT", "60");
        cmd
    };

    // ---- up
    let out = script("gpu-up.sh").output().await.unwrap();
    let said = text(&out);
    assert!(out.status.success(), "gpu-up.sh failed:\n{said}");
    for secret in [SECRET, TOKEN, "agent-secret-0001", "nomad-secret-0002", verda_standin::ACCESS_TOKEN] {
        assert!(!said.contains(secret), "{secret} leaked into gpu-up.sh's output:\n{said}");
    }
    let requests = fake.lock().unwrap().requests.clone();
    let seq: Vec<String> = requests.iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    let joined = seq.join("\n");
    in_order(
        &joined,
        &[
            "POST /v1/oauth2/token",
            "GET /v1/volumes/base-1",
            "PUT /v1/volumes",
            "GET /v1/volumes/clone-1",
            "POST /v1/scripts",
            "POST /v1/instances",
            "GET /v1/instances/inst-1",
            "DELETE /v1/scripts/script-1",
        ],
    );
    let body = |m: &str, p: &str| -> serde_json::Value {
        let (_, _, b) = requests.iter().find(|(rm, rp, _)| rm == m && rp == p).unwrap();
        serde_json::from_str(b).unwrap_or_else(|e| panic!("{m} {p} sent invalid JSON ({e}): {b}"))
    };
    let clone = body("PUT", "/v1/volumes");
    assert_eq!((clone["action"].as_str(), clone["id"].as_str()), (Some("clone"), Some("base-1")), "{clone}");
    let created = body("POST", "/v1/instances");
    assert_eq!(created["image"], "clone-1", "{created}");
    assert_eq!(created["hostname"], "comfy-gpu-t");
    assert_eq!(created["location_code"], "FIN-02", "the base volume's location");
    assert_eq!(created["startup_script_id"], "script-1");
    assert_eq!(created["ssh_key_ids"], serde_json::json!(["key-a"]));
    assert_eq!(created["instance_type"], "1H100.80S.30V");
    let first_boot = body("POST", "/v1/scripts")["script"].as_str().unwrap().to_string();
    assert!(first_boot.starts_with("#!/bin/bash\n"), "{first_boot}");
    for needle in [
        "retry_join = [\"203.0.113.5\"]",
        "agent = \"agent-secret-0001\"",
        "token = \"nomad-secret-0002\"",
        "203.0.113.5:4647",
        "# consul-gpu/gossip.hcl",
        "# global-client-nomad-key.pem",
        "systemctl enable --now nomad",
    ] {
        assert!(first_boot.contains(needle), "the first-boot script lacks {needle:?}:\n{first_boot}");
    }
    let check = std::process::Command::new("bash").arg("-n").arg("-c").arg(&first_boot).output().unwrap();
    assert!(check.status.success(), "the first-boot script is not valid bash: {}", text(&check));
    let record = std::fs::read_to_string(t.join("state/gpu/comfy-gpu-t.env")).unwrap();
    for line in [
        "VERDA_INSTANCE_ID=inst-1",
        "VERDA_OS_VOLUME_ID=clone-1",
        "CONSUL_TOKEN_ACCESSORS=agent-acc nomad-acc",
        "NOMAD_NODE_ID=node-1",
    ] {
        assert!(record.contains(line), "{line:?} not in the record:\n{record}");
    }
    let calls = std::fs::read_to_string(&log).unwrap();
    in_order(
        &calls,
        &["consul acl token create", "consul acl token create", "nomad node status -json", "dispatcher resume"],
    );

    // ---- down
    std::fs::write(&log, "").unwrap();
    fake.lock().unwrap().requests.clear();
    let out = script("gpu-down.sh").output().await.unwrap();
    let said = text(&out);
    assert!(out.status.success(), "gpu-down.sh failed:\n{said}");
    assert!(!said.contains(SECRET) && !said.contains(TOKEN), "a secret leaked:\n{said}");
    let calls = std::fs::read_to_string(&log).unwrap();
    in_order(
        &calls,
        &[
            "dispatcher drain --deadline 10m",
            "consul acl token delete -id agent-acc",
            "consul acl token delete -id nomad-acc",
        ],
    );
    let requests = fake.lock().unwrap().requests.clone();
    let (_, _, delete) = requests.iter().find(|(m, p, _)| m == "PUT" && p == "/v1/instances").expect("a delete");
    let delete: serde_json::Value = serde_json::from_str(delete).unwrap();
    assert_eq!(delete["action"], "delete");
    assert_eq!(delete["id"], serde_json::json!(["inst-1"]));
    assert_eq!(delete["volume_ids"], serde_json::json!(["clone-1"]), "the cloned OS volume goes too");
    assert_eq!(delete["delete_permanently"], true);
    assert!(!t.join("state/gpu/comfy-gpu-t.env").exists() && t.join("state/gpu/comfy-gpu-t.deleted").exists());
}
