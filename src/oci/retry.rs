//! Bounded retries with exponential backoff and jitter for transient registry failures.
//!
//! A request is tried at most [`RetryPolicy::max_attempts`] times, and no new attempt starts
//! once the next wait would cross [`RetryPolicy::deadline`] (counted from the first attempt).
//! Waits double from [`RetryPolicy::initial_backoff`] up to [`RetryPolicy::max_backoff`]; each
//! is jittered to between half and all of its nominal length so that clients that failed
//! together do not retry together.

use std::time::{Duration, Instant};

/// How transient failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts later than this after the first attempt began.
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// Retries quickly; for tests.
    pub fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            deadline: Duration::from_secs(30),
        }
    }

    /// The nominal wait before retry number `retry` (1-based), before jitter.
    fn nominal_backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The jittered wait before retry number `retry`: between half and all of the nominal.
    pub fn backoff(&self, retry: u32) -> Duration {
        let nominal = self.nominal_backoff(retry);
        let half = nominal / 2;
        let spread = u64::try_from((nominal - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(fastrand::u64(0..=spread))
    }
}

/// Why one attempt failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth retrying; the text says what happened.
    Transient(String),
    /// Final.
    Fatal(super::OciError),
}

/// The retry budget was spent.
#[derive(Debug)]
pub(crate) struct GaveUp {
    pub retries: u32,
    pub elapsed: Duration,
    pub last: String,
}

/// Tracks attempts of one request.
#[derive(Debug)]
pub(crate) struct Retrier<'a> {
    policy: &'a RetryPolicy,
    started: Instant,
    attempts: u32,
}

impl<'a> Retrier<'a> {
    /// Call before the first attempt.
    pub fn new(policy: &'a RetryPolicy) -> Retrier<'a> {
        Retrier {
            policy,
            started: Instant::now(),
            attempts: 1,
        }
    }

    /// After a transient failure: waits out the backoff and returns `Ok` if another attempt
    /// may start, or says why not.
    pub async fn wait_or_give_up(&mut self, last: String) -> Result<(), GaveUp> {
        let retry = self.attempts;
        let wait = self.policy.backoff(retry);
        let elapsed = self.started.elapsed();
        if self.attempts >= self.policy.max_attempts.max(1) || elapsed + wait > self.policy.deadline
        {
            return Err(GaveUp {
                retries: self.attempts - 1,
                elapsed,
                last,
            });
        }
        tokio::time::sleep(wait).await;
        self.attempts += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            deadline: Duration::from_secs(60),
        };
        for (retry, nominal) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let nominal = Duration::from_millis(nominal);
            assert_eq!(policy.nominal_backoff(retry), nominal);
            for _ in 0..50 {
                let wait = policy.backoff(retry);
                assert!(wait >= nominal / 2 && wait <= nominal, "{retry}: {wait:?}");
            }
        }
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let policy = RetryPolicy::fast(3);
        let mut retrier = Retrier::new(&policy);
        assert!(retrier.wait_or_give_up("one".into()).await.is_ok());
        assert!(retrier.wait_or_give_up("two".into()).await.is_ok());
        let gave_up = retrier.wait_or_give_up("three".into()).await.unwrap_err();
        assert_eq!(gave_up.retries, 2);
        assert_eq!(gave_up.last, "three");
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline() {
        let policy = RetryPolicy {
            max_attempts: 100,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(10),
            deadline: Duration::from_secs(1),
        };
        let mut retrier = Retrier::new(&policy);
        let gave_up = retrier.wait_or_give_up("slow".into()).await.unwrap_err();
        assert_eq!(gave_up.retries, 0);
    }
}
