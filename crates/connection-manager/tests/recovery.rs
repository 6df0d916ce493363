//! A restarted primary with the default retry and breaker settings: reads
//! whose deadline outlasts the outage wait for the node instead of failing,
//! and the background probe puts the node back in use as soon as it accepts
//! logins, not when the breaker's open duration runs out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgstack_config::{DatabaseConfig, RetrySettings};
use pgstack_connection::{Cluster, Error, Op, Route};
use pgstack_tests::{TestCluster, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_wait_out_a_restart_and_resume_as_soon_as_the_server_accepts_logins() {
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    let mut config = DatabaseConfig::for_tests(db.url()).unwrap();
    config.pool.max_size = 8;
    config.pool.min_idle = 2;
    // The defaults that matter here, spelled out: 3 attempts, a 20 % retry
    // budget, a breaker open for 5 s once tripped; callers give 15 s.
    config.retry = RetrySettings {
        deadline: Some(Duration::from_secs(15)),
        ..RetrySettings::default()
    };
    assert_eq!(config.retry.max_attempts, 3);
    assert_eq!(config.circuit_breaker.open_duration, Duration::from_secs(5));
    let cluster = Cluster::connect(&config).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let cluster = cluster.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut successes = Vec::new();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    match cluster
                        .query_one("read", Route::Read, "SELECT 1", &[])
                        .await
                    {
                        Ok(_) => successes.push(Instant::now()),
                        Err(e) => errors.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (successes, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill9().await.unwrap();
    let killed = Instant::now();
    // Long enough for the breaker to open: every reader is waiting on it.
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            breaker_state(&cluster) == "open"
        })
        .await,
        "the breaker opens while the server is down: {}",
        breaker_state(&cluster)
    );
    // Left alone, the breaker would let a probe through then (5 s after it
    // opened).
    let breaker_probe = cluster
        .primary()
        .circuit_breaker()
        .unwrap()
        .snapshot()
        .probe_at
        .expect("an open breaker has a probe scheduled")
        .into_std();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start_again().await.unwrap();
    let back = Instant::now();
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            breaker_state(&cluster) == "closed"
        })
        .await,
        "the breaker closes again: {}",
        breaker_state(&cluster)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Release);

    let mut errors = Vec::new();
    let mut first_after = None::<Instant>;
    for reader in readers {
        let (successes, e) = reader.await.unwrap();
        errors.extend(e);
        let first = successes.into_iter().find(|t| *t > back);
        assert!(first.is_some(), "every reader succeeds after the restart");
        first_after = first_after.min(first).or(first);
    }
    assert_eq!(errors, Vec::<String>::new(), "no read failed");
    // The background probe half-opened the breaker when the server took
    // logins again, well before the breaker's own probe. (Only telling when
    // the restart itself was over well before that probe.)
    let first_after = first_after.unwrap();
    if back + Duration::from_secs(2) < breaker_probe {
        assert!(
            first_after + Duration::from_secs(1) < breaker_probe,
            "reads resumed {:?} after the server came back ({:?} after the kill), \
             not before the breaker's own probe",
            first_after - back,
            first_after - killed
        );
    } else {
        eprintln!(
            "the restart took {:?}: too long to tell the probes apart",
            back - killed
        );
    }
    cluster.close(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_call_with_a_short_retry_deadline_fails_at_once_where_others_wait() {
    let db = TestDb::new().await.unwrap();
    let mut config = DatabaseConfig::for_tests(db.url()).unwrap();
    config.retry.deadline = Some(Duration::from_secs(10));
    config.circuit_breaker.open_duration = Duration::from_secs(2);
    let cluster = Cluster::connect(&config).await.unwrap();
    // Trip the node's breaker: its next probe is 2 s away.
    let breaker = cluster.primary().circuit_breaker().unwrap().clone();
    while let Ok(permit) = breaker.acquire() {
        permit.failure();
    }
    assert_eq!(breaker_state(&cluster), "open");

    // A caller that has 200 ms cannot use a node back in 2 s: it fails at
    // once, told which node and when the probe comes.
    let started = Instant::now();
    let op = Op::from("hurried").retry_deadline(Duration::from_millis(200));
    let error = cluster
        .query_one(op, Route::Read, "SELECT 1", &[])
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&error, Error::CircuitOpen { node, probe_in: Some(_), .. } if node.as_ref() == "primary"),
        "{error:?}"
    );
    // At once: no backoff slept through, no wait for the probe.
    assert!(took < Duration::from_secs(1), "failed after {took:?}");

    // A caller with the configured 10 s waits, and the node (up all along)
    // is back as soon as the background probe half-opens the breaker.
    let started = Instant::now();
    cluster
        .query_one("patient", Route::Read, "SELECT 1", &[])
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the probe, not the open duration, ended the wait: {:?}",
        started.elapsed()
    );
    cluster.close(Duration::from_secs(2)).await;
}

fn breaker_state(cluster: &Cluster) -> String {
    cluster.metrics().nodes[0]
        .breaker
        .clone()
        .unwrap_or_default()
}
