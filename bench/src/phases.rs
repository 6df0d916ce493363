//! `--phases`: where each call's time went, to explain a tail.
//!
//! A call's latency splits, as seen from the task that made it, into three
//! parts: **queued** (woken, its answer or lock ready, but waiting for a
//! worker thread to poll it again: the runtime's run queue and the threads'
//! own wait for a core), **running** (inside its polls: the library's and
//! the driver's CPU work on this task), and **waiting** (the rest: not
//! runnable, its answer not yet there — the server, the socket, a lane or
//! pool queue, another task such as a driver's connection task).
//!
//! [`Timed`] wraps a call's future and measures the first two; the third is
//! what is left of the latency. Beside it, [`Threads`] reads how long the
//! process's threads waited for a core (`/proc/self/task/*/schedstat`), so a
//! queued part can be split between the runtime and the operating system.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

/// `--phases`, when given.
static ON: AtomicBool = AtomicBool::new(false);

/// The benchmark server's data directory (its `postmaster.pid`).
static SERVER_DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

/// Turns the recording on for the whole run.
pub(crate) fn enable() {
    ON.store(true, Ordering::Relaxed);
}

/// Names the server whose processes [`Threads::server`] reads.
pub(crate) fn set_server(data_dir: &std::path::Path) {
    let _ = SERVER_DIR.set(data_dir.to_path_buf());
}

/// Whether calls are timed by phase.
pub(crate) fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// One call's parts, in nanoseconds.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CallPhases {
    pub(crate) latency: u64,
    pub(crate) queued: u64,
    pub(crate) running: u64,
    pub(crate) polls: u32,
}

/// The waker handed to the call: notes when it was first woken since its
/// last poll, then wakes the task.
struct Recorder {
    woken_ns: AtomicU64,
    inner: Mutex<Option<Waker>>,
}

impl Wake for Recorder {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let _ = self
            .woken_ns
            .compare_exchange(0, now_ns(), Ordering::AcqRel, Ordering::Relaxed);
        if let Ok(inner) = self.inner.lock()
            && let Some(waker) = inner.as_ref()
        {
            waker.wake_by_ref();
        }
    }
}

/// A call's future, timed by phase.
pub(crate) struct Timed<F> {
    inner: Pin<Box<F>>,
    recorder: Arc<Recorder>,
    waker: Waker,
    phases: CallPhases,
}

impl<F: Future> Timed<F> {
    pub(crate) fn new(inner: F) -> Timed<F> {
        let recorder = Arc::new(Recorder {
            woken_ns: AtomicU64::new(0),
            inner: Mutex::new(None),
        });
        Timed {
            inner: Box::pin(inner),
            waker: Waker::from(Arc::clone(&recorder)),
            recorder,
            phases: CallPhases::default(),
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, CallPhases);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let start = now_ns();
        let woken = this.recorder.woken_ns.swap(0, Ordering::AcqRel);
        if woken != 0 {
            this.phases.queued += start.saturating_sub(woken);
        }
        if let Ok(mut inner) = this.recorder.inner.lock() {
            match inner.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *inner = Some(cx.waker().clone()),
            }
        }
        let mut own = Context::from_waker(&this.waker);
        let result = this.inner.as_mut().poll(&mut own);
        this.phases.running += now_ns().saturating_sub(start);
        this.phases.polls += 1;
        match result {
            Poll::Ready(out) => Poll::Ready((out, this.phases)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Time the client's threads and the server's processes spent running and
/// waiting for a core (`schedstat`), and how often the server's processes
/// were taken off a core while they could still run (involuntary context
/// switches): nanoseconds and counts, zero where `/proc` lacks them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Threads {
    pub(crate) run_ns: u64,
    pub(crate) wait_ns: u64,
    /// Per server process: run, wait, involuntary switches.
    server: std::collections::HashMap<u32, [u64; 3]>,
    pub(crate) server_run_ns: u64,
    pub(crate) server_wait_ns: u64,
    pub(crate) server_preempted: u64,
}

fn schedstat(path: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(path.join("schedstat")).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some((fields.next()??, fields.next()??))
}

fn preempted(path: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(path.join("status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The server's processes: the postmaster's children.
fn server_processes() -> std::collections::HashMap<u32, [u64; 3]> {
    let mut out = std::collections::HashMap::new();
    let Some(dir) = SERVER_DIR.get() else {
        return out;
    };
    let Some(postmaster) = std::fs::read_to_string(dir.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return out;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        // The parent is the fourth field of `stat`, after `(comm)`.
        let parent = std::fs::read_to_string(path.join("stat"))
            .ok()
            .and_then(|t| {
                t.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
            });
        if parent != Some(postmaster) {
            continue;
        }
        if let (Some((run, wait)), Some(switches)) = (schedstat(&path), preempted(&path)) {
            out.insert(pid, [run, wait, switches]);
        }
    }
    out
}

impl Threads {
    pub(crate) fn read() -> Threads {
        let mut out = Threads::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                if let Some((run, wait)) = schedstat(&task.path()) {
                    out.run_ns += run;
                    out.wait_ns += wait;
                }
            }
        }
        if enabled() {
            out.server = server_processes();
        }
        out
    }

    /// What happened between `earlier` and `self` (the server's processes
    /// that lived through both readings).
    pub(crate) fn since(self, earlier: Threads) -> Threads {
        let mut out = Threads {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            ..Threads::default()
        };
        for (pid, now) in &self.server {
            if let Some(then) = earlier.server.get(pid) {
                out.server_run_ns += now[0].saturating_sub(then[0]);
                out.server_wait_ns += now[1].saturating_sub(then[1]);
                out.server_preempted += now[2].saturating_sub(then[2]);
            }
        }
        out
    }
}

/// The mean parts of the calls whose latency lies between the quantiles
/// `from` and `to` of `calls` (sorted by latency), in microseconds:
/// latency, queued, running, waiting, polls.
pub(crate) fn mean_between(calls: &[CallPhases], from: f64, to: f64) -> Option<[f64; 5]> {
    if calls.is_empty() {
        return None;
    }
    let n = calls.len();
    // (A product such as 100 × 0.55 comes out as 55.000…01: nudged so it
    // does not take one call more.)
    let lo = ((n as f64) * from + 1e-9).floor() as usize;
    let hi = (((n as f64) * to - 1e-9).ceil() as usize).clamp(lo + 1, n);
    let part = calls.get(lo.min(n - 1)..hi)?;
    let count = part.len() as f64;
    let sum = |f: fn(&CallPhases) -> u64| part.iter().map(f).sum::<u64>() as f64 / count / 1000.0;
    let latency = sum(|c| c.latency);
    let queued = sum(|c| c.queued);
    let running = sum(|c| c.running);
    let polls = part.iter().map(|c| f64::from(c.polls)).sum::<f64>() / count;
    Some([
        latency,
        queued,
        running,
        (latency - queued - running).max(0.0),
        polls,
    ])
}

/// Adds a sample's phases to `m` (when they were recorded): the calls
/// around the median (p45–p55) and the slowest 1 % (p99–p100), each as mean
/// latency, queued, running and waiting µs and polls; and the process's
/// threads' running and waiting-for-a-core time per second of the window,
/// the server's, and pgstack's statements that found every lane busy.
pub(crate) fn push(m: &mut crate::report::Medians, sample: &crate::load::Sample) {
    if sample.phases.is_empty() {
        return;
    }
    const KEYS: [[&str; 5]; 2] = [
        [
            "mid_latency_us",
            "mid_queued_us",
            "mid_running_us",
            "mid_waiting_us",
            "mid_polls",
        ],
        [
            "tail_latency_us",
            "tail_queued_us",
            "tail_running_us",
            "tail_waiting_us",
            "tail_polls",
        ],
    ];
    for (keys, (from, to)) in KEYS.iter().zip([(0.45, 0.55), (0.99, 1.0)]) {
        if let Some(values) = mean_between(&sample.phases, from, to) {
            for (key, value) in keys.iter().zip(values) {
                m.push(key, 1, value);
            }
        }
    }
    let per_s = |ns: u64| ns as f64 / 1e6 / sample.seconds;
    m.push("threads_run_ms_per_s", 1, per_s(sample.threads.run_ns));
    m.push("threads_wait_ms_per_s", 1, per_s(sample.threads.wait_ns));
    m.push(
        "server_run_ms_per_s",
        1,
        per_s(sample.threads.server_run_ns),
    );
    m.push(
        "server_wait_ms_per_s",
        1,
        per_s(sample.threads.server_wait_ns),
    );
    m.push(
        "server_preempted_per_s",
        0,
        sample.threads.server_preempted as f64 / sample.seconds,
    );
    if let Some(busy) = sample.lanes_busy {
        m.push("lanes_busy_per_s", 0, busy as f64 / sample.seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn calls(n: u64) -> Vec<CallPhases> {
        (1..=n)
            .map(|i| CallPhases {
                latency: i * 1000,
                queued: i * 500,
                running: 100,
                polls: 2,
            })
            .collect()
    }

    #[test]
    fn the_tail_is_the_slowest_one_percent_and_waiting_is_the_rest() {
        let calls = calls(100);
        let [latency, queued, running, waiting, polls] =
            mean_between(&calls, 0.99, 1.0).unwrap_or_default();
        assert_eq!((latency, queued, running), (100.0, 50.0, 0.1));
        assert!((waiting - 49.9).abs() < 1e-9, "{waiting}");
        assert_eq!(polls, 2.0);
        let [mid, ..] = mean_between(&calls, 0.45, 0.55).unwrap_or_default();
        assert_eq!(mid, 50.5, "calls 46 to 55");
        assert!(mean_between(&[], 0.99, 1.0).is_none());
    }

    /// Wakes itself on its first poll (so it is queued at once) and is
    /// ready on the second.
    struct YieldOnce(bool);

    impl Future for YieldOnce {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_woken_while_the_thread_is_busy_counts_as_queued() {
        let timed = tokio::spawn(Timed::new(YieldOnce(false)));
        // Holds the only thread after the timed call has woken itself.
        let blocker = tokio::spawn(async { std::thread::sleep(Duration::from_millis(30)) });
        let ((), phases) = timed.await.unwrap_or_default();
        blocker.await.unwrap_or_default();
        assert_eq!(phases.polls, 2);
        assert!(phases.queued >= 25_000_000, "{phases:?}");
        assert!(phases.running < 25_000_000, "{phases:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_waiting_for_its_answer_is_not_queued() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let answer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            let _ = tx.send(());
        });
        let (got, phases) = Timed::new(rx).await;
        assert!(got.is_ok());
        let _ = answer.join();
        assert_eq!(phases.polls, 2);
        assert!(phases.queued < 10_000_000, "{phases:?}");
        assert!(phases.running < 10_000_000, "{phases:?}");
    }
}
