//! [`ClusterBuilder`]: pools per node, the primary found, background work started.

use super::*;

/// Builds a [`Cluster`]; start from [`Cluster::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct ClusterBuilder {
    pub(super) config: DatabaseConfig,
    pub(super) lanes: Option<usize>,
    pub(super) replication_probe: Option<Duration>,
    pub(super) busy_after: Duration,
}

impl ClusterBuilder {
    /// Shared (pipelined) connections per node for autocommit statements;
    /// 0 gives every statement a connection of its own. Default:
    /// `query.shared_connections` when set, else a quarter of
    /// `pool.max_size`, between 1 and 4 (none when `max_size` is below 3).
    pub fn shared_connections(mut self, per_node: usize) -> Self {
        self.lanes = Some(per_node);
        self
    }

    /// How long a shared connection may go without a reply, with
    /// statements in flight, before it counts as busy (stuck behind a long
    /// statement) and new statements go elsewhere; statements that usually
    /// take longer than this run on a connection of their own. Default:
    /// 5 ms.
    pub fn busy_after(mut self, threshold: Duration) -> Self {
        self.busy_after = threshold;
        self
    }

    /// Measures each replica's replay position and lag every `interval` in
    /// the background (see [`Cluster::refresh_replication`]). Off by default:
    /// the health monitor feeds the same inputs when it runs.
    pub fn replication_probe(mut self, interval: Duration) -> Self {
        self.replication_probe = Some(interval);
        self
    }

    pub(super) fn default_lanes(max_size: u32) -> usize {
        if max_size < 3 {
            0
        } else {
            (max_size as usize / 4).clamp(1, 4)
        }
    }

    /// Builds the pools (without waiting for connections), finds the
    /// writable primary ([`observe`]) among the configured nodes, and
    /// starts the background work.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings, [`Error::NoPrimary`] when no
    /// configured node accepts writes.
    pub async fn build(self) -> Result<Cluster, Error> {
        let config = &self.config;
        let retry =
            RetryPolicy::from_settings(&config.retry).map_err(|e| Error::Config(e.to_string()))?;
        let (lanes, from) = match (self.lanes, config.query.shared_connections) {
            (Some(lanes), _) => (lanes, "shared_connections (set in code)"),
            (None, Some(lanes)) => (lanes as usize, "query.shared_connections"),
            (None, None) => (
                Self::default_lanes(config.pool.max_size),
                "shared_connections",
            ),
        };
        if lanes >= config.pool.max_size as usize {
            return Err(Error::Config(format!(
                "{from} = {lanes} must be below pool.max_size = {} so that transactions can \
                 still get a connection",
                config.pool.max_size
            )));
        }
        let mut nodes = Vec::with_capacity(1 + config.replicas.len());
        let settings = std::iter::once((&config.primary, Role::Primary))
            .chain(config.replicas.iter().map(|r| (r, Role::Replica)));
        for (index, (node_settings, role)) in settings.enumerate() {
            let name: Arc<str> = match role {
                Role::Primary => "primary".into(),
                Role::Replica => format!("replica-{index}").into(),
            };
            let pool = PoolBuilder::from_config(config, node_settings)
                .name(name.to_string())
                .build_lazy()
                .map_err(|source| Error::Pool {
                    node: Arc::clone(&name),
                    source: Box::new(source),
                })?;
            nodes.push(Node::new(
                index,
                name,
                role,
                pool,
                Lanes::new(lanes, self.busy_after),
                crate::telemetry::NodeAttributes::new(node_settings),
            ));
        }
        let slow_threshold = config
            .features
            .slow_query_log
            .then_some(config.query.slow_query_threshold);
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                nodes,
                primary: AtomicUsize::new(0),
                next_read: AtomicUsize::new(0),
                settings: Settings {
                    read_replicas: config.features.read_replicas,
                    max_lag: config.health.max_replica_lag,
                    slow_threshold,
                    log_parameters: config.query.log_parameters,
                    prepared: config.query.prepared_statements,
                    round_trip: config
                        .query
                        .statement_timeout
                        .map(|t| t + round_trip_margin(config.pool.connect_timeout)),
                    check_timeout: config.pool.connect_timeout,
                    read_after_wait: config.query.read_after_wait,
                    query_text: config.telemetry.query_text,
                },
                retry,
                counters: Counters::new(),
                closing: AtomicBool::new(false),
                in_flight: AtomicU64::new(0),
                background: AtomicU64::new(0),
                drained: Notify::new(),
                discovery: tokio::sync::Mutex::new(()),
                discovery_epoch: AtomicU64::new(0),
                listeners: tokio::sync::watch::Sender::new(false),
            }),
        };
        if let Err(e) = cluster.discover("pgstack-connect").await {
            for node in cluster.nodes() {
                node.pool().close();
            }
            return Err(e);
        }
        if let Some(interval) = self.replication_probe {
            cluster.spawn_replication_probe(interval);
        }
        Ok(cluster)
    }
}

/// What a round trip gets beyond `statement_timeout`: time for the server's
/// cancellation to come back. Half the connect timeout (at least 50 ms), so
/// a partition fails a call within `statement_timeout + connect_timeout`.
pub(super) fn round_trip_margin(connect_timeout: Duration) -> Duration {
    (connect_timeout / 2).max(Duration::from_millis(50))
}

/// The default of [`ClusterBuilder::busy_after`].
pub(super) const DEFAULT_BUSY_AFTER: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_shared_connections() {
        assert_eq!(ClusterBuilder::default_lanes(1), 0);
        assert_eq!(ClusterBuilder::default_lanes(2), 0);
        assert_eq!(ClusterBuilder::default_lanes(3), 1);
        assert_eq!(ClusterBuilder::default_lanes(10), 2);
        assert_eq!(ClusterBuilder::default_lanes(50), 4);
    }

    #[test]
    fn a_round_trip_ends_before_statement_timeout_plus_connect_timeout() {
        for connect in [
            Duration::from_millis(10),
            Duration::from_millis(500),
            Duration::from_secs(5),
        ] {
            let margin = round_trip_margin(connect);
            assert!(margin >= Duration::from_millis(50));
            assert!(margin < connect || connect < Duration::from_millis(100));
        }
    }
}
