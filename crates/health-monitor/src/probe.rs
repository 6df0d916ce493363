//! One probe of one node, on the node's dedicated probe connection.

use std::fmt::Write as _;
use std::time::Duration;

use pgstack_config::{CheckoutValidation, DatabaseConfig, NodeSettings};
use pgstack_connection::tokio_postgres::{self, SimpleQueryMessage, SimpleQueryRow};
use pgstack_connection::{Role, WalPosition};
use pgstack_pool::{Pool, PoolBuilder, PoolError, PooledConnection};
use tokio::time::Instant;

/// Operation name of the probes (pool errors, leak reports).
pub(crate) const PROBE_OP: &str = "pgstack-health-probe";

/// Everything but the latency, in one round trip. `pg_current_wal_lsn()`
/// fails during recovery, hence the `CASE`.
const DETAILS_QUERY: &str = "SELECT pg_is_in_recovery(), \
     current_setting('transaction_read_only'), \
     current_setting('max_connections'), \
     current_setting('superuser_reserved_connections'), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     pg_last_wal_replay_lsn()::text, \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8";

const REPLAY_QUERY: &str = "SELECT pg_last_wal_replay_lsn()::text, \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8";

/// What one successful probe saw.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Probed {
    pub(crate) latency: Duration,
    pub(crate) role: Role,
    pub(crate) in_recovery: bool,
    pub(crate) max_connections: Option<u32>,
    pub(crate) reserved_connections: Option<u32>,
    pub(crate) server_connections: Option<u32>,
    /// The primary's current WAL position, or the replica's replayed one.
    pub(crate) wal_position: Option<WalPosition>,
    pub(crate) lag: Option<Duration>,
    pub(crate) lag_bytes: Option<u64>,
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

fn first_row(messages: &[SimpleQueryMessage]) -> Option<&SimpleQueryRow> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })
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
        .simple_query(DETAILS_QUERY)
        .await
        .map_err(|e| describe(&e))?;
    let row = first_row(&messages).ok_or("the probe query returned no row")?;
    let text = |i: usize| row.get(i);
    let number = |i: usize| text(i).and_then(|t| t.parse::<u32>().ok());
    let in_recovery = text(0) == Some("t");
    let read_only = text(1) == Some("on");
    let mut probed = Probed {
        latency,
        role: if in_recovery || read_only {
            Role::Replica
        } else {
            Role::Primary
        },
        in_recovery,
        max_connections: number(2),
        reserved_connections: number(3),
        server_connections: number(4),
        wal_position: None,
        lag: None,
        lag_bytes: None,
    };
    if !in_recovery {
        probed.wal_position = text(5).and_then(|t| t.parse().ok());
        return Ok(probed);
    }
    let mut replay: Option<WalPosition> = text(6).and_then(|t| t.parse().ok());
    let mut age: Option<f64> = text(7).and_then(|t| t.parse().ok());
    let behind =
        |replay: Option<WalPosition>| matches!((primary, replay), (Some(p), Some(r)) if r < p);
    if behind(replay) {
        // A record written just before the primary was asked is replayed
        // within milliseconds: look again before judging the lag.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let messages = conn
            .simple_query(REPLAY_QUERY)
            .await
            .map_err(|e| describe(&e))?;
        if let Some(row) = first_row(&messages) {
            replay = row.get(0).and_then(|t| t.parse().ok());
            age = row.get(1).and_then(|t| t.parse().ok());
        }
    }
    probed.wal_position = replay;
    let (lag, lag_bytes) = replica_lag(primary, replay, age);
    probed.lag = lag;
    probed.lag_bytes = lag_bytes;
    Ok(probed)
}

/// A replica's lag: bytes behind the primary's position, and time: zero
/// when caught up, else the age of the last replayed transaction.
pub(crate) fn replica_lag(
    primary: Option<WalPosition>,
    replay: Option<WalPosition>,
    age: Option<f64>,
) -> (Option<Duration>, Option<u64>) {
    let bytes = match (primary, replay) {
        (Some(p), Some(r)) => Some(p.as_u64().saturating_sub(r.as_u64())),
        _ => None,
    };
    let lag = match (bytes, age) {
        (Some(0), _) => Some(Duration::ZERO),
        (Some(_), Some(age)) if age.is_finite() => Some(Duration::from_secs_f64(age.max(0.0))),
        // Behind, and no transaction replayed yet: as far behind as it gets.
        (Some(_), None) => Some(Duration::from_secs(u64::from(u32::MAX))),
        _ => None,
    };
    (lag, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Option<WalPosition> {
        Some(WalPosition::from_u64(n))
    }

    #[test]
    fn caught_up_means_no_lag() {
        assert_eq!(
            replica_lag(at(100), at(100), Some(3600.0)),
            (Some(Duration::ZERO), Some(0))
        );
        assert_eq!(
            replica_lag(at(100), at(120), Some(3600.0)),
            (Some(Duration::ZERO), Some(0))
        );
    }

    #[test]
    fn behind_means_the_age_of_the_last_replayed_transaction() {
        assert_eq!(
            replica_lag(at(100), at(40), Some(2.5)),
            (Some(Duration::from_millis(2500)), Some(60))
        );
        assert_eq!(replica_lag(at(100), at(40), None).1, Some(60));
        assert!(replica_lag(at(100), at(40), None).0 > Some(Duration::from_secs(3600)));
    }

    #[test]
    fn unknown_primary_position_means_unknown_lag() {
        assert_eq!(replica_lag(None, at(40), Some(1.0)), (None, None));
    }
}
