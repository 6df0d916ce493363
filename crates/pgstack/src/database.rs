//! `Database`, the one handle a service keeps, and its builder.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgstack_config::{ConfigLoader, DatabaseConfig, Environment};
use pgstack_connection::tokio_postgres::Row;
use pgstack_connection::tokio_postgres::types::ToSql;
use pgstack_connection::{
    Bound, Cluster, Connection, Error, Op, Queryable, Route, Routed, Statement, Transaction,
    TransactionOptions, WalPosition,
};
use pgstack_orchestrator::{
    Health, LifecycleState, Metrics, Orchestrator, ShutdownReport, StartError, StartEvent,
    StartOptions, Status,
};

/// Connects with the configuration from the environment and `pgstack.toml`
/// (see `pgstack_config::ConfigLoader`), failing at once if the database is
/// unreachable. Same as `Database::builder().connect()`.
///
/// # Errors
/// [`StartError`]: the configuration (every problem listed), an unreachable
/// database, a failed migration.
pub async fn connect() -> Result<Database, StartError> {
    Database::builder().connect().await
}

/// The one handle a service keeps: queries, transactions, status, metrics,
/// health and shutdown. Cheap to clone (clones share everything), `Send`
/// and `Sync`.
///
/// Every call names its operation (`"fetch-bills"`, or an [`Op`]); it
/// labels logs, spans and metrics. See the [crate docs](crate) for routing
/// and retries.
#[derive(Clone)]
pub struct Database {
    orchestrator: Orchestrator,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("orchestrator", &self.orchestrator)
            .finish()
    }
}

type EventSink = Arc<dyn Fn(&StartEvent) + Send + Sync>;

#[cfg(feature = "health")]
type MonitorSetup = Box<
    dyn FnOnce(pgstack_health::HealthMonitorBuilder) -> pgstack_health::HealthMonitorBuilder + Send,
>;

/// Configures and connects a [`Database`]; from [`Database::builder`].
///
/// Configuration comes from the loader's sources (built-in defaults → the
/// environment's profile → `pgstack.toml` → environment variables → the
/// overrides set here), or entirely from [`DatabaseBuilder::config`].
#[must_use]
pub struct DatabaseBuilder {
    loader: ConfigLoader,
    loader_used: bool,
    config: Option<DatabaseConfig>,
    options: StartOptions,
    on_event: Option<EventSink>,
    #[cfg(feature = "health")]
    monitor_setup: Option<MonitorSetup>,
}

impl fmt::Debug for DatabaseBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseBuilder")
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl DatabaseBuilder {
    /// Sets one configuration key over every other source:
    /// `.set("pool.max_size", 20)`, `.set("query.statement_timeout", "5s")`.
    pub fn set(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.loader = self.loader.set(key, value);
        self.loader_used = true;
        self
    }

    /// Changes the loaded configuration in code, after every other source
    /// and before validation.
    pub fn with(mut self, edit: impl FnOnce(&mut DatabaseConfig) + Send + 'static) -> Self {
        self.loader = self.loader.with(edit);
        self.loader_used = true;
        self
    }

    /// Reads this file instead of `pgstack.toml` (it must exist).
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.loader = self.loader.file(path);
        self.loader_used = true;
        self
    }

    /// Chooses the environment over `APP_ENV` / `PGSTACK_ENV`.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.loader = self.loader.environment(environment);
        self.loader_used = true;
        self
    }

    /// Takes environment variables from `vars` instead of the process
    /// environment (for tests: changing the process environment races with
    /// other threads).
    pub fn env_source<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.loader = self.loader.env_source(vars);
        self.loader_used = true;
        self
    }

    /// Uses `config` as it is: no file or environment is read. Cannot be
    /// combined with the loader's settings (`set`, `with`, `file`,
    /// `environment`, `env_source`).
    pub fn config(mut self, config: DatabaseConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Waits up to `wait` for the database to accept connections (default:
    /// fail at once).
    pub fn wait_for_database(mut self, wait: Duration) -> Self {
        self.options.wait = Some(wait);
        self
    }

    /// Replaces the start options.
    pub fn options(mut self, options: StartOptions) -> Self {
        self.options = options;
        self
    }

    /// Calls `f` with every step of the start (they are logged as well).
    pub fn on_event(mut self, f: impl Fn(&StartEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Adjusts the health monitor before it starts (alert rules, sinks,
    /// thresholds); used when `features.health_monitoring` is on.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), pgstack::StartError> {
    /// use pgstack::health::{AlertRule, ChannelSink, Severity};
    /// let (alerts, _received) = ChannelSink::new(64);
    /// let db = pgstack::Database::builder()
    ///     .health_monitor(move |monitor| {
    ///         monitor.sink(alerts).rule(
    ///             AlertRule::cluster("not-healthy", Severity::Low, |report| {
    ///                 (!report.is_healthy()).then(|| report.status.to_string())
    ///             })
    ///             .message("the database is not healthy"),
    ///         )
    ///     })
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "health")]
    pub fn health_monitor(
        mut self,
        setup: impl FnOnce(pgstack_health::HealthMonitorBuilder) -> pgstack_health::HealthMonitorBuilder
        + Send
        + 'static,
    ) -> Self {
        self.monitor_setup = Some(Box::new(setup));
        self
    }

    /// Loads and validates the configuration, connects (or waits), warms
    /// the pools, verifies roles, applies migrations when
    /// `migrations.auto_migrate` is on, and hands back the handle.
    ///
    /// # Errors
    /// [`StartError`]: [`StartError::Config`] lists every configuration
    /// problem; [`StartError::Unreachable`], [`StartError::WaitTimedOut`];
    /// a failed migration; [`StartError::Options`] when `config` is combined
    /// with loader settings.
    pub async fn connect(self) -> Result<Database, StartError> {
        let config = match self.config {
            Some(_) if self.loader_used => {
                return Err(StartError::Options(
                    "`config(..)` replaces every configuration source; it cannot be combined \
                     with `set`, `with`, `file`, `environment` or `env_source` (edit the \
                     DatabaseConfig instead)"
                        .to_owned(),
                ));
            }
            Some(config) => config,
            None => self.loader.load()?,
        };
        let mut builder = Orchestrator::builder(config).options(self.options);
        if let Some(sink) = self.on_event {
            builder = builder.on_event(move |event| sink(event));
        }
        #[cfg(feature = "health")]
        if let Some(setup) = self.monitor_setup {
            builder = builder.health_monitor(setup);
        }
        let orchestrator = builder.start().await?;
        Ok(Database { orchestrator })
    }
}

impl Database {
    /// A builder: configuration overrides in code, a wait for the database.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), pgstack::StartError> {
    /// let db = pgstack::Database::builder()
    ///     .set("pool.max_size", 20)
    ///     .wait_for_database(std::time::Duration::from_secs(30))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> DatabaseBuilder {
        DatabaseBuilder {
            loader: ConfigLoader::new(),
            loader_used: false,
            config: None,
            options: StartOptions::default(),
            on_event: None,
            #[cfg(feature = "health")]
            monitor_setup: None,
        }
    }

    /// Connects with the environment and `pgstack.toml`; see [`connect`].
    ///
    /// # Errors
    /// As [`DatabaseBuilder::connect`].
    pub async fn connect() -> Result<Database, StartError> {
        Database::builder().connect().await
    }

    /// A handle over an orchestrator started by hand.
    pub fn from_orchestrator(orchestrator: Orchestrator) -> Database {
        Database { orchestrator }
    }

    // ----- queries --------------------------------------------------------

    /// The handle for statements of operation `op` on the node `route` picks:
    /// [`Route::Read`] goes to a replica within the lag limit (or the
    /// primary), [`Route::Write`] to the primary. It implements
    /// [`Queryable`](crate::Queryable) (`query`, `query_one`, `query_opt`,
    /// `execute`, `query_as`, `query_one_as`, `query_opt_as`,
    /// `query_stream`), like a [`Transaction`] and a [`Connection`]. Reads are
    /// retried on transient errors; writes only when nothing was sent or the
    /// [`Op`] is idempotent.
    ///
    /// ```no_run
    /// # async fn run(db: pgstack::Database) -> Result<(), pgstack::Error> {
    /// use pgstack::prelude::*;
    ///
    /// #[derive(FromRow)]
    /// struct Bill {
    ///     id: i64,
    ///     note: Option<String>,
    /// }
    ///
    /// let bills: Vec<Bill> = db
    ///     .on("open-bills", Route::Read)
    ///     .query_as("SELECT id, note FROM bills WHERE NOT paid", &[])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on(&self, op: impl Into<Op>, route: Route) -> Routed<'_> {
        self.cluster().on(op, route)
    }

    /// The handle for a declared [`Statement`] (name, route, idempotency
    /// and text said once, as a constant).
    ///
    /// ```no_run
    /// # async fn run(db: pgstack::Database) -> Result<(), pgstack::Error> {
    /// use pgstack::prelude::*;
    ///
    /// const OPEN_BILLS: Statement =
    ///     Statement::read("open-bills", "SELECT id FROM bills WHERE NOT paid");
    ///
    /// let open = db.run(&OPEN_BILLS).query(&[]).await?;
    /// # Ok(()) }
    /// ```
    pub fn run(&self, statement: &Statement) -> Bound<'_> {
        self.cluster().run(statement)
    }

    /// The per-call form of `db.on(op, route).query(sql, params)`, for
    /// ad-hoc statements; older code uses it (as do `query_one`,
    /// `query_opt` and `execute` below).
    ///
    /// # Errors
    /// Any [`Error`]; [`Error::CommitOutcomeUnknown`] when a write's
    /// connection broke in flight; [`Error::ShuttingDown`] after
    /// [`Database::shutdown`].
    pub async fn query(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.on(op, route).query(sql, params).await
    }

    /// `db.on(op, route).query_one(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`Database::query`], and [`Error::UnexpectedRows`].
    pub async fn query_one(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.on(op, route).query_one(sql, params).await
    }

    /// `db.on(op, route).query_opt(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`Database::query`], and [`Error::UnexpectedRows`].
    pub async fn query_opt(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.on(op, route).query_opt(sql, params).await
    }

    /// `db.on(op, route).execute(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`Database::query`].
    pub async fn execute(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.on(op, route).execute(sql, params).await
    }

    /// Runs a write on the primary and returns, with the rows affected, a
    /// WAL position to read your own write with [`Route::ReadAfter`].
    ///
    /// # Errors
    /// As [`Database::execute`].
    pub async fn execute_tracked(
        &self,
        op: impl Into<Op>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(u64, WalPosition), Error> {
        self.cluster().execute_tracked(op, sql, params).await
    }

    /// The primary's current WAL position (read your writes after a
    /// transaction).
    ///
    /// # Errors
    /// As [`Database::query`].
    pub async fn wal_position(&self, op: impl Into<Op>) -> Result<WalPosition, Error> {
        self.cluster().wal_position(op).await
    }

    /// Runs `work` with a connection of its own on a replica (or the
    /// primary); retried, whole, on transient errors.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn read<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.cluster().read(op, work).await
    }

    /// Runs `work` with a connection of its own on the primary; retried only
    /// when nothing was sent, or when the [`Op`] is idempotent.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn write<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.cluster().write(op, work).await
    }

    /// Runs `work` in a transaction on the primary: committed on `Ok`, rolled
    /// back on `Err`, panic or drop; retried as a whole on `40001`/`40P01`.
    /// A connection lost during `COMMIT` gives [`Error::CommitOutcomeUnknown`].
    ///
    /// The closure may return the service's own error type `E` (anything
    /// with `From<pgstack::Error>`), so `?` works on both: an `Err` rolls
    /// back and comes back as it is; the transaction is still repeated when
    /// a statement in it failed with a serialization failure or a deadlock
    /// (the [`Transaction`] recorded it). Name the error type once, on the
    /// closure (`async |tx| -> Result<_, AppError>`) or on `Ok::<_, Error>`.
    /// In `tokio::spawn` or an axum handler, write `async move |tx|` and
    /// move owned values in.
    ///
    /// ```no_run
    /// # use pgstack::prelude::*;
    /// #[derive(Debug)]
    /// enum AppError {
    ///     Db(pgstack::Error),
    ///     InsufficientFunds,
    /// }
    /// impl From<pgstack::Error> for AppError {
    ///     fn from(e: pgstack::Error) -> Self { AppError::Db(e) }
    /// }
    ///
    /// # async fn run(db: Database) -> Result<(), AppError> {
    /// #[derive(FromRow)]
    /// struct Account {
    ///     balance: i64,
    /// }
    ///
    /// db.transaction("pay-bill", async |tx| -> Result<(), AppError> {
    ///     let account: Account = tx
    ///         .query_one_as("SELECT balance FROM accounts WHERE id = $1 FOR UPDATE", &[&1_i64])
    ///         .await?;
    ///     if account.balance < 10 {
    ///         return Err(AppError::InsufficientFunds); // rolled back, returned as it is
    ///     }
    ///     tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = $1", &[&1_i64])
    ///         .await?;
    ///     Ok(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The closure's own error, or the last attempt's [`Error`] converted
    /// into `E`.
    pub async fn transaction<T, E, F>(&self, op: impl Into<Op>, work: F) -> Result<T, E>
    where
        E: From<Error> + Send + 'static,
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    {
        self.cluster().transaction(op, work).await
    }

    /// [`Database::transaction`] with an isolation level, read-only (routed
    /// as a read) or deferrable.
    ///
    /// # Errors
    /// As [`Database::transaction`].
    pub async fn transaction_with<T, E, F>(
        &self,
        op: impl Into<Op>,
        options: TransactionOptions,
        work: F,
    ) -> Result<T, E>
    where
        E: From<Error> + Send + 'static,
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    {
        self.cluster().transaction_with(op, options, work).await
    }

    /// A connection of its own on the node `route` picks (COPY, cursors,
    /// session settings).
    ///
    /// # Errors
    /// [`Error::PoolTimeout`], [`Error::CircuitOpen`], [`Error::ShuttingDown`].
    pub async fn connection(&self, op: impl Into<Op>, route: Route) -> Result<Connection, Error> {
        self.cluster().connection(op, route).await
    }

    // ----- the stack --------------------------------------------------

    /// The cluster underneath (nodes, routing inputs, re-discovery).
    pub fn cluster(&self) -> &Cluster {
        self.orchestrator.cluster()
    }

    /// The orchestrator underneath.
    pub fn orchestrator(&self) -> &Orchestrator {
        &self.orchestrator
    }

    /// The configuration in use (passwords redacted in `Debug`).
    pub fn config(&self) -> &DatabaseConfig {
        self.orchestrator.config()
    }

    /// The lifecycle state, without checking any node.
    pub fn state(&self) -> LifecycleState {
        self.orchestrator.state()
    }

    /// Lifecycle state, each node's health (checked now), pools, breakers,
    /// migrations; serializable to JSON.
    pub async fn status(&self) -> Status {
        self.orchestrator.status().await
    }

    /// Every figure of the stack in one snapshot.
    pub fn metrics(&self) -> Metrics {
        self.orchestrator.metrics()
    }

    /// The overall health and each node's, for a health endpoint
    /// ([`Health::is_serving`]: healthy or degraded). From the health
    /// monitor's latest report when it runs; else each node is probed now.
    pub async fn health(&self) -> Health {
        self.orchestrator.health().await
    }

    /// The health monitor's latest report in full (reasons, history, alerts,
    /// recommendations), when it runs.
    #[cfg(feature = "health")]
    pub fn health_report(&self) -> Option<Arc<pgstack_health::HealthReport>> {
        self.orchestrator.health_report()
    }

    /// The health monitor, when it runs: `check_now`, `subscribe`.
    #[cfg(feature = "health")]
    pub fn health_monitor(&self) -> Option<&pgstack_health::HealthMonitor> {
        self.orchestrator.health_monitor()
    }

    /// Refuses new calls, lets calls in flight finish until `deadline`,
    /// cancels the rest on the server and closes the pools.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        self.orchestrator.shutdown(deadline).await
    }

    /// Waits for SIGTERM or Ctrl-C, then [`Database::shutdown`]s.
    pub async fn shutdown_on_signal(&self, deadline: Duration) -> ShutdownReport {
        self.orchestrator.shutdown_on_signal(deadline).await
    }
}
