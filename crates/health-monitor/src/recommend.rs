//! Short, actionable advice derived from a report.

use std::time::Duration;

use pgstack_config::HealthSettings;

use crate::report::{HealthReport, NodeHealth};
use crate::thresholds::HealthThresholds;

fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{} h {} min", secs / 3600, (secs % 3600) / 60)
    } else if secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// One line of advice per problem in `report`, most urgent first; empty
/// for a healthy cluster.
pub fn recommendations(
    report: &HealthReport,
    settings: &HealthSettings,
    thresholds: &HealthThresholds,
) -> Vec<String> {
    let mut urgent = Vec::new();
    let mut other = Vec::new();
    for node in &report.nodes {
        node_advice(node, settings, thresholds, &mut urgent, &mut other);
    }
    urgent.extend(other);
    urgent
}

fn node_advice(
    node: &NodeHealth,
    settings: &HealthSettings,
    thresholds: &HealthThresholds,
    urgent: &mut Vec<String>,
    other: &mut Vec<String>,
) {
    let name = &node.name;
    let down_for = node.down_for.map(human).unwrap_or_else(|| "now".to_owned());
    if !node.reachable {
        if node.is_primary {
            urgent.push(format!(
                "{name} (primary) unreachable for {down_for}: writes fail; check that the \
                 server runs and is reachable (pg_isready, server log), or promote a replica"
            ));
        } else {
            other.push(format!(
                "{name} unreachable for {down_for}: its reads go to other nodes; check the \
                 server and the network"
            ));
        }
        return;
    }
    if let Some(saturated) = node.pool.saturated_for {
        urgent.push(format!(
            "pool of {name} saturated for {} ({} of {} in use, {} waiting): raise pool.max_size \
             or look at slow queries and connections held too long",
            human(saturated),
            node.pool.in_use,
            node.pool.max_size,
            node.pool.waiters
        ));
    }
    if let Some(ratio) = node.server_connection_ratio()
        && ratio >= thresholds.server_connections
    {
        urgent.push(format!(
            "{name} uses {:.0} % of its usable max_connections ({} of {}): lower pool.max_size \
             across instances, put PgBouncer in front, or raise max_connections",
            ratio * 100.0,
            node.server_connections.unwrap_or(0),
            node.max_connections.unwrap_or(0)
        ));
    }
    if let Some(lag) = node.replica_lag
        && !node.is_primary
        && lag > settings.max_replica_lag
    {
        let lagging = node
            .lagging_for
            .map(human)
            .unwrap_or_else(|| "now".to_owned());
        other.push(format!(
            "{name} lags {} behind the primary (limit {}) for {lagging}: check replay on the \
             replica (pg_is_wal_replay_paused(), I/O, long queries holding replay back) and \
             the network; reads avoid it meanwhile",
            human(lag),
            human(settings.max_replica_lag)
        ));
    }
    if let Some(p99) = node.latency_summary.p99
        && p99 > thresholds.latency_p99
    {
        other.push(format!(
            "probe p99 on {name} is {:.1} ms (limit {:.1} ms): look at the server's CPU and \
             I/O load and at the network",
            p99.as_secs_f64() * 1e3,
            thresholds.latency_p99.as_secs_f64() * 1e3
        ));
    }
    if let Some(state) = node.breaker
        && !state.allows_calls()
    {
        other.push(format!(
            "circuit breaker of {name} is {state}: calls fail fast although the node answers \
             probes; it will be probed again shortly"
        ));
    }
    if node.pool.new_connect_error {
        other.push(format!(
            "the pool of {name} fails to open connections ({}): check credentials, TLS \
             settings and max_connections",
            node.pool
                .last_connect_error
                .as_deref()
                .unwrap_or("unknown error")
        ));
    }
    if node.is_primary && node.observed_role == Some(pgstack_connection::Role::Replica) {
        urgent.push(format!(
            "{name} receives writes but is in recovery or read-only: a failover may have \
             happened; the cluster is looking for the new primary"
        ));
    }
    if node.ejected && node.reachable {
        other.push(format!(
            "{name} is out of read routing until {} good probes in a row",
            settings.restore_after
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::testing::{down, node, report};

    #[test]
    fn a_healthy_cluster_needs_no_advice() {
        let r = report(vec![node("primary", true), node("replica-1", false)]);
        assert!(
            recommendations(&r, &HealthSettings::default(), &HealthThresholds::default())
                .is_empty()
        );
    }

    #[test]
    fn advice_names_the_node_the_duration_and_the_knob() {
        let mut primary = node("primary", true);
        primary.pool.saturated_for = Some(Duration::from_secs(300));
        primary.pool.in_use = 20;
        primary.pool.max_size = 20;
        primary.pool.waiters = 7;
        let mut replica = node("replica-1", false);
        replica.replica_lag = Some(Duration::from_secs(30));
        replica.lagging_for = Some(Duration::from_secs(90));
        let r = report(vec![primary, replica, down(node("replica-2", false))]);
        let lines = recommendations(&r, &HealthSettings::default(), &HealthThresholds::default());
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].starts_with("pool of primary saturated for 5 min (20 of 20 in use, 7 waiting): raise pool.max_size or look at slow queries"), "{}", lines[0]);
        assert!(
            lines[1]
                .starts_with("replica-1 lags 30.0 s behind the primary (limit 10.0 s) for 1 min"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("replica-2 unreachable for 42.0 s"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn the_primary_down_comes_first() {
        let mut replica = node("replica-1", false);
        replica.latency_summary.p99 = Some(Duration::from_secs(1));
        let r = report(vec![replica, down(node("primary", true))]);
        let lines = recommendations(&r, &HealthSettings::default(), &HealthThresholds::default());
        assert!(
            lines[0].starts_with("primary (primary) unreachable"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("probe p99 on replica-1 is 1000.0 ms"),
            "{lines:#?}"
        );
    }
}
