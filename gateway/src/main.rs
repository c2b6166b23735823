//! `gateway`: serves participants and gpu-task.
//!
//! `gateway serve` (the default) listens on `gateway.listen`, generates what
//! is missing on first start (access codes, admin token, internal secret) and
//! serves until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dispatcher::config::Config;
use dispatcher::queue::Store;
use gateway::auth::Auth;
use gateway::files::Files;
use gateway::state::{AppState, Limits};

#[derive(Parser)]
#[command(name = "gateway", version, about = "comfy-multi gateway: participants' ComfyUI API and the internal API")]
struct Cli {
    /// HCL config file (default: $COMFY_MULTI_CONFIG, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
}

#[tokio::main]
async fn main() -> ExitCode {
    dispatcher::init_tracing();
    let cli = Cli::parse();
    match serve(cli.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let admin_token = gateway::secrets::load_or_create(&data_dir, "admin-token", config.gateway.admin_token.as_deref())
        .context("cannot read or create the admin token")?;
    let internal_secret =
        gateway::secrets::load_or_create(&data_dir, "internal-secret", config.gateway.internal_secret.as_deref())
            .context("cannot read or create the internal secret")?;
    let store = Store::connect(&config.redis_url)
        .await
        .with_context(|| format!("cannot connect to Redis at {}", config.redis_url))?
        .with_limits(config.queue.limits());
    store.init_mode(config.queue.mode).await?;
    let auth_conn = redis::aio::ConnectionManager::new(store.client().clone()).await?;
    let auth = Auth::new(auth_conn, admin_token, config.gateway.participants);
    let created = auth.ensure_codes(&data_dir).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if !created.is_empty() {
        println!(
            "generated {} access codes; the instructor's copy is {}",
            created.len(),
            gateway::secrets::dir(&data_dir).join("access-codes.txt").display()
        );
    }
    let state = AppState {
        store,
        auth,
        files: Files::new(data_dir),
        limits: Limits {
            max_workflow_bytes: config.gateway.max_workflow_bytes,
            max_output_bytes: config.gateway.max_output_bytes,
        },
        internal_secret: Arc::from(internal_secret),
    };
    let listener = std::net::TcpListener::bind(&config.gateway.listen)
        .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = gateway::app(state);
    match (&config.gateway.tls_cert, &config.gateway.tls_key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key).await.with_context(|| {
                format!("cannot load the TLS certificate {} and key {}", cert.display(), key.display())
            })?;
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                dispatcher::shutdown_signal().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            println!("listening on https://{addr}");
            tracing::info!(%addr, "gateway listening (HTTPS)");
            axum_server::from_tcp_rustls(listener, tls)?.handle(handle).serve(app.into_make_service()).await?;
        }
        _ => {
            println!("listening on http://{addr}");
            tracing::info!(%addr, "gateway listening");
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app).with_graceful_shutdown(dispatcher::shutdown_signal()).await?;
        }
    }
    Ok(())
}
