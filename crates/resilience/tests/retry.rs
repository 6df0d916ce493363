//! The retry loop on tokio's paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Logs, TestRecorder};
use pgstack_config::{Jitter, RetrySettings};
use pgstack_resilience::{
    Classify, ErrorClass, GiveUpReason, Idempotent, RETRIES_METRIC, RetryBudget, RetryPolicy,
};
use tokio::time::Instant;

const MS: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, PartialEq)]
enum TestError {
    Refused(u32),
    MaybeSent,
    BadInput,
}

impl std::fmt::Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestError::Refused(n) => write!(f, "connection refused (attempt {n})"),
            TestError::MaybeSent => f.write_str("connection lost after send"),
            TestError::BadInput => f.write_str("bad input"),
        }
    }
}

fn classify(e: &TestError) -> ErrorClass {
    match e {
        TestError::Refused(_) => ErrorClass::Transient,
        TestError::MaybeSent => ErrorClass::TransientNotRepeatable,
        TestError::BadInput => ErrorClass::Permanent,
    }
}

fn settings(max_attempts: u32) -> RetrySettings {
    RetrySettings {
        max_attempts,
        initial_backoff: 100 * MS,
        max_backoff: 5000 * MS,
        multiplier: 2.0,
        jitter: Jitter::None,
        deadline: None,
        budget_ratio: 0.2,
        budget_min_per_second: 100,
        budget_window: Duration::from_secs(10),
    }
}

/// Runs an always-failing operation; returns the offsets (ms) at which attempts started.
async fn attempt_times(
    policy: &RetryPolicy,
) -> (Vec<u128>, pgstack_resilience::RetryError<TestError>) {
    let start = Instant::now();
    let mut times = Vec::new();
    let err = policy
        .run("test-op", &classify, |attempt| {
            times.push(start.elapsed().as_millis());
            async move { Err::<(), _>(TestError::Refused(attempt)) }
        })
        .await
        .unwrap_err();
    (times, err)
}

#[tokio::test(start_paused = true)]
async fn backoff_is_exponential_and_capped_to_the_millisecond() {
    let mut s = settings(8);
    s.max_backoff = 2000 * MS;
    let policy = RetryPolicy::from_settings(&s).unwrap();
    let (times, err) = attempt_times(&policy).await;
    // Delays 100, 200, 400, 800, 1600, 2000, 2000.
    assert_eq!(times, [0, 100, 300, 700, 1500, 3100, 5100, 7100]);
    assert_eq!(err.attempts, 8);
    assert_eq!(err.reason, GiveUpReason::AttemptsExhausted);
    assert_eq!(
        err.error,
        TestError::Refused(8),
        "the last error is returned"
    );
    assert_eq!(
        err.to_string(),
        "failed after 8 attempt(s) (attempts exhausted): connection refused (attempt 8)"
    );
}

#[tokio::test(start_paused = true)]
async fn defaults_are_100ms_initial_and_5s_max() {
    let d = RetrySettings::default();
    assert_eq!((d.initial_backoff, d.max_backoff), (100 * MS, 5000 * MS));
    let policy = RetryPolicy::from_settings(&RetrySettings {
        jitter: Jitter::None,
        ..d
    })
    .unwrap();
    let (times, _) = attempt_times(&policy).await;
    assert_eq!(times, [0, 100, 300]);
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_within_bounds() {
    /// The delays between attempts, exact (tokio rounds a sleep up to the
    /// next millisecond, never down).
    async fn delays(policy: &RetryPolicy) -> Vec<Duration> {
        let mut starts = Vec::new();
        let _ = policy
            .run("op", &classify, |attempt| {
                starts.push(Instant::now());
                async move { Err::<(), _>(TestError::Refused(attempt)) }
            })
            .await;
        starts.windows(2).map(|w| w[1] - w[0]).collect()
    }

    for (jitter, low_fraction) in [(Jitter::Full, 0), (Jitter::Equal, 2)] {
        let policy = RetryPolicy::from_settings(&RetrySettings {
            jitter,
            ..settings(5)
        })
        .unwrap();
        for _ in 0..20 {
            for (i, delay) in delays(&policy).await.into_iter().enumerate() {
                let base = 100 * MS * 2u32.pow(i as u32);
                let low = if low_fraction == 0 {
                    Duration::ZERO
                } else {
                    base / low_fraction
                };
                assert!(
                    delay >= low && delay <= base,
                    "{jitter:?}: delay {delay:?} before attempt {} outside [{low:?}, {base:?}]",
                    i + 2,
                );
            }
        }
    }
    let policy = RetryPolicy::from_settings(&RetrySettings {
        jitter: Jitter::Decorrelated,
        ..settings(6)
    })
    .unwrap();
    for _ in 0..20 {
        let mut previous = 100 * MS;
        for delay in delays(&policy).await {
            // The upper bound uses the slept delay, which is at most 1 ms above the drawn one.
            assert!(
                delay >= 100 * MS && delay <= (3 * previous).min(5000 * MS) + MS,
                "decorrelated {delay:?} after {previous:?}"
            );
            previous = delay;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_and_not_repeatable_errors_stop_at_once() {
    let policy = RetryPolicy::from_settings(&settings(5)).unwrap();
    let calls = AtomicU32::new(0);
    let err = policy
        .run("op", &classify, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            async { Err::<(), _>(TestError::BadInput) }
        })
        .await
        .unwrap_err();
    assert_eq!((err.attempts, err.reason), (1, GiveUpReason::Permanent));

    let start = Instant::now();
    let err = policy
        .run("op", &classify, |attempt| async move {
            if attempt == 1 {
                Err(TestError::Refused(1))
            } else {
                Err::<(), _>(TestError::MaybeSent)
            }
        })
        .await
        .unwrap_err();
    assert_eq!((err.attempts, err.reason), (2, GiveUpReason::NotRepeatable));
    assert_eq!(err.error, TestError::MaybeSent);
    assert_eq!(
        start.elapsed(),
        100 * MS,
        "no delay after a non-repeatable error"
    );
}

#[tokio::test(start_paused = true)]
async fn idempotent_work_retries_errors_that_are_not_safe_to_repeat() {
    let policy = RetryPolicy::from_settings(&settings(3)).unwrap();
    let idempotent = Idempotent(classify);
    assert_eq!(
        idempotent.classify(&TestError::BadInput),
        ErrorClass::Permanent
    );
    let value = policy
        .run("op", &idempotent, |attempt| async move {
            if attempt < 3 {
                Err(TestError::MaybeSent)
            } else {
                Ok(attempt)
            }
        })
        .await
        .unwrap();
    assert_eq!(value, 3);
}

#[tokio::test(start_paused = true)]
async fn no_attempt_starts_after_the_deadline() {
    let s = RetrySettings {
        multiplier: 1.0,
        initial_backoff: 1000 * MS,
        deadline: Some(2500 * MS),
        ..settings(10)
    };
    let policy = RetryPolicy::from_settings(&s).unwrap();
    let (times, err) = attempt_times(&policy).await;
    assert_eq!(
        times,
        [0, 1000, 2000],
        "an attempt at 3000 ms would start after 2500 ms"
    );
    assert_eq!(
        (err.attempts, err.reason),
        (3, GiveUpReason::DeadlineReached)
    );

    // An attempt may start exactly at the deadline.
    let s = RetrySettings {
        deadline: Some(2000 * MS),
        ..s
    };
    let (times, _) = attempt_times(&RetryPolicy::from_settings(&s).unwrap()).await;
    assert_eq!(times, [0, 1000, 2000]);

    // The deadline counts from the start of the first attempt, slow attempts included.
    let policy = RetryPolicy::from_settings(&RetrySettings {
        deadline: Some(2500 * MS),
        ..s
    })
    .unwrap();
    let start = Instant::now();
    let err = policy
        .run("op", &classify, |attempt| async move {
            tokio::time::sleep(700 * MS).await;
            Err::<(), _>(TestError::Refused(attempt))
        })
        .await
        .unwrap_err();
    // Attempt 1: 0..700, attempt 2: 1700..2400, attempt 3 would start at 3400.
    assert_eq!(
        (err.attempts, err.reason),
        (2, GiveUpReason::DeadlineReached)
    );
    assert_eq!(start.elapsed(), 2400 * MS);
}

#[tokio::test(start_paused = true)]
async fn a_shared_budget_caps_retries_during_an_outage() {
    // Nothing in reserve; each first attempt earns 0.2 retries.
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.2));
    let policy = RetryPolicy::from_settings(&settings(3))
        .unwrap()
        .with_budget(budget.clone());
    let other = RetryPolicy::from_settings(&settings(3))
        .unwrap()
        .with_budget(budget.clone());

    let attempts = Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let policy = if i % 2 == 0 {
            policy.clone()
        } else {
            other.clone()
        };
        let attempts = attempts.clone();
        tasks.push(tokio::spawn(async move {
            policy
                .run("op", &classify, |attempt| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    async move { Err::<(), _>(TestError::Refused(attempt)) }
                })
                .await
                .unwrap_err()
        }));
    }
    let mut exhausted = 0;
    for task in tasks {
        if task.await.unwrap().reason == GiveUpReason::BudgetExhausted {
            exhausted += 1;
        }
    }
    // Without a budget: 300 attempts. With it: 100 first attempts + 20 retries.
    assert_eq!(attempts.load(Ordering::Relaxed), 120);
    assert!(exhausted >= 80, "{exhausted} calls stopped by the budget");
    assert_eq!(budget.available(), 0);

    // The reserve lets a quiet service retry.
    let quiet = RetryPolicy::from_settings(&RetrySettings {
        budget_ratio: 0.0,
        budget_min_per_second: 1,
        budget_window: Duration::from_secs(2),
        ..settings(10)
    })
    .unwrap();
    let (times, err) = attempt_times(&quiet).await;
    assert_eq!(times.len(), 3, "1 first attempt + 2 s × 1/s reserve");
    assert_eq!(err.reason, GiveUpReason::BudgetExhausted);
}

#[tokio::test(start_paused = true)]
async fn each_retry_is_logged_and_counted_with_the_op_label() {
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let logs = Logs::global();

    let policy = RetryPolicy::from_settings(&settings(3)).unwrap();
    let _ = policy
        .run("logged-op", &classify, |attempt| async move {
            Err::<(), _>(TestError::Refused(attempt))
        })
        .await;

    let retries = recorder.updates_of(RETRIES_METRIC);
    assert_eq!(retries.len(), 2);
    for r in &retries {
        assert_eq!(r.labels, [("op".to_owned(), "logged-op".to_owned())]);
        assert_eq!(r.value, 1.0);
    }
    let text: String = logs
        .text()
        .lines()
        .filter(|l| l.contains("op=\"logged-op\""))
        .map(|l| format!("{l}\n"))
        .collect();
    let retry_lines: Vec<_> = text.lines().filter(|l| l.contains("retrying")).collect();
    assert_eq!(retry_lines.len(), 2, "{text}");
    assert!(
        retry_lines[0].contains("attempt=1") && retry_lines[0].contains("delay_ms=100"),
        "{text}"
    );
    assert!(
        retry_lines[0].contains("connection refused (attempt 1)"),
        "{text}"
    );
    assert!(
        retry_lines[1].contains("attempt=2") && retry_lines[1].contains("delay_ms=200"),
        "{text}"
    );
    assert!(text.contains("giving up"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_whole_transaction_is_retried() {
    // The closure runs the whole unit of work each attempt.
    let policy = RetryPolicy::from_settings(&settings(3)).unwrap();
    let log = std::sync::Mutex::new(Vec::new());
    let committed = policy
        .run("transfer", &classify, |attempt| {
            let log = &log;
            async move {
                log.lock().unwrap().push(format!("BEGIN {attempt}"));
                if attempt == 1 {
                    log.lock().unwrap().push("ROLLBACK".to_owned());
                    return Err(TestError::Refused(attempt));
                }
                log.lock().unwrap().push("COMMIT".to_owned());
                Ok(attempt)
            }
        })
        .await
        .unwrap();
    assert_eq!(committed, 2);
    assert_eq!(
        *log.lock().unwrap(),
        ["BEGIN 1", "ROLLBACK", "BEGIN 2", "COMMIT"]
    );
}

#[test]
fn bad_settings_name_every_problem() {
    let bad = RetrySettings {
        max_attempts: 0,
        initial_backoff: 10 * MS,
        max_backoff: 5 * MS,
        multiplier: 0.5,
        jitter: Jitter::Full,
        deadline: Some(Duration::ZERO),
        budget_ratio: 1.5,
        budget_min_per_second: 1,
        budget_window: Duration::ZERO,
    };
    let err = RetryPolicy::from_settings(&bad).unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "retry.max_attempts",
            "retry.initial_backoff",
            "retry.multiplier",
            "retry.deadline",
            "retry.budget_ratio",
            "retry.budget_window"
        ]
    );
    let text = err.to_string();
    assert!(
        text.contains("`retry.multiplier` = 0.5: must be a finite number of at least 1.0"),
        "{text}"
    );
    assert!(RetryPolicy::from_settings(&RetrySettings::default()).is_ok());
}

/// `Refused` errors say the other side is not up yet and saw nothing.
struct WaitsWhenRefused;

impl Classify<TestError> for WaitsWhenRefused {
    fn classify(&self, error: &TestError) -> ErrorClass {
        classify(error)
    }

    fn unavailable_wait(&self, error: &TestError) -> Option<Duration> {
        matches!(error, TestError::Refused(_)).then_some(20 * MS)
    }
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_dependency_is_waited_for_until_the_deadline_spending_nothing() {
    // Two attempts, and a budget with nothing in it: ordinary retries would
    // stop after one retry at most.
    let budget = Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.0));
    let policy = RetryPolicy::from_settings(&RetrySettings {
        deadline: Some(1000 * MS),
        ..settings(2)
    })
    .unwrap()
    .with_budget(budget.clone());

    // Back after 500 ms: the call waits in 20 ms steps and succeeds.
    let start = Instant::now();
    let value = policy
        .run("op", &WaitsWhenRefused, |attempt| async move {
            if start.elapsed() < 500 * MS {
                Err(TestError::Refused(attempt))
            } else {
                Ok(attempt)
            }
        })
        .await
        .unwrap();
    assert_eq!(value, 26, "attempts at 0, 20, ..., 500 ms");
    assert_eq!(start.elapsed(), 500 * MS);

    // Never back: the deadline ends the wait, not the attempts or the budget.
    let start = Instant::now();
    let err = policy
        .run("op", &WaitsWhenRefused, |attempt| async move {
            Err::<(), _>(TestError::Refused(attempt))
        })
        .await
        .unwrap_err();
    assert_eq!(err.reason, GiveUpReason::DeadlineReached);
    assert_eq!(err.attempts, 51, "attempts at 0, 20, ..., 1000 ms");
    assert_eq!(start.elapsed(), 1000 * MS);

    // Other transient errors still spend attempts (and here the budget).
    let err = policy
        .run("op", &WaitsWhenRefused, |_| async {
            Err::<(), _>(TestError::MaybeSent)
        })
        .await
        .unwrap_err();
    assert_eq!(err.reason, GiveUpReason::NotRepeatable);

    // Without a deadline, waiting could last for ever: ordinary retries.
    let policy = RetryPolicy::from_settings(&settings(3)).unwrap();
    let err = policy
        .run("op", &WaitsWhenRefused, |attempt| async move {
            Err::<(), _>(TestError::Refused(attempt))
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.attempts, err.reason),
        (3, GiveUpReason::AttemptsExhausted)
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_can_bring_its_own_deadline() {
    let policy = RetryPolicy::from_settings(&RetrySettings {
        multiplier: 1.0,
        initial_backoff: 1000 * MS,
        deadline: Some(10_000 * MS),
        ..settings(100)
    })
    .unwrap();
    let times = |deadline| {
        let policy = policy.clone();
        async move {
            let start = Instant::now();
            let mut times = Vec::new();
            let err = policy
                .run_within(deadline, "op", &classify, |attempt| {
                    times.push(start.elapsed().as_millis());
                    async move { Err::<(), _>(TestError::Refused(attempt)) }
                })
                .await
                .unwrap_err();
            (times, err.reason)
        }
    };
    let (short, reason) = times(Some(2500 * MS)).await;
    assert_eq!(short, [0, 1000, 2000]);
    assert_eq!(reason, GiveUpReason::DeadlineReached);
    // The policy's own deadline does not apply to a call that brings one.
    let (long, _) = times(Some(20_000 * MS)).await;
    assert_eq!(long.len(), 21, "attempts at 0, 1, ..., 20 s");
    let (none, reason) = times(None).await;
    assert_eq!(none.len(), 100, "no deadline: the attempts bound the call");
    assert_eq!(reason, GiveUpReason::AttemptsExhausted);
}
