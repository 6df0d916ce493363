//! Counters, the `pgstack_pool_*` metrics and the in-process snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};
use serde::Serialize;

/// `pgstack_pool_connections{node,state}`: idle / in_use / max.
pub const CONNECTIONS_METRIC: &str = "pgstack_pool_connections";
/// `pgstack_pool_acquire_seconds{node}`: time to get a connection (histogram).
pub const ACQUIRE_SECONDS_METRIC: &str = "pgstack_pool_acquire_seconds";
/// `pgstack_pool_timeouts_total{node}`: checkouts that ran out of time.
pub const TIMEOUTS_METRIC: &str = "pgstack_pool_timeouts_total";
/// `pgstack_pool_connections_created_total{node}`.
pub const CREATED_METRIC: &str = "pgstack_pool_connections_created_total";
/// `pgstack_pool_connections_closed_total{node,reason}`.
pub const CLOSED_METRIC: &str = "pgstack_pool_connections_closed_total";
/// `pgstack_pool_leaks_total{node}`: checkouts held past the leak threshold.
pub const LEAKS_METRIC: &str = "pgstack_pool_leaks_total";
/// `pgstack_pool_rollbacks_total{node}`: connections rolled back on return.
pub const ROLLBACKS_METRIC: &str = "pgstack_pool_rollbacks_total";
/// `pgstack_pool_session_resets_total{node}`: connections whose session was
/// changed (`SET`, temporary objects, `LISTEN`, ...) reset with `DISCARD ALL`
/// on return.
pub const SESSION_RESETS_METRIC: &str = "pgstack_pool_session_resets_total";

/// Why a connection was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CloseReason {
    /// The socket was closed (server restart, network, `pg_terminate_backend`)
    /// or a ping failed.
    Broken,
    /// It reached its (jittered) maximum lifetime.
    Lifetime,
    /// It was idle longer than `pool.idle_timeout` (above `min_idle`).
    Idle,
    /// Its session state was unknown and could not be reset (a statement
    /// still running, a failed rollback, no runtime to run one on).
    Error,
    /// It belonged to an older generation ([`crate::Pool::recycle_all`]).
    Recycled,
    /// The pool was closed or dropped.
    Shutdown,
    /// Its session was changed in a way `DISCARD ALL` does not undo (`LOAD`,
    /// `setseed`, dblink connections), or the reset on return failed.
    Session,
}

impl CloseReason {
    /// All reasons, in label order.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Broken,
        CloseReason::Lifetime,
        CloseReason::Idle,
        CloseReason::Error,
        CloseReason::Recycled,
        CloseReason::Shutdown,
        CloseReason::Session,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Broken => "broken",
            CloseReason::Lifetime => "lifetime",
            CloseReason::Idle => "idle",
            CloseReason::Error => "error",
            CloseReason::Recycled => "recycled",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Session => "session",
        }
    }

    fn index(self) -> usize {
        match self {
            CloseReason::Broken => 0,
            CloseReason::Lifetime => 1,
            CloseReason::Idle => 2,
            CloseReason::Error => 3,
            CloseReason::Recycled => 4,
            CloseReason::Shutdown => 5,
            CloseReason::Session => 6,
        }
    }
}

/// Connections closed so far, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClosedCounts {
    /// Closed socket or failed ping.
    pub broken: u64,
    /// Maximum lifetime reached.
    pub lifetime: u64,
    /// Idle timeout reached.
    pub idle: u64,
    /// Unknown session state that could not be reset.
    pub error: u64,
    /// Older generation.
    pub recycled: u64,
    /// Pool closed.
    pub shutdown: u64,
    /// Session changed beyond what a reset undoes, or the reset failed.
    pub session: u64,
}

/// A point-in-time picture of one pool, for status pages and error messages.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The node (URL without password).
    pub node: String,
    /// Open connections (idle + in use).
    pub size: u32,
    /// Connections waiting in the pool.
    pub idle: u32,
    /// Connections checked out (including ones being rolled back on return).
    pub in_use: u32,
    /// Callers queued for a connection.
    pub waiters: u32,
    /// `pool.max_size`.
    pub max_size: u32,
    /// `pool.min_idle`.
    pub min_idle: u32,
    /// Connections being opened right now.
    pub connecting: u32,
    /// The circuit breaker's state (`closed`, `open`, `half-open`, …), if there is one.
    pub circuit: Option<String>,
    /// The current generation (raised by [`crate::Pool::recycle_all`]).
    pub generation: u64,
    /// Connections opened since the pool was built.
    pub created: u64,
    /// Connections closed since the pool was built, by reason.
    pub closed: ClosedCounts,
    /// Successful checkouts.
    pub acquired: u64,
    /// Checkouts that timed out.
    pub timeouts: u64,
    /// Checkouts refused by the open circuit breaker.
    pub rejected: u64,
    /// Connections rolled back on return because their session state was unknown.
    pub rollbacks: u64,
    /// Connections whose changed session was reset (`DISCARD ALL`) on return.
    pub session_resets: u64,
    /// Checkouts reported as possible leaks.
    pub leaks: u64,
    /// The last connect error, if any.
    pub last_connect_error: Option<String>,
    /// Seconds since the last connect error.
    #[serde(with = "opt_secs")]
    pub last_connect_error_age: Option<Duration>,
}

mod opt_secs {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

/// Atomic counters plus the metric handles, built once per pool so a
/// checkout allocates nothing for labels.
pub(crate) struct Stats {
    pub(crate) created: AtomicU64,
    pub(crate) closed: [AtomicU64; 7],
    pub(crate) acquired: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) rollbacks: AtomicU64,
    pub(crate) session_resets: AtomicU64,
    pub(crate) leaks: AtomicU64,
    /// Open connections.
    pub(crate) live: AtomicU64,
    /// Checked-out connections.
    pub(crate) in_use: AtomicU64,
    m_idle: Gauge,
    m_in_use: Gauge,
    m_acquire: Histogram,
    m_timeouts: Counter,
    m_created: Counter,
    m_closed: [Counter; 7],
    m_leaks: Counter,
    m_rollbacks: Counter,
    m_session_resets: Counter,
    /// The same figures under OpenTelemetry's names.
    otel: crate::otel::PoolSeries,
}

impl Stats {
    pub(crate) fn new(node: &Arc<str>, max_size: u32) -> Stats {
        let node_label = Label::new("node", node.to_string());
        let with_state = |state: &'static str| vec![node_label.clone(), Label::new("state", state)];
        let closed = |reason: CloseReason| {
            metrics::counter!(
                CLOSED_METRIC,
                vec![node_label.clone(), Label::new("reason", reason.as_str())]
            )
        };
        metrics::gauge!(CONNECTIONS_METRIC, with_state("max")).set(f64::from(max_size));
        Stats {
            created: AtomicU64::new(0),
            closed: Default::default(),
            acquired: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
            session_resets: AtomicU64::new(0),
            leaks: AtomicU64::new(0),
            live: AtomicU64::new(0),
            in_use: AtomicU64::new(0),
            m_idle: metrics::gauge!(CONNECTIONS_METRIC, with_state("idle")),
            m_in_use: metrics::gauge!(CONNECTIONS_METRIC, with_state("in_use")),
            m_acquire: metrics::histogram!(ACQUIRE_SECONDS_METRIC, vec![node_label.clone()]),
            m_timeouts: metrics::counter!(TIMEOUTS_METRIC, vec![node_label.clone()]),
            m_created: metrics::counter!(CREATED_METRIC, vec![node_label.clone()]),
            m_closed: CloseReason::ALL.map(closed),
            m_leaks: metrics::counter!(LEAKS_METRIC, vec![node_label.clone()]),
            m_rollbacks: metrics::counter!(ROLLBACKS_METRIC, vec![node_label.clone()]),
            m_session_resets: metrics::counter!(SESSION_RESETS_METRIC, vec![node_label]),
            otel: crate::otel::PoolSeries::new(node, max_size),
        }
    }

    /// Writes the connection-count gauges (idle and in use, under both
    /// names) from the counters. Called when a connection opens or closes,
    /// each housekeeping tick and by [`crate::Pool::status`], not on every
    /// checkout and return: four shared gauges written per checkout and per
    /// return were a quarter of the pool's own cost (a profile of the
    /// checkout benchmark), and a scrape reads them every few seconds.
    pub(crate) fn publish_gauges(&self) {
        let live = self.live.load(Ordering::Relaxed);
        let in_use = self.in_use.load(Ordering::Relaxed);
        self.m_in_use.set(in_use as f64);
        self.m_idle.set(live.saturating_sub(in_use) as f64);
        self.otel.connections(live.saturating_sub(in_use), in_use);
    }

    pub(crate) fn opened(&self) {
        self.created.fetch_add(1, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        self.m_created.increment(1);
        self.publish_gauges();
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.m_closed[reason.index()].increment(1);
        self.publish_gauges();
    }

    pub(crate) fn checked_out(&self, waited: Duration) {
        self.acquired.fetch_add(1, Ordering::Relaxed);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        self.m_acquire.record(waited.as_secs_f64());
        self.otel.waited(waited);
    }

    /// A checkout starts (`true`) or stops (`false`) waiting for a
    /// connection.
    pub(crate) fn pending(&self, started: bool) {
        self.otel.pending(started);
    }

    /// A connection was opened in `took` (TCP, TLS, login).
    pub(crate) fn created_in(&self, took: Duration) {
        self.otel.created_in(took);
    }

    /// A checkout ends after `held`.
    pub(crate) fn used_for(&self, held: Duration) {
        self.otel.used_for(held);
    }

    pub(crate) fn returned(&self) {
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self, waited: Duration) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
        self.m_timeouts.increment(1);
        self.m_acquire.record(waited.as_secs_f64());
        self.otel.timed_out(waited);
    }

    pub(crate) fn leaked(&self) {
        self.leaks.fetch_add(1, Ordering::Relaxed);
        self.m_leaks.increment(1);
    }

    pub(crate) fn rolled_back(&self) {
        self.rollbacks.fetch_add(1, Ordering::Relaxed);
        self.m_rollbacks.increment(1);
    }

    pub(crate) fn session_reset(&self) {
        self.session_resets.fetch_add(1, Ordering::Relaxed);
        self.m_session_resets.increment(1);
    }

    pub(crate) fn closed_counts(&self) -> ClosedCounts {
        let get = |r: CloseReason| self.closed[r.index()].load(Ordering::Relaxed);
        ClosedCounts {
            broken: get(CloseReason::Broken),
            lifetime: get(CloseReason::Lifetime),
            idle: get(CloseReason::Idle),
            error: get(CloseReason::Error),
            recycled: get(CloseReason::Recycled),
            shutdown: get(CloseReason::Shutdown),
            session: get(CloseReason::Session),
        }
    }
}
