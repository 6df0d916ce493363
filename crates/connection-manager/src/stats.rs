//! Query figures: the `pgstack_` series and the in-process snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Counter of calls, labelled `op`, `route`, `node`, `outcome` (`ok`,
/// `error`, `unknown`).
pub const QUERIES_METRIC: &str = "pgstack_queries_total";
/// Histogram of call durations in seconds, labelled `op`, `route`, `node`.
pub const QUERY_DURATION_METRIC: &str = "pgstack_query_duration_seconds";
/// Counter of retries, labelled `op` (the same series the retry loop of
/// pgstack-resilience writes).
pub const QUERY_RETRIES_METRIC: &str = pgstack_resilience::RETRIES_METRIC;
/// Counter of statements slower than `query.slow_query_threshold`, labelled
/// `op`, `node`.
pub const SLOW_QUERIES_METRIC: &str = "pgstack_slow_queries_total";
/// Counter of primary changes found by re-discovery, labelled `node` (the
/// new primary).
pub const FAILOVERS_METRIC: &str = "pgstack_primary_changes_total";

/// Sub-buckets per power of two: values are kept within 12.5 %.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Values below this many microseconds get a bucket each.
const LINEAR: u64 = 2 * SUB as u64;
/// Powers of two covered: up to 2^40 µs (about 12 days).
const MAX_EXP: u32 = 40;
const BUCKETS: usize = LINEAR as usize + (MAX_EXP as usize - (SUB_BITS as usize + 1)) * SUB;

/// A lock-free latency histogram (microseconds, log-linear buckets).
pub(crate) struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn index(micros: u64) -> usize {
        if micros < LINEAR {
            return micros as usize;
        }
        let exp = 63 - micros.leading_zeros();
        if exp >= MAX_EXP {
            return BUCKETS - 1;
        }
        let sub = ((micros >> (exp - SUB_BITS)) as usize) & (SUB - 1);
        LINEAR as usize + (exp - (SUB_BITS + 1)) as usize * SUB + sub
    }

    /// The largest value (µs) a bucket holds.
    fn upper(index: usize) -> u64 {
        if index < LINEAR as usize {
            return index as u64;
        }
        let rel = index - LINEAR as usize;
        let exp = (rel / SUB) as u32 + SUB_BITS + 1;
        let sub = (rel % SUB) as u64;
        let base = 1u64 << exp;
        let width = 1u64 << (exp - SUB_BITS);
        base + (sub + 1) * width - 1
    }

    pub(crate) fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(slot) = self.counts.get(Self::index(micros)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `q` quantile (0..=1), `None` when empty.
    pub(crate) fn quantile(&self, q: f64) -> Option<Duration> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(Self::upper(index)));
            }
        }
        None
    }
}

/// The cluster's counters, read by [`crate::Cluster::metrics`].
pub(crate) struct Counters {
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) unknown_outcomes: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) slow: AtomicU64,
    pub(crate) primary_changes: AtomicU64,
    pub(crate) lanes_busy: AtomicU64,
    pub(crate) latency: Histogram,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            unknown_outcomes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            primary_changes: AtomicU64::new(0),
            lanes_busy: AtomicU64::new(0),
            latency: Histogram::new(),
        }
    }
}

/// A snapshot of the cluster's figures ([`crate::Cluster::metrics`]).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ClusterMetrics {
    /// Calls made (statements, closures, transactions), retries not counted.
    pub queries: u64,
    /// Calls that ended in an error.
    pub failures: u64,
    /// Calls that ended in [`crate::Error::CommitOutcomeUnknown`].
    pub unknown_outcomes: u64,
    /// Retries made.
    pub retries: u64,
    /// Statements slower than `query.slow_query_threshold`.
    pub slow_queries: u64,
    /// Primary changes found by re-discovery.
    pub primary_changes: u64,
    /// Statements that could have shared a connection but found every
    /// shared connection busy (stuck behind a long statement, or carrying one
    /// of unknown length) and took a connection of their own.
    pub lanes_busy: u64,
    /// Median call duration (within 12.5 %).
    #[serde(with = "opt_secs")]
    pub latency_p50: Option<Duration>,
    /// 99th percentile call duration (within 12.5 %).
    #[serde(with = "opt_secs")]
    pub latency_p99: Option<Duration>,
    /// Each node.
    pub nodes: Vec<NodeMetrics>,
}

/// One node in [`ClusterMetrics`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct NodeMetrics {
    /// The node's name (`primary`, `replica-1`, ...).
    pub name: String,
    /// The role in the configuration.
    pub configured_role: crate::Role,
    /// The role last observed (in recovery or read-only: replica).
    pub observed_role: Option<crate::Role>,
    /// Whether writes go to this node now.
    pub is_primary: bool,
    /// The breaker's state (`closed`, `open`, ...), if the node has one.
    pub breaker: Option<String>,
    /// Whether reads may go to this node now.
    pub routable: bool,
    /// Calls that ran on this node.
    pub queries: u64,
    /// Of these, the ones that failed.
    pub failures: u64,
    /// The pool's figures.
    pub pool: pgstack_pool::PoolStatus,
}

mod opt_secs {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_an_eighth() {
        for micros in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1_000,
            12_345,
            1_000_000,
            987_654_321,
        ] {
            let index = Histogram::index(micros);
            let upper = Histogram::upper(index);
            assert!(upper >= micros, "{micros} -> {upper}");
            assert!(
                upper as f64 <= micros as f64 * 1.125 + 1.0,
                "{micros} -> {upper}"
            );
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles() {
        let h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap_or_default();
        let p99 = h.quantile(0.99).unwrap_or_default();
        assert!(
            p50 >= Duration::from_millis(50) && p50 <= Duration::from_millis(57),
            "{p50:?}"
        );
        assert!(
            p99 >= Duration::from_millis(99) && p99 <= Duration::from_millis(112),
            "{p99:?}"
        );
    }
}
