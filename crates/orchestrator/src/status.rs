//! What `status()` and `metrics()` report.

use std::fmt;
use std::time::Duration;

use pgstack_config::Environment;
use pgstack_connection::{ClusterMetrics, Role};
use pgstack_pool::PoolStatus;
use serde::Serialize;

/// Where the orchestrator is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LifecycleState {
    /// Validating, connecting (or waiting for the database), warming up,
    /// migrating. `start` returns only after this, so a handle sees it only
    /// in logs and through [`crate::StartEvent`]s.
    Starting,
    /// Running, and every node answers.
    Ready,
    /// Running, but a node is down, lagging, ejected or behind an open
    /// circuit breaker (or the primary is).
    Degraded,
    /// `shutdown` was called: new calls are refused, calls in flight finish
    /// until the deadline.
    ShuttingDown,
    /// Shut down: pools closed, monitor stopped.
    Stopped,
}

impl LifecycleState {
    /// `starting`, `ready`, `degraded`, `shutting_down` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Starting => "starting",
            LifecycleState::Ready => "ready",
            LifecycleState::Degraded => "degraded",
            LifecycleState::ShuttingDown => "shutting_down",
            LifecycleState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one node is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeHealth {
    /// It answers, in the expected role, within the lag limit.
    Healthy,
    /// It answers, but is lagging, ejected from reads, or not in its
    /// configured role.
    Degraded,
    /// It does not answer (or its circuit breaker is open).
    Unhealthy,
    /// Not checked (the orchestrator is stopped).
    Unknown,
}

impl NodeHealth {
    /// `healthy`, `degraded`, `unhealthy` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeHealth::Healthy => "healthy",
            NodeHealth::Degraded => "degraded",
            NodeHealth::Unhealthy => "unhealthy",
            NodeHealth::Unknown => "unknown",
        }
    }
}

impl fmt::Display for NodeHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node in a [`Status`].
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct NodeStatus {
    /// `primary`, `replica-1`, ...
    pub name: String,
    /// The role the configuration gave it.
    pub configured_role: Role,
    /// The role last seen (`pg_is_in_recovery()` and
    /// `transaction_read_only`: in recovery or read-only is a replica).
    pub observed_role: Option<Role>,
    /// Whether writes go to it now.
    pub is_primary: bool,
    /// How it is doing.
    pub health: NodeHealth,
    /// Why it is not healthy, when it is not.
    pub problem: Option<String>,
    /// Whether reads may go to it now.
    pub routable: bool,
    /// The circuit breaker's state (`closed`, `open`, `half-open`, ...).
    pub breaker: Option<String>,
    /// Replication lag in seconds, when measured (replicas).
    #[serde(serialize_with = "opt_secs")]
    pub replica_lag: Option<Duration>,
    /// The node's pool (the node's URL in it has no password).
    pub pool: PoolStatus,
}

/// The migrations as seen at start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MigrationSummary {
    /// Whether the start applied pending migrations (`migrations.auto_migrate`).
    pub auto_migrate: bool,
    /// Whether the state could be read (see `error` otherwise).
    pub checked: bool,
    /// Applied versions.
    pub applied: Vec<i64>,
    /// Versions in the folder, not applied.
    pub pending: Vec<i64>,
    /// The highest applied version.
    pub current_version: Option<i64>,
    /// Versions this start applied.
    pub applied_at_start: Vec<i64>,
    /// Versions in a state that needs attention (checksum mismatch, file
    /// missing, failed), with the state.
    pub problems: Vec<String>,
    /// Why the state could not be read (no folder, built without the
    /// `migrations` feature, database error).
    pub error: Option<String>,
}

/// A point-in-time report of the whole stack; serializable to JSON (no
/// password anywhere in it).
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// Where the orchestrator is in its life.
    pub state: LifecycleState,
    /// The environment whose profile is in use.
    pub environment: Environment,
    /// The `application_name` of this instance's sessions (see
    /// `docs/orchestrator.md`: it carries an instance tag).
    pub application_name: String,
    /// Time since the start began, in seconds.
    #[serde(serialize_with = "secs")]
    pub uptime: Duration,
    /// How long the start took, in seconds.
    #[serde(serialize_with = "secs")]
    pub startup: Duration,
    /// Every node: the configured primary first.
    pub nodes: Vec<NodeStatus>,
    /// The migrations.
    pub migrations: MigrationSummary,
    /// Problems found when the node roles were verified at start.
    pub role_warnings: Vec<String>,
    /// Calls running now.
    pub in_flight: u64,
    /// The health monitor's latest report (history, alerts,
    /// recommendations), when it runs.
    #[cfg(feature = "health")]
    pub monitor: Option<pgstack_health::HealthReport>,
}

impl Status {
    /// The overall health: `Unhealthy` when stopped, shutting down or the
    /// primary is down; `Degraded` when another node is not healthy;
    /// `Healthy` otherwise.
    pub fn health(&self) -> NodeHealth {
        match self.state {
            LifecycleState::ShuttingDown | LifecycleState::Stopped | LifecycleState::Starting => {
                return NodeHealth::Unhealthy;
            }
            LifecycleState::Ready | LifecycleState::Degraded => {}
        }
        let primary_down = self
            .nodes
            .iter()
            .any(|n| n.is_primary && n.health == NodeHealth::Unhealthy);
        if primary_down {
            NodeHealth::Unhealthy
        } else if self.nodes.iter().all(|n| n.health == NodeHealth::Healthy) {
            NodeHealth::Healthy
        } else {
            NodeHealth::Degraded
        }
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// The short answer to "is the database layer usable?", for a health
/// endpoint: the overall health, the lifecycle state and each node's
/// health. Serializable to JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// `healthy`, `degraded` (serving, with a node down or lagging) or
    /// `unhealthy` (primary down, starting, shutting down or stopped).
    pub status: NodeHealth,
    /// Where the orchestrator is in its life.
    pub state: LifecycleState,
    /// Each node.
    pub nodes: Vec<NodeHealthEntry>,
}

impl Health {
    /// Whether the service can serve: healthy or degraded (a load balancer
    /// should keep sending traffic).
    pub fn is_serving(&self) -> bool {
        matches!(self.status, NodeHealth::Healthy | NodeHealth::Degraded)
    }
}

/// One node in a [`Health`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NodeHealthEntry {
    /// `primary`, `replica-1`, ...
    pub name: String,
    /// How it is doing.
    pub health: NodeHealth,
    /// Why it is not healthy, when it is not.
    pub problem: Option<String>,
}

impl From<&Status> for Health {
    fn from(status: &Status) -> Health {
        Health {
            status: status.health(),
            state: status.state,
            nodes: status
                .nodes
                .iter()
                .map(|n| NodeHealthEntry {
                    name: n.name.clone(),
                    health: n.health,
                    problem: n.problem.clone(),
                })
                .collect(),
        }
    }
}

/// Every figure of the stack in one snapshot ([`crate::Orchestrator::metrics`]).
/// The same figures go to the `metrics` facade as `pgstack_*` series.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Metrics {
    /// Where the orchestrator is in its life.
    pub state: LifecycleState,
    /// Time since the start began, in seconds.
    #[serde(serialize_with = "secs")]
    pub uptime: Duration,
    /// How long the start took, in seconds.
    #[serde(serialize_with = "secs")]
    pub startup: Duration,
    /// Attempts to reach the database during the start.
    pub connect_attempts: u32,
    /// Migrations applied by the start.
    pub migrations_applied_at_start: usize,
    /// Calls running now.
    pub in_flight: u64,
    /// The cluster's figures: calls, failures, retries, latency, and per
    /// node its pool, breaker and routing state.
    pub cluster: ClusterMetrics,
    /// The health monitor's latest round, when it runs.
    #[cfg(feature = "health")]
    pub health: Option<MonitorSummary>,
}

/// The health monitor's latest round, in [`Metrics`].
#[cfg(feature = "health")]
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MonitorSummary {
    /// The cluster's verdict.
    pub status: pgstack_health::HealthStatus,
    /// Rounds run so far.
    pub round: u64,
    /// Alerts firing now.
    pub alerts: usize,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}
