//! The lifecycle of a pgstack service's database layer: start, status,
//! metrics and graceful shutdown, over every crate below it.
//!
//! Most services use it through the `pgstack` facade (`pgstack::Database`);
//! use it directly to own the lifecycle yourself.
//!
//! # Start
//!
//! ```no_run
//! use std::time::Duration;
//! use pgstack_config::DatabaseConfig;
//! use pgstack_connection::Route;
//! use pgstack_orchestrator::{Orchestrator, StartEvent};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = DatabaseConfig::for_tests("postgres://app:secret@localhost/app")?;
//! let db = Orchestrator::builder(config)
//!     // Without a wait, an unreachable database fails the start at once.
//!     .wait_for_database(Duration::from_secs(30))
//!     .on_event(|event| {
//!         if let StartEvent::WaitingForDatabase { waited, .. } = event {
//!             eprintln!("still waiting for the database after {waited:?}");
//!         }
//!     })
//!     .start()
//!     .await?;
//!
//! let one: i32 = db.cluster().query_one("one", Route::Read, "SELECT 1", &[]).await?.get(0);
//! assert_eq!(one, 1);
//!
//! // Everything in one report, as JSON for a status page.
//! let status = db.status().await;
//! println!("{}", serde_json::to_string_pretty(&status)?);
//!
//! // On SIGTERM: refuse new calls, let running ones finish for 10 s, cancel
//! // the rest on the server, close the pools.
//! let report = db.shutdown_on_signal(Duration::from_secs(10)).await;
//! println!("{} completed, {} cut off", report.completed, report.cut_off);
//! # Ok(()) }
//! ```
//!
//! `start` does, in order, and fails with a [`StartError`] that says which
//! step broke (closing whatever it opened):
//!
//! 1. **validate** the configuration (every problem listed);
//! 2. **connect**: build the cluster and find the writable primary
//!    ([`pgstack_connection::observe`]); an unreachable database fails at once
//!    ([`StartError::Unreachable`]) unless [`StartOptions::wait_for_database`]
//!    is set, in which case it retries with backoff, logging each attempt
//!    ([`StartEvent::WaitingForDatabase`]), until the wait is over
//!    ([`StartError::WaitTimedOut`]);
//! 3. **warm up**: open `pool.min_idle` connections on every node;
//! 4. **verify roles**: a replica that accepts writes, or a primary that is
//!    a standby, is reported ([`Status::role_warnings`]);
//! 5. **migrate** when `migrations.auto_migrate` is on (feature
//!    `migrations`): pending migrations are applied under the migration lock,
//!    then the pooled statement caches are cleared;
//! 6. **monitor**: start the health monitor when
//!    `features.health_monitoring` is on (feature `health`;
//!    [`OrchestratorBuilder::health_monitor`] adds rules and sinks);
//! 7. **ready**.
//!
//! # Shutdown
//!
//! [`Orchestrator::shutdown`] refuses new calls (`Error::ShuttingDown`), lets
//! calls in flight finish until the deadline, then cancels what still runs
//! on the server with `pg_cancel_backend` (only this instance's sessions:
//! their `application_name` carries an instance tag), closes the pools,
//! terminates any session of ours left after a short grace, and returns a
//! [`ShutdownReport`] of what completed and what was cut off.
//!
//! # Features
//!
//! - `migrations` (default): apply pending migrations at start and report
//!   their state in [`Status::migrations`].
//! - `health` (default): run the `pgstack-health` monitor when
//!   `features.health_monitoring` is on; [`Orchestrator::status`] and
//!   [`Orchestrator::health`] read its latest report, and the shutdown stops
//!   it. Without it (or with the monitoring switched off), `status()` probes
//!   each node when called.
//!
//! See `docs/orchestrator.md` for the lifecycle in full.

mod error;
mod event;
mod options;
mod orchestrator;
mod shutdown;
mod status;

pub use crate::error::{BoxError, StartError};
pub use crate::event::StartEvent;
pub use crate::options::StartOptions;
pub use crate::orchestrator::{
    Orchestrator, OrchestratorBuilder, STARTUP_SECONDS_METRIC, UP_METRIC,
};
pub use crate::shutdown::{NodeCount, SHUTDOWN_CUT_OFF_METRIC, ShutdownReport, shutdown_signal};
#[cfg(feature = "health")]
pub use crate::status::MonitorSummary;
pub use crate::status::{
    Health, LifecycleState, Metrics, MigrationSummary, NodeHealth, NodeHealthEntry, NodeStatus,
    Status,
};
