//! `dispatcher`: runs queued workflows on the GPU, and the instructor's tools
//! around that.
//!
//! - `dispatcher run`: the dispatch loop (local or Nomad executor).
//! - `dispatcher status`: what is queued and in flight.
//! - `dispatcher drain`: empty the GPU before teardown; `dispatcher resume`
//!   carries on.
//! - `dispatcher report`: the post-workshop report (JSON or CSV; see
//!   `dispatcher::report`).
//! - `dispatcher register-job`: registers `nomad/comfy-workflow.nomad.hcl`
//!   with Nomad (parsed by Nomad itself, with HCL2 variables).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use dispatcher::config::{Config, ExecutorKind};
use dispatcher::drain::{DrainReport, Drainer};
use dispatcher::executor::{local::LocalExecutor, nomad::NomadExecutor, Executor};
use dispatcher::nomad::NomadClient;
use dispatcher::queue::Store;
use dispatcher::run::Dispatcher;

#[derive(Parser)]
#[command(name = "dispatcher", version, about = "Runs comfy-multi's queued workflows on the GPU")]
struct Cli {
    /// HCL config file (default: $COMFY_MULTI_CONFIG, else built-in defaults).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the dispatch loop until SIGINT/SIGTERM.
    Run,
    /// Print the queue length and the jobs in flight.
    Status,
    /// Empty the GPU before teardown: stop dispatching, wait for the jobs in
    /// flight (until --deadline), requeue what is left, drain the GPU node(s).
    Drain {
        /// How long running jobs may take to finish (e.g. 90s, 10m).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        deadline: Duration,
    },
    /// Continue dispatching after a drain (and make the GPU nodes eligible).
    Resume,
    /// The post-workshop report: totals, jobs per participant, waits and run
    /// times, peak participants, failures by reason, GPU busy fraction.
    Report {
        /// JSON (every figure) or CSV (a row per participant).
        #[arg(long, value_enum, default_value = "json")]
        format: dispatcher::report::Format,
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Register the parameterized workflow job with Nomad.
    RegisterJob {
        /// The job spec.
        #[arg(default_value = "nomad/comfy-workflow.nomad.hcl")]
        file: PathBuf,
        /// An HCL2 variable, `name=value` (repeatable).
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    dispatcher::init_tracing();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => {
            let store = Store::connect(&config.redis_url).await?.with_limits(config.queue.limits());
            store.init_mode(config.queue.mode).await?;
            store.keep_alive(dispatcher::queue::KEEP_ALIVE_EVERY);
            let executor: Arc<dyn Executor> = match config.dispatcher.executor {
                ExecutorKind::Local => {
                    let work_dir = config
                        .dispatcher
                        .work_dir
                        .clone()
                        .unwrap_or_else(|| config.data_dir.join("local-executor"));
                    Arc::new(LocalExecutor::new(
                        config.dispatcher.gpu_task_bin.clone(),
                        work_dir,
                        config.dispatcher.slots,
                    ))
                }
                ExecutorKind::Nomad => {
                    let client = NomadClient::new(&config.nomad.addr, config.nomad.token.clone())?;
                    Arc::new(NomadExecutor::new(client, config.nomad.job.clone()))
                }
            };
            if let Some(addr) = &config.dispatcher.metrics_addr {
                metrics_listener(addr).await?;
            }
            tracing::info!(
                executor = ?config.dispatcher.executor,
                slots = config.dispatcher.slots,
                "dispatcher running"
            );
            Dispatcher::new(store, executor, config.dispatcher.slots)
                .with_max_attempts(config.dispatcher.max_attempts)
                .with_reconcile_every(Duration::from_secs(config.dispatcher.reconcile_seconds))
                .run(dispatcher::shutdown_signal())
                .await?;
            tracing::info!("dispatcher stopped; jobs in flight keep running and are followed on restart");
            Ok(())
        }
        Command::Status => {
            let store = Store::connect(&config.redis_url).await?;
            match store.paused().await? {
                Some(why) => println!("dispatching: paused ({why}); `dispatcher resume` continues"),
                None => println!("dispatching: on"),
            }
            println!("queued: {}", store.queued_count().await?);
            let inflight = store.inflight().await?;
            println!("in flight: {}", inflight.len());
            for id in inflight {
                if let Some(job) = store.get(&id).await? {
                    println!(
                        "  {}  user {}  {}  {}",
                        job.id,
                        job.user,
                        job.state,
                        job.executor_ref.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Drain { deadline } => drain(&config, deadline).await,
        Command::Resume => {
            let drainer = drainer(&config).await?;
            let nodes = drainer.resume().await?;
            println!("dispatching resumed");
            if !nodes.is_empty() {
                println!("eligible again: {}", nodes.join(", "));
            }
            Ok(())
        }
        Command::Report { format, output } => {
            let jobs = Store::connect(&config.redis_url).await?.all_jobs().await?;
            let report = dispatcher::report::build(&jobs, config.dispatcher.slots, dispatcher::job::now_ms());
            let text = format.render(&report);
            match output {
                Some(path) => std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::RegisterJob { file, vars } => {
            let hcl = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read job spec {}", file.display()))?;
            let mut variables = BTreeMap::new();
            for var in vars {
                let (k, v) = var
                    .split_once('=')
                    .with_context(|| format!("--var {var:?} is not NAME=VALUE"))?;
                variables.insert(k.to_string(), v.to_string());
            }
            let client = NomadClient::new(&config.nomad.addr, config.nomad.token.clone())?;
            let job = client.parse_job(&hcl, &variables).await?;
            client.register_job(&job).await?;
            println!("registered {} with Nomad at {}", file.display(), config.nomad.addr);
            Ok(())
        }
    }
}

/// Serves Prometheus `/metrics` on `addr` in the background
/// (`dispatcher.metrics_addr`); a bad or taken address stops the start.
async fn metrics_listener(addr: &str) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on DISPATCHER_METRICS_ADDR={addr} for /metrics"))?;
    let local = listener.local_addr()?;
    dispatcher::metrics::install();
    tracing::info!(addr = %local, "serving Prometheus metrics at /metrics");
    tokio::spawn(async move {
        if let Err(e) = dispatcher::metrics::serve(listener, dispatcher::shutdown_signal()).await {
            tracing::warn!("the metrics listener stopped: {e}");
        }
    });
    Ok(())
}

/// How long Nomad gets to move what is left (the warm ComfyUI) off a drained node.
const NODE_DRAIN_DEADLINE: Duration = Duration::from_secs(60);

async fn drainer(config: &Config) -> anyhow::Result<Drainer> {
    let store = Store::connect(&config.redis_url).await?;
    let nomad = match config.dispatcher.executor {
        ExecutorKind::Nomad => Some(NomadClient::new(&config.nomad.addr, config.nomad.token.clone())?),
        ExecutorKind::Local => None,
    };
    Ok(Drainer::new(store, nomad, config.nomad.gpu_node_pool.clone()))
}

/// `dispatcher drain`, with a live progress bar. Ctrl-C while waiting leaves
/// dispatching paused and every job where it was: run it again to finish.
async fn drain(config: &Config, deadline: Duration) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Listen before anything changes, so a Ctrl-C at any point is handled.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let drainer = drainer(config).await?;
    drainer.pause().await?;
    println!("dispatching paused; waiting up to {} for the jobs in flight", humantime::format_duration(deadline));
    let end = Instant::now() + deadline;
    let bar = indicatif::ProgressBar::new(drainer.in_flight().await?.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} finished  {msg}")
            .expect("a valid template"),
    );
    let total = bar.length().unwrap_or(0);
    let wait = drainer.wait(end, |left| {
        bar.set_position(total.saturating_sub(left.len() as u64));
        let secs = end.saturating_duration_since(Instant::now()).as_secs();
        bar.set_message(format!("{} in flight, {secs} s left", left.len()));
    });
    let finished = tokio::select! {
        finished = wait => finished?,
        _ = interrupt.recv() => {
            bar.abandon_with_message("interrupted");
            anyhow::bail!(
                "drain interrupted: dispatching stays paused, jobs in flight keep running; \
                 run `dispatcher drain` again to finish, or `dispatcher resume`"
            );
        }
    };
    bar.finish_and_clear();
    let requeued = drainer.requeue_in_flight().await?;
    let nodes = drainer.drain_nodes(NODE_DRAIN_DEADLINE).await?;
    let report = DrainReport { finished, requeued, still_queued: drainer.queued().await?, nodes };
    println!(
        "drain done: {} finished, {} requeued, {} still queued",
        report.finished.len(),
        report.requeued.len(),
        report.still_queued
    );
    if !report.nodes.is_empty() {
        println!("drained in Nomad: {}", report.nodes.join(", "));
    }
    println!("dispatching stays paused until `dispatcher resume` (or a new GPU node and `dispatcher resume`)");
    Ok(())
}
