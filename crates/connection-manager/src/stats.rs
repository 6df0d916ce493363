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
/// Counter of `COMMIT`s whose connection broke in flight and that were
/// looked up, labelled `node` and `outcome` (`committed`, `aborted`, `lost`,
/// `unknown`).
pub const COMMIT_RESOLUTIONS_METRIC: &str = "pgstack_commit_resolutions_total";

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
    pub(crate) long_statements: AtomicU64,
    pub(crate) resolutions: [AtomicU64; 4],
    pub(crate) latency: Histogram,
    pub(crate) series: SeriesCache,
}

/// How a `COMMIT` whose connection broke in flight turned out, once looked
/// up (the `outcome` label of [`COMMIT_RESOLUTIONS_METRIC`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resolution {
    Committed = 0,
    Aborted = 1,
    Lost = 2,
    Unknown = 3,
}

impl Resolution {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Resolution::Committed => "committed",
            Resolution::Aborted => "aborted",
            Resolution::Lost => "lost",
            Resolution::Unknown => "unknown",
        }
    }
}

/// `COMMIT`s whose connection broke in flight, by what looking them up
/// found ([`ClusterMetrics::commit_resolutions`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CommitResolutions {
    /// The transaction had committed: the call succeeded.
    pub committed: u64,
    /// It had been rolled back: nothing took effect, and the transaction was
    /// retried by its rules.
    pub aborted: u64,
    /// The primary answering now never saw it ([`crate::Error::CommitLost`]).
    pub lost: u64,
    /// Nobody could tell ([`crate::Error::CommitOutcomeUnknown`]).
    pub unknown: u64,
}

impl CommitResolutions {
    /// Every interrupted `COMMIT` looked up.
    pub fn total(&self) -> u64 {
        self.committed + self.aborted + self.lost + self.unknown
    }
}

impl Counters {
    /// Counts one looked-up `COMMIT`, here and in
    /// [`COMMIT_RESOLUTIONS_METRIC`].
    pub(crate) fn resolved(&self, node: &std::sync::Arc<str>, resolution: Resolution) {
        self.resolutions[resolution as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(
            COMMIT_RESOLUTIONS_METRIC,
            "node" => metrics::SharedString::from(std::sync::Arc::clone(node)),
            "outcome" => resolution.as_str()
        )
        .increment(1);
    }

    pub(crate) fn commit_resolutions(&self) -> CommitResolutions {
        let n = |r: Resolution| self.resolutions[r as usize].load(Ordering::Relaxed);
        CommitResolutions {
            committed: n(Resolution::Committed),
            aborted: n(Resolution::Aborted),
            lost: n(Resolution::Lost),
            unknown: n(Resolution::Unknown),
        }
    }

    pub(crate) fn new() -> Self {
        Counters {
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            unknown_outcomes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            slow: AtomicU64::new(0),
            primary_changes: AtomicU64::new(0),
            lanes_busy: AtomicU64::new(0),
            long_statements: AtomicU64::new(0),
            resolutions: Default::default(),
            latency: Histogram::new(),
            series: SeriesCache::new(),
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
    /// `COMMIT`s whose connection broke in flight, by what looking them up
    /// found.
    pub commit_resolutions: CommitResolutions,
    /// Statements that could have shared a connection but found every
    /// shared connection busy (stuck behind a long statement, or carrying one
    /// of unknown length) and took a connection of their own.
    pub lanes_busy: u64,
    /// Statements that could have shared a connection but usually take
    /// longer than ten times the busy threshold (as learned from their
    /// earlier runs), so each took a connection of its own.
    pub long_statements: u64,
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

/// The `pgstack_queries_total` counters (by outcome) and the duration
/// histogram of one (operation, route, node), resolved once.
struct CallSeries {
    ok: metrics::Counter,
    error: metrics::Counter,
    unknown: metrics::Counter,
    duration: metrics::Histogram,
    /// OpenTelemetry's `db.client.operation.duration` of successful calls.
    operation: metrics::Histogram,
}

/// What a call's series are found by. A static operation name is known by
/// its address: static text never changes, and two addresses with the same
/// text resolve to the same series in the recorder, so the worst case is two
/// entries for one series.
#[derive(Clone, PartialEq, Eq, Hash)]
enum SeriesKey {
    Static(usize, usize, u8, u16),
    Shared(std::sync::Arc<str>, u8, u16),
}

/// Series handles per (operation, route, node), so a call records its
/// figures without building labels and looking them up in the recorder.
pub(crate) struct SeriesCache {
    shards: Box<[std::sync::RwLock<SeriesMap>]>,
}

type SeriesMap = std::collections::HashMap<SeriesKey, CallSeries, KeyHash>;

/// A fast hash for [`SeriesKey`] (a few words, looked up on every call; the
/// keys come from the program, not from the network, so no flooding guard
/// is needed).
#[derive(Clone, Copy, Default)]
struct KeyHash;

impl std::hash::BuildHasher for KeyHash {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// The multiply-rotate hash of rustc's `FxHasher`.
struct KeyHasher(u64);

impl KeyHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        for &byte in chunks.remainder() {
            self.add(u64::from(byte));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
}

/// Entries per shard; past it, series are resolved per call (a program with
/// unbounded operation names).
const SERIES_PER_SHARD: usize = 512;

impl SeriesCache {
    pub(crate) fn new() -> Self {
        SeriesCache {
            shards: (0..8)
                .map(|_| std::sync::RwLock::new(SeriesMap::default()))
                .collect(),
        }
    }

    /// Records one finished call: its outcome (`ok`, `error`, `unknown`) and
    /// its duration, under `op`, `route` and `node` (its index; `None` when
    /// it reached none).
    pub(crate) fn record(
        &self,
        op: &crate::route::Op,
        route: crate::route::Route,
        node: Option<&crate::node::Node>,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        let route_code = match route {
            crate::route::Route::Read => 0,
            crate::route::Route::Write => 1,
            crate::route::Route::ReadAfter(_) => 2,
        };
        let node_code = node.map_or(u16::MAX, |n| {
            u16::try_from(n.inner.index).unwrap_or(u16::MAX - 1)
        });
        let key = match op.static_name() {
            Some(name) => {
                SeriesKey::Static(name.as_ptr() as usize, name.len(), route_code, node_code)
            }
            None => SeriesKey::Shared(op.shared_name(), route_code, node_code),
        };
        let shard = &self.shards
            [(route_code as usize + node_code as usize * 3 + op.name().len()) % self.shards.len()];
        let record = |series: &CallSeries| {
            let seconds = elapsed.as_secs_f64();
            match outcome {
                "ok" => {
                    series.ok.increment(1);
                    series.operation.record(seconds);
                }
                "unknown" => series.unknown.increment(1),
                _ => series.error.increment(1),
            }
            series.duration.record(seconds);
        };
        if let Some(series) = shard.read().unwrap_or_else(|p| p.into_inner()).get(&key) {
            record(series);
            return;
        }
        let node_label = match node {
            Some(node) => metrics::SharedString::from(std::sync::Arc::clone(node.name_arc())),
            None => metrics::SharedString::const_str("none"),
        };
        let route_label = metrics::SharedString::const_str(route.as_str());
        let counter = |outcome: &'static str| {
            metrics::counter!(
                QUERIES_METRIC,
                "op" => op.label(),
                "route" => route_label.clone(),
                "node" => node_label.clone(),
                "outcome" => outcome
            )
        };
        let series = CallSeries {
            ok: counter("ok"),
            error: counter("error"),
            unknown: counter("unknown"),
            duration: metrics::histogram!(
                QUERY_DURATION_METRIC,
                "op" => op.label(),
                "route" => route_label.clone(),
                "node" => node_label.clone()
            ),
            operation: crate::telemetry::histogram(op, node, None),
        };
        record(&series);
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        if map.len() < SERIES_PER_SHARD {
            map.entry(key).or_insert(series);
        }
    }
}
