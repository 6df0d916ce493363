//! Options of a start given in code (they take precedence over the configuration).

use std::time::Duration;

/// How [`crate::Orchestrator`] starts.
///
/// ```
/// use std::time::Duration;
/// use pgstack_orchestrator::StartOptions;
///
/// // Wait up to a minute for the database (a container starting next to it).
/// let options = StartOptions::new().wait_for_database(Duration::from_secs(60));
/// assert_eq!(options.wait, Some(Duration::from_secs(60)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartOptions {
    /// How long the start waits for the database to accept connections.
    /// `None` (the default) defers to the configuration's
    /// `startup.wait_for_database`; when that is unset too, or the wait is
    /// zero ([`StartOptions::fail_fast`]), the start fails at once with
    /// [`crate::StartError::Unreachable`].
    pub wait: Option<Duration>,
    /// Open `pool.min_idle` connections on every node before reporting
    /// ready (default: on).
    pub warm_up: bool,
    /// Shared (pipelined) connections per node, as
    /// `ClusterBuilder::shared_connections`; `None` keeps
    /// `query.shared_connections`, else the cluster's default.
    pub shared_connections: Option<usize>,
}

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            wait: None,
            warm_up: true,
            shared_connections: None,
        }
    }
}

impl StartOptions {
    /// The defaults: fail fast, warm the pools.
    pub fn new() -> Self {
        StartOptions::default()
    }

    /// Waits up to `wait` for the database to accept connections, retrying
    /// with backoff and logging progress.
    #[must_use]
    pub fn wait_for_database(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Fails at once when the database cannot be reached, whatever
    /// `startup.wait_for_database` says (stored as a zero wait).
    #[must_use]
    pub fn fail_fast(mut self) -> Self {
        self.wait = Some(Duration::ZERO);
        self
    }

    /// Whether to open `pool.min_idle` connections per node before ready.
    #[must_use]
    pub fn warm_up(mut self, warm_up: bool) -> Self {
        self.warm_up = warm_up;
        self
    }

    /// Shared (pipelined) connections per node for autocommit statements.
    #[must_use]
    pub fn shared_connections(mut self, per_node: usize) -> Self {
        self.shared_connections = Some(per_node);
        self
    }
}
