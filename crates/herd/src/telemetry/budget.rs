//! Repeated failures are logged at a bounded rate: the first few of each second one by one (with
//! their trace), the rest counted by status code and summarised in one line when the next second
//! begins. A flood of failing calls costs the disk a few lines a second, not one per call per
//! hop per retry.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::time::Instant;

/// Lines logged one by one per second, per place that logs failures.
const LINES_PER_SECOND: u32 = 20;
/// gRPC has 17 codes, 0 to 16.
const CODES: usize = 17;

/// The bounded log of one kind of failure.
#[derive(Debug)]
pub(crate) struct LogBudget {
    what: &'static str,
    /// The second (since the process's first failure) being counted.
    second: AtomicU64,
    logged: AtomicU32,
    suppressed: [AtomicU64; CODES],
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl LogBudget {
    /// A budget for failures described as `what`.
    pub(crate) const fn new(what: &'static str) -> Self {
        Self {
            what,
            second: AtomicU64::new(0),
            logged: AtomicU32::new(0),
            suppressed: [const { AtomicU64::new(0) }; CODES],
        }
    }

    /// Whether a failure with `code` may be logged on its own now; if not it is counted, and
    /// summarised when the next second begins.
    pub(crate) fn admit(&self, code: tonic::Code) -> bool {
        let now = epoch().elapsed().as_secs();
        let current = self.second.load(Ordering::Relaxed);
        if now != current
            && self
                .second
                .compare_exchange(current, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
            self.summarise(now.saturating_sub(current));
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND {
            return true;
        }
        if let Some(count) = self.suppressed.get(code as usize) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    /// Logs, and resets, what was counted rather than logged.
    fn summarise(&self, seconds: u64) {
        let counts: Vec<(tonic::Code, u64)> = self
            .suppressed
            .iter()
            .enumerate()
            .filter_map(|(code, count)| {
                let n = count.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (tonic::Code::from_i32(code as i32), n))
            })
            .collect();
        if counts.is_empty() {
            return;
        }
        let total: u64 = counts.iter().map(|(_, n)| n).sum();
        let by_code: Vec<String> = counts.iter().map(|(c, n)| format!("{c:?}: {n}")).collect();
        tracing::warn!(
            suppressed = total,
            by_code = %by_code.join(", "),
            within_seconds = seconds.max(1),
            "{} (more than {LINES_PER_SECOND} a second; counted, not logged one by one)",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_a_few_lines_at_a_time_and_counted() {
        let budget = LogBudget::new("calls failed");
        let admitted = (0..1000)
            .filter(|_| budget.admit(tonic::Code::Unavailable))
            .count();
        // Within one second (the test takes far less), or just across a boundary.
        assert!(
            (LINES_PER_SECOND as usize..=2 * LINES_PER_SECOND as usize).contains(&admitted),
            "{admitted}"
        );
        let counted: u64 = budget
            .suppressed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        assert!(counted <= 1000 - admitted as u64);
    }
}
