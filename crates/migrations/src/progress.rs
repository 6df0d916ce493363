//! Progress events and the callbacks that receive them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Direction;
use crate::lock::LockHolder;

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
