#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! The safety contract under misuse, through `pgstack::Database` against the
//! kit's servers: callers who do the surprising thing. One test per case and
//! per variant, so that each says on its own whether it holds.
//!
//! 1. A transaction closure that swallows a failed statement's error and
//!    returns `Ok` is never reported committed.
//! 2. A closure whose statement reached the server is not run again because
//!    a later one failed with a "retryable" error.
//! 3. Temporary objects and 4. session settings, locks and listeners never
//!    reach another caller: refused on shared connections, reset on
//!    connections of one's own.
//! 5. Transaction control inside a transaction closure is refused.
//! 6. A partition fails a transaction, a closure or a statement within its
//!    bound.
//! 7. A long statement does not hold up short ones.

mod common;

use pgstack::Queryable as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use pgstack::{Database, DatabaseConfig, Error, Route};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};

async fn database(db: &TestDb, edit: impl FnOnce(&mut DatabaseConfig)) -> Database {
    let mut config = common::config(db.url());
    edit(&mut config);
    common::connect(config).await
}

async fn count(db: &TestDb, table: &str) -> i64 {
    db.client()
        .await
        .unwrap()
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

const TABLES: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, item text); \
     CREATE TABLE locks (id int PRIMARY KEY); INSERT INTO locks VALUES (1); \
     CREATE TABLE audit (id bigserial PRIMARY KEY, note text); \
     CREATE TABLE accounts (id int)";

/// A fresh database with the tables above, and a `Database` on it.
async fn setup(edit: impl FnOnce(&mut DatabaseConfig)) -> (TestDb, Database) {
    let tdb = common::db_with(TABLES).await;
    let db = database(&tdb, edit).await;
    (tdb, db)
}

fn is_transaction_aborted(error: &Error) -> bool {
    matches!(error, Error::TransactionAborted { .. })
}

fn is_partially_applied(error: &Error) -> bool {
    matches!(error, Error::PartiallyApplied { .. })
}

fn is_usage(error: &Error) -> bool {
    matches!(error, Error::Usage { .. })
}

/// The transaction was rolled back for a failure the closure did not wait
/// for, and left nothing in `orders`.
async fn rolled_back_unseen(tdb: &TestDb, error: &Error) {
    let text = common::checked(error);
    assert!(is_transaction_aborted(error), "{text}");
    assert!(text.contains("did not wait for"), "{text}");
    assert_eq!(count(tdb, "orders").await, 0);
}

async fn done(db: Database) {
    db.shutdown(Duration::from_secs(5)).await;
}

// ----- 1. A transaction whose closure swallowed an error --------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swallowed_duplicate_insert_is_never_reported_committed() {
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .transaction("swallow-duplicate", async |tx| {
            tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
                .await?;
            let _ = tx.execute("INSERT INTO orders VALUES (1, 'a')", &[]).await;
            Ok(())
        })
        .await
        .expect_err("never Ok after a failed statement");
    let text = common::checked(&error);
    assert!(is_transaction_aborted(&error), "{text}");
    assert!(
        text.contains("INSERT INTO orders VALUES (1, 'a')") && text.contains("rolled back"),
        "names the failed statement: {text}"
    );
    assert_eq!(error.code(), Some("23505"), "{text}");
    assert_eq!(count(&tdb, "orders").await, 0);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swallowed_errors_name_the_first_failed_statement() {
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .transaction("swallow-many", async |tx| {
            let _ = tx.query("SELECT 1 / 0", &[]).await;
            let _ = tx.execute("INSERT INTO orders VALUES (2, 'b')", &[]).await;
            let _ = tx.query("SELECT 2", &[]).await;
            Ok(())
        })
        .await
        .expect_err("never Ok");
    let text = common::checked(&error);
    assert!(is_transaction_aborted(&error), "{text}");
    assert!(
        text.contains("SELECT 1 / 0") && text.contains("22012"),
        "{text}"
    );
    assert_eq!(count(&tdb, "orders").await, 0);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_computed_around_a_swallowed_error_is_not_returned() {
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .transaction("swallow-then-value", async |tx| {
            tx.execute("INSERT INTO orders VALUES (3, 'c')", &[])
                .await?;
            let n = tx
                .query_one("SELECT count(*) FROM no_such_table", &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1);
            Ok(n)
        })
        .await
        .expect_err("never Ok");
    assert!(
        is_transaction_aborted(&error),
        "{}",
        common::checked(&error)
    );
    assert_eq!(error.code(), Some("42P01"));
    assert_eq!(count(&tdb, "orders").await, 0);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_statement_the_closure_did_not_wait_for_is_seen_at_commit() {
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .transaction("dropped-failure", async |tx| {
            tx.execute("INSERT INTO orders VALUES (4, 'd')", &[])
                .await?;
            // Fails on the server after 100 ms; the closure stops waiting.
            let _ = tokio::time::timeout(
                Duration::from_millis(5),
                tx.query("SELECT 1 / (random() * 0)::int FROM pg_sleep(0.1)", &[]),
            )
            .await;
            Ok(())
        })
        .await
        .expect_err("the server rolled it back");
    rolled_back_unseen(&tdb, &error).await;
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_before_its_failing_rows_is_seen_at_commit() {
    use futures_util::StreamExt as _;
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .transaction("dropped-stream", async |tx| {
            // The first write: its id is read with it.
            tx.execute("INSERT INTO orders VALUES (7, 'g')", &[])
                .await?;
            // Row 3 fails on the server; the closure reads one row and
            // drops the stream, so nobody sees the failure.
            let mut rows = tx
                .query_stream("SELECT 10 / (g - 3) FROM generate_series(1, 5) g", &[])
                .await?;
            let first = rows.next().await.expect("a first row")?;
            assert_eq!(first.get::<_, i32>(0), -5);
            drop(rows);
            Ok(())
        })
        .await
        .expect_err("the server rolled it back");
    rolled_back_unseen(&tdb, &error).await;

    // Read to its end, a stream leaves the transaction to commit.
    db.transaction("read-stream", async |tx| {
        tx.execute("INSERT INTO orders VALUES (8, 'h')", &[])
            .await?;
        let rows = tx
            .query_stream("SELECT g FROM generate_series(1, 5) g", &[])
            .await?;
        assert_eq!(rows.count().await, 5);
        Ok::<_, pgstack::Error>(())
    })
    .await
    .expect("committed");
    assert_eq!(count(&tdb, "orders").await, 1);
    done(db).await;
}

/// What the rule allows: a savepoint recovers a failed statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_a_savepoint_recovers_a_failed_statement() {
    let (tdb, db) = setup(|_| {}).await;
    db.transaction("savepoint-recovers", async |tx| {
        tx.execute("INSERT INTO orders VALUES (5, 'e')", &[])
            .await?;
        tx.batch_execute("SAVEPOINT before_dup").await?;
        let _ = tx.execute("INSERT INTO orders VALUES (5, 'e')", &[]).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT before_dup").await?;
        tx.execute("INSERT INTO orders VALUES (6, 'f')", &[])
            .await?;
        tx.batch_execute("RELEASE SAVEPOINT before_dup").await?;
        Ok::<_, pgstack::Error>(())
    })
    .await
    .expect("recovered by the savepoint: committed");
    assert_eq!(count(&tdb, "orders").await, 2);
    done(db).await;
}

// ----- 2. A closure that must not run again ---------------------------------

/// Another session holds the row `locks.id = 1` until the returned client
/// commits.
async fn hold_the_lock(tdb: &TestDb) -> pgstack::tokio_postgres::Client {
    let holder = tdb.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM locks WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    holder
}

const NOWAIT: &str = "SELECT * FROM locks WHERE id = 1 FOR UPDATE NOWAIT";
const RAISE_40001: &str = "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_closure_is_not_run_again_after_55p03_on_its_second_statement() {
    let (tdb, db) = setup(|c| c.retry.max_attempts = 3).await;
    let _holder = hold_the_lock(&tdb).await;
    let runs = AtomicU32::new(0);
    let error = db
        .write("place-order", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('order')", &[])
                .await?;
            conn.query(NOWAIT, &[]).await?;
            Ok(())
        })
        .await
        .expect_err("the lock is taken");
    let text = common::checked(&error);
    assert_eq!(runs.load(Ordering::Relaxed), 1, "ran once: {text}");
    assert_eq!(count(&tdb, "audit").await, 1);
    assert_eq!(error.code(), Some("55P03"), "{text}");
    assert!(is_partially_applied(&error), "{text}");
    assert!(!error.provably_not_sent(), "the insert happened: {text}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_closure_that_wrote_is_not_run_again() {
    let (tdb, db) = setup(|c| c.retry.max_attempts = 3).await;
    let _holder = hold_the_lock(&tdb).await;
    let runs = AtomicU32::new(0);
    // No replica: the read runs on the primary, where the insert succeeds.
    let error = db
        .read("read-that-writes", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('read')", &[])
                .await?;
            conn.query(NOWAIT, &[]).await?;
            Ok(())
        })
        .await
        .expect_err("the lock is taken");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "{}",
        common::checked(&error)
    );
    assert_eq!(count(&tdb, "audit").await, 1);
    assert!(!error.provably_not_sent());
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_closure_is_not_run_again_after_40001_on_its_second_statement() {
    let (tdb, db) = setup(|c| c.retry.max_attempts = 3).await;
    let runs = AtomicU32::new(0);
    let error = db
        .write("serialization-after-write", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('40001')", &[])
                .await?;
            conn.batch_execute(RAISE_40001).await?;
            Ok(())
        })
        .await
        .expect_err("raised");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "{}",
        common::checked(&error)
    );
    assert_eq!(error.code(), Some("40001"));
    assert!(!error.provably_not_sent());
    assert_eq!(count(&tdb, "audit").await, 1);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_closure_is_not_run_again_after_a_nested_pool_timeout() {
    // Two connections: the closure's own and one held elsewhere.
    let (tdb, db) = setup(|c| {
        c.pool.max_size = 2;
        c.pool.min_idle = 1;
        c.pool.acquire_timeout = Duration::from_millis(300);
        c.retry.max_attempts = 3;
        c.retry.deadline = Some(Duration::from_secs(3));
    })
    .await;
    let held = db.connection("hold", Route::Write).await.unwrap();
    let runs = AtomicU32::new(0);
    let inner = db.clone();
    let error = db
        .write("nested-timeout", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('nested')", &[])
                .await?;
            inner
                .execute(
                    "nested",
                    Route::Write,
                    "UPDATE locks SET id = id WHERE id = 2",
                    &[],
                )
                .await?;
            Ok(())
        })
        .await
        .expect_err("no connection for the nested call");
    let text = common::checked(&error);
    assert_eq!(runs.load(Ordering::Relaxed), 1, "{text}");
    assert!(is_partially_applied(&error), "{text}");
    assert!(!error.provably_not_sent(), "{text}");
    assert_eq!(count(&tdb, "audit").await, 1);
    drop(held);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_nested_call_wrote_outside_it_is_not_run_again() {
    let (tdb, db) = setup(|_| {}).await;
    let runs = AtomicU32::new(0);
    let outer = db.clone();
    let error = db
        .transaction("tx-with-nested-write", async |tx| {
            runs.fetch_add(1, Ordering::Relaxed);
            outer
                .execute(
                    "audit",
                    Route::Write,
                    "INSERT INTO audit (note) VALUES ('outside')",
                    &[],
                )
                .await?;
            tx.batch_execute(RAISE_40001).await?;
            Ok::<_, pgstack::Error>(())
        })
        .await
        .expect_err("raised");
    assert_eq!(
        runs.load(Ordering::Relaxed),
        1,
        "{}",
        common::checked(&error)
    );
    assert_eq!(count(&tdb, "audit").await, 1);
    assert!(!error.provably_not_sent());
    done(db).await;
}

/// What the rule allows: nothing reached the server (the lock refused the
/// closure's first statement), so it is run again until the lock is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_refused_before_any_effect_is_run_again() {
    let (tdb, db) = setup(|c| {
        c.retry.max_attempts = 50;
        c.retry.initial_backoff = Duration::from_millis(20);
        c.retry.max_backoff = Duration::from_millis(50);
    })
    .await;
    let holder = hold_the_lock(&tdb).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    let runs = AtomicU32::new(0);
    db.write("lock-first", async |conn| {
        runs.fetch_add(1, Ordering::Relaxed);
        conn.query(NOWAIT, &[]).await?;
        conn.execute("INSERT INTO audit (note) VALUES ('after-lock')", &[])
            .await?;
        Ok(())
    })
    .await
    .expect("retried until the lock was free");
    release.await.unwrap();
    assert!(runs.load(Ordering::Relaxed) > 1);
    assert_eq!(count(&tdb, "audit").await, 1);
    done(db).await;
}

// ----- 3. Temporary objects never reach another caller -----------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_table_on_a_shared_connection_is_refused_and_swallows_no_insert() {
    let (tdb, db) = setup(|_| {}).await;
    let error = db
        .execute(
            "temp",
            Route::Write,
            "CREATE TEMP TABLE accounts (id int)",
            &[],
        )
        .await
        .expect_err("refused");
    let text = common::checked(&error);
    assert!(is_usage(&error), "{text}");
    assert!(
        text.contains("temporary") && text.contains("Cluster::connection"),
        "{text}"
    );
    for i in 0..20_i32 {
        db.execute(
            "add",
            Route::Write,
            "INSERT INTO accounts VALUES ($1)",
            &[&i],
        )
        .await
        .unwrap();
    }
    assert_eq!(
        count(&tdb, "public.accounts").await,
        20,
        "every insert landed"
    );
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_into_a_temp_table_is_refused() {
    let (_tdb, db) = setup(|_| {}).await;
    for sql in [
        "SELECT * INTO TEMP copied FROM accounts",
        "SELECT * INTO TEMPORARY TABLE copied FROM accounts",
        "CREATE TEMPORARY TABLE copied AS SELECT * FROM accounts",
    ] {
        let error = db
            .execute("copy", Route::Write, sql, &[])
            .await
            .expect_err(sql);
        assert!(is_usage(&error), "{sql}: {error}");
    }
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_read_their_own_session_are_refused() {
    let (tdb, db) = setup(|_| {}).await;
    tdb.client()
        .await
        .unwrap()
        .batch_execute("CREATE SEQUENCE ticket")
        .await
        .unwrap();
    db.query_one("next", Route::Write, "SELECT nextval('ticket')", &[])
        .await
        .unwrap();
    // On a shared connection, currval would answer for whichever caller
    // last took a number on that connection.
    for sql in [
        "SELECT currval('ticket')",
        "SELECT lastval()",
        "INSERT INTO pg_temp.accounts VALUES (1)",
    ] {
        let error = db
            .query("session-read", Route::Write, sql, &[])
            .await
            .expect_err(sql);
        assert!(is_usage(&error), "{sql}: {error}");
        assert!(error.to_string().contains("its own session"), "{error}");
    }
    done(db).await;
}

/// A database whose pool is small enough that checkouts reuse server
/// processes.
async fn small_pool() -> (TestDb, Database) {
    setup(|c| {
        c.pool.max_size = 2;
        c.pool.min_idle = 1;
    })
    .await
}

async fn backend(conn: &pgstack::Connection) -> i32 {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Checks out enough connections to see every server process of a small
/// pool; returns each checkout's pid and `what` (a text query).
async fn every_checkout(db: &Database, what: &str) -> Vec<(i32, Option<String>)> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let conn = db.connection("tenant-b", Route::Write).await.unwrap();
        let pid = backend(&conn).await;
        let value: Option<String> = conn.query_one(what, &[]).await.unwrap().get(0);
        seen.push((pid, value));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_table_on_a_connection_of_ones_own_is_gone_at_the_next_checkout() {
    let (_tdb, db) = small_pool().await;
    let conn = db.connection("tenant-a", Route::Write).await.unwrap();
    let dirty = backend(&conn).await;
    conn.batch_execute("CREATE TEMP TABLE scratch (id int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    drop(conn);
    let seen = every_checkout(&db, "SELECT to_regclass('pg_temp.scratch')::text").await;
    assert!(
        seen.iter().any(|(pid, _)| *pid == dirty),
        "reused: {seen:?}"
    );
    assert!(seen.iter().all(|(_, t)| t.is_none()), "{seen:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temp_table_made_in_a_write_closure_is_gone_afterwards() {
    let (_tdb, db) = small_pool().await;
    db.write("tenant-a", async |conn| {
        conn.batch_execute("CREATE TEMP TABLE scratch AS SELECT 1 AS id")
            .await?;
        Ok(())
    })
    .await
    .unwrap();
    let seen = every_checkout(&db, "SELECT to_regclass('pg_temp.scratch')::text").await;
    assert!(seen.iter().all(|(_, t)| t.is_none()), "{seen:?}");
    done(db).await;
}

// ----- 4. Session settings, locks and listeners ------------------------------

async fn search_paths(db: &Database, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let row = db
            .query_one(
                "path",
                Route::Read,
                "SELECT current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        seen.push(row.get(0));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_on_a_shared_connection_is_refused_and_no_read_sees_it() {
    let (_tdb, db) = setup(|_| {}).await;
    let default_path = search_paths(&db, 1).await.remove(0);
    let error = db
        .execute(
            "set-path",
            Route::Write,
            "SELECT set_config('search_path', 'nowhere', false)",
            &[],
        )
        .await
        .expect_err("refused");
    assert!(common::checked(&error).contains("set_config"));
    let seen = search_paths(&db, 40).await;
    assert!(seen.iter().all(|p| *p == default_path), "{seen:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_config_with_a_parameter_for_is_local_is_refused() {
    let (_tdb, db) = setup(|_| {}).await;
    let default_path = search_paths(&db, 1).await.remove(0);
    let error = db
        .query(
            "set-path",
            Route::Read,
            "SELECT set_config('search_path', 'nowhere', $1)",
            &[&false],
        )
        .await
        .expect_err("refused: the parameter could be false");
    assert!(is_usage(&error), "{error}");
    // Scoped to the transaction, it is allowed, and gone after it.
    db.transaction("scoped", async |tx| {
        tx.query("SELECT set_config('search_path', 'nowhere', true)", &[])
            .await?;
        Ok::<_, pgstack::Error>(())
    })
    .await
    .unwrap();
    let seen = search_paths(&db, 40).await;
    assert!(seen.iter().all(|p| *p == default_path), "{seen:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_search_path_on_its_own_connection_never_reaches_the_next() {
    let (_tdb, db) = small_pool().await;
    let conn = db.connection("tenant-a", Route::Write).await.unwrap();
    let dirty = backend(&conn).await;
    conn.batch_execute("SET search_path = tenant_a, public")
        .await
        .unwrap();
    drop(conn);
    let seen = every_checkout(&db, "SELECT current_setting('search_path')").await;
    assert!(
        seen.iter().any(|(pid, _)| *pid == dirty),
        "reused: {seen:?}"
    );
    assert!(
        seen.iter()
            .all(|(_, p)| !p.as_deref().unwrap_or("").contains("tenant_a")),
        "{seen:?}"
    );
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_timeout_set_in_a_closure_cancels_no_later_statement() {
    let (_tdb, db) = small_pool().await;
    db.write("tenant-a", async |conn| {
        conn.batch_execute("SET statement_timeout = 1").await?;
        Ok(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..20 {
        db.query("sleepy", Route::Write, "SELECT pg_sleep(0.01)", &[])
            .await
            .unwrap();
        let conn = db.connection("sleepy", Route::Write).await.unwrap();
        conn.query("SELECT pg_sleep(0.01)", &[]).await.unwrap();
    }
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_advisory_lock_is_refused_when_shared_and_released_when_not() {
    let (tdb, db) = small_pool().await;
    let error = db
        .query("lock", Route::Write, "SELECT pg_advisory_lock(42)", &[])
        .await
        .expect_err("refused");
    assert!(common::checked(&error).contains("pg_advisory_xact_lock"));
    // Taken on a connection of one's own (through the raw client, even):
    // released when it goes back.
    let mut conn = db.connection("locker", Route::Write).await.unwrap();
    conn.client_unchecked()
        .batch_execute("SELECT pg_advisory_lock(77)")
        .await
        .unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = tdb.client().await.unwrap();
    for key in [42_i64, 77] {
        let free: bool = other
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .unwrap()
            .get(0);
        assert!(free, "lock {key} is free");
    }
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_on_a_connection_of_ones_own_is_gone_at_the_next_checkout() {
    let (_tdb, db) = small_pool().await;
    let error = db
        .execute("listen", Route::Write, "LISTEN accounts_changed", &[])
        .await
        .expect_err("refused when shared");
    assert!(is_usage(&error));
    let conn = db.connection("listener", Route::Write).await.unwrap();
    conn.batch_execute("LISTEN accounts_changed").await.unwrap();
    drop(conn);
    let seen = every_checkout(
        &db,
        "SELECT string_agg(c, ',') FROM pg_listening_channels() c",
    )
    .await;
    assert!(seen.iter().all(|(_, c)| c.is_none()), "{seen:?}");
    done(db).await;
}

// ----- 5. Transaction control inside a transaction closure ------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_inside_a_transaction_closure_is_refused() {
    let (tdb, db) = setup(|_| {}).await;
    // Had the COMMIT run, the first insert would stay after the abort.
    let refused = std::sync::Mutex::new(None);
    let error = db
        .transaction("commit-inside", async |tx| {
            tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
                .await?;
            *refused.lock().unwrap() = Some(tx.execute("COMMIT", &[]).await.map(|_| ()));
            tx.execute("INSERT INTO orders VALUES (2, 'b')", &[])
                .await?;
            Err::<(), _>(Error::abort("changed my mind"))
        })
        .await
        .expect_err("aborted");
    assert!(matches!(error, Error::Aborted(_)), "{error}");
    let refused = refused.lock().unwrap().take().expect("ran");
    assert!(
        refused.as_ref().is_err_and(is_usage),
        "COMMIT refused: {refused:?}"
    );
    assert_eq!(
        count(&tdb, "orders").await,
        0,
        "one transaction, rolled back"
    );
    done(db).await;
}

/// Each form of transaction control through `method`, inside a transaction
/// that then commits one row: every one refused, the transaction intact.
async fn refused_forms(forms: &[&str], batch: bool) {
    let (tdb, db) = setup(|_| {}).await;
    let outcomes = std::sync::Mutex::new(Vec::new());
    db.transaction("forms", async |tx| {
        for sql in forms {
            let result = if batch {
                tx.batch_execute(&format!("SELECT 1; {sql}; SELECT 2"))
                    .await
            } else {
                tx.execute(sql, &[]).await.map(|_| ())
            };
            outcomes.lock().unwrap().push((sql.to_string(), result));
        }
        tx.execute("INSERT INTO orders VALUES (3, 'c')", &[])
            .await?;
        Ok::<_, pgstack::Error>(())
    })
    .await
    .expect("refused statements do not doom the transaction");
    for (sql, result) in outcomes.into_inner().unwrap() {
        let error = result.expect_err(&sql);
        assert!(is_usage(&error), "{sql}: {error}");
        assert!(
            error.to_string().contains("savepoints are allowed"),
            "{error}"
        );
    }
    assert_eq!(count(&tdb, "orders").await, 1);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_forms_inside_a_transaction_closure_are_refused() {
    refused_forms(
        &[
            "END",
            "ROLLBACK",
            "abort",
            "COMMIT AND CHAIN",
            "/* x */ commit",
        ],
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beginning_and_two_phase_forms_inside_a_transaction_closure_are_refused() {
    refused_forms(
        &["BEGIN", "START TRANSACTION", "PREPARE TRANSACTION 'x'"],
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_hidden_in_a_batch_is_refused() {
    refused_forms(&["COMMIT", "ROLLBACK", "BEGIN"], true).await;
}

// ----- 6. A partition inside a transaction or a closure ----------------------

struct Proxied {
    proxy: ChaosProxy,
    tdb: TestDb,
    db: Database,
    _server: TestCluster,
}

/// Statement timeout 1 s, connect timeout 1 s: a round trip is bounded at
/// 1.5 s, below their sum.
const PARTITION_GOAL: Duration = Duration::from_secs(2);

impl Proxied {
    async fn start() -> Proxied {
        let server = TestCluster::start().await.unwrap();
        let tdb = TestDb::on(&server).await.unwrap();
        tdb.client()
            .await
            .unwrap()
            .batch_execute(TABLES)
            .await
            .unwrap();
        let proxy = ChaosProxy::start(server.addr()).await.unwrap();
        let mut config = common::config(&proxy.url(tdb.name()));
        config.query.statement_timeout = Some(Duration::from_secs(1));
        config.pool.connect_timeout = Duration::from_secs(1);
        config.pool.acquire_timeout = Duration::from_secs(1);
        config.retry.deadline = Some(Duration::from_secs(2));
        config.health.interval = Duration::from_secs(30);
        let db = common::connect(config).await;
        Proxied {
            proxy,
            tdb,
            db,
            _server: server,
        }
    }

    /// The network back, the database shut down; the test database and its
    /// server (dropping the server stops it).
    async fn healed(self) -> (TestDb, TestCluster) {
        self.proxy.set_mode(ProxyMode::PassThrough);
        done(self.db).await;
        (self.tdb, self._server)
    }
}

/// `work`, which must end within 30 s; the error and how long it took.
async fn within<T: std::fmt::Debug>(
    work: impl Future<Output = Result<T, Error>>,
) -> (Error, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .expect("no hang");
    (result.expect_err("the network is gone"), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_after_the_first_statement_fails_the_transaction_in_time() {
    let setup = Proxied::start().await;
    let proxy = &setup.proxy;
    let (error, took) = within(setup.db.transaction("partitioned", async |tx| {
        tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
            .await?;
        proxy.set_mode(ProxyMode::Blackhole);
        tx.execute("INSERT INTO orders VALUES (2, 'b')", &[])
            .await?;
        Ok(())
    }))
    .await;
    let text = common::checked(&error);
    assert!(
        matches!(&error, Error::RolledBack { source, .. } if matches!(**source, Error::Timeout { .. })),
        "{text}"
    );
    assert!(error.provably_not_sent(), "{text}");
    assert!(took < PARTITION_GOAL, "{took:?}: {text}");
    let (tdb, _server) = setup.healed().await;
    assert_eq!(count(&tdb, "orders").await, 0, "not committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_with_commit_in_flight_is_an_unknown_outcome_in_time() {
    let setup = Proxied::start().await;
    let proxy = &setup.proxy;
    let (error, took) = within(setup.db.transaction("commit-partitioned", async |tx| {
        tx.execute("INSERT INTO orders VALUES (3, 'c')", &[])
            .await?;
        proxy.set_mode(ProxyMode::Blackhole);
        Ok(())
    }))
    .await;
    assert!(
        error.is_commit_outcome_unknown(),
        "{}",
        common::checked(&error)
    );
    // The round trip, then the look-up of the outcome (connect timeout).
    assert!(took < PARTITION_GOAL + Duration::from_secs(1), "{took:?}");
    setup.healed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_inside_a_write_closure_fails_it_in_time_as_an_unknown_outcome() {
    let setup = Proxied::start().await;
    let proxy = &setup.proxy;
    let runs = AtomicU32::new(0);
    let (error, took) = within(setup.db.write("closure-partitioned", async |conn| {
        runs.fetch_add(1, Ordering::Relaxed);
        conn.execute("INSERT INTO audit (note) VALUES ('closure')", &[])
            .await?;
        proxy.set_mode(ProxyMode::Blackhole);
        conn.execute("INSERT INTO audit (note) VALUES ('lost')", &[])
            .await?;
        Ok(())
    }))
    .await;
    assert!(
        error.is_commit_outcome_unknown(),
        "{}",
        common::checked(&error)
    );
    assert!(took < PARTITION_GOAL, "{took:?}");
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    let (tdb, _server) = setup.healed().await;
    assert_eq!(count(&tdb, "audit WHERE note = 'closure'").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_under_a_raw_connection_fails_its_query_in_time() {
    let setup = Proxied::start().await;
    let conn = setup.db.connection("raw", Route::Write).await.unwrap();
    setup.proxy.set_mode(ProxyMode::Blackhole);
    let (error, took) = within(conn.query("SELECT 1", &[])).await;
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    assert!(took < PARTITION_GOAL, "{took:?}");
    drop(conn);
    setup.healed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_write_lost_in_a_partition_is_not_a_plain_time_out() {
    let setup = Proxied::start().await;
    let insert = "INSERT INTO audit (note) VALUES ($1)";
    // Known to be short, so it is pipelined on a shared connection.
    for _ in 0..3 {
        setup
            .db
            .execute("shared-write", Route::Write, insert, &[&"before"])
            .await
            .unwrap();
    }
    setup.proxy.set_mode(ProxyMode::Blackhole);
    let (error, took) = within(
        setup
            .db
            .execute("shared-write", Route::Write, insert, &[&"lost"]),
    )
    .await;
    let text = common::checked(&error);
    // It may still run: its outcome is unknown (a plain time-out would
    // invite a repeat).
    assert!(error.is_commit_outcome_unknown(), "{text}");
    assert!(took < PARTITION_GOAL, "{took:?}: {text}");
    setup.healed().await;
}

// ----- 7. Head-of-line blocking ------------------------------------------

/// Runs `SELECT 1` in `tasks` tasks for `for_how_long`; the slowest call.
async fn fast_calls(db: &Database, tasks: usize, for_how_long: Duration) -> Duration {
    let until = Instant::now() + for_how_long;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut worst = Duration::ZERO;
                while Instant::now() < until {
                    let t = Instant::now();
                    db.query_one("fast", Route::Read, "SELECT 1", &[])
                        .await
                        .unwrap();
                    worst = worst.max(t.elapsed());
                }
                worst
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    for handle in handles {
        worst = worst.max(handle.await.unwrap());
    }
    worst
}

/// The slowest fast call must stay well below the long statement's 2 s.
const HOL_LIMIT: Duration = Duration::from_millis(800);

async fn hol_setup() -> (TestDb, Database) {
    let (tdb, db) = setup(|c| c.pool.max_size = 12).await;
    // The fast statement is known.
    fast_calls(&db, 1, Duration::from_millis(50)).await;
    (tdb, db)
}

fn spawn_query(
    db: &Database,
    sql: &'static str,
    param: Option<f64>,
) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        match param {
            Some(p) => db.query("long", Route::Read, sql, &[&p]).await.unwrap(),
            None => db.query("long", Route::Read, sql, &[]).await.unwrap(),
        };
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_statement_never_seen_before_does_not_hold_up_short_ones() {
    let (_tdb, db) = hol_setup().await;
    let sleeper = spawn_query(&db, "SELECT pg_sleep(2)", None);
    let worst = fast_calls(&db, 8, Duration::from_millis(1500)).await;
    sleeper.await.unwrap();
    assert!(worst < HOL_LIMIT, "the worst SELECT 1 took {worst:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_known_to_be_long_does_not_hold_up_short_ones() {
    let (_tdb, db) = hol_setup().await;
    // Its first run, alone: now it is known to take 2 s.
    db.query("long", Route::Read, "SELECT pg_sleep(2)", &[])
        .await
        .unwrap();
    let sleeper = spawn_query(&db, "SELECT pg_sleep(2)", None);
    let worst = fast_calls(&db, 8, Duration::from_millis(1500)).await;
    sleeper.await.unwrap();
    assert!(worst < HOL_LIMIT, "the worst SELECT 1 took {worst:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_statement_turned_long_holds_up_nothing_started_after_it() {
    let (_tdb, db) = hol_setup().await;
    for _ in 0..5 {
        db.query("sometimes", Route::Read, "SELECT pg_sleep($1)", &[&0.0_f64])
            .await
            .unwrap();
    }
    let slow = spawn_query(&db, "SELECT pg_sleep($1)", Some(2.0));
    // Past the busy threshold: the lane it is on counts as busy.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let worst = fast_calls(&db, 8, Duration::from_millis(1400)).await;
    slow.await.unwrap();
    assert!(worst < HOL_LIMIT, "the worst SELECT 1 took {worst:?}");
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_a_lock_holds_up_nothing_started_after_it() {
    let (tdb, db) = hol_setup().await;
    let bump = "UPDATE locks SET id = id WHERE id = 1";
    for _ in 0..5 {
        db.execute("bump", Route::Write, bump, &[]).await.unwrap();
    }
    let holder = hold_the_lock(&tdb).await;
    let blocked = {
        let db = db.clone();
        tokio::spawn(async move {
            db.execute("bump", Route::Write, bump, &[]).await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut worst = Duration::ZERO;
    for i in 0..200_i32 {
        let t = Instant::now();
        db.query_one("echo", Route::Write, "SELECT $1::int", &[&i])
            .await
            .unwrap();
        worst = worst.max(t.elapsed());
    }
    holder.batch_execute("COMMIT").await.unwrap();
    blocked.await.unwrap();
    assert!(worst < HOL_LIMIT, "the worst statement took {worst:?}");
    done(db).await;
}

// ----- read-your-writes --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_tracked_never_reports_a_committed_write_as_not_sent() {
    // Three connections: one shared, two for callers.
    let (tdb, db) = setup(|c| {
        c.pool.max_size = 3;
        c.pool.min_idle = 1;
        c.pool.acquire_timeout = Duration::from_millis(300);
        c.retry.deadline = Some(Duration::from_secs(2));
    })
    .await;
    let insert = "INSERT INTO orders VALUES ($1, 'tracked')";
    let (_, first) = db
        .execute_tracked("tracked", insert, &[&1_i64])
        .await
        .unwrap();
    // Every connection but the shared one is taken: the position is read on
    // the write's own connection, so it still comes back, and the write is
    // never reported as "not sent".
    let held = [
        db.connection("hold-1", Route::Write).await.unwrap(),
        db.connection("hold-2", Route::Write).await.unwrap(),
    ];
    let result = db.execute_tracked("tracked", insert, &[&2_i64]).await;
    if let Err(error) = &result {
        assert!(!error.provably_not_sent(), "{}", common::checked(error));
    }
    drop(held);
    assert_eq!(
        count(&tdb, "orders").await,
        2,
        "the write happened: {result:?}"
    );
    let (n, position) = result.unwrap();
    assert_eq!(n, 1);
    assert!(position >= first);
    done(db).await;
}

// ----- the retry table, per call shape (docs/connection.md) ------------------

/// Ends the session the statement runs in, the first time only.
const KILL_MYSELF: &str = "SELECT pg_terminate_backend(pg_backend_pid())";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_closure_that_only_read_is_run_again_after_its_connection_was_lost() {
    let (_tdb, db) = setup(|_| {}).await;
    let runs = AtomicU32::new(0);
    let total: i64 = db
        .read("count", async |conn| {
            let run = runs.fetch_add(1, Ordering::Relaxed);
            let row = conn.query_one("SELECT count(*) FROM orders", &[]).await?;
            if run == 0 {
                conn.query(KILL_MYSELF, &[]).await?;
            }
            Ok(row.get(0))
        })
        .await
        .expect("reads only: run again");
    assert_eq!(total, 0);
    assert_eq!(runs.load(Ordering::Relaxed), 2);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_write_closure_is_run_again_after_its_write_reached_the_server() {
    let (tdb, db) = setup(|_| {}).await;
    let runs = AtomicU32::new(0);
    db.write(
        pgstack::Op::from("upsert-order").idempotent(),
        async |conn| {
            let run = runs.fetch_add(1, Ordering::Relaxed);
            conn.execute(
                "INSERT INTO orders VALUES (7, 'g') ON CONFLICT (id) DO NOTHING",
                &[],
            )
            .await?;
            if run == 0 {
                conn.batch_execute(RAISE_40001).await?;
            }
            Ok(())
        },
    )
    .await
    .expect("idempotent: run again");
    assert_eq!(runs.load(Ordering::Relaxed), 2);
    assert_eq!(count(&tdb, "orders").await, 1);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_connection_was_lost_before_commit_is_run_again() {
    let (tdb, db) = setup(|_| {}).await;
    let runs = AtomicU32::new(0);
    db.transaction("lost-before-commit", async |tx| {
        let run = runs.fetch_add(1, Ordering::Relaxed);
        tx.execute("INSERT INTO orders VALUES (8, 'h')", &[])
            .await?;
        if run == 0 {
            tx.query(KILL_MYSELF, &[]).await?;
        }
        Ok::<_, pgstack::Error>(())
    })
    .await
    .expect("nothing committed the first time: run again");
    assert_eq!(runs.load(Ordering::Relaxed), 2);
    assert_eq!(count(&tdb, "orders").await, 1);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_checkout_is_retried_until_a_connection_is_free() {
    let (_tdb, db) = setup(|c| {
        c.pool.max_size = 2;
        c.pool.min_idle = 1;
        c.pool.acquire_timeout = Duration::from_millis(100);
        c.retry.max_attempts = 20;
        c.retry.deadline = Some(Duration::from_secs(5));
    })
    .await;
    let held = [
        db.connection("hold-1", Route::Write).await.unwrap(),
        db.connection("hold-2", Route::Write).await.unwrap(),
    ];
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
    });
    let started = Instant::now();
    let conn = db
        .connection("patient", Route::Write)
        .await
        .expect("a connection once one is free");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(db.metrics().cluster.retries > 0);
    release.await.unwrap();
    drop(conn);
    done(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_connections_statement_is_never_repeated() {
    let (tdb, db) = setup(|c| c.retry.max_attempts = 5).await;
    let _holder = hold_the_lock(&tdb).await;
    let conn = db.connection("raw", Route::Write).await.unwrap();
    conn.execute("INSERT INTO audit (note) VALUES ('raw')", &[])
        .await
        .unwrap();
    let error = conn
        .query(NOWAIT, &[])
        .await
        .expect_err("the lock is taken");
    assert_eq!(error.code(), Some("55P03"));
    assert_eq!(count(&tdb, "audit").await, 1);
    assert_eq!(db.metrics().cluster.retries, 0);
    drop(conn);
    done(db).await;
}
