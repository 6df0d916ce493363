//! The health report: overall status with reasons, per-node detail,
//! history, active alerts and recommendations.

use std::fmt;
use std::time::{Duration, SystemTime};

use pgstack_connection::BreakerState;
use pgstack_connection::{Role, WalPosition};
use serde::Serialize;

use crate::alert::ActiveAlert;
use crate::history::LatencySummary;

/// Healthy, degraded or unhealthy; for a node and for the cluster.
///
/// As the `pgstack_health_status` gauge: 0 healthy, 1 degraded, 2 unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Everything answers within the limits.
    Healthy,
    /// Working, with problems: a replica down or lagging, a saturated pool,
    /// slow probes, an open breaker, server connections near the limit.
    Degraded,
    /// Not working: the node does not answer (for the cluster: the primary
    /// does not, or no node does).
    Unhealthy,
}

impl HealthStatus {
    /// `healthy`, `degraded` or `unhealthy`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }

    /// The value of the `pgstack_health_status` gauge: 0 healthy,
    /// 1 degraded, 2 unhealthy.
    pub fn gauge_value(self) -> f64 {
        match self {
            HealthStatus::Healthy => 0.0,
            HealthStatus::Degraded => 1.0,
            HealthStatus::Unhealthy => 2.0,
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a [`Reason`], for code that reacts to reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReasonKind {
    /// The node did not answer the probe.
    NodeDown,
    /// The replica lags more than `health.max_replica_lag`.
    ReplicaLag,
    /// The replica is out of read routing.
    Ejected,
    /// The node's pool is (nearly) exhausted.
    PoolSaturated,
    /// The probes' p99 latency is over the threshold.
    LatencyHigh,
    /// The server's connections are near `max_connections`.
    ConnectionsNearMax,
    /// The node's circuit breaker rejects calls.
    BreakerOpen,
    /// The node's role is not the expected one (the primary in recovery, a
    /// replica accepting writes).
    RoleMismatch,
}

/// Why a node or the cluster is not healthy.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Reason {
    /// What kind of problem.
    pub kind: ReasonKind,
    /// The node it concerns.
    pub node: String,
    /// A short, human-readable explanation (passwords redacted).
    pub message: String,
}

/// The figures of a node's pool, from [`pgstack_pool::Pool::status`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PoolFigures {
    /// Open connections.
    pub size: u32,
    /// Idle connections.
    pub idle: u32,
    /// Connections checked out.
    pub in_use: u32,
    /// Callers waiting for a connection.
    pub waiters: u32,
    /// `pool.max_size`.
    pub max_size: u32,
    /// Checkouts that timed out since the pool was built.
    pub timeouts: u64,
    /// Checkouts refused by the open breaker since the pool was built.
    pub rejected: u64,
    /// `in_use / max_size`.
    pub utilization: f64,
    /// How long the pool has been saturated (see
    /// [`crate::HealthThresholds::pool_saturation`]), if it is.
    #[serde(
        rename = "saturated_for_seconds",
        serialize_with = "crate::ser::opt_secs"
    )]
    pub saturated_for: Option<Duration>,
    /// The pool's last error opening a connection in the background (passwords redacted).
    pub last_connect_error: Option<String>,
    /// How long ago that error happened.
    #[serde(
        rename = "last_connect_error_age_seconds",
        serialize_with = "crate::ser::opt_secs"
    )]
    pub last_connect_error_age: Option<Duration>,
    /// Whether the pool failed to open a connection since the previous round
    /// while the node answered this round and the one before.
    pub new_connect_error: bool,
}

/// One node's health.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct NodeHealth {
    /// The node's name (`primary`, `replica-1`, ...).
    pub name: String,
    /// The role the configuration gave it.
    pub configured_role: Role,
    /// The role the last successful probe saw (in recovery or read-only:
    /// replica).
    pub observed_role: Option<Role>,
    /// Whether writes go to this node now.
    pub is_primary: bool,
    /// The node's status.
    pub status: HealthStatus,
    /// Why it is not healthy.
    pub reasons: Vec<Reason>,
    /// Whether the last probe got an answer.
    pub reachable: bool,
    /// The last probe's error (passwords redacted).
    pub error: Option<String>,
    /// How long the node has been unreachable.
    #[serde(rename = "down_for_seconds", serialize_with = "crate::ser::opt_secs")]
    pub down_for: Option<Duration>,
    /// Failed (or, for replicas, lagging) probes in a row.
    pub consecutive_failures: u32,
    /// Good probes in a row.
    pub consecutive_successes: u32,
    /// Whether the node is out of read routing.
    pub ejected: bool,
    /// Round-trip time of the last probe's `SELECT 1`.
    #[serde(rename = "latency_seconds", serialize_with = "crate::ser::opt_secs")]
    pub latency: Option<Duration>,
    /// Percentiles over the recent probes.
    #[serde(rename = "latency_history")]
    pub latency_summary: LatencySummary,
    /// Replay lag in time (replicas).
    #[serde(
        rename = "replica_lag_seconds",
        serialize_with = "crate::ser::opt_secs"
    )]
    pub replica_lag: Option<Duration>,
    /// How long the replica has lagged over the limit.
    #[serde(
        rename = "lagging_for_seconds",
        serialize_with = "crate::ser::opt_secs"
    )]
    pub lagging_for: Option<Duration>,
    /// Replay lag in bytes of WAL behind the primary (replicas).
    pub replica_lag_bytes: Option<u64>,
    /// The last replayed WAL position (replicas) or the current one (primary).
    pub wal_position: Option<WalPosition>,
    /// Client connections on the server (`pg_stat_activity`), all clients.
    pub server_connections: Option<u32>,
    /// The server's `max_connections`.
    pub max_connections: Option<u32>,
    /// The server's `superuser_reserved_connections` (not usable by others).
    pub reserved_connections: Option<u32>,
    /// The node's pool.
    pub pool: PoolFigures,
    /// The node's circuit breaker state, if it has one (serialized as
    /// `closed`, `open`, `half-open`, `forced open`, `forced closed`).
    #[serde(serialize_with = "crate::ser::opt_display")]
    pub breaker: Option<BreakerState>,
    /// Whether this round's probe moved an open breaker to half-open.
    pub breaker_probe_requested: bool,
}

impl NodeHealth {
    /// Server connections over the usable limit (`max_connections` minus the
    /// reserved ones), when both are known.
    pub fn server_connection_ratio(&self) -> Option<f64> {
        let used = self.server_connections?;
        let max = self.max_connections?;
        let usable = max
            .saturating_sub(self.reserved_connections.unwrap_or(0))
            .max(1);
        Some(f64::from(used) / f64::from(usable))
    }
}

/// One past round, for the report's history.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// When the round ran.
    #[serde(serialize_with = "crate::ser::rfc3339")]
    pub at: SystemTime,
    /// The cluster's status.
    pub status: HealthStatus,
    /// Nodes that did not answer.
    pub down: Vec<String>,
}

/// The outcome of one probe round over the whole cluster.
///
/// Serializes to JSON with serde; durations are in seconds (`*_seconds`
/// fields), times in RFC 3339. Node names and error texts carry no
/// passwords.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The cluster's status.
    pub status: HealthStatus,
    /// Why it is not healthy (every node's reasons).
    pub reasons: Vec<Reason>,
    /// When the round ran.
    #[serde(serialize_with = "crate::ser::rfc3339")]
    pub generated_at: SystemTime,
    /// Rounds run so far (this one included).
    pub round: u64,
    /// How long the round took.
    #[serde(rename = "round_seconds", serialize_with = "crate::ser::secs")]
    pub took: Duration,
    /// The node writes go to.
    pub primary: String,
    /// Every node, the configured primary first.
    pub nodes: Vec<NodeHealth>,
    /// Earlier rounds, oldest first (bounded), this one last.
    pub history: Vec<HistoryEntry>,
    /// Alerts firing now.
    pub alerts: Vec<ActiveAlert>,
    /// Short, actionable advice derived from this report.
    pub recommendations: Vec<String>,
}

impl HealthReport {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeHealth> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Whether the cluster is healthy.
    pub fn is_healthy(&self) -> bool {
        self.status == HealthStatus::Healthy
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Reports built by hand, for the pure logic's tests.

    use super::*;

    /// A healthy, reachable node.
    pub(crate) fn node(name: &str, is_primary: bool) -> NodeHealth {
        NodeHealth {
            name: name.to_owned(),
            configured_role: if is_primary {
                Role::Primary
            } else {
                Role::Replica
            },
            observed_role: Some(if is_primary {
                Role::Primary
            } else {
                Role::Replica
            }),
            is_primary,
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
            reachable: true,
            error: None,
            down_for: None,
            consecutive_failures: 0,
            consecutive_successes: 1,
            ejected: false,
            latency: Some(Duration::from_millis(1)),
            latency_summary: LatencySummary::default(),
            replica_lag: (!is_primary).then_some(Duration::ZERO),
            lagging_for: None,
            replica_lag_bytes: (!is_primary).then_some(0),
            wal_position: None,
            server_connections: Some(10),
            max_connections: Some(100),
            reserved_connections: Some(3),
            pool: PoolFigures {
                max_size: 10,
                ..PoolFigures::default()
            },
            breaker: Some(BreakerState::Closed),
            breaker_probe_requested: false,
        }
    }

    /// A report over `nodes`, statuses assessed with default limits.
    pub(crate) fn report(mut nodes: Vec<NodeHealth>) -> HealthReport {
        let settings = pgstack_config::HealthSettings::default();
        let thresholds = crate::HealthThresholds::default();
        for node in &mut nodes {
            let (status, reasons) = crate::assess::assess_node(node, &settings, &thresholds);
            node.status = status;
            node.reasons = reasons;
        }
        let (status, reasons) = crate::assess::assess_cluster(&nodes);
        HealthReport {
            status,
            reasons,
            generated_at: SystemTime::UNIX_EPOCH,
            round: 1,
            took: Duration::from_millis(2),
            primary: "primary".to_owned(),
            nodes,
            history: Vec::new(),
            alerts: Vec::new(),
            recommendations: Vec::new(),
        }
    }

    /// `node` made unreachable.
    pub(crate) fn down(mut node: NodeHealth) -> NodeHealth {
        node.reachable = false;
        node.error = Some("connection refused".to_owned());
        node.latency = None;
        node.replica_lag = None;
        node.replica_lag_bytes = None;
        node.server_connections = None;
        node.down_for = Some(Duration::from_secs(42));
        node
    }
}
