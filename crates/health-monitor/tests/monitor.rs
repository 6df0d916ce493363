//! The monitor against real servers: a stopped server, a paused replica,
//! an exhausted pool, an open breaker, on-demand rounds and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{
    INTERVAL, PASSWORD, PROBE_TIMEOUT, Pair, config, drain_for, wait_for_alert, wait_for_report,
};
use pgstack_connection::{Cluster, Role, Route};
use pgstack_health::{
    AlertRule, AlertState, ChannelSink, Error, HealthMonitor, HealthStatus, HealthThresholds,
    ReasonKind, Severity, rules,
};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unhealthy_within_an_interval_alerts_once_and_resolves() {
    let server = TestCluster::start().await.unwrap();
    let config = config(&server.url("postgres"));
    let cluster = Cluster::connect(&config).await.unwrap();
    let (sink, mut alerts) = ChannelSink::new(64);
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .thresholds(HealthThresholds::default().with_alert_cooldown(Duration::from_secs(60)))
        .sink(sink)
        .start()
        .await
        .unwrap();
    let first = monitor.report();
    assert_eq!(first.status, HealthStatus::Healthy, "{:?}", first.reasons);
    assert_eq!(first.round, 1);
    let node = first.node("primary").unwrap();
    assert!(node.reachable);
    assert_eq!(node.observed_role, Some(Role::Primary));
    assert!(node.latency.unwrap() < PROBE_TIMEOUT);
    assert!(node.max_connections.unwrap() >= 100, "the kit runs 300");
    assert!(node.server_connections.unwrap() >= 1);

    let mut reports = monitor.subscribe();
    server.stop().await.unwrap();
    let stopped = Instant::now();
    let down = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.status == HealthStatus::Unhealthy
    })
    .await
    .expect("the stopped server is seen");
    let took = stopped.elapsed();
    // The next round starts within one interval and ends within the probe timeout.
    assert!(
        took <= INTERVAL + PROBE_TIMEOUT + Duration::from_millis(500),
        "unhealthy after {took:?}"
    );
    let node = down.node("primary").unwrap();
    assert!(!node.reachable);
    assert!(node.error.is_some());
    assert_eq!(down.reasons[0].kind, ReasonKind::NodeDown);
    assert!(
        down.recommendations[0].starts_with("primary (primary) unreachable"),
        "{:?}",
        down.recommendations
    );

    let mut seen = Vec::new();
    let fired = wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::PRIMARY_DOWN,
        AlertState::Firing,
    )
    .await
    .expect("primary-down fires");
    assert_eq!(fired.severity, Severity::Critical);
    assert_eq!(fired.node.as_deref(), Some("primary"));
    // Many rounds later, still down: no second alert within the cooldown.
    seen.extend(drain_for(&mut alerts, INTERVAL * 6).await);
    let firings = seen
        .iter()
        .filter(|a| a.rule == rules::PRIMARY_DOWN && a.state == AlertState::Firing)
        .count();
    assert_eq!(firings, 1, "{seen:#?}");
    assert!(monitor.report().round >= down.round + 4);
    assert_eq!(monitor.report().status, HealthStatus::Unhealthy);

    server.start_again().await.unwrap();
    let back = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.status == HealthStatus::Healthy
    })
    .await
    .expect("healthy again");
    assert!(back.node("primary").unwrap().reachable);
    let resolved = wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::PRIMARY_DOWN,
        AlertState::Resolved,
    )
    .await
    .expect("a resolved notice");
    assert_eq!(resolved.occurrences, 1);
    assert!(monitor.report().alerts.is_empty());
    // The history remembers the outage.
    let history = &monitor.report().history;
    assert!(
        history
            .iter()
            .any(|h| h.status == HealthStatus::Unhealthy && h.down == ["primary"])
    );

    let json = serde_json::to_string(&*down).unwrap();
    assert!(!json.contains(PASSWORD), "{json}");
    assert!(json.contains("\"status\":\"unhealthy\""), "{json}");
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replay_raises_the_lag_alert_ejects_the_replica_and_restores_it_after_catch_up() {
    let pair = Pair::start().await;
    let config = pair.config();
    let cluster = Cluster::connect(&config).await.unwrap();
    let (sink, mut alerts) = ChannelSink::new(64);
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .sink(sink)
        .start()
        .await
        .unwrap();
    let mut reports = monitor.subscribe();
    wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.status == HealthStatus::Healthy
            && r.node("replica-1")
                .is_some_and(|n| n.replica_lag == Some(Duration::ZERO))
    })
    .await
    .expect("a healthy pair, the replica caught up");
    let replica = cluster.node("replica-1").unwrap();
    assert!(!replica.is_ejected());
    assert_eq!(replica.observed_role(), Some(Role::Replica));
    assert_eq!(replica.replica_lag(), Some(Duration::ZERO));
    assert_eq!(cluster.route(Route::Read).name(), "replica-1");

    pair.replica.pause_replay().await.unwrap();
    let writer = pair.db.client().await.unwrap();
    writer
        .batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let lag = wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(15),
        rules::REPLICA_LAG_HIGH,
        AlertState::Firing,
    )
    .await
    .expect("the lag alert");
    assert_eq!(lag.node.as_deref(), Some("replica-1"));
    let ejected = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.node("replica-1").is_some_and(|n| n.ejected)
    })
    .await
    .expect("the replica is ejected");
    let node = ejected.node("replica-1").unwrap();
    assert!(node.consecutive_failures >= 2, "{node:?}");
    assert!(node.replica_lag.unwrap() > Duration::from_secs(1));
    assert!(node.replica_lag_bytes.unwrap() > 0);
    assert!(node.reachable);
    assert_eq!(ejected.status, HealthStatus::Degraded);
    assert!(
        ejected
            .reasons
            .iter()
            .any(|r| r.kind == ReasonKind::ReplicaLag)
    );
    // The router sees it: reads go to the primary.
    assert!(replica.is_ejected());
    assert!(replica.replica_lag().unwrap() > Duration::from_secs(1));
    assert_eq!(cluster.route(Route::Read).name(), "primary");

    pair.replica.resume_replay().await.unwrap();
    pair.replica.wait_for_replay().await.unwrap();
    let restored = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.node("replica-1").is_some_and(|n| !n.ejected)
    })
    .await
    .expect("the replica is restored");
    let node = restored.node("replica-1").unwrap();
    // Hysteresis: restored only after two good probes in a row.
    assert!(node.consecutive_successes >= 2, "{node:?}");
    assert!(!replica.is_ejected());
    wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::REPLICA_LAG_HIGH,
        AlertState::Resolved,
    )
    .await
    .expect("the lag alert resolves");
    wait_for_report(&mut reports, Duration::from_secs(5), |r| {
        r.status == HealthStatus::Healthy
    })
    .await
    .expect("healthy again");
    assert_eq!(cluster.route(Route::Read).name(), "replica-1");
    let ejections = seen
        .iter()
        .filter(|a| a.rule == rules::REPLICA_DOWN)
        .count();
    assert_eq!(
        ejections, 0,
        "the replica never stopped answering: {seen:#?}"
    );
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_still_gets_accurate_probes() {
    let db = TestDb::new().await.unwrap();
    let mut config = config(db.url());
    config.pool.max_size = 3;
    config.pool.acquire_timeout = Duration::from_millis(300);
    let cluster = Cluster::builder(&config)
        .shared_connections(0)
        .build()
        .await
        .unwrap();
    let (sink, mut alerts) = ChannelSink::new(64);
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .settings(pgstack_config::HealthSettings {
            interval: Duration::from_secs(3600),
            ..common::health()
        })
        .sink(sink)
        .start()
        .await
        .unwrap();
    let pool = cluster.primary().pool().clone();
    let mut sleepers = Vec::new();
    for _ in 0..3 {
        let conn = pool.get("long-query").await.unwrap();
        sleepers.push(tokio::spawn(async move {
            conn.simple_query("SELECT pg_sleep(4)").await.map(|_| ())
        }));
    }
    assert_eq!(pool.status().in_use, 3);
    let starved = pool.get("starved").await.unwrap_err();
    assert!(starved.is_timeout(), "{starved}");

    let report = monitor.check_now().await.unwrap();
    let node = report.node("primary").unwrap();
    assert!(node.reachable, "{:?}", node.error);
    assert!(
        node.latency.unwrap() < Duration::from_millis(300),
        "{node:?}"
    );
    assert_eq!(node.pool.in_use, 3);
    assert_eq!(node.pool.max_size, 3);
    assert!(node.pool.saturated_for.is_some());
    assert!(node.pool.timeouts >= 1);
    // Three sleepers and the probe itself, at least.
    assert!(node.server_connections.unwrap() >= 4, "{node:?}");
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(report.reasons.len(), 1, "{:?}", report.reasons);
    assert_eq!(report.reasons[0].kind, ReasonKind::PoolSaturated);
    assert!(report.recommendations[0].contains("raise pool.max_size or look at slow queries"));
    let mut seen = Vec::new();
    let alert = wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::POOL_SATURATED,
        AlertState::Firing,
    )
    .await
    .expect("pool-saturated fires");
    assert!(
        alert.detail.starts_with("3 of 3 connections in use"),
        "{}",
        alert.detail
    );

    for sleeper in sleepers {
        sleeper.await.unwrap().unwrap();
    }
    let report = monitor.check_now().await.unwrap();
    assert_eq!(report.status, HealthStatus::Healthy, "{:?}", report.reasons);
    assert!(report.node("primary").unwrap().latency_summary.samples >= 3);
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_answers_moves_its_open_breaker_to_half_open() {
    let db = TestDb::new().await.unwrap();
    let mut config = config(db.url());
    config.circuit_breaker.minimum_calls = 2;
    config.circuit_breaker.window_size = 2;
    config.circuit_breaker.open_duration = Duration::from_secs(600);
    config.circuit_breaker.max_open_duration = Duration::from_secs(600);
    let cluster = Cluster::connect(&config).await.unwrap();
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .settings(pgstack_config::HealthSettings {
            interval: Duration::from_secs(3600),
            ..common::health()
        })
        .start()
        .await
        .unwrap();
    let breaker = cluster.primary().circuit_breaker().unwrap();
    for _ in 0..2 {
        let _ = breaker
            .call(async { Err::<(), _>(std::io::Error::other("injected")) })
            .await;
    }
    assert!(
        !breaker.state().allows_calls(),
        "tripped: {}",
        breaker.state()
    );

    let report = monitor.check_now().await.unwrap();
    let node = report.node("primary").unwrap();
    assert!(node.breaker_probe_requested);
    assert_eq!(
        node.breaker,
        Some(pgstack_connection::BreakerState::HalfOpen)
    );
    assert!(breaker.state().allows_calls());
    // No waiting out the 10-minute open duration: a call goes through now.
    cluster
        .query("after-probe", Route::Write, "SELECT 1", &[])
        .await
        .unwrap();
    monitor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_now_subscribe_custom_rules_and_a_prompt_stop() {
    let db = TestDb::new().await.unwrap();
    let config = config(db.url());
    let cluster = Cluster::connect(&config).await.unwrap();
    let (sink, mut alerts) = ChannelSink::new(64);
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .settings(pgstack_config::HealthSettings {
            interval: Duration::from_secs(3600),
            ..common::health()
        })
        .thresholds(HealthThresholds::default().with_server_connections(0.001))
        .without_tracing_sink()
        .sink(sink)
        .rule(
            AlertRule::per_node("probed", Severity::Low, |node| {
                node.reachable.then(|| "answered".to_owned())
            })
            .message("the node was probed"),
        )
        .start()
        .await
        .unwrap();
    let mut reports = monitor.subscribe();
    let report = monitor.check_now().await.unwrap();
    assert_eq!(report.round, 2);
    assert!(reports.has_changed().unwrap());
    assert_eq!(reports.borrow_and_update().round, 2);
    // Server connections over the (tiny) limit: degraded, with an alert.
    assert_eq!(report.status, HealthStatus::Degraded);
    assert_eq!(report.reasons[0].kind, ReasonKind::ConnectionsNearMax);
    let mut got: Vec<String> = drain_for(&mut alerts, Duration::from_millis(300))
        .await
        .into_iter()
        .map(|a| a.rule)
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "probed".to_owned(),
            rules::SERVER_CONNECTIONS_NEAR_MAX.to_owned()
        ]
    );
    assert_eq!(report.alerts.len(), 2);
    assert_eq!(
        report.alerts[0].rule,
        rules::SERVER_CONNECTIONS_NEAR_MAX,
        "most severe first"
    );

    let json: serde_json::Value = serde_json::to_value(&*report).unwrap();
    assert_eq!(json["status"], "degraded");
    assert_eq!(json["nodes"][0]["name"], "primary");
    assert!(json["nodes"][0]["latency_seconds"].as_f64().unwrap() > 0.0);
    assert!(json["nodes"][0]["latency_history"]["p99_seconds"].is_number());
    assert!(!json.to_string().contains(PASSWORD));

    let stopping = Instant::now();
    monitor.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
    assert!(monitor.is_stopped());
    assert!(matches!(monitor.check_now().await, Err(Error::Stopped)));
    monitor.stop().await; // again: nothing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_refused_with_every_problem() {
    let db = TestDb::new().await.unwrap();
    let config = config(db.url());
    let cluster = Cluster::connect(&config).await.unwrap();
    let err = HealthMonitor::builder(cluster.clone(), &config)
        .settings(pgstack_config::HealthSettings {
            interval: Duration::ZERO,
            eject_after: 0,
            ..common::health()
        })
        .thresholds(HealthThresholds::default().with_pool_saturation(1.5))
        .rule(AlertRule::cluster(
            rules::PRIMARY_DOWN,
            Severity::Low,
            |_| None,
        ))
        .rule(AlertRule::cluster("quiet", Severity::Low, |_| None).cooldown(Duration::ZERO))
        .start()
        .await
        .unwrap_err();
    let Error::InvalidSettings(problems) = &err else {
        panic!("{err}");
    };
    assert_eq!(problems.len(), 5, "{problems:#?}");
    let text = err.to_string();
    assert!(text.contains("health.interval = 0s"), "{text}");
    assert!(text.contains("health.eject_after = 0"), "{text}");
    assert!(text.contains("pool_saturation = 1.5"), "{text}");
    assert!(text.contains("`primary-down` is defined twice"), "{text}");
    assert!(text.contains("`quiet`: cooldown = 0s"), "{text}");

    let mut other = config.clone();
    other
        .replicas
        .push(pgstack_config::NodeSettings::from_url(db.url()).unwrap());
    let err = HealthMonitor::start(cluster, &other).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NodeMismatch {
                configured: 2,
                cluster: 1
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_replica_is_ejected_after_failed_probes_and_restored_when_back() {
    let pair = Pair::start().await;
    let proxy = ChaosProxy::start(pair.replica.addr()).await.unwrap();
    let mut config = config(pair.db.url());
    let replica_url = proxy.url(pair.db.name()).replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{PASSWORD}@"),
        1,
    );
    config
        .replicas
        .push(pgstack_config::NodeSettings::from_url(&replica_url).unwrap());
    let cluster = Cluster::connect(&config).await.unwrap();
    let (sink, mut alerts) = ChannelSink::new(64);
    let monitor = HealthMonitor::builder(cluster.clone(), &config)
        .sink(sink)
        .start()
        .await
        .unwrap();
    assert_eq!(
        monitor.report().status,
        HealthStatus::Healthy,
        "{:?}",
        monitor.report().reasons
    );
    let mut reports = monitor.subscribe();

    // Packets vanish: probes run into the probe timeout.
    proxy.set_mode(ProxyMode::Blackhole);
    let first_failure = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.node("replica-1").is_some_and(|n| !n.reachable)
    })
    .await
    .expect("the probe fails");
    let node = first_failure.node("replica-1").unwrap();
    // The query or the reconnect ran into the probe timeout.
    let error = node.error.as_deref().unwrap();
    assert!(error.contains(&format!("{PROBE_TIMEOUT:?}")), "{error}");
    assert!(!node.ejected, "one failed probe is not enough");
    assert_eq!(first_failure.status, HealthStatus::Degraded);
    let ejected = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.node("replica-1").is_some_and(|n| n.ejected)
    })
    .await
    .expect("ejected");
    assert_eq!(ejected.node("replica-1").unwrap().consecutive_failures, 2);
    assert!(cluster.node("replica-1").unwrap().is_ejected());
    assert_eq!(cluster.route(Route::Read).name(), "primary");
    let mut seen = Vec::new();
    wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::REPLICA_DOWN,
        AlertState::Firing,
    )
    .await
    .expect("replica-down fires");

    proxy.set_mode(ProxyMode::PassThrough);
    let restored = wait_for_report(&mut reports, Duration::from_secs(10), |r| {
        r.node("replica-1").is_some_and(|n| !n.ejected)
    })
    .await
    .expect("restored");
    let node = restored.node("replica-1").unwrap();
    assert!(node.reachable);
    assert_eq!(
        node.consecutive_successes, 2,
        "restored after exactly two good probes"
    );
    assert!(!cluster.node("replica-1").unwrap().is_ejected());
    wait_for_alert(
        &mut alerts,
        &mut seen,
        Duration::from_secs(5),
        rules::REPLICA_DOWN,
        AlertState::Resolved,
    )
    .await
    .expect("replica-down resolves");
    let json = serde_json::to_string(&*first_failure).unwrap();
    assert!(!json.contains(PASSWORD), "{json}");
    monitor.stop().await;
}
