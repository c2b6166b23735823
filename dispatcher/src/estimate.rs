//! Where each queued job stands, and roughly how long it will wait.
//!
//! Positions come from the policy's real dispatch order
//! ([`crate::queue::Store::order`]). The wait is estimated only from
//! evidence: the median run time of the last succeeded jobs (at least
//! [`MIN_SAMPLES`] of them; before that there is no estimate, because a wrong
//! number is worse than none). Each of the `slots` GPUs is free now, or when
//! its running job is expected to end (median minus time already run, at
//! least a tenth of the median); the queued jobs then take the earliest free
//! slot in order, each for the median.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use serde::Serialize;

use crate::job::{now_ms, JobId};
use crate::queue::{QueueError, Store};

/// Fewer succeeded runs than this give no estimate.
pub const MIN_SAMPLES: usize = 3;

/// A queued job's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Place {
    pub id: JobId,
    pub user: u32,
    /// 1 = next to run.
    pub position: usize,
    /// Estimated wait until it starts, in seconds; `None` when unknown.
    pub wait_seconds: Option<u64>,
}

/// The median of `samples` (ms), if there are enough of them.
pub fn typical_runtime(samples: &[u64]) -> Option<Duration> {
    if samples.len() < MIN_SAMPLES {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    Some(Duration::from_millis(sorted[sorted.len() / 2]))
}

/// Waits for the first `count` queued jobs, given `slots` GPUs, how long the
/// jobs in flight have run, and the typical run time.
pub fn waits(count: usize, slots: usize, running_for: &[Duration], typical: Duration) -> Vec<Duration> {
    let slots = slots.max(1);
    let mut free: BinaryHeap<Reverse<Duration>> = running_for
        .iter()
        .take(slots)
        .map(|ran| Reverse(typical.saturating_sub(*ran).max(typical / 10)))
        .collect();
    while free.len() < slots {
        free.push(Reverse(Duration::ZERO));
    }
    (0..count)
        .map(|_| {
            let Reverse(at) = free.pop().expect("slots > 0");
            free.push(Reverse(at + typical));
            at
        })
        .collect()
}

/// Every queued job's place, in dispatch order.
pub async fn places(store: &Store, slots: usize) -> Result<Vec<Place>, QueueError> {
    let order = store.order().await?;
    let typical = typical_runtime(&store.recent_runtimes().await?);
    let now = now_ms();
    let mut running_for = Vec::new();
    for id in store.inflight().await? {
        if let Some(job) = store.get(&id).await? {
            let since = job.started_at.or(job.dispatched_at).unwrap_or(now);
            running_for.push(Duration::from_millis(now.saturating_sub(since)));
        }
    }
    let waits = typical.map(|t| waits(order.len(), slots, &running_for, t));
    let mut out = Vec::with_capacity(order.len());
    for (i, id) in order.into_iter().enumerate() {
        let Some(job) = store.get(&id).await? else { continue };
        out.push(Place {
            id,
            user: job.user,
            position: i + 1,
            wait_seconds: waits.as_ref().map(|w| w[i].as_secs()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_estimate_on_a_cold_start() {
        assert_eq!(typical_runtime(&[]), None);
        assert_eq!(typical_runtime(&[1000, 2000]), None);
        assert_eq!(typical_runtime(&[3000, 1000, 2000]), Some(Duration::from_secs(2)));
    }

    #[test]
    fn queued_jobs_take_the_earliest_free_gpu() {
        let m = Duration::from_secs(60);
        // One GPU, busy for 20 s more: 20, 80, 140 s.
        let w = waits(3, 1, &[Duration::from_secs(40)], m);
        assert_eq!(w, [20, 80, 140].map(Duration::from_secs));
        // Two GPUs, one free: 0, then the busy one at 30 s, then 60 s.
        let w = waits(3, 2, &[Duration::from_secs(30)], m);
        assert_eq!(w, [0, 30, 60].map(Duration::from_secs));
        // A job running longer than typical still ends "soon", not in the past.
        assert_eq!(waits(1, 1, &[Duration::from_secs(600)], m), [Duration::from_secs(6)]);
    }
}
