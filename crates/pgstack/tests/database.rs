#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `pgstack::Database` against a real server: configuration from the
//! environment with overrides in code, migrations at start, the query and
//! transaction API, clones in spawned tasks, shutdown.

use std::time::Duration;

use pgstack::StartOptions;
use pgstack::prelude::*;

#[cfg(feature = "migrations")]
fn reference_migrations() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .display()
        .to_string()
}

#[cfg(feature = "migrations")]
#[tokio::test]
async fn connect_from_the_environment_with_overrides_and_use_it() {
    use pgstack::{LifecycleState, Op};
    use pgstack_tests::TestDb;

    let db = TestDb::new().await.unwrap();
    let database = Database::builder()
        .env_source([
            ("APP_ENV", "test".to_owned()),
            ("DATABASE_URL", db.url().to_owned()),
            ("PGSTACK_MIGRATIONS__DIR", reference_migrations()),
        ])
        .set("pool.max_size", 7)
        .set("query.application_name", "bills-api")
        .connect()
        .await
        .unwrap();
    assert_eq!(database.config().pool.max_size, 7);
    assert_eq!(database.state(), LifecycleState::Ready);

    // The test profile migrates at start.
    let status = database.status().await;
    assert_eq!(status.migrations.applied, vec![1, 2, 3, 4, 5]);
    assert!(status.application_name.starts_with("bills-api#"));

    let user: i64 = database
        .transaction("add-user", async |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO users (email, display_name) VALUES ($1, $2) RETURNING id",
                    &[&"ada@example.org", &"Ada"],
                )
                .await?;
            Ok::<_, pgstack::Error>(row.get(0))
        })
        .await
        .unwrap();
    let (inserted, position) = database
        .execute_tracked(
            "add-bill",
            "INSERT INTO bills (session, number, title, introduced_on, created_by) \
             VALUES (118, 'H.R. 1', 'A bill', current_date, $1)",
            &[&user],
        )
        .await
        .unwrap();
    assert_eq!(inserted, 1);
    let title: String = database
        .query_one(
            "show-bill",
            Route::ReadAfter(position),
            "SELECT title FROM bills WHERE created_by = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "A bill");

    // Clones go into tasks; they share the pools.
    let mut tasks = Vec::new();
    for i in 0..8_i64 {
        let database = database.clone();
        tasks.push(tokio::spawn(async move {
            database
                .execute(
                    Op::from("touch-user").idempotent(),
                    Route::Write,
                    "UPDATE users SET updated_at = now() WHERE id = $1",
                    &[&i],
                )
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let count: i64 = database
        .read("count-bills", async |conn| {
            Ok(conn
                .query_one("SELECT count(*) FROM bills", &[])
                .await?
                .get(0))
        })
        .await
        .unwrap();
    assert_eq!(count, 1);
    let missing = database
        .query_opt(
            "no-bill",
            Route::Read,
            "SELECT 1 FROM bills WHERE id = -1",
            &[],
        )
        .await
        .unwrap();
    assert!(missing.is_none());

    let metrics = database.metrics();
    assert!(metrics.cluster.queries >= 13, "{metrics:?}");
    assert_eq!(metrics.migrations_applied_at_start, 5);
    #[cfg(feature = "health")]
    {
        let monitor = metrics.health.expect("the test profile runs the monitor");
        assert_eq!(monitor.status, pgstack::HealthStatus::Healthy);
        assert!(monitor.round >= 1);
    }

    let report = database.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.cut_off, 0);
    assert!(report.drained);
    let error = database
        .query("late", Route::Read, "SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ShuttingDown { .. }), "{error:?}");
    assert!(!database.health().await.is_serving());
}

#[tokio::test]
async fn an_invalid_override_names_the_key_and_its_source() {
    let error = Database::builder()
        .env_source([("DATABASE_URL", "postgres://app@127.0.0.1:1/app")])
        .set("pool.max_size", "lots")
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(error, StartError::Config(_)), "{error:?}");
    assert!(error.to_string().contains("pool.max_size"), "{error}");
}

#[tokio::test]
async fn a_config_cannot_be_mixed_with_loader_settings() {
    let config = pgstack::DatabaseConfig::for_tests("postgres://app@127.0.0.1:1/app").unwrap();
    let error = Database::builder()
        .config(config)
        .set("pool.max_size", 3)
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(error, StartError::Options(_)), "{error:?}");
}

#[tokio::test]
async fn a_database_that_is_down_fails_fast_with_a_clear_error() {
    // A port nobody listens on: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config =
        pgstack::DatabaseConfig::for_tests(&format!("postgres://app@127.0.0.1:{port}/app"))
            .unwrap();
    let started = std::time::Instant::now();
    let error = Database::builder()
        .config(config)
        .options(StartOptions::new().fail_fast())
        .connect()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, StartError::Unreachable { .. }), "{error:?}");
    // The cause comes first, then what to do about it.
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "nothing listens on 127.0.0.1:{port} (connection refused)"
        )),
        "{message}"
    );
    assert!(message.contains("fix the port"), "{message}");
}

/// A call's future is what a caller's own future holds while it waits, and
/// closures nest calls: futures that grow with every layer overflow the
/// stack of a debug build (the misuse suite's nested closures did, at
/// 34 KiB for a `write`). The limits leave room for the compiler, not for
/// another layer of copies.
#[tokio::test]
async fn the_futures_of_calls_stay_small() {
    use pgstack::Route;
    use pgstack_tests::TestDb;

    let tdb = TestDb::new().await.unwrap();
    let mut config = pgstack::DatabaseConfig::for_tests(tdb.url()).unwrap();
    config.migrations.auto_migrate = false;
    let db = Database::builder().config(config).connect().await.unwrap();
    let query = std::mem::size_of_val(&db.query("q", Route::Read, "SELECT 1", &[]));
    let write = std::mem::size_of_val(&db.write("w", async |conn| {
        conn.execute("SELECT 1", &[]).await?;
        Ok(())
    }));
    let transaction = std::mem::size_of_val(&db.transaction("t", async |tx| {
        tx.execute("SELECT 1", &[]).await?;
        Ok::<_, pgstack::Error>(())
    }));
    let conn = db.connection("c", Route::Read).await.unwrap();
    let statement = std::mem::size_of_val(&conn.query("SELECT 1", &[]));
    for (what, size, limit) in [
        ("query", query, 8 * 1024),
        ("write", write, 8 * 1024),
        ("transaction", transaction, 10 * 1024),
        ("a connection's query", statement, 3 * 1024),
    ] {
        eprintln!("{what}: {size} bytes (at most {limit})");
        assert!(size <= limit, "{what}: {size} bytes, over {limit}");
    }
    drop(conn);
    db.shutdown(Duration::from_secs(5)).await;
}
