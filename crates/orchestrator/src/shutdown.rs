//! Graceful shutdown: drain, cut off, cancel on the server, close.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pgstack_config::{DatabaseConfig, NodeSettings, PoolSettings};
use pgstack_connection::tokio_postgres::SimpleQueryMessage;
use pgstack_pool::{Pool, PoolBuilder, PooledConnection};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::orchestrator::{Orchestrator, STATE_SHUTTING_DOWN, STATE_STOPPED};

/// Counter: calls cut off by a shutdown deadline.
pub const SHUTDOWN_CUT_OFF_METRIC: &str = "pgstack_shutdown_cut_off_total";

/// How long, after the deadline, cancelled calls get to unwind and return
/// their connections before the remaining sessions are terminated.
const UNWIND_GRACE: Duration = Duration::from_secs(2);

/// The longest the termination of leftover sessions may take per node
/// (connecting, the look for lingering sessions, the termination).
const TERMINATE_LIMIT: Duration = Duration::from_secs(3);

/// What [`Orchestrator::shutdown`] did. Serializable to JSON.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Calls running when the shutdown began.
    pub in_flight_at_start: u64,
    /// Of these, the ones that finished before the deadline.
    pub completed: u64,
    /// Calls still running at the deadline: their statements were cancelled
    /// on the server (`pg_cancel_backend`), and the callers got an error.
    pub cut_off: u64,
    /// Sessions of this instance cancelled on the server, per node.
    pub cancelled_backends: Vec<NodeCount>,
    /// Sessions of this instance still open after the grace that followed
    /// the cancellation, ended with `pg_terminate_backend`, per node.
    pub terminated_backends: Vec<NodeCount>,
    /// Connections still checked out when the pools were closed.
    pub connections_in_use_at_close: u32,
    /// Whether every call had returned and every pooled connection was closed
    /// when the shutdown finished.
    pub drained: bool,
    /// Problems on the way (a node that could not be reached to cancel).
    pub problems: Vec<String>,
    /// How long the shutdown took, in seconds.
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

/// The longest a round of cancellations may take: what is left of the
/// grace (but at least half a second, so that a first round can connect),
/// never more than the connect timeout. A node that is down cannot hold the
/// shutdown much past the grace.
fn step_limit(grace_end: Instant, config: &DatabaseConfig) -> Duration {
    grace_end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(500))
        .min(config.pool.connect_timeout.max(Duration::from_millis(500)))
}

/// A number of sessions on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NodeCount {
    /// The node (`primary`, `replica-1`, ...).
    pub node: String,
    /// How many.
    pub count: u32,
}

impl ShutdownReport {
    /// Sessions cancelled on the server, over every node.
    pub fn cancelled(&self) -> u32 {
        self.cancelled_backends.iter().map(|c| c.count).sum()
    }

    /// Sessions terminated on the server, over every node.
    pub fn terminated(&self) -> u32 {
        self.terminated_backends.iter().map(|c| c.count).sum()
    }
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

pub(crate) async fn shutdown(orchestrator: &Orchestrator, deadline: Duration) -> ShutdownReport {
    let span = tracing::info_span!("pgstack.shutdown", deadline = ?deadline);
    shutdown_inner(orchestrator, deadline)
        .instrument(span)
        .await
}

async fn shutdown_inner(orchestrator: &Orchestrator, deadline: Duration) -> ShutdownReport {
    let inner = &orchestrator.inner;
    let mut done = inner.shutdown.lock().await;
    if let Some(report) = done.as_ref() {
        return report.clone();
    }
    let started = Instant::now();
    let cluster = &inner.cluster;
    inner.set_state(STATE_SHUTTING_DOWN);
    let in_flight_at_start = cluster.in_flight();
    tracing::info!(
        in_flight = in_flight_at_start,
        deadline = ?deadline,
        "shutting down: new calls are refused, calls in flight may finish until the deadline"
    );

    // 1–2. Refuse new calls, wait for the calls in flight until the
    // deadline, close the pools (idle connections now, the others when
    // returned).
    let close = cluster.close(deadline).await;
    let cut_off = close.cut_off;
    let mut problems = Vec::new();

    // 3. Cancel on the server what is still running, again while calls
    // remain (a statement pipelined behind a cancelled one starts next).
    let mut cancelled: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    // Nodes that could not be reached to cancel: not tried again to terminate.
    let mut unreachable: BTreeSet<String> = BTreeSet::new();
    let grace_end = Instant::now() + UNWIND_GRACE;
    let admin = if cut_off > 0 {
        metrics::counter!(SHUTDOWN_CUT_OFF_METRIC).increment(cut_off);
        tracing::warn!(
            cut_off,
            "deadline passed with calls still running; cancelling them on the server"
        );
        let admin = Admin::open(&inner.config, &inner.application_name);
        loop {
            for (node, result) in admin
                .each(
                    &inner.application_name,
                    Action::Cancel,
                    step_limit(grace_end, &inner.config),
                    &BTreeSet::new(),
                )
                .await
            {
                match result {
                    Ok(pids) => {
                        unreachable.remove(&node);
                        cancelled.entry(node).or_default().extend(pids);
                    }
                    Err(problem) => {
                        if !cancelled.contains_key(&node) {
                            unreachable.insert(node.clone());
                        }
                        let problem = format!("{node}: cancel: {problem}");
                        if !problems.contains(&problem) {
                            problems.push(problem);
                        }
                    }
                }
            }
            if wait_drained(orchestrator, Duration::from_millis(100)).await
                || Instant::now() >= grace_end
            {
                break;
            }
        }
        Some(admin)
    } else {
        None
    };
    let cancelled_backends = cancelled
        .into_iter()
        .map(|(node, pids)| NodeCount {
            node,
            count: u32::try_from(pids.len()).unwrap_or(u32::MAX),
        })
        .collect();

    // 4. The health monitor stops (its probe connections close).
    #[cfg(feature = "health")]
    if let Some(monitor) = &inner.monitor {
        monitor.stop().await;
    }

    // 5. Let cancelled calls unwind and return their connections.
    let drained = wait_drained(
        orchestrator,
        grace_end.saturating_duration_since(Instant::now()),
    )
    .await;

    // 6. Whatever session of ours is left (a call stuck outside the
    // database while holding a transaction open): terminate it.
    let mut terminated_backends: Vec<NodeCount> = Vec::new();
    if !drained || cut_off > 0 {
        let admin = match admin {
            Some(admin) => admin,
            None => Admin::open(&inner.config, &inner.application_name),
        };
        for (node, result) in admin
            .each(
                &inner.application_name,
                Action::Terminate,
                inner.config.pool.connect_timeout.min(TERMINATE_LIMIT),
                &unreachable,
            )
            .await
        {
            match result {
                Ok(pids) => {
                    if !pids.is_empty() {
                        let count = u32::try_from(pids.len()).unwrap_or(u32::MAX);
                        terminated_backends.push(NodeCount { node, count });
                    }
                }
                Err(problem) => problems.push(format!("{node}: {problem}")),
            }
        }
        admin.close();
    }
    // Terminated sessions end their calls: give them a last moment.
    let drained = drained
        || (!terminated_backends.is_empty() && wait_drained(orchestrator, UNWIND_GRACE).await);

    inner.set_state(STATE_STOPPED);
    let report = ShutdownReport {
        in_flight_at_start,
        completed: in_flight_at_start.saturating_sub(cut_off),
        cut_off,
        cancelled_backends,
        terminated_backends,
        connections_in_use_at_close: close.connections_in_use,
        drained,
        problems,
        elapsed: started.elapsed(),
    };
    if report.cut_off > 0 || !report.drained || !report.problems.is_empty() {
        tracing::warn!(
            cut_off = report.cut_off,
            cancelled = report.cancelled(),
            terminated = report.terminated(),
            drained = report.drained,
            problems = ?report.problems,
            "shut down"
        );
    } else {
        tracing::info!(
            completed = report.completed,
            elapsed = ?report.elapsed,
            "shut down cleanly"
        );
    }
    *done = Some(report.clone());
    report
}

/// Waits until no call is running and every pool is empty, up to `grace`.
async fn wait_drained(orchestrator: &Orchestrator, grace: Duration) -> bool {
    let cluster = &orchestrator.inner.cluster;
    let until = Instant::now() + grace;
    loop {
        let empty = cluster.in_flight() == 0
            && cluster.nodes().iter().all(|node| {
                let status = node.pool().status();
                status.size == 0 && status.in_use == 0
            });
        if empty {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Cancel,
    Terminate,
}

/// One connection per node, outside the cluster's (closed) pools, to cancel
/// and terminate this instance's sessions.
struct Admin {
    pools: Vec<(String, Result<Pool, String>)>,
}

impl Admin {
    /// Sessions named `{instance_name} shutdown`: like everything of this
    /// instance, named with its tag first, but not matched by the exact
    /// name the cancellation looks for.
    fn open(config: &DatabaseConfig, instance_name: &str) -> Admin {
        let mut query = config.query.clone();
        query.application_name = format!("{instance_name} shutdown");
        query.statement_timeout = Some(config.pool.connect_timeout);
        let settings = PoolSettings {
            min_idle: 0,
            max_size: 1,
            acquire_timeout: config.pool.connect_timeout,
            leak_detection_threshold: None,
            ..config.pool.clone()
        };
        let nodes = std::iter::once(("primary".to_owned(), &config.primary)).chain(
            config
                .replicas
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("replica-{}", i + 1), r)),
        );
        let pools = nodes
            .map(|(name, node): (String, &NodeSettings)| {
                let pool = PoolBuilder::from_config(config, node)
                    .name(format!("{name}-shutdown"))
                    .pool_settings(settings.clone())
                    .query_settings(query.clone())
                    .without_circuit_breaker()
                    .build_lazy()
                    .map_err(|e| e.to_string());
                (name, pool)
            })
            .collect();
        Admin { pools }
    }

    /// Runs `action` on every node at once; per node the number of sessions
    /// it applied to.
    async fn each(
        &self,
        application_name: &str,
        action: Action,
        limit: Duration,
        skip: &BTreeSet<String>,
    ) -> Vec<(String, Result<Vec<i32>, String>)> {
        let mut tasks = JoinSet::new();
        for (index, (name, pool)) in self.pools.iter().enumerate() {
            if skip.contains(name) {
                continue;
            }
            let name = name.clone();
            let pool = pool.clone();
            let application_name = application_name.to_owned();
            tasks.spawn(async move {
                let result = match pool {
                    Err(e) => Err(e),
                    Ok(pool) => tokio::time::timeout(limit, run(&pool, &application_name, action))
                        .await
                        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))),
                };
                (index, name, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            if let Ok(result) = joined {
                results.push(result);
            }
        }
        results.sort_by_key(|(index, _, _)| *index);
        results.into_iter().map(|(_, n, r)| (n, r)).collect()
    }

    fn close(self) {
        drop(self);
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        for (_, pool) in &self.pools {
            if let Ok(pool) = pool {
                pool.close();
            }
        }
    }
}

/// `'text'` as an SQL literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Cancels or terminates this instance's sessions on one node; the pids
/// it applied to.
async fn run(pool: &Pool, application_name: &str, action: Action) -> Result<Vec<i32>, String> {
    let conn = pool
        .get("pgstack-shutdown")
        .await
        .map_err(|e| e.to_string())?;
    let name = literal(application_name);
    // Materialized first: the side-effecting function must only ever see
    // the pids already filtered.
    let ours = format!("application_name = {name} AND pid <> pg_backend_pid()");
    match action {
        Action::Cancel => {
            pids(
                &conn,
                &format!(
                    "WITH ours AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE {ours} \
                     AND state IS DISTINCT FROM 'idle') \
                     SELECT pid FROM ours WHERE pg_cancel_backend(pid)"
                ),
            )
            .await
        }
        Action::Terminate => {
            // Sessions whose client just hung up linger for a moment: look
            // again briefly before terminating anything.
            let lingering = format!("SELECT pid FROM pg_stat_activity WHERE {ours}");
            let until = Instant::now() + Duration::from_millis(500);
            while !pids(&conn, &lingering).await?.is_empty() && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            pids(
                &conn,
                &format!(
                    "WITH ours AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE {ours}) \
                     SELECT pid FROM ours WHERE pg_terminate_backend(pid)"
                ),
            )
            .await
        }
    }
}

async fn pids(conn: &PooledConnection, sql: &str) -> Result<Vec<i32>, String> {
    let rows = conn.simple_query(sql).await.map_err(|e| e.to_string())?;
    Ok(rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<i32>().ok()),
            _ => None,
        })
        .collect())
}

/// Waits for SIGTERM or Ctrl-C (SIGINT). Where SIGTERM cannot be listened
/// for, only Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; waiting for Ctrl-C only");
            }
        }
    }
    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::warn!(%error, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_quoted() {
        assert_eq!(literal("billing#00ab12"), "'billing#00ab12'");
        assert_eq!(literal("o'brien"), "'o''brien'");
    }
}
