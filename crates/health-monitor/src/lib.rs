//! Health monitoring for a pgstack [`Cluster`](pgstack_connection::Cluster):
//! probes, health reports, replica ejection, alert rules and alert sinks.
//!
//! - **Probes**: every `health.interval`, each node is probed on a
//!   connection of its own (the node's connect settings and TLS, outside its
//!   pool, so an exhausted pool cannot starve the probes and an open breaker
//!   cannot hide a node that answers again): the round trip of `SELECT 1`
//!   within `health.probe_timeout`, the role and replica lag in time and
//!   bytes as the cluster reads them ([`pgstack_connection::observe_replica`]:
//!   in recovery or read-only is a replica), server connections against
//!   `max_connections`, plus the node's pool figures and breaker state.
//! - **Reports** ([`HealthReport`]): healthy / degraded / unhealthy with the
//!   reasons, per-node detail, latency percentiles over a bounded history;
//!   serializable to JSON, passwords redacted.
//! - **Feeding the router**: observed roles, replay positions and lag go to
//!   each [`Node`](pgstack_connection::Node); replicas are ejected after
//!   `health.eject_after` bad probes in a row (no answer, or lag over
//!   `health.max_replica_lag`) and restored after `health.restore_after`
//!   good ones ([`Hysteresis`]). A node that answers while its breaker is
//!   open gets the breaker probing at once.
//! - **Alerts** ([`AlertRule`], [`AlertEngine`]): built-in rules for a node
//!   down, replica lag, pool saturation, p99 latency, server connections
//!   near `max_connections` and pool connect errors, plus your own; each
//!   fires once per cooldown while it holds and sends a resolution when it
//!   clears, to every [`AlertSink`] ([`TracingSink`] by default,
//!   [`ChannelSink`], your own).
//! - **Recommendations**: short advice lines in every report.
//! - **Metrics**: `pgstack_health_status{node}` (0 healthy, 1 degraded,
//!   2 unhealthy), `pgstack_replica_lag_seconds{node}` and the others listed
//!   in `docs/health.md`.
//!
//! # Quickstart
//!
//! ```no_run
//! use pgstack_config::DatabaseConfig;
//! use pgstack_connection::Cluster;
//! use pgstack_health::{AlertRule, ChannelSink, HealthMonitor, HealthStatus, Severity};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = DatabaseConfig::for_tests("postgres://app:secret@localhost/app")?;
//! let cluster = Cluster::connect(&config).await?;
//!
//! let (alerts, mut received) = ChannelSink::new(64);
//! let monitor = HealthMonitor::builder(cluster.clone(), &config)
//!     .sink(alerts) // besides the default tracing sink
//!     .rule(
//!         AlertRule::cluster("not-healthy", Severity::Low, |report| {
//!             (report.status != HealthStatus::Healthy).then(|| report.status.to_string())
//!         })
//!         .message("the database is not healthy"),
//!     )
//!     .start()
//!     .await?;
//!
//! // The latest report, at any time (the first round ran in `start`).
//! let report = monitor.report();
//! println!("{}", serde_json::to_string_pretty(&*report)?);
//! for line in &report.recommendations {
//!     println!("advice: {line}");
//! }
//!
//! // One round now (what `cargo xtask health` does), and alerts as they come.
//! let report = monitor.check_now().await?;
//! assert_eq!(report.nodes.len(), cluster.nodes().len());
//! if let Ok(alert) = received.try_recv() {
//!     println!("{alert}");
//! }
//!
//! // Graceful shutdown: stops promptly, closes the probe connections.
//! monitor.stop().await;
//! # Ok(()) }
//! ```
//!
//! See `docs/health.md` for the rules in full.

mod alert;
mod assess;
mod error;
mod history;
mod hysteresis;
mod monitor;
mod probe;
mod recommend;
mod redact;
mod report;
mod ser;
mod sink;
mod thresholds;

pub use crate::alert::{
    ActiveAlert, Alert, AlertEngine, AlertRule, AlertState, Breach, DEFAULT_COOLDOWN, Severity,
    builtin_rules, rules,
};
pub use crate::error::{Error, SinkError};
pub use crate::history::LatencySummary;
pub use crate::hysteresis::{Hysteresis, Verdict};
pub use crate::monitor::{
    ALERTS_METRIC, CLUSTER_STATUS_METRIC, HEALTH_STATUS_METRIC, HealthMonitor,
    HealthMonitorBuilder, PROBE_FAILURES_METRIC, PROBE_SECONDS_METRIC, REPLICA_LAG_METRIC,
};
pub use crate::recommend::recommendations;
pub use crate::report::{
    HealthReport, HealthStatus, HistoryEntry, NodeHealth, PoolFigures, Reason, ReasonKind,
};
pub use crate::sink::{AlertSink, ChannelSink, TracingSink};
pub use crate::thresholds::HealthThresholds;
pub use async_trait::async_trait;
