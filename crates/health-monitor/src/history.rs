//! Bounded probe-latency history and its percentiles.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

/// Percentiles of a node's recent successful probe latencies (nearest rank).
/// Serialized in seconds (`p50_seconds`, ...).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Samples in the window (at most [`crate::HealthThresholds::history`]).
    pub samples: usize,
    /// Median.
    #[serde(rename = "p50_seconds", serialize_with = "crate::ser::opt_secs")]
    pub p50: Option<Duration>,
    /// 95th percentile.
    #[serde(rename = "p95_seconds", serialize_with = "crate::ser::opt_secs")]
    pub p95: Option<Duration>,
    /// 99th percentile.
    #[serde(rename = "p99_seconds", serialize_with = "crate::ser::opt_secs")]
    pub p99: Option<Duration>,
    /// Slowest sample.
    #[serde(rename = "max_seconds", serialize_with = "crate::ser::opt_secs")]
    pub max: Option<Duration>,
}

/// The last `capacity` latencies.
#[derive(Clone, Debug)]
pub(crate) struct LatencyWindow {
    samples: VecDeque<Duration>,
    capacity: usize,
}

impl LatencyWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        LatencyWindow {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub(crate) fn push(&mut self, latency: Duration) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(latency);
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        LatencySummary {
            samples: sorted.len(),
            p50: percentile(&sorted, 0.50),
            p95: percentile(&sorted, 0.95),
            p99: percentile(&sorted, 0.99),
            max: sorted.last().copied(),
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut window = LatencyWindow::new(100);
        for n in 1..=100 {
            window.push(ms(n));
        }
        let s = window.summary();
        assert_eq!(s.samples, 100);
        assert_eq!(s.p50, Some(ms(50)));
        assert_eq!(s.p95, Some(ms(95)));
        assert_eq!(s.p99, Some(ms(99)));
        assert_eq!(s.max, Some(ms(100)));
    }

    #[test]
    fn the_window_is_bounded_and_forgets_the_oldest() {
        let mut window = LatencyWindow::new(3);
        for n in [500, 1, 2, 3] {
            window.push(ms(n));
        }
        let s = window.summary();
        assert_eq!(s.samples, 3);
        assert_eq!(s.max, Some(ms(3)));
        assert_eq!(s.p99, Some(ms(3)));
        assert_eq!(s.p50, Some(ms(2)));
    }

    #[test]
    fn empty_window_has_no_percentiles() {
        let s = LatencyWindow::new(0).summary();
        assert_eq!(s, LatencySummary::default());
    }
}
