//! The circuit breaker on tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Logs, TestRecorder};
use pgstack_config::{CircuitBreakerSettings, SlidingWindow};
use pgstack_resilience::{
    BreakerError, BreakerPolicy, BreakerState, CircuitBreaker, Outcome, STATE_METRIC,
    TransitionReason,
};
use tokio::time::{Instant, advance};

const MS: Duration = Duration::from_millis(1);

fn settings() -> CircuitBreakerSettings {
    CircuitBreakerSettings {
        failure_rate_threshold: 0.5,
        slow_call_detection: true,
        slow_call_rate_threshold: 1.0,
        slow_call_duration: 1000 * MS,
        minimum_calls: 4,
        sliding_window: SlidingWindow::Count,
        window_size: 10,
        window_duration: Duration::from_secs(10),
        open_duration: 5000 * MS,
        open_duration_multiplier: 2.0,
        max_open_duration: 30_000 * MS,
        half_open_probes: 2,
    }
}

fn record(breaker: &CircuitBreaker, outcome: Outcome) {
    breaker.acquire().expect("permitted").record(outcome);
}

fn trip(breaker: &CircuitBreaker) {
    while breaker.state() == BreakerState::Closed {
        record(breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn opens_at_the_failure_rate_only_after_minimum_calls() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    // Three failures: 100 % failed, but fewer than 4 calls.
    for _ in 0..3 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    // Ignored calls are not counted.
    record(&breaker, Outcome::Ignored);
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot().calls, 3);
    // The fourth call is judged: 3/4 >= 0.5.
    record(&breaker, Outcome::Success);
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn count_window_forgets_old_failures() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    // 6 successes then 4 failures (40 %) stays closed.
    for i in 0..10 {
        record(
            &breaker,
            if i < 6 {
                Outcome::Success
            } else {
                Outcome::Failure
            },
        );
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
    let s = breaker.snapshot();
    assert_eq!(
        (s.calls, s.failed_calls, s.failure_rate),
        (10, 4, Some(0.4))
    );
    // The ring forgets the oldest call first: six successes push out the six
    // old successes, the next four push out the failures.
    for _ in 0..6 {
        record(&breaker, Outcome::Success);
    }
    assert_eq!(breaker.snapshot().failed_calls, 4);
    for _ in 0..4 {
        record(&breaker, Outcome::Success);
    }
    assert_eq!(breaker.snapshot().failed_calls, 0);
    for _ in 0..4 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), BreakerState::Closed, "4 of 10");
    record(&breaker, Outcome::Failure);
    assert_eq!(breaker.state(), BreakerState::Open, "5 of 10");
}

#[tokio::test(start_paused = true)]
async fn slow_call_detection_can_be_switched_off_in_the_settings() {
    let s = CircuitBreakerSettings {
        slow_call_rate_threshold: 0.5,
        slow_call_detection: false,
        ..settings()
    };
    assert!(
        !BreakerPolicy::from_settings(&s)
            .unwrap()
            .detects_slow_calls()
    );
    assert!(
        BreakerPolicy::from_settings(&settings())
            .unwrap()
            .detects_slow_calls()
    );
    let breaker = CircuitBreaker::new("db-1", &s).unwrap();
    for _ in 0..4 {
        let permit = breaker.acquire().unwrap();
        advance(5000 * MS).await;
        permit.record(Outcome::Success);
    }
    assert_eq!(breaker.snapshot().slow_calls, 0);
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "slow calls are not counted"
    );
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_the_breaker() {
    let s = CircuitBreakerSettings {
        slow_call_rate_threshold: 0.5,
        ..settings()
    };
    let breaker = CircuitBreaker::new("db-1", &s).unwrap();
    // Exactly the slow-call duration is not slow; a millisecond more is.
    for elapsed in [1000, 1000, 1001] {
        breaker
            .acquire()
            .unwrap()
            .record_elapsed(Outcome::Success, elapsed * MS);
    }
    assert_eq!(breaker.snapshot().slow_calls, 1);
    // Timed by the permit: 1001 ms on the paused clock.
    let permit = breaker.acquire().unwrap();
    advance(1001 * MS).await;
    permit.record(Outcome::Success);
    let mut events = breaker.subscribe();
    assert_eq!(breaker.state(), BreakerState::Open, "2 of 4 calls slow");
    assert!(
        events.try_recv().is_err(),
        "subscribed after the transition"
    );

    let breaker = CircuitBreaker::new("db-2", &s).unwrap();
    let mut events = breaker.subscribe();
    for _ in 0..4 {
        let _ = breaker
            .call(async {
                tokio::time::sleep(1500 * MS).await;
                Ok::<_, std::io::Error>(())
            })
            .await;
    }
    let t = events.recv().await.unwrap();
    assert_eq!(
        (t.to, t.reason),
        (BreakerState::Open, TransitionReason::SlowCallRate)
    );
}

#[tokio::test(start_paused = true)]
async fn time_window_counts_the_calls_of_the_last_window_duration() {
    let s = CircuitBreakerSettings {
        sliding_window: SlidingWindow::Time,
        window_duration: Duration::from_secs(10),
        ..settings()
    };
    let breaker = CircuitBreaker::new("db-1", &s).unwrap();
    // Buckets are 500 ms wide. Three failures at t = 0.
    for _ in 0..3 {
        record(&breaker, Outcome::Failure);
    }
    // Bucket 0 leaves the window when bucket 20 begins, at t = 10 s.
    advance(9999 * MS).await;
    assert_eq!(breaker.snapshot().calls, 3);
    advance(MS).await;
    assert_eq!(breaker.snapshot().calls, 0);
    record(&breaker, Outcome::Failure);
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "the old failures expired"
    );
    for _ in 0..3 {
        record(&breaker, Outcome::Success);
    }
    assert_eq!(breaker.state(), BreakerState::Closed, "1 of 4 failed");
    record(&breaker, Outcome::Failure);
    record(&breaker, Outcome::Failure);
    assert_eq!(breaker.state(), BreakerState::Open, "3 of 6 failed");
}

#[tokio::test(start_paused = true)]
async fn open_rejects_until_the_open_duration_then_probes() {
    let breaker = CircuitBreaker::new("replica-2", &settings()).unwrap();
    let opened_at = Instant::now();
    trip(&breaker);
    let snapshot = breaker.snapshot();
    assert_eq!(snapshot.probe_at, Some(opened_at + 5000 * MS));

    advance(4999 * MS).await;
    let rejected = breaker.acquire().unwrap_err();
    assert_eq!(&*rejected.breaker, "replica-2");
    assert_eq!(rejected.state, BreakerState::Open);
    assert_eq!(rejected.probe_at, Some(opened_at + 5000 * MS));
    assert_eq!(rejected.probe_in(), Some(MS));
    assert_eq!(
        rejected.to_string(),
        "circuit breaker `replica-2` is open: next probe in 1ms"
    );
    match breaker.call(async { Ok::<_, std::io::Error>(()) }).await {
        Err(BreakerError::Rejected(r)) => assert_eq!(&*r.breaker, "replica-2"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(breaker.snapshot().rejected_calls, 2);

    assert!(!breaker.permits_calls());
    advance(MS).await;
    assert!(breaker.permits_calls(), "the open duration passed");
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "only a call moves it to half-open"
    );
    let probe = breaker.acquire().unwrap();
    assert!(probe.is_probe());
    assert!(breaker.permits_calls(), "one probe slot left");
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    let second = breaker.acquire().unwrap();
    assert!(!breaker.permits_calls(), "no probe slot left");
    let third = breaker.acquire().unwrap_err();
    assert_eq!(third.state, BreakerState::HalfOpen);
    assert_eq!(third.probe_at, None);
    assert!(
        third.to_string().contains("every probe slot is taken"),
        "{third}"
    );
    probe.success();
    assert_eq!(
        breaker.state(),
        BreakerState::HalfOpen,
        "one of two probes done"
    );
    second.success();
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(
        breaker.snapshot().calls,
        0,
        "a closed breaker starts a fresh window"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer_up_to_the_maximum() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    trip(&breaker);
    let mut expected = Vec::new();
    let mut seen = Vec::new();
    for open_ms in [5000, 10_000, 20_000, 30_000, 30_000] {
        let at = Instant::now();
        assert_eq!(breaker.snapshot().probe_at, Some(at + open_ms * MS));
        advance(open_ms * MS).await;
        let probe = breaker.acquire().unwrap();
        probe.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        expected.push(open_ms);
        seen.push(open_ms);
    }
    assert_eq!(breaker.snapshot().consecutive_trips, 6);
    // Closing resets the growth.
    advance(30_000 * MS).await;
    record(&breaker, Outcome::Success);
    record(&breaker, Outcome::Success);
    assert_eq!(breaker.state(), BreakerState::Closed);
    trip(&breaker);
    assert_eq!(
        breaker.snapshot().probe_at,
        Some(Instant::now() + 5000 * MS)
    );
    assert_eq!(expected, seen);
}

#[tokio::test(start_paused = true)]
async fn slow_probes_reopen() {
    let s = CircuitBreakerSettings {
        slow_call_rate_threshold: 0.5,
        ..settings()
    };
    let breaker = CircuitBreaker::new("db-1", &s).unwrap();
    trip(&breaker);
    advance(5000 * MS).await;
    let mut events = breaker.subscribe();
    breaker
        .acquire()
        .unwrap()
        .record_elapsed(Outcome::Success, 2000 * MS);
    breaker
        .acquire()
        .unwrap()
        .record_elapsed(Outcome::Success, 10 * MS);
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "1 of 2 probes slow reaches 0.5"
    );
    assert_eq!(
        events.recv().await.unwrap().reason,
        TransitionReason::OpenDurationElapsed
    );
    let t = events.recv().await.unwrap();
    assert_eq!(
        (t.from, t.to, t.reason),
        (
            BreakerState::HalfOpen,
            BreakerState::Open,
            TransitionReason::ProbesSlow
        )
    );
    assert_eq!(
        breaker.snapshot().probe_at,
        Some(Instant::now() + 10_000 * MS),
        "second trip: twice as long"
    );
}

#[tokio::test(start_paused = true)]
async fn dropped_and_ignored_probes_free_their_slot() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    trip(&breaker);
    advance(5000 * MS).await;
    let a = breaker.acquire().unwrap();
    let b = breaker.acquire_owned().unwrap();
    assert!(breaker.acquire().is_err());
    drop(a);
    let c = breaker.acquire().unwrap();
    assert!(breaker.acquire().is_err());
    b.ignore();
    let d = breaker.acquire().unwrap();
    assert!(breaker.acquire().is_err());
    c.success();
    d.success();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn permits_from_before_a_transition_are_not_recorded() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    let stale: Vec<_> = (0..5).map(|_| breaker.acquire_owned().unwrap()).collect();
    trip(&breaker);
    advance(5000 * MS).await;
    let probe = breaker.acquire().unwrap();
    // A call that started while closed fails now: not a probe, not counted.
    for permit in stale {
        permit.failure();
    }
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    probe.success();
    breaker.acquire().unwrap().success();
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn forced_states_and_reset() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    breaker.force_open();
    let r = breaker.acquire().unwrap_err();
    assert_eq!((r.state, r.probe_at), (BreakerState::ForcedOpen, None));
    assert_eq!(
        r.to_string(),
        "circuit breaker `db-1` is forced open: forced open until reset"
    );
    advance(Duration::from_secs(3600)).await;
    assert!(breaker.acquire().is_err(), "forced open does not time out");
    assert!(!breaker.probe_now(), "probe_now leaves forced open alone");

    breaker.force_closed();
    for _ in 0..50 {
        record(&breaker, Outcome::Failure);
    }
    assert_eq!(breaker.state(), BreakerState::ForcedClosed);
    assert_eq!(breaker.snapshot().calls, 0, "forced closed records nothing");

    breaker.reset();
    assert_eq!(breaker.state(), BreakerState::Closed);
    trip(&breaker);
    breaker.reset();
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(breaker.snapshot().consecutive_trips, 0);
}

#[tokio::test(start_paused = true)]
async fn probe_now_moves_an_open_breaker_to_half_open_early() {
    let breaker = CircuitBreaker::new("db-1", &settings()).unwrap();
    assert!(!breaker.probe_now(), "closed stays closed");
    trip(&breaker);
    advance(MS).await;
    assert!(breaker.probe_now());
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    record(&breaker, Outcome::Success);
    record(&breaker, Outcome::Success);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn transitions_are_published_to_subscribers_tracing_and_the_gauge() {
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let logs = Logs::global();

    let breaker = CircuitBreaker::new("published-node", &settings()).unwrap();
    let mut events = breaker.subscribe();
    let mut watch = breaker.watch();
    assert_eq!(*watch.borrow_and_update(), BreakerState::Closed);

    let start = Instant::now();
    trip(&breaker);
    assert!(watch.has_changed().unwrap());
    assert_eq!(*watch.borrow_and_update(), BreakerState::Open);
    advance(5000 * MS).await;
    record(&breaker, Outcome::Success);
    record(&breaker, Outcome::Success);
    breaker.force_open();
    breaker.reset();

    let mut seen = Vec::new();
    while let Ok(t) = events.try_recv() {
        assert_eq!(&*t.breaker, "published-node");
        seen.push((
            t.from,
            t.to,
            t.reason,
            t.at.duration_since(start).as_millis(),
        ));
    }
    use BreakerState::*;
    assert_eq!(
        seen,
        [
            (Closed, Open, TransitionReason::FailureRate, 0),
            (Open, HalfOpen, TransitionReason::OpenDurationElapsed, 5000),
            (HalfOpen, Closed, TransitionReason::ProbesSucceeded, 5000),
            (Closed, ForcedOpen, TransitionReason::ForcedOpen, 5000),
            (ForcedOpen, Closed, TransitionReason::Reset, 5000),
        ]
    );
    assert_eq!(*watch.borrow(), Closed);

    let gauge: Vec<_> = recorder
        .updates_of(STATE_METRIC)
        .into_iter()
        .inspect(|u| assert_eq!(u.labels, [("node".to_owned(), "published-node".to_owned())]))
        .map(|u| u.value)
        .collect();
    assert_eq!(gauge, [0.0, 2.0, 1.0, 0.0, 2.0, 0.0]);

    let text = logs.text();
    let lines: Vec<_> = text
        .lines()
        .filter(|l| l.contains("published-node"))
        .collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].contains("WARN") && lines[0].contains("circuit breaker opened"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("probe_in_ms=5000"), "{}", lines[0]);
    assert!(lines[2].contains("to=closed"), "{}", lines[2]);
}

#[test]
fn bad_settings_name_every_problem() {
    let bad = CircuitBreakerSettings {
        failure_rate_threshold: 0.0,
        slow_call_detection: true,
        slow_call_rate_threshold: 1.5,
        slow_call_duration: Duration::ZERO,
        minimum_calls: 0,
        sliding_window: SlidingWindow::Count,
        window_size: 0,
        window_duration: Duration::ZERO,
        open_duration: Duration::ZERO,
        open_duration_multiplier: f64::INFINITY,
        max_open_duration: Duration::ZERO,
        half_open_probes: 0,
    };
    let err = CircuitBreaker::new("db", &bad).unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "circuit_breaker.failure_rate_threshold",
            "circuit_breaker.slow_call_rate_threshold",
            "circuit_breaker.slow_call_duration",
            "circuit_breaker.minimum_calls",
            "circuit_breaker.window_size",
            "circuit_breaker.open_duration",
            "circuit_breaker.open_duration_multiplier",
            "circuit_breaker.half_open_probes",
        ]
    );
    assert!(
        err.to_string()
            .contains("`circuit_breaker.failure_rate_threshold` = 0.0: must be within (0, 1]"),
        "{err}"
    );
    let time = CircuitBreakerSettings {
        sliding_window: SlidingWindow::Time,
        window_duration: Duration::ZERO,
        ..settings()
    };
    let err = CircuitBreaker::new("db", &time).unwrap_err();
    assert_eq!(err.problems[0].key, "circuit_breaker.window_duration");
    let short = CircuitBreakerSettings {
        max_open_duration: 1000 * MS,
        ..settings()
    };
    assert_eq!(
        CircuitBreaker::new("db", &short).unwrap_err().problems[0].key,
        "circuit_breaker.max_open_duration"
    );
    assert!(CircuitBreaker::new("db", &CircuitBreakerSettings::default()).is_ok());
}
