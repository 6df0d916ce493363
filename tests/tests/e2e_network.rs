#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! Replica loss and lag, and network faults through the kit's ChaosProxy,
//! all through `pgstack::Database`:
//!
//! - a lagging replica gets no reads; a killed replica costs the readers no
//!   error; reads return to the replica once it is back;
//! - 200 ms of added latency: every call succeeds, none faster than the delay;
//! - connection resets: fewer than 3 failed reads out of 25 reconnecting
//!   ones, and a ledger of writes under random resets with nothing lost or
//!   duplicated;
//! - refused connections: a refusal that clears after 300 ms is waited for;
//!   a lasting one fails every call within its bound, with the cause;
//! - a black hole: calls fail within their deadline, then in microseconds
//!   once the breaker is open; the node is used again when the network heals.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Figures, Kinds, LEDGER_TABLE, Ledger, Rounds};
use pgstack::config::NodeSettings;
use pgstack::{Database, Error, Route};
use pgstack_tests::{ChaosProxy, ProxyMode, TestCluster, TestDb};

/// Whether a read was answered by a standby (`None`: it failed).
async fn read_on_standby(db: &Database, kinds: &mut Kinds) -> Option<bool> {
    match db
        .query_one("where-am-i", Route::Read, "SELECT pg_is_in_recovery()", &[])
        .await
    {
        Ok(row) => Some(row.get(0)),
        Err(error) => {
            kinds.add(&error);
            None
        }
    }
}

/// `readers` tasks reading until `stop`; returns (reads answered by the
/// replica, reads answered by the primary, errors).
fn spawn_readers(
    db: &Database,
    readers: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, u64, Kinds)>> {
    (0..readers)
        .map(|_| {
            let db = db.clone();
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let (mut replica, mut primary, mut kinds) = (0, 0, Kinds::default());
                while !stop.load(Ordering::Acquire) {
                    match read_on_standby(&db, &mut kinds).await {
                        Some(true) => replica += 1,
                        Some(false) => primary += 1,
                        None => {}
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (replica, primary, kinds)
            })
        })
        .collect()
}

async fn join_readers(
    readers: Vec<tokio::task::JoinHandle<(u64, u64, Kinds)>>,
) -> (u64, u64, Kinds) {
    let (mut replica, mut primary, mut kinds) = (0, 0, Kinds::default());
    for reader in readers {
        let (r, p, k) = reader.await.unwrap();
        replica += r;
        primary += p;
        kinds.merge(&k);
    }
    (replica, primary, kinds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_and_loss_cost_readers_nothing_and_lagging_replicas_get_no_reads() {
    common::capture_logs();
    let started = Instant::now();
    let primary = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&primary).await.unwrap();
    tdb.client()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE notes (id bigserial PRIMARY KEY, body text)")
        .await
        .unwrap();
    let replica = primary.replica().await.unwrap();
    let mut config = common::config(tdb.url());
    config
        .replicas
        .push(NodeSettings::from_url(&common::with_password(&replica.url(tdb.name()))).unwrap());
    let db = common::connect(config).await;
    let mut kinds = Kinds::default();
    let mut reads = 0_u64;
    let mut faults = 0;

    // At rest, reads go to the replica.
    for _ in 0..20 {
        assert_eq!(read_on_standby(&db, &mut kinds).await, Some(true));
        reads += 1;
    }

    let mut rounds = Rounds::new();
    while let Some(round) = rounds.next_round() {
        // Lag: replay paused, a write made, the lag limit (1 s) passed.
        replica.pause_replay().await.unwrap();
        faults += 1;
        db.execute(
            "add-note",
            Route::Write,
            "INSERT INTO notes (body) VALUES ('lag')",
            &[],
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        db.cluster().refresh_replication().await;
        let lag = db.cluster().node("replica-1").unwrap().replica_lag();
        assert!(
            lag.is_some_and(|lag| lag > Duration::from_secs(1)),
            "{lag:?}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(&db, 16, &stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Release);
        let (on_replica, on_primary, errors) = join_readers(readers).await;
        reads += on_replica + on_primary + errors.total();
        kinds.merge(&errors);
        assert_eq!(on_replica, 0, "a lagging replica got reads (round {round})");
        assert_eq!(errors.total(), 0, "reads failed while lagging: {errors:?}");
        assert!(
            on_primary > 16,
            "the primary served the reads ({on_primary})"
        );

        // Caught up: reads return to the replica.
        replica.resume_replay().await.unwrap();
        replica.wait_for_replay().await.unwrap();
        db.cluster().refresh_replication().await;
        // The health monitor may have ejected the lagging replica: it comes
        // back after `health.restore_after` good rounds.
        assert!(
            common::eventually(Duration::from_secs(15), || async {
                db.cluster().refresh_replication().await;
                read_on_standby(&db, &mut Kinds::default()).await == Some(true)
            })
            .await,
            "reads return to the caught-up replica: {:?}",
            db.metrics().cluster.nodes
        );

        // Loss: the replica killed under 16 readers; nobody sees an error.
        let stop = Arc::new(AtomicBool::new(false));
        let readers = spawn_readers(&db, 16, &stop);
        tokio::time::sleep(Duration::from_millis(300)).await;
        replica.kill9().await.unwrap();
        faults += 1;
        tokio::time::sleep(Duration::from_millis(700)).await;
        stop.store(true, Ordering::Release);
        let (on_replica, on_primary, errors) = join_readers(readers).await;
        reads += on_replica + on_primary + errors.total();
        kinds.merge(&errors);
        assert_eq!(
            errors.total(),
            0,
            "reads failed when the replica died: {errors:?}"
        );
        assert!(
            on_replica > 0 && on_primary > 0,
            "{on_replica} {on_primary}"
        );
        // The primary keeps serving, then the replica comes back.
        for _ in 0..10 {
            assert_eq!(read_on_standby(&db, &mut kinds).await, Some(false));
            reads += 1;
        }
        replica.start_again().await.unwrap();
        replica.wait_for_replay().await.unwrap();
        db.cluster().refresh_replication().await;
        assert!(
            common::eventually(Duration::from_secs(15), || async {
                db.cluster().refresh_replication().await;
                read_on_standby(&db, &mut Kinds::default()).await == Some(true)
            })
            .await,
            "reads return to the restarted replica: {:?}",
            db.metrics().cluster.nodes
        );
    }

    let report = db.shutdown(Duration::from_secs(5)).await;
    let leaked = u64::from(report.connections_in_use_at_close);
    assert_eq!(leaked, 0, "{report:?}");
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("replica lag and loss", started);
    figures.operations = reads;
    figures.faults = faults;
    figures.errors = kinds.total();
    figures.leaked_connections = Some(leaked);
    figures.report();
}

/// A server, a database with the ledger, and a proxy in front of it.
struct Proxied {
    proxy: ChaosProxy,
    tdb: TestDb,
    _server: TestCluster,
}

impl Proxied {
    async fn start() -> Proxied {
        let server = TestCluster::start().await.unwrap();
        let tdb = TestDb::on(&server).await.unwrap();
        tdb.client()
            .await
            .unwrap()
            .batch_execute(LEDGER_TABLE)
            .await
            .unwrap();
        let proxy = ChaosProxy::start(server.addr()).await.unwrap();
        Proxied {
            proxy,
            tdb,
            _server: server,
        }
    }

    fn config(&self) -> pgstack::DatabaseConfig {
        common::config(&self.proxy.url(self.tdb.name()))
    }
}

/// Writes that end between two resets of the writes-under-resets phase, at
/// least.
const RESET_AFTER_WRITES: u64 = 20;

async fn insert(db: &Database, id: i64) -> Result<u64, Error> {
    db.execute(
        "post-entry",
        Route::Write,
        "INSERT INTO ledger (id, task) VALUES ($1, 0)",
        &[&id],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_latency_of_200ms_slows_calls_but_fails_none() {
    common::capture_logs();
    let started = Instant::now();
    let setup = Proxied::start().await;
    let db = common::connect(setup.config()).await;
    let mut ledger = Ledger::default();
    let mut kinds = Kinds::default();
    let mut operations = 0;
    let mut rounds = Rounds::new();
    while let Some(round) = rounds.next_round() {
        setup
            .proxy
            .set_mode(ProxyMode::Latency(Duration::from_millis(200)));
        let tasks: Vec<_> = (0..5_i64)
            .map(|task| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut fastest = Duration::MAX;
                    let mut ledger = Ledger::default();
                    let mut kinds = Kinds::default();
                    for i in 0..5_i64 {
                        let t = Instant::now();
                        match db.query_one("one", Route::Read, "SELECT 1", &[]).await {
                            Ok(_) => fastest = fastest.min(t.elapsed()),
                            Err(error) => kinds.add(&error),
                        }
                        let id = i64::try_from(round).unwrap() * 1000 + task * 10 + i;
                        let t = Instant::now();
                        let outcome = insert(&db, id).await;
                        if let Err(error) = &outcome {
                            kinds.add(error);
                        } else {
                            fastest = fastest.min(t.elapsed());
                        }
                        ledger.record(id, &outcome);
                    }
                    (fastest, ledger, kinds)
                })
            })
            .collect();
        for task in tasks {
            let (fastest, l, k) = task.await.unwrap();
            assert!(
                fastest >= Duration::from_millis(200),
                "a call through 200 ms of latency took {fastest:?}"
            );
            ledger.merge(l);
            kinds.merge(&k);
            operations += 10;
        }
        setup.proxy.set_mode(ProxyMode::PassThrough);
    }
    assert_eq!(kinds.total(), 0, "calls failed under latency: {kinds:?}");
    let reconciled = common::reconcile(&setup.tdb.client().await.unwrap(), &ledger).await;
    common::assert_reconciled("latency", &ledger, reconciled);
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("network: 200 ms latency", started);
    figures.operations = operations;
    figures.faults = rounds.done();
    figures.errors = kinds.total();
    figures.lost = Some(reconciled.lost);
    figures.duplicated = Some(reconciled.duplicated);
    figures.leaked_connections = Some(u64::from(report.connections_in_use_at_close));
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_fail_few_reads_and_never_duplicate_a_write() {
    common::capture_logs();
    let started = Instant::now();
    let setup = Proxied::start().await;
    let db = common::connect(setup.config()).await;
    let mut ledger = Ledger::default();
    let mut kinds = Kinds::default();
    let mut operations = 0;
    let mut resets = 0;
    let mut rounds = Rounds::new();
    while let Some(round) = rounds.next_round() {
        // PgDog's check: every open connection reset before each read.
        let mut failed = 0;
        for _ in 0..25 {
            setup.proxy.reset_all();
            resets += 1;
            operations += 1;
            if let Err(error) = db.query_one("one", Route::Read, "SELECT 1", &[]).await {
                kinds.add(&error);
                failed += 1;
            }
        }
        assert!(failed < 3, "{failed} of 25 reconnecting reads failed");

        // Writes under random resets: one every 10-60 ms, but never before
        // RESET_AFTER_WRITES writes have ended since the last one
        // (`ChaosProxy::keep_resetting`), so that on the saturated machine
        // of a soak a reset cuts no larger share of the writes.
        let stop = AtomicBool::new(false);
        let ended = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..16_i64)
            .map(|task| {
                let db = db.clone();
                let ended = Arc::clone(&ended);
                tokio::spawn(async move {
                    let mut ledger = Ledger::default();
                    let mut kinds = Kinds::default();
                    for i in 0..100_i64 {
                        let id = i64::try_from(round).unwrap() * 100_000 + task * 1000 + i;
                        let outcome = insert(&db, id).await;
                        ended.fetch_add(1, Ordering::Release);
                        if let Err(error) = &outcome {
                            kinds.add(error);
                        }
                        ledger.record(id, &outcome);
                    }
                    (ledger, kinds)
                })
            })
            .collect();
        let chaos = setup
            .proxy
            .keep_resetting(&stop, &ended, RESET_AFTER_WRITES);
        let writers = async {
            for task in tasks {
                let (l, k) = task.await.unwrap();
                operations += l.writes() as u64;
                ledger.merge(l);
                kinds.merge(&k);
            }
            stop.store(true, Ordering::Release);
        };
        let (chaos_resets, ()) = tokio::join!(chaos, writers);
        resets += chaos_resets;
    }
    let reconciled = common::reconcile(&setup.tdb.client().await.unwrap(), &ledger).await;
    common::assert_reconciled("resets", &ledger, reconciled);
    assert!(
        ledger.ok.len() > ledger.writes() / 2,
        "most writes succeed: {} of {}",
        ledger.ok.len(),
        ledger.writes()
    );
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
    common::assert_no_password_in_logs();
    eprintln!(
        "resets: {resets}; {} writes, {} ok, {} unknown ({} applied), {} not applied; {kinds:?}",
        ledger.writes(),
        ledger.ok.len(),
        ledger.unknown.len(),
        reconciled.unknown_applied,
        ledger.not_applied.len()
    );
    let mut figures = Figures::new("network: connection resets", started);
    figures.operations = operations;
    figures.faults = resets;
    figures.errors = kinds.total();
    figures.lost = Some(reconciled.lost);
    figures.duplicated = Some(reconciled.duplicated);
    figures.leaked_connections = Some(u64::from(report.connections_in_use_at_close));
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_waited_out_briefly_and_reported_with_their_cause() {
    common::capture_logs();
    let started = Instant::now();
    let setup = Proxied::start().await;
    let port = setup.proxy.port().to_string();
    let patient = common::connect(setup.config()).await;
    let mut impatient_config = setup.config();
    impatient_config.retry.deadline = Some(Duration::from_secs(2));
    let impatient = common::connect(impatient_config).await;
    let mut kinds = Kinds::default();
    let mut operations = 0;
    let mut faults = 0;
    let mut rounds = Rounds::new();
    while let Some(_round) = rounds.next_round() {
        // A refusal that clears after 300 ms: every read waits it out.
        setup.proxy.set_mode(ProxyMode::Refuse);
        setup.proxy.reset_all();
        faults += 1;
        let reads: Vec<_> = (0..10)
            .map(|_| {
                let db = patient.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let result = db.query_one("one", Route::Read, "SELECT 1", &[]).await;
                    (result.map(|_| ()), t.elapsed())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        setup.proxy.set_mode(ProxyMode::PassThrough);
        for read in reads {
            let (result, took) = read.await.unwrap();
            operations += 1;
            if let Err(error) = result {
                kinds.add(&error);
                panic!(
                    "a read failed across a 300 ms refusal after {took:?}: {}",
                    common::checked(&error)
                );
            }
            assert!(took < Duration::from_secs(3), "{took:?}");
        }

        // A lasting refusal: every call fails within its bound (retry
        // deadline 2 s + one checkout of at most 2 s), saying why.
        setup.proxy.set_mode(ProxyMode::Refuse);
        setup.proxy.reset_all();
        faults += 1;
        let refused_before = setup.proxy.stats().refused;
        for i in 0..6_i64 {
            let t = Instant::now();
            let result = if i % 2 == 0 {
                impatient
                    .query_one("one", Route::Read, "SELECT 1", &[])
                    .await
                    .map(|_| 0)
            } else {
                insert(&impatient, i).await
            };
            let took = t.elapsed();
            operations += 1;
            let error = result.expect_err("nothing gets through a refusing network");
            kinds.add(&error);
            let text = common::checked(&error);
            assert!(took < Duration::from_secs(5), "{took:?}: {text}");
            assert!(
                matches!(
                    error,
                    Error::PoolTimeout { .. }
                        | Error::CircuitOpen { .. }
                        | Error::Unavailable { .. }
                ),
                "{text}"
            );
            assert!(error.provably_not_sent(), "{text}");
            assert!(text.contains(&port), "the error names the node: {text}");
        }
        assert!(setup.proxy.stats().refused > refused_before);
        setup.proxy.set_mode(ProxyMode::PassThrough);
        assert!(
            common::eventually(Duration::from_secs(10), || async {
                impatient
                    .query_one("one", Route::Read, "SELECT 1", &[])
                    .await
                    .is_ok()
            })
            .await
        );
    }
    let mut leaked = 0;
    for db in [patient, impatient] {
        let report = db.shutdown(Duration::from_secs(5)).await;
        leaked += u64::from(report.connections_in_use_at_close);
    }
    assert_eq!(leaked, 0);
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("network: refused connections", started);
    figures.operations = operations;
    figures.faults = faults;
    figures.errors = kinds.total();
    figures.leaked_connections = Some(leaked);
    figures.report();
}

/// A database behind a proxy whose breaker opens quickly under a black
/// hole: a round trip is bounded by statement_timeout + half the connect
/// timeout = 1.25 s (opening a shared connection by twice the connect
/// timeout), the retry loop by its 3 s deadline.
fn black_hole_config(setup: &Proxied) -> pgstack::DatabaseConfig {
    let mut config = setup.config();
    config.query.statement_timeout = Some(Duration::from_secs(1));
    config.pool.connect_timeout = Duration::from_millis(500);
    config.pool.acquire_timeout = Duration::from_secs(1);
    config.retry.deadline = Some(Duration::from_secs(3));
    config.circuit_breaker.open_duration = Duration::from_secs(5);
    config.circuit_breaker.max_open_duration = Duration::from_secs(10);
    config
}

/// The bound of one call under [`black_hole_config`], with 1 s of slack.
const BLACK_HOLE_BOUND: Duration = Duration::from_millis(3000 + 1500 + 1000);

fn breaker_open(db: &Database) -> bool {
    db.metrics().cluster.nodes[0].breaker.as_deref() == Some("open")
}

/// Black-holes the network and calls (8 at a time) until the breaker opens;
/// every call must fail within [`BLACK_HOLE_BOUND`]. Returns the calls made.
async fn call_until_the_breaker_opens(db: &Database, kinds: &mut Kinds) -> u64 {
    let mut calls_made = 0;
    let waited = Instant::now();
    while !breaker_open(db) {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the breaker opens: {:?}",
            db.metrics().cluster.nodes[0]
        );
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let result = tokio::time::timeout(
                        Duration::from_secs(30),
                        db.query_one("one", Route::Read, "SELECT 1", &[]),
                    )
                    .await;
                    (result, t.elapsed())
                })
            })
            .collect();
        for call in calls {
            let (result, took) = call.await.unwrap();
            calls_made += 1;
            let result = result.expect("a call hung in the black hole");
            let error = result.expect_err("nothing gets through a black hole");
            kinds.add(&error);
            assert!(
                took <= BLACK_HOLE_BOUND,
                "{took:?}: {}",
                common::checked(&error)
            );
        }
    }
    calls_made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_fails_calls_within_their_deadline_and_the_node_returns_when_it_heals() {
    common::capture_logs();
    let started = Instant::now();
    let setup = Proxied::start().await;
    let db = common::connect(black_hole_config(&setup)).await;
    let mut kinds = Kinds::default();
    let mut operations = 0;
    let mut rounds = Rounds::new();
    while let Some(_round) = rounds.next_round() {
        db.query_one("one", Route::Read, "SELECT 1", &[])
            .await
            .unwrap();
        setup.proxy.set_mode(ProxyMode::Blackhole);
        operations += call_until_the_breaker_opens(&db, &mut kinds).await;
        // While open: still within the bound, and the error names the node.
        for _ in 0..4 {
            let t = Instant::now();
            let error = db
                .query_one("one", Route::Read, "SELECT 1", &[])
                .await
                .expect_err("nothing gets through");
            operations += 1;
            kinds.add(&error);
            let text = common::checked(&error);
            assert!(t.elapsed() <= BLACK_HOLE_BOUND, "{:?}: {text}", t.elapsed());
            assert!(text.contains("primary"), "{text}");
        }
        // Healed: the node is used again.
        setup.proxy.set_mode(ProxyMode::PassThrough);
        assert!(
            common::eventually(Duration::from_secs(20), || async {
                db.query_one("one", Route::Read, "SELECT 1", &[])
                    .await
                    .is_ok()
            })
            .await,
            "the node is used again: {:?}",
            db.metrics().cluster.nodes[0]
        );
    }
    let report = db.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.connections_in_use_at_close, 0, "{report:?}");
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("network: black hole", started);
    figures.operations = operations;
    figures.faults = rounds.done();
    figures.errors = kinds.total();
    figures.leaked_connections = Some(u64::from(report.connections_in_use_at_close));
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_breaker_is_open_calls_fail_in_microseconds() {
    common::capture_logs();
    let setup = Proxied::start().await;
    let db = common::connect(black_hole_config(&setup)).await;
    let mut kinds = Kinds::default();
    db.query_one("one", Route::Read, "SELECT 1", &[])
        .await
        .unwrap();
    setup.proxy.set_mode(ProxyMode::Blackhole);
    call_until_the_breaker_opens(&db, &mut kinds).await;
    // The breaker stays open for 5 s, longer than the calls' 3 s retry
    // deadline: waiting cannot help them, so they fail at once.
    let mut took = Vec::new();
    for _ in 0..10 {
        if !breaker_open(&db) {
            break;
        }
        let t = Instant::now();
        let error = db
            .query_one("one", Route::Read, "SELECT 1", &[])
            .await
            .expect_err("the breaker is open");
        took.push(t.elapsed());
        let text = common::checked(&error);
        assert!(matches!(error, Error::CircuitOpen { .. }), "{text}");
        assert!(text.contains("primary") && text.contains("probe"), "{text}");
    }
    took.sort();
    assert!(!took.is_empty());
    let median = took[took.len() / 2];
    eprintln!("open breaker: calls failed after {took:?}");
    assert!(
        median < Duration::from_millis(1),
        "median {median:?} (all: {took:?})"
    );
    setup.proxy.set_mode(ProxyMode::PassThrough);
    common::assert_no_password_in_logs();
}
