//! The orchestrator: start, status, metrics.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use pgstack_config::{ConnectExplanation, DatabaseConfig};
use pgstack_connection::{Cluster, Node, Role, observe};
use pgstack_pool::{ConnectError, PoolBuilder, PoolError};
use pgstack_resilience::{Backoff, BreakerState};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{BoxError, StartError};
use crate::event::StartEvent;
use crate::options::StartOptions;
use crate::shutdown::ShutdownReport;
use crate::status::{
    Health, LifecycleState, Metrics, MigrationSummary, NodeHealth, NodeStatus, Status,
};

/// Gauge: 1 while the orchestrator is ready or degraded, 0 otherwise.
pub const UP_METRIC: &str = "pgstack_up";
/// Gauge: seconds the last start took.
pub const STARTUP_SECONDS_METRIC: &str = "pgstack_startup_seconds";

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const SHUTTING_DOWN: u8 = 2;
const STOPPED: u8 = 3;

/// The callback given to [`OrchestratorBuilder::on_event`].
type EventSink = Arc<dyn Fn(&StartEvent) + Send + Sync>;

/// The callback given to [`OrchestratorBuilder::health_monitor`].
#[cfg(feature = "health")]
type MonitorSetup = Box<
    dyn FnOnce(pgstack_health::HealthMonitorBuilder) -> pgstack_health::HealthMonitorBuilder + Send,
>;

pub(crate) struct Inner {
    pub(crate) config: DatabaseConfig,
    pub(crate) cluster: Cluster,
    pub(crate) application_name: String,
    state: AtomicU8,
    started_at: Instant,
    startup: Duration,
    connect_attempts: u32,
    migrations: MigrationSummary,
    role_warnings: Vec<String>,
    #[cfg(feature = "health")]
    pub(crate) monitor: Option<pgstack_health::HealthMonitor>,
    pub(crate) shutdown: tokio::sync::Mutex<Option<ShutdownReport>>,
}

impl Inner {
    pub(crate) fn set_state(&self, state: u8) {
        self.state.store(state, Ordering::Release);
        let up = if state == RUNNING { 1.0 } else { 0.0 };
        metrics::gauge!(UP_METRIC).set(up);
    }
}

pub(crate) const STATE_SHUTTING_DOWN: u8 = SHUTTING_DOWN;
pub(crate) const STATE_STOPPED: u8 = STOPPED;

/// Owns the database layer of a service: starts it, reports on it and shuts
/// it down. Cheap to clone; clones share everything.
///
/// See the [crate docs](crate) for an example and `docs/orchestrator.md`
/// for the lifecycle.
#[derive(Clone)]
pub struct Orchestrator {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("state", &self.state())
            .field("application_name", &self.inner.application_name)
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

/// Builds and starts an [`Orchestrator`]; from [`Orchestrator::builder`].
#[must_use]
pub struct OrchestratorBuilder {
    config: DatabaseConfig,
    options: StartOptions,
    on_event: Option<EventSink>,
    #[cfg(feature = "health")]
    monitor_setup: Option<MonitorSetup>,
}

impl fmt::Debug for OrchestratorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrchestratorBuilder")
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl OrchestratorBuilder {
    /// Replaces the start options.
    pub fn options(mut self, options: StartOptions) -> Self {
        self.options = options;
        self
    }

    /// Waits up to `wait` for the database (see
    /// [`StartOptions::wait_for_database`]).
    pub fn wait_for_database(mut self, wait: Duration) -> Self {
        self.options.wait = Some(wait);
        self
    }

    /// Calls `f` with every step of the start (they are logged as well).
    pub fn on_event(mut self, f: impl Fn(&StartEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(f));
        self
    }

    /// Adjusts the health monitor before it starts: alert rules, sinks,
    /// thresholds. Used only when `features.health_monitoring` is on.
    ///
    /// ```no_run
    /// # async fn run(config: pgstack_config::DatabaseConfig) -> Result<(), pgstack_orchestrator::StartError> {
    /// use pgstack_health::ChannelSink;
    /// let (alerts, _received) = ChannelSink::new(64);
    /// let db = pgstack_orchestrator::Orchestrator::builder(config)
    ///     .health_monitor(move |monitor| monitor.sink(alerts))
    ///     .start()
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

    /// Starts: validates the configuration; builds the cluster (waiting for
    /// the database if told to) and warms its pools; verifies the node roles;
    /// applies pending migrations when `migrations.auto_migrate` is on
    /// (under the migration lock; pooled statement caches are cleared after
    /// a schema change); starts the health monitor when
    /// `features.health_monitoring` is on (feature `health`); then reports
    /// ready.
    ///
    /// # Errors
    /// [`StartError`]: the configuration, an unreachable database (at once,
    /// or after the wait), a failed migration. Nothing stays open after an
    /// error.
    pub async fn start(self) -> Result<Orchestrator, StartError> {
        let span = tracing::info_span!(
            "pgstack.start",
            environment = %self.config.environment,
            wait = ?self.options.wait
        );
        self.start_inner().instrument(span).await
    }

    async fn start_inner(self) -> Result<Orchestrator, StartError> {
        let OrchestratorBuilder {
            mut config,
            options,
            on_event,
            #[cfg(feature = "health")]
            monitor_setup,
        } = self;
        let started_at = Instant::now();
        let emit = |event: StartEvent| {
            log_event(&event);
            if let Some(f) = &on_event {
                f(&event);
            }
        };
        tracing::info!(
            environment = %config.environment,
            primary = %config.primary.redacted_url(),
            replicas = config.replicas.len(),
            "pgstack starting"
        );
        config.validate()?;
        emit(StartEvent::Validated);

        let base_application_name = config.query.application_name.clone();
        let application_name = instance_application_name(&base_application_name);
        config.query.application_name = application_name.clone();

        let (cluster, connect_attempts) = connect(&config, &options, &emit).await?;
        emit(StartEvent::Connected {
            attempts: connect_attempts,
            elapsed: started_at.elapsed(),
        });

        if options.warm_up {
            warm_up(&cluster, config.pool.min_idle, &emit).await;
        }
        let role_warnings = verify_roles(&cluster);
        for warning in &role_warnings {
            emit(StartEvent::RoleWarning(warning.clone()));
        }

        let migrations = match migrate(&config, &cluster, &emit).await {
            Ok(summary) => summary,
            Err(error) => {
                cluster.close(Duration::ZERO).await;
                return Err(error);
            }
        };

        #[cfg(feature = "health")]
        let monitor = if config.features.health_monitoring {
            let mut builder = pgstack_health::HealthMonitor::builder(cluster.clone(), &config);
            if let Some(setup) = monitor_setup {
                builder = setup(builder);
            }
            match builder.start().await {
                Ok(monitor) => {
                    emit(StartEvent::MonitorStarted {
                        status: monitor.report().status.to_string(),
                    });
                    Some(monitor)
                }
                Err(error) => {
                    cluster.close(Duration::ZERO).await;
                    return Err(StartError::Health(error));
                }
            }
        } else {
            None
        };

        #[cfg(not(feature = "health"))]
        if config.features.health_monitoring {
            tracing::info!(
                "features.health_monitoring is on, but pgstack was built without the `health` \
                 feature: status() probes the nodes when called"
            );
        }

        let startup = started_at.elapsed();
        let inner = Arc::new(Inner {
            config,
            cluster,
            application_name,
            state: AtomicU8::new(STARTING),
            started_at,
            startup,
            connect_attempts,
            migrations,
            role_warnings,
            #[cfg(feature = "health")]
            monitor,
            shutdown: tokio::sync::Mutex::new(None),
        });
        inner.set_state(RUNNING);
        metrics::gauge!(STARTUP_SECONDS_METRIC).set(startup.as_secs_f64());
        emit(StartEvent::Ready { elapsed: startup });
        Ok(Orchestrator { inner })
    }
}

fn log_event(event: &StartEvent) {
    match event {
        StartEvent::Validated => tracing::debug!("configuration valid"),
        StartEvent::WaitingForDatabase {
            attempt,
            waited,
            limit,
            error,
        } => tracing::warn!(
            attempt,
            waited = ?waited,
            limit = ?limit,
            %error,
            "waiting for the database ({:.1} s of {:.1} s)",
            waited.as_secs_f64(),
            limit.as_secs_f64()
        ),
        StartEvent::Connected { attempts, elapsed } => {
            tracing::info!(attempts, elapsed = ?elapsed, "connected to the database");
        }
        StartEvent::WarmedUp {
            node,
            connections,
            error,
        } => match error {
            None => tracing::info!(node, connections, "pool warmed up"),
            Some(error) => tracing::warn!(node, connections, %error, "pool warm-up stopped short"),
        },
        StartEvent::RoleWarning(warning) => tracing::warn!(%warning, "node role"),
        StartEvent::Migrating {
            version,
            description,
        } => tracing::info!(version, description, "applying migration"),
        StartEvent::Migrated { applied } => {
            if applied.is_empty() {
                tracing::info!("schema up to date");
            } else {
                tracing::info!(?applied, "migrations applied");
            }
        }
        StartEvent::MonitorStarted { status } => {
            tracing::info!(%status, "health monitor started");
        }
        StartEvent::Ready { elapsed } => {
            tracing::info!(elapsed = ?elapsed, "pgstack ready");
        }
    }
}

/// `base` with a short random tag, so that this instance's sessions can be
/// told from those of other instances of the same service (shutdown cancels
/// only its own). At most 54 bytes: with the suffixes of the instance's
/// other sessions (` health`, ` shutdown`) it stays within PostgreSQL's
/// 63-byte limit, so no truncated name can equal it.
fn instance_application_name(base: &str) -> String {
    const MAX: usize = 54;
    let tag = format!("#{:06x}", rand::random::<u32>() & 0x00ff_ffff);
    let mut end = base.len().min(MAX - tag.len());
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{tag}", &base[..end])
}

/// Builds the cluster; waits for the database as the options say, or else
/// as `startup.wait_for_database` says.
async fn connect(
    config: &DatabaseConfig,
    options: &StartOptions,
    emit: &impl Fn(StartEvent),
) -> Result<(Cluster, u32), StartError> {
    let started = Instant::now();
    let backoff = Backoff::new(
        config.retry.initial_backoff,
        config.retry.max_backoff.min(Duration::from_secs(2)),
        config.retry.multiplier,
        config.retry.jitter,
    );
    let mut attempt: u32 = 0;
    let mut previous = Duration::ZERO;
    loop {
        attempt += 1;
        let (explanation, error): (Option<ConnectExplanation>, Option<BoxError>) =
            match log_in(config).await {
                // The explanation says it all; the driver's chain would say
                // it again.
                Err(failed) => match failed.explanation() {
                    Some(explained) => (Some(explained.clone()), None),
                    None => (None, Some(Box::new(failed))),
                },
                Ok(()) => {
                    let mut builder = Cluster::builder(config);
                    if let Some(lanes) = options.shared_connections {
                        builder = builder.shared_connections(lanes);
                    }
                    match builder.build().await {
                        Ok(cluster) => return Ok((cluster, attempt)),
                        Err(error @ pgstack_connection::Error::Config(_)) => {
                            return Err(StartError::Cluster(error));
                        }
                        Err(error) => (None, Some(Box::new(error))),
                    }
                }
            };
        let Some(limit) = options
            .wait
            .or(config.startup.wait_for_database)
            .filter(|wait| !wait.is_zero())
        else {
            return Err(StartError::Unreachable {
                explanation,
                source: error,
            });
        };
        let waited = started.elapsed();
        // The wait lasts what it was given: the last pause is cut to end at
        // the limit and one more attempt is made there, so a database that
        // comes up late in the window is still found, however long the
        // jittered pause drawn would have been.
        let Some(left) = limit.checked_sub(waited).filter(|left| !left.is_zero()) else {
            return Err(StartError::WaitTimedOut {
                waited,
                attempts: attempt,
                explanation,
                source: error,
            });
        };
        let delay = backoff.delay(attempt, previous).min(left);
        previous = delay;
        emit(StartEvent::WaitingForDatabase {
            attempt,
            waited,
            limit,
            error: match (&explanation, &error) {
                (Some(explained), _) => explained.to_string(),
                (None, Some(error)) => error.to_string(),
                (None, None) => "no answer".to_owned(),
            },
        });
        tokio::time::sleep(delay).await;
    }
}

/// One login to the configured primary, with the cluster's TLS and
/// timeouts, before the cluster is built: a failure is explained at once
/// (the cause first, then the fix) instead of surfacing as "no writable
/// primary" behind the pools' retries.
async fn log_in(config: &DatabaseConfig) -> Result<(), Arc<ConnectError>> {
    let pool = match PoolBuilder::from_config(config, &config.primary)
        .name("primary")
        .without_circuit_breaker()
        .build_lazy()
    {
        Ok(pool) => pool,
        // Settings the pool refuses: the cluster's build says which.
        Err(_) => return Ok(()),
    };
    let result = match pool.probe().await {
        Err(PoolError::Connect(failed)) => Err(failed),
        _ => Ok(()),
    };
    pool.close();
    result
}

/// Opens `min_idle` connections on every node by holding that many
/// checkouts at once.
async fn warm_up(cluster: &Cluster, min_idle: u32, emit: &impl Fn(StartEvent)) {
    if min_idle == 0 {
        return;
    }
    let mut nodes = JoinSet::new();
    for node in cluster.nodes() {
        let node = node.clone();
        nodes.spawn(async move {
            let mut checkouts = JoinSet::new();
            for _ in 0..min_idle {
                let pool = node.pool().clone();
                checkouts.spawn(async move { pool.get("pgstack-warm-up").await });
            }
            let mut held = Vec::new();
            let mut error = None;
            while let Some(joined) = checkouts.join_next().await {
                match joined {
                    Ok(Ok(conn)) => held.push(conn),
                    Ok(Err(e)) => error = Some(e.to_string()),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            let connections = u32::try_from(held.len()).unwrap_or(u32::MAX);
            drop(held);
            (node.name().to_owned(), connections, error)
        });
    }
    while let Some(joined) = nodes.join_next().await {
        if let Ok((node, connections, error)) = joined {
            emit(StartEvent::WarmedUp {
                node,
                connections,
                error,
            });
        }
    }
}

/// Compares each node's observed role with its configured one.
fn verify_roles(cluster: &Cluster) -> Vec<String> {
    let primary = cluster.primary().name().to_owned();
    let mut warnings = Vec::new();
    for node in cluster.nodes() {
        match (node.configured_role(), node.observed_role()) {
            (_, None) => warnings.push(format!("{} did not answer the role check", node.name())),
            (Role::Replica, Some(Role::Primary)) => warnings.push(format!(
                "{} is configured as a replica but accepts writes",
                node.name()
            )),
            (Role::Primary, Some(Role::Replica)) => warnings.push(format!(
                "{} is configured as the primary but is a standby or read-only; writes go to {}",
                node.name(),
                primary
            )),
            _ => {}
        }
    }
    warnings
}

#[cfg(feature = "migrations")]
async fn migrate(
    config: &DatabaseConfig,
    cluster: &Cluster,
    emit: &(impl Fn(StartEvent) + Sync),
) -> Result<MigrationSummary, StartError> {
    use pgstack_migrations::{Event, Migrator, UpTarget};

    let auto = config.migrations.auto_migrate;
    let mut summary = MigrationSummary {
        auto_migrate: auto,
        ..MigrationSummary::default()
    };
    let migrator = match Migrator::from_config(config) {
        Ok(migrator) => migrator,
        Err(error) if auto => return Err(StartError::Migrations(error)),
        Err(error) => {
            summary.error = Some(error.to_string());
            return Ok(summary);
        }
    };
    if auto {
        let (sender, mut events) = tokio::sync::mpsc::unbounded_channel();
        let caches = cluster.clone();
        let migrator = migrator
            .on_progress(move |event| {
                if let Event::Applying {
                    version,
                    description,
                    ..
                } = event
                {
                    let _ = sender.send(StartEvent::Migrating {
                        version: *version,
                        description: description.clone(),
                    });
                }
            })
            .after_schema_change(move |versions| {
                tracing::info!(
                    ?versions,
                    "schema changed: clearing pooled statement caches"
                );
                caches.clear_statement_caches();
            });
        let run = migrator.up(UpTarget::Latest);
        tokio::pin!(run);
        let report = loop {
            tokio::select! {
                result = &mut run => break result,
                Some(event) = events.recv() => emit(event),
            }
        };
        while let Ok(event) = events.try_recv() {
            emit(event);
        }
        let report = report.map_err(StartError::Migrations)?;
        summary.applied_at_start = report.changed_versions();
        emit(StartEvent::Migrated {
            applied: summary.applied_at_start.clone(),
        });
        return read_status(&migrator, summary).await;
    }
    read_status(&migrator, summary).await
}

#[cfg(feature = "migrations")]
async fn read_status(
    migrator: &pgstack_migrations::Migrator,
    mut summary: MigrationSummary,
) -> Result<MigrationSummary, StartError> {
    use pgstack_migrations::MigrationState;
    match migrator.status().await {
        Ok(status) => {
            summary.checked = true;
            summary.current_version = status.current_version();
            for entry in &status.entries {
                match entry.state {
                    MigrationState::Applied => summary.applied.push(entry.version),
                    MigrationState::Pending => summary.pending.push(entry.version),
                    state => {
                        if matches!(state, MigrationState::ChecksumMismatch) {
                            summary.applied.push(entry.version);
                        }
                        summary
                            .problems
                            .push(format!("{} {}: {state}", entry.version, entry.description));
                    }
                }
            }
        }
        Err(error) => summary.error = Some(error.to_string()),
    }
    Ok(summary)
}

#[cfg(not(feature = "migrations"))]
async fn migrate(
    config: &DatabaseConfig,
    _cluster: &Cluster,
    _emit: &(impl Fn(StartEvent) + Sync),
) -> Result<MigrationSummary, StartError> {
    if config.migrations.auto_migrate {
        tracing::warn!(
            "migrations.auto_migrate is on, but pgstack was built without the `migrations` \
             feature: no migrations are applied"
        );
    }
    Ok(MigrationSummary {
        auto_migrate: false,
        error: Some("built without the `migrations` feature".to_owned()),
        ..MigrationSummary::default()
    })
}

impl Orchestrator {
    /// A builder for an orchestrator over `config`.
    pub fn builder(config: DatabaseConfig) -> OrchestratorBuilder {
        OrchestratorBuilder {
            config,
            options: StartOptions::default(),
            on_event: None,
            #[cfg(feature = "health")]
            monitor_setup: None,
        }
    }

    /// Starts with `options`; see [`OrchestratorBuilder::start`].
    ///
    /// # Errors
    /// As [`OrchestratorBuilder::start`].
    pub async fn start(
        config: DatabaseConfig,
        options: StartOptions,
    ) -> Result<Orchestrator, StartError> {
        Orchestrator::builder(config).options(options).start().await
    }

    /// The cluster: queries, transactions, routing.
    pub fn cluster(&self) -> &Cluster {
        &self.inner.cluster
    }

    /// The configuration in use (with this instance's `application_name`).
    pub fn config(&self) -> &DatabaseConfig {
        &self.inner.config
    }

    /// The `application_name` of this instance's sessions: the configured
    /// one with an instance tag (`billing#3fa2c1`).
    pub fn application_name(&self) -> &str {
        &self.inner.application_name
    }

    /// The lifecycle state, without checking any node: `Ready` while
    /// running (see [`Orchestrator::status`] for `Degraded`).
    pub fn state(&self) -> LifecycleState {
        match self.inner.state.load(Ordering::Acquire) {
            STARTING => LifecycleState::Starting,
            RUNNING => LifecycleState::Ready,
            SHUTTING_DOWN => LifecycleState::ShuttingDown,
            _ => LifecycleState::Stopped,
        }
    }

    /// The state of everything: lifecycle, each node's health, pools,
    /// breakers, migrations. Node health comes from the health monitor's
    /// latest round when it runs (at most `health.interval` old), else from
    /// a probe of each node now (each within `health.probe_timeout`).
    pub async fn status(&self) -> Status {
        let inner = &self.inner;
        let mut state = self.state();
        let running = state == LifecycleState::Ready;
        #[cfg(feature = "health")]
        let report = self.health_report();
        #[cfg(feature = "health")]
        let monitored = report.as_deref();
        #[cfg(not(feature = "health"))]
        let monitored: Option<&()> = None;
        let nodes = match (running, monitored) {
            (true, Some(report)) => self.nodes_from(report),
            (true, None) => self.check_nodes().await,
            (false, _) => self.nodes_unchecked(),
        };
        if running && nodes.iter().any(|n| n.health != NodeHealth::Healthy) {
            state = LifecycleState::Degraded;
        }
        Status {
            state,
            environment: inner.config.environment,
            application_name: inner.application_name.clone(),
            uptime: inner.started_at.elapsed(),
            startup: inner.startup,
            nodes,
            migrations: inner.migrations.clone(),
            role_warnings: inner.role_warnings.clone(),
            in_flight: inner.cluster.in_flight(),
            #[cfg(feature = "health")]
            monitor: report.map(|r| (*r).clone()),
        }
    }

    /// The health monitor, when it runs (`features.health_monitoring`).
    #[cfg(feature = "health")]
    pub fn health_monitor(&self) -> Option<&pgstack_health::HealthMonitor> {
        self.inner.monitor.as_ref()
    }

    /// The health monitor's latest report, when it runs.
    #[cfg(feature = "health")]
    pub fn health_report(&self) -> Option<Arc<pgstack_health::HealthReport>> {
        self.inner.monitor.as_ref().map(|m| m.report())
    }

    #[cfg(feature = "health")]
    fn nodes_from(&self, report: &pgstack_health::HealthReport) -> Vec<NodeStatus> {
        use pgstack_health::HealthStatus;
        let cluster = &self.inner.cluster;
        cluster
            .nodes()
            .iter()
            .map(|node| {
                let (health, problem) = match report.node(node.name()) {
                    None => (
                        NodeHealth::Unknown,
                        Some("not in the health report".to_owned()),
                    ),
                    Some(seen) => {
                        let health = match seen.status {
                            HealthStatus::Healthy => NodeHealth::Healthy,
                            HealthStatus::Degraded => NodeHealth::Degraded,
                            _ => NodeHealth::Unhealthy,
                        };
                        let mut problems: Vec<String> =
                            seen.reasons.iter().map(|r| r.message.clone()).collect();
                        if problems.is_empty()
                            && let Some(error) = &seen.error
                        {
                            problems.push(error.clone());
                        }
                        let problem = (!problems.is_empty()).then(|| problems.join("; "));
                        (health, problem)
                    }
                };
                node_status(cluster, node, health, problem)
            })
            .collect()
    }

    #[cfg(not(feature = "health"))]
    fn nodes_from(&self, _report: &()) -> Vec<NodeStatus> {
        self.nodes_unchecked()
    }

    /// The overall health and each node's, checked now (see
    /// [`Orchestrator::status`]).
    pub async fn health(&self) -> Health {
        Health::from(&self.status().await)
    }

    /// Every figure of the stack in one snapshot: the cluster's calls,
    /// retries, latency, each node's pool and breaker, and the start.
    pub fn metrics(&self) -> Metrics {
        let inner = &self.inner;
        Metrics {
            state: self.state(),
            uptime: inner.started_at.elapsed(),
            startup: inner.startup,
            connect_attempts: inner.connect_attempts,
            migrations_applied_at_start: inner.migrations.applied_at_start.len(),
            in_flight: inner.cluster.in_flight(),
            cluster: inner.cluster.metrics(),
            #[cfg(feature = "health")]
            health: inner.monitor.as_ref().map(|m| {
                let report = m.report();
                crate::status::MonitorSummary {
                    status: report.status,
                    round: report.round,
                    alerts: report.alerts.len(),
                }
            }),
        }
    }

    fn nodes_unchecked(&self) -> Vec<NodeStatus> {
        let stopped = self.state() == LifecycleState::Stopped;
        let cluster = &self.inner.cluster;
        cluster
            .nodes()
            .iter()
            .map(|node| {
                let health = if stopped {
                    NodeHealth::Unknown
                } else {
                    basic_health(cluster, node, self.inner.config.health.max_replica_lag).0
                };
                node_status(cluster, node, health, None)
            })
            .collect()
    }

    async fn check_nodes(&self) -> Vec<NodeStatus> {
        let cluster = &self.inner.cluster;
        let timeout = self.inner.config.health.probe_timeout;
        let max_lag = self.inner.config.health.max_replica_lag;
        let mut probes = JoinSet::new();
        for (index, node) in cluster.nodes().iter().enumerate() {
            let node = node.clone();
            probes.spawn(async move { (index, probe(&node, timeout).await) });
        }
        let mut answers = vec![None; cluster.nodes().len()];
        while let Some(joined) = probes.join_next().await {
            if let Ok((index, answer)) = joined
                && let Some(slot) = answers.get_mut(index)
            {
                *slot = Some(answer);
            }
        }
        cluster
            .nodes()
            .iter()
            .zip(answers)
            .map(|(node, answer)| {
                let (health, problem) = match answer {
                    Some(Err(problem)) => (NodeHealth::Unhealthy, Some(problem)),
                    None => (
                        NodeHealth::Unhealthy,
                        Some("the probe did not finish".to_owned()),
                    ),
                    Some(Ok(role)) => {
                        node.set_observed_role(Some(role));
                        basic_health(cluster, node, max_lag)
                    }
                };
                node_status(cluster, node, health, problem)
            })
            .collect()
    }

    /// Stops taking work and shuts down within `deadline`; see
    /// [`ShutdownReport`] and `docs/orchestrator.md`. A second call waits for
    /// the first one and returns the same report.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        crate::shutdown::shutdown(self, deadline).await
    }

    /// Waits for SIGTERM or Ctrl-C, then [`Orchestrator::shutdown`]s.
    pub async fn shutdown_on_signal(&self, deadline: Duration) -> ShutdownReport {
        crate::shutdown::shutdown_signal().await;
        tracing::info!(deadline = ?deadline, "shutdown signal received");
        self.shutdown(deadline).await
    }
}

/// One round trip on a connection of the node's pool, within `timeout`:
/// the role as the cluster reads it ([`observe`]: in recovery or read-only
/// is a replica), or why it failed.
async fn probe(node: &Node, timeout: Duration) -> Result<Role, String> {
    let check = async {
        let conn = node
            .pool()
            .get("pgstack-status")
            .await
            .map_err(|e| e.to_string())?;
        let seen = observe(&conn).await.map_err(|e| e.to_string())?;
        Ok(seen.role())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Why a node whose breaker is in `state` is unhealthy, if it is: the
/// breaker rejects calls (open or forced open).
fn breaker_problem(state: BreakerState) -> Option<String> {
    (!state.allows_calls()).then(|| format!("circuit breaker {state}"))
}

/// Health from what the cluster knows without a round trip.
fn basic_health(cluster: &Cluster, node: &Node, max_lag: Duration) -> (NodeHealth, Option<String>) {
    let is_primary = node.name() == cluster.primary().name();
    if let Some(problem) = node
        .circuit_breaker()
        .and_then(|breaker| breaker_problem(breaker.state()))
    {
        return (NodeHealth::Unhealthy, Some(problem));
    }
    if node.is_suspect() {
        return (
            NodeHealth::Unhealthy,
            Some("failed a call; probed in the background".to_owned()),
        );
    }
    if is_primary {
        if node.observed_role() == Some(Role::Replica) {
            return (
                NodeHealth::Degraded,
                Some("receives writes but is in recovery or read-only".to_owned()),
            );
        }
    } else {
        if node.is_ejected() {
            return (
                NodeHealth::Degraded,
                Some("ejected from read routing".to_owned()),
            );
        }
        if let Some(lag) = node.replica_lag()
            && lag > max_lag
        {
            return (
                NodeHealth::Degraded,
                Some(format!("replica lag {lag:?} above {max_lag:?}")),
            );
        }
        if node.observed_role() == Some(Role::Primary) {
            return (
                NodeHealth::Degraded,
                Some("configured as a replica but accepts writes".to_owned()),
            );
        }
    }
    (NodeHealth::Healthy, None)
}

fn node_status(
    cluster: &Cluster,
    node: &Node,
    health: NodeHealth,
    problem: Option<String>,
) -> NodeStatus {
    let metrics = cluster.metrics();
    let figures = metrics.nodes.into_iter().find(|n| n.name == node.name());
    let problem = problem.or_else(|| {
        if health == NodeHealth::Healthy || health == NodeHealth::Unknown {
            None
        } else {
            basic_health(cluster, node, Duration::MAX).1
        }
    });
    NodeStatus {
        name: node.name().to_owned(),
        configured_role: node.configured_role(),
        observed_role: node.observed_role(),
        is_primary: node.name() == cluster.primary().name(),
        health,
        problem,
        routable: figures.as_ref().is_some_and(|f| f.routable),
        breaker: node.circuit_breaker().map(|b| b.state().to_string()),
        replica_lag: node.replica_lag(),
        pool: node.pool().status(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_breaker_that_rejects_calls_makes_the_node_unhealthy() {
        assert_eq!(
            breaker_problem(BreakerState::Open).as_deref(),
            Some("circuit breaker open")
        );
        assert_eq!(
            breaker_problem(BreakerState::ForcedOpen).as_deref(),
            Some("circuit breaker forced open")
        );
        for lets_calls_through in [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::ForcedClosed,
        ] {
            assert_eq!(breaker_problem(lets_calls_through), None);
        }
    }

    #[test]
    fn instance_names_fit_and_differ() {
        let a = instance_application_name("billing");
        let b = instance_application_name("billing");
        assert!(
            a.starts_with("billing#") && a.len() == "billing#".len() + 6,
            "{a}"
        );
        assert_ne!(a, b);
        let long = "é".repeat(40);
        let name = instance_application_name(&long);
        assert!(name.len() <= 54, "{} bytes", name.len());
        assert!(name.contains('#'));
    }
}
