//! Test equipment: the Nomad stand-in as a program, for the local stack and for
//! tests that need it in another process. Never shipped.
//!
//! Prints `listening on http://ADDR` as its first stdout line (logs go to
//! stderr), then serves until SIGINT or SIGTERM, and kills its tasks on exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use comfy_multi_tests::nomad::jobspec::go_duration_ns;
use comfy_multi_tests::nomad::{NomadStandin, StandinOptions, StandinSettings};

/// Stands in for Nomad's HTTP API (one node with fake GPUs) and runs
/// dispatched jobs as local processes, like raw_exec.
#[derive(Debug, Parser)]
#[command(name = "nomad-standin", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Number of fake NVIDIA GPUs on the node.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// Where allocation dirs are made (default: a new dir under the system temp dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Event stream heartbeat period, as a Go duration.
    #[arg(long, default_value = "30s")]
    heartbeat: String,
    /// Node name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let heartbeat = go_duration_ns(&args.heartbeat)
        .filter(|n| *n > 0)
        .map(|n| Duration::from_nanos(n as u64))
        .with_context(|| {
            format!(
                "--heartbeat {:?} is not a positive duration like 30s",
                args.heartbeat
            )
        })?;
    let data_dir = args.data_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("nomad-standin-{}", std::process::id()))
    });
    let settings = StandinSettings {
        listen: args.listen,
        heartbeat,
        node_name: args.node_name,
    };
    let standin = NomadStandin::start_with(
        StandinOptions {
            gpus: args.gpus,
            data_dir,
        },
        settings,
    )
    .await?;
    println!("listening on {}", standin.url);
    use std::io::Write as _;
    std::io::stdout().flush().ok();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("stopping");
    standin.shutdown();
    Ok(())
}
