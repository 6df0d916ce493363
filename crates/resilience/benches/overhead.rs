//! What the breaker, the retry loop and the timeout add to a call.
//!
//! The wrapped futures are ready at once and polled with a no-op waker, so
//! the figures are the wrappers' own cost, free of any runtime scheduling.
//! Compare each line with its `direct` baseline.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use pgstack_config::{CircuitBreakerSettings, RetrySettings, SlidingWindow};
use pgstack_resilience::{
    BreakerPolicy, CircuitBreaker, ErrorClass, Outcome, Pipeline, RetryPolicy, timeout,
};

/// Polls a future that must be ready on its first poll.
fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the benchmarked future was not ready"),
    }
}

async fn work() -> Result<u64, std::io::Error> {
    Ok(black_box(42))
}

fn transient(_: &std::io::Error) -> ErrorClass {
    ErrorClass::Transient
}

fn breaker(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker");
    g.bench_function("direct", |b| b.iter(|| ready(work()).unwrap()));

    let closed = CircuitBreaker::new("bench", &CircuitBreakerSettings::default()).unwrap();
    g.bench_function("closed_call", |b| {
        b.iter(|| ready(closed.call(work())).unwrap())
    });
    g.bench_function("closed_permit", |b| {
        b.iter(|| closed.acquire().unwrap().success())
    });

    let fast = CircuitBreaker::with_policy(
        "bench",
        BreakerPolicy::from_settings(&CircuitBreakerSettings::default())
            .unwrap()
            .slow_call_detection(false),
    );
    // The connection layer's shape: it timed the call already.
    g.bench_function("closed_permit_elapsed", |b| {
        b.iter(|| {
            closed
                .acquire_untimed()
                .unwrap()
                .record_elapsed(Outcome::Success, black_box(Duration::from_micros(60)))
        })
    });
    g.bench_function("closed_call_no_slow_detection", |b| {
        b.iter(|| ready(fast.call(work())).unwrap())
    });
    g.bench_function("closed_permit_no_slow_detection", |b| {
        b.iter(|| fast.acquire().unwrap().success())
    });
    let time = CircuitBreaker::new(
        "bench",
        &CircuitBreakerSettings {
            sliding_window: SlidingWindow::Time,
            ..Default::default()
        },
    )
    .unwrap();
    g.bench_function("closed_call_time_window", |b| {
        b.iter(|| ready(time.call(work())).unwrap())
    });

    let open = CircuitBreaker::new(
        "bench",
        &CircuitBreakerSettings {
            minimum_calls: 1,
            open_duration: Duration::from_secs(3600),
            max_open_duration: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .unwrap();
    open.acquire().unwrap().failure();
    assert!(open.acquire().is_err());
    g.bench_function("open_rejection", |b| {
        b.iter(|| black_box(open.acquire()).unwrap_err())
    });
    g.bench_function("open_call", |b| {
        b.iter(|| ready(open.call(work())).unwrap_err())
    });
    g.finish();
}

fn retry(c: &mut Criterion) {
    let mut g = c.benchmark_group("retry");
    g.bench_function("direct", |b| b.iter(|| ready(work()).unwrap()));
    let policy = RetryPolicy::from_settings(&RetrySettings::default()).unwrap();
    g.bench_function("first_try_success", |b| {
        b.iter(|| ready(policy.run("bench", &transient, |_| work())).unwrap())
    });
    let bare = policy.clone().without_budget().with_deadline(None);
    g.bench_function("first_try_success_no_budget_no_deadline", |b| {
        b.iter(|| ready(bare.run("bench", &transient, |_| work())).unwrap())
    });
    let pipeline = Pipeline::new()
        .retry(policy.clone())
        .breaker(CircuitBreaker::new("bench", &CircuitBreakerSettings::default()).unwrap());
    g.bench_function("pipeline_retry_breaker", |b| {
        b.iter(|| ready(pipeline.run("bench", &transient, |_| work())).unwrap())
    });
    g.finish();
}

fn timeouts(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = rt.enter();
    let mut g = c.benchmark_group("timeout");
    g.bench_function("direct", |b| b.iter(|| ready(work()).unwrap()));
    g.bench_function("ready_future", |b| {
        b.iter(|| {
            ready(timeout(Duration::from_secs(1), work()))
                .unwrap()
                .unwrap()
        })
    });
    g.bench_function("tokio_timeout", |b| {
        b.iter(|| {
            ready(tokio::time::timeout(Duration::from_secs(1), work()))
                .unwrap()
                .unwrap()
        })
    });
    g.finish();
}

/// What the building blocks cost on this machine, for reading the figures above.
fn calibration(c: &mut Criterion) {
    let mut g = c.benchmark_group("calibration");
    g.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    g.bench_function("std_instant_now", |b| b.iter(std::time::Instant::now));
    let mutex = std::sync::Mutex::new(0u64);
    g.bench_function("std_mutex_lock_unlock", |b| {
        b.iter(|| *mutex.lock().unwrap() += 1)
    });
    // Two threads depositing into one budget at once, as every call of a
    // service's tasks does: the time per deposit.
    let budget = std::sync::Arc::new(pgstack_resilience::RetryBudget::new(
        Duration::from_secs(10),
        10,
        0.2,
    ));
    g.bench_function("budget_deposit_two_threads", |b| {
        b.iter_custom(|iters| {
            let started = std::time::Instant::now();
            std::thread::scope(|scope| {
                for _ in 0..2 {
                    let budget = &budget;
                    scope.spawn(move || {
                        for _ in 0..iters {
                            budget.deposit();
                        }
                    });
                }
            });
            started.elapsed()
        })
    });
    g.finish();
}

/// Per-iteration time of the fastest batch of `BATCH` iterations, scaled to
/// `iters`: a preempted batch is slower, never faster, so the minimum filters
/// out the other processes of a busy machine. Reported beside the ordinary
/// (mean-based) figures, never instead of them.
fn min_of_batches<O>(iters: u64, mut f: impl FnMut() -> O) -> Duration {
    const BATCH: u64 = 256;
    let batches = iters.div_ceil(BATCH).max(8);
    let mut best = Duration::MAX;
    for _ in 0..batches {
        let start = std::time::Instant::now();
        for _ in 0..BATCH {
            black_box(f());
        }
        best = best.min(start.elapsed());
    }
    best.mul_f64(iters as f64 / BATCH as f64)
}

fn min_batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("min_of_batches");
    g.bench_function("direct", |b| {
        b.iter_custom(|n| min_of_batches(n, || ready(work()).unwrap()))
    });
    let closed = CircuitBreaker::new("bench", &CircuitBreakerSettings::default()).unwrap();
    g.bench_function("breaker_closed_call", |b| {
        b.iter_custom(|n| min_of_batches(n, || ready(closed.call(work())).unwrap()))
    });
    let fast = CircuitBreaker::with_policy(
        "bench",
        BreakerPolicy::from_settings(&CircuitBreakerSettings::default())
            .unwrap()
            .slow_call_detection(false),
    );
    g.bench_function("breaker_closed_permit_elapsed", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                closed
                    .acquire_untimed()
                    .unwrap()
                    .record_elapsed(Outcome::Success, black_box(Duration::from_micros(60)))
            })
        })
    });
    g.bench_function("breaker_closed_call_no_slow_detection", |b| {
        b.iter_custom(|n| min_of_batches(n, || ready(fast.call(work())).unwrap()))
    });
    g.bench_function("breaker_closed_permit_no_slow_detection", |b| {
        b.iter_custom(|n| min_of_batches(n, || fast.acquire().unwrap().success()))
    });
    let open = CircuitBreaker::new(
        "bench",
        &CircuitBreakerSettings {
            minimum_calls: 1,
            open_duration: Duration::from_secs(3600),
            max_open_duration: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .unwrap();
    open.acquire().unwrap().failure();
    g.bench_function("breaker_open_rejection", |b| {
        b.iter_custom(|n| min_of_batches(n, || black_box(open.acquire()).unwrap_err()))
    });
    let policy = RetryPolicy::from_settings(&RetrySettings::default()).unwrap();
    g.bench_function("retry_first_try_success", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                ready(policy.run("bench", &transient, |_| work())).unwrap()
            })
        })
    });
    let bare = policy.clone().without_budget().with_deadline(None);
    g.bench_function("retry_first_try_success_no_budget_no_deadline", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                ready(bare.run("bench", &transient, |_| work())).unwrap()
            })
        })
    });
    let time = CircuitBreaker::new(
        "bench",
        &CircuitBreakerSettings {
            sliding_window: SlidingWindow::Time,
            ..Default::default()
        },
    )
    .unwrap();
    g.bench_function("breaker_closed_call_time_window", |b| {
        b.iter_custom(|n| min_of_batches(n, || ready(time.call(work())).unwrap()))
    });
    g.bench_function("breaker_open_call", |b| {
        b.iter_custom(|n| min_of_batches(n, || ready(open.call(work())).unwrap_err()))
    });
    let pipeline = Pipeline::new()
        .retry(policy.clone())
        .breaker(CircuitBreaker::new("bench", &CircuitBreakerSettings::default()).unwrap());
    g.bench_function("pipeline_retry_breaker", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                ready(pipeline.run("bench", &transient, |_| work())).unwrap()
            })
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let entered = rt.enter();
    g.bench_function("timeout_ready_future", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                ready(timeout(Duration::from_secs(1), work()))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    g.bench_function("tokio_timeout_ready_future", |b| {
        b.iter_custom(|n| {
            min_of_batches(n, || {
                ready(tokio::time::timeout(Duration::from_secs(1), work()))
                    .unwrap()
                    .unwrap()
            })
        })
    });
    drop(entered);
    g.bench_function("tokio_instant_now", |b| {
        b.iter_custom(|n| min_of_batches(n, tokio::time::Instant::now))
    });
    let mutex = std::sync::Mutex::new(0u64);
    g.bench_function("std_mutex_lock_unlock", |b| {
        b.iter_custom(|n| min_of_batches(n, || *mutex.lock().unwrap() += 1))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // No plots: the min-of-batches samples can be identical, which the
    // plotting backend cannot draw.
    config = Criterion::default().without_plots();
    targets = breaker, retry, timeouts, calibration, min_batches
}
criterion_main!(benches);
