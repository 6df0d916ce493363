//! The background monitor: probe rounds on the interval, feeding the
//! router, reports, alerts and their delivery.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use metrics::{Counter, Gauge, Histogram};
use pgstack_config::{DatabaseConfig, HealthSettings, NodeSettings};
use pgstack_connection::{Cluster, Node, WalPosition};
use pgstack_pool::Pool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::alert::{Alert, AlertEngine, AlertRule, AlertState, builtin_rules};
use crate::assess::{assess_cluster, assess_node};
use crate::error::Error;
use crate::history::LatencyWindow;
use crate::hysteresis::{Hysteresis, Verdict};
use crate::probe::{Probed, probe, probe_pool};
use crate::recommend::recommendations;
use crate::redact::Redactor;
use crate::report::{HealthReport, HealthStatus, HistoryEntry, NodeHealth, PoolFigures};
use crate::sink::{AlertSink, TracingSink};
use crate::thresholds::HealthThresholds;

/// `pgstack_health_status{node}`: 0 healthy, 1 degraded, 2 unhealthy.
pub const HEALTH_STATUS_METRIC: &str = "pgstack_health_status";
/// `pgstack_health_cluster_status`: the cluster's status, encoded as
/// [`HEALTH_STATUS_METRIC`].
pub const CLUSTER_STATUS_METRIC: &str = "pgstack_health_cluster_status";
/// `pgstack_replica_lag_seconds{node}`: replay lag of each replica (0 when
/// caught up); not set while unknown.
pub const REPLICA_LAG_METRIC: &str = "pgstack_replica_lag_seconds";
/// `pgstack_health_probe_seconds{node}`: probe round-trip time (histogram).
pub const PROBE_SECONDS_METRIC: &str = "pgstack_health_probe_seconds";
/// `pgstack_health_probe_failures_total{node}`: probes without an answer.
pub const PROBE_FAILURES_METRIC: &str = "pgstack_health_probe_failures_total";
/// `pgstack_health_alerts_total{rule,severity,state}`: alerts raised.
pub const ALERTS_METRIC: &str = "pgstack_health_alerts_total";

/// Longest time one sink may take to deliver one alert.
const SINK_TIMEOUT: Duration = Duration::from_secs(5);
/// Alerts queued for the sinks before new ones are dropped.
const ALERT_QUEUE: usize = 1024;
/// How long [`HealthMonitor::stop`] lets the sinks deliver queued alerts.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

type Reply = oneshot::Sender<Arc<HealthReport>>;

/// Configures and starts a [`HealthMonitor`]; from [`HealthMonitor::builder`].
#[must_use]
pub struct HealthMonitorBuilder {
    cluster: Cluster,
    config: DatabaseConfig,
    settings: HealthSettings,
    thresholds: HealthThresholds,
    builtin_rules: bool,
    rules: Vec<AlertRule>,
    tracing_sink: bool,
    sinks: Vec<Arc<dyn AlertSink>>,
}

impl fmt::Debug for HealthMonitorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthMonitorBuilder")
            .field("settings", &self.settings)
            .field("thresholds", &self.thresholds)
            .field("builtin_rules", &self.builtin_rules)
            .field("rules", &self.rules)
            .field("tracing_sink", &self.tracing_sink)
            .field(
                "sinks",
                &self.sinks.iter().map(|s| s.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl HealthMonitorBuilder {
    /// Interval, probe timeout, lag limit and ejection counts, instead of
    /// the configuration's `[health]`.
    pub fn settings(mut self, settings: HealthSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The limits for degraded states, the built-in rules and the history.
    pub fn thresholds(mut self, thresholds: HealthThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Adds an alert rule (after the built-in ones).
    pub fn rule(mut self, rule: AlertRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// Leaves the built-in rules out; only rules added with
    /// [`Self::rule`] are evaluated.
    pub fn without_builtin_rules(mut self) -> Self {
        self.builtin_rules = false;
        self
    }

    /// Adds an alert sink (the [`TracingSink`] stays unless
    /// [`Self::without_tracing_sink`]).
    pub fn sink(mut self, sink: impl AlertSink) -> Self {
        self.sinks.push(Arc::new(sink));
        self
    }

    /// Leaves out the default [`TracingSink`].
    pub fn without_tracing_sink(mut self) -> Self {
        self.tracing_sink = false;
        self
    }

    fn problems(&self) -> Vec<String> {
        let s = &self.settings;
        let mut problems = Vec::new();
        if s.interval.is_zero() {
            problems.push("health.interval = 0s: must be above zero (e.g. \"15s\")".to_owned());
        }
        if s.probe_timeout.is_zero() {
            problems.push("health.probe_timeout = 0s: must be above zero (e.g. \"2s\")".to_owned());
        }
        if s.eject_after == 0 {
            problems.push("health.eject_after = 0: must be at least 1".to_owned());
        }
        if s.restore_after == 0 {
            problems.push("health.restore_after = 0: must be at least 1".to_owned());
        }
        problems.extend(self.thresholds.problems());
        let mut names = std::collections::HashSet::new();
        for rule in self.all_rules() {
            if rule.name().trim().is_empty() {
                problems.push("an alert rule has an empty name".to_owned());
            } else if !names.insert(rule.name().to_owned()) {
                problems.push(format!(
                    "alert rule `{}` is defined twice; rule names must be unique",
                    rule.name()
                ));
            }
            if rule.cooldown_duration().is_zero() {
                problems.push(format!(
                    "alert rule `{}`: cooldown = 0s: must be above zero",
                    rule.name()
                ));
            }
        }
        problems
    }

    fn all_rules(&self) -> Vec<AlertRule> {
        let mut rules = if self.builtin_rules {
            builtin_rules(&self.settings, &self.thresholds)
        } else {
            Vec::new()
        };
        rules.extend(self.rules.iter().cloned());
        rules
    }

    /// Validates the settings, opens nothing yet, runs the first probe round
    /// (so [`HealthMonitor::report`] has a report at once) and starts the
    /// background task.
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] (every problem at once),
    /// [`Error::NodeMismatch`] when the configuration does not describe the
    /// cluster, [`Error::ProbePool`] when a probe connection cannot be set
    /// up, [`Error::NoRuntime`] outside tokio.
    pub async fn start(self) -> Result<HealthMonitor, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::NoRuntime);
        }
        let problems = self.problems();
        if !problems.is_empty() {
            return Err(Error::InvalidSettings(problems));
        }
        let nodes: Vec<Node> = self.cluster.nodes().to_vec();
        let configured: Vec<_> = std::iter::once(&self.config.primary)
            .chain(self.config.replicas.iter())
            .collect();
        if configured.len() != nodes.len() {
            return Err(Error::NodeMismatch {
                configured: configured.len(),
                cluster: nodes.len(),
            });
        }
        let timeout = self.settings.probe_timeout;
        let mut probes = Vec::with_capacity(nodes.len());
        for (node, node_settings) in nodes.iter().zip(configured) {
            let pool = probe_pool(&self.config, node_settings, node.name(), timeout).map_err(
                |source| Error::ProbePool {
                    node: node.name().to_owned(),
                    source: Box::new(source),
                },
            )?;
            probes.push(ProbeConnection {
                pool,
                node: node_settings.clone(),
                name: node.name().to_owned(),
            });
        }
        let mut sinks = self.sinks.clone();
        if self.tracing_sink {
            sinks.insert(0, Arc::new(TracingSink));
        }
        let (alerts_tx, alerts_rx) = mpsc::channel(ALERT_QUEUE);
        let dispatcher = tokio::spawn(dispatch(alerts_rx, sinks));
        let engine = AlertEngine::new(self.all_rules());
        let states = nodes
            .iter()
            .map(|node| NodeState::new(node.name(), &self.settings, &self.thresholds))
            .collect();
        let redactor = Redactor::from_config(&self.config);
        let mut runner = Runner {
            cluster: self.cluster,
            config: self.config,
            probes,
            states,
            redactor,
            settings: self.settings,
            thresholds: self.thresholds,
            engine,
            history: VecDeque::new(),
            round: 0,
            last_round: None,
            alerts_tx,
            cluster_gauge: metrics::gauge!(CLUSTER_STATUS_METRIC),
        };
        let first = runner.round().await;
        let (reports_tx, reports) = watch::channel(first);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (requests, requests_rx) = mpsc::channel(16);
        let task = tokio::spawn(run(runner, stop_rx, requests_rx, reports_tx));
        Ok(HealthMonitor {
            reports,
            requests,
            stop: stop_tx,
            tasks: tokio::sync::Mutex::new(Some((task, dispatcher))),
        })
    }
}

/// The health monitor, running in the background: a probe round over every
/// node on each `health.interval`.
///
/// Stopped by [`HealthMonitor::stop`] (or when dropped: the background
/// task ends at its next wake-up). See the [crate docs](crate).
pub struct HealthMonitor {
    reports: watch::Receiver<Arc<HealthReport>>,
    requests: mpsc::Sender<Reply>,
    stop: watch::Sender<bool>,
    tasks: tokio::sync::Mutex<Option<(JoinHandle<()>, JoinHandle<()>)>>,
}

impl fmt::Debug for HealthMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let report = self.reports.borrow();
        f.debug_struct("HealthMonitor")
            .field("status", &report.status)
            .field("round", &report.round)
            .field("stopped", &*self.stop.borrow())
            .finish()
    }
}

impl HealthMonitor {
    /// A builder for a monitor of `cluster`, which must have been built from
    /// `config` (the probes connect with its node settings and TLS; the
    /// `[health]` section gives interval, timeout, lag limit and ejection
    /// counts).
    pub fn builder(cluster: Cluster, config: &DatabaseConfig) -> HealthMonitorBuilder {
        HealthMonitorBuilder {
            cluster,
            settings: config.health.clone(),
            config: config.clone(),
            thresholds: HealthThresholds::default(),
            builtin_rules: true,
            rules: Vec::new(),
            tracing_sink: true,
            sinks: Vec::new(),
        }
    }

    /// Starts a monitor of `cluster` with the built-in rules and the tracing
    /// sink; see [`HealthMonitorBuilder::start`].
    ///
    /// # Errors
    /// As [`HealthMonitorBuilder::start`].
    pub async fn start(cluster: Cluster, config: &DatabaseConfig) -> Result<HealthMonitor, Error> {
        HealthMonitor::builder(cluster, config).start().await
    }

    /// The latest report.
    pub fn report(&self) -> Arc<HealthReport> {
        Arc::clone(&self.reports.borrow())
    }

    /// Every new report, as a watch channel (never lags; may skip reports).
    pub fn subscribe(&self) -> watch::Receiver<Arc<HealthReport>> {
        self.reports.clone()
    }

    /// Runs one probe round now and returns its report (the interval's
    /// schedule is unchanged).
    ///
    /// # Errors
    /// [`Error::Stopped`] after [`Self::stop`].
    pub async fn check_now(&self) -> Result<Arc<HealthReport>, Error> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Whether [`Self::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops the monitor: a round in progress is abandoned, the probe
    /// connections are closed, and queued alerts get up to 2 s to reach
    /// their sinks. Returns once the background tasks have ended. Calling it
    /// again does nothing.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let Some((task, dispatcher)) = self.tasks.lock().await.take() else {
            return;
        };
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "the health monitor task ended abnormally");
        }
        let abort = dispatcher.abort_handle();
        if tokio::time::timeout(DRAIN_DEADLINE, dispatcher)
            .await
            .is_err()
        {
            abort.abort();
            tracing::warn!("alert sinks did not finish delivering before the monitor stopped");
        }
        tracing::info!("health monitor stopped");
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn run(
    mut runner: Runner,
    mut stop: watch::Receiver<bool>,
    mut requests: mpsc::Receiver<Reply>,
    reports: watch::Sender<Arc<HealthReport>>,
) {
    let interval = runner.settings.interval;
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        let reply = tokio::select! {
            biased;
            _ = stop.changed() => break,
            request = requests.recv() => match request {
                Some(reply) => Some(reply),
                None => break,
            },
            _ = ticker.tick() => None,
        };
        let report = tokio::select! {
            biased;
            _ = stop.changed() => break,
            report = runner.round() => report,
        };
        reports.send_replace(Arc::clone(&report));
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }
    runner.close();
}

async fn dispatch(mut alerts: mpsc::Receiver<Alert>, sinks: Vec<Arc<dyn AlertSink>>) {
    while let Some(alert) = alerts.recv().await {
        for sink in &sinks {
            match tokio::time::timeout(SINK_TIMEOUT, sink.send(&alert)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(sink = sink.name(), rule = %alert.rule, %error, "alert not delivered");
                }
                Err(_) => tracing::warn!(
                    sink = sink.name(),
                    rule = %alert.rule,
                    "alert sink took longer than {SINK_TIMEOUT:?}; alert not delivered"
                ),
            }
        }
    }
}

/// What the monitor remembers about one node between rounds.
struct NodeState {
    hysteresis: Hysteresis,
    latency: LatencyWindow,
    /// The monitor ejected the node (and so may restore it).
    ejected_by_monitor: bool,
    failures: u32,
    successes: u32,
    down_since: Option<Instant>,
    saturated_since: Option<Instant>,
    lagging_since: Option<Instant>,
    status_gauge: Gauge,
    lag_gauge: Gauge,
    probe_seconds: Histogram,
    probe_failures: Counter,
}

impl NodeState {
    fn new(name: &str, settings: &HealthSettings, thresholds: &HealthThresholds) -> Self {
        let name = name.to_owned();
        NodeState {
            hysteresis: Hysteresis::new(settings.eject_after, settings.restore_after),
            latency: LatencyWindow::new(thresholds.history),
            ejected_by_monitor: false,
            failures: 0,
            successes: 0,
            down_since: None,
            saturated_since: None,
            lagging_since: None,
            status_gauge: metrics::gauge!(HEALTH_STATUS_METRIC, "node" => name.clone()),
            lag_gauge: metrics::gauge!(REPLICA_LAG_METRIC, "node" => name.clone()),
            probe_seconds: metrics::histogram!(PROBE_SECONDS_METRIC, "node" => name.clone()),
            probe_failures: metrics::counter!(PROBE_FAILURES_METRIC, "node" => name),
        }
    }
}

/// A node's probe connection: a pool of one, rebuilt after a failed probe
/// so that the next probe tries a fresh connection at once instead of
/// waiting for the old pool's reconnect backoff.
struct ProbeConnection {
    pool: Pool,
    node: NodeSettings,
    name: String,
}

/// The monitor's state and one round's work; owned by the background task.
struct Runner {
    cluster: Cluster,
    config: DatabaseConfig,
    /// One dedicated probe connection per node, in the cluster's node order.
    probes: Vec<ProbeConnection>,
    states: Vec<NodeState>,
    redactor: Redactor,
    settings: HealthSettings,
    thresholds: HealthThresholds,
    engine: AlertEngine,
    history: VecDeque<HistoryEntry>,
    round: u64,
    last_round: Option<Instant>,
    alerts_tx: mpsc::Sender<Alert>,
    cluster_gauge: Gauge,
}

async fn timed_probe(
    pool: Pool,
    timeout: Duration,
    primary: Option<WalPosition>,
) -> Result<Probed, String> {
    match tokio::time::timeout(timeout, probe(&pool, primary)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within the probe timeout ({timeout:?})")),
    }
}

impl Runner {
    /// Probes every node (the primary first, for the replicas' lag), feeds
    /// the router and the breakers, builds the report, raises alerts.
    async fn round(&mut self) -> Arc<HealthReport> {
        let started = Instant::now();
        let wall = SystemTime::now();
        let nodes: Vec<Node> = self.cluster.nodes().to_vec();
        let primary_name = self.cluster.primary().name().to_owned();
        let primary = nodes
            .iter()
            .position(|n| n.name() == primary_name)
            .unwrap_or(0);
        let timeout = self.settings.probe_timeout;
        let mut outcomes: Vec<Option<Result<Probed, String>>> = vec![None; nodes.len()];
        let mut primary_lsn = None;
        if let Some(probe) = self.probes.get(primary) {
            let outcome = timed_probe(probe.pool.clone(), timeout, None).await;
            if let Ok(p) = &outcome {
                primary_lsn = p.seen.wal_position;
            }
            outcomes[primary] = Some(outcome);
        }
        let mut others = JoinSet::new();
        for (index, probe) in self.probes.iter().enumerate() {
            if index != primary {
                let pool = probe.pool.clone();
                others.spawn(async move { (index, timed_probe(pool, timeout, primary_lsn).await) });
            }
        }
        while let Some(joined) = others.join_next().await {
            if let Ok((index, outcome)) = joined
                && let Some(slot) = outcomes.get_mut(index)
            {
                *slot = Some(outcome);
            }
        }
        for (probe, outcome) in self.probes.iter_mut().zip(&outcomes) {
            if matches!(outcome, Some(Err(_)) | None) {
                probe.renew(&self.config, timeout);
            }
        }
        let now = Instant::now();
        let since_last = self
            .last_round
            .map_or(self.settings.interval, |t| now.saturating_duration_since(t));
        self.last_round = Some(now);
        self.round += 1;

        let mut healths = Vec::with_capacity(nodes.len());
        let mut rediscover = false;
        for (index, (node, outcome)) in nodes.iter().zip(outcomes).enumerate() {
            let outcome = outcome.unwrap_or_else(|| Err("the probe task failed".to_owned()));
            let is_primary = index == primary;
            let health = self.apply(index, node, is_primary, outcome, now, since_last);
            if health
                .reasons
                .iter()
                .any(|r| r.kind == crate::ReasonKind::RoleMismatch)
            {
                rediscover = true;
            }
            healths.push(health);
        }
        if rediscover && !self.cluster.is_closing() {
            let cluster = self.cluster.clone();
            tokio::spawn(async move {
                if let Err(error) = cluster.rediscover().await {
                    tracing::warn!(%error, "re-discovery after a role change found no primary");
                }
            });
        }

        let (status, reasons) = assess_cluster(&healths);
        self.history.push_back(HistoryEntry {
            at: wall,
            status,
            down: healths
                .iter()
                .filter(|n| !n.reachable)
                .map(|n| n.name.clone())
                .collect(),
        });
        while self.history.len() > self.thresholds.history {
            self.history.pop_front();
        }
        let mut report = HealthReport {
            status,
            reasons,
            generated_at: wall,
            round: self.round,
            took: now.saturating_duration_since(started),
            primary: primary_name,
            nodes: healths,
            history: self.history.iter().cloned().collect(),
            alerts: Vec::new(),
            recommendations: Vec::new(),
        };
        report.recommendations = recommendations(&report, &self.settings, &self.thresholds);
        let alerts = self.engine.evaluate(&report, now);
        report.alerts = self.engine.active();
        self.cluster_gauge.set(status.gauge_value());
        for alert in alerts {
            let state = match alert.state {
                AlertState::Firing => "firing",
                AlertState::Resolved => "resolved",
            };
            metrics::counter!(
                ALERTS_METRIC,
                "rule" => alert.rule.clone(),
                "severity" => alert.severity.as_str(),
                "state" => state
            )
            .increment(1);
            if self.alerts_tx.try_send(alert).is_err() {
                tracing::warn!("alert queue full; an alert was dropped");
            }
        }
        tracing::debug!(round = self.round, %status, "health round");
        Arc::new(report)
    }

    /// Records one node's probe, feeds the router and the breaker, and
    /// returns the node's health.
    fn apply(
        &mut self,
        index: usize,
        node: &Node,
        is_primary: bool,
        outcome: Result<Probed, String>,
        now: Instant,
        since_last: Duration,
    ) -> NodeHealth {
        let settings = &self.settings;
        let thresholds = &self.thresholds;
        let redactor = &self.redactor;
        let Some(state) = self.states.get_mut(index) else {
            // Nodes never change after the cluster is built.
            return unknown_node(node, is_primary);
        };
        let pool = node.pool().status();
        let mut breaker_probe_requested = false;
        let (reachable, error) = match &outcome {
            Ok(probed) => {
                state.latency.push(probed.latency);
                state.probe_seconds.record(probed.latency.as_secs_f64());
                state.down_since = None;
                state.failures = 0;
                state.successes = state.successes.saturating_add(1);
                node.record_observation(&probed.seen, probed.lag);
                if probed.seen.in_recovery
                    && let Some(lag) = probed.lag.time
                {
                    state.lag_gauge.set(lag.as_secs_f64());
                }
                // The node answers: an open breaker need not wait out its
                // open duration.
                if let Some(breaker) = node.circuit_breaker()
                    && !breaker.state().allows_calls()
                    && breaker.probe_now()
                {
                    breaker_probe_requested = true;
                    tracing::info!(
                        node = node.name(),
                        "node answers health probes; its circuit breaker probes now"
                    );
                }
                (true, None)
            }
            Err(error) => {
                state.probe_failures.increment(1);
                state.down_since.get_or_insert(now);
                state.successes = 0;
                state.failures = state.failures.saturating_add(1);
                let error = redactor.redact(error);
                tracing::debug!(node = node.name(), %error, "health probe failed");
                (false, Some(error))
            }
        };
        let probed = outcome.ok();
        let lag = probed.as_ref().and_then(|p| p.lag.time);
        let lagging = !is_primary && lag.is_some_and(|l| l > settings.max_replica_lag);
        if lagging {
            state.lagging_since.get_or_insert(now);
        } else if reachable {
            state.lagging_since = None;
        }

        // Ejection with hysteresis: replicas only; the primary is never ejected.
        if is_primary {
            if state.ejected_by_monitor {
                node.restore();
                state.ejected_by_monitor = false;
            }
            state.hysteresis.reset();
        } else {
            match state.hysteresis.observe(reachable && !lagging) {
                Some(Verdict::Eject) if !node.is_ejected() => {
                    node.eject();
                    state.ejected_by_monitor = true;
                }
                Some(Verdict::Restore) if state.ejected_by_monitor => {
                    node.restore();
                    state.ejected_by_monitor = false;
                }
                _ => {}
            }
        }

        let utilization = if pool.max_size == 0 {
            0.0
        } else {
            f64::from(pool.in_use) / f64::from(pool.max_size)
        };
        let saturated = pool.max_size > 0
            && f64::from(pool.in_use) >= thresholds.pool_saturation * f64::from(pool.max_size);
        if saturated {
            state.saturated_since.get_or_insert(now);
        } else {
            state.saturated_since = None;
        }
        // A connect error of the pool since the previous round, while the
        // node answered both rounds (errors while it was down, or from just
        // before it came back, are the node-down alert's business).
        let new_connect_error = reachable
            && state.successes >= 2
            && pool
                .last_connect_error_age
                .is_some_and(|age| age <= since_last);
        let figures = PoolFigures {
            size: pool.size,
            idle: pool.idle,
            in_use: pool.in_use,
            waiters: pool.waiters,
            max_size: pool.max_size,
            timeouts: pool.timeouts,
            rejected: pool.rejected,
            utilization,
            saturated_for: state
                .saturated_since
                .map(|t| now.saturating_duration_since(t)),
            last_connect_error: pool
                .last_connect_error
                .as_deref()
                .map(|e| redactor.redact(e)),
            last_connect_error_age: pool.last_connect_error_age,
            new_connect_error,
        };
        let (bad_streak, good_streak) = if is_primary {
            (state.failures, state.successes)
        } else {
            (
                state.hysteresis.bad_streak(),
                state.hysteresis.good_streak(),
            )
        };
        let mut health = NodeHealth {
            name: node.name().to_owned(),
            configured_role: node.configured_role(),
            observed_role: node.observed_role(),
            is_primary,
            status: HealthStatus::Healthy,
            reasons: Vec::new(),
            reachable,
            error,
            down_for: state.down_since.map(|t| now.saturating_duration_since(t)),
            consecutive_failures: bad_streak,
            consecutive_successes: good_streak,
            ejected: node.is_ejected(),
            latency: probed.as_ref().map(|p| p.latency),
            latency_summary: state.latency.summary(),
            replica_lag: lag,
            lagging_for: state
                .lagging_since
                .map(|t| now.saturating_duration_since(t)),
            replica_lag_bytes: probed.as_ref().and_then(|p| p.lag.bytes),
            wal_position: probed.as_ref().and_then(Probed::wal_position),
            server_connections: probed.as_ref().and_then(|p| p.server_connections),
            max_connections: probed.as_ref().and_then(|p| p.max_connections),
            reserved_connections: probed.as_ref().and_then(|p| p.reserved_connections),
            pool: figures,
            breaker: node.circuit_breaker().map(|b| b.state()),
            breaker_probe_requested,
        };
        let (status, reasons) = assess_node(&health, settings, thresholds);
        health.status = status;
        health.reasons = reasons;
        state.status_gauge.set(status.gauge_value());
        health
    }

    /// Closes the probe connections.
    fn close(&self) {
        for probe in &self.probes {
            probe.pool.close();
        }
    }
}

impl ProbeConnection {
    /// Replaces the pool with a fresh one (the old one is closed).
    fn renew(&mut self, config: &DatabaseConfig, timeout: Duration) {
        match probe_pool(config, &self.node, &self.name, timeout) {
            Ok(pool) => {
                self.pool.close();
                self.pool = pool;
            }
            Err(error) => {
                tracing::warn!(node = %self.name, %error, "cannot renew the probe connection");
            }
        }
    }
}

fn unknown_node(node: &Node, is_primary: bool) -> NodeHealth {
    NodeHealth {
        name: node.name().to_owned(),
        configured_role: node.configured_role(),
        observed_role: node.observed_role(),
        is_primary,
        status: HealthStatus::Unhealthy,
        reasons: Vec::new(),
        reachable: false,
        error: Some("not probed".to_owned()),
        down_for: None,
        consecutive_failures: 0,
        consecutive_successes: 0,
        ejected: node.is_ejected(),
        latency: None,
        latency_summary: Default::default(),
        replica_lag: None,
        lagging_for: None,
        replica_lag_bytes: None,
        wal_position: None,
        server_connections: None,
        max_connections: None,
        reserved_connections: None,
        pool: PoolFigures::default(),
        breaker: None,
        breaker_probe_requested: false,
    }
}
