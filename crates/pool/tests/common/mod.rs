//! Helpers shared by the pool's test binaries.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use pgstack_config::{
    CheckoutValidation, CircuitBreakerSettings, NodeSettings, PoolSettings, QuerySettings,
    RetrySettings,
};
use pgstack_pool::PoolBuilder;

/// Pool settings for tests: small, short timeouts.
pub fn pool_settings() -> PoolSettings {
    PoolSettings {
        min_idle: 1,
        max_size: 5,
        acquire_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Some(Duration::from_secs(60)),
        max_lifetime: Some(Duration::from_secs(600)),
        max_lifetime_jitter: Duration::from_secs(10),
        checkout_validation: CheckoutValidation::IdlePing,
        validation_idle_threshold: Duration::from_secs(30),
        leak_detection_threshold: None,
    }
}

/// A builder for `url` with [`pool_settings`], a fast reconnect backoff and
/// a breaker that opens after a few failures.
pub fn builder(url: &str) -> anyhow::Result<PoolBuilder> {
    let node = NodeSettings::from_url(url)?;
    Ok(PoolBuilder::new(node)
        .pool_settings(pool_settings())
        .query_settings(QuerySettings {
            application_name: "pgstack-pool-tests".into(),
            ..QuerySettings::default()
        })
        .reconnect_backoff(RetrySettings {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
            ..RetrySettings::default()
        })
        .circuit_breaker_settings(CircuitBreakerSettings {
            minimum_calls: 3,
            window_size: 5,
            failure_rate_threshold: 0.5,
            open_duration: Duration::from_secs(10),
            max_open_duration: Duration::from_secs(30),
            half_open_probes: 1,
            ..CircuitBreakerSettings::default()
        })
        .housekeeping_interval(Duration::from_millis(100)))
}

/// Polls `check` every 20 ms until it holds or `within` has passed.
pub async fn eventually<F>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> bool,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of `database` in a transaction, as seen from another connection.
pub async fn sessions_in_transaction(
    admin: &tokio_postgres::Client,
    database: &str,
) -> anyhow::Result<i64> {
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND state IN ('idle in transaction', 'idle in transaction (aborted)')",
            &[&database],
        )
        .await?;
    Ok(row.get(0))
}

/// Client backends connected to `database` with our application name.
pub async fn backends(admin: &tokio_postgres::Client, database: &str) -> anyhow::Result<i64> {
    let row = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'pgstack-pool-tests'",
            &[&database],
        )
        .await?;
    Ok(row.get(0))
}

/// Like [`eventually`], with an async check.
pub async fn eventually_async<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
