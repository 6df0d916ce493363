//! The migrator: status, up, down, validate, dry-run, baseline.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgstack_config::{
    DatabaseConfig, Environment, MigrationSettings, NodeSettings, PoolSettings, TlsMode,
    TlsSettings,
};
use pgstack_resilience::Backoff;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::error::{Direction, Error, LockFailure, MigrationFailure, Result, db, describe_failure};
use crate::invalid::{self, InvalidIndex};
use crate::lint::{self, LintReport};
use crate::lock;
use crate::lockwait::{self, LockConflict, Watch};
use crate::metadata;
use crate::progress::{Event, Observer};
use crate::scan;
use crate::source::{Migration, Migrations, Script};
use crate::status::{
    AppliedRecord, MigrationState, Plan, PlannedStep, Report, Status, StatusEntry, Step, Validation,
};

/// The bookkeeping table, shared with sqlx and sqlx-cli.
pub const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// sqlx's definition of the bookkeeping table, verbatim.
const CREATE_TABLE: &str = r#"
CREATE TABLE IF NOT EXISTS _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
    success BOOLEAN NOT NULL,
    checksum BYTEA NOT NULL,
    execution_time BIGINT NOT NULL
);
"#;

const INSERT_APPLIED: &str = "INSERT INTO _sqlx_migrations \
     (version, description, success, checksum, execution_time) VALUES ($1, $2, $3, $4, $5)";

/// How far `up` goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpTarget {
    /// Every pending migration.
    #[default]
    Latest,
    /// Pending migrations up to and including this version.
    Version(i64),
}

/// How far `down` goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownTarget {
    /// Revert the last N applied migrations.
    Steps(usize),
    /// Revert every applied migration above this version (`0`: all of them).
    Version(i64),
}

/// What a dry run plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// `up`.
    Up(UpTarget),
    /// `down`.
    Down(DownTarget),
}

/// Runs a set of [`Migrations`] against one database.
///
/// Every operation opens its own connection (one pinned session) and closes
/// it when done; operations that change anything take the migration lock on
/// that session first. A `Migrator` is cheap to clone and may be shared.
#[derive(Clone)]
pub struct Migrator {
    migrations: Migrations,
    connect: PgConnectOptions,
    /// The node, to explain a failed connection (its password is never
    /// shown).
    node: NodeSettings,
    connect_timeout: Duration,
    target: Arc<str>,
    lock_timeout: Duration,
    lock_wait: Duration,
    lock_retries: u32,
    lock_backoff: Backoff,
    observer: Observer,
    ignore_missing: bool,
    environment: Option<Environment>,
}

/// What [`Migrator::repair_failed`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Repair {
    /// Whether a failed mark was removed (false: the version had none, and
    /// nothing was done).
    pub removed: bool,
    /// The INVALID indexes the migration had built, now dropped.
    pub dropped_indexes: Vec<InvalidIndex>,
}

impl fmt::Debug for Migrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // PgConnectOptions' Debug would show the password; it is left out.
        f.debug_struct("Migrator")
            .field("target", &self.target)
            .field("migrations", &self.migrations.len())
            .field("lock_timeout", &self.lock_timeout)
            .field("lock_wait", &self.lock_wait)
            .field("lock_retries", &self.lock_retries)
            .field("observer", &self.observer)
            .field("ignore_missing", &self.ignore_missing)
            .field("environment", &self.environment)
            .finish()
    }
}

impl Migrator {
    /// A migrator for `migrations` on the database `node` describes, with
    /// the defaults of [`MigrationSettings`]: a 60 s lock timeout, and each
    /// migration waiting at most 5 s for a table lock, 4 retries.
    pub fn new(migrations: Migrations, node: &NodeSettings) -> Self {
        let defaults = MigrationSettings::default();
        Migrator {
            migrations,
            connect: connect_options(node, "pgstack-migrations", PgSslMode::Prefer),
            node: node.clone(),
            connect_timeout: PoolSettings::default().connect_timeout,
            target: Arc::from(node.redacted_url()),
            lock_timeout: defaults.lock_timeout,
            lock_wait: defaults.lock_wait,
            lock_retries: defaults.lock_retries,
            lock_backoff: lockwait::default_backoff(),
            observer: Observer::default(),
            ignore_missing: false,
            environment: None,
        }
    }

    /// A migrator as the configuration describes it: the folder
    /// `migrations.dir`, the primary node, `migrations.lock_timeout`,
    /// `migrations.lock_wait` and `migrations.lock_retries`, and the
    /// environment recorded in `pgstack_metadata` after every `up`.
    ///
    /// TLS follows `tls.mode` and `tls.root_cert` (rustls; the system's
    /// roots when no root certificate is given).
    ///
    /// # Errors
    /// Any error of [`Migrations::from_dir`].
    pub fn from_config(config: &DatabaseConfig) -> Result<Self> {
        let migrations = Migrations::from_dir(&config.migrations.dir)?;
        let app = format!("{} migrations", config.query.application_name);
        let mut migrator = Migrator::new(migrations, &config.primary)
            .with_settings(&config.migrations)
            .with_environment(config.environment);
        migrator.connect = connect_options(&config.primary, &app, PgSslMode::Prefer);
        migrator.connect_timeout = config.pool.connect_timeout;
        Ok(migrator.tls(&config.tls))
    }

    /// How long TCP, TLS and login may take together (default: the pool's
    /// `connect_timeout`, 5 s): past it the migrator fails with
    /// [`Error::Connect`] explaining that the server did not answer (a
    /// firewall, or a port where something else than PostgreSQL listens).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connect with TLS as `tls` says (default: `prefer`, without
    /// verification). Verification uses rustls with `root_cert`, or the
    /// system's roots when it is unset.
    pub fn tls(mut self, tls: &TlsSettings) -> Self {
        self.connect = self.connect.ssl_mode(ssl_mode(tls.mode));
        if let Some(root) = &tls.root_cert {
            self.connect = self.connect.ssl_root_cert(root);
        }
        self
    }

    /// The longest wait for the migration lock held by another session.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The longest wait of a migration's statement for a table lock
    /// (default 5 s): PostgreSQL's `lock_timeout`, set with `SET LOCAL`
    /// inside each migration's transaction (with `SET`, and `RESET` after,
    /// for a `-- no-transaction` file). A migration that waits longer is
    /// rolled back and retried (see [`Migrator::lock_retries`]), so it never
    /// holds the table's other queries in the lock queue for longer than
    /// this. Zero sets no `lock_timeout` (wait as long as it takes) and so
    /// never retries.
    ///
    /// A `-- no-transaction` file of `CONCURRENTLY` index statements runs
    /// without it: they wait for older transactions by design (a timeout
    /// would leave an INVALID index), and no reader or writer queues behind
    /// their lock.
    pub fn lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// How often a migration that gave up waiting for a lock is tried
    /// again before the run fails with [`Error::LockNotAvailable`]
    /// (default 4; 0 tries once). A `-- no-transaction` file is retried
    /// only when PostgreSQL runs it all-or-nothing (no transaction control,
    /// nothing that commits on its own), so a retry never repeats half of
    /// it.
    pub fn lock_retries(mut self, retries: u32) -> Self {
        self.lock_retries = retries;
        self
    }

    /// The backoff between those attempts (default: 1 s doubling up to
    /// 30 s, with equal jitter).
    pub fn lock_retry_backoff(mut self, backoff: Backoff) -> Self {
        self.lock_backoff = backoff;
        self
    }

    /// `lock_timeout`, `lock_wait` and `lock_retries` from the
    /// configuration's `migrations` section (the folder is the caller's).
    pub fn with_settings(self, settings: &MigrationSettings) -> Self {
        self.lock_timeout(settings.lock_timeout)
            .lock_wait(settings.lock_wait)
            .lock_retries(settings.lock_retries)
    }

    /// The `application_name` of the migrator's session (what other
    /// migrators report as the lock holder).
    pub fn application_name(mut self, name: &str) -> Self {
        self.connect = self.connect.application_name(name);
        self
    }

    /// Calls `f` with every [`Event`] (lock waits, each migration, the end).
    pub fn on_progress(mut self, f: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.observer.progress = Some(Arc::new(f));
        self
    }

    /// Calls `f` with the changed versions after a run that applied or
    /// reverted anything, once the lock is released: the place to clear
    /// pooled statement caches ("cached plan must not change result type").
    pub fn after_schema_change(mut self, f: impl Fn(&[i64]) + Send + Sync + 'static) -> Self {
        self.observer.schema_changed = Some(Arc::new(f));
        self
    }

    /// Tolerate applied migrations whose files are gone (default: refuse).
    pub fn ignore_missing(mut self, ignore: bool) -> Self {
        self.ignore_missing = ignore;
        self
    }

    /// Record `environment` in `pgstack_metadata` after every `up`.
    pub fn with_environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// The migrations this migrator runs.
    pub fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    async fn connect(&self) -> Result<PgConnection> {
        let connect = PgConnection::connect_with(&self.connect);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(driver)) => Err(Error::Connect {
                target: self.target.to_string(),
                explanation: Box::new(crate::error::explain_connect(&self.node, &driver)),
                driver: Some(Box::new(driver)),
            }),
            Err(_) => Err(Error::Connect {
                target: self.target.to_string(),
                explanation: Box::new(pgstack_config::explain_connect_failure(
                    &self.node,
                    pgstack_config::ConnectFailure::TimedOut {
                        after: self.connect_timeout,
                    },
                )),
                driver: None,
            }),
        }
    }

    async fn locked(&self) -> Result<Session> {
        let mut conn = self.connect().await?;
        let (database, pid): (String, i32) =
            sqlx::query_as("SELECT current_database(), pg_backend_pid()")
                .fetch_one(&mut conn)
                .await
                .map_err(db("reading the database name"))?;
        let key = lock::lock_id(&database);
        match lock::acquire(&mut conn, key, self.lock_timeout, &self.observer).await {
            Ok(waited) => Ok(Session {
                conn,
                key,
                pid,
                waited,
            }),
            Err(e) => {
                let _ = conn.close().await;
                Err(e)
            }
        }
    }

    /// Every migration in the folder or the database and where it stands.
    /// Takes no lock and changes nothing.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Database`].
    pub async fn status(&self) -> Result<Status> {
        let mut conn = self.connect().await?;
        let result = async {
            let (table_exists, applied) = read_applied(&mut conn).await?;
            let invalid = invalid::list(&mut conn).await?;
            Ok::<_, Error>((table_exists, applied, invalid))
        }
        .await;
        let _ = conn.close().await;
        let (table_exists, applied, invalid) = result?;
        let mut status = compute_status(&self.migrations, &applied, table_exists);
        status.invalid_indexes = self.attribute(invalid, &applied);
        Ok(status)
    }

    /// Names the migration that builds each INVALID index, a failed one
    /// first.
    fn attribute(
        &self,
        mut indexes: Vec<InvalidIndex>,
        applied: &BTreeMap<i64, AppliedRecord>,
    ) -> Vec<InvalidIndex> {
        for index in &mut indexes {
            let builders: Vec<&Migration> = self
                .migrations
                .iter()
                .filter(|m| invalid::built_by(index, m))
                .collect();
            let failed = builders
                .iter()
                .find(|m| applied.get(&m.version()).is_some_and(|r| !r.success));
            index.version = failed.or(builders.first()).map(|m| m.version());
        }
        indexes
    }

    /// Compares applied checksums with the files, and lints the pending
    /// migrations. The report lists each changed, missing or failed
    /// migration, and the lint findings (warnings: they do not make it
    /// fail); [`Validation::into_result`] turns problems into an error for
    /// a non-zero exit.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Database`].
    pub async fn validate(&self) -> Result<Validation> {
        let status = self.status().await?;
        let mut validation = status.validation();
        let pending = status.in_state(MigrationState::Pending).map(|e| e.version);
        let pending: Vec<&Migration> = pending.filter_map(|v| self.migrations.get(v)).collect();
        validation.findings = lint::lint_migrations(pending).findings;
        Ok(validation)
    }

    /// Lints the pending migrations (all of them on a database where none
    /// is applied); [`Migrations::lint`] lints every file without a
    /// database. Reads `_sqlx_migrations` only.
    ///
    /// # Errors
    /// [`Error::Connect`], [`Error::Database`].
    pub async fn lint(&self) -> Result<LintReport> {
        let mut conn = self.connect().await?;
        let result = read_applied(&mut conn).await;
        let _ = conn.close().await;
        let (_, applied) = result?;
        Ok(lint::lint_migrations(
            self.migrations
                .iter()
                .filter(|m| !applied.contains_key(&m.version())),
        ))
    }

    /// The plan and the SQL of `up` or `down`, with nothing applied (a dry
    /// run). Fails as the real run would (changed files, dirty database,
    /// missing down files).
    ///
    /// # Errors
    /// As [`Migrator::up`] or [`Migrator::down`], lock errors excepted.
    pub async fn plan(&self, operation: Operation) -> Result<Plan> {
        let mut conn = self.connect().await?;
        let result = read_applied(&mut conn).await;
        let _ = conn.close().await;
        let (_, applied) = result?;
        let (direction, steps) = match operation {
            Operation::Up(target) => (Direction::Up, self.plan_up(&applied, target)?),
            Operation::Down(target) => (Direction::Down, self.plan_down(&applied, target)?),
        };
        let mut findings = Vec::new();
        let steps = steps
            .into_iter()
            .filter_map(|m| {
                let script = match direction {
                    Direction::Up => m.up(),
                    Direction::Down => m.down()?,
                };
                findings.extend(
                    lint::lint_text(
                        script.path(),
                        Some(m.version()),
                        script.sql(),
                        script.no_transaction(),
                    )
                    .findings,
                );
                Some(PlannedStep {
                    version: m.version(),
                    description: m.description().to_owned(),
                    direction,
                    file: script.path().to_owned(),
                    sql: script.sql().to_owned(),
                    no_transaction: script.no_transaction(),
                })
            })
            .collect();
        Ok(Plan { steps, findings })
    }

    /// Applies pending migrations, each with its bookkeeping row in one
    /// transaction (files marked `-- no-transaction` run outside one), under
    /// the migration lock. Each migration waits at most
    /// [`lock_wait`](Migrator::lock_wait) for a table lock and is retried
    /// when it gives up ([`Event::LockNotAvailable`]).
    ///
    /// # Errors
    /// [`Error::ChecksumMismatch`], [`Error::MissingFile`], [`Error::Dirty`]
    /// before anything runs; [`Error::MigrationFailed`] naming the file and
    /// line; [`Error::LockNotAvailable`] when a migration could not take its
    /// locks on any attempt; [`Error::LockTimeout`];
    /// [`Error::UnknownVersion`] for a target not in the folder; connection
    /// and database errors.
    pub async fn up(&self, target: UpTarget) -> Result<Report> {
        let started = Instant::now();
        let mut session = self.locked().await?;
        let mut watch = Watch::new(self.connect.clone(), session.pid, self.lock_wait);
        let mut steps = Vec::new();
        let result = self
            .up_locked(&mut session.conn, &mut watch, target, &mut steps)
            .await;
        let lock_wait = session.waited;
        watch.close().await;
        session.close().await;
        self.finish(result, steps, lock_wait, started)
    }

    async fn up_locked(
        &self,
        conn: &mut PgConnection,
        watch: &mut Watch,
        target: UpTarget,
        steps: &mut Vec<Step>,
    ) -> Result<()> {
        ensure_table(conn).await?;
        let (_, applied) = read_applied(conn).await?;
        let pending = self.plan_up(&applied, target)?;
        if let (Some(first), Some(latest)) = (pending.first(), applied.keys().next_back())
            && first.version() < *latest
        {
            tracing::warn!(
                version = first.version(),
                latest_applied = latest,
                "applying a migration older than the latest applied one (out of order)"
            );
        }
        let total = pending.len();
        for (i, m) in pending.into_iter().enumerate() {
            steps.push(
                self.run_one(conn, watch, m, Direction::Up, i + 1, total)
                    .await?,
            );
        }
        if let Some(env) = self.environment {
            metadata::write_environment(conn, env).await?;
        }
        Ok(())
    }

    /// Reverts applied migrations with their `.down.sql` files, newest first,
    /// under the migration lock, with the same lock wait and retries as
    /// [`Migrator::up`]. Every down file is checked to exist before anything
    /// runs.
    ///
    /// # Errors
    /// As [`Migrator::up`], and [`Error::MissingDown`].
    pub async fn down(&self, target: DownTarget) -> Result<Report> {
        let started = Instant::now();
        let mut session = self.locked().await?;
        let mut watch = Watch::new(self.connect.clone(), session.pid, self.lock_wait);
        let mut steps = Vec::new();
        let result = self
            .down_locked(&mut session.conn, &mut watch, target, &mut steps)
            .await;
        let lock_wait = session.waited;
        watch.close().await;
        session.close().await;
        self.finish(result, steps, lock_wait, started)
    }

    async fn down_locked(
        &self,
        conn: &mut PgConnection,
        watch: &mut Watch,
        target: DownTarget,
        steps: &mut Vec<Step>,
    ) -> Result<()> {
        ensure_table(conn).await?;
        let (_, applied) = read_applied(conn).await?;
        let plan = self.plan_down(&applied, target)?;
        let total = plan.len();
        for (i, m) in plan.into_iter().enumerate() {
            steps.push(
                self.run_one(conn, watch, m, Direction::Down, i + 1, total)
                    .await?,
            );
        }
        Ok(())
    }

    /// Records every migration up to and including `version` as applied
    /// without running it, for adopting a database whose schema already
    /// exists. Versions already applied are left alone.
    ///
    /// # Errors
    /// [`Error::UnknownVersion`] when `version` is not in the folder;
    /// [`Error::Dirty`], [`Error::ChecksumMismatch`], lock, connection and
    /// database errors.
    pub async fn baseline(&self, version: i64) -> Result<Report> {
        if self.migrations.get(version).is_none() {
            return Err(Error::UnknownVersion {
                version,
                hint: "; baseline needs the version of an existing migration file".to_owned(),
            });
        }
        let started = Instant::now();
        let mut session = self.locked().await?;
        let result = self.baseline_locked(&mut session.conn, version).await;
        let lock_wait = session.waited;
        session.close().await;
        let versions = result?;
        tracing::info!(
            up_to = version,
            count = versions.len(),
            "baselined migrations"
        );
        self.observer.emit(&Event::Baselined {
            versions: versions.clone(),
        });
        let elapsed = started.elapsed();
        self.observer.emit(&Event::Done {
            changed: 0,
            elapsed,
        });
        Ok(Report {
            steps: Vec::new(),
            baselined: versions,
            lock_wait,
            elapsed,
        })
    }

    async fn baseline_locked(&self, conn: &mut PgConnection, version: i64) -> Result<Vec<i64>> {
        ensure_table(conn).await?;
        let (_, applied) = read_applied(conn).await?;
        self.check_applied(&applied)?;
        let todo: Vec<&Migration> = self
            .migrations
            .iter()
            .filter(|m| m.version() <= version && !applied.contains_key(&m.version()))
            .collect();
        let mut tx = conn
            .begin()
            .await
            .map_err(db("starting the baseline transaction"))?;
        for m in &todo {
            sqlx::query(INSERT_APPLIED)
                .bind(m.version())
                .bind(m.description())
                .bind(true)
                .bind(m.up().checksum())
                .bind(-1_i64)
                .execute(&mut *tx)
                .await
                .map_err(db("recording baselined migrations"))?;
        }
        tx.commit().await.map_err(db("committing the baseline"))?;
        Ok(todo.iter().map(|m| m.version()).collect())
    }

    /// Removes the "failed" mark a no-transaction migration left in
    /// `_sqlx_migrations`, once the database has been repaired by hand.
    /// Returns whether a mark was removed. [`Migrator::repair_failed`] also
    /// drops the INVALID indexes the migration left.
    ///
    /// # Errors
    /// Lock, connection and database errors.
    pub async fn forget_failed(&self, version: i64) -> Result<bool> {
        let mut session = self.locked().await?;
        let result = async {
            ensure_table(&mut session.conn).await?;
            let done =
                sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1 AND NOT success")
                    .bind(version)
                    .execute(&mut session.conn)
                    .await
                    .map_err(db("removing the failed mark"))?;
            Ok(done.rows_affected() > 0)
        }
        .await;
        session.close().await;
        result
    }

    /// [`Migrator::forget_failed`] after dropping (`DROP INDEX CONCURRENTLY
    /// IF EXISTS`) the INVALID indexes that the failed migration's `CREATE
    /// INDEX CONCURRENTLY` left behind, so that running it again can build
    /// them. Does nothing when `version` is not marked failed.
    ///
    /// # Errors
    /// Lock, connection and database errors; an index that cannot be
    /// dropped leaves the mark in place.
    pub async fn repair_failed(&self, version: i64) -> Result<Repair> {
        let mut session = self.locked().await?;
        let result = async {
            let conn = &mut session.conn;
            ensure_table(conn).await?;
            let marked: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = $1 AND NOT success)",
            )
            .bind(version)
            .fetch_one(&mut *conn)
            .await
            .map_err(db("looking for the failed mark"))?;
            if !marked {
                return Ok(Repair::default());
            }
            let mut dropped = Vec::new();
            if let Some(m) = self.migrations.get(version) {
                for mut index in invalid::list(conn).await? {
                    if invalid::built_by(&index, m) {
                        invalid::drop(conn, &index).await?;
                        index.version = Some(version);
                        dropped.push(index);
                    }
                }
            }
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1 AND NOT success")
                .bind(version)
                .execute(&mut *conn)
                .await
                .map_err(db("removing the failed mark"))?;
            Ok(Repair {
                removed: true,
                dropped_indexes: dropped,
            })
        }
        .await;
        session.close().await;
        result
    }

    /// Writes `environment` to `pgstack_metadata` (creating the table if
    /// needed), as `up` does when [`Migrator::with_environment`] is set.
    ///
    /// # Errors
    /// Connection and database errors.
    pub async fn record_environment(&self, environment: Environment) -> Result<()> {
        let mut conn = self.connect().await?;
        let result = metadata::write_environment(&mut conn, environment).await;
        let _ = conn.close().await;
        result
    }

    /// The environment recorded in `pgstack_metadata`, if any. `db-reset`
    /// refuses to reset a database recorded as production.
    ///
    /// # Errors
    /// Connection and database errors; [`Error::Metadata`] for a value that
    /// is not an environment name.
    pub async fn recorded_environment(&self) -> Result<Option<Environment>> {
        let mut conn = self.connect().await?;
        let result = metadata::read_environment(&mut conn).await;
        let _ = conn.close().await;
        result
    }

    /// Ends a run: the schema-change hook sees every migration that ran,
    /// even when a later one failed, since the schema changed all the same.
    fn finish(
        &self,
        result: Result<()>,
        steps: Vec<Step>,
        lock_wait: Duration,
        started: Instant,
    ) -> Result<Report> {
        let elapsed = started.elapsed();
        let versions: Vec<i64> = steps.iter().map(|s| s.version).collect();
        if !versions.is_empty() {
            tracing::info!(count = versions.len(), elapsed = ?elapsed, "schema changed");
        }
        self.observer.schema_changed(&versions);
        result?;
        self.observer.emit(&Event::Done {
            changed: steps.len(),
            elapsed,
        });
        Ok(Report {
            steps,
            baselined: Vec::new(),
            lock_wait,
            elapsed,
        })
    }

    /// Refuses a database whose bookkeeping disagrees with the folder.
    fn check_applied(&self, applied: &BTreeMap<i64, AppliedRecord>) -> Result<()> {
        if let Some(dirty) = applied.values().find(|a| !a.success) {
            return Err(Error::Dirty {
                version: dirty.version,
                description: dirty.description.clone(),
            });
        }
        for record in applied.values() {
            match self.migrations.get(record.version) {
                None if self.ignore_missing => {}
                None => {
                    return Err(Error::MissingFile {
                        version: record.version,
                        description: record.description.clone(),
                    });
                }
                Some(m) if !m.up().checksums.accepts(&record.checksum) => {
                    return Err(Error::ChecksumMismatch {
                        version: record.version,
                        file: m.up().path().to_owned(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn plan_up(
        &self,
        applied: &BTreeMap<i64, AppliedRecord>,
        target: UpTarget,
    ) -> Result<Vec<&Migration>> {
        self.check_applied(applied)?;
        let limit = match target {
            UpTarget::Latest => i64::MAX,
            UpTarget::Version(v) => {
                if self.migrations.get(v).is_none() {
                    return Err(Error::UnknownVersion {
                        version: v,
                        hint: String::new(),
                    });
                }
                v
            }
        };
        Ok(self
            .migrations
            .iter()
            .filter(|m| m.version() <= limit && !applied.contains_key(&m.version()))
            .collect())
    }

    fn plan_down(
        &self,
        applied: &BTreeMap<i64, AppliedRecord>,
        target: DownTarget,
    ) -> Result<Vec<&Migration>> {
        self.check_applied(applied)?;
        let newest_first = applied.keys().rev().copied();
        let versions: Vec<i64> = match target {
            DownTarget::Steps(n) => newest_first.take(n).collect(),
            DownTarget::Version(v) => {
                if v != 0 && self.migrations.get(v).is_none() && !applied.contains_key(&v) {
                    return Err(Error::UnknownVersion {
                        version: v,
                        hint: "; give an existing version, or 0 to revert everything".to_owned(),
                    });
                }
                newest_first.filter(|&a| a > v).collect()
            }
        };
        let mut plan = Vec::with_capacity(versions.len());
        for version in versions {
            let Some(m) = self.migrations.get(version) else {
                let description = applied
                    .get(&version)
                    .map(|a| a.description.clone())
                    .unwrap_or_default();
                return Err(Error::MissingFile {
                    version,
                    description,
                });
            };
            if m.down().is_none() {
                return Err(Error::MissingDown {
                    version,
                    up_file: m.up().path().to_owned(),
                    expected: m.expected_down_path(),
                });
            }
            plan.push(m);
        }
        Ok(plan)
    }

    async fn run_one(
        &self,
        conn: &mut PgConnection,
        watch: &mut Watch,
        m: &Migration,
        direction: Direction,
        index: usize,
        total: usize,
    ) -> Result<Step> {
        let script = match direction {
            Direction::Up => m.up(),
            Direction::Down => m.down().ok_or_else(|| Error::MissingDown {
                version: m.version(),
                up_file: m.up().path().to_owned(),
                expected: m.expected_down_path(),
            })?,
        };
        self.observer.emit(&Event::Applying {
            version: m.version(),
            description: m.description().to_owned(),
            direction,
            index,
            total,
        });
        tracing::debug!(version = m.version(), %direction, file = %script.path().display(), "running migration");
        let start = Instant::now();
        let shape = script.no_transaction().then(|| scan::shape(script.sql()));
        // CONCURRENTLY waits for older transactions by design, queues no
        // reader or writer behind it, and a timeout would leave an INVALID
        // index: no lock_timeout for a file of such statements.
        let lock_ms = match &shape {
            Some(shape) if shape.only_concurrently => None,
            _ => lockwait::timeout_ms(self.lock_wait),
        };
        // A retry must not repeat half of a script: a no-transaction file
        // is retried only when PostgreSQL runs it all-or-nothing.
        let retryable = lock_ms.is_some() && shape.as_ref().is_none_or(|s| s.atomic);
        let attempts = if retryable {
            self.lock_retries.saturating_add(1)
        } else {
            1
        };
        let mut attempt = 1u32;
        let mut previous_delay = Duration::ZERO;
        // The lock wait seen last, on this attempt or an earlier one.
        let mut conflict: Option<LockConflict> = None;
        loop {
            let run = self.attempt(conn, m, script, direction, lock_ms);
            let result = if lock_ms.is_some() {
                let (result, seen) = watch.during(run).await;
                if seen.is_some() {
                    conflict = seen;
                }
                result
            } else {
                run.await
            };
            let source = match result {
                Ok(()) => break,
                Err(Attempt::Other(e)) => return Err(e),
                Err(Attempt::Script(source)) => source,
            };
            if retryable && lockwait::is_lock_not_available(&source) {
                let retry_in =
                    (attempt < attempts).then(|| self.lock_backoff.delay(attempt, previous_delay));
                self.lock_not_available(m, script, attempt, attempts, retry_in, &conflict);
                let Some(delay) = retry_in else {
                    return Err(Error::LockNotAvailable(Box::new(LockFailure {
                        version: m.version(),
                        direction,
                        file: script.path().to_owned(),
                        attempts: attempt,
                        lock_wait: self.lock_wait,
                        conflict: conflict.take(),
                        no_transaction: script.no_transaction(),
                        source,
                    })));
                };
                tokio::time::sleep(delay).await;
                previous_delay = delay;
                attempt += 1;
                continue;
            }
            let dirty = script.no_transaction() && mark_failed(conn, m, direction, &source).await;
            let left = match &shape {
                Some(shape) if dirty && !shape.concurrent_indexes.is_empty() => {
                    invalid_left_by(conn, m).await
                }
                _ => Vec::new(),
            };
            return Err(failure(m, direction, script, source, dirty, left));
        }
        let elapsed = start.elapsed();
        metrics::counter!("pgstack_migrations_applied_total", "direction" => direction.to_string())
            .increment(1);
        metrics::histogram!("pgstack_migration_duration_seconds").record(elapsed.as_secs_f64());
        tracing::info!(version = m.version(), description = m.description(), %direction, elapsed = ?elapsed, attempts = attempt, "migration done");
        self.observer.emit(&Event::Applied {
            version: m.version(),
            direction,
            elapsed,
        });
        Ok(Step {
            version: m.version(),
            description: m.description().to_owned(),
            direction,
            elapsed,
        })
    }

    /// One attempt at a script and its bookkeeping, with `lock_timeout` set
    /// to `lock_ms` (none when `None`).
    async fn attempt(
        &self,
        conn: &mut PgConnection,
        m: &Migration,
        script: &Script,
        direction: Direction,
        lock_ms: Option<u64>,
    ) -> std::result::Result<(), Attempt> {
        let start = Instant::now();
        let sql = sqlx::raw_sql(AssertSqlSafe(script.sql_arc()));
        if script.no_transaction() {
            if let Some(ms) = lock_ms {
                sqlx::raw_sql(AssertSqlSafe(format!("SET lock_timeout = {ms}")))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| Attempt::Other(db("setting lock_timeout")(e)))?;
            }
            let result = sql.execute(&mut *conn).await;
            if lock_ms.is_some()
                && let Err(e) = sqlx::raw_sql("RESET lock_timeout")
                    .execute(&mut *conn)
                    .await
            {
                tracing::warn!(error = %e, "could not reset lock_timeout after a no-transaction migration");
            }
            result.map_err(Attempt::Script)?;
            bookkeep(&mut *conn, m, direction, start.elapsed())
                .await
                .map_err(Attempt::Other)?;
        } else {
            let begun = match lock_ms {
                Some(ms) => {
                    conn.begin_with(AssertSqlSafe(format!(
                        "BEGIN; SET LOCAL lock_timeout = {ms}"
                    )))
                    .await
                }
                None => conn.begin().await,
            };
            let mut tx =
                begun.map_err(|e| Attempt::Other(db("starting a migration transaction")(e)))?;
            if let Err(source) = sql.execute(&mut *tx).await {
                let _ = tx.rollback().await;
                return Err(Attempt::Script(source));
            }
            bookkeep(&mut tx, m, direction, start.elapsed())
                .await
                .map_err(Attempt::Other)?;
            tx.commit()
                .await
                .map_err(|e| Attempt::Other(db("committing a migration")(e)))?;
        }
        Ok(())
    }

    /// Reports an attempt that gave up waiting for a lock.
    fn lock_not_available(
        &self,
        m: &Migration,
        script: &Script,
        attempt: u32,
        attempts: u32,
        retry_in: Option<Duration>,
        conflict: &Option<LockConflict>,
    ) {
        let waited_for = conflict
            .as_ref()
            .map_or_else(|| "an unseen lock".to_owned(), ToString::to_string);
        match retry_in {
            Some(delay) => tracing::warn!(
                version = m.version(), file = %script.path().display(), attempt, attempts,
                retry_in = ?delay, lock_wait = ?self.lock_wait, waited_for = %waited_for,
                "migration gave up waiting for a lock; rolled back, retrying"
            ),
            None => tracing::error!(
                version = m.version(), file = %script.path().display(), attempts,
                lock_wait = ?self.lock_wait, waited_for = %waited_for,
                "migration could not get its locks on any attempt; giving up"
            ),
        }
        metrics::counter!("pgstack_migration_lock_timeouts_total").increment(1);
        self.observer.emit(&Event::LockNotAvailable {
            version: m.version(),
            description: m.description().to_owned(),
            file: script.path().to_owned(),
            attempt,
            attempts,
            lock_wait: self.lock_wait,
            retry_in,
            conflict: conflict.clone(),
        });
    }
}

/// Why an attempt failed: the script itself, or anything else.
enum Attempt {
    Script(sqlx::Error),
    Other(Error),
}

/// The error of a failed script.
fn failure(
    m: &Migration,
    direction: Direction,
    script: &Script,
    source: sqlx::Error,
    dirty: bool,
    invalid_indexes: Vec<String>,
) -> Error {
    let f = describe_failure(script.sql(), &source);
    tracing::error!(
        version = m.version(), %direction, file = %script.path().display(),
        line = ?f.line, code = ?f.code, message = %f.message, dirty,
        invalid_indexes = ?invalid_indexes,
        "migration failed"
    );
    metrics::counter!("pgstack_migrations_failed_total", "direction" => direction.to_string())
        .increment(1);
    Error::MigrationFailed(Box::new(MigrationFailure {
        version: m.version(),
        direction,
        file: script.path().to_owned(),
        line: f.line,
        message: f.message,
        code: f.code,
        no_transaction: script.no_transaction(),
        dirty,
        invalid_indexes,
        source,
    }))
}

/// The INVALID indexes `m`'s concurrent index builds left (best effort:
/// none when they cannot be looked up).
async fn invalid_left_by(conn: &mut PgConnection, m: &Migration) -> Vec<String> {
    match invalid::list(conn).await {
        Ok(list) => list
            .iter()
            .filter(|i| invalid::built_by(i, m))
            .map(InvalidIndex::qualified_name)
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "could not look for INVALID indexes");
            Vec::new()
        }
    }
}

/// The connection that holds the lock.
struct Session {
    conn: PgConnection,
    key: i64,
    /// The server process id of the session.
    pid: i32,
    waited: Duration,
}

impl Session {
    async fn close(mut self) {
        if let Err(e) = lock::release(&mut self.conn, self.key).await {
            tracing::warn!(error = %e, "could not release the migration lock; closing the session releases it");
        }
        if let Err(e) = self.conn.close().await {
            tracing::debug!(error = %e, "closing the migrator's connection failed");
        }
    }
}

fn ssl_mode(mode: TlsMode) -> PgSslMode {
    match mode {
        TlsMode::Disable => PgSslMode::Disable,
        TlsMode::Prefer => PgSslMode::Prefer,
        TlsMode::Require => PgSslMode::Require,
        TlsMode::VerifyCa => PgSslMode::VerifyCa,
        TlsMode::VerifyFull => PgSslMode::VerifyFull,
    }
}

fn connect_options(
    node: &NodeSettings,
    application_name: &str,
    ssl: PgSslMode,
) -> PgConnectOptions {
    let mut options = PgConnectOptions::new_without_pgpass();
    options = if node.host.starts_with('/') {
        options.socket(&node.host)
    } else {
        options.host(&node.host)
    };
    options = options
        .port(node.port)
        .username(&node.user)
        .database(&node.database)
        .application_name(application_name)
        .ssl_mode(ssl);
    if let Some(password) = &node.password {
        options = options.password(password.expose());
    }
    options
}

async fn ensure_table(conn: &mut PgConnection) -> Result<()> {
    sqlx::raw_sql(CREATE_TABLE)
        .execute(&mut *conn)
        .await
        .map_err(db("creating _sqlx_migrations"))?;
    Ok(())
}

type AppliedRow = (i64, String, Option<f64>, bool, Vec<u8>, i64);

/// Whether `_sqlx_migrations` exists, and its rows by version.
async fn read_applied(conn: &mut PgConnection) -> Result<(bool, BTreeMap<i64, AppliedRecord>)> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(db("looking for _sqlx_migrations"))?;
    if !exists {
        return Ok((false, BTreeMap::new()));
    }
    let rows: Vec<AppliedRow> = sqlx::query_as(
        "SELECT version, description, extract(epoch FROM installed_on)::float8, success, \
                checksum, execution_time \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db("reading _sqlx_migrations"))?;
    let map = rows
        .into_iter()
        .map(
            |(version, description, installed, success, checksum, execution_time_ns)| {
                let installed_on = installed
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s));
                (
                    version,
                    AppliedRecord {
                        version,
                        description,
                        installed_on,
                        success,
                        checksum,
                        execution_time_ns,
                    },
                )
            },
        )
        .collect();
    Ok((true, map))
}

fn compute_status(
    migrations: &Migrations,
    applied: &BTreeMap<i64, AppliedRecord>,
    table_exists: bool,
) -> Status {
    let mut entries: BTreeMap<i64, StatusEntry> = BTreeMap::new();
    for m in migrations.iter() {
        let record = applied.get(&m.version());
        let state = match record {
            None => MigrationState::Pending,
            Some(r) if !r.success => MigrationState::Failed,
            Some(r) if m.up().checksums.accepts(&r.checksum) => MigrationState::Applied,
            Some(_) => MigrationState::ChecksumMismatch,
        };
        entries.insert(
            m.version(),
            StatusEntry {
                version: m.version(),
                description: m.description().to_owned(),
                state,
                file: Some(m.up().path().to_owned()),
                installed_on: record.and_then(|r| r.installed_on),
                execution_time: record
                    .and_then(|r| u64::try_from(r.execution_time_ns).ok())
                    .map(Duration::from_nanos),
            },
        );
    }
    for r in applied.values() {
        entries.entry(r.version).or_insert_with(|| StatusEntry {
            version: r.version,
            description: r.description.clone(),
            state: if r.success {
                MigrationState::MissingFile
            } else {
                MigrationState::Failed
            },
            file: None,
            installed_on: r.installed_on,
            execution_time: u64::try_from(r.execution_time_ns)
                .ok()
                .map(Duration::from_nanos),
        });
    }
    Status {
        entries: entries.into_values().collect(),
        table_exists,
        invalid_indexes: Vec::new(),
    }
}

async fn bookkeep(
    conn: &mut PgConnection,
    m: &Migration,
    direction: Direction,
    elapsed: Duration,
) -> Result<()> {
    match direction {
        Direction::Up => {
            sqlx::query(INSERT_APPLIED)
                .bind(m.version())
                .bind(m.description())
                .bind(true)
                .bind(m.up().checksum())
                .bind(i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await
                .map_err(db("recording an applied migration"))?;
        }
        Direction::Down => {
            sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
                .bind(m.version())
                .execute(&mut *conn)
                .await
                .map_err(db("recording a reverted migration"))?;
        }
    }
    Ok(())
}

/// After a no-transaction script failed: mark the version failed unless the
/// error shows nothing ran (a syntax or name-resolution error, SQLSTATE
/// class 42, is raised before execution). Returns whether it was marked.
async fn mark_failed(
    conn: &mut PgConnection,
    m: &Migration,
    direction: Direction,
    error: &sqlx::Error,
) -> bool {
    let code = error
        .as_database_error()
        .and_then(|d| d.code().map(|c| c.into_owned()));
    if code.as_deref().is_some_and(|c| c.starts_with("42")) {
        return false;
    }
    let marked = match direction {
        Direction::Up => sqlx::query(INSERT_APPLIED)
            .bind(m.version())
            .bind(m.description())
            .bind(false)
            .bind(m.up().checksum())
            .bind(-1_i64)
            .execute(&mut *conn)
            .await
            .map(|_| ()),
        Direction::Down => {
            sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = $1")
                .bind(m.version())
                .execute(&mut *conn)
                .await
                .map(|_| ())
        }
    };
    match marked {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(version = m.version(), error = %e, "could not mark the failed migration");
            false
        }
    }
}
