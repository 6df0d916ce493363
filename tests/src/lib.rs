//! The pgstack test kit: real PostgreSQL servers for tests.
//!
//! - [`TestCluster`]: a throwaway server (primary or streaming replica) that a
//!   test can stop, restart, `kill -9`, or make lag.
//! - [`TestDb`]: a fresh database per test, on `DATABASE_URL`'s server or on a
//!   throwaway cluster shared by the test binary.
//! - [`ChaosProxy`]: a loopback TCP proxy that adds latency, resets, refuses or
//!   black-holes connections on demand.
//! - [`DevCluster`]: the persistent development server behind
//!   `pgstack db-up` (re-exported from `pgstack-localpg`).
//!
//! The server binaries are found on `PATH`, through `pg_config --bindir`, or
//! under `/usr/lib/postgresql/*/bin` (see [`PgBinaries`]). When the tests run
//! as root, servers run as the `postgres` user. Finding the binaries and
//! running a server live in `pgstack-localpg`, which the `pgstack` command
//! line shares; this crate re-exports what it needs from there.
//!
//! ```no_run
//! use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};
//!
//! #[tokio::test]
//! async fn survives_a_reset() -> anyhow::Result<()> {
//!     let db = TestDb::new().await?; // a fresh database, dropped afterwards
//!     db.client().await?.batch_execute("CREATE TABLE t (id int)").await?;
//!
//!     let cluster = TestCluster::start().await?; // a server of our own
//!     let proxy = ChaosProxy::start(cluster.addr()).await?;
//!     let client = pgstack_tests::connect_url(&proxy.url("postgres")).await?;
//!     proxy.reset_all();
//!     assert!(client.simple_query("SELECT 1").await.is_err());
//!     proxy.set_mode(ProxyMode::PassThrough);
//!     Ok(())
//! }
//! ```
//!
//! This crate depends on no pgstack crate of the stack (only on the leaf
//! `pgstack-localpg`), so every pgstack crate can use it in its tests.

mod cluster;
mod db;
mod proxy;

pub use cluster::TestCluster;
pub use db::TestDb;
pub use pgstack_localpg::Error as KitError;
pub use pgstack_localpg::{DevCluster, DevStatus, DevUp, PgBinaries};
pub use proxy::{ChaosProxy, ProxyMode, ProxyStats};

/// Connects to `url` with tokio-postgres (no TLS) and spawns the connection
/// task on the current runtime.
pub async fn connect_url(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    Ok(cluster::connect(url, &db::redact(url)).await?)
}
