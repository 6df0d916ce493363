//! Composition: retry ( breaker ( timeout ( operation ) ) ), on the paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::time::Duration;

use pgstack_config::{CircuitBreakerSettings, Jitter, RetrySettings};
use pgstack_resilience::{
    AttemptError, BreakerState, CircuitBreaker, Classify, ErrorClass, GiveUpReason, Idempotent,
    Outcome, Pipeline, RetryPolicy, timeout,
};
use tokio::time::{Instant, sleep};

const MS: Duration = Duration::from_millis(1);

#[derive(Debug, PartialEq)]
enum DbError {
    Refused,
    UniqueViolation,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

struct Db;

impl Classify<DbError> for Db {
    fn classify(&self, e: &DbError) -> ErrorClass {
        match e {
            DbError::Refused => ErrorClass::Transient,
            DbError::UniqueViolation => ErrorClass::Permanent,
        }
    }

    fn breaker_outcome(&self, e: &DbError) -> Outcome {
        match e {
            DbError::Refused => Outcome::Failure,
            DbError::UniqueViolation => Outcome::Success,
        }
    }
}

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy::from_settings(&RetrySettings {
        max_attempts,
        jitter: Jitter::None,
        ..Default::default()
    })
    .unwrap()
}

fn breaker(minimum_calls: u32) -> CircuitBreaker {
    let s = CircuitBreakerSettings {
        minimum_calls,
        window_size: 10,
        failure_rate_threshold: 0.5,
        open_duration: Duration::from_secs(30),
        max_open_duration: Duration::from_secs(60),
        half_open_probes: 1,
        ..Default::default()
    };
    CircuitBreaker::new("primary", &s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_stops_the_retry_loop_at_once() {
    let b = breaker(1);
    b.force_open();
    let pipeline = Pipeline::new().retry(retry(5)).breaker(b);
    let calls = Cell::new(0);
    let start = Instant::now();
    let err = pipeline
        .run("insert-bill", &Db, |_| {
            calls.set(calls.get() + 1);
            async { Ok::<_, DbError>(()) }
        })
        .await
        .unwrap_err();
    assert_eq!((err.attempts, err.reason), (1, GiveUpReason::Permanent));
    assert!(matches!(&err.error, AttemptError::Rejected(r) if &*r.breaker == "primary"));
    assert_eq!(calls.get(), 0, "the operation never ran");
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_breaker_that_opens_mid_loop_ends_it() {
    let b = breaker(2);
    let pipeline = Pipeline::new().retry(retry(5)).breaker(b.clone());
    let calls = Cell::new(0);
    let start = Instant::now();
    let err = pipeline
        .run("fetch", &Db, |_| {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(DbError::Refused) }
        })
        .await
        .unwrap_err();
    // Attempts 1 and 2 fail and open the breaker; attempt 3 is rejected.
    assert_eq!(calls.get(), 2);
    assert_eq!((err.attempts, err.reason), (3, GiveUpReason::Permanent));
    let AttemptError::Rejected(rejected) = &err.error else {
        panic!("expected a rejection, got {:?}", err.error)
    };
    assert_eq!(rejected.probe_at, Some(start + 100 * MS + 30_000 * MS));
    assert_eq!(start.elapsed(), 300 * MS, "delays of 100 and 200 ms");
    assert!(err.to_string().starts_with(
        "failed after 3 attempt(s) (permanent error): circuit breaker `primary` is open"
    ));
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_attempt_is_a_breaker_failure_and_not_repeated_by_default() {
    let b = breaker(1);
    let pipeline = Pipeline::new()
        .retry(retry(3))
        .breaker(b.clone())
        .timeout(1000 * MS);
    let start = Instant::now();
    let err = pipeline
        .run("update-bill", &Db, |_| async {
            sleep(Duration::from_secs(10)).await;
            Ok::<_, DbError>(())
        })
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), 1000 * MS);
    assert!(matches!(err.error, AttemptError::Timeout(e) if e.after == 1000 * MS));
    assert_eq!((err.attempts, err.reason), (1, GiveUpReason::NotRepeatable));
    assert_eq!(
        b.state(),
        BreakerState::Open,
        "the timeout counted as a failure"
    );
}

#[tokio::test(start_paused = true)]
async fn idempotent_work_retries_timeouts() {
    let pipeline = Pipeline::new().retry(retry(3)).timeout(1000 * MS);
    let start = Instant::now();
    let value = pipeline
        .run("read", &Idempotent(Db), |attempt| async move {
            if attempt < 3 {
                sleep(Duration::from_secs(10)).await;
            }
            Ok::<_, DbError>(attempt)
        })
        .await
        .unwrap();
    assert_eq!(value, 3);
    // 1000 (timeout) + 100 + 1000 (timeout) + 200.
    assert_eq!(start.elapsed(), 2300 * MS);
}

#[tokio::test(start_paused = true)]
async fn errors_that_prove_the_node_healthy_do_not_open_the_breaker() {
    let b = breaker(1);
    let pipeline = Pipeline::new().retry(retry(3)).breaker(b.clone());
    for _ in 0..20 {
        let err = pipeline
            .run("insert", &Db, |_| async {
                Err::<(), _>(DbError::UniqueViolation)
            })
            .await
            .unwrap_err();
        assert_eq!((err.attempts, err.reason), (1, GiveUpReason::Permanent));
        assert_eq!(err.error.into_inner(), Some(DbError::UniqueViolation));
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.snapshot().calls, 10);
    assert_eq!(b.snapshot().failed_calls, 0);
}

#[tokio::test(start_paused = true)]
async fn the_timeout_fires_exactly_at_its_limit() {
    let err = timeout(250 * MS, sleep(251 * MS)).await.unwrap_err();
    assert_eq!(err.after, 250 * MS);
    let start = Instant::now();
    // Work that completes exactly at the limit wins: the inner future is polled first.
    timeout(250 * MS, sleep(250 * MS)).await.unwrap();
    assert_eq!(start.elapsed(), 250 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_probe_frees_its_slot() {
    let b = breaker(1);
    b.acquire().unwrap().failure();
    assert!(b.probe_now());
    {
        let pending = b.call(sleep(Duration::from_secs(60)).then_ok());
        tokio::pin!(pending);
        // Poll once: the probe slot is taken, then the caller gives up.
        assert!(futures_poll_once(pending.as_mut()).await.is_none());
        assert!(b.acquire().is_err(), "the only probe slot is taken");
    }
    let probe = b.acquire().unwrap();
    assert!(probe.is_probe());
    probe.success();
    assert_eq!(b.state(), BreakerState::Closed);
}

trait ThenOk: std::future::Future<Output = ()> + Sized {
    fn then_ok(self) -> impl std::future::Future<Output = Result<(), DbError>> {
        async {
            self.await;
            Ok(())
        }
    }
}
impl<F: std::future::Future<Output = ()>> ThenOk for F {}

/// Polls a future once; `None` if it is pending.
async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
