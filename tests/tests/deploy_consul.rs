//! The Consul deployment files in `consul/` are valid for the real Consul
//! 1.8.7 and keep secrets out of the repository.
//!
//! - `consul/gen-secrets.sh` makes the gossip key, CA and certificates into a
//!   temp dir (never the repository), is idempotent, and `--dry-run` writes
//!   nothing;
//! - `consul validate` (1.8.7) accepts the server config, the GPU client config
//!   and every service definition together with the generated files, laid
//!   out as on the hosts;
//! - the ACL policies parse (hcl-rs) and use only rules Consul 1.8 knows;
//! - no committed file under `consul/` holds a key, certificate or token;
//! - a real server (server.hcl) and a real GPU client (client-gpu.hcl) form a
//!   datacenter on loopback with gossip encryption, TLS (auto_encrypt) and
//!   default-deny ACLs; every policy in `consul/acl/` is accepted by the
//!   server and grants exactly what its user needs (gpu-task finds the
//!   fallback `comfyui` service through `dispatcher::consul`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine as _;
use comfy_multi_tests::harness::{free_port, spawn_logged, tool_path, wait_until, ChildGuard};
use dispatcher::consul::ConsulClient;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("repo root")
}

fn consul_dir() -> PathBuf {
    repo().join("consul")
}

fn say(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `consul` with no inherited `CONSUL_*` settings.
fn consul_cmd() -> std::process::Command {
    let mut cmd = std::process::Command::new(tool_path("consul"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CONSUL_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `consul/gen-secrets.sh ARGS` with the pinned consul binary.
fn gen_secrets(args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(consul_dir().join("gen-secrets.sh"));
    cmd.args(args).env("CONSUL", tool_path("consul")).current_dir(repo());
    cmd.output().expect("run consul/gen-secrets.sh")
}

/// `consul validate PATHS…`: (accepted, output).
fn validate(paths: &[PathBuf]) -> (bool, String) {
    let out = consul_cmd().arg("validate").args(paths).output().expect("run consul validate");
    (out.status.success(), say(&out))
}

fn assert_valid(what: &str, paths: &[PathBuf]) {
    let (ok, out) = validate(paths);
    assert!(ok && out.contains("Configuration is valid!"), "consul validate rejected {what} ({paths:?}):\n{out}");
}

/// Every file under `dir` (recursively), sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// Path → content of every file under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    files_under(dir).into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn copy_dir(from: &Path, to: &Path) {
    for file in files_under(from) {
        let dest = to.join(file.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&file, &dest).unwrap();
    }
}

fn service_files() -> Vec<PathBuf> {
    let files: Vec<PathBuf> = files_under(&consul_dir().join("services"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "hcl" || e == "json"))
        .collect();
    assert!(!files.is_empty(), "consul/services/ has no service definition");
    files
}

fn parse_hcl(path: &Path) -> hcl::Body {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hcl::from_str(&text).unwrap_or_else(|e| panic!("{} is not HCL: {e}", path.display()))
}

fn string_attr(body: &hcl::Body, key: &str) -> Option<String> {
    body.attributes().find(|a| a.key() == key).and_then(|a| match a.expr() {
        hcl::Expression::String(s) => Some(s.clone()),
        _ => None,
    })
}

fn block<'a>(body: &'a hcl::Body, ident: &str) -> Option<&'a hcl::Block> {
    body.blocks().find(|b| b.identifier() == ident)
}

fn bool_attr(body: &hcl::Body, key: &str) -> Option<bool> {
    body.attributes().find(|a| a.key() == key).and_then(|a| match a.expr() {
        hcl::Expression::Bool(b) => Some(*b),
        _ => None,
    })
}

// ---------------------------------------------------------------------------
// gen-secrets.sh
// ---------------------------------------------------------------------------

#[test]
fn gen_secrets_dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();

    // A directory that does not exist yet stays absent.
    let missing = tmp.path().join("etc/consul.d");
    let out = gen_secrets(&["--dry-run", missing.to_str().unwrap()]);
    assert!(out.status.success(), "gen-secrets.sh --dry-run failed:\n{}", say(&out));
    let text = say(&out);
    for what in ["gossip.hcl", "consul tls ca create", "-server -dc", "-client", "tls.hcl", "gpu-node"] {
        assert!(text.contains(what), "dry run does not mention {what}:\n{text}");
    }
    assert!(!tmp.path().join("etc").exists(), "dry run created {}", missing.display());

    // An existing empty directory stays empty.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = gen_secrets(&["--dry-run", empty.to_str().unwrap()]);
    assert!(out.status.success(), "{}", say(&out));
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "dry run wrote into {}", empty.display());

    // Over a complete set it changes nothing either.
    let full = tmp.path().join("full");
    let out = gen_secrets(&[full.to_str().unwrap()]);
    assert!(out.status.success(), "{}", say(&out));
    let before = snapshot(&full);
    let out = gen_secrets(&["--dry-run", full.to_str().unwrap()]);
    assert!(out.status.success(), "{}", say(&out));
    assert_eq!(snapshot(&full), before, "dry run changed {}", full.display());
}

#[test]
fn gen_secrets_is_idempotent_and_keeps_existing_keys() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("consul.d");
    let gpu_dir = "/etc/consul.d";
    let out = gen_secrets(&["--gpu-dir", gpu_dir, dir.to_str().unwrap()]);
    assert!(out.status.success(), "gen-secrets.sh failed:\n{}", say(&out));

    let expected = [
        "gossip.hcl",
        "tls.hcl",
        "tls/consul-agent-ca.pem",
        "tls/consul-agent-ca-key.pem",
        "tls/server.pem",
        "tls/server-key.pem",
        "tls/client.pem",
        "tls/client-key.pem",
        "gpu-node/gossip.hcl",
        "gpu-node/tls.hcl",
        "gpu-node/tls/consul-agent-ca.pem",
    ];
    let written: Vec<String> =
        files_under(&dir).iter().map(|p| p.strip_prefix(&dir).unwrap().to_string_lossy().into_owned()).collect();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut got = written.clone();
    got.sort();
    assert_eq!(got, want, "gen-secrets.sh wrote other files than expected (no scratch files may stay)");

    // Secret files are private; the GPU bundle holds no key.
    for secret in
        ["gossip.hcl", "tls/consul-agent-ca-key.pem", "tls/server-key.pem", "tls/client-key.pem", "gpu-node/gossip.hcl"]
    {
        let mode = std::fs::metadata(dir.join(secret)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{secret} has mode {mode:o}");
    }
    assert!(written.iter().filter(|p| p.starts_with("gpu-node")).all(|p| !p.contains("key")));
    let gossip = std::fs::read_to_string(dir.join("gossip.hcl")).unwrap();
    let key = gossip.lines().find_map(|l| l.strip_prefix("encrypt = \"")).expect("encrypt line");
    let key = key.trim_end_matches('"');
    let raw = base64::engine::general_purpose::STANDARD.decode(key).expect("gossip key is base64");
    assert_eq!(raw.len(), 32, "gossip key length");
    let gpu_tls = std::fs::read_to_string(dir.join("gpu-node/tls.hcl")).unwrap();
    assert!(gpu_tls.contains("ca_file = \"/etc/consul.d/tls/consul-agent-ca.pem\""), "{gpu_tls}");
    assert!(!gpu_tls.contains("cert_file") && !gpu_tls.contains("key_file"), "{gpu_tls}");
    let server_tls = std::fs::read_to_string(dir.join("tls.hcl")).unwrap();
    assert!(server_tls.contains(&format!("{}/tls/server-key.pem", dir.display())), "{server_tls}");

    // The server certificate is for the datacenter of consul/server.hcl.
    let dc = string_attr(&parse_hcl(&consul_dir().join("server.hcl")), "datacenter").unwrap();
    let info = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join("tls/server.pem"))
        .output();
    if let Some(info) = info.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(text.contains(&format!("server.{dc}.consul")), "server certificate lacks server.{dc}.consul:\n{text}");
    }

    // A second run keeps every byte.
    let before = snapshot(&dir);
    let out = gen_secrets(&["--gpu-dir", gpu_dir, dir.to_str().unwrap()]);
    assert!(out.status.success(), "second run failed:\n{}", say(&out));
    assert_eq!(snapshot(&dir), before, "a second run changed files:\n{}", say(&out));

    // A lost server certificate is made again from the existing CA; the
    // other keys stay.
    std::fs::remove_file(dir.join("tls/server.pem")).unwrap();
    std::fs::remove_file(dir.join("tls/server-key.pem")).unwrap();
    let out = gen_secrets(&["--gpu-dir", gpu_dir, dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", say(&out));
    let after = snapshot(&dir);
    for (path, content) in &before {
        if !path.ends_with("tls/server.pem") && !path.ends_with("tls/server-key.pem") {
            assert_eq!(after.get(path), Some(content), "{} changed", path.display());
        }
    }
    assert!(dir.join("tls/server-key.pem").is_file());

    // A certificate whose CA is gone is refused, not silently re-rooted.
    std::fs::remove_file(dir.join("tls/consul-agent-ca-key.pem")).unwrap();
    std::fs::remove_file(dir.join("tls/consul-agent-ca.pem")).unwrap();
    let out = gen_secrets(&[dir.to_str().unwrap()]);
    assert!(!out.status.success(), "gen-secrets.sh re-created a CA under existing certificates:\n{}", say(&out));
    assert!(!dir.join("tls/consul-agent-ca.pem").exists());
}

#[test]
fn gen_secrets_refuses_the_repository() {
    if !in_git_work_tree() {
        eprintln!("not a git work tree: gen-secrets.sh's refusal cannot be checked here");
        return;
    }
    let target = consul_dir().join("generated-secrets-test");
    let out = gen_secrets(&[target.to_str().unwrap()]);
    assert!(!out.status.success(), "gen-secrets.sh wrote into the repository:\n{}", say(&out));
    assert!(!target.exists(), "{} was created", target.display());
}

#[test]
fn gen_secrets_passes_shellcheck() {
    let scripts: Vec<PathBuf> =
        files_under(&consul_dir()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "sh")).collect();
    assert!(!scripts.is_empty());
    let out = std::process::Command::new(tool_path("shellcheck")).args(&scripts).output().expect("run shellcheck");
    assert!(out.status.success(), "shellcheck {scripts:?}:\n{}", say(&out));
}

// ---------------------------------------------------------------------------
// consul validate
// ---------------------------------------------------------------------------

/// Secrets for a test, made by gen-secrets.sh with the GPU bundle's paths
/// pointing at `<tmp>/gpu` (where [`gpu_node_dir`] puts it).
fn make_secrets(tmp: &Path) -> PathBuf {
    let dir = tmp.join("vps");
    let gpu = tmp.join("gpu");
    let out = gen_secrets(&["--gpu-dir", gpu.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(out.status.success(), "gen-secrets.sh failed:\n{}", say(&out));
    dir
}

/// `<tmp>/vps` laid out as the VPS's /etc/consul.d: server.hcl as consul.hcl
/// next to the generated files.
fn vps_dir(secrets: &Path) -> PathBuf {
    std::fs::copy(consul_dir().join("server.hcl"), secrets.join("consul.hcl")).unwrap();
    secrets.to_path_buf()
}

/// `<tmp>/gpu` laid out as a GPU node's /etc/consul.d: client-gpu.hcl as
/// consul.hcl, the gpu-node bundle, and what gpu-up.sh writes (join.hcl,
/// acl-tokens.hcl) with throwaway values.
fn gpu_node_dir(secrets: &Path, tmp: &Path) -> PathBuf {
    let gpu = tmp.join("gpu");
    copy_dir(&secrets.join("gpu-node"), &gpu);
    std::fs::copy(consul_dir().join("client-gpu.hcl"), gpu.join("consul.hcl")).unwrap();
    std::fs::write(gpu.join("join.hcl"), "retry_join = [\"192.0.2.10\"]\n").unwrap();
    std::fs::write(
        gpu.join("acl-tokens.hcl"),
        format!("acl {{\n  tokens {{\n    agent = \"{}\"\n  }}\n}}\n", uuid::Uuid::new_v4()),
    )
    .unwrap();
    gpu
}

#[test]
fn consul_validate_accepts_server_client_and_services() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = make_secrets(tmp.path());

    // Server: the committed file with the generated ones, as files...
    assert_valid("server.hcl", &[secrets.join("gossip.hcl"), consul_dir().join("server.hcl"), secrets.join("tls.hcl")]);
    // ...and as the VPS's config dir (sub-dirs tls/ and gpu-node/ are skipped).
    let vps = vps_dir(&secrets);
    assert_valid("the VPS's /etc/consul.d", std::slice::from_ref(&vps));

    // GPU client: the committed file, the bundle and gpu-up.sh's files.
    let gpu = gpu_node_dir(&secrets, tmp.path());
    assert_valid("the GPU node's /etc/consul.d", std::slice::from_ref(&gpu));
    assert_valid(
        "client-gpu.hcl",
        &[gpu.join("gossip.hcl"), consul_dir().join("client-gpu.hcl"), gpu.join("tls.hcl"), gpu.join("join.hcl")],
    );

    // Every service definition, on the GPU node it is meant for.
    for service in service_files() {
        assert_valid(&format!("{} on the GPU client", service.display()), &[gpu.clone(), service.clone()]);
    }

    // The validator is strict about 1.8: a key newer than 1.8 is rejected,
    // and so is a broken gossip key (so the checks above mean something).
    let newer = tmp.path().join("newer.hcl");
    std::fs::write(&newer, "ui_config {\n  enabled = true\n}\n").unwrap();
    let (ok, out) = validate(&[vps.clone(), newer]);
    assert!(!ok && out.contains("ui_config"), "consul validate accepted a 1.9 key:\n{out}");
    let bad_key = tmp.path().join("bad-key.hcl");
    std::fs::write(&bad_key, "encrypt = \"not-a-key\"\n").unwrap();
    let (ok, out) = validate(&[consul_dir().join("server.hcl"), bad_key]);
    assert!(!ok, "consul validate accepted a broken gossip key:\n{out}");
}

#[test]
fn agent_configs_keep_the_promised_settings() {
    let server = parse_hcl(&consul_dir().join("server.hcl"));
    let client = parse_hcl(&consul_dir().join("client-gpu.hcl"));
    let dc = string_attr(&server, "datacenter").expect("server.hcl sets datacenter");
    assert_eq!(string_attr(&client, "datacenter").as_deref(), Some(dc.as_str()), "one datacenter");
    // gen-secrets.sh's default datacenter is the configs' one.
    let script = std::fs::read_to_string(consul_dir().join("gen-secrets.sh")).unwrap();
    assert!(script.contains(&format!("\nDC={dc}\n")), "gen-secrets.sh's default --dc is not {dc}");

    for (name, body) in [("server.hcl", &server), ("client-gpu.hcl", &client)] {
        assert!(string_attr(body, "encrypt").is_none(), "{name}: the gossip key belongs in gossip.hcl");
        assert_eq!(bool_attr(body, "verify_outgoing"), Some(true), "{name}: verify_outgoing");
        assert_eq!(bool_attr(body, "verify_server_hostname"), Some(true), "{name}: verify_server_hostname");
        assert!(string_attr(body, "ca_file").is_some_and(|p| p.starts_with("/etc/consul.d/tls/")), "{name}: ca_file");
        let acl = block(body, "acl").unwrap_or_else(|| panic!("{name}: acl block")).body();
        assert_eq!(bool_attr(acl, "enabled"), Some(true), "{name}: acl.enabled");
        assert_eq!(string_attr(acl, "default_policy").as_deref(), Some("deny"), "{name}: acl.default_policy");
        assert_eq!(bool_attr(acl, "enable_token_persistence"), Some(true), "{name}: enable_token_persistence");
        assert!(block(acl, "tokens").is_none(), "{name}: tokens belong in a generated file, not in git");
        for addr in ["bind_addr", "advertise_addr"] {
            if let Some(value) = string_attr(body, addr) {
                assert!(value.contains("{{"), "{name}: {addr} should be a go-sockaddr template, not {value}");
            }
        }
    }
    assert_eq!(bool_attr(&server, "server"), Some(true));
    assert_eq!(bool_attr(&server, "verify_incoming"), Some(true));
    let auto = block(&server, "auto_encrypt").expect("server auto_encrypt").body();
    assert_eq!(bool_attr(auto, "allow_tls"), Some(true));
    for key in ["cert_file", "key_file"] {
        assert!(string_attr(&server, key).is_some_and(|p| p.starts_with("/etc/consul.d/tls/")), "server {key}");
        assert!(
            string_attr(&client, key).is_none(),
            "client-gpu.hcl: {key} (auto_encrypt gives the client its certificate)"
        );
    }
    let auto = block(&client, "auto_encrypt").expect("client auto_encrypt").body();
    assert_eq!(bool_attr(auto, "tls"), Some(true));
    assert!(
        client.attributes().all(|a| a.key() != "retry_join"),
        "client-gpu.hcl: the VPS address comes from the generated join.hcl"
    );
}

// ---------------------------------------------------------------------------
// ACL policies and secrets
// ---------------------------------------------------------------------------

/// Rule blocks of Consul 1.8 (OSS) ACL policies, each with one label.
const RULE_BLOCKS_1_8: &[&str] = &[
    "agent",
    "agent_prefix",
    "event",
    "event_prefix",
    "key",
    "key_prefix",
    "node",
    "node_prefix",
    "query",
    "query_prefix",
    "service",
    "service_prefix",
    "session",
    "session_prefix",
];
/// Top-level rule attributes of Consul 1.8 (`mesh`, `peering`, `partition`
/// are newer).
const RULE_ATTRS_1_8: &[&str] = &["acl", "keyring", "operator"];

#[test]
fn acl_policies_use_only_consul_1_8_rules() {
    let policies: Vec<PathBuf> = files_under(&consul_dir().join("acl"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "hcl"))
        .collect();
    let names: Vec<String> = policies.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    for wanted in ["nomad-server", "nomad-client", "gateway", "dispatcher", "gpu-task"] {
        assert!(names.iter().any(|n| n == wanted), "consul/acl/{wanted}.hcl is missing (have {names:?})");
    }
    let level = |e: &hcl::Expression| match e {
        hcl::Expression::String(s) => s.clone(),
        other => panic!("policy value {other:?} is not a string"),
    };
    for path in &policies {
        let body = parse_hcl(path);
        let name = path.display();
        assert!(body.iter().next().is_some(), "{name} is empty");
        for attr in body.attributes() {
            assert!(RULE_ATTRS_1_8.contains(&attr.key()), "{name}: `{}` is not a Consul 1.8 rule", attr.key());
            let v = level(attr.expr());
            assert!(["read", "write", "deny"].contains(&v.as_str()), "{name}: {} = {v}", attr.key());
        }
        for block in body.blocks() {
            let ident = block.identifier();
            assert!(RULE_BLOCKS_1_8.contains(&ident), "{name}: `{ident}` is not a Consul 1.8 rule");
            assert_eq!(block.labels().len(), 1, "{name}: `{ident}` takes exactly one name");
            assert!(block.body().blocks().next().is_none(), "{name}: `{ident}` has nested blocks");
            let mut has_policy = false;
            for attr in block.body().attributes() {
                let v = level(attr.expr());
                match attr.key() {
                    "policy" => {
                        has_policy = true;
                        let mut allowed = vec!["read", "write", "deny"];
                        if ident.starts_with("key") {
                            allowed.push("list");
                        }
                        assert!(allowed.contains(&v.as_str()), "{name}: {ident} policy = {v}");
                    }
                    "intentions" if ident.starts_with("service") => {
                        assert!(["read", "write", "deny"].contains(&v.as_str()), "{name}: intentions = {v}");
                    }
                    other => panic!("{name}: `{ident}` has `{other}`, unknown to Consul 1.8"),
                }
            }
            assert!(has_policy, "{name}: `{ident}` has no policy");
        }
    }

    // gpu-task's lookups need exactly these reads.
    let gpu_task = parse_hcl(&consul_dir().join("acl/gpu-task.hcl"));
    let grants = |body: &hcl::Body, ident: &str, label: &str| -> Option<String> {
        body.blocks()
            .find(|b| b.identifier() == ident && b.labels().first().is_some_and(|l| l.as_str() == label))
            .and_then(|b| string_attr(b.body(), "policy"))
    };
    assert_eq!(grants(&gpu_task, "service", "comfyui").as_deref(), Some("read"));
    assert_eq!(grants(&gpu_task, "service", "comfy-gateway").as_deref(), Some("read"));
    assert_eq!(grants(&gpu_task, "node_prefix", "").as_deref(), Some("read"));
}

/// A UUID anywhere in `text` (`8-4-4-4-12` hex digits).
fn find_uuid(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let shape = [8, 4, 4, 4, 12];
    'start: for i in 0..bytes.len() {
        if i > 0 && bytes[i - 1].is_ascii_hexdigit() {
            continue;
        }
        let mut j = i;
        for (n, len) in shape.iter().enumerate() {
            for _ in 0..*len {
                if j >= bytes.len() || !bytes[j].is_ascii_hexdigit() {
                    continue 'start;
                }
                j += 1;
            }
            if n < shape.len() - 1 {
                if j >= bytes.len() || bytes[j] != b'-' {
                    continue 'start;
                }
                j += 1;
            }
        }
        if j < bytes.len() && bytes[j].is_ascii_hexdigit() {
            continue;
        }
        return Some(&text[i..j]);
    }
    None
}

/// A base64 literal that decodes to 16, 24 or 32 bytes (a gossip key)
/// anywhere in `text`.
fn find_gossip_key(text: &str) -> Option<&str> {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    text.split(|c: char| !is_b64(c)).find(|run| {
        [24, 32, 44].contains(&run.len())
            && run.chars().any(|c| c.is_ascii_uppercase())
            && run.chars().any(|c| c.is_ascii_lowercase())
            && run.chars().any(|c| c.is_ascii_digit())
            && base64::engine::general_purpose::STANDARD.decode(run).is_ok_and(|raw| [16, 24, 32].contains(&raw.len()))
    })
}

#[test]
fn no_secret_material_in_consul_folder() {
    // The detectors work.
    assert!(find_gossip_key("encrypt = \"pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=\"").is_some());
    assert!(find_uuid("agent = \"b698d432-050d-1f6a-d096-4cbdb2891d9b\"").is_some());
    assert!(find_gossip_key("/etc/consul.d/tls/consul-agent-ca.pem").is_none());

    let files = files_under(&consul_dir());
    assert!(files.len() > 5, "consul/ looks empty: {files:?}");
    for path in files {
        let name = path.strip_prefix(repo()).unwrap_or(&path).display().to_string();
        let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        assert!(!["pem", "key", "crt"].contains(&ext.as_str()), "{name}: certificates and keys never live in git");
        let Ok(text) = std::fs::read_to_string(&path) else {
            panic!("{name} is not text");
        };
        assert!(!text.contains("-----BEGIN"), "{name} holds PEM material");
        assert!(
            find_gossip_key(&text).is_none(),
            "{name} holds what looks like a gossip key: {:?}",
            find_gossip_key(&text)
        );
        assert!(find_uuid(&text).is_none(), "{name} holds what looks like a token: {:?}", find_uuid(&text));
    }

    // Should a copy of the generated files land in the work tree, git ignores it.
    if in_git_work_tree() {
        for p in [
            "consul/tls/server-key.pem",
            "consul/tls/consul-agent-ca-key.pem",
            "consul/gossip.hcl",
            "consul/acl-tokens.hcl",
        ] {
            let ignored = std::process::Command::new("git")
                .arg("-C")
                .arg(repo())
                .args(["check-ignore", "--no-index", "-q", p])
                .status()
                .expect("run git check-ignore");
            assert!(ignored.success(), "{p} is not ignored by .gitignore");
        }
    }
}

/// Whether the repository is a git work tree (and git is installed).
fn in_git_work_tree() -> bool {
    std::process::Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["rev-parse", "--is-inside-work-tree"])
        .output()
        .is_ok_and(|o| o.status.success())
}

// ---------------------------------------------------------------------------
// A real datacenter on loopback
// ---------------------------------------------------------------------------

/// The `consul` CLI against `addr` with `token`: stdout, or a panic with the
/// output.
fn cli(addr: &str, token: &str, args: &[&str]) -> String {
    let out = cli_output(addr, token, args);
    assert!(out.status.success(), "consul {}:\n{}", args.join(" "), say(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cli_output(addr: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = consul_cmd();
    cmd.args(args).env("CONSUL_HTTP_ADDR", addr);
    if !token.is_empty() {
        cmd.env("CONSUL_HTTP_TOKEN", token);
    }
    cmd.output().expect("run consul")
}

fn json_field(json: &str, field: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v[field].as_str().unwrap_or_else(|| panic!("no {field} in {json}")).to_string()
}

/// A token holding the policy `policy` (already created).
fn token_for(addr: &str, mgmt: &str, policy: &str) -> String {
    let out =
        cli(addr, mgmt, &["acl", "token", "create", "-description", policy, "-policy-name", policy, "-format=json"]);
    json_field(&out, "SecretID")
}

fn start_agent(name: &str, files: &[PathBuf]) -> ChildGuard {
    let mut cmd = tokio::process::Command::new(tool_path("consul"));
    cmd.arg("agent");
    for f in files {
        cmd.arg(format!("-config-file={}", f.display()));
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CONSUL_") {
            cmd.env_remove(key);
        }
    }
    spawn_logged(cmd, name)
}

#[tokio::test]
async fn server_and_gpu_client_form_a_secure_datacenter() {
    let tmp = tempfile::tempdir().unwrap();
    let secrets = make_secrets(tmp.path());
    let gpu = gpu_node_dir(&secrets, tmp.path());
    std::fs::remove_file(gpu.join("acl-tokens.hcl")).unwrap(); // written below with a real token
    std::fs::remove_file(gpu.join("join.hcl")).unwrap();

    // Server: the committed config + generated files + a loopback override.
    let (s_http, s_https, s_lan, s_wan, s_rpc) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let server_over = tmp.path().join("server-test.hcl");
    std::fs::write(
        &server_over,
        format!(
            "node_name = \"vps-test\"\ndata_dir = \"{}\"\nbind_addr = \"127.0.0.1\"\nadvertise_addr = \"127.0.0.1\"\n\
             disable_update_check = true\n\
             ports {{\n  http = {s_http}\n  https = {s_https}\n  dns = -1\n  grpc = -1\n  serf_lan = {s_lan}\n  serf_wan = {s_wan}\n  server = {s_rpc}\n}}\n",
            tmp.path().join("server-data").display()
        ),
    )
    .unwrap();
    let server_files =
        vec![secrets.join("gossip.hcl"), consul_dir().join("server.hcl"), secrets.join("tls.hcl"), server_over];
    assert_valid("the server test set", &server_files);
    let server = start_agent("consul-server", &server_files);
    let s_addr = format!("127.0.0.1:{s_http}");
    let http = reqwest::Client::new();
    let leader = wait_until("the server to elect itself", Duration::from_secs(30), || {
        let url = format!("http://{s_addr}/v1/status/leader");
        let http = http.clone();
        async move {
            let body = http.get(url).send().await.ok()?.text().await.ok()?;
            serde_json::from_str::<String>(&body).ok().filter(|l| !l.is_empty())
        }
    })
    .await;
    leader.unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail(40)));

    // Bootstrap ACLs the README's way; every policy file is accepted by 1.8.7.
    let boot = wait_until("consul acl bootstrap", Duration::from_secs(20), || async {
        let out = cli_output(&s_addr, "", &["acl", "bootstrap", "-format=json"]);
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail(40)));
    let mgmt = json_field(&boot, "SecretID");
    // Default deny: without a token nothing is visible.
    let anon = cli_output(&s_addr, "", &["acl", "policy", "list"]);
    assert!(!anon.status.success(), "anonymous could list policies");
    for path in files_under(&consul_dir().join("acl")) {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let rules = format!("@{}", path.display());
        cli(&s_addr, &mgmt, &["acl", "policy", "create", "-name", &name, "-rules", &rules]);
    }
    let server_agent = token_for(&s_addr, &mgmt, "consul-agent");
    cli(&s_addr, &mgmt, &["acl", "set-agent-token", "agent", &server_agent]);

    // GPU client: committed config + bundle + what gpu-up.sh writes.
    std::fs::write(gpu.join("join.hcl"), format!("retry_join = [\"127.0.0.1:{s_lan}\"]\n")).unwrap();
    let client_override = |name: &str, http: u16, lan: u16| {
        let path = tmp.path().join(format!("{name}.hcl"));
        // `ports.server`: auto_encrypt asks the server before gossip could
        // tell its RPC port (8300 on the real hosts).
        std::fs::write(
            &path,
            format!(
                "node_name = \"{name}\"\ndata_dir = \"{}\"\nbind_addr = \"127.0.0.1\"\nretry_interval = \"1s\"\n\
                 disable_update_check = true\n\
                 ports {{\n  http = {http}\n  dns = -1\n  serf_lan = {lan}\n  serf_wan = -1\n  server = {s_rpc}\n}}\n",
                tmp.path().join(format!("{name}-data")).display()
            ),
        )
        .unwrap();
        path
    };

    // Without acl-tokens.hcl the client cannot get its certificate: the
    // agent token must be in place before the first start (client-gpu.hcl).
    let tokenless = start_agent(
        "consul-tokenless-client",
        &[
            gpu.join("gossip.hcl"),
            consul_dir().join("client-gpu.hcl"),
            gpu.join("tls.hcl"),
            gpu.join("join.hcl"),
            client_override("gpu-tokenless", free_port(), free_port()),
        ],
    );
    let refused = wait_until("a tokenless client to be refused its certificate", Duration::from_secs(30), || {
        let log = tokenless.log();
        async move { (log.contains("AutoEncrypt.Sign") && log.contains("Permission denied")).then_some(()) }
    })
    .await;
    refused.unwrap_or_else(|e| panic!("{e}\n{}", tokenless.log_tail(30)));
    drop(tokenless);

    let client_agent = token_for(&s_addr, &mgmt, "consul-agent");
    std::fs::write(
        gpu.join("acl-tokens.hcl"),
        format!("acl {{\n  tokens {{\n    agent = \"{client_agent}\"\n  }}\n}}\n"),
    )
    .unwrap();
    let c_http = free_port();
    let client_over = client_override("gpu-test", c_http, free_port());
    let client_files = vec![
        gpu.join("gossip.hcl"),
        consul_dir().join("client-gpu.hcl"),
        gpu.join("tls.hcl"),
        gpu.join("join.hcl"),
        gpu.join("acl-tokens.hcl"),
        client_over,
    ];
    assert_valid("the GPU client test set", &client_files);
    let client = start_agent("consul-gpu-client", &client_files);
    let c_addr = format!("127.0.0.1:{c_http}");

    // The client holds only the CA certificate; the server verifies incoming
    // TLS. Catalog reads through the client (RPC to the server) therefore
    // prove that auto_encrypt gave it a certificate.
    let joined = wait_until("the GPU client to join and sync", Duration::from_secs(30), || async {
        let out = cli_output(&c_addr, &mgmt, &["catalog", "nodes"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains("gpu-test") && text.contains("vps-test")).then_some(())
    })
    .await;
    joined.unwrap_or_else(|e| panic!("{e}\nclient:\n{}\nserver:\n{}", client.log_tail(30), server.log_tail(30)));
    let members = cli(&c_addr, &mgmt, &["members"]);
    assert!(members.contains("gpu-test") && members.contains("alive"), "{members}");

    // A ComfyUI stand-in for the fallback service's check.
    let comfy_port = free_port();
    let app = axum::Router::new().route(
        "/system_stats",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"system": {"os": "posix"}, "devices": []})) }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", comfy_port)).await.unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    // The fallback service file, instantiated the way its comment says.
    let gpu_uuid = format!("GPU-{}", uuid::Uuid::new_v4());
    let service_src = std::fs::read_to_string(consul_dir().join("services/comfyui.hcl")).unwrap();
    assert!(service_src.contains("GPU-UUID-OF-THIS-GPU") && service_src.contains("8188"));
    let service = tmp.path().join("comfyui-service.hcl");
    std::fs::write(
        &service,
        service_src.replace("GPU-UUID-OF-THIS-GPU", &gpu_uuid).replace("8188", &comfy_port.to_string()),
    )
    .unwrap();
    let service_arg = service.to_str().unwrap();

    let gpu_task = token_for(&s_addr, &mgmt, "gpu-task");
    let comfyui = token_for(&s_addr, &mgmt, "comfyui");
    let denied = cli_output(&c_addr, &gpu_task, &["services", "register", service_arg]);
    assert!(!denied.status.success(), "the gpu-task token could register comfyui:\n{}", say(&denied));
    cli(&c_addr, &comfyui, &["services", "register", service_arg]);

    // gpu-task, with its token, finds the passing instance by GPU UUID.
    let consul = ConsulClient::new(&format!("http://{c_addr}"), Some(gpu_task.clone()));
    let found = wait_until("comfyui to pass /system_stats", Duration::from_secs(40), || async {
        consul.healthy("comfyui", None).await.ok().filter(|list| !list.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", client.log_tail(30)));
    assert_eq!(found.len(), 1);
    assert!(found[0].has_tag_containing(&gpu_uuid), "{:?}", found[0]);
    assert_eq!(found[0].port, comfy_port);
    assert_eq!(found[0].node, "gpu-test");
    // Without a token the same query sees nothing (default deny).
    let anonymous = ConsulClient::new(&format!("http://{c_addr}"), None);
    assert!(anonymous.healthy("comfyui", None).await.unwrap().is_empty());
    // The gateway and dispatcher tokens read it too.
    for policy in ["gateway", "dispatcher"] {
        let token = token_for(&s_addr, &mgmt, policy);
        let c = ConsulClient::new(&format!("http://{c_addr}"), Some(token));
        assert_eq!(c.healthy("comfyui", None).await.unwrap().len(), 1, "{policy} cannot see comfyui");
    }

    // Nomad's tokens write exactly their services.
    let register = |token: &str, name: &str| {
        cli_output(&c_addr, token, &["services", "register", "-name", name, "-id", &format!("{name}-t"), "-port", "1"])
            .status
            .success()
    };
    let nomad_gpu = token_for(&s_addr, &mgmt, "nomad-client");
    assert!(register(&nomad_gpu, "comfyui"), "nomad-client cannot register comfyui");
    assert!(register(&nomad_gpu, "nomad-client"));
    assert!(!register(&nomad_gpu, "comfy-gateway"), "a GPU node's Nomad could announce a gateway");
    let nomad_control = token_for(&s_addr, &mgmt, "nomad-control-client");
    for name in ["comfy-gateway", "redis", "nomad-client"] {
        assert!(register(&nomad_control, name), "nomad-control-client cannot register {name}");
    }
    assert!(!register(&nomad_control, "comfyui"), "the control client could announce a ComfyUI");
    let nomad_server = token_for(&s_addr, &mgmt, "nomad-server");
    assert!(register(&nomad_server, "nomad"));
    assert!(!register(&gpu_task, "comfy-gateway"));

    // gpu-task finds the gateway once Nomad registered it (here without a
    // check, so it is passing).
    let gw = consul.healthy("comfy-gateway", None).await.unwrap();
    assert_eq!(gw.len(), 1, "{gw:?}");

    drop(client);
    drop(server);
}
