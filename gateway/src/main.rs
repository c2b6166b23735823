//! `gateway`: serves participants and gpu-task.
//!
//! `gateway serve` (the default) listens on `gateway.listen`, generates what
//! is missing on first start (access codes, admin token, internal secret) and
//! serves until SIGINT/SIGTERM. With a TLS certificate (`gateway.tls_cert`)
//! it serves HTTPS and reloads the certificate when its files change or on
//! SIGHUP (`gateway::tls`).
//!
//! `gateway users create|list|reset N|disable N|enable N` manages
//! participants' accounts in Redis; running gateways see every change at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dispatcher::config::Config;
use dispatcher::queue::Store;
use gateway::auth::{Accounts, Auth};
use gateway::session::Sessions;
use gateway::files::Files;
use gateway::state::{AppState, Limits};
use gateway::tls::{self, TlsFiles};

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
    /// Participants' accounts: create, list, reset, disable, enable.
    Users {
        #[command(subcommand)]
        action: UsersCommand,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Add participant N+1 and print its access code (once).
    Create,
    /// Every participant: enabled or disabled, has a code, created when.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Give participant N a new access code; the old one and N's sessions stop working at once.
    Reset { user: u32 },
    /// Refuse every request of participant N (403) and end its sessions.
    Disable { user: u32 },
    /// Let participant N in again.
    Enable { user: u32 },
}

/// mimalloc rather than glibc's malloc: a request allocates and frees many
/// small objects (JSON, headers, Redis replies), and glibc's malloc and free
/// were a quarter of the gateway's CPU under load (`scripts/bench.sh` with
/// `BENCH_PERF=1`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    dispatcher::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        None | Some(Command::Serve) => serve(cli.config).await,
        Some(Command::Users { action }) => users(cli.config, action).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    // A certificate that cannot be served stops the start before anything else.
    let tls = match (&config.gateway.tls_cert, &config.gateway.tls_key) {
        (Some(cert), Some(key)) => {
            let files = TlsFiles { cert: cert.clone(), key: key.clone() };
            let loaded = tls::load(&files)?;
            Some((files, loaded))
        }
        _ => None,
    };
    dispatcher::metrics::install();
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
    // Find a connection to a restarted Redis dead with a ping, not a participant's request.
    store.keep_alive(dispatcher::queue::KEEP_ALIVE_EVERY);
    dispatcher::queue::keep_alive(auth_conn.clone(), dispatcher::queue::KEEP_ALIVE_EVERY);
    let accounts = Accounts::new(auth_conn.clone(), config.gateway.participants, &data_dir);
    let participants = accounts.init(true).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(participants, "participants");
    let session_ttl = std::time::Duration::from_secs_f64(config.gateway.session_hours * 3600.0);
    let sessions = Sessions::new(auth_conn, session_ttl, config.gateway.tls_cert.is_some());
    let auth = Auth::new(accounts, sessions, admin_token, config.gateway.admin_password.as_deref());
    let created = auth.accounts().ensure_codes().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    if !created.is_empty() {
        println!(
            "generated {} access codes; the instructor's copy is {}",
            created.len(),
            gateway::secrets::dir(&data_dir).join("access-codes.txt").display()
        );
    }
    let editor = editor(&config)?;
    let state = AppState {
        store,
        auth,
        files: Files::new(data_dir),
        limits: Limits {
            max_workflow_bytes: config.gateway.max_workflow_bytes,
            max_output_bytes: config.gateway.max_output_bytes,
        },
        internal_secret: Arc::from(internal_secret),
        slots: config.dispatcher.slots,
        cluster: admin_cluster(&config)?,
        editor,
        events: Default::default(),
    };
    let listener = std::net::TcpListener::bind(&config.gateway.listen)
        .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = gateway::app(state);
    match tls {
        Some((files, loaded)) => {
            let served = axum_server::tls_rustls::RustlsConfig::from_config(loaded.config.clone());
            tracing::info!(cert = %files.cert.display(), sha256 = %loaded.fingerprint, "serving the TLS certificate");
            tls::watch(files, served.clone(), loaded).context("cannot listen for SIGHUP")?;
            if let Some(redirect) = &config.gateway.redirect_addr {
                redirect_listener(redirect, addr.port()).await?;
            }
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                dispatcher::shutdown_signal().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            println!("listening on https://{addr}");
            tracing::info!(%addr, "gateway listening (HTTPS)");
            axum_server::from_tcp_rustls(listener, served)?.handle(handle).serve(app.into_make_service_with_connect_info::<std::net::SocketAddr>())
                .await?;
        }
        _ => {
            println!("listening on http://{addr}");
            tracing::info!(%addr, "gateway listening");
            let listener = tokio::net::TcpListener::from_std(listener)?;
            axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
                .with_graceful_shutdown(dispatcher::shutdown_signal())
                .await?;
        }
    }
    Ok(())
}

/// Answers plain HTTP on `addr` with a redirect to HTTPS on `https_port`
/// (`gateway.redirect_addr`), in the background.
async fn redirect_listener(addr: &str, https_port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on GATEWAY_REDIRECT_ADDR={addr}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "redirecting plain HTTP to HTTPS");
    tokio::spawn(async move {
        let app = tls::redirect_app(https_port);
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(dispatcher::shutdown_signal()).await {
            tracing::warn!("the HTTP redirect listener stopped: {e}");
        }
    });
    Ok(())
}

/// The editor: the frontend files, participants' userdata with the
/// pre-loaded workflows (the example one is put into a new workflows dir),
/// and what the GPU node's ComfyUI says (`COMFYUI_URL`, else Consul).
fn editor(config: &Config) -> anyhow::Result<gateway::editor::Editor> {
    let workflows_dir = config.workflows_dir();
    match gateway::editor::install_sample_workflows(&workflows_dir) {
        Ok(true) => tracing::info!(dir = %workflows_dir.display(), "created the pre-loaded workflows folder with an example"),
        Ok(false) => {}
        Err(e) => tracing::warn!(dir = %workflows_dir.display(), "cannot create the pre-loaded workflows folder: {e}"),
    }
    match &config.gateway.frontend_dir {
        Some(dir) => tracing::info!(dir = %dir.display(), "serving the ComfyUI editor"),
        None => tracing::warn!(
            "no ComfyUI frontend (COMFYUI_FRONTEND_DIR / gateway.frontend_dir; scripts/install-deps.sh installs it): \
             /user/N/ will say so"
        ),
    }
    let userdata = gateway::userdata::UserData::new(&config.data_dir, workflows_dir);
    let consul = dispatcher::consul::ConsulClient::new(&config.consul.addr, config.consul.token.clone());
    let comfy = gateway::editor_api::ComfyInfo::new(
        config.gateway.comfyui_url.clone(),
        Some(consul),
        config.data_dir.join("cache"),
    );
    Ok(gateway::editor::Editor::new(config.gateway.frontend_dir.clone(), userdata, comfy))
}

/// What the admin page reads of the cluster: Nomad's nodes with the Nomad
/// executor (`nomad.addr`), and whether Consul answers (`consul.addr`).
fn admin_cluster(config: &Config) -> anyhow::Result<gateway::admin::Cluster> {
    use dispatcher::config::ExecutorKind;
    let nomad = match config.dispatcher.executor {
        ExecutorKind::Nomad => Some(
            dispatcher::nomad::NomadClient::new(&config.nomad.addr, config.nomad.token.clone())
                .context("NOMAD_ADDR is needed for the admin page's view of the GPU nodes")?,
        ),
        ExecutorKind::Local => None,
    };
    let consul = dispatcher::consul::ConsulClient::new(&config.consul.addr, config.consul.token.clone());
    Ok(gateway::admin::Cluster::new(config.dispatcher.executor, nomad, Some(consul), config.nomad.gpu_node_pool.clone()))
}

/// `gateway users ...`: account changes straight in Redis.
async fn users(config: Option<PathBuf>, action: UsersCommand) -> anyhow::Result<()> {
    let config = Config::load(config.as_deref())?;
    let client = redis::Client::open(config.redis_url.as_str())
        .with_context(|| format!("invalid REDIS_URL {}", config.redis_url))?;
    let conn = tokio::time::timeout(std::time::Duration::from_secs(10), client.get_connection_manager())
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to Redis at {}", config.redis_url))?
        .with_context(|| format!("cannot connect to Redis at {}", config.redis_url))?;
    let accounts = Accounts::new(conn, config.gateway.participants, &config.data_dir);
    // Only when Redis has no count yet: this CLI's config may differ from the gateway's.
    accounts.init(false).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let fail = |e: gateway::error::ApiError| anyhow::anyhow!("{e}");
    let issued = |issued: gateway::auth::Issued, what: &str| {
        println!("{}:{}", issued.user, issued.code);
        match &issued.handout {
            Ok(path) => eprintln!("{what} participant {}; the code is also appended to {}", issued.user, path.display()),
            Err(e) => eprintln!("{what} participant {}; WARNING: {e}: note the code now", issued.user),
        }
    };
    match action {
        UsersCommand::Create => issued(accounts.create().await.map_err(fail)?, "created"),
        UsersCommand::Reset { user } => issued(accounts.reset(user).await.map_err(fail)?, "new code for"),
        UsersCommand::Disable { user } => {
            let changed = accounts.disable(user).await.map_err(fail)?;
            println!("participant {user} disabled{}", if changed { "; its sessions ended" } else { " (already)" });
        }
        UsersCommand::Enable { user } => {
            let changed = accounts.enable(user).await.map_err(fail)?;
            println!("participant {user} enabled{}", if changed { "" } else { " (already)" });
        }
        UsersCommand::List { json } => {
            let list = accounts.list().await.map_err(fail)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:>5}  {:<8}  {:<4}  created", "user", "status", "code");
                for a in list {
                    let created = a
                        .created
                        .map(|t| humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t)).to_string())
                        .unwrap_or_else(|| "-".into());
                    let status = if a.enabled { "enabled" } else { "disabled" };
                    let code = if a.has_code { "yes" } else { "no" };
                    println!("{:>5}  {status:<8}  {code:<4}  {created}", a.user);
                }
            }
        }
    }
    Ok(())
}
