//! Bounded retries with exponential backoff.
//!
//! Everything gpu-task talks to may blink (a gateway restart, a busy
//! ComfyUI), but a job must neither hang forever nor give up on the first
//! hiccup. Every retried call says how often and how patiently, here.

use std::future::Future;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Tries in total (at least one).
    pub attempts: u32,
    /// Pause after the first failure; doubled after each further one.
    pub first: Duration,
    /// Longest pause.
    pub max: Duration,
}

impl Backoff {
    /// A few seconds in total: for finding out that something is not there.
    pub const QUICK: Backoff =
        Backoff { attempts: 4, first: Duration::from_millis(250), max: Duration::from_secs(1) };
    /// About half a minute: for calls a job cannot do without.
    pub const PATIENT: Backoff =
        Backoff { attempts: 8, first: Duration::from_millis(500), max: Duration::from_secs(8) };

    /// Runs `op` until it succeeds, fails with an error `transient` rejects,
    /// or the attempts are used up; returns the last result.
    pub async fn run<T, E, F, Fut>(
        &self,
        what: &str,
        transient: impl Fn(&E) -> bool,
        mut op: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut delay = self.first;
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.attempts.max(1) && transient(&e) => {
                    tracing::debug!(%what, attempt, error = %e, "retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const FAST: Backoff = Backoff { attempts: 3, first: Duration::ZERO, max: Duration::ZERO };

    #[tokio::test]
    async fn retries_transient_errors_up_to_the_limit() {
        let calls = Cell::new(0);
        let r: Result<(), String> = FAST
            .run(
                "t",
                |_| true,
                || {
                    calls.set(calls.get() + 1);
                    async { Err("down".to_string()) }
                },
            )
            .await;
        assert_eq!(r.unwrap_err(), "down");
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn stops_on_permanent_errors_and_success() {
        let calls = Cell::new(0);
        let r: Result<(), String> = FAST
            .run(
                "t",
                |_| false,
                || {
                    calls.set(calls.get() + 1);
                    async { Err("refused".to_string()) }
                },
            )
            .await;
        assert!(r.is_err());
        assert_eq!(calls.get(), 1);
        let calls = Cell::new(0);
        let r: Result<u32, String> = FAST
            .run(
                "t",
                |_| true,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n < 2 {
                            Err("blip".to_string())
                        } else {
                            Ok(n)
                        }
                    }
                },
            )
            .await;
        assert_eq!(r.unwrap(), 2);
    }
}
