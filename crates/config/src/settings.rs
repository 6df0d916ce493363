//! The settings types: plain data, one struct per section of the configuration.
//!
//! Every type here is usable with `default-features = false`; loading from
//! files and the environment lives behind the `load` feature.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::environment::Environment;
use crate::secret::Password;

/// The whole configuration of a pgstack service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The environment whose profile supplied the defaults.
    pub environment: Environment,
    /// The primary (read-write) node.
    pub primary: NodeSettings,
    /// Read replicas; empty when there are none.
    pub replicas: Vec<NodeSettings>,
    /// Pool sizing, timeouts and checkout validation, per node.
    pub pool: PoolSettings,
    /// Transport security.
    pub tls: TlsSettings,
    /// TCP keepalive on every connection.
    pub keepalive: KeepaliveSettings,
    /// Per-statement settings.
    pub query: QuerySettings,
    /// Retry policy for transient errors.
    pub retry: RetrySettings,
    /// Per-node circuit breaker.
    pub circuit_breaker: CircuitBreakerSettings,
    /// Health probes.
    pub health: HealthSettings,
    /// Schema migrations.
    pub migrations: MigrationSettings,
    /// Service start-up.
    pub startup: StartupSettings,
    /// Switches for optional behaviour.
    pub features: FeatureSettings,
    /// What spans and metrics carry (OpenTelemetry's database conventions).
    pub telemetry: TelemetrySettings,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig::for_environment(Environment::default())
    }
}

impl DatabaseConfig {
    /// The built-in defaults with the profile of `environment` applied
    /// (pool sizes, TLS mode, auto-migrate and health interval).
    pub fn for_environment(environment: Environment) -> Self {
        let profile = Profile::of(environment);
        DatabaseConfig {
            environment,
            primary: NodeSettings::default(),
            replicas: Vec::new(),
            pool: PoolSettings {
                min_idle: profile.min_idle,
                max_size: profile.max_size,
                ..PoolSettings::default()
            },
            tls: TlsSettings {
                mode: profile.tls_mode,
                ..TlsSettings::default()
            },
            keepalive: KeepaliveSettings::default(),
            query: QuerySettings::default(),
            retry: RetrySettings::default(),
            circuit_breaker: CircuitBreakerSettings::default(),
            health: HealthSettings {
                interval: profile.health_interval,
                ..HealthSettings::default()
            },
            migrations: MigrationSettings {
                auto_migrate: profile.auto_migrate,
                ..MigrationSettings::default()
            },
            startup: StartupSettings::default(),
            features: FeatureSettings::default(),
            telemetry: TelemetrySettings {
                query_text: profile.query_text,
            },
        }
    }

    /// A configuration for test code: the `test` profile, pointed at `url`.
    ///
    /// # Errors
    /// When `url` is not a valid `postgres://` URL.
    pub fn for_tests(url: &str) -> Result<Self, crate::NodeUrlError> {
        let mut config = DatabaseConfig::for_environment(Environment::Test);
        config.primary = NodeSettings::from_url(url)?;
        Ok(config)
    }
}

/// The values that differ between environments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    /// `pool.min_idle`.
    pub min_idle: u32,
    /// `pool.max_size`.
    pub max_size: u32,
    /// `tls.mode`.
    pub tls_mode: TlsMode,
    /// `migrations.auto_migrate`.
    pub auto_migrate: bool,
    /// `health.interval`.
    pub health_interval: Duration,
    /// `telemetry.query_text`.
    pub query_text: bool,
}

impl Profile {
    /// The profile of `environment`.
    pub const fn of(environment: Environment) -> Profile {
        match environment {
            Environment::Development => Profile {
                min_idle: 2,
                max_size: 10,
                tls_mode: TlsMode::Disable,
                auto_migrate: true,
                health_interval: Duration::from_secs(30),
                query_text: true,
            },
            Environment::Test => Profile {
                min_idle: 1,
                max_size: 5,
                tls_mode: TlsMode::Disable,
                auto_migrate: true,
                health_interval: Duration::from_secs(5),
                query_text: true,
            },
            Environment::Staging => Profile {
                min_idle: 3,
                max_size: 15,
                tls_mode: TlsMode::Prefer,
                auto_migrate: false,
                health_interval: Duration::from_secs(30),
                query_text: true,
            },
            Environment::Production => Profile {
                min_idle: 5,
                max_size: 50,
                tls_mode: TlsMode::Require,
                auto_migrate: false,
                health_interval: Duration::from_secs(15),
                query_text: false,
            },
        }
    }
}

/// Where one PostgreSQL node is and how to log in.
///
/// In `pgstack.toml` a node is either a table of these keys or a single
/// `postgres://user:password@host:port/database` URL string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NodeSettingsRepr")]
pub struct NodeSettings {
    /// Host name, IP address, or an absolute path to a Unix socket directory.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database name.
    pub database: String,
    /// Role to log in as.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<Password>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            host: "localhost".to_owned(),
            port: 5432,
            database: "postgres".to_owned(),
            user: "postgres".to_owned(),
            password: None,
        }
    }
}

/// What a node URL got wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeUrlError {
    /// The text is not a URL at all.
    #[error("not a valid URL ({reason}); expected postgres://user:password@host:port/database")]
    Malformed {
        /// What the URL parser said.
        reason: String,
    },
    /// The scheme is not `postgres` or `postgresql`.
    #[error("unsupported scheme {scheme:?}; expected postgres:// or postgresql://")]
    Scheme {
        /// The scheme that was given.
        scheme: String,
    },
    /// The URL names no host.
    #[error("the URL names no host; expected postgres://user:password@host:port/database")]
    NoHost,
    /// A percent-encoded part is not UTF-8.
    #[error("the URL's {part} is not valid UTF-8 after percent-decoding")]
    Encoding {
        /// Which part (user, password, database).
        part: &'static str,
    },
}

impl NodeSettings {
    /// Parses `postgres://user:password@host:port/database`. Missing parts
    /// take the defaults (port 5432, user and database `postgres`).
    ///
    /// The error never contains the URL, since it may hold a password.
    ///
    /// # Errors
    /// [`NodeUrlError`] says what is wrong with the URL.
    pub fn from_url(text: &str) -> Result<Self, NodeUrlError> {
        let url = url::Url::parse(text.trim()).map_err(|e| NodeUrlError::Malformed {
            reason: e.to_string(),
        })?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(NodeUrlError::Scheme {
                scheme: url.scheme().to_owned(),
            });
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(host) => host.to_string(),
            None => return Err(NodeUrlError::NoHost),
        };
        if host.is_empty() {
            return Err(NodeUrlError::NoHost);
        }
        let decode = |part: &'static str, s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .ok_or(NodeUrlError::Encoding { part })
        };
        let defaults = NodeSettings::default();
        let user = if url.username().is_empty() {
            defaults.user
        } else {
            decode("user", url.username())?
        };
        let password = match url.password() {
            Some(p) => Some(Password::new(decode("password", p)?)),
            None => None,
        };
        let path = url.path().trim_start_matches('/');
        let database = if path.is_empty() {
            defaults.database
        } else {
            decode("database", path)?
        };
        Ok(NodeSettings {
            host,
            port: url.port().unwrap_or(defaults.port),
            database,
            user,
            password,
        })
    }

    /// The node as a URL with the password replaced by [`crate::REDACTED`],
    /// fit for logs and error messages.
    pub fn redacted_url(&self) -> String {
        let auth = match &self.password {
            Some(_) => format!("{}:{}@", self.user, crate::REDACTED),
            None => format!("{}@", self.user),
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("postgres://{auth}{host}:{}/{}", self.port, self.database)
    }
}

impl std::fmt::Display for NodeSettings {
    /// The node as a URL, password redacted (see [`NodeSettings::redacted_url`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted_url())
    }
}

/// How a node may be written in a file: a URL or a table.
#[derive(Deserialize)]
#[serde(untagged)]
enum NodeSettingsRepr {
    Url(String),
    Table(NodeTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeTable {
    #[serde(default)]
    url: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    database: Option<String>,
    user: Option<String>,
    password: Option<Password>,
}

impl TryFrom<NodeSettingsRepr> for NodeSettings {
    type Error = NodeUrlError;

    fn try_from(repr: NodeSettingsRepr) -> Result<Self, Self::Error> {
        match repr {
            NodeSettingsRepr::Url(text) => NodeSettings::from_url(&text),
            NodeSettingsRepr::Table(table) => {
                let base = match &table.url {
                    Some(text) => NodeSettings::from_url(text)?,
                    None => NodeSettings::default(),
                };
                Ok(NodeSettings {
                    host: table.host.unwrap_or(base.host),
                    port: table.port.unwrap_or(base.port),
                    database: table.database.unwrap_or(base.database),
                    user: table.user.unwrap_or(base.user),
                    password: table.password.or(base.password),
                })
            }
        }
    }
}

/// How a connection is checked when it is taken from the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckoutValidation {
    /// Check the socket and session state; ping only connections idle longer
    /// than `pool.validation_idle_threshold`. No round trip on a busy pool.
    #[default]
    IdlePing,
    /// Ping the server on every checkout (bb8's default; a round trip each time).
    Always,
    /// Check the socket and session state only; never ping.
    Never,
}

/// Pool sizing, timeouts and checkout validation. Applies to each node's pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSettings {
    /// Idle connections kept open and warmed at start.
    pub min_idle: u32,
    /// Most connections the pool opens to one node.
    pub max_size: u32,
    /// Longest wait for a connection before the caller gets a pool timeout.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Longest time to open one new connection (TCP, TLS and login).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle connections above `min_idle` are closed after this long; none to keep them.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Connections are replaced after this long; none to keep them forever.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// Each connection's lifetime is shortened by a random amount up to this,
    /// so a pool does not reconnect all at once.
    #[serde(with = "humantime_serde")]
    pub max_lifetime_jitter: Duration,
    /// How a connection is checked on checkout.
    pub checkout_validation: CheckoutValidation,
    /// With `idle-ping`, connections idle longer than this are pinged on checkout.
    #[serde(with = "humantime_serde")]
    pub validation_idle_threshold: Duration,
    /// A connection held longer than this is logged once as a possible leak; none to disable.
    #[serde(with = "humantime_serde")]
    pub leak_detection_threshold: Option<Duration>,
}

impl Default for PoolSettings {
    fn default() -> Self {
        let profile = Profile::of(Environment::Development);
        PoolSettings {
            min_idle: profile.min_idle,
            max_size: profile.max_size,
            acquire_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            max_lifetime_jitter: Duration::from_secs(60),
            checkout_validation: CheckoutValidation::IdlePing,
            validation_idle_threshold: Duration::from_secs(30),
            leak_detection_threshold: None,
        }
    }
}

/// TLS modes, as in libpq's `sslmode`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Never use TLS.
    #[default]
    Disable,
    /// Use TLS when the server offers it, without verifying the certificate.
    Prefer,
    /// Always use TLS, without verifying the certificate.
    Require,
    /// Always use TLS and verify the certificate chain, not the host name.
    VerifyCa,
    /// Always use TLS and verify the chain and the host name.
    VerifyFull,
}

impl TlsMode {
    /// The libpq spelling (`verify-full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// Transport security.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// The TLS mode.
    pub mode: TlsMode,
    /// PEM file of the CA certificates to trust; the system's roots when unset.
    pub root_cert: Option<PathBuf>,
}

/// TCP keepalive on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveSettings {
    /// Turn keepalives on.
    pub enabled: bool,
    /// Idle time before the first probe.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// Time between probes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Unanswered probes before the connection is considered dead.
    pub retries: u32,
    /// How long data sent on a connection may stay unacknowledged before the
    /// kernel drops the connection (`TCP_USER_TIMEOUT`, Linux): a network
    /// partition fails the requests in flight instead of leaving them
    /// waiting for TCP's own retransmission limit (about 15 minutes). It also
    /// caps how long keepalive takes to declare a connection dead. None
    /// leaves the system's behaviour.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Option<Duration>,
}

impl Default for KeepaliveSettings {
    fn default() -> Self {
        KeepaliveSettings {
            enabled: true,
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            retries: 3,
            tcp_user_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Per-statement settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuerySettings {
    /// Server-side `statement_timeout` set on every connection; none for the server's default.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// Statements slower than this are logged and counted.
    #[serde(with = "humantime_serde")]
    pub slow_query_threshold: Duration,
    /// `application_name` set on every connection.
    pub application_name: String,
    /// Include parameter values in slow-query logs (off: they may hold personal data).
    pub log_parameters: bool,
    /// Use named prepared statements. Turn off behind transaction-mode poolers
    /// (PgBouncer `pool_mode = transaction`).
    pub prepared_statements: bool,
    /// How long a `Route::ReadAfter(position)` read waits for a replica to
    /// replay `position` before it goes to the primary; zero: no wait.
    #[serde(with = "humantime_serde")]
    pub read_after_wait: Duration,
    /// Shared (pipelined) connections per node for autocommit statements,
    /// taken from the node's pool; absent (`auto` in a file or variable,
    /// shown so): a quarter of `pool.max_size`,
    /// between 1 and 4 (none below 3 connections). `0` gives every statement
    /// a pooled connection of its own: a pool's tail latency under load, at
    /// about half the throughput of pipelining (docs/benchmarks.md). Must be
    /// below `pool.max_size`.
    pub shared_connections: Option<u32>,
}

impl Default for QuerySettings {
    fn default() -> Self {
        QuerySettings {
            statement_timeout: Some(Duration::from_secs(30)),
            slow_query_threshold: Duration::from_secs(1),
            application_name: "pgstack".to_owned(),
            log_parameters: false,
            prepared_statements: true,
            read_after_wait: Duration::from_millis(100),
            shared_connections: None,
        }
    }
}

/// Jitter applied to each backoff delay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// The exact exponential delay.
    None,
    /// A random delay between zero and the exponential delay.
    #[default]
    Full,
    /// Half the exponential delay plus a random amount up to the other half.
    Equal,
    /// A random delay between the initial backoff and three times the previous delay.
    Decorrelated,
}

/// Retry policy for transient errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts in all, the first included; 1 turns retries off.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of any delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Growth of the delay per attempt.
    pub multiplier: f64,
    /// Jitter applied to each delay.
    pub jitter: Jitter,
    /// No attempt starts after this long from the first; none for no limit.
    #[serde(with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// Retries allowed as a fraction of first attempts, across all calls (0..=1).
    pub budget_ratio: f64,
    /// Retries per second always allowed, whatever the ratio.
    pub budget_min_per_second: u32,
    /// Period over which the budget counts calls.
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: Jitter::Full,
            deadline: Some(Duration::from_secs(30)),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

/// How the circuit breaker's sliding window counts calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlidingWindow {
    /// The last `window_size` calls.
    #[default]
    Count,
    /// The calls of the last `window_duration`.
    Time,
}

/// Per-node circuit breaker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    /// Failed calls as a fraction of the window that opens the breaker (0..=1).
    pub failure_rate_threshold: f64,
    /// Whether slow calls are counted at all. Off, a breaker with a
    /// count-based window reads no clock while closed (two clock reads
    /// fewer per call).
    pub slow_call_detection: bool,
    /// Slow calls as a fraction of the window that opens the breaker (0..=1).
    pub slow_call_rate_threshold: f64,
    /// A call slower than this counts as slow.
    #[serde(with = "humantime_serde")]
    pub slow_call_duration: Duration,
    /// Calls the window must hold before any rate is judged.
    pub minimum_calls: u32,
    /// Count-based or time-based window.
    pub sliding_window: SlidingWindow,
    /// Calls in a count-based window.
    pub window_size: u32,
    /// Length of a time-based window.
    #[serde(with = "humantime_serde")]
    pub window_duration: Duration,
    /// Time the breaker stays open before letting probes through.
    #[serde(with = "humantime_serde")]
    pub open_duration: Duration,
    /// Growth of the open duration on each consecutive trip (1 keeps it fixed).
    pub open_duration_multiplier: f64,
    /// Upper bound of a grown open duration.
    #[serde(with = "humantime_serde")]
    pub max_open_duration: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerSettings {
    fn default() -> Self {
        CircuitBreakerSettings {
            failure_rate_threshold: 0.5,
            slow_call_detection: true,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: Duration::from_secs(10),
            minimum_calls: 10,
            sliding_window: SlidingWindow::Count,
            window_size: 50,
            window_duration: Duration::from_secs(30),
            open_duration: Duration::from_secs(5),
            open_duration_multiplier: 2.0,
            max_open_duration: Duration::from_secs(60),
            half_open_probes: 3,
        }
    }
}

/// Health probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthSettings {
    /// Time between probes of each node.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A probe that takes longer fails.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Replicas lagging more than this get no reads.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// Consecutive failed probes before a replica is ejected from routing.
    pub eject_after: u32,
    /// Consecutive good probes before an ejected replica is restored.
    pub restore_after: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            interval: Profile::of(Environment::Development).health_interval,
            probe_timeout: Duration::from_secs(2),
            max_replica_lag: Duration::from_secs(10),
            eject_after: 3,
            restore_after: 2,
        }
    }
}

/// Schema migrations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MigrationSettings {
    /// Folder of `NNNN_name.up.sql` / `.down.sql` files.
    pub dir: PathBuf,
    /// Apply pending migrations when the service starts.
    pub auto_migrate: bool,
    /// Longest wait for the migration lock held by another instance.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Longest wait of a migration's statement for a table lock (PostgreSQL's
    /// `lock_timeout` inside each migration). A migration that waits longer
    /// is rolled back and retried, so it never sits in the lock queue
    /// blocking the application's reads and writes for longer than this.
    #[serde(with = "humantime_serde")]
    pub lock_wait: Duration,
    /// How often a migration that gave up waiting for a lock is retried
    /// (with exponential backoff and jitter) before the run fails; 0 tries
    /// once. The default (4, with the default `lock_wait`) gives up after
    /// about 40 s, within the `lock_timeout` other migrators wait for the
    /// migration lock meanwhile.
    pub lock_retries: u32,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            dir: PathBuf::from("migrations"),
            auto_migrate: Profile::of(Environment::Development).auto_migrate,
            lock_timeout: Duration::from_secs(60),
            lock_wait: Duration::from_secs(5),
            lock_retries: 4,
        }
    }
}

/// Service start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StartupSettings {
    /// How long start-up waits for an unreachable database, retrying with
    /// backoff, before it gives up; none to fail fast (the default).
    #[serde(with = "humantime_serde")]
    pub wait_for_database: Option<Duration>,
}

/// What spans and metrics carry, beside the `pgstack_` names:
/// OpenTelemetry's stable database conventions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Record each statement's SQL as the span attribute `db.query.text`
    /// (parameter values never). Per profile: on, except in production (a
    /// statement's text may still hold literals someone typed in).
    pub query_text: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            query_text: Profile::of(Environment::Development).query_text,
        }
    }
}

/// Switches for optional behaviour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeatureSettings {
    /// Route reads to replicas.
    pub read_replicas: bool,
    /// Guard each node with a circuit breaker.
    pub circuit_breaker: bool,
    /// Run the health monitor.
    pub health_monitoring: bool,
    /// Log and count slow queries.
    pub slow_query_log: bool,
}

impl Default for FeatureSettings {
    fn default() -> Self {
        FeatureSettings {
            read_replicas: true,
            circuit_breaker: true,
            health_monitoring: true,
            slow_query_log: true,
        }
    }
}
