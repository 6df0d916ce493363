//! Routing against a real primary and a streaming replica: reads and writes,
//! a stopped replica, lag, read-your-writes, and a changed primary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Pair, eventually};
use pgstack_connection::Queryable as _;
use pgstack_connection::{Cluster, Error, Role, Route, TransactionOptions};

async fn in_recovery(cluster: &Cluster, route: Route) -> Result<bool, Error> {
    let row = cluster
        .query_one("where-am-i", route, "SELECT pg_is_in_recovery()", &[])
        .await?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_writes_to_the_primary() {
    let pair = Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();
    assert_eq!(cluster.primary().name(), "primary");
    assert_eq!(cluster.nodes().len(), 2);
    let replica = cluster.node("replica-1").unwrap();
    assert_eq!(replica.configured_role(), Role::Replica);
    assert_eq!(replica.observed_role(), Some(Role::Replica));
    assert_eq!(cluster.primary().observed_role(), Some(Role::Primary));

    for _ in 0..20 {
        assert!(in_recovery(&cluster, Route::Read).await.unwrap());
        assert!(!in_recovery(&cluster, Route::Write).await.unwrap());
    }

    // A read-write transaction goes to the primary, a read-only one may go
    // to the replica; closures follow their route too.
    let rw = cluster
        .transaction("rw", async |tx| {
            let row = tx.query_one("SELECT pg_is_in_recovery()", &[]).await?;
            Ok::<_, pgstack_connection::Error>(row.get::<_, bool>(0))
        })
        .await
        .unwrap();
    assert!(!rw);
    let ro = cluster
        .transaction_with(
            "ro",
            TransactionOptions::new().read_only(true),
            async |tx| {
                let row = tx.query_one("SELECT pg_is_in_recovery()", &[]).await?;
                Ok::<_, pgstack_connection::Error>(row.get::<_, bool>(0))
            },
        )
        .await
        .unwrap();
    assert!(ro);
    let read: bool = cluster
        .read("closure-read", async |conn| {
            Ok(conn
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .get(0))
        })
        .await
        .unwrap();
    assert!(read);
    let write: bool = cluster
        .write("closure-write", async |conn| {
            Ok(conn
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .get(0))
        })
        .await
        .unwrap();
    assert!(!write);

    // The monitor's inputs: an ejected replica gets no reads.
    replica.eject();
    assert!(!in_recovery(&cluster, Route::Read).await.unwrap());
    replica.restore();
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());
    // A replica reported too far behind neither.
    replica.set_replica_lag(Some(Duration::from_secs(5)));
    assert!(!in_recovery(&cluster, Route::Read).await.unwrap());
    replica.set_replica_lag(Some(Duration::from_millis(10)));
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());

    // Without read_replicas every read goes to the primary.
    let mut config = pair.config();
    config.features.read_replicas = false;
    let primary_only = Cluster::connect(&config).await.unwrap();
    assert!(!in_recovery(&primary_only, Route::Read).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_costs_at_most_one_failed_read_per_caller_and_comes_back() {
    let pair = Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let replica_stopped = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let cluster = cluster.clone();
        let stop = Arc::clone(&stop);
        let replica_stopped = Arc::clone(&replica_stopped);
        callers.push(tokio::spawn(async move {
            let (mut failed, mut on_replica_after_stop, mut reads) = (0u32, 0u32, 0u32);
            while !stop.load(Ordering::Acquire) {
                let stopped = replica_stopped.load(Ordering::Acquire);
                match in_recovery(&cluster, Route::Read).await {
                    Ok(true) if stopped => on_replica_after_stop += 1,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("read failed: {e}");
                        failed += 1;
                    }
                }
                reads += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (failed, on_replica_after_stop, reads)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pair.replica.stop().await.unwrap();
    replica_stopped.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Release);
    for caller in callers {
        let (failed, on_replica, reads) = caller.await.unwrap();
        assert!(failed <= 1, "a caller saw {failed} failed reads of {reads}");
        assert_eq!(on_replica, 0, "no read can land on a stopped replica");
        assert!(reads > 10, "the caller kept reading ({reads})");
    }
    // Reads fall back to the primary while the replica is down.
    for _ in 0..10 {
        assert!(!in_recovery(&cluster, Route::Read).await.unwrap());
    }
    assert!(cluster.node("replica-1").unwrap().is_suspect());

    // Back: reads return to it once the background probe sees it answer.
    pair.replica.start_again().await.unwrap();
    let back = eventually(Duration::from_secs(15), || async {
        matches!(in_recovery(&cluster, Route::Read).await, Ok(true))
    })
    .await;
    assert!(back, "reads did not return to the restarted replica");
    let metrics = cluster.metrics();
    let replica = metrics
        .nodes
        .iter()
        .find(|n| n.name == "replica-1")
        .unwrap();
    assert!(replica.routable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_gets_no_reads_and_read_your_writes_never_reads_stale_data() {
    let pair = Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();
    cluster
        .execute(
            "create",
            Route::Write,
            "CREATE TABLE notes (id bigint PRIMARY KEY, body text)",
            &[],
        )
        .await
        .unwrap();
    pair.replica.wait_for_replay().await.unwrap();
    cluster.refresh_replication().await;
    let replica = cluster.node("replica-1").unwrap();
    assert_eq!(replica.replica_lag(), Some(Duration::ZERO));
    assert_eq!(replica.replica_lag_bytes(), Some(0));
    assert!(replica.replay_position().is_some());
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());

    // Replay paused, a write made, the lag limit (1 s) passed: no reads.
    pair.replica.pause_replay().await.unwrap();
    let (_, position) = cluster
        .execute_tracked(
            "add-note",
            "INSERT INTO notes VALUES ($1, $2)",
            &[&1_i64, &"first"],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.refresh_replication().await;
    assert!(replica.replica_lag().unwrap() > Duration::from_secs(1));
    assert!(replica.replica_lag_bytes().unwrap() > 0);
    for _ in 0..10 {
        assert!(!in_recovery(&cluster, Route::Read).await.unwrap());
    }
    // Read your writes: the replica has not replayed the write, so the
    // primary answers, with the row.
    let row = cluster
        .query_opt(
            "show-note",
            Route::ReadAfter(position),
            "SELECT body, pg_is_in_recovery() FROM notes WHERE id = $1",
            &[&1_i64],
        )
        .await
        .unwrap()
        .expect("the write is visible");
    assert_eq!(row.get::<_, &str>(0), "first");
    assert!(!row.get::<_, bool>(1));

    // Caught up: reads return, and read-your-writes may use the replica.
    pair.replica.resume_replay().await.unwrap();
    pair.replica.wait_for_replay().await.unwrap();
    cluster.refresh_replication().await;
    assert_eq!(replica.replica_lag(), Some(Duration::ZERO));
    assert!(replica.replay_position().unwrap() >= position);
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());
    let row = cluster
        .query_one(
            "show-note",
            Route::ReadAfter(position),
            "SELECT body, pg_is_in_recovery() FROM notes WHERE id = $1",
            &[&1_i64],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "first");
    assert!(row.get::<_, bool>(1), "a caught-up replica serves the read");

    // Under churn (replay paused and resumed, the probe running), a read
    // given a write's position always sees that write.
    let probing = Cluster::builder(&pair.config())
        .replication_probe(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    let churn_stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = Arc::clone(&churn_stop);
        let replica = pair.replica.url("postgres");
        tokio::spawn(async move {
            let client = pgstack_tests::connect_url(&replica).await.unwrap();
            let mut paused = false;
            while !stop.load(Ordering::Acquire) {
                let sql = if paused {
                    "SELECT pg_wal_replay_resume()"
                } else {
                    "SELECT pg_wal_replay_pause()"
                };
                client.batch_execute(sql).await.unwrap();
                paused = !paused;
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            client
                .batch_execute("SELECT pg_wal_replay_resume()")
                .await
                .unwrap();
        })
    };
    let on_replica = AtomicU64::new(0);
    let mut positions = Vec::new();
    for id in 100..400_i64 {
        let (_, position) = probing
            .execute_tracked("add-note", "INSERT INTO notes VALUES ($1, 'churn')", &[&id])
            .await
            .unwrap();
        positions.push((id, position));
        // Read an earlier write too: the probe has likely seen it replayed.
        let (old_id, old_position) = positions[positions.len().saturating_sub(10)];
        for (id, position) in [(id, position), (old_id, old_position)] {
            let row = probing
                .query_opt(
                    "show-note",
                    Route::ReadAfter(position),
                    "SELECT pg_is_in_recovery() FROM notes WHERE id = $1",
                    &[&id],
                )
                .await
                .unwrap();
            let row = row.unwrap_or_else(|| panic!("note {id} not visible after its write"));
            if row.get::<_, bool>(0) {
                on_replica.fetch_add(1, Ordering::Relaxed);
            }
        }
        if id % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    churn_stop.store(true, Ordering::Release);
    churn.await.unwrap();
    eprintln!(
        "read-your-writes reads served by the replica: {} of 600",
        on_replica.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_found_among_the_configured_hosts() {
    let pair = Pair::start().await;
    // Configured the wrong way round: the connect-time role check finds the
    // writable node.
    let mut config = common::config(&pair.replica_url());
    config
        .replicas
        .push(pgstack_config::NodeSettings::from_url(pair.db.url()).unwrap());
    let cluster = Cluster::connect(&config).await.unwrap();
    assert_eq!(cluster.primary().name(), "replica-1");
    assert_eq!(
        cluster.node("primary").unwrap().observed_role(),
        Some(Role::Replica)
    );
    assert!(!in_recovery(&cluster, Route::Write).await.unwrap());
    assert!(in_recovery(&cluster, Route::Read).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_error_from_the_primary_moves_writes_to_the_new_primary() {
    let pair = Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();
    cluster
        .execute(
            "create",
            Route::Write,
            "CREATE TABLE events (id bigint)",
            &[],
        )
        .await
        .unwrap();
    cluster
        .execute(
            "add-event",
            Route::Write,
            "INSERT INTO events VALUES (1)",
            &[],
        )
        .await
        .unwrap();
    pair.replica.wait_for_replay().await.unwrap();

    // Failover: the replica is promoted, the old primary turns read-only.
    pair.replica.promote().await.unwrap();
    let old = pair.primary.client("postgres").await.unwrap();
    old.batch_execute("ALTER SYSTEM SET default_transaction_read_only = on")
        .await
        .unwrap();
    old.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    let became_read_only = eventually(Duration::from_secs(5), || async {
        let c = pair.db.client().await.unwrap();
        let row = c
            .query_one("SHOW transaction_read_only", &[])
            .await
            .unwrap();
        row.get::<_, &str>(0) == "on"
    })
    .await;
    assert!(became_read_only);

    // The next write meets 25006, the cluster re-discovers, and the write
    // (rejected before it took effect) is retried on the new primary.
    let inserted = cluster
        .execute(
            "add-event",
            Route::Write,
            "INSERT INTO events VALUES (2)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    assert_eq!(cluster.primary().name(), "replica-1");
    assert_eq!(cluster.metrics().primary_changes, 1);
    let new_primary = pgstack_tests::connect_url(&pair.replica_url())
        .await
        .unwrap();
    let ids: Vec<i64> = new_primary
        .query("SELECT id FROM events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2]);
    // Reads no longer go to the old primary as if it were a replica of the
    // new one? It is read-only now, so it may serve reads; writes never.
    assert!(!in_recovery(&cluster, Route::Write).await.unwrap());
    let writable: String = cluster
        .query_one("check", Route::Write, "SHOW transaction_read_only", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(writable, "off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_write_waits_briefly_for_the_replica_then_falls_back_to_the_primary() {
    let pair = Pair::start().await;
    // No replication probe: the cluster's recorded replay position stays
    // behind every new write, so each read after one has to ask.
    let mut config = pair.config();
    config.query.read_after_wait = Duration::from_secs(5);
    let cluster = Cluster::connect(&config).await.unwrap();
    cluster
        .execute(
            "create",
            Route::Write,
            "CREATE TABLE notes (id bigint PRIMARY KEY)",
            &[],
        )
        .await
        .unwrap();
    // Replay running: every read after its write is served by the replica,
    // which has the row.
    for id in 0..20_i64 {
        let (_, position) = cluster
            .execute_tracked("add-note", "INSERT INTO notes VALUES ($1)", &[&id])
            .await
            .unwrap();
        let row = cluster
            .query_opt(
                "show-note",
                Route::ReadAfter(position),
                "SELECT pg_is_in_recovery() FROM notes WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("note {id} not visible after its write"));
        assert!(
            row.get::<_, bool>(0),
            "note {id}: the replica, once it replayed it"
        );
    }
    // Replay paused: the read waits the bound, then the primary answers.
    let mut config = pair.config();
    config.query.read_after_wait = Duration::from_millis(300);
    let patient = Cluster::connect(&config).await.unwrap();
    pair.replica.pause_replay().await.unwrap();
    let (_, position) = patient
        .execute_tracked("add-note", "INSERT INTO notes VALUES (100)", &[])
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let row = patient
        .query_one(
            "show-note",
            Route::ReadAfter(position),
            "SELECT pg_is_in_recovery() FROM notes WHERE id = 100",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0), "the primary answers");
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    // No wait configured: straight to the primary.
    let mut config = pair.config();
    config.query.read_after_wait = Duration::ZERO;
    let hasty = Cluster::connect(&config).await.unwrap();
    let row = hasty
        .query_one(
            "show-note",
            Route::ReadAfter(position),
            "SELECT pg_is_in_recovery() FROM notes WHERE id = 100",
            &[],
        )
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    pair.replica.resume_replay().await.unwrap();
}
