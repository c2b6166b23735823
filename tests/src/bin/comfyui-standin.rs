//! `comfyui-standin`: the ComfyUI stand-in as a process (test equipment,
//! never shipped), for tests and local stacks that start ComfyUI as a child.
//!
//! The first line on stdout is `listening on http://ADDR`, so a parent that
//! asked for port 0 can read the port. Logs go to stderr (`RUST_LOG`).
//! Stops on SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use comfy_multi_tests::comfyui::{ComfyUi, Options};
use tracing_subscriber::EnvFilter;

/// A stand-in for ComfyUI 0.3.64's server that computes a few model-free nodes.
#[derive(Debug, Parser)]
#[command(name = "comfyui-standin", version)]
struct Cli {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8188")]
    listen: SocketAddr,
    /// ComfyUI's output directory (created if missing).
    #[arg(long)]
    output_dir: PathBuf,
    /// ComfyUI's input directory (created if missing).
    #[arg(long)]
    input_dir: PathBuf,
    /// Artificial delay per executed node, in milliseconds.
    #[arg(long, default_value_t = 0)]
    node_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let opts = Options {
        output_dir: cli.output_dir,
        input_dir: cli.input_dir,
        node_delay: Duration::from_millis(cli.node_delay_ms),
    };
    // Signal handlers first: a parent may send SIGTERM as soon as it reads the address.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let comfy = ComfyUi::bind(cli.listen, opts).await.context("starting the ComfyUI stand-in")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", comfy.url).context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    comfy.stop(Duration::from_secs(5)).await;
    Ok(())
}
