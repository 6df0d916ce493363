//! PostgreSQL infrastructure for Rust services: one [`Database`] handle with
//! read/write routing, retries that know what is safe to repeat, circuit
//! breaking, schema migrations at start, status, metrics and graceful
//! shutdown.
//!
//! # Quickstart
//!
//! ```no_run
//! use std::time::Duration;
//! use pgstack::prelude::*;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // Configuration from the environment (DATABASE_URL, APP_ENV, PGSTACK_*)
//! // and pgstack.toml; overrides in code win.
//! let db = Database::builder()
//!     .set("pool.max_size", 20)
//!     .wait_for_database(Duration::from_secs(30))
//!     .connect()
//!     .await?;
//!
//! // Every call names its operation: it labels logs, spans and metrics.
//! // `db.on(op, route)` is the routed handle; rows are read into structs by
//! // column name (a mismatch is an `Error::RowMapping` naming the column and
//! // both types, never a panic).
//! #[derive(FromRow)]
//! struct Bill {
//!     id: i64,
//!     note: Option<String>,
//! }
//! let open: Vec<Bill> = db
//!     .on("open-bills", Route::Read)
//!     .query_as("SELECT id, note FROM bills WHERE NOT paid", &[])
//!     .await?;
//!
//! // Or declare the statement once: name, route, idempotency and text.
//! const PAY: Statement =
//!     Statement::write("pay-bill", "UPDATE bills SET paid = true WHERE id = $1").idempotent();
//! db.run(&PAY).execute(&[&7_i64]).await?;
//!
//! // A transaction: committed on Ok, rolled back on Err, panic or drop,
//! // retried whole on serialization failures. The closure's error type is
//! // the service's own (anything with `From<pgstack::Error>`).
//! db.transaction("pay-bill", async |tx| -> Result<(), Error> {
//!     tx.execute(&PAY, &[&7_i64]).await?;
//!     Ok(())
//! })
//! .await?;
//!
//! // For a status page and a health endpoint.
//! let status = db.status().await;
//! println!("{} with {} open bills", status.state, open.len());
//!
//! // On SIGTERM or Ctrl-C: refuse new calls, let running ones finish for
//! // 10 s, cancel the rest on the server, close the pools.
//! let report = db.shutdown_on_signal(Duration::from_secs(10)).await;
//! println!("{} calls cut off", report.cut_off);
//! # Ok(()) }
//! ```
//!
//! Keep one [`Database`] per service and clone it into handlers: clones
//! share the pools.
//!
//! # Queries
//!
//! One trait, [`Queryable`], is the query surface of the routed handle
//! ([`Database::on`], and [`Database::run`] for a declared [`Statement`]), of
//! a [`Transaction`] and of a [`Connection`]: `query`, `query_one`,
//! `query_opt`, `execute`, the typed `query_as`, `query_one_as`,
//! `query_opt_as` (`T: FromRow`, derived with `#[derive(FromRow)]`), and
//! `query_stream` (rows as they arrive, with back-pressure; on a connection
//! of its own for the routed handle). It is in the [`prelude`]; write
//! helpers once for all three with `&impl Queryable`. Every future is `Send`
//! (`tests/send.rs` spawns each call shape); in `tokio::spawn` or an axum
//! handler, a transaction closure that uses the caller's values is written
//! `async move |tx|`.
//!
//! Older forms that remain: `db.query(op, route, sql, params)` and its kin
//! `query_one`, `query_opt`, `execute` (the per-call form of
//! `db.on(op, route)`, kept for ad-hoc statements), and [`Error::abort`] /
//! [`Error::aborted_with`] (a transaction closure can now return the
//! service's own error type instead).
//!
//! # Routing
//!
//! - [`Route::Read`] goes round-robin to a replica that answers, has a
//!   closed circuit breaker and lags less than `health.max_replica_lag`;
//!   when none does, to the primary.
//! - [`Route::Write`], [`Database::transaction`] and [`Database::write`] go
//!   to the primary (found with `pg_is_in_recovery()`; re-discovered after a
//!   failover). A read-only transaction
//!   ([`TransactionOptions::read_only`]) is routed as a read.
//! - [`Route::ReadAfter`] with the position from
//!   [`Database::execute_tracked`] reads your own write wherever it lands.
//!
//! # Retries
//!
//! Transient errors only (connection loss, `08xxx`, `57P01..03`, `53300`,
//! `40001`, `40P01`, pool time-outs), with exponential backoff and jitter
//! (`retry.*`):
//!
//! - what a call may have done is recorded as its statements go out (calls
//!   nested in a closure count too), and the rules read that record: a call
//!   is repeated while nothing but reads reached the server, or when its
//!   operation is marked idempotent: `Op::from("touch").idempotent()`;
//! - a transaction is retried as a whole on `40001`/`40P01` and when it broke
//!   before `COMMIT` — keep effects outside the database out of its closure;
//!   one whose closure returned `Ok` after a failed statement is rolled back
//!   ([`Error::TransactionAborted`]), never reported committed;
//! - a write lost in flight gives [`Error::CommitOutcomeUnknown`] (a
//!   `COMMIT` is first looked up with `txid_status`), a failure after
//!   earlier writes [`Error::PartiallyApplied`]: never a silent retry, and
//!   never "not sent";
//! - every round trip ends within `query.statement_timeout` plus half the
//!   connect timeout, inside transactions too.
//!
//! While a node's circuit breaker is open, calls to it fail in microseconds
//! with [`Error::CircuitOpen`], naming the node and the next probe.
//!
//! # Lifecycle
//!
//! [`connect`] validates the configuration (every problem listed), connects
//! — failing at once, or waiting up to
//! [`DatabaseBuilder::wait_for_database`] — warms the pools, verifies the
//! node roles and, when `migrations.auto_migrate` is on, applies pending
//! migrations. [`Database::shutdown`] returns a [`ShutdownReport`] of what
//! completed and what was cut off. See `docs/orchestrator.md`.
//!
//! # Feature flags
//!
//! Declared (with the same text) in this crate's `Cargo.toml`:
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `migrations` | yes | pending migrations applied at start (`migrations.auto_migrate`), their state in [`Status`], and the migrations crate as [`migrations`] |
//! | `health` | yes | the health monitor (`features.health_monitoring`): probes on connections of their own, reports with reasons and history, replica ejection, alert rules and sinks; [`Database::health`] and [`Database::status`] read its latest report; the crate as [`health`] |
//!
//! Without default features a service gets the pools, routing, retries,
//! status, metrics and shutdown (node health is then probed when
//! [`Database::health`] or [`Database::status`] is called). Each crate
//! underneath is usable on its own: [`config`], [`resilience`], [`pool`],
//! [`connection`], [`orchestrator`].

mod channels;
mod database;

pub use crate::database::{Database, DatabaseBuilder, connect};

// LISTEN/NOTIFY and COPY.
pub use pgstack_connection::{
    BinaryCopyIn, CopyIn, CopyOut, Listener, ListenerEvent, Notification,
};

// Queries, typed rows and their errors.
pub use pgstack_connection::tokio_postgres::Row;
pub use pgstack_connection::tokio_postgres::types::{FromSql, ToSql};
pub use pgstack_connection::{
    Bound, Cluster, ClusterMetrics, CommitResolutions, Connection, DbError, Error, FromRow,
    IsolationLevel, NodeMetrics, Op, Queryable, Role, Route, Routed, RowError, RowProblem,
    RowStream, Statement, Transaction, TransactionOptions, WalPosition, column,
};
/// `#[derive(FromRow)]`: a struct read from a row, column by name
/// (`#[pgstack(rename = "..")]`, `#[pgstack(flatten)]`, `Option` for a
/// nullable column); see [`FromRow`].
pub use pgstack_macros::FromRow;

// Health monitoring.
#[cfg(feature = "health")]
pub use pgstack_health::{HealthMonitor, HealthReport, HealthStatus};
#[cfg(feature = "health")]
pub use pgstack_orchestrator::MonitorSummary;

// Configuration.
pub use pgstack_config::{ConfigError, ConfigLoader, DatabaseConfig, Environment, Password};

// Lifecycle, status, metrics, shutdown.
pub use pgstack_orchestrator::{
    Health, LifecycleState, Metrics, MigrationSummary, NodeCount, NodeHealth, NodeHealthEntry,
    NodeStatus, Orchestrator, ShutdownReport, StartError, StartEvent, StartOptions, Status,
    shutdown_signal,
};

/// The crates underneath, for what the facade does not re-export.
pub use pgstack_config as config;
pub use pgstack_connection as connection;
pub use pgstack_connection::tokio_postgres;
#[cfg(feature = "health")]
pub use pgstack_health as health;
#[cfg(feature = "migrations")]
pub use pgstack_migrations as migrations;
pub use pgstack_orchestrator as orchestrator;
pub use pgstack_pool as pool;
pub use pgstack_resilience as resilience;

/// What most services need: `use pgstack::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Database, Error, FromRow, Health, NodeHealth, Op, Queryable, Route, Row, RowStream,
        ShutdownReport, StartError, Statement, Status, ToSql, Transaction, TransactionOptions,
        WalPosition,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync + Clone + 'static>() {}

    #[test]
    fn database_is_cheap_to_share() {
        send_sync::<Database>();
    }
}
