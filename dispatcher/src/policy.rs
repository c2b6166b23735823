//! Which queued job goes next.
//!
//! The queue is a Redis sorted set; a policy decides each job's score when it
//! is queued (or requeued) and the Lua that takes the next one. Today there is
//! one policy, FIFO by submission number, so a requeued job keeps its original
//! place: the front of its user's line. Fair share and instructor priority
//! plug in here, without changing the queue's callers.

use crate::job::Job;

/// An ordering of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// First come, first served.
    #[default]
    Fifo,
}

impl Policy {
    /// The job's score in the queue's sorted set: lowest goes first.
    pub fn score(self, job_number: u64, _job: Option<&Job>) -> f64 {
        match self {
            Policy::Fifo => job_number as f64,
        }
    }

    /// Lua that picks (without removing) the id of the next job.
    /// `KEYS[1]` is the queue; the script returns the id or `false`.
    pub(crate) fn pick_lua(self) -> &'static str {
        match self {
            Policy::Fifo => {
                "local ids = redis.call('ZRANGE', KEYS[1], 0, 0)\n\
                 if #ids == 0 then return false end\n\
                 return ids[1]"
            }
        }
    }
}
