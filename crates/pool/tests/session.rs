//! No connection goes back with its session changed: whatever one checkout
//! did to the session (settings, temporary objects, listeners, advisory
//! locks, prepared statements, cursors), the next checkout of the same
//! server process does not see it.

mod common;

use std::time::Duration;

use pgstack_config::PoolSettings;
use pgstack_pool::{Pool, PooledConnection};
use pgstack_tests::TestDb;

/// One connection, so every checkout gets the same server process unless
/// the pool closed it.
async fn single(db: &TestDb) -> anyhow::Result<Pool> {
    Ok(common::builder(db.url())?
        .pool_settings(PoolSettings {
            min_idle: 1,
            max_size: 1,
            ..common::pool_settings()
        })
        .build()
        .await?)
}

async fn pid(conn: &PooledConnection) -> anyhow::Result<i32> {
    Ok(conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0))
}

async fn text(conn: &PooledConnection, sql: &str) -> anyhow::Result<String> {
    Ok(conn.query_one(sql, &[]).await?.get(0))
}

/// Waits for the reset that runs off the caller's path after a return.
async fn settled(pool: &Pool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), pool.returns_settled()).await;
    assert!(waited.is_ok(), "the returned connection is cleaned up");
}

#[tokio::test]
async fn a_tenants_settings_never_reach_the_next_checkout() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let pool = single(&db).await?;
    let conn = pool.get("tenant-b-first").await?;
    let default_path = text(&conn, "SHOW search_path").await?;
    let backend = pid(&conn).await?;
    drop(conn);

    // Tenant A changes its session four different ways.
    let changes = [
        ("plain SET", "SET search_path = tenant_a", "tenant_a"),
        (
            "set_config",
            "SELECT set_config('search_path', 'tenant_a', false)",
            "tenant_a",
        ),
        (
            "SET SESSION",
            "SET SESSION search_path TO tenant_a, public",
            "tenant_a, public",
        ),
        (
            "in a batch",
            "SELECT 1; SET search_path = tenant_a; SELECT 2",
            "tenant_a",
        ),
    ];
    for (i, (how, sql, path)) in changes.iter().enumerate() {
        let conn = pool.get("tenant-a").await?;
        conn.simple_query(sql).await?;
        assert_eq!(text(&conn, "SHOW search_path").await?, *path, "{how}");
        assert!(conn.session_changed(), "{how}");
        drop(conn);
        settled(&pool).await;

        let conn = pool.get("tenant-b").await?;
        assert_eq!(pid(&conn).await?, backend, "{how}: reset, not reconnected");
        assert_eq!(
            text(&conn, "SHOW search_path").await?,
            default_path,
            "{how}"
        );
        assert!(!conn.session_changed());
        drop(conn);
        assert_eq!(pool.status().session_resets, i as u64 + 1, "{how}");
    }

    // The raw client cannot be watched: its session is reset too.
    let mut conn = pool.get("tenant-a-raw").await?;
    conn.client_unchecked()
        .batch_execute("SET search_path = tenant_a")
        .await?;
    drop(conn);
    settled(&pool).await;
    let conn = pool.get("tenant-b").await?;
    assert_eq!(text(&conn, "SHOW search_path").await?, default_path);
    drop(conn);

    // A statement that leaves the session alone costs no reset.
    let resets = pool.status().session_resets;
    let conn = pool.get("plain").await?;
    conn.query("SELECT set_config('search_path', 'x', true), now()", &[])
        .await?;
    drop(conn);
    settled(&pool).await;
    assert_eq!(pool.status().session_resets, resets);
    Ok(())
}

#[tokio::test]
async fn temporary_objects_listeners_locks_prepared_statements_and_cursors_are_gone()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let admin = db.client().await?;
    let pool = single(&db).await?;
    let backend = pid(&pool.get("first").await?).await?;

    let conn = pool.get("dirty").await?;
    // Cached statements of this checkout must not outlive the reset's
    // DEALLOCATE ALL as stale handles.
    let cached = conn.prepare_cached("SELECT 41 + 1").await?;
    let _: i32 = conn.query_one(&cached, &[]).await?.get(0);
    conn.batch_execute("CREATE TEMP TABLE scratch (id int)")
        .await?;
    conn.execute("INSERT INTO scratch VALUES (1)", &[]).await?;
    conn.batch_execute("LISTEN tenant_events").await?;
    conn.query("SELECT pg_advisory_lock(4242)", &[]).await?;
    conn.batch_execute("PREPARE tenant_plan AS SELECT 1")
        .await?;
    conn.batch_execute("BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT")
        .await?;
    drop(conn);
    settled(&pool).await;

    let conn = pool.get("next").await?;
    assert_eq!(pid(&conn).await?, backend, "reset, not reconnected");
    let temp: Option<String> = conn
        .query_one("SELECT to_regclass('pg_temp.scratch')::text", &[])
        .await?
        .get(0);
    assert_eq!(temp, None, "the temporary table is gone");
    let channels: i64 = conn
        .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
        .await?
        .get(0);
    assert_eq!(channels, 0, "no listener left");
    let cursors: i64 = conn
        .query_one("SELECT count(*) FROM pg_cursors WHERE name = 'held'", &[])
        .await?
        .get(0);
    assert_eq!(cursors, 0, "no cursor left");
    // The name is free again, and the cached statement is prepared afresh.
    conn.batch_execute("PREPARE tenant_plan AS SELECT 2")
        .await?;
    let again = conn.prepare_cached("SELECT 41 + 1").await?;
    let answer: i32 = conn.query_one(&again, &[]).await?.get(0);
    assert_eq!(answer, 42);
    drop(conn);
    // Another session can take the advisory lock the first one held.
    let free: bool = admin
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await?
        .get(0);
    assert!(free, "the session advisory lock was released");
    admin
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_change_a_reset_cannot_undo_closes_the_connection() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let pool = single(&db).await?;
    let conn = pool.get("seeded").await?;
    let backend = pid(&conn).await?;
    conn.query("SELECT setseed(0.25)", &[]).await?;
    drop(conn);
    settled(&pool).await;
    let conn = pool.get("next").await?;
    assert_ne!(pid(&conn).await?, backend, "a new server process");
    drop(conn);
    assert_eq!(pool.status().closed.session, 1);
    Ok(())
}
