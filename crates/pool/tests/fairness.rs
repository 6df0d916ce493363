//! Many callers on a small pool: served in arrival order, no deadlock, and
//! every caller finishes or times out at its deadline.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgstack_config::PoolSettings;
use pgstack_pool::{AcquirePhase, PoolError};
use pgstack_tests::TestDb;
use rand::Rng;

#[tokio::test(flavor = "current_thread")]
async fn waiters_are_served_in_arrival_order() -> anyhow::Result<()> {
    let db = TestDb::on(TestDb::shared_cluster().await?).await?;
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 10,
            max_size: 10,
            acquire_timeout: Duration::from_secs(60),
            ..common::pool_settings()
        })
        .build()
        .await?;

    // Hold every connection, then queue 990 callers one after another.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(pool.get("holder").await?);
    }
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..990u32 {
        let (queued, served) = (pool.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let conn = queued.get("queued").await?;
            served.lock().unwrap().push(i);
            tokio::task::yield_now().await;
            drop(conn);
            anyhow::Ok(())
        }));
        // Wait until this caller is queued before starting the next one.
        while pool.status().waiters != i + 1 {
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(pool.status().waiters, 990);
    drop(held);
    for task in tasks {
        task.await??;
    }
    let served = served.lock().unwrap().clone();
    let expected: Vec<u32> = (0..990).collect();
    assert_eq!(
        served, expected,
        "callers were not served first come, first served"
    );
    assert_eq!(pool.status().waiters, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_on_ten_connections_finish_or_time_out_at_their_deadline()
-> anyhow::Result<()> {
    let db = TestDb::on(TestDb::shared_cluster().await?).await?;
    let acquire_timeout = Duration::from_millis(700);
    let pool = common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 10,
            max_size: 10,
            acquire_timeout,
            ..common::pool_settings()
        })
        .build()
        .await?;
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let hold = rand::rng().random_range(0..15u64);
            let started = Instant::now();
            match pool.get("crowd").await {
                Ok(conn) => {
                    conn.query_one("SELECT pg_sleep($1::float8 / 1000)", &[&(hold as f64)])
                        .await?;
                    anyhow::Ok(Ok(started.elapsed()))
                }
                Err(PoolError::Timeout(t)) => {
                    assert_eq!(t.phase, AcquirePhase::WaitingForConnection, "{t}");
                    anyhow::Ok(Err(started.elapsed()))
                }
                Err(other) => Err(other.into()),
            }
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await??);
        }
        anyhow::Ok(results)
    })
    .await
    .map_err(|_| anyhow::anyhow!("deadlock: tasks still running after 30 s"))??;

    let served = all.iter().filter(|r| r.is_ok()).count();
    let timed_out: Vec<Duration> = all.iter().filter_map(|r| r.err()).collect();
    assert!(served >= 100, "served {served}");
    assert!(
        !timed_out.is_empty(),
        "expected some timeouts with a 700 ms deadline"
    );
    for waited in &timed_out {
        assert!(*waited >= acquire_timeout, "timed out early: {waited:?}");
        assert!(
            *waited < acquire_timeout + Duration::from_millis(300),
            "late: {waited:?}"
        );
    }
    let status = pool.status();
    assert_eq!(status.timeouts as usize, timed_out.len());
    assert!(common::eventually(Duration::from_secs(2), || pool.status().in_use == 0).await);
    assert_eq!(pool.status().waiters, 0);
    assert_eq!(pool.status().size, 10);
    Ok(())
}
