//! The cluster: nodes, routing, the call API, retries, re-discovery,
//! replication figures, metrics and shutdown.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::SharedString;
use pgstack_config::DatabaseConfig;
use pgstack_pool::{PoolBuilder, PooledConnection, TransactionOptions};
use pgstack_resilience::{Classify, ErrorClass, Outcome, RetryPolicy};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage};
use tracing::Instrument;

use crate::conn::{self, Connection, Got, Transaction, Want, run_statement};
use crate::error::{Error, is_rejected_before_effect, is_transient_sqlstate};
use crate::node::{Lane, Node, Role};
use crate::route::{Op, Route, WalPosition};
use crate::sqlcheck;
use crate::stats::{
    ClusterMetrics, Counters, FAILOVERS_METRIC, NodeMetrics, QUERIES_METRIC, QUERY_DURATION_METRIC,
    SLOW_QUERIES_METRIC,
};

/// Operation name used for the cluster's own checks.
const ROLE_CHECK_OP: &str = "pgstack-role-check";
/// The query that tells a writable primary from a standby or read-only server.
const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')";

/// The settings the hot path reads, copied out of the configuration.
#[derive(Clone, Debug)]
struct Settings {
    read_replicas: bool,
    max_lag: Duration,
    slow_threshold: Option<Duration>,
    log_parameters: bool,
    prepared: bool,
    attempt_timeout: Option<Duration>,
    check_timeout: Duration,
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
    drained: Notify,
    discovery: tokio::sync::Mutex<()>,
    discovery_epoch: AtomicU64,
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

/// Builds a [`Cluster`]; start from [`Cluster::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct ClusterBuilder {
    config: DatabaseConfig,
    lanes: Option<usize>,
    replication_probe: Option<Duration>,
}

impl ClusterBuilder {
    /// Shared (pipelined) connections per node for autocommit statements;
    /// 0 gives every statement a connection of its own. Default: a quarter
    /// of `pool.max_size`, between 1 and 4 (none when `max_size` is below 3).
    pub fn shared_connections(mut self, per_node: usize) -> Self {
        self.lanes = Some(per_node);
        self
    }

    /// Measures each replica's replay position and lag every `interval` in
    /// the background (see [`Cluster::refresh_replication`]). Off by default:
    /// the health monitor feeds the same inputs when it runs.
    pub fn replication_probe(mut self, interval: Duration) -> Self {
        self.replication_probe = Some(interval);
        self
    }

    fn default_lanes(max_size: u32) -> usize {
        if max_size < 3 {
            0
        } else {
            (max_size as usize / 4).clamp(1, 4)
        }
    }

    /// Builds the pools (without waiting for connections), finds the
    /// primary with `pg_is_in_recovery()` among the configured nodes, and
    /// starts the background work.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings, [`Error::NoPrimary`] when no
    /// configured node accepts writes.
    pub async fn build(self) -> Result<Cluster, Error> {
        let config = &self.config;
        let retry =
            RetryPolicy::from_settings(&config.retry).map_err(|e| Error::Config(e.to_string()))?;
        let lanes = self
            .lanes
            .unwrap_or_else(|| Self::default_lanes(config.pool.max_size));
        if lanes >= config.pool.max_size as usize {
            return Err(Error::Config(format!(
                "shared_connections = {lanes} must be below pool.max_size = {} so that \
                 transactions can still get a connection",
                config.pool.max_size
            )));
        }
        let mut nodes = Vec::with_capacity(1 + config.replicas.len());
        let settings = std::iter::once((&config.primary, Role::Primary))
            .chain(config.replicas.iter().map(|r| (r, Role::Replica)));
        for (index, (node_settings, role)) in settings.enumerate() {
            let name: Arc<str> = match role {
                Role::Primary => "primary".into(),
                Role::Replica => format!("replica-{index}").into(),
            };
            let pool = PoolBuilder::from_config(config, node_settings)
                .name(name.to_string())
                .build_lazy()
                .map_err(|source| Error::Pool {
                    node: Arc::clone(&name),
                    source: Box::new(source),
                })?;
            nodes.push(Node::new(index, name, role, pool, lanes));
        }
        let slow_threshold = config
            .features
            .slow_query_log
            .then_some(config.query.slow_query_threshold);
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                nodes,
                primary: AtomicUsize::new(0),
                next_read: AtomicUsize::new(0),
                settings: Settings {
                    read_replicas: config.features.read_replicas,
                    max_lag: config.health.max_replica_lag,
                    slow_threshold,
                    log_parameters: config.query.log_parameters,
                    prepared: config.query.prepared_statements,
                    attempt_timeout: config
                        .query
                        .statement_timeout
                        .map(|t| t + config.pool.connect_timeout),
                    check_timeout: config.pool.connect_timeout,
                },
                retry,
                counters: Counters::new(),
                closing: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                drained: Notify::new(),
                discovery: tokio::sync::Mutex::new(()),
                discovery_epoch: AtomicU64::new(0),
            }),
        };
        if let Err(e) = cluster.discover("pgstack-connect").await {
            for node in cluster.nodes() {
                node.pool().close();
            }
            return Err(e);
        }
        if let Some(interval) = self.replication_probe {
            cluster.spawn_replication_probe(interval);
        }
        Ok(cluster)
    }
}

/// The guard of one call: counts it in flight for shutdown.
struct Work<'a>(&'a ClusterInner);

impl Drop for Work<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.closing.load(Ordering::Acquire)
        {
            self.0.drained.notify_waiters();
        }
    }
}

/// Retires a lane when a call on it is dropped mid-flight: the statement may
/// still be running and would hold up everything pipelined behind it.
struct LaneGuard<'a> {
    node: &'a Node,
    lane: &'a Arc<Lane>,
    armed: bool,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.node.inner.lanes.retire(self.lane);
        }
    }
}

/// How a call's errors are retried.
#[derive(Clone, Copy, Debug)]
struct Rules {
    /// The work may write outside a transaction.
    write: bool,
    idempotent: bool,
}

impl Classify<Error> for Rules {
    fn classify(&self, error: &Error) -> ErrorClass {
        let repeatable_if_sent = !self.write || self.idempotent;
        match error {
            Error::PoolTimeout { .. } | Error::CircuitOpen { .. } | Error::Unavailable { .. } => {
                ErrorClass::Transient
            }
            Error::Connection { sent: false, .. } => ErrorClass::Transient,
            Error::Connection { sent: true, .. } | Error::Timeout { .. } => {
                if repeatable_if_sent {
                    ErrorClass::Transient
                } else {
                    ErrorClass::TransientNotRepeatable
                }
            }
            Error::Database(db) if is_transient_sqlstate(&db.code) => {
                if repeatable_if_sent || is_rejected_before_effect(&db.code) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::TransientNotRepeatable
                }
            }
            Error::CommitOutcomeUnknown { .. } => ErrorClass::TransientNotRepeatable,
            _ => ErrorClass::Permanent,
        }
    }

    fn breaker_outcome(&self, error: &Error) -> Outcome {
        if error.is_node_failure() {
            Outcome::Failure
        } else {
            Outcome::Ignored
        }
    }
}

/// [`Rules`] for one call, with the call's retry deadline: a node whose
/// breaker is open and will not let a probe through before that deadline
/// ends the retries at once (waiting cannot help, so the call fails in
/// microseconds, naming the node and the next probe); an open breaker that
/// probes before the deadline is waited for like any transient error (a
/// restarting primary).
struct CallRules {
    rules: Rules,
    give_up_at: Option<Instant>,
}

impl Classify<Error> for CallRules {
    fn classify(&self, error: &Error) -> ErrorClass {
        if error.is_forced_open() {
            return ErrorClass::Permanent;
        }
        if let Error::CircuitOpen {
            probe_in: Some(wait),
            ..
        } = error
            && self
                .give_up_at
                .is_some_and(|at| Instant::now() + *wait >= at)
        {
            return ErrorClass::Permanent;
        }
        self.rules.classify(error)
    }

    fn breaker_outcome(&self, error: &Error) -> Outcome {
        self.rules.breaker_outcome(error)
    }

    /// Nothing reached the node: waiting for it spends no attempt and no
    /// retry budget, only the call's deadline. The background probe
    /// half-opens the breaker as soon as the node accepts logins again.
    fn unavailable_wait(&self, error: &Error) -> Option<Duration> {
        match error {
            Error::CircuitOpen { probe_in, .. } => Some(
                probe_in
                    .map_or(UNAVAILABLE_POLL, |p| p.min(UNAVAILABLE_POLL))
                    .max(Duration::from_millis(1)),
            ),
            Error::Unavailable { .. } => Some(UNAVAILABLE_POLL),
            // "the database system is starting up": the login was refused.
            Error::Database(db) if db.code == "57P03" => Some(STARTING_UP_POLL),
            _ => None,
        }
    }
}

/// What one attempt reports besides its value: the node it ran on.
type Attempt<T> = Result<(T, Node), (Error, Option<Node>)>;

impl Cluster {
    /// A builder for a cluster from `config` (`primary`, `replicas` and every
    /// other section).
    pub fn builder(config: &DatabaseConfig) -> ClusterBuilder {
        ClusterBuilder {
            config: config.clone(),
            lanes: None,
            replication_probe: None,
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

    fn begin(&self, op: &Op) -> Result<Work<'_>, Error> {
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

    // ----- statements -------------------------------------------------

    /// Runs a statement on the node `route` picks and returns its rows.
    ///
    /// Outside a transaction, statements share a few pipelined connections
    /// per node; transaction control, `SET` and other session statements are
    /// refused ([`Error::Usage`]). Retried as `docs/connection.md` says: reads
    /// on any transient error, writes only when nothing was sent or the
    /// operation is [`Op::idempotent`].
    ///
    /// # Errors
    /// Any [`Error`]; a write whose connection was lost in flight gives
    /// [`Error::CommitOutcomeUnknown`].
    pub async fn query(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let got = self
            .statement(op.into(), route, sql, params, Want::Rows)
            .await?;
        Ok(conn::rows(got.0))
    }

    /// Runs a statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`Cluster::query`], and [`Error::UnexpectedRows`].
    pub async fn query_one(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), route, sql, params, Want::Rows)
            .await?;
        conn::one(conn::rows(got), &node, op.name())
    }

    /// Runs a statement that returns at most one row.
    ///
    /// # Errors
    /// As [`Cluster::query`], and [`Error::UnexpectedRows`].
    pub async fn query_opt(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), route, sql, params, Want::Rows)
            .await?;
        conn::opt(conn::rows(got), &node, op.name())
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`Cluster::query`].
    pub async fn execute(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let got = self
            .statement(op.into(), route, sql, params, Want::Count)
            .await?;
        Ok(conn::count(got.0))
    }

    /// Runs a write on the primary and hands back, with the number of rows
    /// affected, a WAL position at or after its commit: give it to a later
    /// read as [`Route::ReadAfter`] to read your own write.
    ///
    /// # Errors
    /// As [`Cluster::execute`].
    pub async fn execute_tracked(
        &self,
        op: impl Into<Op>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(u64, WalPosition), Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), Route::Write, sql, params, Want::Count)
            .await?;
        let position = self.position_on(&node, &op).await?;
        Ok((conn::count(got), position))
    }

    /// The primary's current WAL position: every write acknowledged before
    /// this call is at or before it. Give it to [`Route::ReadAfter`] after a
    /// transaction or a closure that wrote.
    ///
    /// # Errors
    /// As [`Cluster::query`].
    pub async fn wal_position(&self, op: impl Into<Op>) -> Result<WalPosition, Error> {
        let op = op.into();
        let node = self.primary().clone();
        self.position_on(&node, &op).await
    }

    async fn position_on(&self, node: &Node, op: &Op) -> Result<WalPosition, Error> {
        let conn = self.checkout(node, op).await?;
        // The insert position: with `synchronous_commit = off` the commit
        // record may not be written yet, but it is inserted.
        let rows = conn
            .simple_query("SELECT pg_current_wal_insert_lsn()::text")
            .await
            .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), true))?;
        first_text(&rows)
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Error::Usage {
                operation: op.name().to_owned(),
                problem: format!(
                    "{} returned no WAL position (is it a standby?)",
                    node.name()
                ),
            })
    }

    async fn statement(
        &self,
        op: Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
    ) -> Result<(Got, Node), Error> {
        let span = tracing::debug_span!(
            "pgstack.statement",
            op = op.name(),
            route = route.as_str(),
            node = tracing::field::Empty,
            attempt = tracing::field::Empty
        );
        async {
            let started = Instant::now();
            let result = match sqlcheck::refusal(sql) {
                Some(problem) => Err((
                    Error::Usage {
                        operation: op.name().to_owned(),
                        problem: problem.to_owned(),
                    },
                    None,
                )),
                None => {
                    let rules = Rules {
                        write: !route.is_read(),
                        idempotent: op.is_idempotent(),
                    };
                    self.with_retries(&op, rules, |attempt| {
                        self.statement_attempt(&op, route, sql, params, want, attempt)
                    })
                    .await
                }
            };
            self.finish(&op, route, started, result)
        }
        .instrument(span)
        .await
    }

    /// Runs `attempt` under the retry policy, counting retries.
    async fn with_retries<T, F, Fut>(&self, op: &Op, rules: Rules, mut attempt: F) -> Attempt<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let _work = match self.begin(op) {
            Ok(work) => work,
            Err(e) => return Err((e, None)),
        };
        let last_node = std::sync::Mutex::new(None::<Node>);
        let deadline = op
            .retry_deadline_override()
            .or_else(|| self.inner.retry.deadline());
        let rules = CallRules {
            rules,
            give_up_at: deadline.map(|d| Instant::now() + d),
        };
        let result = self
            .inner
            .retry
            .run_within(deadline, op.name(), &rules, |n| {
                if n > 1 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                let fut = attempt(n);
                let last_node = &last_node;
                async move {
                    match fut.await {
                        Ok(ok) => Ok(ok),
                        Err((error, node)) => {
                            if let Some(node) = node {
                                *last_node.lock().unwrap_or_else(|p| p.into_inner()) = Some(node);
                            }
                            Err(error)
                        }
                    }
                }
            })
            .await;
        result.map_err(|e| {
            let node = last_node.lock().unwrap_or_else(|p| p.into_inner()).take();
            (e.into_inner(), node)
        })
    }

    async fn statement_attempt(
        &self,
        op: &Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        attempt: u32,
    ) -> Attempt<Got> {
        let node = self.route(route).clone();
        record_attempt(&node, attempt);
        let started = Instant::now();
        let prepared = self.inner.settings.prepared;
        let result = if node.inner.lanes.enabled() {
            let queued_failure = || Error::Unavailable {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                reason: "opening a shared connection just failed; the node is being probed"
                    .to_owned(),
            };
            match node
                .inner
                .lanes
                .get(|| self.open_lane(&node), queued_failure)
                .await
            {
                Err(e) => Err(e),
                Ok(lane) => {
                    let mut guard = LaneGuard {
                        node: &node,
                        lane: &lane,
                        armed: true,
                    };
                    let run = run_statement!(
                        &lane.conn,
                        prepared,
                        sql,
                        params,
                        want,
                        node.name_arc(),
                        op.name()
                    );
                    let result = self.timed(&node, op, run).await;
                    guard.armed = false;
                    if matches!(
                        result,
                        Err(Error::Connection { .. } | Error::Timeout { .. })
                    ) {
                        node.inner.lanes.retire(&lane);
                    }
                    result
                }
            }
        } else {
            match self.checkout(&node, op).await {
                Err(e) => Err(e),
                Ok(conn) => {
                    let run = run_statement!(
                        &conn,
                        prepared,
                        sql,
                        params,
                        want,
                        node.name_arc(),
                        op.name()
                    );
                    self.timed(&node, op, run).await
                }
            }
        };
        self.slow_check(op, route, &node, started, sql, params);
        match result {
            Ok(got) => Ok((got, node)),
            Err(error) => {
                let error = self.after_failure(&node, op, route, error, true).await;
                Err((error, Some(node)))
            }
        }
    }

    /// Bounds one attempt by `statement_timeout + connect_timeout`.
    async fn timed<T>(
        &self,
        node: &Node,
        op: &Op,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match self.inner.settings.attempt_timeout {
            None => work.await,
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    after: limit,
                }),
            },
        }
    }

    /// What a failed attempt means for routing, and the error the caller
    /// sees: a write whose connection broke in flight has an unknown outcome.
    async fn after_failure(
        &self,
        node: &Node,
        op: &Op,
        route: Route,
        error: Error,
        read_only_means_failover: bool,
    ) -> Error {
        if error.is_node_failure() {
            self.node_failed(node);
        }
        if read_only_means_failover
            && error.code() == Some("25006")
            && node.inner.index == self.primary().inner.index
        {
            tracing::warn!(
                node = node.name(),
                op = op.name(),
                "the primary refused a write as read-only; looking for the new primary"
            );
            node.set_observed_role(Some(Role::Replica));
            if let Err(e) = self.rediscover().await {
                tracing::warn!(error = %e, "re-discovery found no writable primary");
            }
        }
        match error {
            Error::Connection {
                node,
                operation,
                sent: true,
                source,
            } if route == Route::Write && !op.is_idempotent() => Error::CommitOutcomeUnknown {
                node,
                operation,
                source: Some(source),
            },
            other => other,
        }
    }

    /// A call saw `node` fail: replicas get no reads until a background
    /// probe sees the node answer again (the primary keeps its writes; the
    /// probe also looks for a new primary if it stays down).
    fn node_failed(&self, node: &Node) {
        node.retire_lanes();
        if node.inner.suspect.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            node = node.name(),
            "node failed a call; probing it in the background"
        );
        let weak = Arc::downgrade(&self.inner);
        let node = node.clone();
        tokio::spawn(probe_until_back(weak, node));
    }

    fn slow_check(
        &self,
        op: &Op,
        route: Route,
        node: &Node,
        started: Instant,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) {
        let Some(threshold) = self.inner.settings.slow_threshold else {
            return;
        };
        let elapsed = started.elapsed();
        if elapsed < threshold {
            return;
        }
        self.inner.counters.slow.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(SLOW_QUERIES_METRIC, "op" => op.label(), "node" => node_label(node))
            .increment(1);
        let statement: String = sql.chars().take(200).collect();
        if self.inner.settings.log_parameters {
            tracing::warn!(
                op = op.name(),
                node = node.name(),
                route = route.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                statement,
                parameters = ?params,
                "slow query"
            );
        } else {
            tracing::warn!(
                op = op.name(),
                node = node.name(),
                route = route.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                statement,
                "slow query"
            );
        }
    }

    /// Records a finished call in the counters and the `pgstack_` series.
    fn finish<T>(
        &self,
        op: &Op,
        route: Route,
        started: Instant,
        result: Attempt<T>,
    ) -> Result<(T, Node), Error> {
        let elapsed = started.elapsed();
        let counters = &self.inner.counters;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.latency.record(elapsed);
        let (outcome, node) = match &result {
            Ok((_, node)) => ("ok", Some(node)),
            Err((e, node)) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                if e.is_commit_outcome_unknown() {
                    counters.unknown_outcomes.fetch_add(1, Ordering::Relaxed);
                    ("unknown", node.as_ref())
                } else {
                    ("error", node.as_ref())
                }
            }
        };
        let node_label = match node {
            Some(node) => {
                node.inner.queries.fetch_add(1, Ordering::Relaxed);
                if outcome != "ok" {
                    node.inner.failures.fetch_add(1, Ordering::Relaxed);
                }
                node_label(node)
            }
            None => SharedString::const_str("none"),
        };
        let route_label = SharedString::const_str(route.as_str());
        metrics::counter!(
            QUERIES_METRIC,
            "op" => op.label(),
            "route" => route_label.clone(),
            "node" => node_label.clone(),
            "outcome" => outcome
        )
        .increment(1);
        metrics::histogram!(
            QUERY_DURATION_METRIC,
            "op" => op.label(),
            "route" => route_label,
            "node" => node_label
        )
        .record(elapsed.as_secs_f64());
        result.map_err(|(e, _)| e)
    }

    // ----- connections ------------------------------------------------

    /// Checks a connection of its own out of `node`'s pool.
    async fn checkout(&self, node: &Node, op: &Op) -> Result<PooledConnection, Error> {
        match node.pool().get(op.cow()).await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                let error = Error::from_pool(e, node.name_arc(), op.name());
                if error.is_node_failure() {
                    self.node_failed(node);
                }
                Err(error)
            }
        }
    }

    /// Opens a shared connection for `node`, checking its role.
    async fn open_lane(&self, node: &Node) -> Result<PooledConnection, Error> {
        let op = Op::from("pgstack-shared-connection");
        let check = async {
            let conn = node
                .pool()
                .get("pgstack-shared-connection")
                .await
                .map_err(|e| Error::from_pool(e, node.name_arc(), op.name()))?;
            let role = role_of(&conn)
                .await
                .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), false))?;
            Ok::<_, Error>((conn, role))
        };
        // Bounded by the connect timeout: a node that is down must not hold
        // a statement for the whole acquire timeout.
        let limit = self.inner.settings.check_timeout;
        let result = match tokio::time::timeout(limit + limit, check).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                after: limit + limit,
            }),
        };
        match result {
            Ok((conn, role)) => {
                self.observed(node, role);
                Ok(conn)
            }
            Err(error) => {
                if error.is_node_failure() {
                    self.node_failed(node);
                }
                // Nothing of the caller's was sent.
                Err(match error {
                    Error::Timeout {
                        node,
                        operation,
                        after,
                    } => Error::Unavailable {
                        node,
                        operation,
                        reason: format!("no connection with a role check within {after:?}"),
                    },
                    Error::Connection {
                        node,
                        operation,
                        source,
                        ..
                    } => Error::Connection {
                        node,
                        operation,
                        sent: false,
                        source,
                    },
                    other => other,
                })
            }
        }
    }

    /// Records a role seen on `node`; a primary seen in recovery triggers
    /// re-discovery in the background.
    fn observed(&self, node: &Node, role: Role) {
        let before = node.observed_role();
        node.set_observed_role(Some(role));
        let is_primary = node.inner.index == self.primary().inner.index;
        if is_primary && role == Role::Replica && before != Some(Role::Replica) {
            tracing::warn!(
                node = node.name(),
                "the primary is in recovery or read-only"
            );
            let cluster = self.clone();
            tokio::spawn(async move {
                if let Err(e) = cluster.rediscover().await {
                    tracing::warn!(error = %e, "re-discovery found no writable primary");
                }
            });
        }
    }

    /// A connection of its own on the node `route` picks (an escape hatch:
    /// COPY, cursors, session settings). Only the checkout is retried.
    ///
    /// # Errors
    /// [`Error::PoolTimeout`], [`Error::CircuitOpen`], [`Error::ShuttingDown`].
    pub async fn connection(&self, op: impl Into<Op>, route: Route) -> Result<Connection, Error> {
        let op = op.into();
        let started = Instant::now();
        let rules = Rules {
            write: false,
            idempotent: true,
        };
        let result = self
            .with_retries(&op, rules, |_| async {
                let node = self.route(route).clone();
                match self.checkout(&node, &op).await {
                    Ok(conn) => Ok((conn, node)),
                    Err(e) => Err((e, Some(node))),
                }
            })
            .await;
        let (conn, node) = self.finish(&op, route, started, result)?;
        Ok(Connection {
            conn,
            node,
            op,
            prepared: self.inner.settings.prepared,
        })
    }

    // ----- closures -----------------------------------------------------

    /// Runs `work` with a connection of its own on a replica (or the
    /// primary, as [`Route::Read`] routes). Retried, whole, on any transient
    /// error.
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// let total: i64 = cluster
    ///     .read("count-bills", async |conn| {
    ///         let row = conn.query_one("SELECT count(*) FROM bills", &[]).await?;
    ///         Ok(row.get(0))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn read<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Read, work).await
    }

    /// Runs `work` with a connection of its own on the primary. Retried only
    /// when the connection could not be had (nothing was sent), or on any
    /// transient error when the operation is [`Op::idempotent`]. A connection
    /// lost while `work` ran gives [`Error::CommitOutcomeUnknown`]: its
    /// writes may or may not have happened.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn write<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Write, work).await
    }

    async fn closure<T, F>(&self, op: Op, route: Route, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        let started = Instant::now();
        let rules = Rules {
            write: !route.is_read(),
            idempotent: op.is_idempotent(),
        };
        let work = tokio::sync::Mutex::new(work);
        let result = self
            .with_retries(&op, rules, |_| async {
                let node = self.route(route).clone();
                let conn = match self.checkout(&node, &op).await {
                    Ok(conn) => conn,
                    Err(e) => return Err((e, Some(node))),
                };
                let mut conn = Connection {
                    conn,
                    node: node.clone(),
                    op: op.clone(),
                    prepared: self.inner.settings.prepared,
                };
                let mut work = work.lock().await;
                let result = (*work)(&mut conn).await;
                drop(conn);
                match result {
                    Ok(value) => Ok((value, node)),
                    Err(error) => {
                        let error = self.after_failure(&node, &op, route, error, true).await;
                        Err((error, Some(node)))
                    }
                }
            })
            .await;
        self.finish(&op, route, started, result).map(|(v, _)| v)
    }

    /// Runs `work` inside a transaction on the primary: committed when it
    /// returns `Ok`, rolled back on `Err`, on a panic or when the future is
    /// dropped. Retried as a whole on serialization failures and deadlocks
    /// (`40001`, `40P01`) and when the transaction could not start or broke
    /// before `COMMIT` was sent; a connection lost while `COMMIT` was in
    /// flight gives [`Error::CommitOutcomeUnknown`] and no retry.
    ///
    /// `work` may run more than once: keep effects outside the database out
    /// of it. For a call moved into `tokio::spawn`, write `async move |tx|`
    /// and capture owned values (a borrowing async closure's future is not
    /// provably `Send`).
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// cluster
    ///     .transaction("pay-bill", async |tx| {
    ///         tx.execute("UPDATE bills SET paid = true WHERE id = $1", &[&7_i64]).await?;
    ///         tx.execute("INSERT INTO payments (bill) VALUES ($1)", &[&7_i64]).await?;
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The last attempt's error; [`Error::Aborted`] for the caller's own.
    pub async fn transaction<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        self.transaction_with(op, TransactionOptions::new(), work)
            .await
    }

    /// [`Cluster::transaction`] with an isolation level, read-only or
    /// deferrable. A read-only transaction is routed as [`Route::Read`].
    ///
    /// # Errors
    /// As [`Cluster::transaction`].
    pub async fn transaction_with<T, F>(
        &self,
        op: impl Into<Op>,
        options: TransactionOptions,
        work: F,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let op = op.into();
        let route = if options.read_only {
            Route::Read
        } else {
            Route::Write
        };
        let span = tracing::debug_span!(
            "pgstack.transaction",
            op = op.name(),
            route = route.as_str(),
            node = tracing::field::Empty,
            attempt = tracing::field::Empty
        );
        async {
            let started = Instant::now();
            // A transaction that did not commit had no effect: repeating it
            // is safe whatever it wrote.
            let rules = Rules {
                write: false,
                idempotent: true,
            };
            let work = tokio::sync::Mutex::new(work);
            let result = self
                .with_retries(&op, rules, |attempt| {
                    let (work, op) = (&work, &op);
                    async move {
                        let mut work = work.lock().await;
                        self.transaction_attempt(op, route, options, attempt, &mut *work)
                            .await
                    }
                })
                .await;
            self.finish(&op, route, started, result).map(|(v, _)| v)
        }
        .instrument(span)
        .await
    }

    async fn transaction_attempt<T, F>(
        &self,
        op: &Op,
        route: Route,
        options: TransactionOptions,
        attempt: u32,
        work: &mut F,
    ) -> Attempt<T>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let node = self.route(route).clone();
        record_attempt(&node, attempt);
        let mut conn = match self.checkout(&node, op).await {
            Ok(conn) => conn,
            Err(e) => return Err((e, Some(node))),
        };
        let result = async {
            let tx = conn
                .transaction_with(options)
                .await
                .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), false))?;
            let mut tx = Transaction {
                tx,
                node: node.clone(),
                op: op.clone(),
                prepared: self.inner.settings.prepared,
            };
            match work(&mut tx).await {
                Ok(value) => {
                    let commit = tx.tx.commit();
                    let committed = match self.inner.settings.attempt_timeout {
                        Some(limit) => tokio::time::timeout(limit, commit).await.ok(),
                        None => Some(commit.await),
                    };
                    match committed {
                        Some(Ok(())) => Ok(value),
                        Some(Err(e)) if e.as_db_error().is_some() => {
                            Err(Error::from_postgres(e, node.name_arc(), op.name(), true))
                        }
                        // Lost or cut off with COMMIT in flight: it may have
                        // happened. (A dropped commit leaves the connection
                        // flagged; the pool rolls back or closes it.)
                        source => Err(Error::CommitOutcomeUnknown {
                            node: Arc::clone(node.name_arc()),
                            operation: op.name().to_owned(),
                            source: source.and_then(Result::err),
                        }),
                    }
                }
                Err(error) => {
                    // Best effort: if it fails, the pool rolls back or closes
                    // the connection before reuse.
                    let _ = tx.tx.rollback().await;
                    Err(error)
                }
            }
        }
        .await;
        drop(conn);
        match result {
            Ok(value) => Ok((value, node)),
            Err(error) => {
                // Statements inside a transaction are not autocommit writes:
                // only COMMIT decides the outcome.
                // (A read-only transaction's 25006 says nothing about the node.)
                let error = self
                    .after_failure(&node, op, Route::Read, error, !options.read_only)
                    .await;
                Err((error, Some(node)))
            }
        }
    }

    // ----- roles, failover, replication ---------------------------------

    /// Checks every node's role (`pg_is_in_recovery()` and
    /// `transaction_read_only`) and moves writes to the writable one if the
    /// primary changed. Called on a `25006` from the primary, when the
    /// primary is seen in recovery, and while it stays down; a health monitor
    /// may call it too. Concurrent calls share one round.
    ///
    /// # Errors
    /// [`Error::NoPrimary`] when no node accepts writes (writes keep going
    /// to the previous primary).
    pub async fn rediscover(&self) -> Result<(), Error> {
        let epoch = self.inner.discovery_epoch.load(Ordering::Acquire);
        let _round = self.inner.discovery.lock().await;
        if self.inner.discovery_epoch.load(Ordering::Acquire) != epoch {
            return Ok(());
        }
        let result = self.discover("pgstack-rediscover").await;
        self.inner.discovery_epoch.fetch_add(1, Ordering::AcqRel);
        result
    }

    async fn discover(&self, op: &str) -> Result<(), Error> {
        let timeout = self.inner.settings.check_timeout;
        let mut checks = JoinSet::new();
        for node in self.nodes() {
            let node = node.clone();
            checks.spawn(async move {
                let role = check_role(&node, timeout).await;
                (node, role)
            });
        }
        let mut answers = Vec::with_capacity(self.nodes().len());
        while let Some(joined) = checks.join_next().await {
            if let Ok(answer) = joined {
                answers.push(answer);
            }
        }
        answers.sort_by_key(|(node, _)| node.inner.index);
        let current = self.inner.primary.load(Ordering::Acquire);
        let mut writable = Vec::new();
        let mut details = Vec::new();
        for (node, role) in &answers {
            match role {
                Ok(role) => {
                    node.set_observed_role(Some(*role));
                    details.push(format!("{}: {role}", node.name()));
                    if *role == Role::Primary {
                        writable.push(node.inner.index);
                    }
                }
                Err(e) => {
                    details.push(format!("{}: {e}", node.name()));
                    self.node_failed(node);
                }
            }
        }
        let chosen = if writable.contains(&current) {
            Some(current)
        } else {
            writable.first().copied()
        };
        let Some(chosen) = chosen else {
            return Err(Error::NoPrimary {
                operation: op.to_owned(),
                details: details.join("; "),
            });
        };
        if writable.len() > 1 {
            tracing::warn!(
                nodes = ?writable,
                "more than one node accepts writes; keeping writes on one of them"
            );
        }
        if chosen != current {
            let (old, new) = (&self.inner.nodes[current], &self.inner.nodes[chosen]);
            tracing::warn!(
                from = old.name(),
                to = new.name(),
                "primary changed: writes now go to {}",
                new.name()
            );
            self.inner.primary.store(chosen, Ordering::Release);
            self.inner
                .counters
                .primary_changes
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(FAILOVERS_METRIC, "node" => node_label(new)).increment(1);
            // The old primary's connections may sit in a read-only session.
            old.retire_lanes();
            old.pool().recycle_all();
            new.retire_lanes();
        }
        Ok(())
    }

    /// Measures every replica once: replay position
    /// (`pg_last_wal_replay_lsn()`), lag in bytes behind the primary's
    /// current position, and lag in time (0 when caught up, else the age of
    /// the last replayed transaction). Feeds the routing inputs of each
    /// [`Node`]; a node that does not answer is left as it was.
    pub async fn refresh_replication(&self) {
        let timeout = self.inner.settings.check_timeout;
        let primary = self.primary().clone();
        let primary_lsn = match tokio::time::timeout(timeout, current_lsn(&primary)).await {
            Ok(Some(lsn)) => Some(lsn),
            _ => None,
        };
        let mut probes = JoinSet::new();
        for node in self.nodes() {
            if node.inner.index == primary.inner.index {
                continue;
            }
            let node = node.clone();
            probes.spawn(async move {
                let measure = async {
                    let mut state = replay_state(&node).await?;
                    let behind = |s: &ReplayState| match (primary_lsn, s.replay) {
                        (Some(p), Some(r)) => r < p,
                        _ => false,
                    };
                    if behind(&state) {
                        // A record written just before the primary was asked
                        // is replayed within milliseconds: look again before
                        // judging the lag by the age of the last transaction.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        state = replay_state(&node).await?;
                    }
                    Some(state)
                };
                if let Ok(Some(state)) = tokio::time::timeout(timeout, measure).await {
                    apply_replay_state(&node, state, primary_lsn);
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }

    fn spawn_replication_probe(&self, interval: Duration) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let cluster = Cluster { inner };
                if cluster.is_closing() {
                    return;
                }
                cluster.refresh_replication().await;
                drop(cluster);
                tokio::time::sleep(interval).await;
            }
        });
    }

    // ----- reports, maintenance, shutdown -------------------------------

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
        let wait = async {
            loop {
                let drained = inner.drained.notified();
                if inner.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                drained.await;
            }
        };
        let until = tokio::time::Instant::now() + deadline;
        let _ = tokio::time::timeout_at(until, wait).await;
        let cut_off = inner.in_flight.load(Ordering::Acquire);
        // Calls that returned may have left a connection to be rolled back
        // before it goes back to its pool: give those the rest of the
        // deadline, so they are not counted as still in use.
        let nodes = self.nodes();
        for node in nodes {
            let _ = tokio::time::timeout_at(until, node.pool().returns_settled()).await;
        }
        let mut connections_in_use = 0;
        for node in nodes {
            node.retire_lanes();
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
fn record_attempt(node: &Node, attempt: u32) {
    let span = tracing::Span::current();
    span.record("node", node.name());
    span.record("attempt", attempt);
    tracing::trace!(node = node.name(), attempt, "attempt");
}

fn node_label(node: &Node) -> SharedString {
    SharedString::from(Arc::clone(node.name_arc()))
}

fn first_text(messages: &[SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}

/// The role of the server behind `conn`.
async fn role_of(conn: &PooledConnection) -> Result<Role, tokio_postgres::Error> {
    let messages = conn.simple_query(ROLE_QUERY).await?;
    let row = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let in_recovery = row.and_then(|r| r.get(0)) == Some("t");
    let read_only = row.and_then(|r| r.get(1)) == Some("on");
    Ok(if in_recovery || read_only {
        Role::Replica
    } else {
        Role::Primary
    })
}

/// Checks `node`'s role with a connection from its pool, within `timeout`.
async fn check_role(node: &Node, timeout: Duration) -> Result<Role, String> {
    let check = async {
        // An open breaker rejects checkouts: first see, past it, whether the
        // node accepts sessions again (which half-opens the breaker).
        if node
            .circuit_breaker()
            .is_some_and(|b| !b.state().allows_calls())
        {
            node.pool().probe().await.map_err(|e| e.to_string())?;
        }
        let conn = node
            .pool()
            .get(ROLE_CHECK_OP)
            .await
            .map_err(|e| e.to_string())?;
        role_of(&conn).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        // The pool may still be retrying a connect that fails (a TLS
        // handshake the server refuses, a missing database): say why.
        Err(_) => Err(match node.pool().status().last_connect_error {
            Some(last) => format!("no answer within {timeout:?}; last connect error: {last}"),
            None => format!("no answer within {timeout:?}"),
        }),
    }
}

/// Probes a node that failed a call until it answers, then puts it back
/// into routing. While the primary stays down, also looks for a new one.
async fn probe_until_back(cluster: Weak<ClusterInner>, node: Node) {
    // Often at first (a restart is over in a second or two, and callers
    // wait for the node), then less often for a long outage.
    let down_since = Instant::now();
    let mut delay = PROBE_FIRST_DELAY;
    let mut rounds: u32 = 0;
    loop {
        tokio::time::sleep(delay).await;
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        let cluster = Cluster { inner };
        if cluster.is_closing() {
            return;
        }
        let timeout = cluster.inner.settings.check_timeout;
        match check_role(&node, timeout).await {
            Ok(role) => {
                node.set_observed_role(Some(role));
                node.retire_lanes();
                node.inner.suspect.store(false, Ordering::Release);
                tracing::info!(node = node.name(), %role, "node answers again");
                if node.inner.index == cluster.primary().inner.index && role == Role::Replica {
                    let _ = cluster.rediscover().await;
                }
                return;
            }
            Err(error) => {
                rounds += 1;
                tracing::debug!(node = node.name(), %error, rounds, "node still down");
                let is_primary = node.inner.index == cluster.primary().inner.index;
                if is_primary && rounds.is_multiple_of(3) {
                    // The primary stays down: maybe a replica was promoted.
                    let _ = cluster.rediscover().await;
                    if node.inner.index != cluster.primary().inner.index {
                        // Writes moved on; keep probing the old primary as a
                        // possible replica.
                        tracing::info!(node = node.name(), "old primary still down");
                    }
                }
            }
        }
        let cap = if down_since.elapsed() < PROBE_FAST_FOR {
            PROBE_FAST_CAP
        } else {
            PROBE_SLOW_CAP
        };
        delay = (delay * 2).min(cap);
    }
}

/// The first background probe of a node that failed a call.
const PROBE_FIRST_DELAY: Duration = Duration::from_millis(25);
/// How long a node that stays down is probed often.
const PROBE_FAST_FOR: Duration = Duration::from_secs(10);
/// The longest pause between probes in that time.
const PROBE_FAST_CAP: Duration = Duration::from_millis(100);
/// The longest pause between probes after it.
const PROBE_SLOW_CAP: Duration = Duration::from_secs(2);

/// How often a call waiting for an unavailable node (its breaker open, with
/// a probe due before the call's deadline) looks again: a local check, no
/// traffic to the node.
const UNAVAILABLE_POLL: Duration = Duration::from_millis(20);
/// How often a call looks again while the node refuses logins as starting up.
const STARTING_UP_POLL: Duration = Duration::from_millis(100);

async fn current_lsn(node: &Node) -> Option<WalPosition> {
    let conn = node.pool().get("pgstack-replication-probe").await.ok()?;
    let rows = conn
        .simple_query("SELECT pg_current_wal_lsn()::text")
        .await
        .ok()?;
    first_text(&rows)?.parse().ok()
}

struct ReplayState {
    replay: Option<WalPosition>,
    /// Seconds since the last replayed transaction committed on the primary.
    age: Option<f64>,
    in_recovery: bool,
}

async fn replay_state(node: &Node) -> Option<ReplayState> {
    let conn = node.pool().get("pgstack-replication-probe").await.ok()?;
    let rows = conn
        .simple_query(
            "SELECT pg_last_wal_replay_lsn()::text, \
             extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8::text, \
             pg_is_in_recovery()",
        )
        .await
        .ok()?;
    let row = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })?;
    Some(ReplayState {
        replay: row.get(0).and_then(|t| t.parse().ok()),
        age: row.get(1).and_then(|t| t.parse().ok()),
        in_recovery: row.get(2) == Some("t"),
    })
}

fn apply_replay_state(node: &Node, state: ReplayState, primary: Option<WalPosition>) {
    if !state.in_recovery {
        node.set_observed_role(Some(Role::Primary));
        return;
    }
    node.set_observed_role(Some(Role::Replica));
    node.set_replay_position(state.replay);
    let behind = match (primary, state.replay) {
        (Some(p), Some(r)) => Some(p.as_u64().saturating_sub(r.as_u64())),
        _ => None,
    };
    node.set_replica_lag_bytes(behind);
    let lag = match (behind, state.age) {
        (Some(0), _) => Some(Duration::ZERO),
        (Some(_), Some(age)) if age.is_finite() => Some(Duration::from_secs_f64(age.max(0.0))),
        // Behind, and no transaction replayed yet: as far behind as it gets.
        (Some(_), None) => Some(Duration::from_secs(u64::from(u32::MAX))),
        _ => None,
    };
    node.set_replica_lag(lag);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> Error {
        Error::Timeout {
            node: "primary".into(),
            operation: "op".into(),
            after: Duration::from_secs(1),
        }
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            node: "primary".into(),
            operation: "op".into(),
            reason: "down".into(),
        }
    }

    #[test]
    fn retry_rules_follow_what_was_sent() {
        let read = Rules {
            write: false,
            idempotent: false,
        };
        let write = Rules {
            write: true,
            idempotent: false,
        };
        let idempotent = Rules {
            write: true,
            idempotent: true,
        };
        // Nothing sent: everyone retries.
        for rules in [read, write, idempotent] {
            assert_eq!(rules.classify(&unavailable()), ErrorClass::Transient);
        }
        // Maybe sent: reads and idempotent writes only.
        assert_eq!(read.classify(&timeout()), ErrorClass::Transient);
        assert_eq!(
            write.classify(&timeout()),
            ErrorClass::TransientNotRepeatable
        );
        assert_eq!(idempotent.classify(&timeout()), ErrorClass::Transient);
        // An unknown commit is never repeated, idempotent or not.
        let unknown = Error::CommitOutcomeUnknown {
            node: "primary".into(),
            operation: "op".into(),
            source: None,
        };
        for rules in [read, write, idempotent] {
            assert_eq!(rules.classify(&unknown), ErrorClass::TransientNotRepeatable);
        }
        // Misuse and shutdown are permanent.
        let usage = Error::Usage {
            operation: "op".into(),
            problem: "BEGIN".into(),
        };
        let shutting = Error::ShuttingDown {
            operation: "op".into(),
        };
        for error in [usage, shutting] {
            assert_eq!(read.classify(&error), ErrorClass::Permanent);
            assert!(!error.is_transient());
            assert!(error.provably_not_sent());
        }
        assert!(unavailable().is_transient() && unavailable().provably_not_sent());
        assert!(timeout().is_transient() && !timeout().provably_not_sent());
        assert!(!unknown.is_transient() && unknown.is_commit_outcome_unknown());
        // Only node failures count against a breaker.
        assert_eq!(read.breaker_outcome(&timeout()), Outcome::Failure);
        assert_eq!(
            read.breaker_outcome(&Error::Usage {
                operation: "op".into(),
                problem: String::new()
            }),
            Outcome::Ignored
        );
    }

    #[test]
    fn default_shared_connections() {
        assert_eq!(ClusterBuilder::default_lanes(1), 0);
        assert_eq!(ClusterBuilder::default_lanes(2), 0);
        assert_eq!(ClusterBuilder::default_lanes(3), 1);
        assert_eq!(ClusterBuilder::default_lanes(10), 2);
        assert_eq!(ClusterBuilder::default_lanes(50), 4);
    }

    fn circuit_open(probe_in: Option<Duration>) -> Error {
        Error::CircuitOpen {
            node: "primary".into(),
            operation: "op".into(),
            probe_in,
            source: Box::new(pgstack_pool::PoolError::Closed {
                node: "primary".into(),
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_is_waited_for_only_when_it_probes_before_the_deadline() {
        let read = Rules {
            write: false,
            idempotent: false,
        };
        let call = CallRules {
            rules: read,
            give_up_at: Some(Instant::now() + Duration::from_secs(3)),
        };
        let soon = circuit_open(Some(Duration::from_millis(300)));
        let late = circuit_open(Some(Duration::from_secs(5)));
        let unknown = circuit_open(None);
        assert_eq!(call.classify(&soon), ErrorClass::Transient);
        assert_eq!(call.classify(&late), ErrorClass::Permanent);
        assert_eq!(call.classify(&unknown), ErrorClass::Transient);
        // Nearer the deadline, a probe that was in time no longer is.
        tokio::time::advance(Duration::from_millis(2800)).await;
        assert_eq!(call.classify(&soon), ErrorClass::Permanent);
        // Without a deadline, an open breaker is always waited for.
        let patient = CallRules {
            rules: read,
            give_up_at: None,
        };
        assert_eq!(patient.classify(&late), ErrorClass::Transient);
        // Other errors follow the rules.
        assert_eq!(call.classify(&timeout()), read.classify(&timeout()));
    }
}
