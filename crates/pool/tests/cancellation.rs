//! A cancellation storm: thousands of operations dropped at random points,
//! many inside transactions. Afterwards no connection is leaked and none is
//! inside a transaction.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pgstack_config::PoolSettings;
use pgstack_pool::Pool;
use pgstack_tests::TestDb;
use rand::Rng;

const OPERATIONS: u64 = 10_000;
const TASKS: u64 = 12;
const POOL_SIZE: u32 = 10;

/// One operation of a random kind; the caller drops it at a random point.
async fn operation(pool: &Pool, kind: u32) -> anyhow::Result<()> {
    match kind {
        // A transaction through the helper.
        0..=3 => {
            let mut conn = pool.get("storm-tx").await?;
            let tx = conn.transaction().await?;
            tx.execute("INSERT INTO storm (v) VALUES (1)", &[]).await?;
            tx.query_one("SELECT pg_sleep(0.001)", &[]).await?;
            tx.execute("UPDATE counter SET n = n + 1", &[]).await?;
            tx.commit().await?;
        }
        // A transaction that fails and is dropped without a rollback.
        4 => {
            let mut conn = pool.get("storm-fail").await?;
            let tx = conn.transaction().await?;
            let _ = tx.execute("INSERT INTO storm (v) VALUES (1/0)", &[]).await;
            tx.execute("SELECT 1", &[]).await?;
        }
        // BEGIN sent as plain SQL.
        5 => {
            let conn = pool.get("storm-raw").await?;
            conn.batch_execute("BEGIN; INSERT INTO storm (v) VALUES (2)")
                .await?;
            conn.query_one("SELECT pg_sleep(0.001)", &[]).await?;
            conn.batch_execute("COMMIT").await?;
        }
        // Autocommit statements.
        _ => {
            let conn = pool.get("storm-read").await?;
            conn.query_one("SELECT count(*) FROM storm", &[]).await?;
            conn.query_one("SELECT pg_sleep(0.001)", &[]).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_storm_leaves_no_leaked_or_in_transaction_connection() -> anyhow::Result<()> {
    let db = TestDb::on(TestDb::shared_cluster().await?).await?;
    let admin = db.client().await?;
    admin
        .batch_execute(
            "CREATE TABLE storm (v int); CREATE TABLE counter (n int); INSERT INTO counter VALUES (0)",
        )
        .await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 2,
            max_size: POOL_SIZE,
            acquire_timeout: Duration::from_secs(5),
            ..common::pool_settings()
        })
        .build()
        .await?;

    let next = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let cancelled = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (pool, next, completed, cancelled) = (
            pool.clone(),
            next.clone(),
            completed.clone(),
            cancelled.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < OPERATIONS {
                let (kind, cut) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..8u32), rng.random_range(0..3_000u64))
                };
                let op = operation(&pool, kind);
                match tokio::time::timeout(Duration::from_micros(cut), op).await {
                    Ok(_) => completed.fetch_add(1, Ordering::Relaxed),
                    Err(_) => cancelled.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let cancelled = cancelled.load(Ordering::Relaxed);
    assert!(cancelled > OPERATIONS / 4, "only {cancelled} cancelled");
    assert!(
        completed.load(Ordering::Relaxed) > 0,
        "some operations must finish too"
    );

    // Every connection comes back (rollbacks on return finish in the background).
    assert!(
        common::eventually(Duration::from_secs(10), || pool.status().in_use == 0).await,
        "leaked: {:?}",
        pool.status()
    );
    let status = pool.status();
    assert!(status.size <= POOL_SIZE, "{status:?}");
    assert!(status.rollbacks > 0, "{status:?}");

    // Nobody is idle in a transaction, as the server sees it.
    assert_eq!(common::sessions_in_transaction(&admin, db.name()).await?, 0);

    // Every connection can be checked out at once (no lost permits) and is
    // outside any transaction: SAVEPOINT outside a transaction block fails
    // with 25P01, and nothing reports 25P02.
    let mut conns = Vec::new();
    for _ in 0..POOL_SIZE {
        conns.push(pool.get("verify").await?);
    }
    for conn in &conns {
        let one: i32 = conn.query_one("SELECT 1", &[]).await?.get(0);
        assert_eq!(one, 1);
        let err = conn.batch_execute("SAVEPOINT probe").await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25P01"), "{err:?}");
    }
    drop(conns);
    assert!(common::eventually(Duration::from_secs(5), || pool.status().in_use == 0).await);
    Ok(())
}
