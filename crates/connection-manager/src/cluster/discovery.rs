//! Roles, failover and the background probe of a node that failed a call.

use super::*;

impl Cluster {
    /// Records a role seen on `node`; a primary seen in recovery triggers
    /// re-discovery in the background.
    pub(super) fn observed(&self, node: &Node, role: Role) {
        let before = node.observed_role();
        node.set_observed_role(Some(role));
        let is_primary = node.inner.index == self.primary().inner.index;
        if is_primary && role == Role::Replica && before != Some(Role::Replica) {
            tracing::warn!(
                node = node.name(),
                "the primary is in recovery or read-only"
            );
            let cluster = self.clone();
            tokio::spawn(async move {
                if let Err(e) = cluster.rediscover().await {
                    tracing::warn!(error = %e, "re-discovery found no writable primary");
                }
            });
        }
    }

    /// A call saw `node` fail: replicas get no reads until a background
    /// probe sees the node answer again (the primary keeps its writes; the
    /// probe also looks for a new primary if it stays down).
    pub(super) fn node_failed(&self, node: &Node) {
        node.retire_lanes();
        if node.inner.suspect.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            node = node.name(),
            "node failed a call; probing it in the background"
        );
        let weak = Arc::downgrade(&self.inner);
        let node = node.clone();
        tokio::spawn(probe_until_back(weak, node));
    }

    /// Checks every node's role ([`observe`]: `pg_is_in_recovery()` and
    /// `transaction_read_only`) and moves writes to the writable one if the
    /// primary changed. Called on a `25006` from the primary, when the
    /// primary is seen in recovery, and while it stays down; a health monitor
    /// may call it too. Concurrent calls share one round.
    ///
    /// # Errors
    /// [`Error::NoPrimary`] when no node accepts writes (writes keep going
    /// to the previous primary); [`Error::ShuttingDown`] after
    /// [`Cluster::close`].
    pub async fn rediscover(&self) -> Result<(), Error> {
        // Background work: a close waits for it, and none starts after.
        let Some(_work) = self.inner.background() else {
            return Err(Error::ShuttingDown {
                operation: "pgstack-rediscover".to_owned(),
            });
        };
        let epoch = self.inner.discovery_epoch.load(Ordering::Acquire);
        let _round = self.inner.discovery.lock().await;
        if self.inner.discovery_epoch.load(Ordering::Acquire) != epoch {
            return Ok(());
        }
        let result = self.discover("pgstack-rediscover").await;
        self.inner.discovery_epoch.fetch_add(1, Ordering::AcqRel);
        result
    }

    pub(super) async fn discover(&self, op: &str) -> Result<(), Error> {
        let timeout = self.inner.settings.check_timeout;
        let mut checks = JoinSet::new();
        for node in self.nodes() {
            let node = node.clone();
            checks.spawn(async move {
                let role = check_role(&node, timeout).await;
                (node, role)
            });
        }
        let mut answers = Vec::with_capacity(self.nodes().len());
        while let Some(joined) = checks.join_next().await {
            if let Ok(answer) = joined {
                answers.push(answer);
            }
        }
        answers.sort_by_key(|(node, _)| node.inner.index);
        let current = self.inner.primary.load(Ordering::Acquire);
        let mut writable = Vec::new();
        let mut details = Vec::new();
        for (node, role) in &answers {
            match role {
                Ok(role) => {
                    node.set_observed_role(Some(*role));
                    details.push(format!("{}: {role}", node.name()));
                    if *role == Role::Primary {
                        writable.push(node.inner.index);
                    }
                }
                Err(e) => {
                    details.push(format!("{}: {e}", node.name()));
                    self.node_failed(node);
                }
            }
        }
        let chosen = if writable.contains(&current) {
            Some(current)
        } else {
            writable.first().copied()
        };
        let Some(chosen) = chosen else {
            return Err(Error::NoPrimary {
                operation: op.to_owned(),
                details: details.join("; "),
            });
        };
        if writable.len() > 1 {
            tracing::warn!(
                nodes = ?writable,
                "more than one node accepts writes; keeping writes on one of them"
            );
        }
        if chosen != current {
            let (old, new) = (&self.inner.nodes[current], &self.inner.nodes[chosen]);
            tracing::warn!(
                from = old.name(),
                to = new.name(),
                "primary changed: writes now go to {}",
                new.name()
            );
            self.inner.primary.store(chosen, Ordering::Release);
            self.inner
                .counters
                .primary_changes
                .fetch_add(1, Ordering::Relaxed);
            metrics::counter!(FAILOVERS_METRIC, "node" => node_label(new)).increment(1);
            // Replay positions seen before the change say nothing about the
            // new primary's history.
            for node in self.nodes() {
                node.forget_replication();
            }
            // The old primary's connections may sit in a read-only session.
            old.retire_lanes();
            old.pool().recycle_all();
            new.retire_lanes();
        }
        Ok(())
    }
}

/// The role of the server behind `conn` ([`observe`]), as a call's error.
pub(super) async fn role_of(conn: &PooledConnection, node: &Node, op: &str) -> Result<Role, Error> {
    match observe(conn).await {
        Ok(seen) => Ok(seen.role()),
        Err(ObserveError::Query(e)) => Err(Error::from_postgres(e, node.name_arc(), op, false)),
        Err(ObserveError::NoRow) => Err(Error::UnexpectedRows {
            node: Arc::clone(node.name_arc()),
            operation: op.to_owned(),
            expected: "one",
            got: 0,
        }),
    }
}

/// Checks `node`'s role with a connection from its pool, within `timeout`.
pub(super) async fn check_role(node: &Node, timeout: Duration) -> Result<Role, String> {
    let check = async {
        // An open breaker rejects checkouts: first see, past it, whether the
        // node accepts sessions again (which half-opens the breaker).
        if node
            .circuit_breaker()
            .is_some_and(|b| !b.state().allows_calls())
        {
            node.pool()
                .probe()
                .await
                .map_err(|e| failure_text(node, &e))?;
        }
        let conn = node
            .pool()
            .get(ROLE_CHECK_OP)
            .await
            .map_err(|e| failure_text(node, &e))?;
        observe(&conn)
            .await
            .map(|seen| seen.role())
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        // The pool may still be retrying a connect that fails (a TLS
        // handshake the server refuses, a missing database): say why.
        Err(_) => Err(match node.pool().status().last_connect_error {
            Some(last) => format!("{last} (no answer within {timeout:?})"),
            None => format!("no answer within {timeout:?}"),
        }),
    }
}

/// Why a node's pool gave no connection: the cause of its last failed
/// connect when it has none open (a missing database, a refused password:
/// the cause first, then the fix), else the pool's own error.
fn failure_text(node: &Node, error: &pgstack_pool::PoolError) -> String {
    let status = node.pool().status();
    match status.last_connect_error {
        Some(last) if status.size == 0 => last,
        _ => error.to_string(),
    }
}

/// Probes a node that failed a call until it answers, then puts it back
/// into routing. While the primary stays down, also looks for a new one.
pub(super) async fn probe_until_back(cluster: Weak<ClusterInner>, node: Node) {
    // Often at first (a restart is over in a second or two, and callers
    // wait for the node), then less often for a long outage.
    let down_since = Instant::now();
    let mut delay = PROBE_FIRST_DELAY;
    let mut rounds: u32 = 0;
    loop {
        tokio::time::sleep(delay).await;
        let Some(inner) = cluster.upgrade() else {
            return;
        };
        // Counted until this round ends, so that a close waits for the
        // connection the role check holds.
        let Some(_round) = inner.background() else {
            return;
        };
        let cluster = Cluster { inner };
        let timeout = cluster.inner.settings.check_timeout;
        match check_role(&node, timeout).await {
            Ok(role) => {
                node.set_observed_role(Some(role));
                node.retire_lanes();
                node.inner.suspect.store(false, Ordering::Release);
                tracing::info!(node = node.name(), %role, "node answers again");
                if node.inner.index == cluster.primary().inner.index && role == Role::Replica {
                    let _ = cluster.rediscover().await;
                }
                return;
            }
            Err(error) => {
                rounds += 1;
                tracing::debug!(node = node.name(), %error, rounds, "node still down");
                let is_primary = node.inner.index == cluster.primary().inner.index;
                if is_primary && rounds.is_multiple_of(3) {
                    // The primary stays down: maybe a replica was promoted.
                    let _ = cluster.rediscover().await;
                    if node.inner.index != cluster.primary().inner.index {
                        // Writes moved on; keep probing the old primary as a
                        // possible replica.
                        tracing::info!(node = node.name(), "old primary still down");
                    }
                }
            }
        }
        let cap = if down_since.elapsed() < PROBE_FAST_FOR {
            PROBE_FAST_CAP
        } else {
            PROBE_SLOW_CAP
        };
        delay = (delay * 2).min(cap);
    }
}

/// The first background probe of a node that failed a call.
pub(super) const PROBE_FIRST_DELAY: Duration = Duration::from_millis(25);

/// How long a node that stays down is probed often.
pub(super) const PROBE_FAST_FOR: Duration = Duration::from_secs(10);

/// The longest pause between probes in that time.
pub(super) const PROBE_FAST_CAP: Duration = Duration::from_millis(100);

/// The longest pause between probes after it.
pub(super) const PROBE_SLOW_CAP: Duration = Duration::from_secs(2);
