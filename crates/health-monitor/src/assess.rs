//! Statuses and reasons from a node's figures; pure.

use pgstack_config::HealthSettings;
use pgstack_connection::Role;

use crate::report::{HealthStatus, NodeHealth, Reason, ReasonKind};
use crate::thresholds::HealthThresholds;

/// The status of one node and why.
pub(crate) fn assess_node(
    node: &NodeHealth,
    settings: &HealthSettings,
    thresholds: &HealthThresholds,
) -> (HealthStatus, Vec<Reason>) {
    let reason = |kind, message: String| Reason {
        kind,
        node: node.name.clone(),
        message,
    };
    if !node.reachable {
        let error = node.error.as_deref().unwrap_or("no answer");
        return (
            HealthStatus::Unhealthy,
            vec![reason(
                ReasonKind::NodeDown,
                format!("{} does not answer: {error}", node.name),
            )],
        );
    }
    let mut reasons = Vec::new();
    if let Some(lag) = node.replica_lag
        && !node.is_primary
        && lag > settings.max_replica_lag
    {
        reasons.push(reason(
            ReasonKind::ReplicaLag,
            format!(
                "{} lags {:.1}s behind the primary (limit {:.1}s)",
                node.name,
                lag.as_secs_f64(),
                settings.max_replica_lag.as_secs_f64()
            ),
        ));
    }
    if node.ejected {
        reasons.push(reason(
            ReasonKind::Ejected,
            format!("{} is out of read routing", node.name),
        ));
    }
    if node.pool.saturated_for.is_some() {
        reasons.push(reason(
            ReasonKind::PoolSaturated,
            format!(
                "the pool of {} is saturated: {} of {} in use, {} waiting",
                node.name, node.pool.in_use, node.pool.max_size, node.pool.waiters
            ),
        ));
    }
    if let Some(p99) = node.latency_summary.p99
        && p99 > thresholds.latency_p99
    {
        reasons.push(reason(
            ReasonKind::LatencyHigh,
            format!(
                "probe p99 on {} is {:.1} ms (limit {:.1} ms)",
                node.name,
                p99.as_secs_f64() * 1e3,
                thresholds.latency_p99.as_secs_f64() * 1e3
            ),
        ));
    }
    if let Some(ratio) = node.server_connection_ratio()
        && ratio >= thresholds.server_connections
    {
        reasons.push(reason(
            ReasonKind::ConnectionsNearMax,
            format!(
                "{} has {} connections of max_connections = {}",
                node.name,
                node.server_connections.unwrap_or(0),
                node.max_connections.unwrap_or(0)
            ),
        ));
    }
    if let Some(state) = node.breaker
        && !state.allows_calls()
    {
        reasons.push(reason(
            ReasonKind::BreakerOpen,
            format!("the circuit breaker of {} is {state}", node.name),
        ));
    }
    match (node.is_primary, node.observed_role) {
        (true, Some(Role::Replica)) => reasons.push(reason(
            ReasonKind::RoleMismatch,
            format!(
                "{} receives writes but is in recovery or read-only",
                node.name
            ),
        )),
        (false, Some(Role::Primary)) => reasons.push(reason(
            ReasonKind::RoleMismatch,
            format!("{} accepts writes but is not the primary", node.name),
        )),
        _ => {}
    }
    let status = if reasons.is_empty() {
        HealthStatus::Healthy
    } else {
        HealthStatus::Degraded
    };
    (status, reasons)
}

/// The cluster's status: unhealthy when the primary (or every node) is,
/// degraded when any node is not healthy.
pub(crate) fn assess_cluster(nodes: &[NodeHealth]) -> (HealthStatus, Vec<Reason>) {
    let reasons: Vec<Reason> = nodes.iter().flat_map(|n| n.reasons.clone()).collect();
    let primary_down = nodes
        .iter()
        .any(|n| n.is_primary && n.status == HealthStatus::Unhealthy);
    let all_down = !nodes.is_empty() && nodes.iter().all(|n| !n.reachable);
    let status = if primary_down || all_down {
        HealthStatus::Unhealthy
    } else if nodes.iter().any(|n| n.status != HealthStatus::Healthy) {
        HealthStatus::Degraded
    } else {
        HealthStatus::Healthy
    };
    (status, reasons)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pgstack_connection::BreakerState;

    use crate::report::testing::{down, node, report};
    use crate::report::{HealthStatus, ReasonKind};

    #[test]
    fn all_answering_within_limits_is_healthy() {
        let r = report(vec![node("primary", true), node("replica-1", false)]);
        assert_eq!(r.status, HealthStatus::Healthy);
        assert!(r.reasons.is_empty());
    }

    #[test]
    fn primary_down_is_unhealthy_replica_down_is_degraded() {
        let r = report(vec![down(node("primary", true)), node("replica-1", false)]);
        assert_eq!(r.status, HealthStatus::Unhealthy);
        assert_eq!(r.reasons[0].kind, ReasonKind::NodeDown);
        assert!(r.reasons[0].message.contains("connection refused"));

        let r = report(vec![node("primary", true), down(node("replica-1", false))]);
        assert_eq!(r.status, HealthStatus::Degraded);
        assert_eq!(r.nodes[1].status, HealthStatus::Unhealthy);
    }

    #[test]
    fn every_node_down_is_unhealthy_even_with_a_primary_elsewhere() {
        let mut primary = down(node("primary", true));
        primary.is_primary = false;
        let r = report(vec![primary, down(node("replica-1", false))]);
        assert_eq!(r.status, HealthStatus::Unhealthy);
    }

    #[test]
    fn each_limit_degrades_with_its_own_reason() {
        let mut lagging = node("replica-1", false);
        lagging.replica_lag = Some(Duration::from_secs(11));
        let mut saturated = node("replica-2", false);
        saturated.pool.saturated_for = Some(Duration::from_secs(1));
        let mut slow = node("replica-3", false);
        slow.latency_summary.p99 = Some(Duration::from_millis(300));
        let mut crowded = node("replica-4", false);
        crowded.server_connections = Some(88); // of 97 usable
        let mut broken = node("replica-5", false);
        broken.breaker = Some(BreakerState::Open);
        let mut writable = node("replica-6", false);
        writable.observed_role = Some(pgstack_connection::Role::Primary);
        let mut ejected = node("replica-7", false);
        ejected.ejected = true;
        let r = report(vec![
            node("primary", true),
            lagging,
            saturated,
            slow,
            crowded,
            broken,
            writable,
            ejected,
        ]);
        assert_eq!(r.status, HealthStatus::Degraded);
        let kinds: Vec<ReasonKind> = r.reasons.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            vec![
                ReasonKind::ReplicaLag,
                ReasonKind::PoolSaturated,
                ReasonKind::LatencyHigh,
                ReasonKind::ConnectionsNearMax,
                ReasonKind::BreakerOpen,
                ReasonKind::RoleMismatch,
                ReasonKind::Ejected,
            ]
        );
    }

    #[test]
    fn a_half_open_breaker_and_lag_within_the_limit_are_healthy() {
        let mut n = node("replica-1", false);
        n.breaker = Some(BreakerState::HalfOpen);
        n.replica_lag = Some(Duration::from_secs(10)); // the limit itself
        n.server_connections = Some(87); // below 90 % of 97
        let r = report(vec![node("primary", true), n]);
        assert_eq!(r.status, HealthStatus::Healthy, "{:?}", r.reasons);
    }
}
