//! Replay positions and replica lag, measured by the cluster itself.

use super::*;

impl Cluster {
    /// Measures every replica once: replay position
    /// (`pg_last_wal_replay_lsn()`), lag in bytes behind the primary's
    /// current position, and lag in time (0 when caught up, else the age of
    /// the last replayed transaction). Feeds the routing inputs of each
    /// [`Node`]; a node that does not answer is left as it was.
    pub async fn refresh_replication(&self) {
        let timeout = self.inner.settings.check_timeout;
        let primary = self.primary().clone();
        let primary_lsn = match tokio::time::timeout(timeout, current_lsn(&primary)).await {
            Ok(Some(lsn)) => Some(lsn),
            _ => None,
        };
        let mut probes = JoinSet::new();
        for node in self.nodes() {
            if node.inner.index == primary.inner.index {
                continue;
            }
            let node = node.clone();
            probes.spawn(async move {
                let measure = async {
                    let mut state = replay_state(&node).await?;
                    let behind = |s: &ReplayState| match (primary_lsn, s.replay) {
                        (Some(p), Some(r)) => r < p,
                        _ => false,
                    };
                    if behind(&state) {
                        // A record written just before the primary was asked
                        // is replayed within milliseconds: look again before
                        // judging the lag by the age of the last transaction.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        state = replay_state(&node).await?;
                    }
                    Some(state)
                };
                if let Ok(Some(state)) = tokio::time::timeout(timeout, measure).await {
                    apply_replay_state(&node, state, primary_lsn);
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
                let cluster = Cluster { inner };
                if cluster.is_closing() {
                    return;
                }
                cluster.refresh_replication().await;
                drop(cluster);
                tokio::time::sleep(interval).await;
            }
        });
    }
}

pub(super) async fn current_lsn(node: &Node) -> Option<WalPosition> {
    let conn = node.pool().get("pgstack-replication-probe").await.ok()?;
    let rows = conn
        .simple_query("SELECT pg_current_wal_lsn()::text")
        .await
        .ok()?;
    first_text(&rows)?.parse().ok()
}

pub(super) struct ReplayState {
    replay: Option<WalPosition>,
    /// Seconds since the last replayed transaction committed on the primary.
    age: Option<f64>,
    in_recovery: bool,
}

pub(super) async fn replay_state(node: &Node) -> Option<ReplayState> {
    let conn = node.pool().get("pgstack-replication-probe").await.ok()?;
    let rows = conn
        .simple_query(
            "SELECT pg_last_wal_replay_lsn()::text, \
             extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8::text, \
             pg_is_in_recovery()",
        )
        .await
        .ok()?;
    let row = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })?;
    Some(ReplayState {
        replay: row.get(0).and_then(|t| t.parse().ok()),
        age: row.get(1).and_then(|t| t.parse().ok()),
        in_recovery: row.get(2) == Some("t"),
    })
}

pub(super) fn apply_replay_state(node: &Node, state: ReplayState, primary: Option<WalPosition>) {
    if !state.in_recovery {
        node.set_observed_role(Some(Role::Primary));
        return;
    }
    node.set_observed_role(Some(Role::Replica));
    node.set_replay_position(state.replay);
    let behind = match (primary, state.replay) {
        (Some(p), Some(r)) => Some(p.as_u64().saturating_sub(r.as_u64())),
        _ => None,
    };
    node.set_replica_lag_bytes(behind);
    let lag = match (behind, state.age) {
        (Some(0), _) => Some(Duration::ZERO),
        (Some(_), Some(age)) if age.is_finite() => Some(Duration::from_secs_f64(age.max(0.0))),
        // Behind, and no transaction replayed yet: as far behind as it gets.
        (Some(_), None) => Some(Duration::from_secs(u64::from(u32::MAX))),
        _ => None,
    };
    node.set_replica_lag(lag);
}
