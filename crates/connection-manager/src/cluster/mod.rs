//! The cluster: nodes, routing, the call API, retries, re-discovery,
//! replication figures, metrics and shutdown. One file per seam:
//! `builder` (construction), `retry` (what may be repeated), `statement`
//! (statement helpers and shared connections), `closure` (closures and raw
//! checkouts), `transaction`, `discovery` (roles, failover, probes of failed
//! nodes) and `replication` (replay positions and lag).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::SharedString;
use pgstack_config::DatabaseConfig;
use pgstack_pool::{
    CommitOutcome, PoolBuilder, PooledConnection, TransactionId, TransactionOptions,
};
use pgstack_resilience::{Classify, ErrorClass, Outcome, RetryPolicy};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage};
use tracing::Instrument;

use crate::conn::{self, Connection, Got, Transaction, Want, run_prepared, run_unnamed};
use crate::error::Error;
use crate::lanes::{Lane, Lanes, Pick, Reserved};
use crate::node::{Node, Role};
use crate::observe::{Observation, ObserveError, observe, observe_replica};
use crate::query::{Queryable, RowStream};
use crate::record::{self, Effect, Enclosing, Record};
use crate::route::{Op, Route, WalPosition};
use crate::sqlcheck;
use crate::statements;
use crate::stats::{ClusterMetrics, Counters, FAILOVERS_METRIC, NodeMetrics, SLOW_QUERIES_METRIC};

mod builder;
mod closure;
mod copy;
mod discovery;
mod listen;
mod replication;
mod resolve;
mod retry;
mod statement;
mod transaction;

pub use self::builder::ClusterBuilder;
pub use self::copy::{BinaryCopyIn, CopyIn, CopyOut};
use self::discovery::*;
pub use self::listen::{
    LISTENER_DROPPED_METRIC, LISTENER_RECONNECTS_METRIC, Listener, ListenerEvent, MAX_CHANNEL_LEN,
    Notification,
};
use self::retry::*;

/// Operation name used for the cluster's own checks.
pub(super) const ROLE_CHECK_OP: &str = "pgstack-role-check";

/// The settings the hot path reads, copied out of the configuration.
#[derive(Clone, Debug)]
pub(super) struct Settings {
    read_replicas: bool,
    max_lag: Duration,
    slow_threshold: Option<Duration>,
    log_parameters: bool,
    prepared: bool,
    /// The bound of one round trip: `query.statement_timeout` plus half the
    /// connect timeout (none without a statement timeout).
    round_trip: Option<Duration>,
    check_timeout: Duration,
    /// How long a `ReadAfter` read waits for a replica to catch up.
    read_after_wait: Duration,
    /// `telemetry.query_text`: the SQL on the span as `db.query.text`.
    query_text: bool,
}

pub(crate) struct ClusterInner {
    nodes: Vec<Node>,
    primary: AtomicUsize,
    next_read: AtomicUsize,
    settings: Settings,
    retry: RetryPolicy,
    pub(crate) counters: Counters,
    closing: AtomicBool,
    in_flight: AtomicU64,
    /// Background work that may hold connections (probes of failed nodes,
    /// re-discovery, the replication probe), running now.
    background: AtomicU64,
    drained: Notify,
    discovery: tokio::sync::Mutex<()>,
    discovery_epoch: AtomicU64,
    /// Flipped by [`Cluster::close`]; each listener task holds a receiver.
    listeners: tokio::sync::watch::Sender<bool>,
}

/// A PostgreSQL cluster: one primary and any number of replicas, each node
/// with its own pool and circuit breaker.
///
/// Cheap to clone; clones share everything. See the [crate docs](crate) for
/// an example and `docs/connection.md` for the rules.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.inner.nodes)
            .field("primary", &self.primary().name())
            .field("closing", &self.inner.closing.load(Ordering::Relaxed))
            .finish()
    }
}

/// What [`Cluster::close`] found.
#[derive(Clone, Debug, serde::Serialize)]
#[non_exhaustive]
pub struct CloseReport {
    /// Calls still running when the deadline passed (cut off).
    pub cut_off: u64,
    /// Connections still checked out of the pools when they were closed.
    pub connections_in_use: u32,
}

/// The guard of one call: counts it in flight for shutdown.
pub(super) struct Work<'a>(&'a ClusterInner);

impl Drop for Work<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.closing.load(Ordering::Acquire)
        {
            self.0.drained.notify_waiters();
        }
    }
}

/// The guard of one round of background work: [`Cluster::close`] waits for
/// it, and no round starts once the cluster is closing.
pub(super) struct Background(Arc<ClusterInner>);

impl ClusterInner {
    /// Counts a round of background work, unless the cluster is closing.
    /// Counted first, checked second (as [`Cluster::begin`] does), so `close`
    /// cannot miss a round that starts as it looks.
    pub(super) fn background(self: &Arc<Self>) -> Option<Background> {
        self.background.fetch_add(1, Ordering::AcqRel);
        let round = Background(Arc::clone(self));
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        Some(round)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.0.background.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.closing.load(Ordering::Acquire)
        {
            self.0.drained.notify_waiters();
        }
    }
}

impl Cluster {
    /// A builder for a cluster from `config` (`primary`, `replicas` and every
    /// other section).
    pub fn builder(config: &DatabaseConfig) -> ClusterBuilder {
        ClusterBuilder {
            config: config.clone(),
            lanes: None,
            replication_probe: None,
            busy_after: builder::DEFAULT_BUSY_AFTER,
        }
    }

    /// A cluster from `config` with the default options.
    ///
    /// # Errors
    /// As [`ClusterBuilder::build`].
    pub async fn connect(config: &DatabaseConfig) -> Result<Cluster, Error> {
        Cluster::builder(config).build().await
    }

    /// Every node: the configured primary first, then the replicas.
    pub fn nodes(&self) -> &[Node] {
        &self.inner.nodes
    }

    /// The node named `name` (`primary`, `replica-1`, ...).
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.inner.nodes.iter().find(|n| n.name() == name)
    }

    /// The node writes go to now (the configured primary unless a failover
    /// was found).
    pub fn primary(&self) -> &Node {
        let index = self.inner.primary.load(Ordering::Acquire);
        match self.inner.nodes.get(index) {
            Some(node) => node,
            None => &self.inner.nodes[0],
        }
    }

    /// Whether [`Cluster::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.inner.closing.load(Ordering::Acquire)
    }

    /// Calls running now (statements, closures, transactions, checkouts
    /// being made), retries included in their call. [`Cluster::close`]
    /// waits for this to reach zero.
    pub fn in_flight(&self) -> u64 {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// The node a call with `route` would go to now.
    pub fn route(&self, route: Route) -> &Node {
        let primary = self.primary();
        let inner = &self.inner;
        let after = match route {
            Route::Write => return primary,
            Route::Read => None,
            Route::ReadAfter(position) => Some(position),
        };
        let count = inner.nodes.len();
        if !inner.settings.read_replicas || count < 2 {
            return primary;
        }
        let start = inner.next_read.fetch_add(1, Ordering::Relaxed);
        for k in 0..count {
            let node = &inner.nodes[(start + k) % count];
            if node.inner.index != primary.inner.index
                && node.readable(inner.settings.max_lag, after)
            {
                return node;
            }
        }
        primary
    }

    /// The node for a call with `route`, as [`Cluster::route`]; but a
    /// `ReadAfter(position)` read that only the primary can take now waits,
    /// up to `query.read_after_wait`, for a replica to replay `position`
    /// (asking each replica that is otherwise readable every few
    /// milliseconds), so reads after a write reach the replicas too.
    pub(super) async fn route_waiting(&self, route: Route) -> Node {
        let node = self.route(route).clone();
        let Route::ReadAfter(position) = route else {
            return node;
        };
        let wait = self.inner.settings.read_after_wait;
        let primary = self.primary().inner.index;
        if wait.is_zero() || node.inner.index != primary {
            return node;
        }
        let max_lag = self.inner.settings.max_lag;
        let mut candidates: Vec<Node> = Vec::new();
        for n in self.nodes() {
            if n.inner.index != primary && n.readable(max_lag, None) {
                candidates.push(n.clone());
            }
        }
        if candidates.is_empty() || !self.inner.settings.read_replicas {
            return node;
        }
        match tokio::time::timeout(wait, replayed_by_one_of(candidates, position)).await {
            Ok(replica) => replica,
            Err(_) => node,
        }
    }

    pub(super) fn begin(&self, op: &Op) -> Result<Work<'_>, Error> {
        let inner = &*self.inner;
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let work = Work(inner);
        if inner.closing.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown {
                operation: op.name().to_owned(),
            });
        }
        Ok(work)
    }

    /// The cluster's figures: calls, failures, retries, slow queries,
    /// latency percentiles and each node's state.
    pub fn metrics(&self) -> ClusterMetrics {
        let c = &self.inner.counters;
        let primary = self.primary().inner.index;
        let max_lag = self.inner.settings.max_lag;
        ClusterMetrics {
            queries: c.calls.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            unknown_outcomes: c.unknown_outcomes.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            slow_queries: c.slow.load(Ordering::Relaxed),
            primary_changes: c.primary_changes.load(Ordering::Relaxed),
            lanes_busy: c.lanes_busy.load(Ordering::Relaxed),
            long_statements: c.long_statements.load(Ordering::Relaxed),
            commit_resolutions: c.commit_resolutions(),
            latency_p50: c.latency.quantile(0.50),
            latency_p99: c.latency.quantile(0.99),
            nodes: self
                .nodes()
                .iter()
                .map(|node| NodeMetrics {
                    name: node.name().to_owned(),
                    configured_role: node.configured_role(),
                    observed_role: node.observed_role(),
                    is_primary: node.inner.index == primary,
                    breaker: node.circuit_breaker().map(|b| b.state().to_string()),
                    routable: node.inner.index == primary || node.readable(max_lag, None),
                    queries: node.inner.queries.load(Ordering::Relaxed),
                    failures: node.inner.failures.load(Ordering::Relaxed),
                    pool: node.pool().status(),
                })
                .collect(),
        }
    }

    /// Replaces every connection of every node (after a migration, a
    /// failover or a credentials change), shared ones included.
    pub fn recycle_all(&self) {
        for node in self.nodes() {
            node.retire_lanes();
            node.pool().recycle_all();
        }
    }

    /// Drops every cached prepared statement ("cached plan must not change
    /// result type" after a migration).
    pub fn clear_statement_caches(&self) {
        for node in self.nodes() {
            node.retire_lanes();
            node.pool().clear_statement_caches();
        }
    }

    /// Stops taking work (new calls get [`Error::ShuttingDown`]), waits up to
    /// `deadline` for calls in flight, then closes every pool.
    pub async fn close(&self, deadline: Duration) -> CloseReport {
        let inner = &self.inner;
        inner.closing.store(true, Ordering::Release);
        // Listeners end now: they are not calls whose work is waited for,
        // only their tasks are (below).
        inner.listeners.send_replace(true);
        // Calls in flight, then the background work that holds connections
        // of its own (a probe of a failed node in the middle of its role
        // check): no new round of it starts now.
        let wait = async {
            loop {
                let drained = inner.drained.notified();
                if inner.in_flight.load(Ordering::Acquire) == 0
                    && inner.background.load(Ordering::Acquire) == 0
                {
                    break;
                }
                drained.await;
            }
            // Listener tasks end on the signal above; each holds a receiver
            // until its connection is closed, so none outlives `close`.
            inner.listeners.closed().await;
        };
        let until = tokio::time::Instant::now() + deadline;
        let _ = tokio::time::timeout_at(until, wait).await;
        let cut_off = inner.in_flight.load(Ordering::Acquire);
        // Shared connections go back first; then connections being rolled
        // back or reset on their way back to the pool get the rest of the
        // deadline, so they are not counted as still in use.
        let nodes = self.nodes();
        for node in nodes {
            node.retire_lanes();
        }
        for node in nodes {
            let _ = tokio::time::timeout_at(until, node.pool().returns_settled()).await;
        }
        let mut connections_in_use = 0;
        for node in nodes {
            connections_in_use += node.pool().close();
        }
        if cut_off > 0 {
            tracing::warn!(cut_off, "cluster closed with calls still running");
        } else {
            tracing::info!("cluster closed");
        }
        CloseReport {
            cut_off,
            connections_in_use,
        }
    }
}

/// Names the node and the attempt on the call's span.
pub(super) fn record_attempt(node: &Node, attempt: u32) {
    let span = tracing::Span::current();
    span.record("node", node.name());
    span.record("attempt", attempt);
    tracing::trace!(node = node.name(), attempt, "attempt");
}

pub(super) fn node_label(node: &Node) -> SharedString {
    SharedString::from(Arc::clone(node.name_arc()))
}

/// How often a `ReadAfter` read waiting for a replica asks again.
const READ_AFTER_POLL: Duration = Duration::from_millis(5);

/// The first of `candidates` seen to have replayed `position`, asking each
/// every [`READ_AFTER_POLL`] (forever: the caller bounds it).
async fn replayed_by_one_of(candidates: Vec<Node>, position: WalPosition) -> Node {
    loop {
        for candidate in candidates.iter() {
            if let Some(replayed) = replay_position_of(candidate).await {
                candidate.set_replay_position(Some(replayed));
                if replayed >= position {
                    return candidate.clone();
                }
            }
        }
        tokio::time::sleep(READ_AFTER_POLL).await;
    }
}

/// `pg_last_wal_replay_lsn()` of `node` (`None`: no answer).
async fn replay_position_of(node: &Node) -> Option<WalPosition> {
    let conn = node.pool().get("pgstack-read-after").await.ok()?;
    let messages = conn
        .simple_query("SELECT pg_last_wal_replay_lsn()::text")
        .await
        .ok()?;
    first_text(&messages)?.parse().ok()
}

pub(super) fn first_text(messages: &[SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}
