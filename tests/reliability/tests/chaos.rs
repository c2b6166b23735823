//! The CI-size reliability run: 300 jobs from 50 participants while
//! gpu-tasks, the dispatcher, the gateway and Redis are SIGKILLed at random;
//! every job must end exactly once, nothing lost, no duplicate outputs.
//! `RELIABILITY_SEED` replays a run.

use comfy_multi_reliability::{run, Options, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_jobs_survive_random_kills() {
    let seed = std::env::var("RELIABILITY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("reliability: seed {seed} (replay with RELIABILITY_SEED={seed})");
    let report = run(Options::ci(seed)).await.unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.submitted, 300, "{report}");
    // The run really was chaotic: every kind of kill happened.
    for target in [Target::GpuTask, Target::GpuTaskEveryRun, Target::Dispatcher, Target::Gateway, Target::Redis] {
        assert!(report.kills.done.get(&target).copied().unwrap_or(0) > 0, "no {target} kill: {report}");
    }
    // Some jobs used up their attempts and failed, with the reason.
    assert!(report.by_state.get("failed").copied().unwrap_or(0) > 0, "{report}");
    assert!(report.wall.as_secs() < 240, "the CI run must stay well under 5 minutes: {report}");
}
