//! The pool: bb8 underneath, a fair queue in front, a housekeeper beside.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bb8::ManageConnection;
use bb8_postgres::PostgresConnectionManager;
use pgstack_config::{
    CheckoutValidation, CircuitBreakerSettings, ConnectFailure, DatabaseConfig, KeepaliveSettings,
    NodeSettings, PoolSettings, QuerySettings, RetrySettings, TlsSettings, explain_connect_failure,
};
use pgstack_resilience::{Backoff, BreakerState, CircuitBreaker, Outcome};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::conn::{PgConnection, PooledConnection};
use crate::error::{
    AcquirePhase, AcquireTimeout, ConfigError, ConnectError, LastConnectError, PoolError,
};
use crate::leak::Leaks;
use crate::status::{CloseReason, PoolStatus, Stats};
use crate::tls;

/// A connection opened by [`Pool::connect_dedicated`]: the future that
/// drives the client's socket (TLS or not, through rustls).
pub type DedicatedConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// State shared by the pool, its connections and its background task.
pub(crate) struct Shared {
    /// The node's name in metrics, logs and the breaker.
    pub(crate) label: Arc<str>,
    /// The node for messages: name and URL without password.
    pub(crate) display: Arc<str>,
    /// The node's settings, to explain a failed connection.
    pub(crate) node: NodeSettings,
    pub(crate) settings: PoolSettings,
    pub(crate) tls: MakeRustlsConnect,
    pub(crate) stats: Stats,
    pub(crate) leaks: Leaks,
    pub(crate) cache_statements: bool,
    pub(crate) cleanup_timeout: Duration,
    pub(crate) generation: AtomicU64,
    pub(crate) cache_generation: AtomicU64,
    pub(crate) closing: AtomicBool,
    /// Flips to true on close, for callers waiting inside bb8.
    closed: watch::Sender<bool>,
    pub(crate) waiters: AtomicU32,
    pub(crate) connecting: AtomicU32,
    last_error: Mutex<Option<(Arc<ConnectError>, Instant)>>,
    /// The most recent connection attempt failed (the node looks down).
    connect_failing: AtomicBool,
    pub(crate) breaker: Option<CircuitBreaker>,
    wake: Notify,
    /// Connections being rolled back on their way back to the pool: still
    /// checked out, though their caller has moved on.
    pub(crate) returning: watch::Sender<u32>,
    /// Idle connections kept in front of bb8 (see [`Parked`]).
    parked: Mutex<Parked>,
    /// Wakes a checkout waiting inside bb8 when a connection is parked.
    parked_ready: Notify,
}

/// Idle connections returned in a known-good state, kept in pgstack's own
/// queue in front of bb8, so that a checkout and a return each take one
/// short lock instead of bb8's get (locks, a timer) and put-back.
///
/// bb8 still counts them as checked out: it opens, bounds and closes the
/// connections, and its idle queue holds the ones the housekeeper opened.
/// Parked connections are validated at checkout like bb8's idle ones, swept
/// by the housekeeper like them, and closed on [`Pool::close`].
pub(crate) struct Parked {
    /// Oldest first: checkouts take from the front (FIFO, as bb8's queue).
    conns: std::collections::VecDeque<bb8::PooledConnection<'static, Manager>>,
    /// Checkouts holding a gate permit but waiting inside bb8: a parked
    /// connection must wake them.
    waiting_in_bb8: u32,
}

impl Shared {
    /// Runs `connect` (TCP, TLS and login) within `pool.connect_timeout`;
    /// a failure says why, cause first.
    async fn within_connect_timeout<T>(
        &self,
        connect: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, ConnectError> {
        let timeout = self.settings.connect_timeout;
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(source)) => Err(ConnectError::Postgres {
                node: Arc::clone(&self.display),
                explanation: crate::error::explain(&self.node, &source),
                source,
            }),
            Err(_) => Err(ConnectError::Timeout {
                node: Arc::clone(&self.display),
                after: timeout,
                explanation: explain_connect_failure(
                    &self.node,
                    ConnectFailure::TimedOut { after: timeout },
                ),
            }),
        }
    }

    fn set_last_error(&self, error: Arc<ConnectError>) {
        let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((error, Instant::now()));
    }

    /// Takes the oldest parked connection.
    fn unpark(&self) -> Option<bb8::PooledConnection<'static, Manager>> {
        self.lock_parked().conns.pop_front()
    }

    fn lock_parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a returned connection for the next checkout, or closes it if it
    /// must not be reused (or the pool is closing: checked under the lock
    /// [`Pool::close`] drains the queue under, so none is left behind).
    pub(crate) fn park(&self, mut conn: bb8::PooledConnection<'static, Manager>) {
        if let Some(reason) = self.unfit(&conn, conn.last_used) {
            conn.close_reason = Some(reason);
            return;
        }
        let mut parked = self.lock_parked();
        if self.closing.load(Ordering::Acquire) {
            drop(parked);
            conn.close_reason = Some(CloseReason::Shutdown);
            return;
        }
        parked.conns.push_back(conn);
        let wake = parked.waiting_in_bb8 > 0;
        drop(parked);
        if wake {
            self.parked_ready.notify_one();
        }
    }

    /// Closes every parked connection `verdict` condemns (all of them for
    /// `Some` on each).
    fn sweep_parked(&self, mut verdict: impl FnMut(&PgConnection) -> Option<CloseReason>) {
        let mut condemned = Vec::new();
        {
            let mut parked = self.lock_parked();
            let mut kept = std::collections::VecDeque::with_capacity(parked.conns.len());
            for mut conn in parked.conns.drain(..) {
                match verdict(&conn) {
                    Some(reason) => {
                        conn.close_reason = Some(reason);
                        condemned.push(conn);
                    }
                    None => kept.push_back(conn),
                }
            }
            parked.conns = kept;
        }
        // Closed outside the lock: bb8 takes its own on the way back.
        drop(condemned);
    }

    fn last_error(&self) -> Option<LastConnectError> {
        let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        last.as_ref().map(|(error, at)| LastConnectError {
            error: Arc::clone(error),
            age: at.elapsed(),
        })
    }

    /// A random lifetime deadline for a connection opened now.
    fn deadline(&self, now: Instant) -> Option<Instant> {
        let lifetime = self.settings.max_lifetime?;
        let jitter = self.settings.max_lifetime_jitter;
        Some(now + jittered_lifetime(lifetime, jitter, rand::random::<f64>()))
    }

    /// Why a connection must not be reused, if it must not.
    fn unfit(&self, conn: &PgConnection, now: Instant) -> Option<CloseReason> {
        if let Some(reason) = conn.close_reason {
            return Some(reason);
        }
        if self.closing.load(Ordering::Acquire) {
            return Some(CloseReason::Shutdown);
        }
        if conn.client.is_closed() {
            return Some(CloseReason::Broken);
        }
        if !conn.is_clean() {
            return Some(CloseReason::Error);
        }
        if conn.session_changed() {
            return Some(CloseReason::Session);
        }
        if conn.generation < self.generation.load(Ordering::Acquire) {
            return Some(CloseReason::Recycled);
        }
        if conn.deadline.is_some_and(|d| now >= d) {
            return Some(CloseReason::Lifetime);
        }
        None
    }
}

/// A connection's lifetime: `lifetime` shortened by `sample` (in `[0, 1)`)
/// times the jitter, the jitter capped at half the lifetime.
fn jittered_lifetime(lifetime: Duration, jitter: Duration, sample: f64) -> Duration {
    let jitter = jitter.min(lifetime / 2);
    lifetime.saturating_sub(jitter.mul_f64(sample.clamp(0.0, 1.0)))
}

/// Counts itself in an atomic while alive.
struct Counted<'a>(&'a AtomicU32);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicU32) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A checkout waiting for a connection: counted in [`Shared::waiters`] and
/// in the `db.client.connection.pending_requests` gauge while it lives.
struct Waiting<'a> {
    shared: &'a Shared,
    _counted: Counted<'a>,
}

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.stats.pending(true);
        Waiting {
            shared,
            _counted: Counted::new(&shared.waiters),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.stats.pending(false);
    }
}

/// bb8's connection manager: delegates connecting to bb8-postgres's
/// [`PostgresConnectionManager`], bounded by the connect timeout and guarded
/// by the circuit breaker.
#[derive(Clone)]
pub(crate) struct Manager {
    postgres: PostgresConnectionManager<MakeRustlsConnect>,
    /// The settings `postgres` connects with, for connections outside the
    /// pool ([`Pool::connect_dedicated`]).
    config: Arc<tokio_postgres::Config>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Manager")
            .field("node", &self.shared.display)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Opens a connection through the breaker (a rejection costs nothing).
    async fn connect_guarded(&self) -> Result<PgConnection, Arc<ConnectError>> {
        if self.shared.closing.load(Ordering::Acquire) {
            return Err(Arc::new(ConnectError::PoolClosed {
                node: Arc::clone(&self.shared.display),
            }));
        }
        let Some(breaker) = &self.shared.breaker else {
            return self.open().await;
        };
        let permit = breaker.acquire().map_err(|source| {
            Arc::new(ConnectError::CircuitOpen {
                node: Arc::clone(&self.shared.display),
                source,
            })
        })?;
        let result = self.open().await;
        permit.record(match &result {
            Ok(_) => Outcome::Success,
            // Too many connections: the node is up, just full.
            Err(e) if e.code() == Some("53300") => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        });
        result
    }

    /// Opens a connection: TCP, TLS and login within `pool.connect_timeout`.
    async fn open(&self) -> Result<PgConnection, Arc<ConnectError>> {
        let shared = &self.shared;
        let _connecting = Counted::new(&shared.connecting);
        let started = Instant::now();
        let result = match shared.within_connect_timeout(self.postgres.connect()).await {
            Ok(client) => {
                shared.connect_failing.store(false, Ordering::Release);
                let now = Instant::now();
                shared.stats.created_in(now - started);
                return Ok(PgConnection::new(
                    client,
                    shared.deadline(now),
                    shared.generation.load(Ordering::Acquire),
                    shared.cache_generation.load(Ordering::Acquire),
                    Arc::clone(shared),
                ));
            }
            Err(error) => error,
        };
        tracing::debug!(node = %shared.label, error = %result, "connect attempt failed");
        let error = Arc::new(result);
        shared.connect_failing.store(true, Ordering::Release);
        shared.set_last_error(Arc::clone(&error));
        Err(error)
    }
}

impl ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = Arc<ConnectError>;

    /// bb8 connects for a waiting caller, once (`retry_connection` is off);
    /// after a failure the housekeeper takes over, with backoff.
    async fn connect(&self) -> Result<PgConnection, Arc<ConnectError>> {
        let result = self.connect_guarded().await;
        if let Err(e) = &result
            && matches!(
                **e,
                ConnectError::Postgres { .. } | ConnectError::Timeout { .. }
            )
        {
            self.shared.wake.notify_one();
        }
        result
    }

    async fn is_valid(&self, _conn: &mut PgConnection) -> Result<(), Arc<ConnectError>> {
        // Checkout validation happens in `Pool::get` (test_on_check_out is off).
        Ok(())
    }

    fn has_broken(&self, conn: &mut PgConnection) -> bool {
        // `last_used` was set when the connection was released, just now;
        // checkouts check the lifetime again with a fresh clock.
        match self.shared.unfit(conn, conn.last_used) {
            Some(reason) => {
                conn.close_reason = Some(reason);
                true
            }
            None => false,
        }
    }
}

const PHASE_WAITING: u8 = 0;
const PHASE_CONNECTING: u8 = 1;
const PHASE_VALIDATING: u8 = 2;

fn phase_of(code: u8) -> AcquirePhase {
    match code {
        PHASE_WAITING => AcquirePhase::WaitingForConnection,
        PHASE_CONNECTING => AcquirePhase::Connecting,
        _ => AcquirePhase::Validating,
    }
}

struct PoolInner {
    bb8: bb8::Pool<Manager>,
    manager: Manager,
    shared: Arc<Shared>,
    /// A fair (FIFO) queue in front of bb8, one permit per connection.
    gate: Arc<Semaphore>,
    housekeeping_interval: Duration,
    reconnect: Backoff,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        // Parked connections hold the `Shared` they live in: close them now.
        self.shared.sweep_parked(|_| Some(CloseReason::Shutdown));
        self.shared.wake.notify_one();
    }
}

/// A connection pool for one PostgreSQL node.
///
/// Cheap to clone; clones share the pool. See the [crate docs](crate) and
/// `docs/pool.md`.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("node", &self.inner.shared.display)
            .field("status", &self.status())
            .finish()
    }
}

impl Pool {
    /// A builder for a pool to `node`, with default settings.
    pub fn builder(node: NodeSettings) -> PoolBuilder {
        PoolBuilder::new(node)
    }

    /// A pool to the primary of `config`, with `min_idle` connections
    /// opened before this returns.
    ///
    /// # Errors
    /// [`PoolError::Config`] for invalid settings, [`PoolError::Connect`]
    /// when the first connections cannot be opened.
    pub async fn connect(config: &DatabaseConfig) -> Result<Pool, PoolError> {
        PoolBuilder::from_config(config, &config.primary)
            .build()
            .await
    }

    /// Checks a connection out for `operation` (a short name such as
    /// `"fetch-bills"`, used in leak reports and errors).
    ///
    /// Callers are served in arrival order. The connection is checked
    /// cheaply (closed socket, known state, lifetime, generation) and pinged
    /// only as `pool.checkout_validation` says.
    ///
    /// # Errors
    /// - [`PoolError::CircuitOpen`] at once while the node's breaker is open;
    /// - [`PoolError::Timeout`] after `pool.acquire_timeout`, naming the phase
    ///   (waiting, connecting, validating), the last connect error and the
    ///   pool's state;
    /// - [`PoolError::Closed`] after [`Pool::close`].
    pub async fn get(
        &self,
        operation: impl Into<Cow<'static, str>>,
    ) -> Result<PooledConnection, PoolError> {
        let operation = operation.into();
        let shared = &self.inner.shared;
        if shared.closing.load(Ordering::Acquire) {
            return Err(self.closed());
        }
        self.check_breaker(&operation)?;
        // The fast path below never waits: spend the task's cooperative
        // budget as any tokio resource would, so that a caller checking out
        // in a loop still yields to the scheduler (and its timers).
        tokio::task::consume_budget().await;
        // The common case: nobody queued (the gate hands released permits to
        // queued callers first, so this never overtakes one) and a parked
        // connection fit for use. No timer, one clock read.
        let mut permit = Arc::clone(&self.inner.gate).try_acquire_owned().ok();
        let start = Instant::now();
        let mut first = None;
        if permit.is_some()
            && let Some(mut conn) = shared.unpark()
        {
            match check(shared, &mut conn, start) {
                Check::Fit => {
                    if let Some(permit) = permit.take() {
                        return Ok(self.hand_out(conn, permit, start, start, operation));
                    }
                }
                Check::Ping => first = Some(conn),
                Check::Unfit(reason) => conn.close_reason = Some(reason),
            }
        }
        let phase = AtomicU8::new(PHASE_WAITING);
        let timeout = shared.settings.acquire_timeout;
        let deadline = start + timeout;
        // Boxed: the slow path (waiting, connecting, validating) is a large
        // future, and every call's future would carry it inline; the box is
        // paid only by a checkout that has to wait.
        let acquire = Box::pin(self.acquire(&phase, &operation, permit, first));
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok((conn, permit, now))) => Ok(self.hand_out(conn, permit, start, now, operation)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                shared.stats.timed_out(timeout);
                let timeout = AcquireTimeout {
                    node: Arc::clone(&shared.display),
                    operation: operation.into_owned(),
                    waited: timeout,
                    phase: phase_of(phase.load(Ordering::Acquire)),
                    last_connect_error: shared.last_error(),
                    status: self.status(),
                };
                tracing::warn!(node = %shared.label, error = %timeout, "pool timeout");
                Err(PoolError::Timeout(Box::new(timeout)))
            }
        }
    }

    /// Wraps a validated connection for the caller.
    fn hand_out(
        &self,
        conn: bb8::PooledConnection<'static, Manager>,
        permit: OwnedSemaphorePermit,
        start: Instant,
        now: Instant,
        operation: Cow<'static, str>,
    ) -> PooledConnection {
        let shared = &self.inner.shared;
        shared
            .stats
            .checked_out(now.saturating_duration_since(start));
        let leak_key = shared.leaks.register(|| operation.clone(), now);
        PooledConnection {
            conn: Some(conn),
            permit: Some(permit),
            shared: Arc::clone(shared),
            operation,
            checked_out_at: now,
            leak_key,
        }
    }

    fn closed(&self) -> PoolError {
        PoolError::Closed {
            node: Arc::clone(&self.inner.shared.display),
        }
    }

    /// Fails at once while the breaker is open; lets the call through (and
    /// the breaker move to half-open) once a probe is due.
    fn check_breaker(&self, operation: &str) -> Result<(), PoolError> {
        let shared = &self.inner.shared;
        let Some(breaker) = &shared.breaker else {
            return Ok(());
        };
        if breaker.state().allows_calls() {
            return Ok(());
        }
        match breaker.acquire() {
            // A probe is due: the breaker is half-open now and the next
            // connect attempt is its probe. This checkout proceeds.
            Ok(permit) => {
                permit.ignore();
                Ok(())
            }
            Err(source) => {
                shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                Err(PoolError::CircuitOpen {
                    node: Arc::clone(&shared.display),
                    operation: operation.to_owned(),
                    source,
                    last_connect_error: shared.last_error().map(|l| l.error),
                })
            }
        }
    }

    async fn acquire(
        &self,
        phase: &AtomicU8,
        operation: &str,
        permit: Option<OwnedSemaphorePermit>,
        mut first: Option<bb8::PooledConnection<'static, Manager>>,
    ) -> Result<
        (
            bb8::PooledConnection<'static, Manager>,
            OwnedSemaphorePermit,
            Instant,
        ),
        PoolError,
    > {
        let inner = &self.inner;
        let shared = &inner.shared;
        // Counted until a connection is found: the housekeeper opens
        // connections for waiting callers (bb8 tries only once for them).
        let mut waiting = Some(Waiting::new(shared));
        let permit = match permit {
            Some(permit) => permit,
            None => Arc::clone(&inner.gate)
                .acquire_owned()
                .await
                .map_err(|_| self.closed())?,
        };
        loop {
            phase.store(PHASE_CONNECTING, Ordering::Release);
            let mut conn = match first.take() {
                Some(conn) => conn,
                None => self.checkout(operation).await?,
            };
            waiting.take();
            phase.store(PHASE_VALIDATING, Ordering::Release);
            match validate(shared, &mut conn).await {
                Ok(now) => return Ok((conn, permit, now)),
                Err(reason) => {
                    conn.close_reason = Some(reason);
                    drop(conn);
                }
            }
        }
    }

    /// A connection: a parked one, else one from bb8; gives up as soon as
    /// the breaker opens or the pool is closed.
    async fn checkout(
        &self,
        operation: &str,
    ) -> Result<bb8::PooledConnection<'static, Manager>, PoolError> {
        let inner = &self.inner;
        let shared = &inner.shared;
        if let Some(conn) = shared.unpark() {
            return Ok(conn);
        }
        // An idle connection in bb8 (opened by the housekeeper). No watchers
        // needed.
        if let Some(Ok(conn)) = now_or_never(inner.bb8.get_owned()) {
            return Ok(conn);
        }
        let mut breaker = shared.breaker.as_ref().map(CircuitBreaker::watch);
        let mut closed = shared.closed.subscribe();
        loop {
            // Registered (under the queue's lock) before looking: a
            // connection parked from now on wakes this checkout.
            let Some(_waiting) = WaitingInBb8::register(shared) else {
                if let Some(conn) = shared.unpark() {
                    return Ok(conn);
                }
                continue;
            };
            tokio::select! {
                biased;
                got = inner.bb8.get_owned() => {
                    // bb8's own timeout is longer than ours; ours ends the wait.
                    if let Ok(conn) = got {
                        return Ok(conn);
                    }
                }
                () = shared.parked_ready.notified() => {}
                () = wait_until_closed(&mut closed) => return Err(self.closed()),
                () = wait_until_open(&mut breaker) => self.check_breaker(operation)?,
            }
        }
    }

    /// The pool's figures right now. Also writes the connection-count
    /// gauges, which are otherwise written each housekeeping tick.
    pub fn status(&self) -> PoolStatus {
        let shared = &self.inner.shared;
        let stats = &shared.stats;
        stats.publish_gauges();
        let state = self.inner.bb8.state();
        let last = shared.last_error();
        PoolStatus {
            node: shared.display.to_string(),
            size: u32::try_from(stats.live.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            idle: state
                .idle_connections
                .saturating_add(u32::try_from(shared.lock_parked().conns.len()).unwrap_or(0)),
            in_use: u32::try_from(stats.in_use.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
            waiters: shared.waiters.load(Ordering::Relaxed),
            max_size: shared.settings.max_size,
            min_idle: shared.settings.min_idle,
            connecting: shared.connecting.load(Ordering::Relaxed),
            circuit: shared.breaker.as_ref().map(|b| b.state().to_string()),
            generation: shared.generation.load(Ordering::Relaxed),
            created: stats.created.load(Ordering::Relaxed),
            closed: stats.closed_counts(),
            acquired: stats.acquired.load(Ordering::Relaxed),
            timeouts: stats.timeouts.load(Ordering::Relaxed),
            rejected: stats.rejected.load(Ordering::Relaxed),
            rollbacks: stats.rollbacks.load(Ordering::Relaxed),
            session_resets: stats.session_resets.load(Ordering::Relaxed),
            leaks: stats.leaks.load(Ordering::Relaxed),
            last_connect_error: last.as_ref().map(|l| l.error.to_string()),
            last_connect_error_age: last.map(|l| l.age),
        }
    }

    /// The node's circuit breaker, if the pool has one.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.shared.breaker.as_ref()
    }

    /// The node's name in metrics and logs.
    pub fn node(&self) -> &str {
        &self.inner.shared.label
    }

    /// Replaces every connection: the ones open now are closed on their next
    /// return or checkout (idle ones within a housekeeping tick) and new
    /// ones are opened as needed. For use after a migration, a failover or a
    /// credentials change.
    pub fn recycle_all(&self) -> u64 {
        let shared = &self.inner.shared;
        let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(node = %shared.label, generation, "recycling every connection");
        shared.wake.notify_one();
        generation
    }

    /// Drops every connection's cached prepared statements (and
    /// tokio-postgres's type cache) on its next checkout, without
    /// reconnecting. Fixes "cached plan must not change result type" after
    /// a migration changed a table that cached statements read.
    pub fn clear_statement_caches(&self) {
        let shared = &self.inner.shared;
        shared.cache_generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(node = %shared.label, "clearing prepared-statement caches");
    }

    /// Whether the node accepts sessions now: opens one connection past the
    /// circuit breaker (TCP, TLS and login within `pool.connect_timeout`)
    /// and adds it to the pool's idle connections (or closes it, if full).
    ///
    /// On success an open breaker moves to half-open, with this connect
    /// counted as a successful probe, so the next checkouts try the node
    /// without waiting out the rest of the open duration. For
    /// a monitor that watches a node while its breaker keeps callers away:
    /// a restarted server is back in use as soon as it accepts logins.
    ///
    /// # Errors
    /// [`PoolError::Connect`] saying why the node refused (also kept as the
    /// pool's last connect error); [`PoolError::Closed`] after [`Pool::close`].
    pub async fn probe(&self) -> Result<(), PoolError> {
        if self.is_closed() {
            return Err(self.closed());
        }
        self.reopen().await.map_err(PoolError::Connect)
    }

    /// Opens a connection outside the pool: not counted against
    /// `pool.max_size`, not behind the breaker, never returned to the pool.
    /// The node's settings and TLS, bounded by `pool.connect_timeout`. The
    /// caller drives the returned [`DedicatedConnection`] itself (to read
    /// notifications with `poll_message`), and the connection ends when the
    /// client is dropped. For a `LISTEN`er, which holds its session for as
    /// long as it lives.
    ///
    /// # Errors
    /// [`PoolError::Connect`] saying why the node refused;
    /// [`PoolError::Closed`] after [`Pool::close`].
    pub async fn connect_dedicated(
        &self,
    ) -> Result<(tokio_postgres::Client, DedicatedConnection), PoolError> {
        if self.is_closed() {
            return Err(self.closed());
        }
        let shared = &self.inner.shared;
        let connect = self.inner.manager.config.connect(shared.tls.clone());
        shared
            .within_connect_timeout(connect)
            .await
            .map_err(|error| PoolError::Connect(Arc::new(error)))
    }

    /// Waits until no connection is on its way back to the pool.
    ///
    /// A connection dropped in an unknown session state (inside a
    /// transaction, a cancelled statement) is rolled back in a background
    /// task before it is returned; until then it counts as checked out.
    /// Each such return ends within the cleanup timeout (the connection is
    /// closed if its `ROLLBACK` takes longer). Await this before
    /// [`Pool::close`] so that the count it returns holds only the
    /// connections callers still hold.
    pub async fn returns_settled(&self) {
        let mut pending = self.inner.shared.returning.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = pending.wait_for(|n| *n == 0).await;
    }

    /// Stops the pool: new checkouts and queued callers get
    /// [`PoolError::Closed`], idle connections are closed now and checked-out
    /// ones when they are returned. Returns the number still checked out
    /// (see [`Pool::returns_settled`]).
    pub fn close(&self) -> u32 {
        let inner = &self.inner;
        let shared = &inner.shared;
        shared.closing.store(true, Ordering::Release);
        shared.closed.send_replace(true);
        inner.gate.close();
        shared.sweep_parked(|_| Some(CloseReason::Shutdown));
        self.drain_idle(|_| Some(CloseReason::Shutdown));
        shared.wake.notify_one();
        let in_use = u32::try_from(shared.stats.in_use.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        tracing::info!(node = %shared.label, in_use, "pool closed");
        in_use
    }

    /// Whether [`Pool::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closing.load(Ordering::Acquire)
    }

    /// Visits each idle connection once (bb8's queue is FIFO), closing the
    /// ones `verdict` condemns. Never waits: stops when the pool is busy.
    fn drain_idle(&self, mut verdict: impl FnMut(&PgConnection) -> Option<CloseReason>) {
        let inner = &self.inner;
        let idle = inner.bb8.state().idle_connections;
        for _ in 0..idle {
            if inner.bb8.state().idle_connections == 0 {
                break;
            }
            let Some(mut conn) = now_or_never(inner.bb8.get_owned()).and_then(Result::ok) else {
                break;
            };
            if let Some(reason) = verdict(&conn) {
                conn.close_reason = Some(reason);
            }
            drop(conn);
        }
    }

    /// Closes idle connections past their lifetime, above `min_idle` and idle
    /// too long, or of an older generation.
    fn sweep(&self) {
        let inner = &self.inner;
        let shared = &inner.shared;
        // Only when nobody is queued: callers come first.
        let Ok(_permit) = Arc::clone(&inner.gate).try_acquire_owned() else {
            return;
        };
        let now = Instant::now();
        let min_idle = u64::from(shared.settings.min_idle);
        let idle_timeout = shared.settings.idle_timeout;
        // `closing`: connections condemned but not closed yet (the parked
        // ones are closed together, after the pass), so that idle ones
        // above `min_idle` are counted right.
        let verdict = |conn: &PgConnection, closing: u64| {
            if let Some(reason) = shared.unfit(conn, now) {
                return Some(reason);
            }
            let idle_for = now.saturating_duration_since(conn.last_used);
            let live = shared.stats.live.load(Ordering::Relaxed);
            let above_min = live.saturating_sub(closing) > min_idle;
            match idle_timeout {
                Some(limit) if above_min && idle_for >= limit => Some(CloseReason::Idle),
                _ => None,
            }
        };
        let mut condemned = 0;
        shared.sweep_parked(|conn| {
            let reason = verdict(conn, condemned);
            condemned += u64::from(reason.is_some());
            reason
        });
        self.drain_idle(|conn| verdict(conn, 0));
    }

    /// Puts a freshly opened connection into the pool.
    fn add(&self, conn: PgConnection) {
        if let Err(rejected) = self.inner.bb8.add(conn) {
            let mut conn = match rejected {
                bb8::AddError::Broken(conn) | bb8::AddError::NoCapacity(conn) => conn,
            };
            conn.close_reason.get_or_insert(CloseReason::Idle);
        }
    }

    /// Opens a connection past an open breaker. On success: adds it to the
    /// pool, moves the breaker to half-open and counts the connect as a
    /// successful probe.
    async fn reopen(&self) -> Result<(), Arc<ConnectError>> {
        let shared = &self.inner.shared;
        let conn = self.inner.manager.open().await?;
        self.add(conn);
        if let Some(breaker) = &shared.breaker {
            if breaker.probe_now() {
                tracing::info!(
                    node = %shared.label,
                    "the node accepts connections again; circuit half-open"
                );
            }
            if let Ok(permit) = breaker.acquire() {
                permit.success();
            }
        }
        Ok(())
    }

    /// Opens `count` connections concurrently through the breaker and adds
    /// them to the pool.
    async fn open_many(&self, count: u32) -> Vec<Arc<ConnectError>> {
        let mut set = JoinSet::new();
        for _ in 0..count {
            let manager = self.inner.manager.clone();
            set.spawn(async move { manager.connect_guarded().await });
        }
        let mut errors = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(conn)) => self.add(conn),
                Ok(Err(e)) => errors.push(e),
                Err(_) => {}
            }
        }
        errors
    }

    /// Brings the pool back to `min_idle`. While the breaker is open because
    /// connecting failed, probes the node directly and lets the breaker try
    /// again as soon as it answers. (A breaker opened for other reasons, e.g.
    /// shared with the connection layer and tripped by failing queries, is
    /// left to its open duration.)
    async fn refill(&self) -> Refill {
        let shared = &self.inner.shared;
        let mut outcome = Refill::Healthy;
        if let Some(breaker) = &shared.breaker {
            match breaker.state() {
                BreakerState::ForcedOpen => return Refill::Healthy,
                BreakerState::Open if !shared.connect_failing.load(Ordering::Acquire) => {
                    return Refill::Healthy;
                }
                BreakerState::Open if self.reopen().await.is_err() => return Refill::Failed,
                _ => {}
            }
        }
        let connecting = u64::from(shared.connecting.load(Ordering::Relaxed));
        let present = shared.stats.live.load(Ordering::Relaxed) + connecting;
        // Up to min_idle, and one for each caller still waiting for a
        // connection (bb8 tries only once for them).
        let waiting = u64::from(shared.waiters.load(Ordering::Relaxed)).saturating_sub(connecting);
        let room = u64::from(shared.settings.max_size).saturating_sub(present);
        let mut missing = u64::from(shared.settings.min_idle)
            .saturating_sub(present)
            .max(waiting)
            .min(room);
        let half_open = shared
            .breaker
            .as_ref()
            .is_some_and(|b| b.state() == BreakerState::HalfOpen);
        if half_open {
            missing = missing.max(1);
            outcome = Refill::Retry;
        }
        if missing == 0 {
            return outcome;
        }
        let missing = u32::try_from(missing).unwrap_or(u32::MAX);
        let errors = self.open_many(missing).await;
        if errors.iter().any(|e| !e.is_circuit_open()) {
            Refill::Failed
        } else if !errors.is_empty() {
            Refill::Retry
        } else {
            outcome
        }
    }

    async fn warm_up(&self) -> Result<(), Arc<ConnectError>> {
        let min_idle = self.inner.shared.settings.min_idle;
        let mut errors = self.open_many(min_idle).await;
        match errors.pop() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn spawn_housekeeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let shared = Arc::clone(&self.inner.shared);
        tokio::spawn(housekeeper(weak, shared));
    }
}

/// What a refill round found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refill {
    Healthy,
    /// The breaker held some attempts back; try again soon.
    Retry,
    /// The node did not answer: back off.
    Failed,
}

/// The background task: lifetimes and idle timeouts, leak reports, and
/// refilling (with backoff while the node is down).
async fn housekeeper(pool: Weak<PoolInner>, shared: Arc<Shared>) {
    let mut failures: u32 = 0;
    let mut delay = Duration::ZERO;
    loop {
        let (interval, backoff) = match pool.upgrade() {
            Some(inner) => (inner.housekeeping_interval, inner.reconnect),
            None => return,
        };
        if failures > 0 {
            // Backing off: wake-ups do not cut the delay short.
            tokio::time::sleep(delay).await;
        } else {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = shared.wake.notified() => {}
            }
        }
        let Some(inner) = pool.upgrade() else {
            return;
        };
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        let pool_handle = Pool { inner };
        pool_handle.sweep();
        shared.leaks.scan(&shared.label, &shared.stats);
        shared.stats.publish_gauges();
        match pool_handle.refill().await {
            Refill::Healthy => {
                if failures > 0 {
                    tracing::info!(node = %shared.label, "node reachable again; pool refilled");
                }
                failures = 0;
            }
            Refill::Retry => {
                failures = failures.max(1);
                delay = backoff.initial();
            }
            Refill::Failed => {
                failures = failures.saturating_add(1);
                delay = backoff.delay(failures, delay);
                if failures == 1 {
                    tracing::warn!(
                        node = %shared.label,
                        error = ?shared.last_error().map(|l| l.error.to_string()),
                        "cannot open connections; retrying in the background with backoff"
                    );
                }
            }
        }
        drop(pool_handle);
    }
}

/// Resolves when the breaker stops letting calls through; never when there
/// is no breaker. The watch guard never lives across an await.
async fn wait_until_open(state: &mut Option<watch::Receiver<BreakerState>>) {
    let open = match state {
        Some(rx) => rx.wait_for(|s| !s.allows_calls()).await.is_ok(),
        None => false,
    };
    if !open {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the pool is closed.
async fn wait_until_closed(closed: &mut watch::Receiver<bool>) {
    if closed.wait_for(|closed| *closed).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What a connection's local checks found.
enum Check {
    /// Fit for use.
    Fit,
    /// Fit, but idle long enough that it is pinged first.
    Ping,
    /// Not to be reused.
    Unfit(CloseReason),
}

/// The local checks of a connection about to be handed out at `now`
/// (socket, session state, lifetime, generation); clears its statement
/// cache when the pool's was cleared.
fn check(shared: &Shared, conn: &mut PgConnection, now: Instant) -> Check {
    if let Some(reason) = shared.unfit(conn, now) {
        return Check::Unfit(reason);
    }
    let cache_generation = shared.cache_generation.load(Ordering::Acquire);
    if conn.cache_generation < cache_generation {
        conn.clear_statement_cache();
        conn.cache_generation = cache_generation;
    }
    let ping = match shared.settings.checkout_validation {
        CheckoutValidation::Always => true,
        CheckoutValidation::Never => false,
        CheckoutValidation::IdlePing => {
            now.saturating_duration_since(conn.last_used)
                >= shared.settings.validation_idle_threshold
        }
    };
    if ping { Check::Ping } else { Check::Fit }
}

/// Checks a connection before it is handed out; the time of the check.
async fn validate(shared: &Shared, conn: &mut PgConnection) -> Result<Instant, CloseReason> {
    let now = Instant::now();
    match check(shared, conn, now) {
        Check::Fit => Ok(now),
        Check::Unfit(reason) => Err(reason),
        Check::Ping => {
            // Flagged while the ping is out: a checkout that times out (or is
            // dropped) mid-ping closes the connection instead of returning it.
            conn.close_reason = Some(CloseReason::Broken);
            let check = conn.client.check_connection();
            match tokio::time::timeout(shared.settings.connect_timeout, check).await {
                Ok(Ok(())) => conn.close_reason = None,
                _ => return Err(CloseReason::Broken),
            }
            Ok(Instant::now())
        }
    }
}

/// Counts a checkout waiting inside bb8 while it waits, so that a connection
/// parked meanwhile wakes it ([`Shared::park`]).
struct WaitingInBb8<'a>(&'a Shared);

impl<'a> WaitingInBb8<'a> {
    /// `None` when a parked connection is there to take instead.
    fn register(shared: &'a Shared) -> Option<Self> {
        let mut parked = shared.lock_parked();
        if !parked.conns.is_empty() {
            return None;
        }
        parked.waiting_in_bb8 += 1;
        Some(WaitingInBb8(shared))
    }
}

impl Drop for WaitingInBb8<'_> {
    fn drop(&mut self) {
        let mut parked = self.0.lock_parked();
        parked.waiting_in_bb8 = parked.waiting_in_bb8.saturating_sub(1);
    }
}

/// Polls a future once.
fn now_or_never<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// Where the breaker comes from.
#[derive(Clone, Debug)]
enum BreakerChoice {
    None,
    Settings(CircuitBreakerSettings),
    Shared(CircuitBreaker),
}

/// Builds a [`Pool`]; start from [`Pool::builder`] or [`PoolBuilder::from_config`].
#[derive(Clone, Debug)]
#[must_use]
pub struct PoolBuilder {
    node: NodeSettings,
    name: Option<String>,
    pool: PoolSettings,
    tls: TlsSettings,
    keepalive: KeepaliveSettings,
    query: QuerySettings,
    retry: RetrySettings,
    breaker: BreakerChoice,
    housekeeping_interval: Option<Duration>,
    cleanup_timeout: Option<Duration>,
}

impl PoolBuilder {
    /// A builder for `node` with default settings and a circuit breaker.
    pub fn new(node: NodeSettings) -> Self {
        PoolBuilder {
            node,
            name: None,
            pool: PoolSettings::default(),
            tls: TlsSettings::default(),
            keepalive: KeepaliveSettings::default(),
            query: QuerySettings::default(),
            retry: RetrySettings::default(),
            breaker: BreakerChoice::Settings(CircuitBreakerSettings::default()),
            housekeeping_interval: None,
            cleanup_timeout: None,
        }
    }

    /// A builder for `node` (the primary or one of the replicas) taking every
    /// other section from `config`; the breaker follows
    /// `features.circuit_breaker`.
    pub fn from_config(config: &DatabaseConfig, node: &NodeSettings) -> Self {
        PoolBuilder {
            node: node.clone(),
            name: None,
            pool: config.pool.clone(),
            tls: config.tls.clone(),
            keepalive: config.keepalive.clone(),
            query: config.query.clone(),
            retry: config.retry.clone(),
            breaker: if config.features.circuit_breaker {
                BreakerChoice::Settings(config.circuit_breaker.clone())
            } else {
                BreakerChoice::None
            },
            housekeeping_interval: None,
            cleanup_timeout: None,
        }
    }

    /// The node's name in metrics, logs and the breaker (e.g. `"primary"`);
    /// `host:port/database` by default.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Pool sizing, timeouts and checkout validation.
    pub fn pool_settings(mut self, settings: PoolSettings) -> Self {
        self.pool = settings;
        self
    }

    /// TLS mode and root certificate.
    pub fn tls(mut self, settings: TlsSettings) -> Self {
        self.tls = settings;
        self
    }

    /// TCP keepalive.
    pub fn keepalive(mut self, settings: KeepaliveSettings) -> Self {
        self.keepalive = settings;
        self
    }

    /// `application_name`, `statement_timeout` and prepared statements.
    pub fn query_settings(mut self, settings: QuerySettings) -> Self {
        self.query = settings;
        self
    }

    /// The backoff between reconnection attempts while the node is down
    /// (`initial_backoff`, `max_backoff`, `multiplier`, `jitter`).
    pub fn reconnect_backoff(mut self, settings: RetrySettings) -> Self {
        self.retry = settings;
        self
    }

    /// A breaker of its own, built from `settings`.
    pub fn circuit_breaker_settings(mut self, settings: CircuitBreakerSettings) -> Self {
        self.breaker = BreakerChoice::Settings(settings);
        self
    }

    /// Shares `breaker` (e.g. the connection layer's breaker for this node).
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = BreakerChoice::Shared(breaker);
        self
    }

    /// No circuit breaker: checkouts wait out the acquire timeout while the
    /// node is down.
    pub fn without_circuit_breaker(mut self) -> Self {
        self.breaker = BreakerChoice::None;
        self
    }

    /// How often the background task closes expired and surplus idle
    /// connections, looks for leaks and refills `min_idle` (default 1 s,
    /// shortened to half the leak threshold).
    pub fn housekeeping_interval(mut self, interval: Duration) -> Self {
        self.housekeeping_interval = Some(interval);
        self
    }

    /// The longest a `ROLLBACK` of a connection returned in an unknown state
    /// may take before the connection is closed instead (default:
    /// `pool.connect_timeout`).
    pub fn cleanup_timeout(mut self, timeout: Duration) -> Self {
        self.cleanup_timeout = Some(timeout);
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pool;
        let invalid = |key, value: String, problem| {
            Err(ConfigError::Invalid {
                key,
                value,
                problem,
            })
        };
        if p.max_size == 0 {
            return invalid("pool.max_size", "0".into(), "must be at least 1");
        }
        if p.min_idle > p.max_size {
            return invalid(
                "pool.min_idle",
                p.min_idle.to_string(),
                "must not exceed pool.max_size; lower min_idle or raise max_size",
            );
        }
        let zero = |d: Duration| d.is_zero();
        if zero(p.acquire_timeout) {
            return invalid(
                "pool.acquire_timeout",
                "0s".into(),
                "must be above zero (e.g. \"10s\")",
            );
        }
        if zero(p.connect_timeout) {
            return invalid(
                "pool.connect_timeout",
                "0s".into(),
                "must be above zero (e.g. \"5s\")",
            );
        }
        if p.idle_timeout.is_some_and(zero) {
            return invalid(
                "pool.idle_timeout",
                "0s".into(),
                "must be above zero; leave it unset to keep idle connections",
            );
        }
        if p.max_lifetime.is_some_and(zero) {
            return invalid(
                "pool.max_lifetime",
                "0s".into(),
                "must be above zero; leave it unset to keep connections forever",
            );
        }
        if p.max_lifetime
            .is_some_and(|lifetime| p.max_lifetime_jitter >= lifetime)
        {
            return invalid(
                "pool.max_lifetime_jitter",
                format!("{:?}", p.max_lifetime_jitter),
                "must be shorter than pool.max_lifetime (at most half of it is used)",
            );
        }
        if p.leak_detection_threshold.is_some_and(zero) {
            return invalid(
                "pool.leak_detection_threshold",
                "0s".into(),
                "must be above zero; leave it unset to turn leak detection off",
            );
        }
        if self.node.host.is_empty() {
            return invalid("host", String::new(), "names no host; set the node's host");
        }
        if self.query.application_name.contains('\0') {
            return invalid(
                "query.application_name",
                self.query.application_name.escape_default().to_string(),
                "must not contain NUL characters",
            );
        }
        Ok(())
    }

    fn postgres_config(&self) -> tokio_postgres::Config {
        let node = &self.node;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&node.host)
            .port(node.port)
            .dbname(&node.database)
            .user(&node.user)
            .application_name(&self.query.application_name)
            .ssl_mode(tls::ssl_mode(self.tls.mode))
            .connect_timeout(self.pool.connect_timeout)
            .keepalives(self.keepalive.enabled);
        if self.keepalive.enabled {
            config
                .keepalives_idle(self.keepalive.idle)
                .keepalives_interval(self.keepalive.interval)
                .keepalives_retries(self.keepalive.retries);
        }
        if let Some(timeout) = self.keepalive.tcp_user_timeout {
            config.tcp_user_timeout(timeout);
        }
        if let Some(password) = &node.password {
            config.password(password.expose());
        }
        if let Some(timeout) = self.query.statement_timeout {
            // Sent in the startup packet: no extra round trip.
            config.options(format!("-c statement_timeout={}", timeout.as_millis()));
        }
        config
    }

    fn build_pool(self) -> Result<Pool, PoolError> {
        self.validate()?;
        let label: Arc<str> = match &self.name {
            Some(name) => name.as_str().into(),
            None => format!(
                "{}:{}/{}",
                self.node.host, self.node.port, self.node.database
            )
            .into(),
        };
        let display: Arc<str> = match &self.name {
            Some(name) => format!("{name} ({})", self.node.redacted_url()).into(),
            None => self.node.redacted_url().into(),
        };
        let breaker = match &self.breaker {
            BreakerChoice::None => None,
            BreakerChoice::Shared(breaker) => Some(breaker.clone()),
            BreakerChoice::Settings(settings) => {
                Some(CircuitBreaker::new(Arc::clone(&label), settings).map_err(ConfigError::from)?)
            }
        };
        let tls = tls::connector(&self.tls)?;
        let settings = self.pool.clone();
        let housekeeping_interval = {
            let base = self.housekeeping_interval.unwrap_or(Duration::from_secs(1));
            match settings.leak_detection_threshold {
                Some(threshold) => base.min(threshold / 2),
                None => base,
            }
            .max(Duration::from_millis(10))
        };
        let shared = Arc::new(Shared {
            stats: Stats::new(&label, settings.max_size),
            label,
            display,
            node: self.node.clone(),
            tls: tls.clone(),
            leaks: Leaks::new(settings.leak_detection_threshold),
            cache_statements: self.query.prepared_statements,
            cleanup_timeout: self.cleanup_timeout.unwrap_or(settings.connect_timeout),
            generation: AtomicU64::new(0),
            cache_generation: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            closed: watch::Sender::new(false),
            waiters: AtomicU32::new(0),
            connecting: AtomicU32::new(0),
            last_error: Mutex::new(None),
            connect_failing: AtomicBool::new(false),
            breaker,
            wake: Notify::new(),
            returning: watch::Sender::new(0),
            parked: Mutex::new(Parked {
                conns: std::collections::VecDeque::with_capacity(settings.max_size as usize),
                waiting_in_bb8: 0,
            }),
            parked_ready: Notify::new(),
            settings,
        });
        let config = self.postgres_config();
        let manager = Manager {
            postgres: PostgresConnectionManager::new(config.clone(), tls),
            config: Arc::new(config),
            shared: Arc::clone(&shared),
        };
        let s = &shared.settings;
        let bb8 = bb8::Pool::builder()
            .max_size(s.max_size)
            .min_idle(None)
            .test_on_check_out(false)
            .max_lifetime(None)
            .idle_timeout(None)
            .connection_timeout(s.acquire_timeout + Duration::from_secs(1))
            .retry_connection(false)
            .queue_strategy(bb8::QueueStrategy::Fifo)
            .build_unchecked(manager.clone());
        let gate = Arc::new(Semaphore::new(s.max_size as usize));
        let reconnect = Backoff::new(
            self.retry.initial_backoff,
            self.retry.max_backoff,
            self.retry.multiplier,
            self.retry.jitter,
        );
        let pool = Pool {
            inner: Arc::new(PoolInner {
                bb8,
                manager,
                shared,
                gate,
                housekeeping_interval,
                reconnect,
            }),
        };
        pool.spawn_housekeeper();
        Ok(pool)
    }

    /// Builds the pool and opens `min_idle` connections before returning.
    /// Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`PoolError::Config`] for invalid settings (each naming the key, the
    /// value and the fix), [`PoolError::Connect`] when the node cannot be
    /// reached.
    pub async fn build(self) -> Result<Pool, PoolError> {
        let pool = self.build_pool()?;
        pool.warm_up().await?;
        Ok(pool)
    }

    /// Builds the pool without waiting for connections; `min_idle` is filled
    /// in the background. Must run inside a tokio runtime.
    ///
    /// # Errors
    /// [`PoolError::Config`] for invalid settings.
    pub fn build_lazy(self) -> Result<Pool, PoolError> {
        let pool = self.build_pool()?;
        pool.inner.shared.wake.notify_one();
        Ok(pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_spread_over_the_jitter() {
        let lifetime = Duration::from_secs(1800);
        let jitter = Duration::from_secs(60);
        assert_eq!(jittered_lifetime(lifetime, jitter, 0.0), lifetime);
        assert_eq!(
            jittered_lifetime(lifetime, jitter, 0.5),
            Duration::from_secs(1770)
        );
        assert_eq!(
            jittered_lifetime(lifetime, jitter, 1.0),
            Duration::from_secs(1740)
        );
        // Never more than half the lifetime is taken off.
        let short = Duration::from_secs(10);
        assert_eq!(
            jittered_lifetime(short, Duration::from_secs(60), 1.0),
            Duration::from_secs(5)
        );
        // Random samples land in the window and differ.
        let samples: Vec<Duration> = (0..100)
            .map(|_| jittered_lifetime(lifetime, jitter, rand::random()))
            .collect();
        assert!(
            samples
                .iter()
                .all(|d| *d > Duration::from_secs(1740) && *d <= lifetime)
        );
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 90, "lifetimes must differ per connection");
    }

    #[test]
    fn phases_map_from_their_codes() {
        assert_eq!(phase_of(PHASE_WAITING), AcquirePhase::WaitingForConnection);
        assert_eq!(phase_of(PHASE_CONNECTING), AcquirePhase::Connecting);
        assert_eq!(phase_of(PHASE_VALIDATING), AcquirePhase::Validating);
    }
}
