//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use pgstack_config::{DatabaseConfig, HealthSettings, NodeSettings};
use pgstack_health::{Alert, AlertState, HealthReport};
use pgstack_tests::{TestCluster, TestDb};
use tokio::sync::{mpsc, watch};

/// Probe interval of the tests.
pub(crate) const INTERVAL: Duration = Duration::from_millis(300);
/// Probe timeout of the tests.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// Short intervals and timeouts, a 1 s lag limit, eject after 2, restore
/// after 2.
pub(crate) fn health() -> HealthSettings {
    HealthSettings {
        interval: INTERVAL,
        probe_timeout: PROBE_TIMEOUT,
        max_replica_lag: Duration::from_secs(1),
        eject_after: 2,
        restore_after: 2,
    }
}

/// A test configuration for `url` (a password is added: trust
/// authentication ignores it, and no report may show it).
pub(crate) fn config(url: &str) -> DatabaseConfig {
    let url = url.replacen(
        "postgres://postgres@",
        "postgres://postgres:pw-s3cret-9@",
        1,
    );
    let mut config = DatabaseConfig::for_tests(&url).expect("test URL");
    config.pool.max_size = 4;
    config.pool.min_idle = 1;
    config.pool.acquire_timeout = Duration::from_secs(2);
    config.pool.connect_timeout = Duration::from_secs(1);
    config.retry.max_attempts = 2;
    config.health = health();
    config
}

/// The password `config` puts in URLs.
pub(crate) const PASSWORD: &str = "pw-s3cret-9";

/// A primary with a fresh database and a streaming replica of it.
pub(crate) struct Pair {
    pub(crate) primary: TestCluster,
    pub(crate) replica: TestCluster,
    pub(crate) db: TestDb,
}

impl Pair {
    pub(crate) async fn start() -> Pair {
        let primary = TestCluster::start().await.expect("primary");
        let db = TestDb::on(&primary).await.expect("database");
        let replica = primary.replica().await.expect("replica");
        Pair {
            primary,
            replica,
            db,
        }
    }

    pub(crate) fn config(&self) -> DatabaseConfig {
        let mut config = config(self.db.url());
        let replica = self.replica.url(self.db.name()).replacen(
            "postgres://postgres@",
            "postgres://postgres:pw-s3cret-9@",
            1,
        );
        config
            .replicas
            .push(NodeSettings::from_url(&replica).expect("replica URL"));
        config
    }
}

/// Waits (up to `within`) for a report that satisfies `check`.
pub(crate) async fn wait_for_report(
    reports: &mut watch::Receiver<Arc<HealthReport>>,
    within: Duration,
    check: impl Fn(&HealthReport) -> bool,
) -> Option<Arc<HealthReport>> {
    tokio::time::timeout(within, async {
        loop {
            {
                let report = reports.borrow_and_update();
                if check(&report) {
                    return Arc::clone(&report);
                }
            }
            if reports.changed().await.is_err() {
                // The monitor stopped: never.
                std::future::pending::<()>().await;
            }
        }
    })
    .await
    .ok()
}

/// Waits (up to `within`) for an alert of `rule` in `state`; collects every
/// alert received on the way into `seen`.
pub(crate) async fn wait_for_alert(
    alerts: &mut mpsc::Receiver<Alert>,
    seen: &mut Vec<Alert>,
    within: Duration,
    rule: &str,
    state: AlertState,
) -> Option<Alert> {
    tokio::time::timeout(within, async {
        while let Some(alert) = alerts.recv().await {
            seen.push(alert.clone());
            if alert.rule == rule && alert.state == state {
                return Some(alert);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// Every alert received within `window`.
pub(crate) async fn drain_for(alerts: &mut mpsc::Receiver<Alert>, window: Duration) -> Vec<Alert> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(window, async {
        while let Some(alert) = alerts.recv().await {
            out.push(alert);
        }
    })
    .await;
    out
}
