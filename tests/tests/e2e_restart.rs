#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! Restart under load, through `pgstack::Database`: 64 tasks reading and
//! writing while the primary is killed with -9 and restarted.
//!
//! - no caller hangs: every call returns by itself well within its deadline;
//! - reads, whose retry deadline outlasts the outage, all succeed;
//! - writes (unique ids, no unique constraint) are never applied twice, none
//!   acknowledged is lost, none reported as not done was done;
//! - the pool recovers: a burst of transactions succeeds, the breaker is
//!   closed, the figures add up, and the shutdown finds nothing leaked.

mod common;

use pgstack::Queryable as _;
use std::time::{Duration, Instant};

use common::{Figures, Kinds, LEDGER_TABLE, Ledger, Rounds};
use pgstack::Route;
use pgstack_tests::{TestCluster, TestDb};
use rand::Rng;

const TASKS: i64 = 64;
const OPS: i64 = 40;
/// The caller's own deadline: a call still running after this counts as
/// hung. The library's bound is lower: the retry deadline (10 s) plus one
/// attempt (statement timeout 3 s + connect timeout 1 s).
const CALL_DEADLINE: Duration = Duration::from_secs(20);
const LIBRARY_BOUND: Duration = Duration::from_secs(16);

#[derive(Default)]
struct TaskOut {
    reads_ok: u64,
    read_errors: Kinds,
    write_errors: Kinds,
    ledger: Ledger,
    hung: u64,
    slowest: Duration,
}

async fn load(db: pgstack::Database, task: i64, base: i64) -> TaskOut {
    let mut out = TaskOut::default();
    for op in 0..OPS {
        let id = base + task * OPS + op;
        let started = Instant::now();
        let task32 = i32::try_from(task).unwrap();
        if op % 2 == 0 {
            let read = async {
                db.query_one(
                    "count-mine",
                    Route::Read,
                    "SELECT count(*) FROM ledger WHERE task = $1",
                    &[&task32],
                )
                .await
            };
            match tokio::time::timeout(CALL_DEADLINE, read).await {
                Err(_) => out.hung += 1,
                Ok(Ok(_)) => out.reads_ok += 1,
                Ok(Err(error)) => out.read_errors.add(&error),
            }
        } else {
            let write = async {
                if op % 4 == 1 {
                    db.execute(
                        "post-entry",
                        Route::Write,
                        "INSERT INTO ledger (id, task) VALUES ($1, $2)",
                        &[&id, &task32],
                    )
                    .await
                } else {
                    db.transaction("post-entry-tx", async move |tx| {
                        tx.execute(
                            "INSERT INTO ledger (id, task) VALUES ($1, $2)",
                            &[&id, &task32],
                        )
                        .await
                    })
                    .await
                }
            };
            match tokio::time::timeout(CALL_DEADLINE, write).await {
                Err(_) => {
                    out.hung += 1;
                    out.ledger.unknown.push(id);
                }
                Ok(outcome) => {
                    if let Err(error) = &outcome {
                        out.write_errors.add(error);
                    }
                    out.ledger.record(id, &outcome);
                }
            }
        }
        out.slowest = out.slowest.max(started.elapsed());
        let pause = rand::rng().random_range(5..25);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_loses_and_duplicates_nothing_and_the_pool_recovers() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    // The kit's servers run with synchronous_commit = off, which acknowledges
    // commits before their WAL is written: a kill -9 then loses them by
    // design. This database commits durably, as production servers do.
    let admin = tdb.client().await.unwrap();
    admin.batch_execute(LEDGER_TABLE).await.unwrap();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = on",
            tdb.name()
        ))
        .await
        .unwrap();
    drop(admin);
    let mut config = common::config(tdb.url());
    config.query.statement_timeout = Some(Duration::from_secs(3));
    // The retry attempts stay at the default (3): waiting for the node while
    // it is down spends none of them; the 10 s retry deadline is what must
    // outlast the outage.
    config.retry.max_attempts = 3;
    let db = common::connect(config).await;

    let mut rounds = Rounds::new();
    let mut all = TaskOut::default();
    let mut longest_outage = Duration::ZERO;
    while let Some(round) = rounds.next_round() {
        let base = i64::try_from(round).unwrap() * TASKS * OPS;
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| tokio::spawn(load(db.clone(), task, base)))
            .collect();

        // Let the load settle, then kill the primary and bring it back.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let killed = Instant::now();
        server.kill9().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.start_again().await.unwrap();
        let outage = killed.elapsed();
        longest_outage = longest_outage.max(outage);

        for task in tasks {
            let out = task.await.unwrap();
            all.reads_ok += out.reads_ok;
            all.read_errors.merge(&out.read_errors);
            all.write_errors.merge(&out.write_errors);
            all.ledger.merge(out.ledger);
            all.hung += out.hung;
            all.slowest = all.slowest.max(out.slowest);
        }

        // The pool recovers: the breaker closes and a burst of
        // transactions, each on a connection of its own, all succeed.
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                db.metrics().cluster.nodes[0].breaker.as_deref() == Some("closed")
            })
            .await,
            "the breaker closes again: {:?}",
            db.metrics().cluster.nodes[0]
        );
        let burst: Vec<_> = (0..16)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.transaction("burst", async |tx| {
                        tx.query_one("SELECT count(*) FROM ledger", &[]).await?;
                        Ok::<_, pgstack::Error>(())
                    })
                    .await
                })
            })
            .collect();
        for call in burst {
            if let Err(error) = call.await.unwrap() {
                panic!("after the restart: {}", common::checked(&error));
            }
        }
        // Health comes from the monitor's latest round (every second here,
        // with its hysteresis): serving again within a few rounds.
        assert!(
            common::eventually(Duration::from_secs(15), || async {
                db.health().await.is_serving()
            })
            .await,
            "serving again: {:?}",
            db.health().await
        );
        common::assert_pool_figures_add_up(&db);
        eprintln!(
            "restart round {round}: outage {outage:?}, slowest call {:?}",
            all.slowest
        );
    }

    // Nobody hung; every call came back within the library's own bound.
    assert_eq!(all.hung, 0, "calls past their deadline");
    assert!(
        all.slowest < LIBRARY_BOUND,
        "slowest call {:?}",
        all.slowest
    );
    // Reads outlast the outage (their retry deadline is 10 s).
    assert!(
        longest_outage < Duration::from_secs(8),
        "the outage ({longest_outage:?}) is shorter than the reads' retry deadline"
    );
    assert_eq!(
        all.read_errors.total(),
        0,
        "reads failed: {:?}",
        all.read_errors
    );

    // Every write reconciled.
    let client = tdb.client().await.unwrap();
    let reconciled = common::reconcile(&client, &all.ledger).await;
    common::assert_reconciled("restart", &all.ledger, reconciled);
    assert!(
        all.ledger.ok.len() > all.ledger.writes() / 2,
        "most writes succeed: {} of {}",
        all.ledger.ok.len(),
        all.ledger.writes()
    );

    // Nothing leaked: the shutdown finds no connection checked out and no
    // session of ours stays on the server.
    let app = db.status().await.application_name;
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.cut_off, 0, "{report:?}");
    let gone_after = common::assert_sessions_gone(&client, &app).await;
    eprintln!("restart: the server's last session of ours ended {gone_after:?} after the shutdown");
    let leaked = u64::from(report.connections_in_use_at_close);
    assert_eq!(leaked, 0, "{report:?}");
    assert!(report.drained, "{report:?}");
    common::assert_clean("the shutdown report", &format!("{report:?}"));
    assert!(common::assert_no_password_in_logs() > 0);

    let mut figures = Figures::new("restart under load (kill -9)", started);
    figures.operations = all.reads_ok + all.read_errors.total() + all.ledger.writes() as u64;
    figures.faults = rounds.done();
    figures.errors = all.read_errors.total() + all.write_errors.total();
    figures.lost = Some(reconciled.lost);
    figures.duplicated = Some(reconciled.duplicated);
    figures.leaked_connections = Some(leaked);
    eprintln!(
        "restart: {} reads, {} writes ({} ok, {} unknown of which {} applied, {} not applied); \
         write errors {:?}; longest outage {longest_outage:?}",
        all.reads_ok,
        all.ledger.writes(),
        all.ledger.ok.len(),
        all.ledger.unknown.len(),
        reconciled.unknown_applied,
        all.ledger.not_applied.len(),
        all.write_errors
    );
    figures.report();
}
