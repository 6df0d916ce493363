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

    // A call whose statement is running when its server process is
    // terminated fails (at once: its deadline allows no retry), and the node
    // is probed in the background on an idle connection of the pool, whose
    // role check by then takes 400 ms each way. (Terminating a connection
    // between calls would not do: the client may notice the close first and
    // the next call take a fresh connection, which is correct behaviour.)
    let marker = "SELECT pg_sleep(30), 'close-test-victim'";
    let call = {
        let cluster = cluster.clone();
        let impatient = Op::from("fails").retry_deadline(Duration::from_millis(1));
        tokio::spawn(async move { cluster.query_one(impatient, Route::Read, marker, &[]).await })
    };
    let admin = db.client().await.unwrap();
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE datname = current_database() AND query = $1 AND state = 'active'";
    let waited = tokio::time::Instant::now();
    loop {
        let count: i64 = admin.query_one(running, &[&marker]).await.unwrap().get(0);
        if count == 1 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the statement never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cluster.primary().pool().status().idle >= 1);
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(400)));
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query = $1",
            &[&marker],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    let failed = call.await.unwrap();
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
