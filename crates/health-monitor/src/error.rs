//! The crate's errors.

/// What can go wrong when starting or asking the health monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Settings, thresholds or alert rules that cannot work; one entry per
    /// problem, each naming the key and the bad value.
    #[error("invalid health monitor settings: {}", .0.join("; "))]
    InvalidSettings(Vec<String>),
    /// The configuration given to the monitor does not describe the cluster
    /// (a different number of nodes).
    #[error(
        "the configuration names {configured} nodes but the cluster has {cluster}; \
         start the monitor with the configuration the cluster was built from"
    )]
    NodeMismatch {
        /// Nodes in the configuration (primary and replicas).
        configured: usize,
        /// Nodes in the cluster.
        cluster: usize,
    },
    /// The dedicated probe connection of a node could not be set up.
    #[error("cannot set up the probe connection of node `{node}`: {source}")]
    ProbePool {
        /// The node's name.
        node: String,
        /// What the pool reported.
        #[source]
        source: Box<pgstack_pool::PoolError>,
    },
    /// The monitor was started outside a tokio runtime.
    #[error("the health monitor needs a tokio runtime; start it from async code")]
    NoRuntime,
    /// The monitor was stopped; no more rounds run.
    #[error("the health monitor is stopped")]
    Stopped,
}

/// Why an alert sink could not deliver an alert.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The receiving side is gone.
    #[error("the receiver of alert sink `{sink}` is gone")]
    Closed {
        /// The sink's name.
        sink: String,
    },
    /// The sink's buffer is full; the alert was dropped.
    #[error("alert sink `{sink}` is full; the alert was dropped")]
    Full {
        /// The sink's name.
        sink: String,
    },
    /// Any other failure (a webhook that answered 500, ...).
    #[error("alert sink `{sink}` failed: {source}")]
    Failed {
        /// The sink's name.
        sink: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
