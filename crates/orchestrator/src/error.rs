//! Why a start failed.

use std::time::Duration;

use pgstack_config::ConfigError;

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
    /// failed at once.
    #[error(
        "the database is not reachable: {source} (start fails at once without a wait; \
         set a wait for the database to wait for it)"
    )]
    Unreachable {
        /// What connecting reported (an I/O error when the primary's port
        /// refused the connection, else the cluster's error).
        #[source]
        source: BoxError,
    },
    /// The database did not become reachable within the wait.
    #[error(
        "the database did not become reachable within {waited:?} ({attempts} attempts); \
         last error: {source}"
    )]
    WaitTimedOut {
        /// How long the start waited.
        waited: Duration,
        /// How many times it tried to connect.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: BoxError,
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
