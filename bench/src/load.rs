//! Drives concurrent tasks, each calling one library in a loop, and records
//! what happened: operations, errors, latencies and when each call ended.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Barrier;
use tokio::task::JoinHandle;

use crate::phases::{self, CallPhases, Threads, Timed};

/// One task's view of a library: one call (a checkout, a statement).
pub(crate) trait Worker: Send + 'static {
    /// Makes one call; `Err` is an error the caller would see.
    fn call(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// How the tasks behave.
#[derive(Clone, Debug, Default)]
pub(crate) struct Options {
    /// Keep every call's latency.
    pub(crate) latencies: bool,
    /// Keep every call's end time and outcome.
    pub(crate) events: bool,
    /// The caller's deadline for one call (`tokio::time::timeout`); a call
    /// that runs past it counts as an error.
    pub(crate) deadline: Option<Duration>,
    /// Pause after a failed call, so a library failing fast does not spin.
    pub(crate) pause_after_error: Duration,
    /// Counts the tasks that succeed after a moment the driver sets.
    pub(crate) mark: Option<Arc<Mark>>,
}

/// A moment (unset at first) and how many tasks have had a successful call
/// ending after it.
#[derive(Debug)]
pub(crate) struct Mark {
    base: Instant,
    at_ns: AtomicU64,
    pub(crate) reached: AtomicUsize,
}

impl Mark {
    pub(crate) fn new() -> Mark {
        Mark {
            base: Instant::now(),
            at_ns: AtomicU64::new(0),
            reached: AtomicUsize::new(0),
        }
    }

    /// Sets the moment.
    pub(crate) fn set(&self, at: Instant) {
        let ns =
            u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.at_ns.store(ns.max(1), Ordering::Release);
    }

    fn is_after(&self, t: Instant) -> bool {
        let at = self.at_ns.load(Ordering::Acquire);
        at != 0
            && u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
                > at
    }
}

/// What one task saw.
#[derive(Debug, Default)]
pub(crate) struct TaskOutcome {
    pub(crate) ops: u64,
    pub(crate) errors: u64,
    /// Latencies in nanoseconds (when asked for).
    pub(crate) latencies: Vec<u64>,
    /// End of each call and whether it succeeded (when asked for).
    pub(crate) events: Vec<(Instant, bool)>,
    /// The first error's text.
    pub(crate) first_error: Option<String>,
    /// Each call's phases (with `--phases`, when latencies are kept).
    pub(crate) phases: Vec<CallPhases>,
}

/// Tasks started and waiting at the gate.
pub(crate) struct Running {
    gate: Arc<Barrier>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<TaskOutcome>>,
}

/// Spawns one task per worker; they start calling at [`Running::begin`].
pub(crate) fn start<W: Worker>(workers: Vec<W>, options: Options) -> Running {
    let gate = Arc::new(Barrier::new(workers.len() + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let handles = workers
        .into_iter()
        .map(|mut worker| {
            let gate = Arc::clone(&gate);
            let stop = Arc::clone(&stop);
            let options = options.clone();
            tokio::spawn(async move {
                let mut out = TaskOutcome::default();
                let mut counted = false;
                let timed = options.latencies && phases::enabled();
                gate.wait().await;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let (result, call_phases) = match options.deadline {
                        None if timed => {
                            let (result, p) = Timed::new(worker.call()).await;
                            (result, Some(p))
                        }
                        None => (worker.call().await, None),
                        Some(limit) => match tokio::time::timeout(limit, worker.call()).await {
                            Ok(result) => (result, None),
                            Err(_) => (Err(anyhow::anyhow!("no answer within {limit:?}")), None),
                        },
                    };
                    let ended = Instant::now();
                    out.ops += 1;
                    if options.latencies {
                        let latency =
                            u64::try_from((ended - started).as_nanos()).unwrap_or(u64::MAX);
                        out.latencies.push(latency);
                        if let Some(mut p) = call_phases {
                            p.latency = latency;
                            out.phases.push(p);
                        }
                    }
                    if options.events {
                        out.events.push((ended, result.is_ok()));
                    }
                    if result.is_ok()
                        && !counted
                        && let Some(mark) = &options.mark
                        && mark.is_after(ended)
                    {
                        counted = true;
                        mark.reached.fetch_add(1, Ordering::AcqRel);
                    }
                    if let Err(error) = result {
                        out.errors += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(format!("{error:#}"));
                        }
                        if !options.pause_after_error.is_zero() {
                            tokio::time::sleep(options.pause_after_error).await;
                        }
                    }
                }
                out
            })
        })
        .collect();
    Running {
        gate,
        stop,
        handles,
    }
}

impl Running {
    /// Opens the gate; returns when every task is released.
    pub(crate) async fn begin(&self) -> Instant {
        self.gate.wait().await;
        Instant::now()
    }

    /// Stops the tasks after their current call and collects what they saw.
    pub(crate) async fn finish(self) -> anyhow::Result<Vec<TaskOutcome>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::with_capacity(self.handles.len());
        for handle in self.handles {
            out.push(handle.await?);
        }
        Ok(out)
    }
}

/// One timed run: throughput, errors and latency percentiles.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) ops: u64,
    pub(crate) errors: u64,
    pub(crate) seconds: f64,
    /// Sorted latencies in nanoseconds (empty unless asked for).
    pub(crate) latencies: Vec<u64>,
    pub(crate) first_error: Option<String>,
    /// Each call's phases, sorted by latency (empty unless `--phases`).
    pub(crate) phases: Vec<CallPhases>,
    /// The process's threads over the window (with `--phases`).
    pub(crate) threads: Threads,
    /// pgstack's statements that found every shared connection busy and
    /// took one of their own (with `--phases`; set by the caller).
    pub(crate) lanes_busy: Option<u64>,
}

impl Sample {
    pub(crate) fn ops_per_s(&self) -> f64 {
        (self.ops - self.errors) as f64 / self.seconds
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub(crate) fn quantile_us(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank = ((self.latencies.len() as f64) * q).ceil() as usize;
        let index = rank.clamp(1, self.latencies.len()) - 1;
        self.latencies[index] as f64 / 1000.0
    }
}

/// Runs `workers` for `duration` and measures.
pub(crate) async fn measure<W: Worker>(
    workers: Vec<W>,
    duration: Duration,
    latencies: bool,
) -> anyhow::Result<Sample> {
    let running = start(
        workers,
        Options {
            latencies,
            ..Options::default()
        },
    );
    let threads = Threads::read();
    let began = running.begin().await;
    tokio::time::sleep(duration).await;
    // Read before the tasks end: a task's own connection closes with it.
    let threads = Threads::read().since(threads);
    let outcomes = running.finish().await?;
    let seconds = began.elapsed().as_secs_f64();
    let mut sample = Sample {
        ops: 0,
        errors: 0,
        seconds,
        latencies: Vec::new(),
        first_error: None,
        phases: Vec::new(),
        threads,
        lanes_busy: None,
    };
    for outcome in outcomes {
        sample.ops += outcome.ops;
        sample.errors += outcome.errors;
        sample.latencies.extend(outcome.latencies);
        sample.phases.extend(outcome.phases);
        if sample.first_error.is_none() {
            sample.first_error = outcome.first_error;
        }
    }
    sample.latencies.sort_unstable();
    sample.phases.sort_unstable_by_key(|p| p.latency);
    Ok(sample)
}
