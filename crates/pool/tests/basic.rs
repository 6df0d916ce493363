//! The pool against a real server: connecting, settings on the session,
//! transactions, the session-state rule, recycling, caches, leaks, errors.

mod common;

use std::time::Duration;

use pgstack_config::{NodeSettings, Password, PoolSettings};
use pgstack_pool::{Pool, PoolBuilder, PoolError, TransactionOptions};
use pgstack_tests::{TestCluster, TestDb};

async fn test_db() -> anyhow::Result<TestDb> {
    TestDb::on(TestDb::shared_cluster().await?).await
}

#[tokio::test]
async fn warms_min_idle_and_sets_session_options_without_a_round_trip() -> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 3,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let status = pool.status();
    assert_eq!(status.size, 3, "{status:?}");
    assert_eq!(status.idle, 3, "{status:?}");
    assert_eq!(status.created, 3);

    let conn = pool.get("show-settings").await?;
    let name: String = conn.query_one("SHOW application_name", &[]).await?.get(0);
    assert_eq!(name, "pgstack-pool-tests");
    let timeout: String = conn.query_one("SHOW statement_timeout", &[]).await?.get(0);
    assert_eq!(timeout, "30s");
    assert_eq!(pool.status().in_use, 1);
    drop(conn);
    assert_eq!(pool.status().in_use, 0);
    assert_eq!(pool.status().acquired, 1);

    // The status serialises (for status pages) and names no password.
    let json = serde_json::to_string(&pool.status())?;
    assert!(json.contains("\"size\":3"), "{json}");
    Ok(())
}

#[tokio::test]
async fn transactions_commit_roll_back_and_roll_back_when_dropped() -> anyhow::Result<()> {
    let db = test_db().await?;
    let admin = db.client().await?;
    admin.batch_execute("CREATE TABLE t (id int)").await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;

    let mut conn = pool.get("commit").await?;
    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO t VALUES (1)", &[]).await?;
    tx.commit().await?;
    assert!(conn.is_clean());

    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO t VALUES (2)", &[]).await?;
    tx.rollback().await?;

    let tx = conn
        .transaction_with(TransactionOptions::new().read_only(true))
        .await?;
    let err = tx
        .execute("INSERT INTO t VALUES (3)", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("25006"));
    drop(tx);
    assert!(
        !conn.is_clean(),
        "a dropped transaction leaves the connection flagged"
    );
    drop(conn);

    // Same (only) connection: rolled back before reuse, not in a transaction.
    let conn = pool.get("after-drop").await?;
    let ids: Vec<i32> = conn
        .query("SELECT id FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1]);
    assert_eq!(common::sessions_in_transaction(&admin, db.name()).await?, 0);
    assert_eq!(pool.status().rollbacks, 1);
    assert_eq!(pool.status().created, 1, "rolled back, not reconnected");
    Ok(())
}

#[tokio::test]
async fn close_after_returns_settled_does_not_count_a_connection_being_rolled_back()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;
    // A statement still running when the connection is dropped: its
    // rollback waits behind it, so the return takes about a second.
    let conn = pool.get("slow-rollback").await?;
    conn.batch_execute("BEGIN").await?;
    let pending = conn.batch_execute("SELECT pg_sleep(1)");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), pending)
            .await
            .is_err()
    );
    drop(conn);
    assert_eq!(pool.status().in_use, 1, "the rollback holds the connection");
    let started = std::time::Instant::now();
    pool.returns_settled().await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited for the rollback: {:?}",
        started.elapsed()
    );
    assert_eq!(
        pool.close(),
        0,
        "nothing is checked out once returns settled"
    );
    assert_eq!(pool.status().rollbacks, 1);
    Ok(())
}

#[tokio::test]
async fn raw_begin_and_raw_client_use_are_rolled_back_on_return() -> anyhow::Result<()> {
    let db = test_db().await?;
    let admin = db.client().await?;
    admin.batch_execute("CREATE TABLE t (id int)").await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;

    // A BEGIN sent as plain SQL: the pool cannot know, so it rolls back.
    let conn = pool.get("raw-begin").await?;
    conn.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await?;
    assert!(!conn.is_clean());
    drop(conn);

    let mut conn = pool.get("raw-client").await?;
    let count: i64 = conn.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(count, 0, "the raw BEGIN's insert was rolled back");
    conn.client_unchecked()
        .batch_execute("BEGIN; INSERT INTO t VALUES (2)")
        .await?;
    drop(conn);

    let conn = pool.get("check").await?;
    let count: i64 = conn.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(count, 0);
    assert!(conn.is_clean());
    drop(conn);
    assert!(common::eventually(Duration::from_secs(2), || pool.status().rollbacks == 2).await);
    assert_eq!(common::sessions_in_transaction(&admin, db.name()).await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_server_error_inside_a_transaction_never_leaks_25p02() -> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let mut conn = pool.get("fails").await?;
    let tx = conn.transaction().await?;
    assert!(tx.execute("SELECT 1/0", &[]).await.is_err());
    // The transaction is aborted; the caller forgets to roll back.
    drop(tx);
    drop(conn);
    let conn = pool.get("next").await?;
    let one: i32 = conn.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1, "no 25P02 for the next user");
    Ok(())
}

#[tokio::test]
async fn recycle_all_replaces_connections_and_clearing_caches_fixes_stale_plans()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let admin = db.client().await?;
    admin
        .batch_execute("CREATE TABLE items (id int, name text); INSERT INTO items VALUES (1, 'a')")
        .await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;

    let conn = pool.get("cached").await?;
    let stmt = conn.prepare_cached("SELECT * FROM items").await?;
    assert_eq!(conn.query(&stmt, &[]).await?.len(), 1);
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    drop(conn);

    // A migration changes the result type of the cached statement.
    admin
        .batch_execute("ALTER TABLE items ADD COLUMN price int")
        .await?;
    let conn = pool.get("stale").await?;
    let stmt = conn.prepare_cached("SELECT * FROM items").await?;
    let err = conn.query(&stmt, &[]).await.unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("cached plan must not change result type"),
        "{err:?}"
    );
    drop(stmt);
    drop(conn);

    pool.clear_statement_caches();
    let conn = pool.get("fresh-cache").await?;
    let stmt = conn.prepare_cached("SELECT * FROM items").await?;
    assert_eq!(conn.query(&stmt, &[]).await?[0].len(), 3);
    let same_pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    assert_eq!(same_pid, pid, "clearing caches does not reconnect");
    drop(conn);

    let held = pool.get("held-across-recycle").await?;
    assert!(!held.should_be_replaced());
    pool.recycle_all();
    assert!(
        held.should_be_replaced(),
        "a long-lived checkout sees the new generation"
    );
    drop(held);
    let conn = pool.get("recycled").await?;
    let new_pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    assert_ne!(new_pid, pid, "recycle_all replaces the connection");
    assert!(pool.status().closed.recycled >= 1);
    Ok(())
}

#[tokio::test]
async fn leak_detection_reports_a_long_checkout_once() -> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            leak_detection_threshold: Some(Duration::from_millis(200)),
            ..common::pool_settings()
        })
        .build()
        .await?;
    let short = pool.get("quick").await?;
    drop(short);
    let mut lane = pool.get("shared-lane").await?;
    lane.exempt_from_leak_detection();
    let held = pool.get("fetch-bills").await?;
    assert!(common::eventually(Duration::from_secs(2), || pool.status().leaks == 1).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.status().leaks, 1, "reported once");
    assert_eq!(held.operation(), "fetch-bills");
    drop(held);
    Ok(())
}

#[tokio::test]
async fn idle_connections_past_their_lifetime_or_idle_timeout_are_closed() -> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 3,
            idle_timeout: Some(Duration::from_millis(300)),
            max_lifetime: Some(Duration::from_millis(1500)),
            max_lifetime_jitter: Duration::from_millis(500),
            ..common::pool_settings()
        })
        .build()
        .await?;
    // Three connections at once, then all idle.
    let a = pool.get("a").await?;
    let b = pool.get("b").await?;
    let c = pool.get("c").await?;
    drop((a, b, c));
    assert_eq!(pool.status().size, 3);
    // Above min_idle, idle ones go after the idle timeout.
    assert!(common::eventually(Duration::from_secs(2), || pool.status().size == 1).await);
    assert_eq!(pool.status().closed.idle, 2);
    // The last one reaches its lifetime and is replaced (min_idle stays).
    assert!(
        common::eventually(Duration::from_secs(3), || pool.status().closed.lifetime
            >= 1)
        .await,
        "{:?}",
        pool.status()
    );
    assert!(common::eventually(Duration::from_secs(2), || pool.status().size == 1).await);
    Ok(())
}

#[tokio::test]
async fn bad_settings_get_clear_errors() -> anyhow::Result<()> {
    let node = NodeSettings::from_url("postgres://u:hunter2@127.0.0.1:1/db")?;
    let err = PoolBuilder::new(node.clone())
        .pool_settings(PoolSettings {
            min_idle: 9,
            max_size: 2,
            ..PoolSettings::default()
        })
        .build_lazy()
        .unwrap_err();
    assert!(matches!(err, PoolError::Config(_)));
    assert!(err.to_string().contains("pool.min_idle = 9"), "{err}");

    let err = PoolBuilder::new(node.clone())
        .tls(pgstack_config::TlsSettings {
            mode: pgstack_config::TlsMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        })
        .build_lazy()
        .unwrap_err();
    assert!(err.to_string().contains("tls.root_cert"), "{err}");
    assert!(err.to_string().contains("cannot read the file"), "{err}");
    Ok(())
}

#[tokio::test]
async fn passwords_never_show_in_errors_debug_or_status() -> anyhow::Result<()> {
    // Nothing listens on port 1: the connect fails, with the password in the settings.
    let mut node = NodeSettings::from_url("postgres://app@127.0.0.1:1/db")?;
    node.password = Some(Password::new("hunter2"));
    let err = common::builder("postgres://x@127.0.0.1:1/db")?
        .without_circuit_breaker()
        .build()
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, PoolError::Connect(_)), "{err}");
    let pool = PoolBuilder::new(node)
        .pool_settings(PoolSettings {
            acquire_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(200),
            ..common::pool_settings()
        })
        .build_lazy()?;
    let err = pool.get("secret-check").await.unwrap_err();
    let texts = [
        err.to_string(),
        format!("{err:?}"),
        format!("{pool:?}"),
        serde_json::to_string(&pool.status())?,
    ];
    for text in texts {
        assert!(!text.contains("hunter2"), "{text}");
    }
    assert!(err.to_string().contains("********") || err.to_string().contains("127.0.0.1:1"));
    Ok(())
}

#[tokio::test]
async fn connect_errors_name_the_node_and_the_cause() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pool = common::builder(&cluster.url("no_such_database"))?
        .without_circuit_breaker()
        .build()
        .await;
    let err = pool.map(|_| ()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("no_such_database"), "{text}");
    assert!(text.contains("does not exist"), "{text}");
    let _ = Pool::builder(NodeSettings::default());
    Ok(())
}

/// The value of one series in a metrics snapshot, as f64.
fn metric(
    snapshot: &[(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use metrics_util::debugging::DebugValue;
    snapshot.iter().find_map(|(key, _, _, value)| {
        let key = key.key();
        let matches = key.name() == name
            && labels
                .iter()
                .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
        matches.then(|| match value {
            DebugValue::Counter(n) => *n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        })
    })
}

#[tokio::test]
async fn metrics_are_published_per_node_with_close_reasons() -> anyhow::Result<()> {
    let db = test_db().await?;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let builder = common::builder(db.url())?.name("primary");
    // The pool builds its metric handles once, with the recorder of the time.
    let pool = metrics::with_local_recorder(&recorder, || builder.build_lazy())?;
    assert!(common::eventually(Duration::from_secs(3), || pool.status().size >= 1).await);

    let conn = pool.get("metered").await?;
    // The connection-count gauges are written by `status()`, each
    // housekeeping tick and when a connection opens or closes, not per
    // checkout.
    let status = pool.status();
    assert_eq!(status.in_use, 1);
    let snap = snapshotter.snapshot().into_vec();
    let node = ("node", "primary");
    assert_eq!(
        metric(
            &snap,
            "pgstack_pool_connections",
            &[node, ("state", "in_use")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&snap, "pgstack_pool_connections", &[node, ("state", "max")]),
        Some(5.0)
    );
    assert_eq!(
        metric(&snap, "pgstack_pool_connections_created_total", &[node]),
        Some(1.0)
    );
    assert_eq!(
        metric(&snap, "pgstack_pool_acquire_seconds", &[node]),
        Some(1.0)
    );
    drop(conn);
    // The housekeeper writes them without being asked. (A snapshot of the
    // debugging recorder zeroes the gauges it reads: the idle count shows
    // the write.)
    let idle_written = common::eventually(Duration::from_secs(3), || {
        let snap = snapshotter.snapshot().into_vec();
        metric(
            &snap,
            "pgstack_pool_connections",
            &[node, ("state", "idle")],
        ) == Some(1.0)
    })
    .await;
    assert!(idle_written, "the housekeeper wrote the idle gauge");

    pool.recycle_all();
    assert!(
        common::eventually(Duration::from_secs(3), || pool.status().closed.recycled
            == 1)
        .await
    );
    let snap = snapshotter.snapshot().into_vec();
    assert_eq!(
        metric(
            &snap,
            "pgstack_pool_connections_closed_total",
            &[node, ("reason", "recycled")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &snap,
            "pgstack_pool_connections",
            &[node, ("state", "in_use")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&snap, "pgstack_circuit_state", &[("node", "primary")]),
        Some(0.0)
    );
    Ok(())
}

#[tokio::test]
async fn close_stops_checkouts_and_closes_connections() -> anyhow::Result<()> {
    let db = test_db().await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 2,
            max_size: 2,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let held = pool.get("held").await?;
    let queued = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.get("queued").await.map(|_| ()) })
    };
    let other = pool.get("second").await?;
    assert!(common::eventually(Duration::from_secs(2), || pool.status().waiters == 1).await);
    assert_eq!(pool.close(), 2);
    assert!(pool.is_closed());
    assert!(matches!(queued.await?, Err(PoolError::Closed { .. })));
    assert!(matches!(
        pool.get("late").await,
        Err(PoolError::Closed { .. })
    ));
    drop((held, other));
    let status = pool.status();
    assert_eq!(status.size, 0, "{status:?}");
    assert_eq!(status.closed.shutdown, 2, "{status:?}");
    Ok(())
}

#[tokio::test]
async fn a_dropped_transaction_is_rolled_back_before_the_next_statement_on_the_same_checkout()
-> anyhow::Result<()> {
    let db = test_db().await?;
    let admin = db.client().await?;
    admin.batch_execute("CREATE TABLE t (id int)").await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let mut conn = pool.get("same-checkout").await?;

    // Dropped, then a plain statement: it must not run inside the old transaction.
    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO t VALUES (1)", &[]).await?;
    drop(tx);
    conn.execute("INSERT INTO t VALUES (2)", &[]).await?;
    let seen: i64 = admin.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(
        seen, 1,
        "the autocommit insert is visible at once; the dropped one is gone"
    );

    // Dropped, then a new transaction: it starts fresh.
    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO t VALUES (3)", &[]).await?;
    drop(tx);
    let tx = conn.transaction().await?;
    tx.execute("INSERT INTO t VALUES (4)", &[]).await?;
    tx.commit().await?;
    assert!(conn.is_clean());
    let ids: Vec<i32> = admin
        .query("SELECT id FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![2, 4]);
    Ok(())
}

#[tokio::test]
async fn a_panic_inside_a_transaction_rolls_the_connection_back() -> anyhow::Result<()> {
    let db = test_db().await?;
    let admin = db.client().await?;
    admin.batch_execute("CREATE TABLE t (id int)").await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let task = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut conn = pool.get("panics").await.unwrap();
            let tx = conn.transaction().await.unwrap();
            tx.execute("INSERT INTO t VALUES (1)", &[]).await.unwrap();
            panic!("boom inside a transaction");
        })
    };
    assert!(task.await.unwrap_err().is_panic());
    let conn = pool.get("after-panic").await?;
    let count: i64 = conn.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(count, 0);
    assert_eq!(common::sessions_in_transaction(&admin, db.name()).await?, 0);
    assert_eq!(pool.status().rollbacks, 1);
    Ok(())
}
