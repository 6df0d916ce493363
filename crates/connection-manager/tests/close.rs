//! `Cluster::close` counts no connection as still in use that the cluster's
//! own background work holds: the probe of a node that failed a call is in
//! the middle of its role check when the close comes (a round trip made slow
//! by a proxy, so the window is wide instead of a few milliseconds under
//! load, where CI once saw it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use pgstack_connection::{Cluster, Op, Route};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_the_probe_of_a_failed_node_and_counts_nothing_in_use() {
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    let proxy = ChaosProxy::start(server.addr()).await.unwrap();
    let mut config = common::config(&proxy.url(db.name()));
    config.pool.min_idle = 2;
    let cluster = Cluster::connect(&config).await.unwrap();
    // The statement opens a shared connection; the others stay idle.
    let marker = "SELECT 'close-test-lane'";
    for _ in 0..3 {
        cluster
            .query_one("warm", Route::Read, marker, &[])
            .await
            .unwrap();
    }
    assert!(cluster.primary().pool().status().idle >= 1);

    // The shared connection's server process goes away; a call on it fails
    // (at once: its deadline allows no retry) and the node is probed in the
    // background, on an idle connection of the pool, whose role check now
    // takes 400 ms each way.
    let admin = db.client().await.unwrap();
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = $1",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed >= 1, "the shared connection ran the marker");
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(400)));
    let impatient = Op::from("fails").retry_deadline(Duration::from_millis(1));
    let failed = cluster.query_one(impatient, Route::Read, marker, &[]).await;
    assert!(failed.is_err(), "{failed:?}");
    assert!(cluster.primary().is_suspect(), "a probe runs");
    // Its first round starts 25 ms after the failure and holds a connection
    // for at least one slow round trip.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(cluster.primary().is_suspect(), "the probe is still at it");
    assert_eq!(cluster.in_flight(), 0, "no call in flight");
    let report = cluster.close(Duration::from_secs(10)).await;
    assert_eq!(report.cut_off, 0);
    assert_eq!(
        report.connections_in_use, 0,
        "the probe's connection was counted as in use: {report:?}"
    );
}
