//! The pool's figures under OpenTelemetry's `db.client.connection.*` names,
//! beside the `pgstack_pool_*` ones ([`crate::status`]); handles resolved
//! once per pool, each labelled `db.client.connection.pool.name` (the
//! node's name).

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Label};

/// Gauge of open connections, labelled `db.client.connection.pool.name` and
/// `db.client.connection.state` (`idle`, `used`).
pub const CONNECTION_COUNT_METRIC: &str = "db.client.connection.count";
/// Gauge of the most connections the pool opens (`pool.max_size`).
pub const CONNECTION_MAX_METRIC: &str = "db.client.connection.max";
/// Gauge of checkouts waiting for a connection.
pub const CONNECTION_PENDING_METRIC: &str = "db.client.connection.pending_requests";
/// Counter of checkouts that timed out.
pub const CONNECTION_TIMEOUTS_METRIC: &str = "db.client.connection.timeouts";
/// Histogram of the time to get a connection, in seconds.
pub const CONNECTION_WAIT_METRIC: &str = "db.client.connection.wait_time";
/// Histogram of the time to open a connection (TCP, TLS, login), in seconds.
pub const CONNECTION_CREATE_METRIC: &str = "db.client.connection.create_time";
/// Histogram of how long a connection was checked out, in seconds.
pub const CONNECTION_USE_METRIC: &str = "db.client.connection.use_time";

/// The handles of one pool.
pub(crate) struct PoolSeries {
    idle: Gauge,
    used: Gauge,
    pending: Gauge,
    timeouts: Counter,
    wait: Histogram,
    create: Histogram,
    used_for: Histogram,
}

impl PoolSeries {
    pub(crate) fn new(node: &str, max_size: u32) -> Self {
        let pool = Label::new("db.client.connection.pool.name", node.to_owned());
        let state = |state: &'static str| {
            vec![
                pool.clone(),
                Label::new("db.client.connection.state", state),
            ]
        };
        metrics::gauge!(CONNECTION_MAX_METRIC, vec![pool.clone()]).set(f64::from(max_size));
        PoolSeries {
            idle: metrics::gauge!(CONNECTION_COUNT_METRIC, state("idle")),
            used: metrics::gauge!(CONNECTION_COUNT_METRIC, state("used")),
            pending: metrics::gauge!(CONNECTION_PENDING_METRIC, vec![pool.clone()]),
            timeouts: metrics::counter!(CONNECTION_TIMEOUTS_METRIC, vec![pool.clone()]),
            wait: metrics::histogram!(CONNECTION_WAIT_METRIC, vec![pool.clone()]),
            create: metrics::histogram!(CONNECTION_CREATE_METRIC, vec![pool.clone()]),
            used_for: metrics::histogram!(CONNECTION_USE_METRIC, vec![pool]),
        }
    }

    pub(crate) fn connections(&self, idle: u64, used: u64) {
        self.idle.set(idle as f64);
        self.used.set(used as f64);
    }

    /// A checkout starts (`true`) or stops (`false`) waiting: moved by one,
    /// so concurrent changes never leave a stale figure.
    pub(crate) fn pending(&self, started: bool) {
        if started {
            self.pending.increment(1.0);
        } else {
            self.pending.decrement(1.0);
        }
    }

    pub(crate) fn waited(&self, waited: Duration) {
        self.wait.record(waited.as_secs_f64());
    }

    pub(crate) fn timed_out(&self, waited: Duration) {
        self.timeouts.increment(1);
        self.wait.record(waited.as_secs_f64());
    }

    pub(crate) fn created_in(&self, took: Duration) {
        self.create.record(took.as_secs_f64());
    }

    pub(crate) fn used_for(&self, held: Duration) {
        self.used_for.record(held.as_secs_f64());
    }
}
