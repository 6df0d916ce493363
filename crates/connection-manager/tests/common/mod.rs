//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgstack_config::{DatabaseConfig, NodeSettings};
use pgstack_tests::{TestCluster, TestDb};

/// A test configuration for `url`: quick retries with a roomy budget,
/// short timeouts, a 1 s lag limit, statement timeout 10 s.
pub(crate) fn config(url: &str) -> DatabaseConfig {
    let mut config = DatabaseConfig::for_tests(url).expect("test URL");
    config.pool.max_size = 8;
    config.pool.min_idle = 1;
    config.pool.acquire_timeout = Duration::from_secs(5);
    config.pool.connect_timeout = Duration::from_secs(2);
    config.retry.max_attempts = 5;
    config.retry.initial_backoff = Duration::from_millis(5);
    config.retry.max_backoff = Duration::from_millis(100);
    config.retry.budget_min_per_second = 1000;
    config.retry.budget_ratio = 1.0;
    config.health.max_replica_lag = Duration::from_secs(1);
    config.circuit_breaker.open_duration = Duration::from_millis(500);
    config.circuit_breaker.max_open_duration = Duration::from_secs(2);
    config.query.statement_timeout = Some(Duration::from_secs(10));
    config
}

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
        // The database reaches the replica with the base backup.
        let replica = primary.replica().await.expect("replica");
        Pair {
            primary,
            replica,
            db,
        }
    }

    pub(crate) fn replica_url(&self) -> String {
        self.replica.url(self.db.name())
    }

    /// A configuration with the primary and the replica.
    pub(crate) fn config(&self) -> DatabaseConfig {
        let mut config = config(self.db.url());
        config
            .replicas
            .push(NodeSettings::from_url(&self.replica_url()).expect("replica URL"));
        config
    }
}

/// Polls `check` (every 50 ms, up to `within`) until it returns true.
pub(crate) async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
