//! The `pgstack_health_*` and `pgstack_replica_lag_seconds` series, read
//! through a global debugging recorder (this test binary's only test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Pair, wait_for_report};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pgstack_connection::Cluster;
use pgstack_health::{
    CLUSTER_STATUS_METRIC, HEALTH_STATUS_METRIC, HealthMonitor, HealthStatus,
    PROBE_FAILURES_METRIC, PROBE_SECONDS_METRIC, REPLICA_LAG_METRIC,
};

/// One snapshot (the debugging recorder resets every value it reports).
struct Snapshot(Vec<(CompositeKey, DebugValue)>);

impl Snapshot {
    fn take(snapshotter: &metrics_util::debugging::Snapshotter) -> Snapshot {
        Snapshot(
            snapshotter
                .snapshot()
                .into_vec()
                .into_iter()
                .map(|(key, _, _, value)| (key, value))
                .collect(),
        )
    }

    fn value(&self, name: &str, node: Option<&str>) -> Option<f64> {
        self.0.iter().find_map(|(key, value)| {
            let key = key.key();
            let labels_match = match node {
                Some(node) => key.labels().any(|l| l.key() == "node" && l.value() == node),
                None => key.labels().next().is_none(),
            };
            (key.name() == name && labels_match).then(|| match value {
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Counter(c) => *c as f64,
                DebugValue::Histogram(h) => h.len() as f64,
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_lag_are_published_per_node() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();

    let pair = Pair::start().await;
    let config = pair.config();
    let cluster = Cluster::connect(&config).await.unwrap();
    let monitor = HealthMonitor::start(cluster, &config).await.unwrap();
    let mut reports = monitor.subscribe();
    wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.status == HealthStatus::Healthy
    })
    .await
    .expect("healthy");
    let snap = Snapshot::take(&snapshotter);
    assert_eq!(snap.value(HEALTH_STATUS_METRIC, Some("primary")), Some(0.0));
    assert_eq!(
        snap.value(HEALTH_STATUS_METRIC, Some("replica-1")),
        Some(0.0)
    );
    assert_eq!(snap.value(CLUSTER_STATUS_METRIC, None), Some(0.0));
    assert!(snap.value(PROBE_SECONDS_METRIC, Some("primary")).unwrap() >= 1.0);
    let lag = snap.value(REPLICA_LAG_METRIC, Some("replica-1")).unwrap();
    assert!(lag < 1.0, "lag {lag}");

    // The replica stops: 2 (unhealthy) for it, 1 (degraded) for the cluster.
    pair.replica.stop().await.unwrap();
    wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.status == HealthStatus::Degraded
    })
    .await
    .expect("degraded");
    let snap = Snapshot::take(&snapshotter);
    assert_eq!(
        snap.value(HEALTH_STATUS_METRIC, Some("replica-1")),
        Some(2.0)
    );
    assert_eq!(snap.value(HEALTH_STATUS_METRIC, Some("primary")), Some(0.0));
    assert_eq!(snap.value(CLUSTER_STATUS_METRIC, None), Some(1.0));
    assert!(
        snap.value(PROBE_FAILURES_METRIC, Some("replica-1"))
            .unwrap()
            >= 1.0
    );
    monitor.stop().await;
}
