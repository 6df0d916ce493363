//! One node of the cluster: its pool, its breaker, its role, the routing
//! inputs a health monitor feeds, and its shared (pipelined) connections.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use pgstack_pool::Pool;
use pgstack_resilience::CircuitBreaker;
use serde::Serialize;

use crate::lanes::Lanes;
use crate::route::WalPosition;

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Role {
    /// Accepts writes (`pg_is_in_recovery()` is false and the session is not
    /// read-only).
    Primary,
    /// A standby in recovery, or a read-only server.
    Replica,
}

impl Role {
    /// `primary` or `replica`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const ROLE_UNKNOWN: u8 = 0;
const ROLE_PRIMARY: u8 = 1;
const ROLE_REPLICA: u8 = 2;
/// "Not measured" for lag and positions.
const UNKNOWN: u64 = u64::MAX;

/// A handle to one node: name, roles, pool, breaker, and the routing inputs
/// (ejection, replica lag, replay position).
///
/// Cheap to clone. The setters are single atomic stores, meant to be called
/// by a health monitor on every probe; routing reads them on every call.
///
/// | input | set with | effect on `Route::Read` |
/// |---|---|---|
/// | ejected | [`Node::eject`] / [`Node::restore`] | an ejected replica gets no reads |
/// | lag (time) | [`Node::set_replica_lag`] | above `health.max_replica_lag`: no reads; unknown: allowed |
/// | lag (bytes) | [`Node::set_replica_lag_bytes`] | reported only |
/// | replay position | [`Node::set_replay_position`] | `Route::ReadAfter(p)` needs at least `p`; unknown: no |
/// | observed role | [`Node::set_observed_role`] | a node seen as primary gets no reads unless it is the primary |
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    pub(crate) configured: Role,
    observed: AtomicU8,
    pub(crate) pool: Pool,
    ejected: AtomicBool,
    /// Set by the cluster when a call saw the node fail; cleared by the
    /// background probe once the node answers again.
    pub(crate) suspect: AtomicBool,
    lag_millis: AtomicU64,
    lag_bytes: AtomicU64,
    replay_lsn: AtomicU64,
    /// The fingerprint of the server last observed (0: none yet).
    identity: AtomicU64,
    pub(crate) queries: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) lanes: Lanes,
    /// Where the node is, for OpenTelemetry's attributes.
    pub(crate) attributes: crate::telemetry::NodeAttributes,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("configured_role", &self.inner.configured)
            .field("observed_role", &self.observed_role())
            .field("ejected", &self.is_ejected())
            .field("suspect", &self.inner.suspect.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Node {
    pub(crate) fn new(
        index: usize,
        name: Arc<str>,
        configured: Role,
        pool: Pool,
        lanes: Lanes,
        attributes: crate::telemetry::NodeAttributes,
    ) -> Node {
        Node {
            inner: Arc::new(NodeInner {
                index,
                name,
                configured,
                observed: AtomicU8::new(ROLE_UNKNOWN),
                pool,
                ejected: AtomicBool::new(false),
                suspect: AtomicBool::new(false),
                lag_millis: AtomicU64::new(UNKNOWN),
                lag_bytes: AtomicU64::new(UNKNOWN),
                replay_lsn: AtomicU64::new(UNKNOWN),
                identity: AtomicU64::new(0),
                queries: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                lanes,
                attributes,
            }),
        }
    }

    /// The node's name: `primary` for the configured primary, `replica-1`,
    /// `replica-2`, ... for the replicas, in configuration order. It labels
    /// metrics, logs and errors.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// The role the configuration gave the node.
    pub fn configured_role(&self) -> Role {
        self.inner.configured
    }

    /// The role last seen with [`observe`](crate::observe) (when connections are
    /// made, on re-discovery, or as set by a monitor); `None` before the first
    /// look.
    pub fn observed_role(&self) -> Option<Role> {
        match self.inner.observed.load(Ordering::Acquire) {
            ROLE_PRIMARY => Some(Role::Primary),
            ROLE_REPLICA => Some(Role::Replica),
            _ => None,
        }
    }

    /// Records the role seen by a probe (`None`: unknown).
    pub fn set_observed_role(&self, role: Option<Role>) {
        let code = match role {
            Some(Role::Primary) => ROLE_PRIMARY,
            Some(Role::Replica) => ROLE_REPLICA,
            None => ROLE_UNKNOWN,
        };
        self.inner.observed.store(code, Ordering::Release);
    }

    /// The node's pool (its [`Pool::status`] for reports).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The node's circuit breaker (shared with its pool), if enabled.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.inner.pool.circuit_breaker()
    }

    /// Takes a replica out of read routing until [`Node::restore`]. Has no
    /// effect on writes: the primary is never ejected from them.
    pub fn eject(&self) {
        if !self.inner.ejected.swap(true, Ordering::AcqRel) {
            tracing::warn!(node = %self.inner.name, "node ejected from read routing");
        }
    }

    /// Puts an ejected node back into read routing.
    pub fn restore(&self) {
        if self.inner.ejected.swap(false, Ordering::AcqRel) {
            tracing::info!(node = %self.inner.name, "node restored to read routing");
        }
    }

    /// Whether the node is ejected.
    pub fn is_ejected(&self) -> bool {
        self.inner.ejected.load(Ordering::Acquire)
    }

    /// Whether a recent call saw the node fail and a background probe has
    /// not yet seen it answer again (such a node gets no reads).
    pub fn is_suspect(&self) -> bool {
        self.inner.suspect.load(Ordering::Acquire)
    }

    /// Records the replica's replay lag in time (`None`: unknown, which
    /// routing treats as within the limit).
    pub fn set_replica_lag(&self, lag: Option<Duration>) {
        let value = lag.map_or(UNKNOWN, |d| {
            u64::try_from(d.as_millis()).unwrap_or(UNKNOWN - 1)
        });
        self.inner.lag_millis.store(value, Ordering::Release);
    }

    /// The replay lag last recorded, at millisecond precision.
    pub fn replica_lag(&self) -> Option<Duration> {
        match self.inner.lag_millis.load(Ordering::Acquire) {
            UNKNOWN => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Records the replica's lag in bytes of WAL behind the primary.
    pub fn set_replica_lag_bytes(&self, bytes: Option<u64>) {
        self.inner.lag_bytes.store(
            bytes.map_or(UNKNOWN, |b| b.min(UNKNOWN - 1)),
            Ordering::Release,
        );
    }

    /// The lag in bytes last recorded.
    pub fn replica_lag_bytes(&self) -> Option<u64> {
        match self.inner.lag_bytes.load(Ordering::Acquire) {
            UNKNOWN => None,
            bytes => Some(bytes),
        }
    }

    /// Records the replica's last replayed WAL position
    /// (`pg_last_wal_replay_lsn()`). Positions only move forward: an older
    /// one is ignored unless `None` (unknown) was set in between.
    pub fn set_replay_position(&self, position: Option<WalPosition>) {
        match position {
            None => self.inner.replay_lsn.store(UNKNOWN, Ordering::Release),
            Some(p) => {
                let value = p.as_u64().min(UNKNOWN - 1);
                let _ = self.inner.replay_lsn.fetch_update(
                    Ordering::AcqRel,
                    Ordering::Acquire,
                    |old| (old == UNKNOWN || old < value).then_some(value),
                );
            }
        }
    }

    /// Records the identity of the server last observed; true when another
    /// one had been seen before.
    pub(crate) fn replace_identity(&self, identity: u64) -> bool {
        let old = self.inner.identity.swap(identity, Ordering::AcqRel);
        old != 0 && old != identity
    }

    /// Forgets the replay position and the identity last seen (after a
    /// change of roles: positions are compared afresh).
    pub(crate) fn forget_replication(&self) {
        self.inner.identity.store(0, Ordering::Release);
        self.set_replay_position(None);
    }

    /// The replay position last recorded.
    pub fn replay_position(&self) -> Option<WalPosition> {
        match self.inner.replay_lsn.load(Ordering::Acquire) {
            UNKNOWN => None,
            lsn => Some(WalPosition::from_u64(lsn)),
        }
    }

    /// Whether a read may go here, given the lag limit and, for
    /// read-your-writes, the position the read must see.
    pub(crate) fn readable(&self, max_lag: Duration, after: Option<WalPosition>) -> bool {
        let inner = &self.inner;
        if inner.ejected.load(Ordering::Acquire)
            || inner.suspect.load(Ordering::Acquire)
            || inner.observed.load(Ordering::Acquire) == ROLE_PRIMARY
        {
            return false;
        }
        if let Some(breaker) = inner.pool.circuit_breaker()
            && !breaker.state().allows_calls()
        {
            return false;
        }
        let lag = inner.lag_millis.load(Ordering::Acquire);
        if lag != UNKNOWN && u128::from(lag) > max_lag.as_millis() {
            return false;
        }
        match after {
            None => true,
            Some(p) => {
                let replayed = inner.replay_lsn.load(Ordering::Acquire);
                replayed != UNKNOWN && replayed >= p.as_u64()
            }
        }
    }

    /// Stops using the node's shared connections: calls in flight finish,
    /// new ones open fresh connections.
    pub(crate) fn retire_lanes(&self) {
        self.inner.lanes.retire_all();
    }
}
