//! One probe of one node, on the node's dedicated probe connection.

use std::fmt::Write as _;
use std::time::Duration;

use pgstack_config::{CheckoutValidation, DatabaseConfig, NodeSettings};
use pgstack_connection::tokio_postgres::{self, SimpleQueryMessage};
use pgstack_connection::{Observation, ObserveError, ReplicaLag, WalPosition, observe_replica};
use pgstack_pool::{Pool, PoolBuilder, PoolError, PooledConnection};
use tokio::time::Instant;

/// Operation name of the probes (pool errors, leak reports).
pub(crate) const PROBE_OP: &str = "pgstack-health-probe";

/// The connection figures, in one round trip (role and replication come
/// from [`observe_replica`]).
const CAPACITY_QUERY: &str = "SELECT current_setting('max_connections'), \
     current_setting('superuser_reserved_connections'), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')";

/// What one successful probe saw.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Probed {
    pub(crate) latency: Duration,
    /// Role and WAL positions, read the one way the cluster reads them.
    pub(crate) seen: Observation,
    /// The lag behind the primary's position given to [`probe`].
    pub(crate) lag: ReplicaLag,
    pub(crate) max_connections: Option<u32>,
    pub(crate) reserved_connections: Option<u32>,
    pub(crate) server_connections: Option<u32>,
}

impl Probed {
    /// The primary's current WAL position, or the replica's replayed one.
    pub(crate) fn wal_position(&self) -> Option<WalPosition> {
        if self.seen.in_recovery {
            self.seen.replay_position
        } else {
            self.seen.wal_position
        }
    }
}

/// A pool of one connection for a node's probes: the node's connect
/// settings and TLS, no circuit breaker (probes must reach a node whose
/// breaker is open), time limits set to the probe timeout, and a
/// `statement_timeout` so a stuck probe is cancelled by the server.
pub(crate) fn probe_pool(
    config: &DatabaseConfig,
    node: &NodeSettings,
    name: &str,
    timeout: Duration,
) -> Result<Pool, PoolError> {
    let mut pool = config.pool.clone();
    pool.min_idle = 0;
    pool.max_size = 1;
    pool.acquire_timeout = timeout;
    pool.connect_timeout = timeout;
    pool.idle_timeout = None;
    pool.checkout_validation = CheckoutValidation::Never;
    pool.leak_detection_threshold = None;
    let mut query = config.query.clone();
    query.statement_timeout = Some(timeout);
    query.application_name = format!("{} health", query.application_name)
        .trim()
        .to_owned();
    PoolBuilder::from_config(config, node)
        .name(format!("{name}-health"))
        .pool_settings(pool)
        .query_settings(query)
        .without_circuit_breaker()
        .build_lazy()
}

/// A tokio-postgres error with its causes ("db error" alone says nothing).
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// How often a checkout in progress looks for a failed connect attempt.
const CONNECT_WATCH: Duration = Duration::from_millis(20);

/// The probe connection. A connect attempt that fails (refused, login
/// failed) ends the probe at once with its error, rather than waiting out
/// the pool's retries until the probe timeout.
async fn checkout(pool: &Pool) -> Result<PooledConnection, String> {
    let started = Instant::now();
    let get = pool.get(PROBE_OP);
    tokio::pin!(get);
    loop {
        tokio::select! {
            biased;
            got = &mut get => return got.map_err(|e| e.to_string()),
            () = tokio::time::sleep(CONNECT_WATCH) => {
                let status = pool.status();
                if let (Some(error), Some(age)) =
                    (status.last_connect_error, status.last_connect_error_age)
                    && age < started.elapsed()
                {
                    return Err(error);
                }
            }
        }
    }
}

/// Probes the node behind `pool` (bounded by the caller's timeout).
/// `primary` is the primary's current WAL position, measured just before,
/// for a replica's lag.
pub(crate) async fn probe(pool: &Pool, primary: Option<WalPosition>) -> Result<Probed, String> {
    let conn = checkout(pool).await?;
    let started = Instant::now();
    conn.simple_query("SELECT 1")
        .await
        .map_err(|e| describe(&e))?;
    let latency = started.elapsed();
    let messages = conn
        .simple_query(CAPACITY_QUERY)
        .await
        .map_err(|e| describe(&e))?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or("the probe query returned no row")?;
    let number = |i: usize| row.get(i).and_then(|t| t.parse::<u32>().ok());
    let (max_connections, reserved_connections, server_connections) =
        (number(0), number(1), number(2));
    let seen = observe_replica(&conn, primary).await.map_err(|e| match e {
        ObserveError::Query(e) => describe(&e),
        other => other.to_string(),
    })?;
    Ok(Probed {
        latency,
        seen,
        lag: seen.lag(primary),
        max_connections,
        reserved_connections,
        server_connections,
    })
}
