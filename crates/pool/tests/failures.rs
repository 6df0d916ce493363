//! Node failures against real servers: kill -9 and restart, terminated
//! backends, a black-holing network, the circuit breaker.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgstack_config::{CheckoutValidation, PoolSettings};
use pgstack_pool::{AcquirePhase, PoolError};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_and_restart_no_broken_connection_after_the_server_is_back() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pool = common::builder(&cluster.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 3,
            max_size: 5,
            ..common::pool_settings()
        })
        .build()
        .await?;
    assert_eq!(pool.status().size, 3);

    // Workers run queries all along. After the server is back, a checkout
    // that succeeds must hand out a working connection.
    let back = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let bad_after_back = Arc::new(AtomicU64::new(0));
    let ok_after_back = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (pool, back, stop) = (pool.clone(), back.clone(), stop.clone());
        let (bad, ok) = (bad_after_back.clone(), ok_after_back.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let was_back = back.load(Ordering::Acquire);
                match pool.get("worker").await {
                    Ok(conn) => match conn.query_one("SELECT 1", &[]).await {
                        Ok(_) if was_back => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) if was_back => {
                            bad.fetch_add(1, Ordering::Relaxed);
                            eprintln!("broken connection after restart: {e:?}");
                        }
                        Err(_) => {}
                    },
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill9().await?;

    // While it is down the breaker opens and checkouts fail at once.
    assert!(
        common::eventually(Duration::from_secs(5), || {
            pool.status().circuit.as_deref() == Some("open")
        })
        .await,
        "{:?}",
        pool.status()
    );
    let started = Instant::now();
    let err = pool.get("while-down").await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("circuit breaker"), "{err}");

    cluster.start_again().await?;
    let restarted = Instant::now();
    back.store(true, Ordering::Release);

    // Full again within one backoff period (max_backoff = 300 ms, plus the
    // time to connect), long before the breaker's 10 s open duration ends.
    assert!(
        common::eventually(Duration::from_secs(3), || pool.status().size >= 3).await,
        "{:?}",
        pool.status()
    );
    let refill = restarted.elapsed();
    assert!(
        refill < Duration::from_millis(1300),
        "refilled after {refill:?}"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    for worker in workers {
        worker.await?;
    }
    assert_eq!(bad_after_back.load(Ordering::Relaxed), 0);
    assert!(ok_after_back.load(Ordering::Relaxed) > 10);
    assert_eq!(pool.status().circuit.as_deref(), Some("closed"));
    assert!(pool.status().closed.broken >= 3, "{:?}", pool.status());
    Ok(())
}

#[tokio::test]
async fn terminated_backends_are_replaced_on_the_next_checkout() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let admin = cluster.client("postgres").await?;
    let pool = common::builder(&cluster.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 4,
            max_size: 4,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let mut old_pids = Vec::new();
    let conns = futures_join(&pool, 4).await?;
    for conn in &conns {
        old_pids.push(
            conn.query_one("SELECT pg_backend_pid()", &[])
                .await?
                .get::<_, i32>(0),
        );
    }
    drop(conns);

    let terminated: i64 = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'pgstack-pool-tests'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(terminated, 4);
    // Wait until the old backends are gone, as seen by the server (the pool
    // may already be opening new ones).
    assert!(
        common::eventually_async(Duration::from_secs(5), || async {
            let left = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[&old_pids],
                )
                .await
                .map(|row| row.get::<_, i64>(0));
            left.ok() == Some(0)
        })
        .await
    );

    let conns = futures_join(&pool, 4).await?;
    for conn in &conns {
        let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        assert!(!old_pids.contains(&pid), "got a terminated backend");
    }
    assert_eq!(pool.status().closed.broken, 4);
    Ok(())
}

async fn futures_join(
    pool: &pgstack_pool::Pool,
    n: usize,
) -> anyhow::Result<Vec<pgstack_pool::PooledConnection>> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(pool.get("batch").await?);
    }
    Ok(conns)
}

#[tokio::test]
async fn blackhole_times_out_naming_the_phase_and_cause_then_the_breaker_fails_fast()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    proxy.set_mode(ProxyMode::Blackhole);
    // Shorter than the three failed 300 ms connects that open the breaker.
    let acquire_timeout = Duration::from_millis(500);
    let pool = common::builder(&proxy.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 0,
            acquire_timeout,
            connect_timeout: Duration::from_millis(300),
            ..common::pool_settings()
        })
        .build_lazy()?;

    let started = Instant::now();
    let err = pool.get("fetch-bills").await.unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= acquire_timeout && waited < acquire_timeout + Duration::from_millis(300));
    let PoolError::Timeout(timeout) = &err else {
        panic!("expected a timeout, got {err}");
    };
    assert_eq!(timeout.phase, AcquirePhase::Connecting);
    let text = err.to_string();
    assert!(text.contains("while connecting"), "{text}");
    assert!(text.contains("fetch-bills"), "{text}");
    // The cause first (the connect that got no answer), then the checkout.
    assert!(text.contains("did not answer within 300ms"), "{text}");
    assert!(text.contains("pool: 0 open"), "{text}");
    assert_eq!(pool.status().timeouts, 1);

    // More failed attempts open the breaker; then checkouts fail at once.
    assert!(
        common::eventually(Duration::from_secs(5), || {
            futures_now(&pool);
            pool.status().circuit.as_deref() == Some("open")
        })
        .await,
        "{:?}",
        pool.status()
    );
    let started = Instant::now();
    let err = pool.get("fetch-bills").await.unwrap_err();
    let took = started.elapsed();
    assert!(err.is_circuit_open(), "{err}");
    assert!(
        took < Duration::from_millis(5),
        "the open breaker took {took:?}"
    );
    assert!(err.to_string().contains("next probe in"), "{err}");
    println!("checkout refused by the open breaker in {took:?}");
    Ok(())
}

/// Starts a checkout in the background (to keep connect attempts going).
fn futures_now(pool: &pgstack_pool::Pool) {
    let pool = pool.clone();
    tokio::spawn(async move {
        let _ = pool.get("background").await;
    });
}

#[tokio::test]
async fn a_ping_that_hangs_times_out_in_the_validating_phase() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    let pool = common::builder(&proxy.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            // The ping is bounded by the connect timeout; the acquire
            // timeout runs out first.
            acquire_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_secs(1),
            checkout_validation: CheckoutValidation::Always,
            ..common::pool_settings()
        })
        .build()
        .await?;
    proxy.set_mode(ProxyMode::Blackhole);
    let err = pool.get("ping").await.unwrap_err();
    assert_eq!(err.timeout_phase(), Some(AcquirePhase::Validating), "{err}");
    proxy.set_mode(ProxyMode::PassThrough);
    // The connection whose ping hung was closed, not returned.
    let conn = pool.get("after").await?;
    conn.query_one("SELECT 1", &[]).await?;
    assert!(pool.status().closed.broken >= 1, "{:?}", pool.status());
    Ok(())
}

#[tokio::test]
async fn refused_connections_open_the_breaker_and_the_pool_refills_when_the_node_is_back()
-> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    let pool = common::builder(&proxy.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 2,
            max_size: 4,
            ..common::pool_settings()
        })
        .build()
        .await?;
    proxy.set_mode(ProxyMode::Refuse);
    proxy.reset_all();
    assert!(
        common::eventually(Duration::from_secs(5), || {
            pool.status().circuit.as_deref() == Some("open")
        })
        .await,
        "{:?}",
        pool.status()
    );
    let err = pool.get("down").await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    assert!(pool.status().last_connect_error.is_some());

    proxy.set_mode(ProxyMode::PassThrough);
    assert!(
        common::eventually(Duration::from_secs(3), || {
            let s = pool.status();
            s.size >= 2 && s.circuit.as_deref() == Some("closed")
        })
        .await,
        "{:?}",
        pool.status()
    );
    pool.get("up").await?.query_one("SELECT 1", &[]).await?;
    Ok(())
}

#[tokio::test]
async fn idle_ping_checkouts_skip_the_round_trip_until_the_idle_threshold() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    let pool = common::builder(&proxy.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            acquire_timeout: Duration::from_millis(400),
            connect_timeout: Duration::from_secs(2),
            checkout_validation: CheckoutValidation::IdlePing,
            validation_idle_threshold: Duration::from_millis(300),
            ..common::pool_settings()
        })
        .build()
        .await?;
    // Nothing gets through the network now; a checkout that pinged would hang.
    proxy.set_mode(ProxyMode::Blackhole);
    for _ in 0..100 {
        let started = Instant::now();
        let conn = pool.get("no-ping").await?;
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "{:?}",
            started.elapsed()
        );
        drop(conn);
    }
    // Idle longer than the threshold: this checkout pings, and the ping hangs.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let err = pool.get("ping-after-idle").await.unwrap_err();
    assert_eq!(err.timeout_phase(), Some(AcquirePhase::Validating), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_shared_breaker_tripped_by_query_failures_is_not_overridden_by_the_pool()
-> anyhow::Result<()> {
    let db = pgstack_tests::TestDb::on(pgstack_tests::TestDb::shared_cluster().await?).await?;
    let settings = pgstack_config::CircuitBreakerSettings {
        minimum_calls: 2,
        window_size: 4,
        open_duration: Duration::from_secs(30),
        max_open_duration: Duration::from_secs(60),
        half_open_probes: 1,
        ..Default::default()
    };
    let breaker = pgstack_resilience::CircuitBreaker::new("shared-node", &settings)?;
    let pool = common::builder(db.url())?
        .circuit_breaker(breaker.clone())
        .build()
        .await?;
    // The connection layer records failing queries on the same breaker.
    while let Ok(permit) = breaker.acquire() {
        permit.failure();
    }
    assert_eq!(pool.status().circuit.as_deref(), Some("open"));
    let err = pool.get("refused").await.unwrap_err();
    assert!(err.is_circuit_open(), "{err}");
    // Connecting works, but the pool leaves the breaker to its open duration.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.status().circuit.as_deref(), Some("open"));

    // Until someone who watches the node asks: a probe past the breaker
    // that gets in half-opens it (its connect the one probe allowed, and a
    // success), and checkouts go through again.
    let idle = pool.status().idle;
    pool.probe().await?;
    assert_eq!(pool.status().circuit.as_deref(), Some("closed"));
    assert_eq!(
        pool.status().idle,
        idle + 1,
        "the probe's connection is kept"
    );
    pool.get("after-probe").await?;
    Ok(())
}

#[tokio::test]
async fn a_probe_of_a_node_that_is_down_says_why_and_leaves_the_breaker_open() -> anyhow::Result<()>
{
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    let pool = common::builder(&proxy.url("postgres"))?.build().await?;
    let breaker = pool
        .circuit_breaker()
        .expect("a breaker by default")
        .clone();
    proxy.set_mode(ProxyMode::Refuse);
    while let Ok(permit) = breaker.acquire() {
        permit.failure();
    }
    let err = pool.probe().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "{} closed the connection before the login finished",
            proxy.addr()
        )),
        "names the node and the cause: {text}"
    );
    assert_eq!(pool.status().circuit.as_deref(), Some("open"));
    proxy.set_mode(ProxyMode::PassThrough);
    pool.probe().await?;
    assert_ne!(pool.status().circuit.as_deref(), Some("open"));
    pool.close();
    assert!(matches!(
        pool.probe().await,
        Err(pgstack_pool::PoolError::Closed { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn a_caller_waiting_for_a_connection_is_released_when_the_breaker_opens() -> anyhow::Result<()>
{
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    proxy.set_mode(ProxyMode::Refuse);
    let pool = common::builder(&proxy.url("postgres"))?
        .pool_settings(PoolSettings {
            min_idle: 0,
            acquire_timeout: Duration::from_secs(20),
            ..common::pool_settings()
        })
        .build_lazy()?;
    let started = Instant::now();
    let err = pool.get("patient").await.unwrap_err();
    let waited = started.elapsed();
    assert!(err.is_circuit_open(), "{err}");
    assert!(waited < Duration::from_secs(5), "released after {waited:?}");
    let PoolError::CircuitOpen {
        last_connect_error, ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(
        last_connect_error.is_some(),
        "the cause travels with the rejection"
    );
    assert!(err.to_string().contains("last connect error"), "{err}");
    Ok(())
}

#[tokio::test]
async fn without_a_breaker_the_pool_still_reconnects_with_backoff() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    let pool = common::builder(&proxy.url("postgres"))?
        .without_circuit_breaker()
        .pool_settings(PoolSettings {
            min_idle: 2,
            max_size: 4,
            ..common::pool_settings()
        })
        .build()
        .await?;
    proxy.set_mode(ProxyMode::Refuse);
    proxy.reset_all();
    assert!(
        common::eventually(Duration::from_secs(3), || {
            let s = pool.status();
            s.size == 0 && s.last_connect_error.is_some()
        })
        .await,
        "{:?}",
        pool.status()
    );
    let attempts_before = proxy.stats().refused;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let attempts = proxy.stats().refused - attempts_before;
    // Backoff (50 ms doubling to 300 ms, two connections per round): a
    // handful of attempts, not a busy loop.
    assert!(
        (2..=30).contains(&attempts),
        "{attempts} attempts in 600 ms"
    );

    proxy.set_mode(ProxyMode::PassThrough);
    assert!(
        common::eventually(Duration::from_secs(2), || pool.status().size >= 2).await,
        "{:?}",
        pool.status()
    );
    pool.get("back").await?.query_one("SELECT 1", &[]).await?;
    Ok(())
}

#[tokio::test]
async fn close_releases_a_caller_waiting_for_a_new_connection() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    proxy.set_mode(ProxyMode::Blackhole);
    let pool = common::builder(&proxy.url("postgres"))?
        .without_circuit_breaker()
        .pool_settings(PoolSettings {
            min_idle: 0,
            acquire_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            ..common::pool_settings()
        })
        .build_lazy()?;
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get("waits").await.map(|_| ()) })
    };
    assert!(common::eventually(Duration::from_secs(2), || pool.status().connecting == 1).await);
    let started = Instant::now();
    pool.close();
    let result = waiting.await?;
    assert!(
        matches!(result, Err(PoolError::Closed { .. })),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    Ok(())
}
