//! The PostgreSQL cluster for pgstack: one primary and any number of
//! replicas from [`pgstack_config`], each node a [`pgstack_pool`] pool with
//! its own circuit breaker; read/write routing with replica lag and
//! read-your-writes; the query and transaction API; retries that know which
//! work is safe to repeat; and the SQLSTATE table.
//!
//! # Quickstart
//!
//! ```no_run
//! use pgstack_config::DatabaseConfig;
//! use pgstack_connection::{Cluster, Error, Op, Queryable, Route};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = DatabaseConfig::for_tests("postgres://app:secret@db-primary/bills")?;
//! config.replicas.push(pgstack_config::NodeSettings::from_url("postgres://app:secret@db-replica/bills")?);
//! let cluster = Cluster::connect(&config).await?;
//!
//! // Every call names its operation. Reads go to a replica within the lag
//! // limit (or the primary), writes to the primary. `on` is the routed
//! // handle; its methods are those of `Queryable`, which a `Transaction` and
//! // a `Connection` share.
//! let unpaid: Vec<tokio_postgres::Row> = cluster
//!     .on("fetch-bills", Route::Read)
//!     .query("SELECT id FROM bills WHERE NOT paid", &[])
//!     .await?;
//!
//! // A write that hands back its WAL position; reading with it never sees
//! // older data, wherever the read lands.
//! let (_, position) = cluster
//!     .execute_tracked("add-bill", "INSERT INTO bills (id) VALUES ($1)", &[&42_i64])
//!     .await?;
//! let bill = cluster
//!     .query_opt("show-bill", Route::ReadAfter(position), "SELECT id FROM bills WHERE id = $1", &[&42_i64])
//!     .await?;
//! assert!(bill.is_some());
//!
//! // Transactions commit on Ok, roll back on Err, panic or drop, and are
//! // retried as a whole on serialization failures.
//! cluster
//!     .transaction("pay-bill", async |tx| {
//!         tx.execute("UPDATE bills SET paid = true WHERE id = $1", &[&42_i64]).await?;
//!         Ok::<_, Error>(())
//!     })
//!     .await?;
//!
//! // A write is retried after a connection loss only when marked idempotent;
//! // otherwise its outcome is reported as unknown.
//! match cluster
//!     .execute("record-payment", Route::Write, "INSERT INTO payments (bill) VALUES ($1)", &[&42_i64])
//!     .await
//! {
//!     Err(Error::CommitOutcomeUnknown { .. }) => { /* look the payment up before repeating */ }
//!     other => { other?; }
//! }
//! cluster
//!     .execute(Op::from("touch-bill").idempotent(), Route::Write,
//!              "UPDATE bills SET seen = true WHERE id = $1", &[&42_i64])
//!     .await?;
//!
//! println!("{}", serde_json::to_string(&cluster.metrics())?);
//! # Ok(()) }
//! ```
//!
//! # What happens where
//!
//! - **Routing** ([`Route`]): reads round-robin over replicas that are not
//!   ejected, not failing, not seen as primary, with a closed breaker and a
//!   lag within `health.max_replica_lag`; else the primary. Roles come from
//!   [`observe`] (`pg_is_in_recovery()` and `transaction_read_only`: a
//!   read-only server is a replica) when connections are made. A `25006` from the
//!   primary, or a primary seen in recovery, triggers
//!   [`Cluster::rediscover`].
//! - **Pipelining**: plain reads and writes without session effects share a
//!   few connections per node ([`ClusterBuilder::shared_connections`]);
//!   tokio-postgres pipelines them. A shared connection is chosen by the work
//!   in flight on it, and a statement known to be long (or not known yet)
//!   never has another queued behind it ([`ClusterBuilder::busy_after`]).
//!   Statements that control transactions or change or read the session
//!   (`BEGIN`, `SET`, temporary tables, `LISTEN`, `currval`) are refused
//!   with a message saying what to use; other ones (DDL, `DO`, `COPY`) take
//!   a connection of their own. Transactions, closures and
//!   [`Cluster::connection`] take one too, and the pool resets a session
//!   they changed before anyone else gets it.
//! - **Retries** follow what the call may have done, as its connection
//!   recorded it: a call is repeated while nothing but reads reached the
//!   server, or when the [`Op`] is idempotent; transactions as a whole on
//!   `40001`/`40P01` and when they broke before `COMMIT`. A write lost in
//!   flight gives [`Error::CommitOutcomeUnknown`]; a failure after earlier
//!   writes [`Error::PartiallyApplied`].
//! - **Transactions** that know when they are doomed: `Ok` after a failed
//!   statement gives [`Error::TransactionAborted`]; `COMMIT` is checked in
//!   the same round trip, and resolved with `txid_status` when its
//!   connection breaks.
//! - **LISTEN/NOTIFY** ([`Cluster::listener`], [`Cluster::notify`]): a
//!   listener on a connection outside the pools that re-connects, listens
//!   again and reports the gap ([`ListenerEvent::Reconnected`]).
//! - **COPY** ([`Cluster::copy_in`], [`Cluster::copy_in_binary`],
//!   [`Cluster::copy_out`], and on [`Connection`]): on a connection of its
//!   own, closed when the copy is abandoned half-way.
//! - **OpenTelemetry**: each call's span carries the stable database
//!   attributes (`db.system.name`, `db.namespace`, `db.operation.name`,
//!   `db.query.text` with `telemetry.query_text`, `db.response.status_code`,
//!   `server.address`, `server.port`, `error.type`), and each call is timed
//!   in [`OPERATION_DURATION_METRIC`].
//! - **Bounds**: every round trip, inside transactions and closures too, ends
//!   within `query.statement_timeout` plus half the connect timeout.
//! - **Behind PgBouncer** (`query.prepared_statements = false`): statements
//!   use the unnamed statement in one round trip, parameter types taken from
//!   the Rust values.
//! - **For the health monitor**: [`Node`] handles with the pool, the
//!   breaker, roles, and cheap setters for ejection, lag and replay position;
//!   [`observe`], [`observe_replica`] and [`Node::record_observation`], the
//!   one reading of a node's role and replication state.
//!
//! See `docs/connection.md` for the rules in full.

mod cluster;
mod conn;
mod error;
mod lanes;
mod node;
mod observe;
mod params;
mod query;
mod record;
mod route;
mod row;
mod sqlcheck;
mod statements;
mod stats;
mod telemetry;

pub use crate::cluster::{
    BinaryCopyIn, CloseReport, Cluster, ClusterBuilder, CopyIn, CopyOut, LISTENER_DROPPED_METRIC,
    LISTENER_RECONNECTS_METRIC, Listener, ListenerEvent, MAX_CHANNEL_LEN, Notification,
};
pub use crate::conn::{Connection, Transaction};
pub use crate::error::{DbError, Error, TRANSIENT_SQLSTATES, is_transient_sqlstate};
pub use crate::node::{Node, Role};
pub use crate::observe::{
    LOOK_AGAIN_AFTER, OBSERVE_QUERY, Observation, ObserveError, ReplicaLag, observe,
    observe_replica, replica_lag,
};
pub use crate::query::{Bound, Queryable, Routed, RowStream, Statement};
pub use crate::route::{InvalidWalPosition, Op, Route, WalPosition};
pub use crate::row::{FromRow, RowError, RowProblem, column};
pub use crate::stats::{
    COMMIT_RESOLUTIONS_METRIC, ClusterMetrics, CommitResolutions, FAILOVERS_METRIC, NodeMetrics,
    QUERIES_METRIC, QUERY_DURATION_METRIC, QUERY_RETRIES_METRIC, SLOW_QUERIES_METRIC,
};
pub use crate::telemetry::{DB_SYSTEM, OPERATION_DURATION_METRIC};
pub use pgstack_pool::{AcquirePhase, IsolationLevel, PoolError, PoolStatus, TransactionOptions};
/// The state of a node's circuit breaker ([`Node::circuit_breaker`]).
pub use pgstack_resilience::BreakerState;
pub use tokio_postgres;
