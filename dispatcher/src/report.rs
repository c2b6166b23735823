//! The post-workshop report: what happened on the GPU, from the job records.
//!
//! # Post-workshop report
//!
//! `dispatcher report [--format json|csv] [--output FILE]` (and the download
//! on the instructor's admin page) summarises every job in Redis: totals by
//! state, jobs per participant, how long workflows waited in the queue and
//! ran (p50/p95/max), how many participants were waiting at once at the
//! busiest moment, why jobs failed, and how busy the GPU was. JSON (the whole
//! [`Report`]) goes to scripts and archives; CSV (one row per participant
//! plus an `all` row) goes to a spreadsheet. Run it before the Redis data is
//! thrown away: the report is computed from the job records, nothing else is
//! kept.
//!
//! [`build`] is a pure function of the job records, the number of slots and
//! the time "now"; every figure is computed as follows (times are stored in
//! milliseconds and reported in seconds, with millisecond precision).
//!
//! - **A job's interval** runs from its submission (`created_at`) to its end
//!   (`finished_at`), both included. A job that has not ended (queued,
//!   dispatched, running) is open until `now`.
//! - **Window**: from the first submission to the end of the last interval,
//!   i.e. the last finish, or `now` while any job is still queued or in flight
//!   (`open` is then `true`). `null` when there are no jobs.
//! - **Totals**: jobs per current state; `submitted` is all of them.
//! - **Queue wait** of a job that has left the queue: `started_at` (gpu-task
//!   confirmed it runs) − `created_at`, or `dispatched_at` − `created_at`
//!   when it never started (e.g. cancelled or failed while being dispatched).
//!   Jobs still queued, and jobs cancelled while queued, have no wait. A job
//!   requeued by a drain keeps its `created_at`, so its wait includes its
//!   earlier attempt.
//! - **Run time** of a job that ran: `finished_at` − `started_at`, for every
//!   ended job with a start (succeeded, failed or cancelled while running).
//!   Jobs running now are not in these figures. Only the last attempt of a
//!   requeued job is known.
//! - **p50 / p95 / max** use the nearest-rank percentile: with the `n` values
//!   sorted ascending, `pN` is the value at rank `ceil(N/100 × n)` (1-based),
//!   so it is always one of the observed values. `count` says how many values
//!   there were and `total_s` what they add up to (a participant's
//!   `run.total_s` is their share of the GPU); the percentiles are `null`
//!   when there are no values.
//! - **Peak concurrent participants**: the largest number of distinct
//!   participants who, at the same millisecond, had at least one job inside
//!   its interval (queued or in flight), found by a sweep over the interval
//!   ends; `peak_at_ms` is the first millisecond it was reached (`null` when
//!   there are no jobs). A participant with several jobs counts once.
//! - **Failures by reason**: failed jobs grouped by their error text
//!   (`unknown error` when there is none), most frequent first, then by text.
//!   Cancelled jobs are not failures.
//! - **GPU busy**: `gpu_busy_s` is the sum of the run times above plus, for
//!   jobs running now, `now − started_at`; `gpu_busy_fraction` is
//!   `gpu_busy_s / (slots × window length)`, capped at 1, `null` when the
//!   window is empty. It is the share of slot time spent running workflows;
//!   the gaps between jobs (dispatch, model loading outside a job) count as
//!   idle.
//! - **Per participant**: the same counts, waits and run times for that
//!   participant's jobs only, plus how many are `queued` and `in_flight` now.
//!
//! The CSV has the columns [`CSV_COLUMNS`]; empty cells are `null`s. The
//! workshop-wide figures that are not per participant (window, peak, failures,
//! GPU busy) are in the JSON only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::job::{Job, JobState};

/// The output formats of the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The whole report, pretty-printed.
    #[default]
    Json,
    /// One row per participant plus an `all` row.
    Csv,
}

impl Format {
    /// The MIME type of a download in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    /// Renders `report` in this format.
    pub fn render(self, report: &Report) -> String {
        match self {
            Format::Json => to_json(report),
            Format::Csv => to_csv(report),
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            _ => Err(format!("unknown report format {s:?}; expected json or csv")),
        }
    }
}

/// The post-workshop report. See the module doc for how each figure is
/// computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When the report was made (ms since the Unix epoch): the `now` of [`build`].
    pub generated_at_ms: u64,
    /// Jobs in flight at most (the number of GPUs), as configured.
    pub slots: usize,
    /// First submission to last finish; `null` without jobs.
    pub window: Option<Window>,
    pub totals: Totals,
    /// Queue waits of every job that left the queue.
    pub wait: Stats,
    /// Run times of every ended job that ran.
    pub run: Stats,
    /// Most distinct participants with a job queued or in flight at once.
    pub peak_concurrent_participants: usize,
    /// The first millisecond that peak was reached; `null` without jobs.
    pub peak_at_ms: Option<u64>,
    /// Failed jobs by error text, most frequent first.
    pub failures: Vec<Failure>,
    /// Slot time spent running workflows.
    pub gpu_busy_s: f64,
    /// `gpu_busy_s / (slots × window)`, at most 1; `null` when the window is empty.
    pub gpu_busy_fraction: Option<f64>,
    /// One entry per participant who submitted anything, by participant number.
    pub users: Vec<UserReport>,
}

/// The time the report covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// The first submission (ms since the Unix epoch).
    pub start_ms: u64,
    /// The last finish, or `now` while a job is still queued or in flight.
    pub end_ms: u64,
    pub duration_s: f64,
    /// Some job is still queued or in flight (the window ends at `now`).
    pub open: bool,
}

/// Jobs by current state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub submitted: usize,
    pub queued: usize,
    pub dispatched: usize,
    pub running: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub cancelled: usize,
}

/// Nearest-rank percentiles of a set of durations, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// How many durations there were.
    pub count: usize,
    /// Their sum (0 without any).
    pub total_s: f64,
    pub p50_s: Option<f64>,
    pub p95_s: Option<f64>,
    pub max_s: Option<f64>,
}

/// How many jobs failed with one error text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: String,
    pub count: usize,
}

/// One participant's line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserReport {
    /// The participant's number (`/user/{n}/`).
    pub user: u32,
    pub submitted: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Queued now.
    pub queued: usize,
    /// Dispatched or running now.
    pub in_flight: usize,
    pub wait: Stats,
    pub run: Stats,
}

/// The CSV header (the `user` column holds `all` in the summary row).
pub const CSV_COLUMNS: [&str; 17] = [
    "user",
    "submitted",
    "succeeded",
    "failed",
    "cancelled",
    "queued",
    "in_flight",
    "wait_count",
    "wait_total_s",
    "wait_p50_s",
    "wait_p95_s",
    "wait_max_s",
    "run_count",
    "run_total_s",
    "run_p50_s",
    "run_p95_s",
    "run_max_s",
];

/// Error text counted for a failed job without one.
pub const UNKNOWN_REASON: &str = "unknown error";

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The value at nearest rank `ceil(p/100 × n)` of `sorted` (ascending, non-empty).
fn nearest_rank(sorted: &[u64], p: usize) -> u64 {
    let n = sorted.len();
    let rank = (p * n).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// p50/p95/max of durations in milliseconds.
pub fn stats(mut ms: Vec<u64>) -> Stats {
    if ms.is_empty() {
        return Stats::default();
    }
    ms.sort_unstable();
    Stats {
        count: ms.len(),
        total_s: secs(ms.iter().sum()),
        p50_s: Some(secs(nearest_rank(&ms, 50))),
        p95_s: Some(secs(nearest_rank(&ms, 95))),
        max_s: Some(secs(*ms.last().expect("non-empty"))),
    }
}

/// When job `job` left (or will leave, as far as `now` knows) the room:
/// its finish, or `now` while it has not ended.
fn interval_end(job: &Job, now_ms: u64) -> u64 {
    let end = if job.state.is_terminal() {
        // Every ended job has finished_at; a damaged record falls back to the
        // last time it is known to have existed.
        job.finished_at
            .or(job.started_at)
            .or(job.dispatched_at)
            .unwrap_or(job.created_at)
    } else {
        now_ms
    };
    end.max(job.created_at)
}

/// Queue wait (ms) of a job that has left the queue.
fn wait_ms(job: &Job) -> Option<u64> {
    job.started_at.or(job.dispatched_at).map(|t| t.saturating_sub(job.created_at))
}

/// Run time (ms) of an ended job that ran.
fn run_ms(job: &Job) -> Option<u64> {
    match (job.state.is_terminal(), job.started_at, job.finished_at) {
        (true, Some(start), Some(end)) => Some(end.saturating_sub(start)),
        _ => None,
    }
}

/// Most distinct users with an interval covering the same millisecond, and
/// the first millisecond it happened. Intervals are closed: a job that ends
/// at `t` and one that starts at `t` overlap.
fn peak_participants(jobs: &[Job], now_ms: u64) -> (usize, Option<u64>) {
    // (time, 0 = opens / 1 = closes, user): opening first at equal times
    // makes the intervals closed.
    let mut events: Vec<(u64, u8, u32)> = Vec::with_capacity(jobs.len() * 2);
    for job in jobs {
        events.push((job.created_at, 0, job.user));
        events.push((interval_end(job, now_ms), 1, job.user));
    }
    events.sort_unstable();
    let mut open: BTreeMap<u32, usize> = BTreeMap::new();
    let (mut peak, mut peak_at) = (0, None);
    for (t, kind, user) in events {
        if kind == 0 {
            *open.entry(user).or_default() += 1;
            if open.len() > peak {
                peak = open.len();
                peak_at = Some(t);
            }
        } else if let Some(n) = open.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&user);
            }
        }
    }
    (peak, peak_at)
}

/// Computes the report over `jobs` (any order), for a dispatcher with
/// `slots` slots, as of `now_ms` (ms since the Unix epoch).
pub fn build(jobs: &[Job], slots: usize, now_ms: u64) -> Report {
    let mut totals = Totals { submitted: jobs.len(), ..Totals::default() };
    let mut waits = Vec::new();
    let mut runs = Vec::new();
    let mut busy_ms: u64 = 0;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_user: BTreeMap<u32, (UserReport, Vec<u64>, Vec<u64>)> = BTreeMap::new();

    for job in jobs {
        let (user, user_waits, user_runs) = per_user.entry(job.user).or_insert_with(|| {
            (
                UserReport {
                    user: job.user,
                    submitted: 0,
                    succeeded: 0,
                    failed: 0,
                    cancelled: 0,
                    queued: 0,
                    in_flight: 0,
                    wait: Stats::default(),
                    run: Stats::default(),
                },
                Vec::new(),
                Vec::new(),
            )
        });
        user.submitted += 1;
        match job.state {
            JobState::Queued => {
                totals.queued += 1;
                user.queued += 1;
            }
            JobState::Dispatched => {
                totals.dispatched += 1;
                user.in_flight += 1;
            }
            JobState::Running => {
                totals.running += 1;
                user.in_flight += 1;
            }
            JobState::Succeeded => {
                totals.succeeded += 1;
                user.succeeded += 1;
            }
            JobState::Failed => {
                totals.failed += 1;
                user.failed += 1;
                let reason = job.error.clone().unwrap_or_else(|| UNKNOWN_REASON.to_string());
                *reasons.entry(reason).or_default() += 1;
            }
            JobState::Cancelled => {
                totals.cancelled += 1;
                user.cancelled += 1;
            }
        }
        if let Some(w) = wait_ms(job) {
            waits.push(w);
            user_waits.push(w);
        }
        if let Some(r) = run_ms(job) {
            runs.push(r);
            user_runs.push(r);
            busy_ms += r;
        } else if job.state == JobState::Running {
            if let Some(start) = job.started_at {
                busy_ms += now_ms.saturating_sub(start);
            }
        }
    }

    let window = match (
        jobs.iter().map(|j| j.created_at).min(),
        jobs.iter().map(|j| interval_end(j, now_ms)).max(),
    ) {
        (Some(start_ms), Some(end_ms)) => Some(Window {
            start_ms,
            end_ms,
            duration_s: secs(end_ms - start_ms),
            open: jobs.iter().any(|j| !j.state.is_terminal()),
        }),
        _ => None,
    };
    let gpu_busy_fraction = window.as_ref().and_then(|w| {
        let capacity = slots as u64 * (w.end_ms - w.start_ms);
        (capacity > 0).then(|| (busy_ms as f64 / capacity as f64).min(1.0))
    });

    let mut failures: Vec<Failure> =
        reasons.into_iter().map(|(reason, count)| Failure { reason, count }).collect();
    // Stable: equal counts stay in text order.
    failures.sort_by_key(|f| std::cmp::Reverse(f.count));

    let (peak_concurrent_participants, peak_at_ms) = peak_participants(jobs, now_ms);
    let users = per_user
        .into_values()
        .map(|(mut user, user_waits, user_runs)| {
            user.wait = stats(user_waits);
            user.run = stats(user_runs);
            user
        })
        .collect();

    Report {
        generated_at_ms: now_ms,
        slots,
        window,
        totals,
        wait: stats(waits),
        run: stats(runs),
        peak_concurrent_participants,
        peak_at_ms,
        failures,
        gpu_busy_s: secs(busy_ms),
        gpu_busy_fraction,
        users,
    }
}

/// The report as pretty-printed JSON (with a final newline).
pub fn to_json(report: &Report) -> String {
    let mut s = serde_json::to_string_pretty(report).expect("a report serializes");
    s.push('\n');
    s
}

/// One CSV cell: quoted (with `"` doubled) when it holds a comma, a quote or
/// a line break.
fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_row(out: &mut String, user: &str, counts: [usize; 6], wait: &Stats, run: &Stats) {
    let mut cells = vec![csv_cell(user)];
    cells.extend(counts.iter().map(|c| c.to_string()));
    for s in [wait, run] {
        cells.extend([s.count.to_string(), s.total_s.to_string()]);
        cells.extend([opt(s.p50_s), opt(s.p95_s), opt(s.max_s)]);
    }
    let _ = writeln!(out, "{}", cells.join(","));
}

/// The report as CSV: the header [`CSV_COLUMNS`], one row per participant,
/// then the `all` row (every job; its percentiles are over all jobs, not
/// over the rows above). Lines end with `\n`.
pub fn to_csv(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", CSV_COLUMNS.join(","));
    for u in &report.users {
        let counts = [u.submitted, u.succeeded, u.failed, u.cancelled, u.queued, u.in_flight];
        csv_row(&mut out, &u.user.to_string(), counts, &u.wait, &u.run);
    }
    let t = &report.totals;
    let counts = [t.submitted, t.succeeded, t.failed, t.cancelled, t.queued, t.dispatched + t.running];
    csv_row(&mut out, "all", counts, &report.wait, &report.run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, Outputs};
    use serde_json::Value;

    /// A job of `user` in `state`, with times in seconds from 0.
    fn job(user: u32, state: JobState, created: u64, started: Option<u64>, finished: Option<u64>) -> Job {
        Job {
            id: JobId::new_v4(),
            user,
            number: 0,
            workflow: Value::Null,
            extra_data: Value::Null,
            state,
            priority: 0,
            created_at: created * 1000,
            dispatched_at: started.map(|s| s * 1000),
            started_at: started.map(|s| s * 1000),
            finished_at: finished.map(|f| f * 1000),
            outputs: Outputs::new(),
            error: None,
            attempts: u32::from(started.is_some()),
            executor_ref: None,
            messages: Vec::new(),
            cancel_requested: false,
            progress: None,
        }
    }

    fn failed(user: u32, error: Option<&str>) -> Job {
        let mut j = job(user, JobState::Failed, 0, Some(1), Some(2));
        j.error = error.map(String::from);
        j
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = stats((1..=10).map(|s| s * 1000).collect());
        assert_eq!((s.count, s.p50_s, s.p95_s, s.max_s), (10, Some(5.0), Some(10.0), Some(10.0)));
        // Order does not matter; rank ceil(0.95 × 20) = 19.
        let s = stats((1..=20).rev().map(|s| s * 1000).collect());
        assert_eq!((s.p50_s, s.p95_s, s.max_s), (Some(10.0), Some(19.0), Some(20.0)));
        let s = stats(vec![1500]);
        assert_eq!((s.count, s.p50_s, s.p95_s, s.max_s), (1, Some(1.5), Some(1.5), Some(1.5)));
        // Two values: p50 is the lower one (rank 1), p95 the upper.
        let s = stats(vec![4000, 2000]);
        assert_eq!((s.p50_s, s.p95_s), (Some(2.0), Some(4.0)));
        assert_eq!(stats(vec![]), Stats { count: 0, total_s: 0.0, p50_s: None, p95_s: None, max_s: None });
    }

    #[test]
    fn waits_and_run_times() {
        let mut dispatched_only = job(2, JobState::Failed, 10, None, Some(20));
        dispatched_only.dispatched_at = Some(13_000);
        let jobs = vec![
            job(1, JobState::Succeeded, 0, Some(2), Some(12)), // wait 2, run 10
            job(1, JobState::Cancelled, 0, None, Some(5)),     // cancelled while queued: no wait
            dispatched_only,                                   // wait 3 (dispatched), no run
            job(2, JobState::Running, 20, Some(24), None),     // wait 4, running: no run time
            job(3, JobState::Queued, 30, None, None),          // nothing yet
        ];
        let r = build(&jobs, 1, 40_000);
        assert_eq!((r.wait.count, r.wait.total_s, r.wait.p50_s, r.wait.max_s), (3, 9.0, Some(3.0), Some(4.0)));
        assert_eq!((r.run.count, r.run.max_s), (1, Some(10.0)));
        assert_eq!(
            r.totals,
            Totals { submitted: 5, queued: 1, dispatched: 0, running: 1, succeeded: 1, failed: 1, cancelled: 1 }
        );
        let u1 = &r.users[0];
        assert_eq!((u1.user, u1.submitted, u1.succeeded, u1.cancelled, u1.run.total_s), (1, 2, 1, 1, 10.0));
        let u2 = &r.users[1];
        assert_eq!((u2.failed, u2.in_flight, u2.wait.count, u2.run.count), (1, 1, 2, 0));
        assert_eq!((r.users[2].queued, r.users[2].wait.count), (1, 0));
        // Open: the window ends now; the running job counts as busy until now.
        assert_eq!(r.window, Some(Window { start_ms: 0, end_ms: 40_000, duration_s: 40.0, open: true }));
        assert_eq!(r.gpu_busy_s, 10.0 + 16.0);
        assert_eq!(r.gpu_busy_fraction, Some(26.0 / 40.0));
    }

    #[test]
    fn peak_counts_distinct_participants_over_overlapping_and_nested_intervals() {
        use JobState::*;
        let jobs = vec![
            job(1, Succeeded, 0, Some(0), Some(100)),
            job(1, Succeeded, 15, Some(20), Some(30)), // nested in user 1's own: still one participant
            job(2, Succeeded, 10, Some(30), Some(40)), // nested in user 1's
            job(3, Succeeded, 18, Some(40), Some(60)), // 1, 2 and 3 from 18 to 40
            job(4, Cancelled, 100, None, Some(110)),   // touches user 1's end: 1 and 4 at 100
        ];
        let r = build(&jobs, 1, 1_000_000);
        assert_eq!(r.peak_concurrent_participants, 3);
        assert_eq!(r.peak_at_ms, Some(18_000));

        // Touching intervals overlap at the shared millisecond.
        let r = build(&[job(1, Cancelled, 0, None, Some(10)), job(2, Cancelled, 10, None, Some(20))], 1, 0);
        assert_eq!((r.peak_concurrent_participants, r.peak_at_ms), (2, Some(10_000)));
        // Back to back with a gap: never two at once.
        let r = build(&[job(1, Cancelled, 0, None, Some(10)), job(2, Cancelled, 11, None, Some(20))], 1, 0);
        assert_eq!((r.peak_concurrent_participants, r.peak_at_ms), (1, Some(0)));

        // One participant with many overlapping jobs is one participant.
        let many: Vec<Job> = (0..5).map(|i| job(7, Queued, i, None, None)).collect();
        assert_eq!(build(&many, 1, 100_000).peak_concurrent_participants, 1);

        // Open jobs last until now: a late submit overlaps a job still queued.
        let r = build(&[job(1, Queued, 0, None, None), job(2, Succeeded, 50, Some(50), Some(60))], 1, 70_000);
        assert_eq!((r.peak_concurrent_participants, r.peak_at_ms), (2, Some(50_000)));
    }

    #[test]
    fn gpu_busy_fraction_is_run_time_over_slot_time_capped_at_one() {
        use JobState::*;
        let jobs = vec![
            job(1, Succeeded, 0, Some(10), Some(40)), // 30 s
            job(2, Failed, 0, Some(50), Some(70)),    // 20 s
            job(3, Cancelled, 0, None, Some(100)),    // never ran: window ends at 100
        ];
        let r = build(&jobs, 2, 1_000_000);
        assert_eq!(r.window, Some(Window { start_ms: 0, end_ms: 100_000, duration_s: 100.0, open: false }));
        assert_eq!(r.gpu_busy_s, 50.0);
        assert_eq!(r.gpu_busy_fraction, Some(50.0 / 200.0));
        assert_eq!(build(&jobs, 1, 1_000_000).gpu_busy_fraction, Some(0.5));

        // More run time than slot time (more GPUs than configured): capped.
        let overlapping = vec![job(1, Succeeded, 0, Some(0), Some(10)), job(2, Succeeded, 0, Some(0), Some(10))];
        assert_eq!(build(&overlapping, 1, 0).gpu_busy_fraction, Some(1.0));

        // A window of length zero has no fraction.
        let instant = vec![job(1, Cancelled, 5, None, Some(5))];
        let r = build(&instant, 1, 1_000_000);
        assert_eq!(r.window.as_ref().map(|w| w.duration_s), Some(0.0));
        assert_eq!(r.gpu_busy_fraction, None);
    }

    #[test]
    fn cold_start_has_nulls_not_zeros() {
        let r = build(&[], 1, 123);
        assert_eq!(r.window, None);
        assert_eq!(r.totals, Totals::default());
        assert_eq!((r.peak_concurrent_participants, r.peak_at_ms), (0, None));
        assert_eq!(r.gpu_busy_fraction, None);
        assert!(r.users.is_empty() && r.failures.is_empty());
        let json: Value = serde_json::from_str(&to_json(&r)).unwrap();
        for key in ["window", "peak_at_ms", "gpu_busy_fraction"] {
            assert_eq!(json[key], Value::Null, "{key}");
        }
        let empty = serde_json::json!({"count": 0, "total_s": 0.0, "p50_s": null, "p95_s": null, "max_s": null});
        assert_eq!(json["wait"], empty);
        assert_eq!(to_csv(&r), format!("{}\nall,0,0,0,0,0,0,0,0,,,,0,0,,,\n", CSV_COLUMNS.join(",")));
        // Jobs that never left the queue: counts, but still no waits or run times.
        let r = build(&[job(1, JobState::Queued, 0, None, None)], 1, 0);
        assert_eq!((r.wait.p50_s, r.run.max_s, r.gpu_busy_fraction), (None, None, None));
        assert_eq!(r.peak_concurrent_participants, 1);
    }

    #[test]
    fn failures_grouped_by_reason_most_frequent_first() {
        let jobs = vec![
            failed(1, Some("timeout")),
            failed(2, Some("CUDA out of memory")),
            failed(3, None),
            failed(1, Some("CUDA out of memory")),
            failed(2, Some("CUDA out of memory")),
            failed(3, Some("a, \"quoted\" reason")),
            job(4, JobState::Cancelled, 0, None, Some(1)), // cancelled is not a failure
        ];
        let r = build(&jobs, 1, 0);
        let got: Vec<(&str, usize)> = r.failures.iter().map(|f| (f.reason.as_str(), f.count)).collect();
        assert_eq!(
            got,
            vec![("CUDA out of memory", 3), ("a, \"quoted\" reason", 1), ("timeout", 1), (UNKNOWN_REASON, 1)]
        );
        assert_eq!(r.totals.failed, 6);
    }

    #[test]
    fn csv_has_a_row_per_participant_and_an_all_row() {
        use JobState::*;
        let jobs = vec![
            job(2, Succeeded, 0, Some(1), Some(3)),
            job(1, Succeeded, 0, Some(3), Some(4)),
            job(1, Failed, 0, Some(5), Some(9)),
            job(3, Queued, 0, None, None),
        ];
        let csv = to_csv(&build(&jobs, 1, 10_000));
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        // user,submitted,succeeded,failed,cancelled,queued,in_flight, wait: count,total,p50,p95,max, run: same
        assert_eq!(lines[1], "1,2,1,1,0,0,0,2,8,3,5,5,2,5,1,4,4");
        assert_eq!(lines[2], "2,1,1,0,0,0,0,1,1,1,1,1,1,2,2,2,2");
        assert_eq!(lines[3], "3,1,0,0,0,1,0,0,0,,,,0,0,,,");
        assert_eq!(lines[4], "all,4,2,1,0,1,0,3,9,3,5,5,3,7,2,4,4");
        assert_eq!(lines.len(), 5);
        assert!(lines.iter().all(|l| l.split(',').count() == CSV_COLUMNS.len()));
    }

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn json_round_trips_and_names_the_fields() {
        let jobs = vec![job(1, JobState::Succeeded, 0, Some(1), Some(2)), failed(2, Some("boom"))];
        let r = build(&jobs, 1, 5_000);
        let text = to_json(&r);
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
        let json: Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        for key in [
            "generated_at_ms",
            "slots",
            "window",
            "totals",
            "wait",
            "run",
            "peak_concurrent_participants",
            "peak_at_ms",
            "failures",
            "gpu_busy_s",
            "gpu_busy_fraction",
            "users",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert_eq!(json["failures"], serde_json::json!([{"reason": "boom", "count": 1}]));
    }

    #[test]
    fn formats_parse() {
        assert_eq!("csv".parse::<Format>().unwrap(), Format::Csv);
        assert_eq!("json".parse::<Format>().unwrap(), Format::Json);
        assert!("xml".parse::<Format>().is_err());
    }
}
