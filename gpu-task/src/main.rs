//! gpu-task: runs one comfy-multi job on the warm ComfyUI of its GPU node.
//!
//! Nomad starts it as the only task of each dispatched `comfy-workflow` job
//! (the local executor starts it the same way, as a child process). It finds
//! the ComfyUI serving the GPU Nomad leased to it, queues the workflow there,
//! relays ComfyUI's progress messages to the gateway, uploads the saved
//! outputs, reports the verdict, and exits. Holding the GPU lease for exactly
//! as long as the prompt runs is what makes Nomad the admission authority.
//!
//! # Environment
//!
//! gpu-task takes no arguments; everything comes from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `NOMAD_META_job_id` (or `NOMAD_META_JOB_ID`) | **required**: the comfy-multi job id |
//! | `NOMAD_META_user_id` (or `NOMAD_META_USER_ID`) | **required**: the participant (for logs) |
//! | `NOMAD_TASK_DIR` | the task's `local/` dir; the workflow is read from `workflow.json` there. Without the file (a payload too large for Nomad) it is fetched from the gateway |
//! | `COMFYUI_URL` | ComfyUI's address (`http://127.0.0.1:8188`); when unset, found in Consul |
//! | `NVIDIA_VISIBLE_DEVICES` | the leased GPU's UUID (`GPU-…`); the `comfyui` Consul instance tagged with it is preferred |
//! | `GATEWAY_URL` | the gateway's address; when unset, found in Consul |
//! | `GATEWAY_CA_CERT` | a PEM file of CA certificates trusted for the gateway's HTTPS besides the public roots (a private CA); unset by default |
//! | `CONSUL_HTTP_ADDR` | Consul's address (default `http://127.0.0.1:8500`) for the `comfyui` and `comfy-gateway` services (passing instances only) |
//! | `CONSUL_HTTP_TOKEN` | Consul ACL token (needs `service:read`) |
//! | `INTERNAL_SECRET` | the secret shared with the gateway, sent on every internal API call |
//! | `RUST_LOG` | log filter (default `info`); logs go to stderr |
//! | `LOG_FORMAT` | `json` for one JSON object per line; every line of the run carries `job_id` and `user_id` |
//!
//! # Exit
//!
//! - `0`: the prompt succeeded, every output was uploaded, the gateway knows.
//! - `1`: the job failed and the gateway was told why.
//! - `2`: the environment is unusable, or the gateway could not be told.
//! - `3`: this run could not do the job (ComfyUI not found, unreachable or
//!   silent) and the gateway was told why; the dispatcher runs it again (up
//!   to `max_attempts`) or fails it with that reason.
//! - `143` / `130`: stopped by SIGTERM / SIGINT (its prompt interrupted in
//!   ComfyUI, the gateway told best-effort).
//!
//! On any failure the last line on stderr is the one-line reason.

mod comfy;
mod discover;
mod env;
mod gateway;
mod history;
mod relay;
mod retry;
mod run;
mod socket;
mod stop;

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

/// Runs one comfy-multi job on the warm ComfyUI of this GPU node. Driven
/// entirely by the environment a `comfy-workflow` dispatch provides
/// (NOMAD_META_job_id, NOMAD_META_user_id, NOMAD_TASK_DIR, COMFYUI_URL,
/// GATEWAY_URL, CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, INTERNAL_SECRET,
/// NVIDIA_VISIBLE_DEVICES).
#[derive(Parser)]
#[command(version, about)]
struct Args {}

fn main() -> ExitCode {
    let _args = Args::parse();
    dispatcher::init_tracing();

    let outcome = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(async {
            let stop = stop::Stop::install().map_err(|e| run::Exit {
                code: run::EXIT_UNREPORTED,
                line: format!("cannot install signal handlers: {e}"),
            })?;
            let env = env::TaskEnv::from_env()
                .map_err(|e| run::Exit { code: run::EXIT_UNREPORTED, line: e.to_string() })?;
            let span = dispatcher::job_span!(env.job_id, env.user_id);
            tracing::Instrument::instrument(run::run(env, stop), span).await
        }),
        Err(e) => Err(run::Exit {
            code: run::EXIT_UNREPORTED,
            line: format!("cannot start the async runtime: {e}"),
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => {
            // stderr may be gone (a killed dispatcher's pipe): not a reason to panic.
            let _ = writeln!(std::io::stderr(), "{}", exit.line);
            ExitCode::from(exit.code)
        }
    }
}
