//! Limits the monitor judges by, beyond `[health]` in the configuration.

use std::time::Duration;

use serde::Serialize;

/// Thresholds for degraded states, the built-in alert rules and the history.
///
/// `[health]` in the configuration holds the interval, the probe timeout,
/// the lag limit and the ejection counts; these are the rest.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthThresholds {
    /// A pool with at least this share of `max_size` in use (or with
    /// callers waiting) is saturated. Default 0.9.
    pub pool_saturation: f64,
    /// Probe latency p99 above this degrades the node. Default 250 ms.
    #[serde(rename = "latency_p99_seconds", serialize_with = "crate::ser::secs")]
    pub latency_p99: Duration,
    /// Server connections at this share of the usable `max_connections`
    /// degrade the node. Default 0.9.
    pub server_connections: f64,
    /// Probes kept per node for the percentiles, and rounds kept in the
    /// report's history. Default 120.
    pub history: usize,
    /// Cooldown of the built-in alert rules. Default 5 minutes.
    #[serde(rename = "alert_cooldown_seconds", serialize_with = "crate::ser::secs")]
    pub alert_cooldown: Duration,
}

impl Default for HealthThresholds {
    fn default() -> Self {
        HealthThresholds {
            pool_saturation: 0.9,
            latency_p99: Duration::from_millis(250),
            server_connections: 0.9,
            history: 120,
            alert_cooldown: Duration::from_secs(5 * 60),
        }
    }
}

impl HealthThresholds {
    /// The share of `max_size` in use that counts as saturated.
    pub fn with_pool_saturation(mut self, share: f64) -> Self {
        self.pool_saturation = share;
        self
    }

    /// The p99 probe latency that degrades a node.
    pub fn with_latency_p99(mut self, latency: Duration) -> Self {
        self.latency_p99 = latency;
        self
    }

    /// The share of usable server connections that degrades a node.
    pub fn with_server_connections(mut self, share: f64) -> Self {
        self.server_connections = share;
        self
    }

    /// Probes and rounds kept.
    pub fn with_history(mut self, entries: usize) -> Self {
        self.history = entries;
        self
    }

    /// Cooldown of the built-in alert rules.
    pub fn with_alert_cooldown(mut self, cooldown: Duration) -> Self {
        self.alert_cooldown = cooldown;
        self
    }

    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let share = |key: &str, v: f64, problems: &mut Vec<String>| {
            if !(v > 0.0 && v <= 1.0) {
                problems.push(format!("{key} = {v}: must be above 0 and at most 1"));
            }
        };
        share("pool_saturation", self.pool_saturation, &mut problems);
        share("server_connections", self.server_connections, &mut problems);
        if self.latency_p99.is_zero() {
            problems.push("latency_p99 = 0s: must be above zero".to_owned());
        }
        if self.history == 0 {
            problems.push("history = 0: must be at least 1".to_owned());
        }
        if self.alert_cooldown.is_zero() {
            problems.push("alert_cooldown = 0s: must be above zero".to_owned());
        }
        problems
    }
}
