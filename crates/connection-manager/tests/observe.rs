//! `observe` against real servers: a primary, a streaming replica and a
//! read-only server each read the one way, and the cluster's replication
//! probe keeps a read-only server a replica.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Pair;
use pgstack_config::NodeSettings;
use pgstack_connection::{Cluster, Role, Route, observe, observe_replica};
use pgstack_tests::{TestCluster, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_tells_a_primary_a_replica_and_a_read_only_session_apart() {
    let pair = Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();

    let conn = cluster.primary().pool().get("test-observe").await.unwrap();
    let primary = observe(&conn).await.unwrap();
    assert_eq!(primary.role(), Role::Primary);
    assert!(primary.accepts_writes());
    assert!(!primary.in_recovery && !primary.read_only);
    assert!(primary.wal_position.is_some());
    assert_eq!(primary.replay_position, None);
    assert_eq!(primary.lag(primary.wal_position).time, None);
    drop(conn);

    pair.replica.wait_for_replay().await.unwrap();
    let replica_node = cluster.node("replica-1").unwrap();
    let conn = replica_node.pool().get("test-observe").await.unwrap();
    let replica = observe_replica(&conn, primary.wal_position).await.unwrap();
    assert_eq!(replica.role(), Role::Replica);
    assert!(replica.in_recovery);
    assert_eq!(replica.wal_position, None);
    assert!(replica.replay_position.is_some());
    let lag = replica.lag(primary.wal_position);
    assert!(lag.bytes.is_some(), "{lag:?}");
    assert!(
        lag.time.is_some_and(|t| t < Duration::from_secs(60)),
        "{lag:?}"
    );
    drop(conn);

    // A session of the primary made read-only: a replica.
    // (The pool resets the session before anyone else gets it.)
    let conn = cluster.primary().pool().get("test-observe").await.unwrap();
    conn.simple_query("SET default_transaction_read_only = on")
        .await
        .unwrap();
    let read_only = observe(&conn).await.unwrap();
    assert!(!read_only.in_recovery && read_only.read_only);
    assert_eq!(read_only.role(), Role::Replica);
    assert!(!read_only.accepts_writes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_configured_as_a_replica_stays_a_replica_for_routing() {
    // Two databases of one server: the second one read-only, configured as
    // the replica. It is not in recovery, and must not count as a primary.
    let server = TestCluster::start().await.unwrap();
    let writable = TestDb::on(&server).await.unwrap();
    let read_only = TestDb::on(&server).await.unwrap();
    let admin = server.client("postgres").await.unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
            read_only.name()
        ))
        .await
        .unwrap();
    let mut config = common::config(writable.url());
    config
        .replicas
        .push(NodeSettings::from_url(read_only.url()).unwrap());
    let cluster = Cluster::connect(&config).await.unwrap();
    let replica = cluster.node("replica-1").unwrap();
    assert_eq!(replica.observed_role(), Some(Role::Replica));
    assert_eq!(cluster.route(Route::Read).name(), "replica-1");

    cluster.refresh_replication().await;
    assert_eq!(replica.observed_role(), Some(Role::Replica));
    assert_eq!(replica.replica_lag(), None);
    assert_eq!(cluster.route(Route::Read).name(), "replica-1");
    let read_only_here: String = cluster
        .query_one("check", Route::Read, "SHOW transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(read_only_here, "on");
}
