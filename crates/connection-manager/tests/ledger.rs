//! Writes under injected faults: no write is ever applied twice, and every
//! call's outcome is accounted for. Serializable transactions commit exactly
//! once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pgstack_connection::Queryable as _;
use pgstack_connection::{Cluster, Error, IsolationLevel, Route, TransactionOptions};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};

#[derive(Debug, Default)]
struct Tally {
    ok: Vec<i64>,
    unknown: Vec<i64>,
    failed: Vec<(i64, String)>,
}

/// A server with a fresh database holding `table`, a ChaosProxy in front of
/// it that resets every open connection again and again (10-60 ms apart, and
/// never before `at_least` operations have ended since the last reset:
/// `ChaosProxy::keep_resetting`), and a cluster through the proxy.
struct UnderResets {
    _server: TestCluster,
    db: TestDb,
    cluster: Cluster,
    stop: Arc<AtomicBool>,
    /// Operations ended: the callers count theirs here.
    ended: Arc<AtomicU64>,
    proxy: Arc<ChaosProxy>,
    chaos: tokio::task::JoinHandle<u64>,
}

impl UnderResets {
    async fn start(
        table: &str,
        at_least: u64,
        edit: impl FnOnce(&mut pgstack_config::DatabaseConfig),
    ) -> UnderResets {
        let server = TestCluster::start().await.unwrap();
        let db = TestDb::on(&server).await.unwrap();
        db.client()
            .await
            .unwrap()
            .batch_execute(table)
            .await
            .unwrap();
        let proxy = Arc::new(ChaosProxy::start(server.addr()).await.unwrap());
        let mut config = common::config(&proxy.url(db.name()));
        edit(&mut config);
        let cluster = Cluster::connect(&config).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(AtomicU64::new(0));
        let chaos = {
            let (stop, ended, proxy) = (Arc::clone(&stop), Arc::clone(&ended), Arc::clone(&proxy));
            tokio::spawn(async move { proxy.keep_resetting(&stop, &ended, at_least).await })
        };
        UnderResets {
            _server: server,
            db,
            cluster,
            stop,
            ended,
            proxy,
            chaos,
        }
    }

    /// Whether a caller that has made `made` of its `planned` calls goes
    /// on: until it has made them all and the proxy has reset the
    /// connections more than `resets` times (a load that ended before the
    /// resets would test little: paced by time as well, they do not keep up
    /// with a fast machine).
    fn goes_on(proxy: &ChaosProxy, made: i64, planned: i64, resets: u64) -> bool {
        made < planned || proxy.reset_rounds() <= resets
    }

    /// Stops the resets; how many there were.
    async fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        (&mut self.chaos).await.unwrap()
    }

    /// Rows per id in `table`.
    async fn counts(&self, table: &str) -> HashMap<i64, i64> {
        let rows = self
            .db
            .client()
            .await
            .unwrap()
            .query(
                &format!("SELECT id, count(*) FROM {table} GROUP BY id"),
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_inserts_through_random_resets_are_never_duplicated() {
    // No unique constraint: a write applied twice would show as two rows. A
    // reset fails the inserts in flight on the connections it cuts, up to
    // one per task; never before 60 inserts have ended since the last one.
    let mut setup = UnderResets::start(
        "CREATE TABLE ledger (id bigint NOT NULL, amount int NOT NULL)",
        60,
        |config| {
            config.pool.max_size = 10;
            config.retry.max_attempts = 10;
        },
    )
    .await;
    let cluster = setup.cluster.clone();

    const TASKS: i64 = 50;
    const PER_TASK: i64 = 200;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let cluster = cluster.clone();
        let ended = Arc::clone(&setup.ended);
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for i in 0..PER_TASK {
                let id = task * PER_TASK + i;
                let amount = (id % 97) as i32;
                let outcome = cluster
                    .execute(
                        "post-entry",
                        Route::Write,
                        "INSERT INTO ledger (id, amount) VALUES ($1, $2)",
                        &[&id, &amount],
                    )
                    .await;
                ended.fetch_add(1, Ordering::Release);
                match outcome {
                    Ok(1) => tally.ok.push(id),
                    Ok(n) => panic!("insert {id} affected {n} rows"),
                    Err(Error::CommitOutcomeUnknown { .. }) => tally.unknown.push(id),
                    Err(e) => tally.failed.push((id, e.to_string())),
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        all.ok.extend(tally.ok);
        all.unknown.extend(tally.unknown);
        all.failed.extend(tally.failed);
    }
    let resets = setup.stop().await;

    let sample: Vec<_> = all.failed.iter().take(3).collect();
    eprintln!("ledger: failed sample: {sample:?}");
    // Every call is accounted for, once.
    let total = (TASKS * PER_TASK) as usize;
    assert_eq!(all.ok.len() + all.unknown.len() + all.failed.len(), total);

    let counts = setup.counts("ledger").await;
    let duplicates: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicates.is_empty(), "duplicated ids: {duplicates:?}");
    for id in &all.ok {
        assert_eq!(counts.get(id), Some(&1), "acknowledged insert {id} missing");
    }
    for (id, error) in &all.failed {
        assert_eq!(
            counts.get(id),
            None,
            "insert {id} failed ({error}) yet was applied"
        );
    }
    // Unknown outcomes are resolved by looking the id up.
    let resolved_applied = all
        .unknown
        .iter()
        .filter(|id| counts.contains_key(id))
        .count();
    let applied: HashSet<i64> = counts.keys().copied().collect();
    assert_eq!(applied.len(), all.ok.len() + resolved_applied);
    let metrics = cluster.metrics();
    eprintln!(
        "ledger: {resets} resets; {} ok, {} unknown ({} of them applied), {} failed, {} retries",
        all.ok.len(),
        all.unknown.len(),
        resolved_applied,
        all.failed.len(),
        metrics.retries
    );
    assert_eq!(metrics.queries as usize, total);
    assert_eq!(metrics.unknown_outcomes as usize, all.unknown.len());
    assert!(resets > 10, "the proxy reset connections ({resets})");
    // Most inserts are acknowledged: a reset costs the inserts it cuts, and
    // the cluster is back to work right after it.
    assert!(
        all.ok.len() > total / 2,
        "the cluster kept working through the resets ({} of {total} acknowledged)",
        all.ok.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_transactions_under_conflict_commit_exactly_once() {
    let db = TestDb::new().await.unwrap();
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE counter (id int PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO counter VALUES (1, 0); \
             CREATE TABLE increments (task int, i int, seen bigint, PRIMARY KEY (task, i))",
        )
        .await
        .unwrap();
    let mut config = common::config(db.url());
    config.pool.max_size = 12;
    config.retry.max_attempts = 100;
    config.retry.initial_backoff = Duration::from_millis(1);
    config.retry.max_backoff = Duration::from_millis(20);
    let cluster = Cluster::connect(&config).await.unwrap();
    let options = TransactionOptions::new().isolation(IsolationLevel::Serializable);

    const TASKS: i32 = 8;
    const PER_TASK: i32 = 25;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            // Owned captures (`async move`): a borrowing async closure's
            // future is not provably Send in a spawned task.
            let attempts = Arc::new(AtomicU32::new(0));
            for i in 0..PER_TASK {
                let attempts = Arc::clone(&attempts);
                cluster
                    .transaction_with("increment", options, async move |tx| {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let n: i64 = tx
                            .query_one("SELECT n FROM counter WHERE id = 1", &[])
                            .await?
                            .get(0);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        tx.execute("UPDATE counter SET n = $1 WHERE id = 1", &[&(n + 1)])
                            .await?;
                        tx.execute(
                            "INSERT INTO increments VALUES ($1, $2, $3)",
                            &[&task, &i, &n],
                        )
                        .await?;
                        Ok::<_, pgstack_connection::Error>(())
                    })
                    .await
                    .unwrap();
            }
            attempts.load(Ordering::Relaxed)
        }));
    }
    let mut attempts = 0;
    for task in tasks {
        attempts += task.await.unwrap();
    }
    let total = i64::from(TASKS * PER_TASK);
    let n: i64 = cluster
        .query_one("n", Route::Write, "SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, total, "every transaction committed exactly once");
    let rows: i64 = cluster
        .query_one("rows", Route::Write, "SELECT count(*) FROM increments", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, total);
    // Serial order: each increment saw a distinct value 0..total.
    let distinct: i64 = cluster
        .query_one(
            "distinct",
            Route::Write,
            "SELECT count(DISTINCT seen) FROM increments",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, total);
    let metrics = cluster.metrics();
    eprintln!(
        "serializable: {attempts} attempts for {total} transactions, {} retries",
        metrics.retries
    );
    assert!(metrics.retries > 0, "the workload conflicted");
    assert_eq!(u64::from(attempts), total as u64 + metrics.retries);
}

/// A transaction whose `COMMIT` is held in the proxy for `hold` (every chunk
/// is), and whose connection is reset `reset_after` after the `COMMIT` went
/// out. Returns the result, how many times the closure ran, the cluster's
/// figures and the rows in the table afterwards.
async fn commit_cut_off(
    hold: Duration,
    reset_after: Duration,
) -> (
    Result<(), Error>,
    u32,
    pgstack_connection::ClusterMetrics,
    i64,
) {
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    db.client()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE payments (id bigint NOT NULL)")
        .await
        .unwrap();
    let proxy = Arc::new(ChaosProxy::start(server.addr()).await.unwrap());
    let cluster = Cluster::connect(&common::config(&proxy.url(db.name())))
        .await
        .unwrap();
    let runs = AtomicU32::new(0);
    let result = cluster
        .transaction("pay", async |tx| {
            let run = runs.fetch_add(1, Ordering::Relaxed);
            tx.execute("INSERT INTO payments VALUES (1)", &[]).await?;
            if run == 0 {
                // From here on every chunk is held in the proxy, and the
                // connection is reset while the COMMIT (or its answer) is
                // in there.
                proxy.set_mode(ProxyMode::Latency(hold));
                let proxy = Arc::clone(&proxy);
                tokio::spawn(async move {
                    tokio::time::sleep(reset_after).await;
                    proxy.reset_all();
                    proxy.set_mode(ProxyMode::PassThrough);
                });
            }
            Ok(())
        })
        .await;
    let metrics = cluster.metrics();
    let found: i64 = db
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM payments", &[])
        .await
        .unwrap()
        .get(0);
    // The cluster goes on working through the proxy.
    cluster
        .execute(
            "pay-again",
            Route::Write,
            "INSERT INTO payments VALUES (2)",
            &[],
        )
        .await
        .unwrap();
    cluster.close(Duration::from_secs(5)).await;
    (result, runs.load(Ordering::Relaxed), metrics, found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_lost_before_it_arrived_is_looked_up_and_run_again() {
    // The COMMIT is still in the proxy when the connection is reset: the
    // server rolls the transaction back, the look-up says so, and the
    // transaction runs again.
    let (result, runs, metrics, found) =
        commit_cut_off(Duration::from_secs(2), Duration::from_millis(100)).await;
    result.unwrap();
    assert_eq!(runs, 2, "run again once it was known to have rolled back");
    assert_eq!(metrics.commit_resolutions.aborted, 1, "{metrics:?}");
    assert_eq!(metrics.commit_resolutions.total(), 1, "{metrics:?}");
    assert_eq!((metrics.retries, metrics.unknown_outcomes), (1, 0));
    assert_eq!(found, 1, "committed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_looked_up_and_reported_committed() {
    // The COMMIT arrives after 1 s and commits; its answer is still in the
    // proxy when the connection is reset, 1.5 s after it was sent.
    let (result, runs, metrics, found) =
        commit_cut_off(Duration::from_secs(1), Duration::from_millis(1500)).await;
    result.unwrap();
    assert_eq!(runs, 1, "not run again: it committed");
    assert_eq!(metrics.commit_resolutions.committed, 1, "{metrics:?}");
    assert_eq!(metrics.commit_resolutions.total(), 1, "{metrics:?}");
    assert_eq!((metrics.retries, metrics.unknown_outcomes), (0, 0));
    assert_eq!(found, 1, "committed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_writes_are_retried_through_resets() {
    // Paced by finished writes as well as time: paced by time alone, a
    // saturated machine (3 CPU hogs on 2 cores) made some write meet a reset
    // on each of its 20 attempts.
    let mut setup = UnderResets::start("CREATE TABLE seen (id bigint PRIMARY KEY)", 10, |config| {
        config.retry.max_attempts = 20;
    })
    .await;
    let cluster = setup.cluster.clone();
    let mut tasks = Vec::new();
    for task in 0..10_i64 {
        let cluster = cluster.clone();
        let ended = Arc::clone(&setup.ended);
        let proxy = Arc::clone(&setup.proxy);
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while UnderResets::goes_on(&proxy, i, 100, 10) {
                let id = task * 100_000 + i;
                i += 1;
                // Safe to repeat: a second run inserts nothing.
                cluster
                    .execute(
                        pgstack_connection::Op::from("mark-seen").idempotent(),
                        Route::Write,
                        "INSERT INTO seen VALUES ($1) ON CONFLICT DO NOTHING",
                        &[&id],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("idempotent write {id} failed: {e}"));
                ended.fetch_add(1, Ordering::Release);
            }
            i
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await.unwrap();
    }
    let resets = setup.stop().await;
    eprintln!("idempotent writes: {written} through {resets} resets");
    assert!(resets > 10, "{resets} resets");
    assert!(written >= 1000);
    let counts = setup.counts("seen").await;
    assert_eq!(counts.len() as i64, written);
    let metrics = cluster.metrics();
    assert_eq!(metrics.unknown_outcomes, 0);
    assert!(metrics.retries > 0, "the resets hit some writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolvable_autocommit_writes_through_resets_are_looked_up_not_unknown() {
    // No unique constraint: a write applied twice would show as two rows.
    let mut setup = UnderResets::start("CREATE TABLE ledger (id bigint NOT NULL)", 15, |config| {
        config.pool.max_size = 10;
        config.retry.max_attempts = 10;
    })
    .await;
    let cluster = setup.cluster.clone();
    let mut tasks = Vec::new();
    for task in 0..8_i64 {
        let cluster = cluster.clone();
        let ended = Arc::clone(&setup.ended);
        let proxy = Arc::clone(&setup.proxy);
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut i = 0;
            while UnderResets::goes_on(&proxy, i, 60, 5) {
                let id = task * 100_000 + i;
                i += 1;
                let outcome = cluster
                    .execute(
                        pgstack_connection::Op::from("post-entry").resolvable(),
                        Route::Write,
                        "INSERT INTO ledger (id) VALUES ($1)",
                        &[&id],
                    )
                    .await;
                ended.fetch_add(1, Ordering::Release);
                match outcome {
                    Ok(1) => tally.ok.push(id),
                    Ok(n) => panic!("insert {id} affected {n} rows"),
                    Err(e) if e.provably_not_sent() => tally.failed.push((id, e.to_string())),
                    Err(e) => {
                        assert!(e.is_commit_outcome_unknown(), "{e}");
                        tally.unknown.push(id);
                    }
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        all.ok.extend(tally.ok);
        all.unknown.extend(tally.unknown);
        all.failed.extend(tally.failed);
    }
    let resets = setup.stop().await;
    let counts = setup.counts("ledger").await;
    assert!(counts.values().all(|n| *n == 1), "a write applied twice");
    for id in &all.ok {
        assert_eq!(counts.get(id), Some(&1), "acknowledged insert {id} missing");
    }
    for (id, error) in &all.failed {
        assert_eq!(
            counts.get(id),
            None,
            "insert {id} failed ({error}) yet applied"
        );
    }
    let metrics = cluster.metrics();
    let resolved = metrics.commit_resolutions;
    eprintln!(
        "resolvable writes: {resets} resets, {} ok, {} failed, {} unknown; interrupted commits {resolved:?}",
        all.ok.len(),
        all.failed.len(),
        all.unknown.len()
    );
    assert!(resets > 5, "{resets} resets");
    // Each interrupted commit was looked up; at most 1 % stay unknown.
    assert!(resolved.total() > 0, "no commit was interrupted");
    assert!(
        all.unknown.len() as u64 * 100 <= resolved.total(),
        "{} unknown of {} interrupted commits",
        all.unknown.len(),
        resolved.total()
    );
    assert_eq!(resolved.unknown, all.unknown.len() as u64);
}
