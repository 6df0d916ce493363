//! Alert rules, their cooldowns, and the alerts they raise.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pgstack_config::HealthSettings;
use serde::Serialize;
use tokio::time::Instant;

use crate::report::{HealthReport, NodeHealth};
use crate::thresholds::HealthThresholds;

/// How urgent an alert is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Needs attention soon.
    Medium,
    /// Needs attention now.
    High,
    /// Service is failing.
    Critical,
}

impl Severity {
    /// `low`, `medium`, `high` or `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an alert starts (or repeats) or ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertState {
    /// The condition holds (sent once, then again after each cooldown).
    Firing,
    /// The condition cleared.
    Resolved,
}

/// One place where a rule's condition holds: a node, or the whole cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Breach {
    /// The node concerned; `None` for the cluster as a whole.
    pub node: Option<String>,
    /// What was seen ("lag 12.3s, limit 10s").
    pub detail: String,
}

impl Breach {
    /// A breach on `node`.
    pub fn node(node: impl Into<String>, detail: impl Into<String>) -> Self {
        Breach {
            node: Some(node.into()),
            detail: detail.into(),
        }
    }

    /// A breach of the cluster as a whole.
    pub fn cluster(detail: impl Into<String>) -> Self {
        Breach {
            node: None,
            detail: detail.into(),
        }
    }
}

type Condition = Arc<dyn Fn(&HealthReport) -> Vec<Breach> + Send + Sync>;

/// A named condition over a [`HealthReport`], with a severity, a message and
/// a cooldown.
///
/// Each node (or the cluster) for which the condition holds is tracked on
/// its own: the alert fires when the condition starts holding, again after
/// each cooldown while it still holds, and a [`AlertState::Resolved`] alert
/// is sent once when it clears.
///
/// ```
/// use std::time::Duration;
/// use pgstack_health::{AlertRule, HealthStatus, Severity};
///
/// // A condition per node ...
/// let slow = AlertRule::per_node("replica-slow", Severity::Low, |node| {
///     let p50 = node.latency_summary.p50?;
///     (!node.is_primary && p50 > Duration::from_millis(50)).then(|| format!("p50 {p50:?}"))
/// })
/// .message("a replica answers slowly")
/// .cooldown(Duration::from_secs(600));
///
/// // ... or over the whole report.
/// let degraded = AlertRule::cluster("cluster-degraded", Severity::Medium, |report| {
///     (report.status == HealthStatus::Degraded).then(|| format!("{} reasons", report.reasons.len()))
/// });
/// # let _ = (slow, degraded);
/// ```
#[derive(Clone)]
pub struct AlertRule {
    name: Arc<str>,
    severity: Severity,
    message: Arc<str>,
    cooldown: Duration,
    condition: Condition,
}

impl fmt::Debug for AlertRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertRule")
            .field("name", &self.name)
            .field("severity", &self.severity)
            .field("message", &self.message)
            .field("cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

/// Cooldown of a rule that does not set one.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5 * 60);

impl AlertRule {
    /// A rule whose condition lists every place it holds (empty: it does not).
    /// The message defaults to the name; the cooldown to 5 minutes.
    pub fn new(
        name: impl Into<String>,
        severity: Severity,
        condition: impl Fn(&HealthReport) -> Vec<Breach> + Send + Sync + 'static,
    ) -> Self {
        let name: String = name.into();
        AlertRule {
            message: Arc::from(name.as_str()),
            name: Arc::from(name),
            severity,
            cooldown: DEFAULT_COOLDOWN,
            condition: Arc::new(condition),
        }
    }

    /// A rule over each node: `condition` returns the detail when it holds.
    pub fn per_node(
        name: impl Into<String>,
        severity: Severity,
        condition: impl Fn(&NodeHealth) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        AlertRule::new(name, severity, move |report: &HealthReport| {
            report
                .nodes
                .iter()
                .filter_map(|node| condition(node).map(|detail| Breach::node(&node.name, detail)))
                .collect()
        })
    }

    /// A rule over the whole report: `condition` returns the detail when it
    /// holds.
    pub fn cluster(
        name: impl Into<String>,
        severity: Severity,
        condition: impl Fn(&HealthReport) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        AlertRule::new(name, severity, move |report: &HealthReport| {
            condition(report).map(Breach::cluster).into_iter().collect()
        })
    }

    /// The text sent with every alert of this rule.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Arc::from(message.into());
        self
    }

    /// The least time between two firings for the same node while the
    /// condition holds.
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The severity.
    pub fn with_severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    /// The rule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rule's severity.
    pub fn severity(&self) -> Severity {
        self.severity
    }

    /// The rule's cooldown.
    pub fn cooldown_duration(&self) -> Duration {
        self.cooldown
    }

    /// Where the condition holds in `report`.
    pub fn evaluate(&self, report: &HealthReport) -> Vec<Breach> {
        (self.condition)(report)
    }
}

/// An alert, as handed to the sinks.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Alert {
    /// The rule's name.
    pub rule: String,
    /// The rule's severity.
    pub severity: Severity,
    /// Firing or resolved.
    pub state: AlertState,
    /// The node concerned; `None` for the cluster.
    pub node: Option<String>,
    /// The rule's message.
    pub message: String,
    /// What was seen (for a resolved alert: the last detail seen while it fired).
    pub detail: String,
    /// When this alert was raised.
    #[serde(serialize_with = "crate::ser::rfc3339")]
    pub at: SystemTime,
    /// When the condition started holding.
    #[serde(serialize_with = "crate::ser::rfc3339")]
    pub since: SystemTime,
    /// How many times it has fired since it started holding (this one included).
    pub occurrences: u32,
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            AlertState::Firing => "FIRING",
            AlertState::Resolved => "RESOLVED",
        };
        write!(f, "[{state}] [{}] {}", self.severity, self.rule)?;
        if let Some(node) = &self.node {
            write!(f, " on {node}")?;
        }
        write!(f, ": {} ({})", self.message, self.detail)
    }
}

/// An alert whose condition holds now, as listed in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ActiveAlert {
    /// The rule's name.
    pub rule: String,
    /// The rule's severity.
    pub severity: Severity,
    /// The node concerned; `None` for the cluster.
    pub node: Option<String>,
    /// What was seen last.
    pub detail: String,
    /// When the condition started holding.
    #[serde(serialize_with = "crate::ser::rfc3339")]
    pub since: SystemTime,
    /// Times fired so far.
    pub occurrences: u32,
}

struct Episode {
    since: SystemTime,
    last_fired: Instant,
    occurrences: u32,
    detail: String,
}

/// Evaluates rules against reports and decides what to send: the cooldown
/// and resolution logic, with the clock passed in (`now`), so it runs on
/// tokio's paused clock in tests.
///
/// ```
/// use std::time::Duration;
/// use pgstack_health::{AlertEngine, AlertRule, AlertState, HealthMonitor, Severity};
///
/// # fn run(monitor: &HealthMonitor) {
/// let rule = AlertRule::cluster("always", Severity::Low, |_| Some("yes".into()))
///     .cooldown(Duration::from_secs(60));
/// let mut engine = AlertEngine::new(vec![rule]);
/// let report = monitor.report();
/// let now = tokio::time::Instant::now();
/// let fired = engine.evaluate(&report, now);
/// assert_eq!(fired[0].state, AlertState::Firing);
/// // Within the cooldown: nothing to send.
/// assert!(engine.evaluate(&report, now + Duration::from_secs(30)).is_empty());
/// # }
/// ```
pub struct AlertEngine {
    rules: Vec<AlertRule>,
    active: HashMap<(usize, Option<String>), Episode>,
}

impl fmt::Debug for AlertEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertEngine")
            .field("rules", &self.rules)
            .field("active", &self.active.len())
            .finish()
    }
}

impl AlertEngine {
    /// An engine for `rules`.
    pub fn new(rules: Vec<AlertRule>) -> Self {
        AlertEngine {
            rules,
            active: HashMap::new(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[AlertRule] {
        &self.rules
    }

    /// Evaluates every rule against `report` at `now`; returns the alerts to
    /// send: firings (new, or due again after the cooldown) and resolutions.
    /// Alert times are the report's `generated_at`.
    pub fn evaluate(&mut self, report: &HealthReport, now: Instant) -> Vec<Alert> {
        let at = report.generated_at;
        let mut out = Vec::new();
        let mut holding_now: HashSet<(usize, Option<String>)> = HashSet::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let mut holding: BTreeMap<Option<String>, String> = BTreeMap::new();
            for breach in rule.evaluate(report) {
                holding
                    .entry(breach.node)
                    .and_modify(|d| {
                        d.push_str("; ");
                        d.push_str(&breach.detail);
                    })
                    .or_insert(breach.detail);
            }
            for (node, detail) in holding {
                let key = (index, node.clone());
                holding_now.insert(key.clone());
                let fire = match self.active.get_mut(&key) {
                    None => {
                        self.active.insert(
                            key,
                            Episode {
                                since: at,
                                last_fired: now,
                                occurrences: 1,
                                detail: detail.clone(),
                            },
                        );
                        Some((at, 1))
                    }
                    Some(episode) => {
                        episode.detail.clone_from(&detail);
                        if now.saturating_duration_since(episode.last_fired) >= rule.cooldown {
                            episode.last_fired = now;
                            episode.occurrences = episode.occurrences.saturating_add(1);
                            Some((episode.since, episode.occurrences))
                        } else {
                            None
                        }
                    }
                };
                if let Some((since, occurrences)) = fire {
                    out.push(Alert {
                        rule: rule.name.to_string(),
                        severity: rule.severity,
                        state: AlertState::Firing,
                        node,
                        message: rule.message.to_string(),
                        detail,
                        at,
                        since,
                        occurrences,
                    });
                }
            }
        }
        // Resolutions: episodes whose condition no longer holds.
        let mut cleared: Vec<(usize, Option<String>)> = self
            .active
            .keys()
            .filter(|key| !holding_now.contains(*key))
            .cloned()
            .collect();
        cleared.sort();
        for key in cleared {
            let (Some(episode), Some(rule)) = (self.active.remove(&key), self.rules.get(key.0))
            else {
                continue;
            };
            out.push(Alert {
                rule: rule.name.to_string(),
                severity: rule.severity,
                state: AlertState::Resolved,
                node: key.1,
                message: rule.message.to_string(),
                detail: episode.detail,
                at,
                since: episode.since,
                occurrences: episode.occurrences,
            });
        }
        out
    }

    /// The alerts whose condition holds now, most severe first.
    pub fn active(&self) -> Vec<ActiveAlert> {
        let mut active: Vec<ActiveAlert> = self
            .active
            .iter()
            .filter_map(|((index, node), episode)| {
                let rule = self.rules.get(*index)?;
                Some(ActiveAlert {
                    rule: rule.name.to_string(),
                    severity: rule.severity,
                    node: node.clone(),
                    detail: episode.detail.clone(),
                    since: episode.since,
                    occurrences: episode.occurrences,
                })
            })
            .collect();
        active.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then_with(|| a.rule.cmp(&b.rule))
                .then_with(|| a.node.cmp(&b.node))
        });
        active
    }
}

/// Names of the built-in rules.
pub mod rules {
    /// The node writes go to does not answer. Critical.
    pub const PRIMARY_DOWN: &str = "primary-down";
    /// A replica does not answer. High.
    pub const REPLICA_DOWN: &str = "replica-down";
    /// A replica lags more than `health.max_replica_lag`. Medium.
    pub const REPLICA_LAG_HIGH: &str = "replica-lag-high";
    /// A pool is saturated (see [`crate::HealthThresholds::pool_saturation`]). High.
    pub const POOL_SATURATED: &str = "pool-saturated";
    /// The p99 probe latency is over [`crate::HealthThresholds::latency_p99`]. Medium.
    pub const LATENCY_P99_HIGH: &str = "latency-p99-high";
    /// A server's connections are near its usable `max_connections`. High.
    pub const SERVER_CONNECTIONS_NEAR_MAX: &str = "server-connections-near-max";
    /// A pool failed to open a connection (in the background) while the
    /// node answers probes: credentials, TLS, `max_connections`. Medium.
    pub const POOL_CONNECT_ERRORS: &str = "pool-connect-errors";
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The built-in rules, with the lag limit from `settings` and the other
/// limits and the cooldown from `thresholds`.
pub fn builtin_rules(settings: &HealthSettings, thresholds: &HealthThresholds) -> Vec<AlertRule> {
    let cooldown = thresholds.alert_cooldown;
    let max_lag = settings.max_replica_lag;
    let p99_limit = thresholds.latency_p99;
    let connections = thresholds.server_connections;
    vec![
        AlertRule::per_node(rules::PRIMARY_DOWN, Severity::Critical, |node| {
            (node.is_primary && !node.reachable)
                .then(|| node.error.clone().unwrap_or_else(|| "no answer".to_owned()))
        })
        .message("the primary does not answer: writes fail"),
        AlertRule::per_node(rules::REPLICA_DOWN, Severity::High, |node| {
            (!node.is_primary && !node.reachable)
                .then(|| node.error.clone().unwrap_or_else(|| "no answer".to_owned()))
        })
        .message("a replica does not answer: its reads go elsewhere"),
        AlertRule::per_node(rules::REPLICA_LAG_HIGH, Severity::Medium, move |node| {
            let lag = node.replica_lag?;
            (!node.is_primary && lag > max_lag).then(|| {
                let bytes = node
                    .replica_lag_bytes
                    .map(|b| format!(", {b} bytes behind"))
                    .unwrap_or_default();
                format!("lag {} (limit {}){bytes}", secs(lag), secs(max_lag))
            })
        })
        .message("a replica lags behind the primary"),
        AlertRule::per_node(rules::POOL_SATURATED, Severity::High, |node| {
            let p = &node.pool;
            p.saturated_for.map(|d| {
                format!(
                    "{} of {} connections in use, {} waiting, for {}",
                    p.in_use,
                    p.max_size,
                    p.waiters,
                    secs(d)
                )
            })
        })
        .message("a connection pool is saturated"),
        AlertRule::per_node(rules::LATENCY_P99_HIGH, Severity::Medium, move |node| {
            let p99 = node.latency_summary.p99?;
            (node.reachable && p99 > p99_limit).then(|| {
                format!(
                    "p99 {:.1} ms over {} probes (limit {:.1} ms)",
                    p99.as_secs_f64() * 1e3,
                    node.latency_summary.samples,
                    p99_limit.as_secs_f64() * 1e3
                )
            })
        })
        .message("probe latency is high"),
        AlertRule::per_node(
            rules::SERVER_CONNECTIONS_NEAR_MAX,
            Severity::High,
            move |node| {
                let ratio = node.server_connection_ratio()?;
                (ratio >= connections).then(|| {
                    format!(
                        "{} connections of max_connections = {} ({} reserved), {:.0} %",
                        node.server_connections.unwrap_or(0),
                        node.max_connections.unwrap_or(0),
                        node.reserved_connections.unwrap_or(0),
                        ratio * 100.0
                    )
                })
            },
        )
        .message("the server is near max_connections"),
        AlertRule::per_node(rules::POOL_CONNECT_ERRORS, Severity::Medium, |node| {
            (node.reachable && node.pool.new_connect_error)
                .then(|| node.pool.last_connect_error.clone().unwrap_or_default())
        })
        .message("the pool cannot open connections although the node answers"),
    ]
    .into_iter()
    .map(|rule| rule.cooldown(cooldown))
    .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::report::testing::{down, node, report};

    fn switch_rule(on: &Arc<AtomicBool>, cooldown: Duration) -> AlertRule {
        let on = Arc::clone(on);
        AlertRule::cluster("switch", Severity::High, move |_| {
            on.load(Ordering::SeqCst).then(|| "on".to_owned())
        })
        .message("the switch is on")
        .cooldown(cooldown)
    }

    #[tokio::test(start_paused = true)]
    async fn fires_once_per_cooldown_while_holding_and_resolves_once() {
        let on = Arc::new(AtomicBool::new(false));
        let mut engine = AlertEngine::new(vec![switch_rule(&on, Duration::from_secs(60))]);
        let r = report(vec![node("primary", true)]);
        let tick = Duration::from_secs(5);

        assert!(engine.evaluate(&r, Instant::now()).is_empty());
        on.store(true, Ordering::SeqCst);
        let fired = engine.evaluate(&r, Instant::now());
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].state, AlertState::Firing);
        assert_eq!(fired[0].occurrences, 1);
        assert_eq!(fired[0].message, "the switch is on");
        assert_eq!(fired[0].severity, Severity::High);
        assert_eq!(engine.active().len(), 1);

        // Every 5 s for 55 s: nothing new.
        for _ in 0..11 {
            tokio::time::advance(tick).await;
            assert!(engine.evaluate(&r, Instant::now()).is_empty());
        }
        // At 60 s: fires again.
        tokio::time::advance(tick).await;
        let again = engine.evaluate(&r, Instant::now());
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].state, AlertState::Firing);
        assert_eq!(again[0].occurrences, 2);
        tokio::time::advance(tick).await;
        assert!(engine.evaluate(&r, Instant::now()).is_empty());

        // Cleared: one resolution, then silence.
        on.store(false, Ordering::SeqCst);
        let resolved = engine.evaluate(&r, Instant::now());
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].state, AlertState::Resolved);
        assert_eq!(resolved[0].occurrences, 2);
        assert!(engine.active().is_empty());
        for _ in 0..20 {
            tokio::time::advance(tick).await;
            assert!(engine.evaluate(&r, Instant::now()).is_empty());
        }

        // Holding again soon after: a new episode fires at once.
        on.store(true, Ordering::SeqCst);
        let fired = engine.evaluate(&r, Instant::now());
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].occurrences, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn nodes_are_tracked_separately() {
        let rules = builtin_rules(
            &HealthSettings::default(),
            &HealthThresholds::default().with_alert_cooldown(Duration::from_secs(60)),
        );
        let mut engine = AlertEngine::new(rules);
        let primary = node("primary", true);
        let r1 = report(vec![
            primary.clone(),
            down(node("replica-1", false)),
            node("replica-2", false),
        ]);
        let fired = engine.evaluate(&r1, Instant::now());
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].rule, rules::REPLICA_DOWN);
        assert_eq!(fired[0].node.as_deref(), Some("replica-1"));
        assert!(fired[0].detail.contains("connection refused"));

        // A second replica goes down within the first one's cooldown: it fires.
        tokio::time::advance(Duration::from_secs(10)).await;
        let r2 = report(vec![
            primary.clone(),
            down(node("replica-1", false)),
            down(node("replica-2", false)),
        ]);
        let fired = engine.evaluate(&r2, Instant::now());
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].node.as_deref(), Some("replica-2"));

        // The first comes back: only it resolves.
        tokio::time::advance(Duration::from_secs(10)).await;
        let r3 = report(vec![
            primary,
            node("replica-1", false),
            down(node("replica-2", false)),
        ]);
        let out = engine.evaluate(&r3, Instant::now());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].state, AlertState::Resolved);
        assert_eq!(out[0].node.as_deref(), Some("replica-1"));
        assert_eq!(engine.active().len(), 1);
    }

    #[test]
    fn built_in_rules_see_what_they_are_named_after() {
        let thresholds = HealthThresholds::default();
        let settings = HealthSettings::default();
        let rules = builtin_rules(&settings, &thresholds);
        let fired = |r: &HealthReport| -> Vec<(String, Option<String>)> {
            let mut v: Vec<_> = rules
                .iter()
                .flat_map(|rule| {
                    rule.evaluate(r)
                        .into_iter()
                        .map(|b| (rule.name().to_owned(), b.node))
                })
                .collect();
            v.sort();
            v
        };
        assert!(
            fired(&report(vec![
                node("primary", true),
                node("replica-1", false)
            ]))
            .is_empty()
        );

        let mut replica = node("replica-1", false);
        replica.replica_lag = Some(Duration::from_secs(30));
        replica.pool.saturated_for = Some(Duration::from_secs(300));
        replica.latency_summary.p99 = Some(Duration::from_secs(1));
        replica.server_connections = Some(97);
        replica.pool.new_connect_error = true;
        replica.pool.last_connect_error = Some("FATAL 53300: too many clients".to_owned());
        let got = fired(&report(vec![down(node("primary", true)), replica]));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                rules::LATENCY_P99_HIGH,
                rules::POOL_CONNECT_ERRORS,
                rules::POOL_SATURATED,
                rules::PRIMARY_DOWN,
                rules::REPLICA_LAG_HIGH,
                rules::SERVER_CONNECTIONS_NEAR_MAX,
            ]
        );
        assert!(
            rules
                .iter()
                .all(|r| r.cooldown_duration() == thresholds.alert_cooldown)
        );
    }

    #[test]
    fn alerts_serialize_and_display() {
        let alert = Alert {
            rule: "primary-down".to_owned(),
            severity: Severity::Critical,
            state: AlertState::Firing,
            node: Some("primary".to_owned()),
            message: "the primary does not answer".to_owned(),
            detail: "refused".to_owned(),
            at: SystemTime::UNIX_EPOCH,
            since: SystemTime::UNIX_EPOCH,
            occurrences: 1,
        };
        assert_eq!(
            alert.to_string(),
            "[FIRING] [critical] primary-down on primary: the primary does not answer (refused)"
        );
        let json = serde_json::to_value(&alert).unwrap_or_default();
        assert_eq!(json["severity"], "critical");
        assert_eq!(json["state"], "firing");
        assert_eq!(json["at"], "1970-01-01T00:00:00.000Z");
    }
}
