#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! The safety contract under misuse, through `pgstack::Database` against the
//! kit's servers: callers who do the surprising thing.
//!
//! - **Swallowed errors**: a transaction closure that ignores a failed
//!   statement and returns `Ok` is never reported committed.
//! - **Repeated closures**: a closure whose statement reached the server is
//!   not run again because a later one failed with a "retryable" error.
//! - **Temporary objects** and **session settings** never reach another
//!   caller: refused on shared connections, reset on connections of one's
//!   own.
//! - **Transaction control** inside a transaction closure is refused.
//! - **Partitions**: every round trip is bounded, inside transactions and
//!   closures too.
//! - **Head-of-line blocking**: a long statement does not hold up short
//!   ones.
//!
//! Each case has variants of its own; the module docs of each section say
//! which rule they exercise.

mod common;

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

async fn with_orders(db: &TestDb) {
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE orders (id bigint PRIMARY KEY, item text); \
             CREATE TABLE locks (id int PRIMARY KEY); INSERT INTO locks VALUES (1); \
             CREATE TABLE audit (id bigserial PRIMARY KEY, note text)",
        )
        .await
        .unwrap();
}

fn is_transaction_aborted(error: &Error) -> bool {
    matches!(error, Error::TransactionAborted { .. })
}

fn is_partially_applied(error: &Error) -> bool {
    matches!(error, Error::PartiallyApplied { .. })
}

// ----- 1. A transaction whose closure swallowed an error --------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swallowed_statement_error_never_reports_a_commit() {
    let tdb = TestDb::new().await.unwrap();
    with_orders(&tdb).await;
    let db = database(&tdb, |_| {}).await;

    // The case: a duplicate insert's error ignored.
    let result = db
        .transaction("swallow-duplicate", async |tx| {
            tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
                .await?;
            let _ = tx.execute("INSERT INTO orders VALUES (1, 'a')", &[]).await;
            Ok(())
        })
        .await;
    let error = result.expect_err("never Ok after a failed statement");
    let text = common::checked(&error);
    assert!(is_transaction_aborted(&error), "{text}");
    assert!(
        text.contains("INSERT INTO orders VALUES (1, 'a')") && text.contains("rolled back"),
        "names the failed statement: {text}"
    );
    assert_eq!(error.code(), Some("23505"), "{text}");
    assert_eq!(count(&tdb, "orders").await, 0);

    // Variant: several failures; the first one is named, not the 25P02s
    // that follow it.
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
    assert!(
        text.contains("SELECT 1 / 0") && text.contains("22012"),
        "{text}"
    );
    assert_eq!(count(&tdb, "orders").await, 0);

    // Variant: an error swallowed with a value returned (`Ok(n)`).
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
    assert_eq!(error.code(), Some("42P01"), "{}", common::checked(&error));
    assert_eq!(count(&tdb, "orders").await, 0);

    // Variant: a statement whose result the closure never waited for
    // (dropped future) fails on the server: the check at COMMIT sees it.
    let error = db
        .transaction("dropped-failure", async |tx| {
            tx.execute("INSERT INTO orders VALUES (4, 'd')", &[])
                .await?;
            let _ = tokio::time::timeout(
                Duration::from_millis(5),
                tx.query("SELECT 1 / (random() * 0)::int FROM pg_sleep(0.1)", &[]),
            )
            .await;
            Ok(())
        })
        .await
        .expect_err("the server rolled it back");
    let text = common::checked(&error);
    assert!(is_transaction_aborted(&error), "{text}");
    assert!(text.contains("did not wait for"), "{text}");
    assert_eq!(count(&tdb, "orders").await, 0);

    // The recovery the rule allows: ROLLBACK TO SAVEPOINT.
    db.transaction("savepoint-recovers", async |tx| {
        tx.execute("INSERT INTO orders VALUES (5, 'e')", &[])
            .await?;
        tx.batch_execute("SAVEPOINT before_dup").await?;
        let _ = tx.execute("INSERT INTO orders VALUES (5, 'e')", &[]).await;
        tx.batch_execute("ROLLBACK TO SAVEPOINT before_dup").await?;
        tx.execute("INSERT INTO orders VALUES (6, 'f')", &[])
            .await?;
        tx.batch_execute("RELEASE SAVEPOINT before_dup").await?;
        Ok(())
    })
    .await
    .expect("recovered by the savepoint: committed");
    assert_eq!(count(&tdb, "orders").await, 2);
    db.shutdown(Duration::from_secs(5)).await;
}

// ----- 2. A closure that must not run again ---------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_whose_write_reached_the_server_is_not_run_again() {
    let tdb = TestDb::new().await.unwrap();
    with_orders(&tdb).await;
    let db = database(&tdb, |c| {
        c.retry.max_attempts = 3;
    })
    .await;
    // Another session holds the row the closure wants NOWAIT.
    let holder = tdb.client().await.unwrap();
    holder
        .batch_execute("BEGIN; SELECT * FROM locks WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();

    // The case: INSERT, then 55P03 on the second statement.
    let runs = AtomicU32::new(0);
    let error = db
        .write("place-order", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('order')", &[])
                .await?;
            conn.query("SELECT * FROM locks WHERE id = 1 FOR UPDATE NOWAIT", &[])
                .await?;
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

    // Variant: the same from a `read` closure, which falls back to the
    // primary (no replica) and wrote there.
    runs.store(0, Ordering::Relaxed);
    let error = db
        .read("read-that-writes", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('read')", &[])
                .await?;
            conn.query("SELECT * FROM locks WHERE id = 1 FOR UPDATE NOWAIT", &[])
                .await?;
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
    assert_eq!(count(&tdb, "audit").await, 2);
    assert!(!error.provably_not_sent());

    // Variant: a "retryable" server error (40001, raised by a DO block) on
    // the second statement.
    runs.store(0, Ordering::Relaxed);
    let error = db
        .write("serialization-after-write", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('40001')", &[])
                .await?;
            conn.batch_execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
            )
            .await?;
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
    assert_eq!(count(&tdb, "audit").await, 3);

    // Variant: a nested call's pool time-out after the first write: the pool
    // of 2 is exhausted by the closure itself and a held connection.
    let small = database(&tdb, |c| {
        c.pool.max_size = 2;
        c.pool.min_idle = 1;
        c.pool.acquire_timeout = Duration::from_millis(300);
        c.retry.max_attempts = 3;
        c.retry.deadline = Some(Duration::from_secs(3));
    })
    .await;
    let held = small.connection("hold", Route::Write).await.unwrap();
    runs.store(0, Ordering::Relaxed);
    let inner = small.clone();
    let error = small
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
    assert_eq!(count(&tdb, "audit").await, 4);
    drop(held);

    // Variant: a transaction with a nested autocommit write outside it, and
    // a serialization failure inside: the nested write is not repeated.
    runs.store(0, Ordering::Relaxed);
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
            tx.batch_execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
            )
            .await?;
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
    assert_eq!(count(&tdb, "audit").await, 5);
    assert!(!error.provably_not_sent());

    // Control: nothing reached the server (the lock refused the first
    // statement), so the closure is repeated until the lock is free.
    runs.store(0, Ordering::Relaxed);
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    let patient = database(&tdb, |c| {
        c.retry.max_attempts = 50;
        c.retry.initial_backoff = Duration::from_millis(20);
        c.retry.max_backoff = Duration::from_millis(50);
    })
    .await;
    patient
        .write("lock-first", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.query("SELECT * FROM locks WHERE id = 1 FOR UPDATE NOWAIT", &[])
                .await?;
            conn.execute("INSERT INTO audit (note) VALUES ('after-lock')", &[])
                .await?;
            Ok(())
        })
        .await
        .expect("retried until the lock was free");
    release.await.unwrap();
    assert!(runs.load(Ordering::Relaxed) > 1);
    assert_eq!(count(&tdb, "audit").await, 6);
    for db in [db, small, patient] {
        db.shutdown(Duration::from_secs(5)).await;
    }
}

// ----- 3 and 4. Session state never reaches another caller -------------------

/// `current_setting('search_path')` seen by `n` reads.
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
async fn session_statements_on_shared_connections_are_refused_saying_what_to_use() {
    let tdb = TestDb::new().await.unwrap();
    tdb.client()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE accounts (id int)")
        .await
        .unwrap();
    let db = database(&tdb, |_| {}).await;
    let default_path = search_paths(&db, 1).await.remove(0);

    // The case: a temporary table that would have swallowed later inserts.
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
    assert!(matches!(error, Error::Usage { .. }), "{text}");
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

    // The case: set_config(.., false) on a shared connection.
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
    assert!(
        search_paths(&db, 40)
            .await
            .iter()
            .all(|p| *p == default_path)
    );

    // Variants: the third argument a parameter; SET; SELECT INTO TEMP;
    // session advisory locks; LISTEN; currval; pg_temp.
    for sql in [
        "SELECT set_config('search_path', 'nowhere', $1)",
        "SET search_path = nowhere",
        "SELECT * INTO TEMP copied FROM accounts",
        "SELECT pg_advisory_lock(42)",
        "LISTEN accounts_changed",
        "SELECT currval('no_such_seq')",
        "INSERT INTO pg_temp.accounts VALUES (1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    ] {
        let flag = true;
        let params: &[&(dyn pgstack::ToSql + Sync)] =
            if sql.contains("$1") { &[&flag] } else { &[] };
        let error = db
            .query("session", Route::Read, sql, params)
            .await
            .expect_err(sql);
        assert!(matches!(error, Error::Usage { .. }), "{sql}: {error}");
        assert!(error.provably_not_sent());
    }
    assert!(
        search_paths(&db, 40)
            .await
            .iter()
            .all(|p| *p == default_path)
    );
    // Nobody holds the advisory lock.
    let free: bool = tdb
        .client()
        .await
        .unwrap()
        .query_one("SELECT pg_try_advisory_lock(42)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free);

    // Statements outside the allow-list that leave the session alone still
    // run, on a connection of their own.
    db.execute("ddl", Route::Write, "CREATE TABLE more (id int)", &[])
        .await
        .unwrap();
    db.execute(
        "do",
        Route::Write,
        "DO $$ BEGIN PERFORM set_config('search_path', 'nowhere', false); END $$",
        &[],
    )
    .await
    .unwrap();
    assert!(
        search_paths(&db, 40)
            .await
            .iter()
            .all(|p| *p == default_path),
        "the DO block's setting did not outlive its connection's return"
    );
    db.shutdown(Duration::from_secs(5)).await;
}

/// A database whose pool is small enough that checkouts reuse server
/// processes, and the pid of every checkout's backend.
async fn backend(conn: &pgstack::Connection) -> i32 {
    conn.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_session_never_reaches_the_next_checkout() {
    let tdb = TestDb::new().await.unwrap();
    let db = database(&tdb, |c| {
        c.pool.max_size = 2;
        c.pool.min_idle = 1;
    })
    .await;
    let reset_seen = || async {
        // Enough checkouts to see every server process of the pool.
        let mut clean = Vec::new();
        for _ in 0..6 {
            let conn = db.connection("tenant-b", Route::Write).await.unwrap();
            let pid = backend(&conn).await;
            let path: String = conn
                .query_one("SELECT current_setting('search_path')", &[])
                .await
                .unwrap()
                .get(0);
            let timeout: String = conn
                .query_one("SELECT current_setting('statement_timeout')", &[])
                .await
                .unwrap()
                .get(0);
            let temp: Option<String> = conn
                .query_one("SELECT to_regclass('pg_temp.scratch')::text", &[])
                .await
                .unwrap()
                .get(0);
            let channels: i64 = conn
                .query_one("SELECT count(*) FROM pg_listening_channels()", &[])
                .await
                .unwrap()
                .get(0);
            clean.push((pid, path, timeout, temp, channels));
        }
        clean
    };

    // Tenant A, on a connection of its own: SET search_path, a temporary
    // table, LISTEN.
    let conn = db.connection("tenant-a", Route::Write).await.unwrap();
    let dirty_pid = backend(&conn).await;
    conn.batch_execute(
        "SET search_path = tenant_a; CREATE TEMP TABLE scratch (id int); LISTEN tenant_a",
    )
    .await
    .unwrap();
    drop(conn);
    // Variant: in a write closure, a statement timeout of 1 ms.
    db.write("tenant-a-closure", async |conn| {
        conn.batch_execute("SET statement_timeout = 1").await?;
        Ok(())
    })
    .await
    .unwrap();
    // Variant: a session advisory lock through the raw client.
    let mut conn = db.connection("tenant-a-raw", Route::Write).await.unwrap();
    conn.client_unchecked()
        .batch_execute("SELECT pg_advisory_lock(77)")
        .await
        .unwrap();
    drop(conn);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let seen = reset_seen().await;
    assert!(
        seen.iter().any(|(pid, ..)| *pid == dirty_pid),
        "the dirty server process was reset and reused, not closed: {seen:?}"
    );
    for (pid, path, timeout, temp, channels) in &seen {
        assert!(!path.contains("tenant_a"), "{pid}: {path}");
        assert_ne!(timeout, "1ms", "{pid}");
        assert_eq!(temp, &None, "{pid}");
        assert_eq!(*channels, 0, "{pid}");
    }
    // Statements after tenant A's closure are not cancelled by its timeout.
    for _ in 0..20 {
        db.query("sleepy", Route::Write, "SELECT pg_sleep(0.005)", &[])
            .await
            .unwrap();
    }
    let free: bool = tdb
        .client()
        .await
        .unwrap()
        .query_one("SELECT pg_try_advisory_lock(77)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(free, "the advisory lock went with the reset");
    let resets: u64 = db
        .metrics()
        .cluster
        .nodes
        .iter()
        .map(|n| n.pool.session_resets)
        .sum();
    assert!(resets >= 3, "{resets} session resets");
    db.shutdown(Duration::from_secs(5)).await;
}

// ----- 5. Transaction control inside a transaction closure ------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_control_inside_a_transaction_is_refused() {
    let tdb = TestDb::new().await.unwrap();
    with_orders(&tdb).await;
    let db = database(&tdb, |_| {}).await;

    // The case: COMMIT half-way, then more statements, then an error: had
    // the COMMIT run, the first insert would have stayed.
    let error = db
        .transaction("commit-inside", async |tx| {
            tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
                .await?;
            let refused = tx.execute("COMMIT", &[]).await;
            assert!(
                matches!(refused, Err(Error::Usage { .. })),
                "COMMIT refused: {refused:?}"
            );
            tx.execute("INSERT INTO orders VALUES (2, 'b')", &[])
                .await?;
            Err::<(), _>(Error::abort("changed my mind"))
        })
        .await
        .expect_err("aborted");
    assert!(matches!(error, Error::Aborted(_)));
    assert_eq!(
        count(&tdb, "orders").await,
        0,
        "one transaction, rolled back"
    );

    // Variants: every other form, and through each method.
    let forms = [
        "END",
        "ROLLBACK",
        "abort",
        "BEGIN",
        "START TRANSACTION",
        "PREPARE TRANSACTION 'x'",
        "COMMIT AND CHAIN",
        "/* sneaky */ commit",
    ];
    db.transaction("forms", async |tx| {
        for sql in forms {
            for result in [
                tx.execute(sql, &[]).await.map(|_| ()),
                tx.batch_execute(sql).await,
                tx.simple_query(sql).await.map(|_| ()),
                tx.batch_execute(&format!("SELECT 1; {sql}; SELECT 2"))
                    .await,
            ] {
                let error = result.expect_err(sql);
                assert!(matches!(error, Error::Usage { .. }), "{sql}: {error}");
                assert!(error.to_string().contains("savepoints are allowed"));
            }
        }
        tx.execute("INSERT INTO orders VALUES (3, 'c')", &[])
            .await?;
        Ok(())
    })
    .await
    .expect("refused statements do not doom the transaction");
    assert_eq!(count(&tdb, "orders").await, 1);
    db.shutdown(Duration::from_secs(5)).await;
}

// ----- 6. A partition inside a transaction or a closure ----------------------

struct Proxied {
    proxy: ChaosProxy,
    tdb: TestDb,
    _server: TestCluster,
}

impl Proxied {
    async fn start() -> Proxied {
        let server = TestCluster::start().await.unwrap();
        let tdb = TestDb::on(&server).await.unwrap();
        with_orders(&tdb).await;
        let proxy = ChaosProxy::start(server.addr()).await.unwrap();
        Proxied {
            proxy,
            tdb,
            _server: server,
        }
    }

    /// Statement timeout 1 s, connect timeout 1 s: a round trip is bounded
    /// at 1.5 s, below their sum.
    async fn database(&self) -> Database {
        let mut config = common::config(&self.proxy.url(self.tdb.name()));
        config.query.statement_timeout = Some(Duration::from_secs(1));
        config.pool.connect_timeout = Duration::from_secs(1);
        config.pool.acquire_timeout = Duration::from_secs(1);
        config.retry.deadline = Some(Duration::from_secs(2));
        config.health.interval = Duration::from_secs(30);
        common::connect(config).await
    }
}

/// statement_timeout + connect_timeout of [`Proxied::database`].
const PARTITION_GOAL: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_fails_a_transaction_within_its_deadline() {
    let setup = Proxied::start().await;
    let db = setup.database().await;
    let proxy = &setup.proxy;

    // The case: black hole after the first statement.
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        db.transaction("partitioned", async |tx| {
            tx.execute("INSERT INTO orders VALUES (1, 'a')", &[])
                .await?;
            proxy.set_mode(ProxyMode::Blackhole);
            tx.execute("INSERT INTO orders VALUES (2, 'b')", &[])
                .await?;
            Ok(())
        }),
    )
    .await
    .expect("no hang");
    let took = started.elapsed();
    let error = result.expect_err("the network is gone");
    let text = common::checked(&error);
    assert!(matches!(error, Error::Timeout { .. }), "{text}");
    assert!(took < PARTITION_GOAL, "{took:?}: {text}");
    proxy.set_mode(ProxyMode::PassThrough);
    assert_eq!(count(&setup.tdb, "orders").await, 0, "not committed");

    // Variant: COMMIT goes into the black hole: an unknown outcome, within
    // the round trip plus the connect timeout of the look-up.
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        db.transaction("commit-partitioned", async |tx| {
            tx.execute("INSERT INTO orders VALUES (3, 'c')", &[])
                .await?;
            proxy.set_mode(ProxyMode::Blackhole);
            Ok(())
        }),
    )
    .await
    .expect("no hang");
    let took = started.elapsed();
    let error = result.expect_err("nobody can tell");
    assert!(
        error.is_commit_outcome_unknown(),
        "{}",
        common::checked(&error)
    );
    assert!(took < PARTITION_GOAL + Duration::from_secs(1), "{took:?}");
    proxy.set_mode(ProxyMode::PassThrough);

    // Variant: a write closure: the second statement's round trip runs out,
    // and its first one committed: never "not sent", never repeated.
    let runs = AtomicU32::new(0);
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        db.write("closure-partitioned", async |conn| {
            runs.fetch_add(1, Ordering::Relaxed);
            conn.execute("INSERT INTO audit (note) VALUES ('closure')", &[])
                .await?;
            proxy.set_mode(ProxyMode::Blackhole);
            conn.execute("INSERT INTO audit (note) VALUES ('lost')", &[])
                .await?;
            Ok(())
        }),
    )
    .await
    .expect("no hang");
    let took = started.elapsed();
    let error = result.expect_err("the network is gone");
    assert!(
        error.is_commit_outcome_unknown(),
        "{}",
        common::checked(&error)
    );
    assert!(took < PARTITION_GOAL, "{took:?}");
    assert_eq!(runs.load(Ordering::Relaxed), 1);
    proxy.set_mode(ProxyMode::PassThrough);

    // Variant: a raw connection's round trip is bounded too.
    let conn = db.connection("raw", Route::Write).await.unwrap();
    proxy.set_mode(ProxyMode::Blackhole);
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), conn.query("SELECT 1", &[]))
        .await
        .expect("no hang");
    assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
    assert!(started.elapsed() < PARTITION_GOAL);
    drop(conn);

    // Variant: an autocommit write on a shared connection whose round trip
    // runs out may still run: unknown outcome, not a plain time-out.
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        db.execute(
            "shared-write",
            Route::Write,
            "INSERT INTO audit (note) VALUES ('shared')",
            &[],
        ),
    )
    .await
    .expect("no hang");
    let error = result.expect_err("the network is gone");
    assert!(
        error.is_commit_outcome_unknown() || error.provably_not_sent(),
        "{}",
        common::checked(&error)
    );
    assert!(!matches!(error, Error::Timeout { .. }));
    assert!(started.elapsed() < PARTITION_GOAL + Duration::from_secs(2));
    proxy.set_mode(ProxyMode::PassThrough);
    let committed_closure: i64 = setup
        .tdb
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM audit WHERE note = 'closure'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(committed_closure, 1);
    db.shutdown(Duration::from_secs(5)).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_statement_does_not_hold_up_short_ones() {
    let tdb = TestDb::new().await.unwrap();
    let db = database(&tdb, |c| {
        c.pool.max_size = 12;
        c.query.statement_timeout = Some(Duration::from_secs(10));
    })
    .await;
    // The fast statement is known.
    fast_calls(&db, 1, Duration::from_millis(50)).await;
    let long = |sql: &'static str| {
        let db = db.clone();
        tokio::spawn(async move {
            db.query("long", Route::Read, sql, &[]).await.unwrap();
        })
    };

    // The case: a statement never seen before, run beside 8 fast callers.
    let sleeper = long("SELECT pg_sleep(2)");
    let worst = fast_calls(&db, 8, Duration::from_millis(1500)).await;
    sleeper.await.unwrap();
    assert!(
        worst < HOL_LIMIT,
        "first run: the worst SELECT 1 took {worst:?}"
    );

    // Variant: the same statement again, now known to be long.
    let sleeper = long("SELECT pg_sleep(2)");
    let worst = fast_calls(&db, 8, Duration::from_millis(1500)).await;
    sleeper.await.unwrap();
    assert!(worst < HOL_LIMIT, "known long: {worst:?}");

    // Variant: a statement known to be short turns long (its parameter):
    // after the busy threshold, nothing new queues behind it.
    for _ in 0..5 {
        db.query("sometimes", Route::Read, "SELECT pg_sleep($1)", &[&0.0_f64])
            .await
            .unwrap();
    }
    let slow = {
        let db = db.clone();
        tokio::spawn(async move {
            db.query("sometimes", Route::Read, "SELECT pg_sleep($1)", &[&2.0_f64])
                .await
                .unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let worst = fast_calls(&db, 8, Duration::from_millis(1400)).await;
    slow.await.unwrap();
    assert!(worst < HOL_LIMIT, "turned long: {worst:?}");

    // Variant: a write waiting for a row lock another session holds.
    let admin = tdb.client().await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE counters (id int PRIMARY KEY, n int); INSERT INTO counters VALUES (1, 0)",
        )
        .await
        .unwrap();
    for _ in 0..5 {
        db.execute(
            "bump",
            Route::Write,
            "UPDATE counters SET n = n + 1 WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    }
    admin
        .batch_execute("BEGIN; SELECT * FROM counters WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let blocked = {
        let db = db.clone();
        tokio::spawn(async move {
            db.execute(
                "bump",
                Route::Write,
                "UPDATE counters SET n = n + 1 WHERE id = 1",
                &[],
            )
            .await
            .unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let fast_writes = {
        let db = db.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for i in 0..200_i32 {
                let t = Instant::now();
                db.query_one("echo", Route::Write, "SELECT $1::int", &[&i])
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
            }
            worst
        })
    };
    let worst = fast_writes.await.unwrap();
    admin.batch_execute("COMMIT").await.unwrap();
    blocked.await.unwrap();
    assert!(worst < HOL_LIMIT, "behind a lock wait: {worst:?}");
    let metrics = db.metrics();
    eprintln!(
        "head-of-line: {} statements found every shared connection busy",
        metrics.cluster.lanes_busy
    );
    db.shutdown(Duration::from_secs(5)).await;
}

// ----- the rules hold together -------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_tracked_never_reports_a_committed_write_as_not_sent() {
    let tdb = TestDb::new().await.unwrap();
    with_orders(&tdb).await;
    // Three connections: one shared, two for callers.
    let db = database(&tdb, |c| {
        c.pool.max_size = 3;
        c.pool.min_idle = 1;
        c.pool.acquire_timeout = Duration::from_millis(300);
        c.retry.deadline = Some(Duration::from_secs(2));
    })
    .await;
    let insert = "INSERT INTO orders VALUES ($1, 'tracked')";
    let (n, first) = db
        .execute_tracked("tracked", insert, &[&1_i64])
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Every connection but the shared one is taken: the position is read on
    // the write's own connection, so it still comes back, and the write is
    // never reported as "not sent".
    let held = [
        db.connection("hold-1", Route::Write).await.unwrap(),
        db.connection("hold-2", Route::Write).await.unwrap(),
    ];
    let result = db.execute_tracked("tracked", insert, &[&2_i64]).await;
    match &result {
        Ok((n, position)) => {
            assert_eq!(*n, 1);
            assert!(*position >= first);
        }
        Err(error) => {
            assert!(!error.provably_not_sent(), "{}", common::checked(error));
        }
    }
    drop(held);
    assert_eq!(
        count(&tdb, "orders").await,
        2,
        "the write happened: {result:?}"
    );
    assert!(result.is_ok(), "{result:?}");
    db.shutdown(Duration::from_secs(5)).await;
}
