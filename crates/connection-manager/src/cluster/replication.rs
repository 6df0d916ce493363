//! Replay positions and replica lag, measured by the cluster itself.

use super::*;

impl Cluster {
    /// Measures every replica once ([`observe_replica`]): replay position
    /// (`pg_last_wal_replay_lsn()`), lag in bytes behind the primary's
    /// current position, and lag in time (0 when caught up, else the age of
    /// the last replayed transaction), with the role seen in the same
    /// answer. Feeds the routing inputs of each [`Node`]
    /// ([`Node::record_observation`]); a node that does not answer is left
    /// as it was.
    pub async fn refresh_replication(&self) {
        let timeout = self.inner.settings.check_timeout;
        let primary = self.primary().clone();
        let primary_lsn = match tokio::time::timeout(timeout, observe_on(&primary, None)).await {
            Ok(Some(seen)) => seen.wal_position,
            _ => None,
        };
        let mut probes = JoinSet::new();
        for node in self.nodes() {
            if node.inner.index == primary.inner.index {
                continue;
            }
            let node = node.clone();
            probes.spawn(async move {
                let measure = observe_on(&node, primary_lsn);
                if let Ok(Some(seen)) = tokio::time::timeout(timeout, measure).await {
                    node.record_observation(&seen, seen.lag(primary_lsn));
                }
            });
        }
        while probes.join_next().await.is_some() {}
    }

    pub(super) fn spawn_replication_probe(&self, interval: Duration) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let Some(round) = inner.background() else {
                    return;
                };
                let cluster = Cluster { inner };
                cluster.refresh_replication().await;
                drop(round);
                drop(cluster);
                tokio::time::sleep(interval).await;
            }
        });
    }
}

/// [`observe_replica`] on a connection of `node`'s pool (`None`: no answer).
async fn observe_on(node: &Node, primary: Option<WalPosition>) -> Option<Observation> {
    let conn = node.pool().get("pgstack-replication-probe").await.ok()?;
    observe_replica(&conn, primary).await.ok()
}
