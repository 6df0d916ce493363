//! Schema migrations for pgstack, on sqlx's migration format.
//!
//! The folder format and the bookkeeping table are sqlx-cli's
//! (`NNNN_name.up.sql` / `NNNN_name.down.sql`, or simple `NNNN_name.sql`;
//! `_sqlx_migrations`), so a database migrated with sqlx-cli or
//! `sqlx::migrate!` can be managed here and the other way round. On top of
//! sqlx this crate adds:
//!
//! - **status** (applied, pending, checksum mismatch, missing file, failed),
//!   **validate**, a **dry run** ([`Migrator::plan`]), **down** by steps or to
//!   a version, **baseline** for adopting an existing database, and
//!   [`new_migration`];
//! - a **lock** safe for many instances: a session-level advisory lock (the
//!   key sqlx uses) on one pinned connection, polled so that a waiting
//!   instance reports who holds it and gives up after the lock timeout;
//! - each migration and its bookkeeping row in **one transaction**, files
//!   starting with `-- no-transaction` outside one (still under the lock);
//! - **lock-safe** migrations: each waits at most
//!   [`lock_wait`](Migrator::lock_wait) for a table lock (PostgreSQL's
//!   `lock_timeout`), so it never holds the application's queries in the lock
//!   queue for longer; one that gives up (`55P03`) is rolled back and retried
//!   with backoff ([`Event::LockNotAvailable`]), and
//!   [`Error::LockNotAvailable`] names the lock and who held it;
//! - a **linter** for lock hazards ([`Migrations::lint`], [`Migrator::lint`],
//!   [`lint_sql`]; findings also in `validate` and the dry run), with
//!   `-- pgstack:allow RULE` comments;
//! - **INVALID indexes** left by a failed concurrent build, shown by `status`
//!   and dropped by [`Migrator::repair_failed`];
//! - **failures** that name the file and the line of the failing statement;
//! - **checksums** that ignore CRLF vs LF;
//! - **progress** events and an after-schema-change hook.
//!
//! ```no_run
//! use pgstack_config::NodeSettings;
//! use pgstack_migrations::{Event, Migrations, Migrator, UpTarget};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let node = NodeSettings::from_url("postgres://app@localhost:5432/app")?;
//! let migrator = Migrator::new(Migrations::from_dir("migrations")?, &node)
//!     .lock_timeout(std::time::Duration::from_secs(30))
//!     .on_progress(|event| {
//!         if let Event::Applying { version, description, index, total, .. } = event {
//!             tracing::info!("[{index}/{total}] {version} {description}");
//!         }
//!     })
//!     .after_schema_change(|versions| tracing::info!(?versions, "clear statement caches"));
//!
//! let report = migrator.up(UpTarget::Latest).await?;
//! tracing::info!(applied = report.steps.len(), "migrated");
//!
//! // `validate` returns a report; `into_result` turns problems into an error.
//! migrator.validate().await?.into_result()?;
//! # Ok(())
//! # }
//! ```
//!
//! With a loaded [`DatabaseConfig`](pgstack_config::DatabaseConfig),
//! [`Migrator::from_config`] reads the folder, the lock timeout, the lock
//! wait and retries, and the environment (recorded in `pgstack_metadata`
//! after every `up`) from it.

mod checksum;
mod error;
mod invalid;
mod lint;
mod lock;
mod lockwait;
mod metadata;
mod migrator;
mod progress;
mod scan;
mod source;
mod status;

pub use crate::error::{Direction, Error, LockFailure, MigrationFailure, Result};
pub use crate::invalid::InvalidIndex;
pub use crate::lint::{ALLOW_MARKER, Finding, LintReport, Rule, Severity, lint_sql};
pub use crate::lock::LockHolder;
pub use crate::lockwait::{Blocker, LockConflict};
pub use crate::metadata::{ENVIRONMENT_KEY, METADATA_TABLE_SQL};
pub use crate::migrator::{DownTarget, MIGRATIONS_TABLE, Migrator, Operation, Repair, UpTarget};
pub use crate::progress::Event;
pub use crate::source::{
    LoadOptions, Migration, Migrations, NO_TRANSACTION_MARKER, NewMigration, SEQUENTIAL_LIMIT,
    Script, new_migration,
};
pub use crate::status::{
    AppliedRecord, MigrationState, Plan, PlannedStep, Report, Status, StatusEntry, Step, Validation,
};
/// The backoff type of [`Migrator::lock_retry_backoff`].
pub use pgstack_resilience::Backoff;
