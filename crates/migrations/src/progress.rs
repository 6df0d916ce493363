//! Progress events and the callbacks that receive them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Direction;
use crate::lock::LockHolder;
use crate::lockwait::LockConflict;

/// What the migrator is doing, for a progress bar or a log.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Another session holds the migration lock; sent when waiting starts
    /// and every few seconds after.
    LockWaiting {
        /// Who holds it, if the server could tell.
        holder: Option<LockHolder>,
        /// How long the migrator has waited so far.
        waited: Duration,
    },
    /// The lock is ours.
    LockAcquired {
        /// How long it took.
        waited: Duration,
    },
    /// A migration starts.
    Applying {
        /// Its version.
        version: i64,
        /// Its description.
        description: String,
        /// Up or down.
        direction: Direction,
        /// 1-based position in this run.
        index: usize,
        /// How many migrations this run will apply or revert.
        total: usize,
    },
    /// A migration finished.
    Applied {
        /// Its version.
        version: i64,
        /// Up or down.
        direction: Direction,
        /// How long its SQL and bookkeeping took.
        elapsed: Duration,
    },
    /// A migration gave up waiting for a lock (`migrations.lock_wait`,
    /// SQLSTATE 55P03) and was rolled back. It is tried again after
    /// `retry_in`, or, when that is `None`, the run fails with
    /// [`Error::LockNotAvailable`](crate::Error::LockNotAvailable).
    LockNotAvailable {
        /// Its version.
        version: i64,
        /// Its description.
        description: String,
        /// The file that waited.
        file: PathBuf,
        /// The attempt that gave up (1 for the first).
        attempt: u32,
        /// How many attempts the migration gets in all.
        attempts: u32,
        /// How long the attempt waited for the lock.
        lock_wait: Duration,
        /// When the next attempt starts; `None` after the last one.
        retry_in: Option<Duration>,
        /// The lock it waited for and who held it up, as the migrator last
        /// saw it (on this attempt or an earlier one).
        conflict: Option<LockConflict>,
    },
    /// Versions were recorded as applied without running them.
    Baselined {
        /// The versions recorded.
        versions: Vec<i64>,
    },
    /// The run is over.
    Done {
        /// How many migrations were applied or reverted.
        changed: usize,
        /// How long the whole run took, lock wait included.
        elapsed: Duration,
    },
}

pub(crate) type ProgressFn = Arc<dyn Fn(&Event) + Send + Sync>;
pub(crate) type SchemaChangeFn = Arc<dyn Fn(&[i64]) + Send + Sync>;

/// The callbacks of one migrator.
#[derive(Clone, Default)]
pub(crate) struct Observer {
    pub(crate) progress: Option<ProgressFn>,
    pub(crate) schema_changed: Option<SchemaChangeFn>,
}

impl Observer {
    pub(crate) fn emit(&self, event: &Event) {
        if let Some(f) = &self.progress {
            f(event);
        }
    }

    pub(crate) fn schema_changed(&self, versions: &[i64]) {
        if versions.is_empty() {
            return;
        }
        if let Some(f) = &self.schema_changed {
            f(versions);
        }
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observer")
            .field("progress", &self.progress.is_some())
            .field("schema_changed", &self.schema_changed.is_some())
            .finish()
    }
}
