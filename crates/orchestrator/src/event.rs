//! Progress of a start, for logs, progress bars and tests.

use std::time::Duration;

/// A step of [`crate::Orchestrator::start`], given to the callback set with
/// [`crate::OrchestratorBuilder::on_event`]. Every event is also logged.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum StartEvent {
    /// The configuration is valid.
    Validated,
    /// The database could not be reached; the start waits and tries again.
    WaitingForDatabase {
        /// Attempts made so far.
        attempt: u32,
        /// Time waited so far.
        waited: Duration,
        /// The wait allowed.
        limit: Duration,
        /// What the last attempt reported.
        error: String,
    },
    /// The cluster is connected and its primary found.
    Connected {
        /// Attempts it took.
        attempts: u32,
        /// Time it took.
        elapsed: Duration,
    },
    /// A node's pool holds its `min_idle` connections (or could not open them).
    WarmedUp {
        /// The node.
        node: String,
        /// Connections opened.
        connections: u32,
        /// Why the warm-up stopped short, if it did.
        error: Option<String>,
    },
    /// A node is not in the role the configuration gives it.
    RoleWarning(String),
    /// A migration is being applied.
    Migrating {
        /// Its version.
        version: i64,
        /// Its description.
        description: String,
    },
    /// Migrations were applied (none when the schema was up to date).
    Migrated {
        /// The versions applied.
        applied: Vec<i64>,
    },
    /// The health monitor ran its first round and runs in the background.
    MonitorStarted {
        /// The first round's verdict: `healthy`, `degraded` or `unhealthy`.
        status: String,
    },
    /// The start is done.
    Ready {
        /// How long it took.
        elapsed: Duration,
    },
}
