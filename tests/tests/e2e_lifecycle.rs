#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! The pool and the lifecycle under stress, through `pgstack::Database`:
//!
//! - a cancellation storm: 10,000 calls dropped at random points leave no
//!   connection checked out, none inside a transaction, no write twice, and
//!   the pool's figures add up;
//! - overload: ten times more tasks than connections; no deadlock, bounded
//!   waits, every pool timeout reported with its cause;
//! - eight instances started at once with auto-migrate on one empty
//!   database: each migration applied once;
//! - graceful shutdown during load: drained by the deadline, nothing of ours
//!   left on the server, no write lost or duplicated.

mod common;

use pgstack::Queryable as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Figures, Kinds, LEDGER_TABLE, Ledger, Rounds};
use pgstack::connection::AcquirePhase;
use pgstack::{Database, Error, Route, StartOptions};
use pgstack_tests::{TestCluster, TestDb};
use rand::Rng;

async fn ledger_db() -> (TestCluster, TestDb) {
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    tdb.client()
        .await
        .unwrap()
        .batch_execute(LEDGER_TABLE)
        .await
        .unwrap();
    (server, tdb)
}

/// One call of the storm, chosen by `kind`, writing ledger id `id`.
async fn storm_call(db: &Database, kind: u32, id: i64) -> Result<(), Error> {
    match kind {
        // A statement on a shared, pipelined connection.
        0 => db
            .query("sleep", Route::Read, "SELECT pg_sleep(0.001)", &[])
            .await
            .map(|_| ()),
        // An autocommit write on a shared connection.
        1 => db
            .execute(
                "post",
                Route::Write,
                "INSERT INTO ledger (id, task) VALUES ($1, 1)",
                &[&id],
            )
            .await
            .map(|_| ()),
        // A transaction with two statements and a pause between them.
        2 => {
            db.transaction("post-tx", async move |tx| {
                tx.execute("INSERT INTO ledger (id, task) VALUES ($1, 2)", &[&id])
                    .await?;
                tx.execute("SELECT pg_sleep(0.001)", &[]).await?;
                Ok(())
            })
            .await
        }
        // A transaction that fails on purpose (rolled back).
        3 => {
            let result = db
                .transaction("failing-tx", async move |tx| {
                    tx.execute("INSERT INTO ledger (id, task) VALUES ($1, 3)", &[&id])
                        .await?;
                    tx.execute("SELECT 1/0", &[]).await?;
                    Ok::<_, pgstack::Error>(())
                })
                .await;
            match result {
                Err(error) if error.code() == Some("22012") => Ok(()),
                other => other,
            }
        }
        // A connection of its own with a transaction opened in plain SQL.
        4 => {
            let conn = db.connection("raw", Route::Write).await?;
            conn.batch_execute("BEGIN; SELECT pg_sleep(0.001)").await?;
            Ok(())
        }
        // A read closure.
        _ => {
            db.read("read-closure", async |conn| {
                conn.query("SELECT count(*) FROM ledger", &[]).await?;
                Ok(())
            })
            .await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_cancelled_calls_leaks_nothing_and_the_pool_figures_add_up() {
    common::capture_logs();
    let started = Instant::now();
    let (_server, tdb) = ledger_db().await;
    let db = common::connect(common::config(tdb.url())).await;
    let max_size = db.config().pool.max_size;
    let app = db.status().await.application_name;
    let admin = tdb.client().await.unwrap();
    const TASKS: i64 = 20;
    const CALLS: i64 = 500;
    let mut operations = 0_u64;
    let mut cancelled = 0_u64;
    let mut kinds = Kinds::default();
    let mut rounds = Rounds::new();
    while let Some(round) = rounds.next_round() {
        let base = i64::try_from(round).unwrap() * TASKS * CALLS;
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let db = db.clone();
                tokio::spawn(async move {
                    let (mut done, mut cut, mut kinds) = (0_u64, 0_u64, Kinds::default());
                    for i in 0..CALLS {
                        let id = base + task * CALLS + i;
                        let (kind, after) = {
                            let mut rng = rand::rng();
                            (rng.random_range(0..6), rng.random_range(0..8000))
                        };
                        let call = storm_call(&db, kind, id);
                        match tokio::time::timeout(Duration::from_micros(after), call).await {
                            Err(_) => cut += 1,
                            Ok(Ok(())) => done += 1,
                            Ok(Err(error)) => kinds.add(&error),
                        }
                    }
                    (done, cut, kinds)
                })
            })
            .collect();
        for task in tasks {
            let (done, cut, k) = task.await.unwrap();
            operations += done + cut + k.total();
            cancelled += cut;
            kinds.merge(&k);
        }

        // Afterwards: no call in flight, nothing checked out but the shared
        // connections, no session of ours inside a transaction or busy.
        let settled = common::eventually(Duration::from_secs(10), || async {
            let busy = common::sessions(&admin, &app)
                .await
                .into_iter()
                .filter(|(_, state)| state != "idle")
                .count();
            db.metrics().in_flight == 0 && common::in_use(&db) <= 4 && busy == 0
        })
        .await;
        assert!(
            settled,
            "after the storm: in flight {}, in use {}, sessions {:?}",
            db.metrics().in_flight,
            common::in_use(&db),
            common::sessions(&admin, &app).await
        );
        let open = common::assert_pool_figures_add_up(&db);
        // The pools' sessions carry the instance's application_name exactly
        // (the health monitor's probe sessions add " health").
        let on_server = common::sessions(&admin, &app)
            .await
            .iter()
            .filter(|(name, _)| *name == app)
            .count() as u64;
        assert_eq!(
            open, on_server,
            "every open connection is a session on the server, and no other"
        );
        let waiters: u32 = db
            .metrics()
            .cluster
            .nodes
            .iter()
            .map(|n| n.pool.waiters)
            .sum();
        assert_eq!(waiters, 0);

        // Every connection that can be checked out is outside a transaction
        // block: SAVEPOINT fails with 25P01.
        let held: Vec<_> = {
            let mut held = Vec::new();
            for _ in 0..(max_size - 4) {
                held.push(db.connection("check", Route::Write).await.unwrap());
            }
            held
        };
        for conn in &held {
            let error = conn.batch_execute("SAVEPOINT s").await.unwrap_err();
            assert_eq!(error.code(), Some("25P01"), "{}", common::checked(&error));
        }
        drop(held);

        // And the pool serves a normal load again.
        for i in 0..200 {
            storm_call(&db, i % 6, -1 - i64::from(i) - base)
                .await
                .unwrap();
        }
    }

    // No write twice (every id is unique; a cancelled call is never
    // repeated, so no id may appear twice).
    let duplicated: i64 = admin
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM ledger GROUP BY id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(duplicated, 0);
    let failed_tx_rows: i64 = admin
        .query_one("SELECT count(*) FROM ledger WHERE task = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed_tx_rows, 0, "a failed transaction left a row");

    let report = db.shutdown(Duration::from_secs(5)).await;
    let gone_after = common::assert_sessions_gone(&admin, &app).await;
    eprintln!("storm: the server's last session of ours ended {gone_after:?} after the shutdown");
    let leaked = u64::from(report.connections_in_use_at_close);
    assert_eq!(leaked, 0, "{report:?}");
    common::assert_no_password_in_logs();
    eprintln!("storm: {operations} calls, {cancelled} cancelled, errors {kinds:?}");
    assert!(
        cancelled > operations / 10,
        "the storm cancelled calls ({cancelled})"
    );
    let mut figures = Figures::new("cancellation storm", started);
    figures.operations = operations;
    figures.faults = cancelled;
    figures.errors = kinds.total();
    figures.duplicated = Some(u64::try_from(duplicated).unwrap());
    figures.leaked_connections = Some(leaked);
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_of_ten_times_the_connections_times_out_with_the_cause_and_recovers() {
    common::capture_logs();
    let started = Instant::now();
    let (_server, tdb) = ledger_db().await;
    let mut config = common::config(tdb.url());
    config.pool.max_size = 4;
    config.pool.min_idle = 1;
    config.pool.acquire_timeout = Duration::from_millis(500);
    config.retry.max_attempts = 2;
    let db = common::connect(config).await;
    // Two attempts of at most 0.5 s each, one backoff of at most 0.4 s, the
    // transaction's 50 ms: 1.45 s; with 1 s of slack.
    let bound = Duration::from_millis(2450);
    const TASKS: usize = 40;
    let mut operations = 0_u64;
    let mut timeouts = 0_u64;
    let mut kinds = Kinds::default();
    let mut slowest = Duration::ZERO;
    let mut rounds = Rounds::new();
    while let Some(_round) = rounds.next_round() {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let db = db.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut out = (0_u64, 0_u64, Kinds::default(), Duration::ZERO);
                    for _ in 0..200 {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let t = Instant::now();
                        // Most tasks hold a connection for 50 ms; a few run
                        // statements on the shared connections meanwhile.
                        let result = if task % 10 == 0 {
                            db.query("peek", Route::Read, "SELECT 1", &[])
                                .await
                                .map(|_| ())
                        } else {
                            db.transaction("hold", async |tx| {
                                tx.execute("SELECT pg_sleep(0.05)", &[]).await?;
                                Ok(())
                            })
                            .await
                        };
                        let took = t.elapsed();
                        out.0 += 1;
                        out.3 = out.3.max(took);
                        match result {
                            Ok(()) => {}
                            Err(error) => {
                                let text = common::checked(&error);
                                match &error {
                                    Error::PoolTimeout { source, .. } => {
                                        assert_eq!(
                                            source.timeout_phase(),
                                            Some(AcquirePhase::WaitingForConnection),
                                            "{text}"
                                        );
                                        assert!(
                                            text.contains("waiting for a free connection")
                                                && text.contains("max 4"),
                                            "the cause and the pool's figures: {text}"
                                        );
                                        out.1 += 1;
                                    }
                                    _ => panic!("only pool timeouts are expected: {text}"),
                                }
                                out.2.add(&error);
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Release);
        // No deadlock: every task ends within one bounded call.
        for task in tasks {
            let (ops, t, k, s) = tokio::time::timeout(bound * 2, task)
                .await
                .expect("a task stuck after the load stopped")
                .unwrap();
            operations += ops;
            timeouts += t;
            kinds.merge(&k);
            slowest = slowest.max(s);
        }
        assert!(
            common::eventually(Duration::from_secs(5), || async {
                let m = db.metrics();
                m.in_flight == 0 && m.cluster.nodes[0].pool.waiters == 0
            })
            .await
        );
        common::assert_pool_figures_add_up(&db);
        // And the pool serves everyone again.
        for _ in 0..20 {
            db.transaction("after", async |tx| {
                tx.execute("SELECT 1", &[]).await?;
                Ok::<_, pgstack::Error>(())
            })
            .await
            .unwrap();
        }
    }
    assert!(
        slowest <= bound,
        "slowest call {slowest:?} (bound {bound:?})"
    );
    assert!(timeouts > 0, "the load overloaded the pool");
    let pool = &db.metrics().cluster.nodes[0].pool;
    assert!(
        pool.timeouts >= timeouts,
        "every timeout is counted: {} < {timeouts}",
        pool.timeouts
    );
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
    common::assert_no_password_in_logs();
    eprintln!("overload: {operations} calls, {timeouts} pool timeouts, slowest {slowest:?}");
    let mut figures = Figures::new("overload (40 tasks, 4 connections)", started);
    figures.operations = operations;
    figures.faults = rounds.done();
    figures.errors = kinds.total();
    figures.leaked_connections = Some(u64::from(report.connections_in_use_at_close));
    figures.report();
}

fn reference_migrations() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../migrations")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_instances_started_at_once_apply_each_migration_once() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let mut rounds = Rounds::new();
    let mut operations = 0;
    while let Some(_round) = rounds.next_round() {
        let tdb = TestDb::on(&server).await.unwrap();
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let mut config = common::config(tdb.url());
                config.migrations.auto_migrate = true;
                config.migrations.dir = reference_migrations();
                tokio::spawn(async move {
                    Database::builder()
                        .config(config)
                        .options(StartOptions::new().wait_for_database(Duration::from_secs(10)))
                        .connect()
                        .await
                })
            })
            .collect();
        let mut dbs = Vec::new();
        for start in starts {
            match start.await.unwrap() {
                Ok(db) => dbs.push(db),
                Err(error) => panic!("a start failed: {}", common::checked(&error)),
            }
        }
        operations += 8;
        let client = tdb.client().await.unwrap();
        let rows = client
            .query(
                "SELECT version, count(*) FROM _sqlx_migrations GROUP BY version ORDER BY version",
                &[],
            )
            .await
            .unwrap();
        let versions: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(versions, vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let mut applied_at_start = Vec::new();
        for db in &dbs {
            let status = db.status().await;
            assert_eq!(status.migrations.applied, vec![1, 2, 3, 4, 5]);
            assert!(status.migrations.pending.is_empty());
            applied_at_start.extend(status.migrations.applied_at_start.clone());
            assert_eq!(
                db.metrics().migrations_applied_at_start,
                status.migrations.applied_at_start.len()
            );
        }
        applied_at_start.sort_unstable();
        assert_eq!(
            applied_at_start,
            vec![1, 2, 3, 4, 5],
            "each migration applied once, by one instance"
        );
        for db in dbs {
            let report = db.shutdown(Duration::from_secs(5)).await;
            assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
        }
    }
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("concurrent start (8 instances, auto-migrate)", started);
    figures.operations = operations;
    figures.faults = 0;
    figures.errors = 0;
    figures.duplicated = Some(0);
    figures.leaked_connections = Some(0);
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_under_load_drains_by_the_deadline_and_leaves_nothing_behind() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let mut rounds = Rounds::new();
    let mut operations = 0_u64;
    let mut kinds = Kinds::default();
    let mut cut_off = 0_u64;
    let mut lost = 0;
    let mut duplicated = 0;
    while let Some(_round) = rounds.next_round() {
        let tdb = TestDb::on(&server).await.unwrap();
        let admin = tdb.client().await.unwrap();
        admin.batch_execute(LEDGER_TABLE).await.unwrap();
        let db = common::connect(common::config(tdb.url())).await;
        let app = db.status().await.application_name;

        // 16 writers until refused, and 6 long statements on connections of
        // their own (on the shared, pipelined connections they would hold up
        // the writes queued behind them: docs/connection.md).
        let writers: Vec<_> = (0..16_i64)
            .map(|task| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut ledger = Ledger::default();
                    let mut kinds = Kinds::default();
                    for i in 0..100_000_i64 {
                        let id = task * 100_000 + i;
                        let outcome = if i % 2 == 0 {
                            db.execute(
                                "post",
                                Route::Write,
                                "INSERT INTO ledger (id, task) VALUES ($1, 0)",
                                &[&id],
                            )
                            .await
                        } else {
                            db.transaction("post-tx", async move |tx| {
                                tx.execute("INSERT INTO ledger (id, task) VALUES ($1, 0)", &[&id])
                                    .await
                            })
                            .await
                        };
                        let refused = matches!(outcome, Err(Error::ShuttingDown { .. }));
                        if let Err(error) = &outcome {
                            kinds.add(error);
                        }
                        ledger.record(id, &outcome);
                        if refused {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (ledger, kinds)
                })
            })
            .collect();
        let long: Vec<_> = (0..6)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    if i < 4 {
                        // Calls in flight: cut off and cancelled on the server.
                        db.read("report", async |conn| {
                            conn.execute("SELECT pg_sleep(8)", &[]).await?;
                            Ok(())
                        })
                        .await
                    } else {
                        // Raw connections held by the caller: not calls, so
                        // their sessions are terminated after the grace.
                        let conn = db.connection("report", Route::Write).await?;
                        conn.execute("SELECT pg_sleep(8)", &[]).await?;
                        Ok(())
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;

        let deadline = Duration::from_secs(1);
        let t = Instant::now();
        let report = db.shutdown(deadline).await;
        let took = t.elapsed();
        // The deadline, the 2 s grace for cancelled calls to unwind, slack.
        assert!(
            took < deadline + Duration::from_secs(3),
            "{took:?}: {report:?}"
        );
        assert!(report.drained, "{report:?}");
        assert!(
            report.cut_off >= 4,
            "the long statements were cut off: {report:?}"
        );
        // Cancelled on the server, or, when the shutdown's own session did
        // not answer within its step limit (a machine saturated by a soak),
        // the report says so.
        let cancel_problem = report.problems.iter().any(|p| p.contains("cancel"));
        assert!(
            report.cancelled() >= 4 || cancel_problem,
            "cancelled on the server: {report:?}"
        );
        if cancel_problem {
            eprintln!("shutdown: the cancellation was not confirmed: {report:?}");
        }
        assert!(
            report.completed >= report.in_flight_at_start - report.cut_off,
            "{report:?}"
        );
        cut_off += report.cut_off;
        common::assert_clean("the shutdown report", &format!("{report:?}"));

        // Every caller is back at once, and new calls are refused.
        for task in long {
            let result = tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("a cut-off call returns")
                .unwrap();
            let error = result.expect_err("cut off");
            operations += 1;
            kinds.add(&error);
        }
        let mut ledger = Ledger::default();
        for task in writers {
            let (l, k) = tokio::time::timeout(Duration::from_secs(1), task)
                .await
                .expect("a writer returns")
                .unwrap();
            operations += l.writes() as u64;
            ledger.merge(l);
            kinds.merge(&k);
        }
        let late = db.query("late", Route::Read, "SELECT 1", &[]).await;
        assert!(matches!(late, Err(Error::ShuttingDown { .. })), "{late:?}");

        // Nothing of ours on the server.
        let gone_after = common::assert_sessions_gone(&admin, &app).await;
        eprintln!("shutdown: the server's last session of ours ended {gone_after:?} after it");
        let reconciled = common::reconcile(&admin, &ledger).await;
        common::assert_reconciled("shutdown", &ledger, reconciled);
        lost += reconciled.lost;
        duplicated += reconciled.duplicated;
        assert!(
            ledger.ok.len() >= 16,
            "the writers wrote ({})",
            ledger.ok.len()
        );
    }
    common::assert_no_password_in_logs();
    eprintln!("shutdown: {operations} calls, {cut_off} cut off, errors {kinds:?}");
    let mut figures = Figures::new("graceful shutdown under load", started);
    figures.operations = operations;
    figures.faults = rounds.done();
    figures.errors = kinds.total();
    figures.lost = Some(lost);
    figures.duplicated = Some(duplicated);
    figures.leaked_connections = Some(0);
    figures.report();
}
