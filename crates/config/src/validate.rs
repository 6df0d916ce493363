//! The rules a configuration must satisfy. Every rule runs, so one pass
//! reports every problem.

use std::time::Duration;

use crate::environment::Environment;
use crate::problem::{ConfigError, Problem, Source};
use crate::settings::{DatabaseConfig, NodeSettings, SlidingWindow, TlsMode};

/// The largest `pool.max_size` accepted. PostgreSQL's `max_connections` is
/// usually a few hundred; more than this per node is a typo.
pub const MAX_POOL_SIZE: u32 = 10_000;

/// The largest `migrations.lock_wait`: PostgreSQL's `lock_timeout` is a
/// number of milliseconds in an `int`.
pub const MAX_LOCK_WAIT: Duration = Duration::from_millis(i32::MAX as u64);

/// The largest `migrations.lock_retries` accepted; more is a typo.
pub const MAX_LOCK_RETRIES: u32 = 100;

/// PostgreSQL truncates `application_name` to `NAMEDATALEN - 1` bytes.
const MAX_APPLICATION_NAME: usize = 63;

impl DatabaseConfig {
    /// Checks every rule and reports every problem at once.
    ///
    /// The problems name [`Source::Code`] as the source of each value; a
    /// configuration loaded through `ConfigLoader` is validated while it
    /// loads, with the real source (file and line, or environment variable)
    /// of each value.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = check(self, &|_| Source::Code);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::new(problems))
        }
    }
}

fn d(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

struct Checker<'a> {
    source_of: &'a dyn Fn(&str) -> Source,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, key: &str, value: String, message: impl Into<String>) {
        let source = (self.source_of)(key);
        self.problems
            .push(Problem::new(key, Some(value), source, message));
    }

    /// `value` must not be zero.
    fn positive_duration(&mut self, key: &str, value: Duration, what: &str) {
        if value.is_zero() {
            self.fail(key, d(value), format!("must be greater than zero ({what})"));
        }
    }

    /// An optional duration: absent is fine, zero is not (write "none").
    fn optional_duration(&mut self, key: &str, value: Option<Duration>) {
        if let Some(v) = value
            && v.is_zero()
        {
            self.fail(
                key,
                d(v),
                "must be greater than zero; to turn it off, write \"none\" (or leave it out)",
            );
        }
    }

    fn at_least_one(&mut self, key: &str, value: u32, what: &str) {
        if value == 0 {
            self.fail(
                key,
                value.to_string(),
                format!("must be at least 1 ({what})"),
            );
        }
    }

    fn ratio(&mut self, key: &str, value: f64, zero_allowed: bool) {
        let ok = value.is_finite() && value <= 1.0 && (value > 0.0 || zero_allowed && value == 0.0);
        if !ok {
            let range = if zero_allowed {
                "between 0 and 1"
            } else {
                "greater than 0 and at most 1"
            };
            self.fail(
                key,
                value.to_string(),
                format!("must be a fraction {range} (0.5 = 50%)"),
            );
        }
    }

    fn multiplier(&mut self, key: &str, value: f64) {
        if !value.is_finite() || value < 1.0 {
            self.fail(
                key,
                value.to_string(),
                "must be at least 1 (1 keeps the delay fixed; 2 doubles it each time)",
            );
        }
    }

    fn node(&mut self, key: &str, node: &NodeSettings) {
        if node.host.trim().is_empty() {
            self.fail(
                &format!("{key}.host"),
                format!("{:?}", node.host),
                "must name a host",
            );
        }
        if node.port == 0 {
            self.fail(
                &format!("{key}.port"),
                "0".to_owned(),
                "must be a TCP port from 1 to 65535",
            );
        }
        if node.database.trim().is_empty() {
            self.fail(
                &format!("{key}.database"),
                format!("{:?}", node.database),
                "must name a database",
            );
        }
        if node.user.trim().is_empty() {
            self.fail(
                &format!("{key}.user"),
                format!("{:?}", node.user),
                "must name a role",
            );
        }
    }
}

/// Host, port and database: what makes two node settings the same server
/// and database.
fn same_target(a: &NodeSettings, b: &NodeSettings) -> bool {
    a.host.eq_ignore_ascii_case(&b.host) && a.port == b.port && a.database == b.database
}

/// Runs every rule; `source_of` names where the value of a key came from.
pub(crate) fn check(config: &DatabaseConfig, source_of: &dyn Fn(&str) -> Source) -> Vec<Problem> {
    let mut c = Checker {
        source_of,
        problems: Vec::new(),
    };

    // Nodes.
    c.node("primary", &config.primary);
    for (i, replica) in config.replicas.iter().enumerate() {
        let key = format!("replicas[{i}]");
        c.node(&key, replica);
        if same_target(replica, &config.primary) {
            c.fail(
                &key,
                replica.redacted_url(),
                format!(
                    "points at the primary ({}:{}/{}); a replica must be another server \
                     (remove it, or fix its host or port)",
                    config.primary.host, config.primary.port, config.primary.database
                ),
            );
        } else if let Some(first) = config.replicas[..i]
            .iter()
            .position(|other| same_target(other, replica))
        {
            c.fail(
                &key,
                replica.redacted_url(),
                format!(
                    "is the same server and database as replicas[{first}]; list each replica once"
                ),
            );
        }
    }

    // Pool.
    let pool = &config.pool;
    if pool.max_size == 0 {
        c.fail("pool.max_size", "0".to_owned(), "must be at least 1");
    } else if pool.max_size > MAX_POOL_SIZE {
        c.fail(
            "pool.max_size",
            pool.max_size.to_string(),
            format!(
                "is absurdly large (at most {MAX_POOL_SIZE}); PostgreSQL's max_connections is \
                 usually a few hundred"
            ),
        );
    }
    if pool.min_idle > pool.max_size {
        let max_source = source_of("pool.max_size");
        c.fail(
            "pool.min_idle",
            pool.min_idle.to_string(),
            format!(
                "must not exceed pool.max_size ({}, from {max_source}); lower pool.min_idle or \
                 raise pool.max_size",
                pool.max_size
            ),
        );
    }
    c.positive_duration(
        "pool.acquire_timeout",
        pool.acquire_timeout,
        "the longest wait for a connection",
    );
    c.positive_duration(
        "pool.connect_timeout",
        pool.connect_timeout,
        "the longest time to open a connection",
    );
    c.optional_duration("pool.idle_timeout", pool.idle_timeout);
    c.optional_duration("pool.max_lifetime", pool.max_lifetime);
    c.optional_duration(
        "pool.leak_detection_threshold",
        pool.leak_detection_threshold,
    );
    if let Some(lifetime) = pool.max_lifetime
        && !lifetime.is_zero()
        && pool.max_lifetime_jitter >= lifetime
    {
        c.fail(
            "pool.max_lifetime_jitter",
            d(pool.max_lifetime_jitter),
            format!("must be shorter than pool.max_lifetime ({})", d(lifetime)),
        );
    }

    // TLS.
    if config.environment == Environment::Production && config.tls.mode < TlsMode::Require {
        c.fail(
            "tls.mode",
            config.tls.mode.as_str().to_owned(),
            "production requires TLS: set tls.mode to require, verify-ca or verify-full \
             (verify-full recommended)",
        );
    }
    if let Some(path) = &config.tls.root_cert
        && !path.is_file()
    {
        c.fail(
            "tls.root_cert",
            path.display().to_string(),
            "no such file; name a PEM file of CA certificates, or leave it out to trust the \
             system's roots",
        );
    }

    // Keepalive.
    let keepalive = &config.keepalive;
    if keepalive.enabled {
        c.positive_duration(
            "keepalive.idle",
            keepalive.idle,
            "idle time before the first probe",
        );
        c.positive_duration(
            "keepalive.interval",
            keepalive.interval,
            "time between probes",
        );
        c.at_least_one(
            "keepalive.retries",
            keepalive.retries,
            "or set keepalive.enabled = false",
        );
    }
    c.optional_duration("keepalive.tcp_user_timeout", keepalive.tcp_user_timeout);

    // Query.
    let query = &config.query;
    c.optional_duration("query.statement_timeout", query.statement_timeout);
    if query.application_name.len() > MAX_APPLICATION_NAME {
        c.fail(
            "query.application_name",
            format!("{:?}", query.application_name),
            format!("is longer than {MAX_APPLICATION_NAME} bytes; PostgreSQL would truncate it"),
        );
    }

    if let Some(shared) = query.shared_connections
        && pool.max_size > 0
        && shared >= pool.max_size
    {
        let max_source = source_of("pool.max_size");
        c.fail(
            "query.shared_connections",
            shared.to_string(),
            format!(
                "must be below pool.max_size ({}, from {max_source}) so that transactions and \
                 long statements can still get a connection; lower it (0: a connection per \
                 statement) or raise pool.max_size",
                pool.max_size
            ),
        );
    }

    // Retry.
    let retry = &config.retry;
    c.at_least_one(
        "retry.max_attempts",
        retry.max_attempts,
        "attempts in all; 1 turns retries off",
    );
    c.positive_duration(
        "retry.initial_backoff",
        retry.initial_backoff,
        "the delay before the second attempt",
    );
    if retry.max_backoff < retry.initial_backoff {
        c.fail(
            "retry.max_backoff",
            d(retry.max_backoff),
            format!(
                "must not be shorter than retry.initial_backoff ({}, from {})",
                d(retry.initial_backoff),
                source_of("retry.initial_backoff")
            ),
        );
    }
    c.multiplier("retry.multiplier", retry.multiplier);
    c.optional_duration("retry.deadline", retry.deadline);
    c.ratio("retry.budget_ratio", retry.budget_ratio, true);
    c.positive_duration(
        "retry.budget_window",
        retry.budget_window,
        "the period the retry budget counts",
    );

    // Circuit breaker.
    let cb = &config.circuit_breaker;
    c.ratio(
        "circuit_breaker.failure_rate_threshold",
        cb.failure_rate_threshold,
        false,
    );
    c.ratio(
        "circuit_breaker.slow_call_rate_threshold",
        cb.slow_call_rate_threshold,
        false,
    );
    c.positive_duration(
        "circuit_breaker.slow_call_duration",
        cb.slow_call_duration,
        "a call slower than this is slow",
    );
    c.at_least_one(
        "circuit_breaker.minimum_calls",
        cb.minimum_calls,
        "calls judged before the breaker may open",
    );
    match cb.sliding_window {
        SlidingWindow::Count => {
            c.at_least_one(
                "circuit_breaker.window_size",
                cb.window_size,
                "calls in the window",
            );
            if cb.window_size > 0 && cb.minimum_calls > cb.window_size {
                c.fail(
                    "circuit_breaker.minimum_calls",
                    cb.minimum_calls.to_string(),
                    format!(
                        "must not exceed circuit_breaker.window_size ({}), or the breaker could \
                         never open",
                        cb.window_size
                    ),
                );
            }
        }
        SlidingWindow::Time => {
            c.positive_duration(
                "circuit_breaker.window_duration",
                cb.window_duration,
                "the length of the window",
            );
        }
    }
    c.positive_duration(
        "circuit_breaker.open_duration",
        cb.open_duration,
        "how long the breaker stays open",
    );
    c.multiplier(
        "circuit_breaker.open_duration_multiplier",
        cb.open_duration_multiplier,
    );
    if cb.max_open_duration < cb.open_duration {
        c.fail(
            "circuit_breaker.max_open_duration",
            d(cb.max_open_duration),
            format!(
                "must not be shorter than circuit_breaker.open_duration ({})",
                d(cb.open_duration)
            ),
        );
    }
    c.at_least_one(
        "circuit_breaker.half_open_probes",
        cb.half_open_probes,
        "calls let through while half-open",
    );

    // Health.
    let health = &config.health;
    c.positive_duration("health.interval", health.interval, "time between probes");
    c.positive_duration(
        "health.probe_timeout",
        health.probe_timeout,
        "a probe that takes longer fails",
    );
    if !health.probe_timeout.is_zero()
        && !health.interval.is_zero()
        && health.probe_timeout > health.interval
    {
        c.fail(
            "health.probe_timeout",
            d(health.probe_timeout),
            format!(
                "must not exceed health.interval ({}), or probes of one node would overlap",
                d(health.interval)
            ),
        );
    }
    c.positive_duration(
        "health.max_replica_lag",
        health.max_replica_lag,
        "every replica lags a little",
    );
    c.at_least_one(
        "health.eject_after",
        health.eject_after,
        "failed probes before a replica is ejected",
    );
    c.at_least_one(
        "health.restore_after",
        health.restore_after,
        "good probes before a replica is restored",
    );

    // Migrations.
    let migrations = &config.migrations;
    if migrations.dir.as_os_str().is_empty() {
        c.fail(
            "migrations.dir",
            "\"\"".to_owned(),
            "must name the folder of migration files",
        );
    }
    c.positive_duration(
        "migrations.lock_timeout",
        migrations.lock_timeout,
        "the longest wait for the migration lock",
    );
    c.positive_duration(
        "migrations.lock_wait",
        migrations.lock_wait,
        "PostgreSQL reads a lock_timeout of 0 as \"wait forever\", which would let a \
         migration queue up the application's queries behind it",
    );
    if migrations.lock_wait > MAX_LOCK_WAIT {
        c.fail(
            "migrations.lock_wait",
            d(migrations.lock_wait),
            format!(
                "is longer than PostgreSQL's largest lock_timeout ({}); while a migration waits, \
                 reads and writes of the table queue behind it, so keep it to a few seconds",
                d(MAX_LOCK_WAIT)
            ),
        );
    }
    if migrations.lock_retries > MAX_LOCK_RETRIES {
        c.fail(
            "migrations.lock_retries",
            migrations.lock_retries.to_string(),
            format!(
                "is absurdly large (at most {MAX_LOCK_RETRIES}); each retry waits up to \
                 migrations.lock_wait plus a growing backoff"
            ),
        );
    }

    // Start-up.
    c.optional_duration(
        "startup.wait_for_database",
        config.startup.wait_for_database,
    );

    c.problems
}
