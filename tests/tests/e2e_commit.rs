#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! Interrupted commits are resolved, not reported as unknown, all through
//! `pgstack::Database`:
//!
//! - one-insert transactions through a proxy that resets every connection
//!   each 40 ms: a `COMMIT` whose connection broke is looked up with
//!   `txid_status`; at most 1 % of them end as `CommitOutcomeUnknown`, and
//!   every resolution is checked against the table.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Figures, Kinds, LEDGER_TABLE, Ledger};
use pgstack::{Database, Error};
use pgstack_tests::{ChaosProxy, TestCluster, TestDb};

/// One insert of `id` in a transaction of its own.
async fn insert_in_transaction(db: &Database, id: i64) -> Result<u64, Error> {
    db.transaction("post-entry", async move |tx| {
        tx.execute("INSERT INTO ledger (id, task) VALUES ($1, 1)", &[&id])
            .await
    })
    .await
}

/// `tasks` tasks each running `per_task` one-insert transactions; the ledger
/// of outcomes and the errors by kind.
async fn run_writers(db: &Database, tasks: i64, per_task: i64) -> (Ledger, Kinds) {
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut ledger = Ledger::default();
                let mut kinds = Kinds::default();
                for i in 0..per_task {
                    let id = task * 100_000 + i;
                    let outcome = insert_in_transaction(&db, id).await;
                    if let Err(error) = &outcome {
                        kinds.add(error);
                        if error.is_commit_outcome_unknown()
                            && std::env::var_os("SHOW_UNKNOWN").is_some()
                        {
                            eprintln!("unknown: {error}");
                        }
                    }
                    ledger.record(id, &outcome);
                }
                (ledger, kinds)
            })
        })
        .collect();
    let (mut ledger, mut kinds) = (Ledger::default(), Kinds::default());
    for handle in handles {
        let (l, k) = handle.await.unwrap();
        ledger.merge(l);
        kinds.merge(&k);
    }
    (ledger, kinds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_interrupted_by_resets_are_resolved() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    tdb.client()
        .await
        .unwrap()
        .batch_execute(LEDGER_TABLE)
        .await
        .unwrap();
    let proxy = ChaosProxy::start(server.addr()).await.unwrap();
    let mut config = common::config(&proxy.url(tdb.name()));
    // The call's deadline is what resolution may spend; the server stays up.
    config.retry.deadline = Some(Duration::from_secs(20));
    let db = common::connect(config).await;

    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let stop = Arc::clone(&stop);
        let proxy = &proxy;
        async move {
            let mut resets = 0_u64;
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(40)).await;
                proxy.reset_all();
                resets += 1;
            }
            resets
        }
    };
    let writers = async {
        let result = run_writers(&db, 16, 60).await;
        stop.store(true, Ordering::Release);
        result
    };
    let (resets, (ledger, kinds)) = tokio::join!(chaos, writers);

    let reconciled = common::reconcile(&tdb.client().await.unwrap(), &ledger).await;
    common::assert_reconciled("commits under resets", &ledger, reconciled);
    let metrics = db.metrics();
    let resolved = metrics.cluster.commit_resolutions;
    eprintln!(
        "resets: {resets}; {} transactions: {} ok, {} unknown ({} of them applied), {} not \
         applied; interrupted commits: {resolved:?}; errors {kinds:?}",
        ledger.writes(),
        ledger.ok.len(),
        ledger.unknown.len(),
        reconciled.unknown_applied,
        ledger.not_applied.len(),
    );
    let interrupted = resolved.total();
    assert!(
        interrupted > 0,
        "the resets interrupted no COMMIT: the scenario tested nothing"
    );
    assert!(
        ledger.unknown.len() as u64 * 100 <= interrupted,
        "{} of {interrupted} interrupted commits ended unknown (goal: at most 1 %)",
        ledger.unknown.len()
    );
    assert_eq!(resolved.unknown, ledger.unknown.len() as u64);
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("commits under resets", started);
    figures.operations = ledger.writes() as u64;
    figures.faults = resets;
    figures.errors = kinds.total();
    figures.lost = Some(reconciled.lost);
    figures.duplicated = Some(reconciled.duplicated);
    figures.leaked_connections = Some(u64::from(report.connections_in_use_at_close));
    figures.report();
}
