//! The retry budget every call over one channel shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// gRPC A6's retry throttle: every retryable failure costs a token, every success earns back a
/// tenth; retries stop while half or fewer of the tokens are left, so a struggling service is not
/// hit with three times its load.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Thousandths of a token.
    tokens: Arc<AtomicU32>,
}

/// Ten tokens, in thousandths.
const BUDGET_MAX: u32 = 10_000;
/// A tenth of a token per success.
const BUDGET_EARN: u32 = 100;
/// One token per failure.
const BUDGET_COST: u32 = 1_000;

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            tokens: Arc::new(AtomicU32::new(BUDGET_MAX)),
        }
    }
}

impl RetryBudget {
    /// Records a success.
    pub fn success(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + BUDGET_EARN).min(BUDGET_MAX))
            });
    }

    /// Records a retryable failure.
    pub fn failure(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(BUDGET_COST))
            });
    }

    /// Tokens left, of ten.
    pub fn tokens(&self) -> f64 {
        f64::from(self.tokens.load(Ordering::Relaxed)) / 1000.0
    }

    /// Whether a retry may be made now.
    pub fn can_retry(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > BUDGET_MAX / 2
    }
}
