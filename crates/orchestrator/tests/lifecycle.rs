#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The orchestrator against real servers: start with migrations, waiting for
//! the database, failing fast, status with a stopped replica and with a
//! read-only primary, shutdown with queries in flight.

use pgstack_connection::Queryable as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgstack_config::{DatabaseConfig, NodeSettings, Password};
use pgstack_connection::{Error, Role, Route};
use pgstack_orchestrator::{
    LifecycleState, NodeHealth, Orchestrator, StartError, StartEvent, StartOptions,
};
use pgstack_tests::{TestCluster, TestDb};
use tokio::time::Instant;

const PASSWORD: &str = "orchestrator-s3cret";

fn reference_migrations() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations")
}

fn config(url: &str) -> DatabaseConfig {
    let mut config = DatabaseConfig::for_tests(url).unwrap();
    config.migrations.dir = reference_migrations();
    config.migrations.auto_migrate = false;
    config.features.health_monitoring = false;
    config.pool.connect_timeout = Duration::from_secs(2);
    config.pool.acquire_timeout = Duration::from_secs(3);
    config
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `pg_stat_activity` (from a client of its own) until no session
/// whose name starts with `application_name` (the instance's calls, health
/// probes, shutdown connections) is left, for up to 2 s; the sessions left.
async fn sessions_named(client: &tokio_postgres::Client, application_name: &str) -> i64 {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        let left: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE starts_with(application_name, $1)",
                &[&application_name],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 || Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "migrations")]
#[tokio::test]
async fn start_with_auto_migrate_applies_the_reference_schema() {
    init_tracing();
    let db = TestDb::new().await.unwrap();
    let mut config = config(db.url());
    config.migrations.auto_migrate = true;
    config.primary.password = Some(Password::new(PASSWORD));

    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let orchestrator = Orchestrator::builder(config)
        .on_event(move |e| seen.lock().unwrap().push(e.clone()))
        .start()
        .await
        .unwrap();

    let status = orchestrator.status().await;
    assert_eq!(status.state, LifecycleState::Ready);
    assert_eq!(status.migrations.applied, vec![1, 2, 3, 4, 5]);
    assert!(status.migrations.pending.is_empty());
    assert_eq!(status.migrations.applied_at_start, vec![1, 2, 3, 4, 5]);
    assert_eq!(status.migrations.current_version, Some(5));
    let events = events.lock().unwrap().clone();
    assert!(events.contains(&StartEvent::Migrated {
        applied: vec![1, 2, 3, 4, 5]
    }));
    assert!(matches!(events.last(), Some(StartEvent::Ready { .. })));

    // The schema is there, through the cluster.
    let tables: i64 = orchestrator
        .cluster()
        .query_one(
            "count-tables",
            Route::Read,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' \
             AND tablename IN ('users', 'sponsors', 'bills', 'bill_sponsors')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 4);

    // Sessions carry the instance's tagged application_name.
    let name: String = orchestrator
        .cluster()
        .query_one(
            "app-name",
            Route::Write,
            "SELECT current_setting('application_name')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, orchestrator.application_name());
    assert!(name.starts_with("pgstack#"), "{name}");

    // The status serializes, without the password.
    let json = serde_json::to_string(&status).unwrap();
    assert!(json.contains("\"state\":\"ready\""), "{json}");
    assert!(!json.contains(PASSWORD), "{json}");
    let metrics = serde_json::to_string(&orchestrator.metrics()).unwrap();
    assert!(!metrics.contains(PASSWORD));
    assert!(!format!("{orchestrator:?}").contains(PASSWORD));

    // A second start finds nothing to apply.
    let mut again = self::config(db.url());
    again.migrations.auto_migrate = true;
    let second = Orchestrator::start(again, StartOptions::new())
        .await
        .unwrap();
    let status = second.status().await;
    assert!(status.migrations.applied_at_start.is_empty());
    assert_eq!(status.migrations.applied.len(), 5);
    second.shutdown(Duration::from_secs(1)).await;

    let report = orchestrator.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.cut_off, 0);
    assert!(report.drained, "{report:?}");
    assert_eq!(orchestrator.state(), LifecycleState::Stopped);
}

#[tokio::test]
async fn start_waits_for_a_database_that_comes_up() {
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    cluster.stop().await.unwrap();

    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&events);
    let builder = Orchestrator::builder(config(&cluster.url("postgres")))
        .wait_for_database(Duration::from_secs(30))
        .on_event(move |e| seen.lock().unwrap().push(e.clone()));
    let started = Instant::now();
    let start = tokio::spawn(builder.start());

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!start.is_finished(), "the start must wait for the database");
    cluster.start_again().await.unwrap();

    let orchestrator = start.await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_secs(1), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    assert_eq!(orchestrator.state(), LifecycleState::Ready);
    assert!(orchestrator.metrics().connect_attempts > 1);
    let waits = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, StartEvent::WaitingForDatabase { .. }))
        .count();
    assert!(waits >= 1, "progress is reported while waiting");

    let one: i32 = orchestrator
        .cluster()
        .query_one("one", Route::Read, "SELECT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    orchestrator.shutdown(Duration::from_secs(1)).await;
}

/// A pause longer than what is left of the wait must not end it early: the
/// last pause is cut to the limit and one more attempt is made there.
#[tokio::test]
async fn a_database_that_comes_up_within_the_wait_is_found_when_the_pause_is_longer() {
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    cluster.stop().await.unwrap();
    let mut config = config(&cluster.url("postgres"));
    // Every pause is 2 s, longer than the whole wait.
    config.retry.initial_backoff = Duration::from_secs(2);
    config.retry.max_backoff = Duration::from_secs(2);
    config.retry.jitter = pgstack_config::Jitter::None;
    let started = Instant::now();
    let start = tokio::spawn(Orchestrator::start(
        config,
        StartOptions::new().wait_for_database(Duration::from_millis(1500)),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!start.is_finished(), "the start must wait for the database");
    cluster.start_again().await.unwrap();

    let orchestrator = start.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(orchestrator.metrics().connect_attempts, 2);
    orchestrator.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn start_fails_fast_without_a_wait_and_gives_up_after_one() {
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    cluster.stop().await.unwrap();
    let url = cluster.url("postgres");

    let mut with_password = config(&url);
    with_password.primary.password = Some(Password::new(PASSWORD));
    let started = Instant::now();
    let error = Orchestrator::start(with_password, StartOptions::new())
        .await
        .unwrap_err();
    assert!(
        !format!("{error} {error:?}").contains(PASSWORD),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, StartError::Unreachable { .. }), "{error:?}");
    let message = error.to_string();
    // The cause first (a stopped server: nothing listens), then the fixes.
    assert!(message.starts_with("nothing listens on"), "{message}");
    assert!(message.contains("wait for the database"), "{message}");

    let started = Instant::now();
    let error = Orchestrator::start(
        config(&url),
        StartOptions::new().wait_for_database(Duration::from_millis(1500)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, StartError::WaitTimedOut { attempts, .. } if attempts > 1),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(error.to_string().contains("did not become reachable"));
}

#[tokio::test]
async fn the_configured_wait_applies_unless_the_code_asks_to_fail_fast() {
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    cluster.stop().await.unwrap();
    let mut waiting = config(&cluster.url("postgres"));
    waiting.startup.wait_for_database = Some(Duration::from_millis(1500));

    // `startup.wait_for_database` alone makes the start wait, then give up.
    let started = Instant::now();
    let error = Orchestrator::start(waiting.clone(), StartOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(error, StartError::WaitTimedOut { attempts, .. } if attempts > 1),
        "{error:?}"
    );
    // It tried for the whole wait, whatever pauses the jitter drew: it
    // gives up only once the limit has passed.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    // `fail_fast()` in code wins over the configuration.
    let started = Instant::now();
    let error = Orchestrator::start(waiting, StartOptions::new().fail_fast())
        .await
        .unwrap_err();
    assert!(matches!(error, StartError::Unreachable { .. }), "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_before_connecting() {
    let mut config = config("postgres://app@127.0.0.1:1/app");
    config.pool.max_size = 0;
    config.pool.min_idle = 0;
    config.retry.multiplier = 0.1;
    let error = Orchestrator::start(config, StartOptions::new())
        .await
        .unwrap_err();
    let StartError::Config(config_error) = &error else {
        panic!("{error:?}");
    };
    assert_eq!(config_error.problems().len(), 2, "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with("invalid configuration (2 problems)"),
        "{message}"
    );
    assert_eq!(
        message.matches("invalid configuration").count(),
        1,
        "{message}"
    );
}

async fn stopped_replica(monitor: bool) {
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    let replica = cluster.replica().await.unwrap();
    let mut config = config(&cluster.url("postgres"));
    config
        .replicas
        .push(NodeSettings::from_url(&replica.url("postgres")).unwrap());
    config.health.probe_timeout = Duration::from_secs(1);
    config.health.interval = Duration::from_secs(1);
    config.features.health_monitoring = monitor;
    let orchestrator = Orchestrator::start(config, StartOptions::new())
        .await
        .unwrap();
    #[cfg(feature = "health")]
    assert_eq!(orchestrator.health_monitor().is_some(), monitor);

    let status = orchestrator.status().await;
    assert_eq!(status.state, LifecycleState::Ready, "{status:?}");
    assert_eq!(status.nodes.len(), 2);
    #[cfg(feature = "health")]
    assert_eq!(status.monitor.is_some(), monitor);
    assert!(
        status.role_warnings.is_empty(),
        "{:?}",
        status.role_warnings
    );
    let node = status.node("replica-1").unwrap();
    assert_eq!(node.health, NodeHealth::Healthy);
    assert!(node.routable);

    replica.stop().await.unwrap();
    // The monitor sees it on its next round; without one, status() probes.
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = orchestrator.status().await;
        if status.state != LifecycleState::Ready {
            break status;
        }
        assert!(
            monitor,
            "without a monitor, status() probes the nodes itself"
        );
        assert!(Instant::now() < until, "still {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.state, LifecycleState::Degraded, "{status:?}");
    assert_eq!(status.health(), NodeHealth::Degraded);
    let node = status.node("replica-1").unwrap();
    assert_eq!(node.health, NodeHealth::Unhealthy, "{node:?}");
    assert!(node.problem.is_some());
    assert_eq!(status.node("primary").unwrap().health, NodeHealth::Healthy);
    let json = serde_json::to_value(&status).unwrap();
    assert_eq!(json["state"], "degraded");
    assert_eq!(json["nodes"][1]["health"], "unhealthy");

    // Reads still work: they go to the primary.
    for _ in 0..4 {
        orchestrator
            .cluster()
            .query("read", Route::Read, "SELECT 1", &[])
            .await
            .unwrap();
    }

    replica.start_again().await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let status = orchestrator.status().await;
        if status.state == LifecycleState::Ready {
            break;
        }
        assert!(Instant::now() < until, "still {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = orchestrator.shutdown(Duration::from_secs(1)).await;
    assert!(report.drained, "{report:?}");
    #[cfg(feature = "health")]
    if let Some(monitor) = orchestrator.health_monitor() {
        assert!(monitor.is_stopped());
    }
}

#[cfg(feature = "health")]
#[tokio::test]
async fn status_reflects_a_stopped_replica_through_the_health_monitor() {
    stopped_replica(true).await;
}

#[tokio::test]
async fn status_reflects_a_stopped_replica_by_probing_without_a_monitor() {
    stopped_replica(false).await;
}

/// A primary made read-only (`default_transaction_read_only = on`): the
/// cluster's discovery, the health monitor when it runs, and `status()` all
/// read it as a replica, and `status()` leaves the cluster's reading alone.
async fn read_only_primary(monitor: bool) {
    init_tracing();
    let server = TestCluster::start().await.unwrap();
    let mut config = config(&server.url("postgres"));
    config.health.probe_timeout = Duration::from_secs(1);
    config.health.interval = Duration::from_secs(1);
    config.features.health_monitoring = monitor;
    let orchestrator = Orchestrator::start(config, StartOptions::new())
        .await
        .unwrap();
    let cluster = orchestrator.cluster();
    let status = orchestrator.status().await;
    assert_eq!(status.state, LifecycleState::Ready, "{status:?}");
    let node = status.node("primary").unwrap();
    assert_eq!(node.observed_role, Some(Role::Primary), "{node:?}");
    assert_eq!(node.health, NodeHealth::Healthy, "{node:?}");

    let admin = server.client("postgres").await.unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();

    // The cluster: re-discovery finds no writable node (a round shared with
    // one the monitor started may end first; the next one is ours), and
    // writes fail.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match cluster.rediscover().await {
            Err(Error::NoPrimary { .. }) => break,
            other => assert!(Instant::now() < until, "still {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cluster.primary().observed_role(), Some(Role::Replica));
    assert!(
        cluster
            .execute("write", Route::Write, "CREATE TABLE t (id int)", &[])
            .await
            .is_err()
    );

    // status(): the same reading, from the monitor's next round or its own
    // probe.
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = orchestrator.status().await;
        let node = status.node("primary").unwrap();
        if node.observed_role == Some(Role::Replica) && node.health != NodeHealth::Healthy {
            break status;
        }
        assert!(monitor, "status() probes the node itself: {status:?}");
        assert!(Instant::now() < until, "still {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node = status.node("primary").unwrap();
    assert_eq!(node.health, NodeHealth::Degraded, "{node:?}");
    assert!(
        node.problem
            .as_deref()
            .is_some_and(|p| p.contains("read-only")),
        "{node:?}"
    );
    assert_eq!(status.state, LifecycleState::Degraded, "{status:?}");
    // Asking did not turn it back into a primary for routing.
    assert_eq!(cluster.primary().observed_role(), Some(Role::Replica));
    #[cfg(feature = "health")]
    if monitor {
        let report = orchestrator.health_report().unwrap();
        let seen = report.node("primary").unwrap();
        assert_eq!(seen.observed_role, Some(Role::Replica), "{seen:?}");
        assert!(
            seen.reasons
                .iter()
                .any(|r| r.kind == pgstack_health::ReasonKind::RoleMismatch),
            "{seen:?}"
        );
    }
    orchestrator.shutdown(Duration::from_secs(1)).await;
}

#[cfg(feature = "health")]
#[tokio::test]
async fn a_read_only_primary_is_a_replica_in_routing_the_health_report_and_status() {
    read_only_primary(true).await;
}

#[tokio::test]
async fn a_read_only_primary_is_a_replica_in_routing_and_in_status_without_a_monitor() {
    read_only_primary(false).await;
}

#[tokio::test]
async fn shutdown_lets_short_calls_finish_and_cancels_the_rest_on_the_server() {
    init_tracing();
    let db = TestDb::new().await.unwrap();
    let observer = db.client().await.unwrap();
    let mut config = config(db.url());
    config.pool.max_size = 12;
    config.pool.min_idle = 1;
    // The monitor's probe sessions must be gone too.
    config.features.health_monitoring = true;
    config.health.interval = Duration::from_secs(1);
    config.health.probe_timeout = Duration::from_secs(1);
    // Every statement on a connection of its own: no statement waits behind
    // another on a shared one.
    let orchestrator = Orchestrator::start(config, StartOptions::new().shared_connections(0))
        .await
        .unwrap();
    let name = orchestrator.application_name().to_owned();
    let cluster = orchestrator.cluster().clone();

    let mut short = Vec::new();
    for i in 0..3 {
        let cluster = cluster.clone();
        short.push(tokio::spawn(async move {
            cluster
                .query(
                    format!("short-{i}"),
                    Route::Read,
                    "SELECT pg_sleep(0.4)",
                    &[],
                )
                .await
        }));
    }
    let mut long = Vec::new();
    for i in 0..2 {
        let cluster = cluster.clone();
        long.push(tokio::spawn(async move {
            cluster
                .query(
                    format!("long-{i}"),
                    Route::Write,
                    "SELECT pg_sleep(20)",
                    &[],
                )
                .await
                .map(|_| ())
        }));
    }
    {
        let cluster = cluster.clone();
        long.push(tokio::spawn(async move {
            cluster
                .transaction("long-transaction", async move |tx| {
                    tx.execute("SELECT pg_sleep(20)", &[]).await?;
                    Ok(())
                })
                .await
        }));
    }
    // Everything is running on the server.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let active: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND query LIKE 'SELECT pg_sleep%' AND state = 'active'",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        if active == 6 {
            break;
        }
        assert!(Instant::now() < until, "only {active} running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let shutdown = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move { orchestrator.shutdown(Duration::from_secs(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(orchestrator.state(), LifecycleState::ShuttingDown);
    let refused = cluster
        .query("late", Route::Read, "SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::ShuttingDown { .. }), "{refused:?}");

    let report = shutdown.await.unwrap();
    let elapsed = started.elapsed();
    for call in short {
        call.await.unwrap().unwrap();
    }
    for call in long {
        let error = call.await.unwrap().unwrap_err();
        assert!(
            error.code() == Some("57014") || error.code() == Some("57P01"),
            "a long call ends cancelled: {error:?}"
        );
    }
    assert_eq!(report.in_flight_at_start, 6, "{report:?}");
    assert_eq!(report.completed, 3, "{report:?}");
    assert_eq!(report.cut_off, 3, "{report:?}");
    assert_eq!(report.cancelled(), 3, "{report:?}");
    assert_eq!(report.terminated(), 0, "{report:?}");
    assert!(report.drained, "{report:?}");
    assert!(report.problems.is_empty(), "{report:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(orchestrator.state(), LifecycleState::Stopped);

    // No session of ours is left on the server.
    assert_eq!(sessions_named(&observer, &name).await, 0);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["cut_off"], 3);

    // A second shutdown gives the same report at once; calls stay refused.
    let again = orchestrator.shutdown(Duration::from_secs(5)).await;
    assert_eq!(again.cut_off, 3);
    let refused = cluster
        .query("later", Route::Read, "SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::ShuttingDown { .. }), "{refused:?}");
    assert_eq!(orchestrator.status().await.state, LifecycleState::Stopped);
}

#[tokio::test]
async fn a_session_stuck_in_a_transaction_is_terminated() {
    init_tracing();
    let db = TestDb::new().await.unwrap();
    let observer = db.client().await.unwrap();
    let orchestrator = Orchestrator::start(config(db.url()), StartOptions::new())
        .await
        .unwrap();
    let name = orchestrator.application_name().to_owned();
    let cluster = orchestrator.cluster().clone();
    let (held, hold) = tokio::sync::oneshot::channel::<()>();
    let stuck = tokio::spawn(async move {
        let mut hold = Some(hold);
        cluster
            .transaction("stuck", async move |tx| {
                tx.execute("SELECT 1", &[]).await?;
                // Idle in transaction, waiting on something outside the database.
                if let Some(hold) = hold.take() {
                    let _ = hold.await;
                }
                tx.execute("SELECT 1", &[]).await?;
                Ok(())
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let report = orchestrator.shutdown(Duration::from_millis(300)).await;
    assert_eq!(report.cut_off, 1, "{report:?}");
    assert_eq!(report.terminated(), 1, "{report:?}");
    assert_eq!(sessions_named(&observer, &name).await, 0);
    drop(held);
    let error = stuck.await.unwrap().unwrap_err();
    assert!(!matches!(error, Error::Aborted(_)), "{error:?}");
}

#[tokio::test]
async fn shutdown_finishes_when_the_server_stops_answering() {
    use pgstack_tests::{ChaosProxy, ProxyMode};
    init_tracing();
    let cluster = TestCluster::start().await.unwrap();
    let proxy = ChaosProxy::start(cluster.addr()).await.unwrap();
    let orchestrator = Orchestrator::start(
        config(&proxy.url("postgres")),
        StartOptions::new().shared_connections(0),
    )
    .await
    .unwrap();
    let cluster_handle = orchestrator.cluster().clone();
    let stuck = tokio::spawn(async move {
        cluster_handle
            .query("stuck", Route::Read, "SELECT pg_sleep(20)", &[])
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nothing gets through any more, new connections included.
    proxy.set_mode(ProxyMode::Blackhole);

    let started = Instant::now();
    let report = orchestrator.shutdown(Duration::from_millis(300)).await;
    let elapsed = started.elapsed();
    // The deadline and one cancel round bounded by the grace; a node that
    // could not be reached to cancel is not tried again.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(report.cut_off, 1, "{report:?}");
    assert!(!report.drained, "{report:?}");
    assert!(
        report.problems.iter().any(|p| p.contains("cancel")),
        "{report:?}"
    );
    assert_eq!(orchestrator.state(), LifecycleState::Stopped);

    // The call itself waits on the stalled network (its own time limit is
    // `statement_timeout + connect_timeout`); the shutdown did not.
    assert!(!stuck.is_finished());
    stuck.abort();
}
