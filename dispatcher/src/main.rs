//! `dispatcher`: runs queued workflows on the GPU, and the instructor's tools
//! around that.
//!
//! - `dispatcher run`: the dispatch loop (local or Nomad executor).
//! - `dispatcher status`: what is queued and in flight.
//! - `dispatcher register-job`: registers `nomad/comfy-workflow.nomad.hcl`
//!   with Nomad (parsed by Nomad itself, with HCL2 variables).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use dispatcher::config::{Config, ExecutorKind};
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
            let store = Store::connect(&config.redis_url).await?;
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
            tracing::info!(
                executor = ?config.dispatcher.executor,
                slots = config.dispatcher.slots,
                "dispatcher running"
            );
            Dispatcher::new(store, executor, config.dispatcher.slots).run(dispatcher::shutdown_signal()).await?;
            tracing::info!("dispatcher stopped; jobs in flight keep running and are followed on restart");
            Ok(())
        }
        Command::Status => {
            let store = Store::connect(&config.redis_url).await?;
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
