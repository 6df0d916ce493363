//! The call API against a real server: statements, refusals, errors,
//! transactions, closures, raw connections, pipelining, slow queries,
//! metrics and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgstack_connection::Queryable as _;
use pgstack_connection::{
    Cluster, Error, IsolationLevel, Op, Route, TransactionOptions, tokio_postgres,
};
use pgstack_tests::TestDb;

async fn cluster_on(db: &TestDb) -> Cluster {
    Cluster::connect(&common::config(db.url())).await.unwrap()
}

async fn with_table(db: &TestDb) -> Cluster {
    let cluster = cluster_on(db).await;
    cluster
        .execute(
            "create",
            Route::Write,
            "CREATE TABLE bills (id bigint PRIMARY KEY, owner text NOT NULL, amount int)",
            &[],
        )
        .await
        .unwrap();
    cluster
}

async fn count(cluster: &Cluster) -> i64 {
    cluster
        .query_one("count", Route::Write, "SELECT count(*) FROM bills", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn statement_helpers_with_parameters() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let n = cluster
        .execute(
            "add-bill",
            Route::Write,
            "INSERT INTO bills VALUES ($1, $2, $3), ($4, $5, $6)",
            &[&1_i64, &"ada", &10_i32, &2_i64, &"bob", &20_i32],
        )
        .await
        .unwrap();
    assert_eq!(n, 2);
    let rows = cluster
        .query(
            "fetch-bills",
            Route::Read,
            "SELECT id, owner FROM bills ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].get::<_, &str>(1), "bob");
    let one = cluster
        .query_one(
            Op::new(String::from("owned-name")),
            Route::Read,
            "SELECT amount FROM bills WHERE id = $1",
            &[&2_i64],
        )
        .await
        .unwrap();
    assert_eq!(one.get::<_, i32>(0), 20);
    let none = cluster
        .query_opt(
            "find-bill",
            Route::Read,
            "SELECT id FROM bills WHERE id = $1",
            &[&99_i64],
        )
        .await
        .unwrap();
    assert!(none.is_none());
    match cluster
        .query_one("fetch-one", Route::Read, "SELECT id FROM bills", &[])
        .await
    {
        Err(Error::UnexpectedRows { got: 2, .. }) => {}
        other => panic!("expected UnexpectedRows, got {other:?}"),
    }
    match cluster
        .query_opt("fetch-opt", Route::Read, "SELECT id FROM bills", &[])
        .await
    {
        Err(Error::UnexpectedRows { got: 2, .. }) => {}
        other => panic!("expected UnexpectedRows, got {other:?}"),
    }
}

#[tokio::test]
async fn server_errors_carry_sqlstate_message_detail_and_constraint() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let insert = "INSERT INTO bills VALUES ($1, $2, 1)";
    cluster
        .execute("add-bill", Route::Write, insert, &[&1_i64, &"ada"])
        .await
        .unwrap();
    let error = cluster
        .execute("add-bill", Route::Write, insert, &[&1_i64, &"ada"])
        .await
        .unwrap_err();
    assert!(error.is_unique_violation());
    assert!(!error.is_transient());
    let db_error = error.as_db_error().unwrap();
    assert_eq!(db_error.code, "23505");
    assert_eq!(db_error.constraint.as_deref(), Some("bills_pkey"));
    assert_eq!(db_error.table.as_deref(), Some("bills"));
    assert!(db_error.detail.as_deref().unwrap().contains("(id)=(1)"));
    assert_eq!(db_error.operation, "add-bill");
    assert_eq!(db_error.node.as_ref(), "primary");
    let text = error.to_string();
    assert!(
        text.contains("add-bill") && text.contains("23505"),
        "{text}"
    );
    // Not retried: a permanent error is one call.
    assert_eq!(cluster.metrics().retries, 0);

    let error = cluster
        .query("bad", Route::Read, "SELEC 1", &[])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("42601"));
    let error = cluster
        .query("div", Route::Read, "SELECT 1 / $1", &[&0_i32])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("22012"));
}

#[tokio::test]
async fn statements_that_would_change_a_shared_session_are_refused() {
    let db = TestDb::new().await.unwrap();
    let cluster = cluster_on(&db).await;
    for sql in [
        "BEGIN",
        "COMMIT",
        "SET search_path = nowhere",
        "LISTEN channel",
        "SELECT pg_advisory_lock(1)",
    ] {
        match cluster.execute("misuse", Route::Write, sql, &[]).await {
            Err(Error::Usage { problem, operation }) => {
                assert_eq!(operation, "misuse");
                assert!(problem.contains("Cluster::"), "{problem}");
            }
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    // Nothing reached the server: the session is as it was.
    let path: String = cluster
        .query_one("path", Route::Write, "SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!path.contains("nowhere"));
    let in_tx: i64 = cluster
        .query_one(
            "tx-state",
            Route::Write,
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' \
             AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_tx, 0);
}

#[tokio::test]
async fn transactions_commit_on_ok_and_roll_back_on_err_panic_and_drop() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;

    let id = cluster
        .transaction("commit", async |tx| {
            tx.execute("INSERT INTO bills VALUES (1, 'ada', 1)", &[])
                .await?;
            let row = tx.query_one("SELECT count(*) FROM bills", &[]).await?;
            Ok::<_, pgstack_connection::Error>(row.get::<_, i64>(0))
        })
        .await
        .unwrap();
    assert_eq!(id, 1);
    assert_eq!(count(&cluster).await, 1);

    #[derive(Debug, thiserror::Error)]
    #[error("insufficient funds")]
    struct InsufficientFunds;
    let error = cluster
        .transaction("abort", async |tx| {
            tx.execute("INSERT INTO bills VALUES (2, 'bob', 1)", &[])
                .await?;
            Err::<(), _>(Error::abort(InsufficientFunds))
        })
        .await
        .unwrap_err();
    assert!(error.aborted_with::<InsufficientFunds>().is_some());
    assert_eq!(count(&cluster).await, 1);

    // A server error inside rolls back too.
    let error = cluster
        .transaction("dup", async |tx| {
            tx.execute("INSERT INTO bills VALUES (3, 'cy', 1)", &[])
                .await?;
            tx.execute("INSERT INTO bills VALUES (1, 'dup', 1)", &[])
                .await?;
            Ok::<_, pgstack_connection::Error>(())
        })
        .await
        .unwrap_err();
    assert!(error.is_unique_violation());
    assert_eq!(count(&cluster).await, 1);

    // A panic inside the closure.
    let panicking = cluster.clone();
    let joined = tokio::spawn(async move {
        panicking
            .transaction("panic", async move |tx| {
                tx.execute("INSERT INTO bills VALUES (4, 'dee', 1)", &[])
                    .await?;
                if tx.node().name() == "primary" {
                    panic!("boom");
                }
                Ok::<_, pgstack_connection::Error>(())
            })
            .await
    })
    .await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(count(&cluster).await, 1);

    // A dropped future (a caller's timeout) mid-transaction.
    let slow = tokio::time::timeout(
        Duration::from_millis(300),
        cluster.transaction("dropped", async |tx| {
            tx.execute("INSERT INTO bills VALUES (5, 'eve', 1)", &[])
                .await?;
            tx.execute("SELECT pg_sleep(5)", &[]).await?;
            Ok::<_, pgstack_connection::Error>(())
        }),
    )
    .await;
    assert!(slow.is_err());
    assert_eq!(count(&cluster).await, 1);
    // The connections came back clean: no session is left in a transaction.
    let clean = common::eventually(Duration::from_secs(10), || async {
        let open: i64 = cluster
            .query_one(
                "tx-state",
                Route::Write,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        open == 0
    })
    .await;
    assert!(clean);

    // Options: isolation, read-only (a write inside fails with 25006).
    let options = TransactionOptions::new()
        .isolation(IsolationLevel::RepeatableRead)
        .read_only(true);
    let level: String = cluster
        .transaction_with("options", options, async |tx| {
            Ok::<_, pgstack_connection::Error>(
                tx.query_one("SHOW transaction_isolation", &[])
                    .await?
                    .get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(level, "repeatable read");
    let error = cluster
        .transaction_with("ro-write", options, async |tx| {
            tx.execute("INSERT INTO bills VALUES (6, 'fay', 1)", &[])
                .await?;
            Ok::<_, pgstack_connection::Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("25006"));
    // The failure came from a read-only transaction, not from the primary
    // refusing writes: no re-discovery, no primary change.
    assert_eq!(cluster.metrics().primary_changes, 0);
}

#[tokio::test]
async fn closures_and_raw_connections() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let added = cluster
        .write("add-two", async |conn| {
            let a = conn
                .execute("INSERT INTO bills VALUES (1, 'ada', 1)", &[])
                .await?;
            let b = conn
                .execute("INSERT INTO bills VALUES (2, 'bob', 1)", &[])
                .await?;
            Ok(a + b)
        })
        .await
        .unwrap();
    assert_eq!(added, 2);
    let owners: Vec<String> = cluster
        .read("owners", async |conn| {
            let rows = conn
                .query("SELECT owner FROM bills ORDER BY id", &[])
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
        .unwrap();
    assert_eq!(owners, ["ada", "bob"]);

    // The escape hatch: a connection of its own, with session state and
    // the pool's own API.
    let mut conn = cluster.connection("raw", Route::Write).await.unwrap();
    assert_eq!(conn.node().name(), "primary");
    let tx = conn.transaction().await.unwrap();
    tx.execute("SET LOCAL statement_timeout = 1000", &[])
        .await
        .unwrap();
    tx.execute("INSERT INTO bills VALUES (3, 'cy', 1)", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    drop(conn);
    assert_eq!(count(&cluster).await, 3);
}

/// `tasks` tasks of `per_task` statements each, at once, every answer
/// checked.
async fn echo_statements(cluster: &Cluster, tasks: i32, per_task: i32) {
    let mut handles = Vec::new();
    for task in 0..tasks {
        let cluster = cluster.clone();
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let row = cluster
                    .query_one("echo", Route::Write, "SELECT $1::int + $2", &[&task, &i])
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, i32>(0), task + i);
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
}

/// A cluster with two shared connections per node (set in code) whose echo
/// statement has run once.
async fn on_two_shared_connections(config: &pgstack_config::DatabaseConfig) -> Cluster {
    // What is measured with it is sharing, not the busy threshold (the
    // head-of-line tests of e2e_misuse.rs cover that): with the default 5 ms,
    // a machine so loaded that the client reads no reply for 5 ms sends
    // statements to connections of their own (3 CPU hogs on 2 cores: up to
    // 554 of 3200).
    let cluster = Cluster::builder(config)
        .shared_connections(2)
        .busy_after(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    // The first run of a text learns how long it takes; only statements
    // known to be short are pipelined behind others.
    cluster
        .query_one(
            "echo",
            Route::Write,
            "SELECT $1::int + $2",
            &[&0_i32, &0_i32],
        )
        .await
        .unwrap();
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_share_pipelined_connections() {
    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.pool.max_size = 10;
    // What is measured here is sharing, not the busy threshold (the
    // head-of-line tests of e2e_misuse.rs cover that): with the default 5 ms,
    // a machine so loaded that the client reads no reply for 5 ms sends
    // statements to connections of their own (3 CPU hogs on 2 cores: up to
    // 554 of 3200).
    let cluster = on_two_shared_connections(&config).await;
    let before = cluster.primary().pool().status().acquired;
    echo_statements(&cluster, 64, 50).await;
    // 3200 statements, a handful of checkouts: the two shared connections
    // (each with its role check) carried them.
    // (A statement that finds both busy, as on a machine so loaded that no
    // reply is read for 5 ms, takes a connection of its own: counted. So
    // does one whose learned duration is long: on a saturated machine the
    // first run, opening a lane, can take 50 ms.)
    let checkouts = cluster.primary().pool().status().acquired - before;
    let metrics = cluster.metrics();
    assert!(
        checkouts <= 4 + metrics.lanes_busy + metrics.long_statements,
        "{checkouts} checkouts for 3200 statements, {} found the lanes busy, {} were known long",
        metrics.lanes_busy,
        metrics.long_statements
    );
    assert!(metrics.lanes_busy < 160, "{} of 3200", metrics.lanes_busy);
    assert_eq!(metrics.queries, 3201);
    assert_eq!(metrics.failures, 0);

    // A shared connection that breaks is replaced; reads are retried.
    let admin = db.client().await.unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .unwrap();
    for i in 0..20_i32 {
        let row = cluster
            .query_one("echo", Route::Read, "SELECT $1::int", &[&i])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn slow_queries_are_logged_without_parameters_and_counted() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.query.slow_query_threshold = Duration::from_millis(100);
    let cluster = Cluster::connect(&config).await.unwrap();
    cluster
        .query(
            "slow-report",
            Route::Read,
            "SELECT pg_sleep(0.2), $1::text",
            &[&"s3cret-param"],
        )
        .await
        .unwrap();
    cluster
        .query("fast", Route::Read, "SELECT 1", &[])
        .await
        .unwrap();
    let metrics = cluster.metrics();
    assert_eq!(metrics.slow_queries, 1);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("slow query"), "{log}");
    assert!(
        log.contains("slow-report") && log.contains("primary"),
        "{log}"
    );
    assert!(log.contains("duration_ms"), "{log}");
    assert!(!log.contains("s3cret-param"), "{log}");

    // With log_parameters the values are included.
    config.query.log_parameters = true;
    let cluster = Cluster::connect(&config).await.unwrap();
    cluster
        .query(
            "slow-report",
            Route::Read,
            "SELECT pg_sleep(0.2), $1::text",
            &[&"visible-param"],
        )
        .await
        .unwrap();
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("visible-param"), "{log}");
}

#[tokio::test]
async fn metrics_snapshot_serializes_and_shutdown_refuses_new_work() {
    let db = TestDb::new().await.unwrap();
    let cluster = cluster_on(&db).await;
    for _ in 0..10 {
        cluster
            .query("ping", Route::Read, "SELECT 1", &[])
            .await
            .unwrap();
    }
    let _ = cluster.query("bad", Route::Read, "SELEC", &[]).await;
    let metrics = cluster.metrics();
    assert_eq!(metrics.queries, 11);
    assert_eq!(metrics.failures, 1);
    assert!(metrics.latency_p50.is_some() && metrics.latency_p99 >= metrics.latency_p50);
    let json = serde_json::to_value(&metrics).unwrap();
    assert_eq!(json["queries"], 11);
    assert_eq!(json["nodes"][0]["name"], "primary");
    assert_eq!(json["nodes"][0]["breaker"], "closed");
    assert_eq!(json["nodes"][0]["is_primary"], true);
    assert!(json["latency_p99"].as_f64().unwrap() > 0.0);
    assert!(!json.to_string().contains("password"));

    // Shutdown waits for work in flight, then refuses new work.
    let busy = cluster.clone();
    let running = tokio::spawn(async move {
        busy.query("long", Route::Read, "SELECT pg_sleep(0.3)", &[])
            .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = cluster.close(Duration::from_secs(5)).await;
    assert_eq!(report.cut_off, 0);
    assert!(running.await.unwrap().is_ok());
    match cluster.query("late", Route::Read, "SELECT 1", &[]).await {
        Err(Error::ShuttingDown { operation }) => assert_eq!(operation, "late"),
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
}

#[tokio::test]
async fn passwords_stay_out_of_errors_and_debug_output() {
    let mut config = common::config("postgres://app:hunter2@127.0.0.1:1/nowhere");
    config.pool.connect_timeout = Duration::from_millis(300);
    let error = Cluster::connect(&config).await.unwrap_err();
    assert!(matches!(error, Error::NoPrimary { .. }), "{error:?}");
    let text = format!("{error} {error:?}");
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn invalid_settings_are_reported_with_the_key() {
    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.retry.max_attempts = 0;
    let error = Cluster::connect(&config).await.unwrap_err();
    assert!(error.to_string().contains("retry.max_attempts"), "{error}");
    let config = common::config(db.url());
    let error = Cluster::builder(&config)
        .shared_connections(8)
        .build()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("pool.max_size"), "{error}");
    let _: Option<tokio_postgres::Row> = None;
}

#[tokio::test]
async fn an_open_breaker_and_an_exhausted_pool_fail_with_their_cause() {
    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.pool.max_size = 2;
    config.pool.acquire_timeout = Duration::from_millis(200);
    config.retry.max_attempts = 2;
    let cluster = Cluster::builder(&config)
        .shared_connections(0)
        .build()
        .await
        .unwrap();

    // Every connection held: a pool timeout that says it was waiting.
    let a = cluster.connection("hold-a", Route::Write).await.unwrap();
    let b = cluster.connection("hold-b", Route::Write).await.unwrap();
    let error = cluster
        .query("starved", Route::Write, "SELECT 1", &[])
        .await
        .unwrap_err();
    match &error {
        Error::PoolTimeout {
            node,
            operation,
            source,
        } => {
            assert_eq!((node.as_ref(), operation.as_str()), ("primary", "starved"));
            assert_eq!(
                source.timeout_phase(),
                Some(pgstack_connection::AcquirePhase::WaitingForConnection)
            );
        }
        other => panic!("expected a pool timeout, got {other:?}"),
    }
    assert!(error.is_transient() && error.provably_not_sent());
    assert!(
        error.to_string().contains("waiting for a free connection"),
        "{error}"
    );
    // Nothing was sent, so a write is retried as well.
    assert_eq!(cluster.metrics().retries, 1);
    drop((a, b));

    // The breaker forced open: calls fail at once, naming the node.
    let breaker = cluster.primary().circuit_breaker().unwrap().clone();
    breaker.force_open();
    let started = std::time::Instant::now();
    let error = cluster
        .execute("blocked", Route::Write, "SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    match &error {
        Error::CircuitOpen { node, probe_in, .. } => {
            assert_eq!(node.as_ref(), "primary");
            assert_eq!(*probe_in, None, "forced open: no probe scheduled");
        }
        other => panic!("expected an open circuit, got {other:?}"),
    }
    let metrics = cluster.metrics();
    assert_eq!(metrics.nodes[0].breaker.as_deref(), Some("forced open"));
    breaker.reset();
    cluster
        .execute("unblocked", Route::Write, "SELECT 1", &[])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_shared_connections_decide_whether_statements_share() {
    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.pool.max_size = 6;

    // 0 in the configuration: every statement checks out a connection.
    config.query.shared_connections = Some(0);
    let cluster = Cluster::connect(&config).await.unwrap();
    let before = cluster.primary().pool().status().acquired;
    echo_statements(&cluster, 4, 10).await;
    let checkouts = cluster.primary().pool().status().acquired - before;
    assert!(checkouts >= 40, "{checkouts} checkouts for 40 statements");
    cluster.close(Duration::from_secs(2)).await;

    // The code's choice wins over the configuration's.
    let cluster = on_two_shared_connections(&config).await;
    let before = cluster.primary().pool().status().acquired;
    echo_statements(&cluster, 4, 10).await;
    let checkouts = cluster.primary().pool().status().acquired - before;
    let metrics = cluster.metrics();
    assert!(
        checkouts <= 4 + metrics.lanes_busy + metrics.long_statements,
        "{checkouts} checkouts for 40 statements on 2 shared connections: {metrics:?}"
    );
    cluster.close(Duration::from_secs(2)).await;

    // As many as the pool holds would leave transactions nothing.
    config.query.shared_connections = Some(6);
    let error = Cluster::connect(&config).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("query.shared_connections") && text.contains("pool.max_size"),
        "{text}"
    );
}
