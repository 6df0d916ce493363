//! One PostgreSQL node's connection pool, on [bb8] and tokio-postgres,
//! configured from [`pgstack_config`].
//!
//! - **Connecting**: TLS through rustls (`disable`, `prefer`, `require`,
//!   `verify-ca`, `verify-full`, a root certificate from a file), TCP
//!   keepalives, a connect timeout covering TCP, TLS and login, and
//!   `application_name` / `statement_timeout` sent in the startup packet.
//!   `min_idle` connections are opened by [`PoolBuilder::build`].
//! - **Checkout validation without a round trip**: a closed socket, an
//!   unknown session state, an expired lifetime or an old generation are
//!   seen without talking to the server; only connections idle longer than
//!   `pool.validation_idle_threshold` are pinged (or every one, with
//!   `checkout_validation = "always"`).
//! - **Never a bad connection**: a connection goes back to the pool only with
//!   no transaction open, nothing in flight and its session as the pool
//!   opened it. A future dropped mid-query or mid-transaction, a panic or an
//!   unclear error gets it rolled back (off the caller's path) or closed; a
//!   statement that changed the session (`SET`, temporary tables, `LISTEN`,
//!   advisory locks, `PREPARE`, the raw client) gets it reset with `DISCARD
//!   ALL`. Statements are read with [`classify`] (sqlparser's tokenizer).
//!   [`Transaction::commit_checked`] tells a real `COMMIT` from one the
//!   server answered by rolling back.
//! - **Lifetimes** with per-connection jitter, idle timeout, acquire timeout.
//! - **Node down**: a circuit breaker from [`pgstack_resilience`] fails
//!   checkouts at once while the node is unreachable; the pool reconnects in
//!   the background with backoff and refills when the node is back.
//! - **Errors that say why**: a timeout names the phase (waiting, connecting,
//!   validating), the last connect error and the pool's figures.
//! - **Leak detection**, **statement-cache clearing** and **recycling**, and
//!   the `pgstack_pool_*` metrics plus an in-process [`PoolStatus`].
//!
//! # Example
//!
//! ```no_run
//! use pgstack_config::DatabaseConfig;
//! use pgstack_pool::Pool;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = DatabaseConfig::for_tests("postgres://app:secret@localhost:5432/app")?;
//! let pool = Pool::connect(&config).await?;
//!
//! // Every checkout names its operation (leak reports, errors).
//! let conn = pool.get("fetch-bills").await?;
//! let rows = conn.query("SELECT id FROM bills WHERE owner = $1", &[&42_i64]).await?;
//! drop(conn); // back to the pool, known idle
//!
//! // Transactions roll back unless committed, even if the future is dropped.
//! let mut conn = pool.get("pay-bill").await?;
//! let tx = conn.transaction().await?;
//! tx.execute("UPDATE bills SET paid = true WHERE id = $1", &[&7_i64]).await?;
//! tx.commit().await?;
//!
//! // The pool's figures, in process (also published as `pgstack_pool_*` metrics).
//! let status = pool.status();
//! tracing::info!(rows = rows.len(), idle = status.idle, in_use = status.in_use, "done");
//! # Ok(()) }
//! ```
//!
//! See `docs/pool.md` for the semantics in full.
//!
//! [bb8]: https://docs.rs/bb8

mod conn;
mod error;
mod leak;
mod otel;
mod pool;
mod sql;
mod status;
mod stream;
mod tls;

pub use crate::conn::{
    CommitFailed, CommitOutcome, IsolationLevel, PooledConnection, StatementRef, StatementText,
    Transaction, TransactionId, TransactionOptions, XACT_PROBE_SQL, XactProbe, parse_lsn,
};
pub use crate::error::{
    AcquirePhase, AcquireTimeout, ConfigError, ConnectError, LastConnectError, PoolError,
};
pub use crate::otel::{
    CONNECTION_COUNT_METRIC, CONNECTION_CREATE_METRIC, CONNECTION_MAX_METRIC,
    CONNECTION_PENDING_METRIC, CONNECTION_TIMEOUTS_METRIC, CONNECTION_USE_METRIC,
    CONNECTION_WAIT_METRIC,
};
pub use crate::pool::{DedicatedConnection, Pool, PoolBuilder};
pub use crate::sql::{Session, StatementClass, StatementKind, classify, first_keyword};
pub use crate::status::{
    ACQUIRE_SECONDS_METRIC, CLOSED_METRIC, CONNECTIONS_METRIC, CREATED_METRIC, CloseReason,
    ClosedCounts, LEAKS_METRIC, PoolStatus, ROLLBACKS_METRIC, SESSION_RESETS_METRIC,
    TIMEOUTS_METRIC,
};
pub use crate::stream::RowStream;
pub use tokio_postgres;

#[cfg(test)]
mod send_check {
    fn assert_send<T: Send>(_: &T) {}

    /// Checkouts can move between threads (spawned tasks on a multi-thread runtime).
    #[allow(dead_code)]
    fn futures_are_send(pool: &crate::Pool, conn: &mut crate::PooledConnection) {
        assert_send(&pool.get("op"));
        assert_send(&conn.query_one("SELECT 1", &[]));
        assert_send(&conn.transaction());
    }
}
