//! `reliability`: the reliability suite as a command, for a CI-size run
//! (`--jobs 300 --users 50`) or a soak (`--minutes N`) outside CI. Prints the
//! seed first and a summary last; exits non-zero, naming every violated
//! invariant, when a promise was broken.
//!
//! It starts the workspace's binaries from its own target dir: build them
//! first with the same profile (`cargo build --workspace --bins --release`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use comfy_multi_reliability::{run, Options};
use comfy_multi_tests::stack::Executor;
use tracing_subscriber::EnvFilter;

/// The whole stack under random SIGKILLs, then every job checked.
#[derive(Debug, Parser)]
#[command(name = "reliability", version)]
struct Cli {
    /// Jobs to submit (a soak keeps submitting instead).
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// Participants submitting them.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    users: u32,
    /// Seed of everything random (default: a fresh one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Soak: keep submitting and killing for this many minutes, then check.
    #[arg(long)]
    minutes: Option<u64>,
    /// Which executor the dispatcher uses.
    #[arg(long, value_enum, default_value_t = ExecutorArg::Nomad)]
    executor: ExecutorArg,
    /// The ComfyUI stand-in's delay per node, in milliseconds.
    #[arg(long, default_value_t = 20)]
    node_delay_ms: u64,
    /// Redis's AOF fsync policy: `always` (as deployed: nothing
    /// acknowledged may be lost) or `everysec` (to see what it loses).
    #[arg(long, value_enum, default_value_t = Fsync::Always)]
    appendfsync: Fsync,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Fsync {
    Always,
    Everysec,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ExecutorArg {
    /// The Nomad API stand-in (gpu-task runs like raw_exec).
    Nomad,
    /// Local child processes of the dispatcher.
    Local,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(rand::random);
    println!("reliability: seed {seed} (replay with --seed {seed})");
    let mut opts = Options::ci(seed);
    opts.jobs = cli.jobs;
    opts.users = cli.users;
    opts.soak = cli.minutes.map(|m| Duration::from_secs(m * 60));
    opts.node_delay = Duration::from_millis(cli.node_delay_ms);
    opts.redis_appendfsync = match cli.appendfsync {
        Fsync::Always => "always",
        Fsync::Everysec => "everysec",
    };
    opts.executor = match cli.executor {
        ExecutorArg::Nomad => Executor::Nomad,
        ExecutorArg::Local => Executor::Local,
    };
    match run(opts).await {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("reliability: the run could not be completed: {e:#}");
            ExitCode::from(2)
        }
    }
}
