//! Why a start failed.

use std::time::Duration;

use pgstack_config::{ConfigError, ConnectExplanation};

/// An error of any kind, as the cause of a failed connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why [`crate::Orchestrator::start`] failed. Whatever it had built by then
/// (pools, connections) is closed again before the error is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid; every problem is listed with its key,
    /// value and source (the configuration error says "invalid
    /// configuration" itself).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be reached and no wait was set: the start
    /// failed at once. The message is the cause first, then the fix (a
    /// missing database, a refused password, an unknown host, a closed port,
    /// a server without TLS, a port that does not speak PostgreSQL).
    #[error("{}", unreachable_text(.explanation.as_ref(), .source.as_ref()))]
    Unreachable {
        /// The cause and the fix, when the primary's login could be tried.
        explanation: Option<ConnectExplanation>,
        /// What connecting reported when there is no explanation (the
        /// cluster's error); `None` when the explanation says it all.
        #[source]
        source: Option<BoxError>,
    },
    /// The database did not become reachable within the wait.
    #[error(
        "the database did not become reachable within {waited:?} ({attempts} attempts); last: {}",
        last_text(.explanation.as_ref(), .source.as_ref())
    )]
    WaitTimedOut {
        /// How long the start waited.
        waited: Duration,
        /// How many times it tried to connect.
        attempts: u32,
        /// The last attempt's cause and fix, when the login could be tried.
        explanation: Option<ConnectExplanation>,
        /// The last attempt's error when there is no explanation.
        #[source]
        source: Option<BoxError>,
    },
    /// The cluster could not be built (settings the pool or the cluster
    /// refuse).
    #[error("the cluster could not be built: {0}")]
    Cluster(#[source] pgstack_connection::Error),
    /// Applying the pending migrations failed (or the migrations could not be
    /// read); the message names the file and the line.
    #[cfg(feature = "migrations")]
    #[error("migrations failed: {0}")]
    Migrations(#[source] pgstack_migrations::Error),
    /// The health monitor could not start (its settings, or its probe
    /// connections).
    #[cfg(feature = "health")]
    #[error("the health monitor could not start: {0}")]
    Health(#[source] pgstack_health::Error),
    /// The start options are inconsistent.
    #[error("invalid start option: {0}")]
    Options(String),
}

fn unreachable_text(explanation: Option<&ConnectExplanation>, source: Option<&BoxError>) -> String {
    match (explanation, source) {
        (Some(e), _) if e.problem.may_pass() => format!(
            "{e} (the start failed at once; set startup.wait_for_database to wait for the \
             database instead)"
        ),
        (Some(e), _) => e.to_string(),
        (None, Some(source)) => format!(
            "the database is not reachable: {source} (the start failed at once; set \
             startup.wait_for_database to wait for it)"
        ),
        (None, None) => "the database is not reachable".to_owned(),
    }
}

fn last_text(explanation: Option<&ConnectExplanation>, source: Option<&BoxError>) -> String {
    match (explanation, source) {
        (Some(e), _) => e.to_string(),
        (None, Some(source)) => source.to_string(),
        (None, None) => "no answer".to_owned(),
    }
}
