//! A local PostgreSQL server started from the machine's own binaries.
//!
//! This is the code both the `pgstack` command line (its development server,
//! `pgstack db-up`) and the test kit (`pgstack-tests`, whose throwaway
//! servers are built on [`Server`]) need. It depends on no other pgstack
//! crate, so the test kit can keep testing every one of them.
//!
//! - [`PgBinaries`]: where `initdb`, `pg_ctl`, `postgres`, `pg_dump`, … are,
//!   and the user the server runs as when the process runs as root.
//! - [`Layout`] and [`Server`]: one data directory, its settings and the
//!   server on it — `initdb` (or a copy of a template), start on a free port,
//!   fast, immediate and `kill -9` stops, promotion, base backups.
//! - [`DevCluster`]: a server whose files persist in one folder (a project's
//!   `target/pgstack-dev/`) until it is purged.
//! - [`spawn_watchdog`]: removes a server when its owner dies without
//!   cleaning up.
//!
//! Everything blocks; call it from a blocking context (async callers use
//! `tokio::task::spawn_blocking`). [`DevCluster`]'s methods work inside or
//! outside a tokio runtime.
//!
//! ```no_run
//! # fn demo() -> Result<(), pgstack_localpg::Error> {
//! use pgstack_localpg::DevCluster;
//!
//! let dev = DevCluster::open("target/pgstack-dev");
//! let up = dev.up()?; // starts it, or finds it running
//! println!("export DATABASE_URL={}", up.url);
//! # Ok(())
//! # }
//! ```
//!
//! The servers listen on 127.0.0.1 only, trust every local login and run
//! with `fsync = off`: they are for development and tests, never for data
//! that matters.

mod binaries;
mod dev;
mod error;
mod server;
mod watchdog;

pub use binaries::PgBinaries;
pub use dev::{DevCluster, DevStatus, DevUp};
pub use error::Error;
pub use server::{Layout, Server, free_port};
pub use watchdog::spawn_watchdog;
