//! The circuit breaker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use pgstack_config::{CircuitBreakerSettings, SlidingWindow};
use pin_project_lite::pin_project;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::error::{Checker, InvalidSettings};
use crate::window::{FAILED, SLOW, TIME_BUCKETS, Totals, Window};

/// Name of the gauge holding each breaker's state, labelled `node` with the
/// breaker's name: 0 closed (or forced closed), 1 half-open, 2 open (or
/// forced open).
pub const STATE_METRIC: &str = "pgstack_circuit_state";

/// How many transitions a lagging [`CircuitBreaker::subscribe`] receiver may
/// fall behind before it misses some.
const EVENT_CAPACITY: usize = 64;

/// The state of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through; outcomes are recorded in the sliding window.
    Closed,
    /// A fixed number of probe calls go through; the rest are rejected.
    HalfOpen,
    /// Calls are rejected until the open duration has passed.
    Open,
    /// Calls are rejected until [`CircuitBreaker::reset`] or
    /// [`CircuitBreaker::force_closed`].
    ForcedOpen,
    /// Calls go through and nothing is recorded, until
    /// [`CircuitBreaker::reset`] or [`CircuitBreaker::force_open`].
    ForcedClosed,
}

impl BreakerState {
    /// The value of the [`STATE_METRIC`] gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerState::Closed | BreakerState::ForcedClosed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open | BreakerState::ForcedOpen => 2.0,
        }
    }

    /// Whether calls are let through (half-open: some of them).
    pub fn allows_calls(self) -> bool {
        !matches!(self, BreakerState::Open | BreakerState::ForcedOpen)
    }

    fn code(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
            BreakerState::ForcedOpen => 3,
            BreakerState::ForcedClosed => 4,
        }
    }

    fn from_code(code: u64) -> Self {
        match code {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            3 => BreakerState::ForcedOpen,
            _ => BreakerState::ForcedClosed,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
            BreakerState::ForcedOpen => "forced open",
            BreakerState::ForcedClosed => "forced closed",
        })
    }
}

/// The outcome of a call, as recorded by the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The call worked (it may still count as slow).
    Success,
    /// The call failed.
    Failure,
    /// The call says nothing about the other side's health; not recorded. An
    /// ignored half-open probe frees its slot for another probe.
    Ignored,
}

/// Why a breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate over the window reached the threshold.
    FailureRate,
    /// The slow-call rate over the window reached the threshold.
    SlowCallRate,
    /// The open duration passed and a call asked to probe.
    OpenDurationElapsed,
    /// [`CircuitBreaker::probe_now`] was called (the node answers again).
    ProbeRequested,
    /// A half-open probe failed.
    ProbeFailed,
    /// Every half-open probe succeeded but too many were slow.
    ProbesSlow,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// [`CircuitBreaker::force_open`].
    ForcedOpen,
    /// [`CircuitBreaker::force_closed`].
    ForcedClosed,
    /// [`CircuitBreaker::reset`].
    Reset,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransitionReason::FailureRate => "failure rate reached the threshold",
            TransitionReason::SlowCallRate => "slow-call rate reached the threshold",
            TransitionReason::OpenDurationElapsed => "open duration elapsed",
            TransitionReason::ProbeRequested => "probe requested",
            TransitionReason::ProbeFailed => "a probe failed",
            TransitionReason::ProbesSlow => "the probes were slow",
            TransitionReason::ProbesSucceeded => "the probes succeeded",
            TransitionReason::ForcedOpen => "forced open",
            TransitionReason::ForcedClosed => "forced closed",
            TransitionReason::Reset => "reset",
        })
    }
}

/// A state change, as published to [`CircuitBreaker::subscribe`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Transition {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// Why.
    pub reason: TransitionReason,
    /// When.
    pub at: Instant,
    /// For a move to [`BreakerState::Open`]: when a probe will be let through.
    pub probe_at: Option<Instant>,
}

/// A call the breaker did not let through.
#[derive(Clone, Debug, thiserror::Error)]
#[error("circuit breaker `{breaker}` is {state}: {}", self.advice())]
#[non_exhaustive]
pub struct Rejected {
    /// The breaker's name (for per-node breakers, the node).
    pub breaker: Arc<str>,
    /// The state that rejected the call.
    pub state: BreakerState,
    /// When the breaker will let a probe through; `None` when half-open with
    /// every probe slot taken, or forced open.
    pub probe_at: Option<Instant>,
}

impl Rejected {
    /// Time until a probe is let through, from now.
    pub fn probe_in(&self) -> Option<Duration> {
        self.probe_at
            .map(|at| at.saturating_duration_since(Instant::now()))
    }

    fn advice(&self) -> String {
        match (self.state, self.probe_in()) {
            (BreakerState::ForcedOpen, _) => "forced open until reset".to_owned(),
            (_, Some(wait)) => format!("next probe in {wait:?}"),
            (_, None) => "every probe slot is taken; try again shortly".to_owned(),
        }
    }
}

/// The error of [`CircuitBreaker::call`]: rejected, or the call's own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BreakerError<E> {
    /// The breaker did not let the call through.
    #[error(transparent)]
    Rejected(Rejected),
    /// The call ran and failed.
    #[error(transparent)]
    Inner(E),
}

/// Counts kept by a breaker, for in-process reporting.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct BreakerSnapshot {
    /// The state.
    pub state: BreakerState,
    /// Calls in the sliding window.
    pub calls: u32,
    /// Failed calls in the window.
    pub failed_calls: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// Failed / calls, once the window holds the minimum number of calls.
    pub failure_rate: Option<f64>,
    /// Slow / calls, once the window holds the minimum number of calls.
    pub slow_call_rate: Option<f64>,
    /// Calls rejected since the breaker was created.
    pub rejected_calls: u64,
    /// Trips since the breaker last closed (drives the open-duration growth).
    pub consecutive_trips: u32,
    /// When open: when a probe will be let through.
    pub probe_at: Option<Instant>,
}

/// A circuit breaker: closed → open → half-open → closed or open again.
///
/// Cheap to clone; clones share the state. See the crate docs and
/// `docs/resilience.md` for the semantics.
///
/// ```
/// use pgstack_config::CircuitBreakerSettings;
/// use pgstack_resilience::{BreakerState, CircuitBreaker, Outcome};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let settings = CircuitBreakerSettings { minimum_calls: 4, window_size: 4, ..Default::default() };
/// let breaker = CircuitBreaker::new("primary", &settings)?;
///
/// // Wrap a future ...
/// let ok: Result<u32, _> = breaker.call(async { Ok::<_, std::io::Error>(1) }).await;
/// assert_eq!(ok?, 1);
///
/// // ... or take a permit and record the outcome of work done elsewhere.
/// for _ in 0..3 {
///     let permit = breaker.acquire()?;
///     permit.record(Outcome::Failure);
/// }
/// assert_eq!(breaker.state(), BreakerState::Open);
/// let rejected = breaker.acquire().unwrap_err();
/// assert!(rejected.to_string().starts_with("circuit breaker `primary` is open: next probe in"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

struct Shared {
    /// State code in the low 3 bits, epoch above: the lock-free fast path.
    word: AtomicU64,
    /// While open: nanoseconds from `origin` at which a probe is let through.
    open_until: AtomicU64,
    rejected: AtomicU64,
    origin: Instant,
    name: Arc<str>,
    config: BreakerPolicy,
    inner: Mutex<Inner>,
    state_tx: watch::Sender<BreakerState>,
    events_tx: broadcast::Sender<Transition>,
}

/// A breaker's settings, validated: [`CircuitBreakerSettings`] plus the
/// options the configuration file does not carry.
///
/// ```
/// use pgstack_config::CircuitBreakerSettings;
/// use pgstack_resilience::{BreakerPolicy, CircuitBreaker};
///
/// let policy = BreakerPolicy::from_settings(&CircuitBreakerSettings::default())?
///     .slow_call_detection(false);
/// let breaker = CircuitBreaker::with_policy("primary", policy);
/// # Ok::<(), pgstack_resilience::InvalidSettings>(())
/// ```
#[derive(Clone, Debug)]
pub struct BreakerPolicy {
    detect_slow: bool,
    failure_rate_threshold: f64,
    slow_call_rate_threshold: f64,
    slow_call_duration: Duration,
    minimum_calls: u32,
    sliding_window: SlidingWindow,
    window_size: u32,
    window_duration: Duration,
    open_duration: Duration,
    open_duration_multiplier: f64,
    max_open_duration: Duration,
    half_open_probes: u32,
}

struct Inner {
    state: BreakerState,
    epoch: u64,
    window: Window,
    probes_in_flight: u32,
    probes_succeeded: u32,
    probes_slow: u32,
    consecutive_trips: u32,
    probe_at: Option<Instant>,
}

/// Largest count-based window accepted.
const MAX_WINDOW_SIZE: u32 = 1 << 20;

impl CircuitBreaker {
    /// A closed breaker named `name` (for per-node breakers, the node's name;
    /// it labels errors, events and the [`STATE_METRIC`] gauge).
    ///
    /// Fails with one entry per bad field: rate thresholds must be within
    /// `(0, 1]`, `minimum_calls`, `half_open_probes` and (count window)
    /// `window_size` at least 1, `window_size` at most 1 048 576, durations
    /// above zero, `open_duration_multiplier` a finite number of at least 1
    /// and `max_open_duration` at least `open_duration`.
    pub fn new(
        name: impl Into<Arc<str>>,
        settings: &CircuitBreakerSettings,
    ) -> Result<Self, InvalidSettings> {
        Ok(Self::with_policy(
            name,
            BreakerPolicy::from_settings(settings)?,
        ))
    }

    /// A closed breaker from a validated policy.
    pub fn with_policy(name: impl Into<Arc<str>>, config: BreakerPolicy) -> Self {
        let name = name.into();
        let origin = Instant::now();
        let window = match config.sliding_window {
            SlidingWindow::Count => Window::count(config.window_size),
            SlidingWindow::Time => Window::time(config.window_duration, origin),
        };
        let (state_tx, _) = watch::channel(BreakerState::Closed);
        let (events_tx, _) = broadcast::channel(EVENT_CAPACITY);
        metrics::gauge!(STATE_METRIC, "node" => name.to_string()).set(0.0);
        CircuitBreaker {
            shared: Arc::new(Shared {
                word: AtomicU64::new(BreakerState::Closed.code()),
                open_until: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                origin,
                name,
                config,
                inner: Mutex::new(Inner {
                    state: BreakerState::Closed,
                    epoch: 0,
                    window,
                    probes_in_flight: 0,
                    probes_succeeded: 0,
                    probes_slow: 0,
                    consecutive_trips: 0,
                    probe_at: None,
                }),
                state_tx,
                events_tx,
            }),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current state (lock-free).
    ///
    /// An open breaker whose open duration has passed still reads
    /// [`BreakerState::Open`] until the next call (or [`Self::probe_now`])
    /// moves it to half-open.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_code(self.shared.word.load(Ordering::Acquire) & STATE_MASK)
    }

    /// Whether [`Self::acquire`] would let a call through now, without taking
    /// a permit or a probe slot: true when closed, when half-open with a free
    /// probe slot, and when open with the open duration passed. For a router
    /// choosing between nodes (reading [`Self::state`] instead would skip an
    /// open breaker forever, since only a call moves it to half-open).
    pub fn permits_calls(&self) -> bool {
        let word = self.shared.word.load(Ordering::Acquire);
        match BreakerState::from_code(word & STATE_MASK) {
            BreakerState::Closed | BreakerState::ForcedClosed => true,
            BreakerState::ForcedOpen => false,
            BreakerState::Open => {
                let until = self.shared.open_until.load(Ordering::Acquire);
                self.shared.nanos_since_origin(Instant::now()) >= until
            }
            BreakerState::HalfOpen => {
                let inner = self.shared.lock();
                match inner.state {
                    BreakerState::HalfOpen => {
                        inner.probes_in_flight + inner.probes_succeeded
                            < self.shared.config.half_open_probes
                    }
                    other => other.allows_calls(),
                }
            }
        }
    }

    /// Asks to run one call: a [`Permit`] to record its outcome with, or
    /// [`Rejected`] at once when the breaker is open (or half-open with every
    /// probe slot taken).
    ///
    /// In the closed state this takes no lock. Record the outcome with
    /// [`Permit::record`]; a permit dropped without a record counts as
    /// [`Outcome::Ignored`] and frees its half-open slot.
    #[inline]
    pub fn acquire(&self) -> Result<Permit<'_>, Rejected> {
        let token = self.shared.acquire(true)?;
        Ok(Permit {
            shared: &self.shared,
            token,
        })
    }

    /// Like [`Self::acquire`], for a caller that times the call itself and
    /// records with [`Permit::record_elapsed`]: the closed state's fast path
    /// then reads no clock at all (with slow-call detection on, `acquire`
    /// reads it once here and once at the record). A permit from here
    /// recorded with [`Permit::record`] counts as not slow.
    #[inline]
    pub fn acquire_untimed(&self) -> Result<Permit<'_>, Rejected> {
        let token = self.shared.acquire(false)?;
        Ok(Permit {
            shared: &self.shared,
            token,
        })
    }

    /// Like [`Self::acquire`], with a permit that owns a handle to the
    /// breaker, for storing in a struct or moving into a task.
    #[inline]
    pub fn acquire_owned(&self) -> Result<OwnedPermit, Rejected> {
        let token = self.shared.acquire(true)?;
        Ok(OwnedPermit {
            shared: Arc::clone(&self.shared),
            token,
        })
    }

    /// Runs `future` through the breaker: every `Err` counts as a failure.
    /// The elapsed time decides whether the call was slow.
    ///
    /// The permit is taken when the returned future is first polled; a
    /// future dropped before it finishes records nothing.
    pub fn call<T, E, Fut>(&self, future: Fut) -> Call<'_, Fut, AnyErrorFails<T, E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(future, any_error_fails::<T, E>)
    }

    /// Runs `future` through the breaker, with `outcome` deciding what its
    /// result means (e.g. an error that proves the node healthy is a
    /// success; a cancelled request is ignored).
    pub fn call_with<T, E, Fut, O>(&self, future: Fut, outcome: O) -> Call<'_, Fut, O>
    where
        Fut: Future<Output = Result<T, E>>,
        O: FnOnce(&Result<T, E>) -> Outcome,
    {
        Call {
            shared: &self.shared,
            token: None,
            outcome: Some(outcome),
            future,
        }
    }

    /// Moves an open breaker to half-open at once, so the next calls probe
    /// the other side without waiting out the open duration. For a health
    /// monitor that has seen the node answer again. Returns whether the
    /// breaker was open (forced open is left alone).
    pub fn probe_now(&self) -> bool {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        if inner.state != BreakerState::Open {
            return false;
        }
        self.shared.transition(
            &mut inner,
            BreakerState::HalfOpen,
            TransitionReason::ProbeRequested,
            now,
        );
        true
    }

    /// Rejects every call until [`Self::reset`] or [`Self::force_closed`].
    pub fn force_open(&self) {
        self.force(BreakerState::ForcedOpen, TransitionReason::ForcedOpen);
    }

    /// Lets every call through and records nothing until [`Self::reset`] or
    /// [`Self::force_open`].
    pub fn force_closed(&self) {
        self.force(BreakerState::ForcedClosed, TransitionReason::ForcedClosed);
    }

    /// Back to closed with an empty window and the open duration back to its
    /// initial value. In-flight permits are not recorded.
    pub fn reset(&self) {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        inner.consecutive_trips = 0;
        self.shared.transition(
            &mut inner,
            BreakerState::Closed,
            TransitionReason::Reset,
            now,
        );
    }

    fn force(&self, to: BreakerState, reason: TransitionReason) {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        if inner.state != to {
            self.shared.transition(&mut inner, to, reason, now);
        }
    }

    /// Every state change from now on, in order. A receiver that falls more
    /// than 64 transitions behind gets `RecvError::Lagged` and continues with
    /// the newest.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition> {
        self.shared.events_tx.subscribe()
    }

    /// The current state, as a watch channel: never lags, may skip
    /// intermediate states.
    pub fn watch(&self) -> watch::Receiver<BreakerState> {
        self.shared.state_tx.subscribe()
    }

    /// The breaker's counts, for reporting.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let now = Instant::now();
        let config = &self.shared.config;
        let mut inner = self.shared.lock();
        let totals = inner.window.totals(now);
        let judged = totals.calls > 0 && totals.calls >= config.effective_minimum_calls();
        let rate = |n: u32| judged.then(|| f64::from(n) / f64::from(totals.calls));
        BreakerSnapshot {
            state: inner.state,
            calls: totals.calls,
            failed_calls: totals.failures,
            slow_calls: totals.slow,
            failure_rate: rate(totals.failures),
            slow_call_rate: rate(totals.slow),
            rejected_calls: self.shared.rejected.load(Ordering::Relaxed),
            consecutive_trips: inner.consecutive_trips,
            probe_at: inner.probe_at,
        }
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .field("config", &self.shared.config)
            .finish()
    }
}

const STATE_BITS: u32 = 3;
const STATE_MASK: u64 = (1 << STATE_BITS) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Recorded in the closed window.
    Call,
    /// Holds a half-open slot.
    Probe,
    /// Forced closed: nothing is recorded.
    Untracked,
}

#[derive(Debug)]
struct Token {
    epoch: u64,
    /// When the call started; `None` when the caller times it and records
    /// the elapsed time itself ([`CircuitBreaker::acquire_untimed`]).
    started: Option<Instant>,
    kind: Kind,
    done: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held, so a poisoned lock still
        // guards consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nanos_since_origin(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// `timed`: read the clock to time the call (when slow calls are
    /// detected); the caller may instead record the elapsed time it measured.
    #[inline(always)]
    fn acquire(&self, timed: bool) -> Result<Token, Rejected> {
        let word = self.word.load(Ordering::Acquire);
        let state = word & STATE_MASK;
        if state == 0 {
            // Closed: the fast path. The clock is read only to time the call.
            let started = (timed && self.config.detect_slow).then(Instant::now);
            return Ok(Token {
                epoch: word >> STATE_BITS,
                started,
                kind: Kind::Call,
                done: false,
            });
        }
        let now = Instant::now();
        match BreakerState::from_code(state) {
            BreakerState::ForcedClosed => Ok(Token {
                epoch: word >> STATE_BITS,
                started: Some(now),
                kind: Kind::Untracked,
                done: false,
            }),
            BreakerState::ForcedOpen => Err(self.reject(BreakerState::ForcedOpen, None)),
            BreakerState::Open => {
                let until = self.open_until.load(Ordering::Acquire);
                if self.nanos_since_origin(now) < until {
                    let probe_at = self.origin + Duration::from_nanos(until);
                    Err(self.reject(BreakerState::Open, Some(probe_at)))
                } else {
                    self.acquire_slow(now)
                }
            }
            _ => self.acquire_slow(now),
        }
    }

    #[cold]
    fn acquire_slow(&self, now: Instant) -> Result<Token, Rejected> {
        let mut inner = self.lock();
        let token = |inner: &Inner, kind| Token {
            epoch: inner.epoch,
            started: Some(now),
            kind,
            done: false,
        };
        match inner.state {
            BreakerState::Closed => Ok(token(&inner, Kind::Call)),
            BreakerState::ForcedClosed => Ok(token(&inner, Kind::Untracked)),
            BreakerState::ForcedOpen => Err(self.reject(BreakerState::ForcedOpen, None)),
            BreakerState::Open => match inner.probe_at {
                Some(at) if now < at => Err(self.reject(BreakerState::Open, Some(at))),
                _ => {
                    self.transition(
                        &mut inner,
                        BreakerState::HalfOpen,
                        TransitionReason::OpenDurationElapsed,
                        now,
                    );
                    inner.probes_in_flight = 1;
                    Ok(token(&inner, Kind::Probe))
                }
            },
            BreakerState::HalfOpen => {
                if inner.probes_in_flight + inner.probes_succeeded < self.config.half_open_probes {
                    inner.probes_in_flight += 1;
                    Ok(token(&inner, Kind::Probe))
                } else {
                    Err(self.reject(BreakerState::HalfOpen, None))
                }
            }
        }
    }

    fn reject(&self, state: BreakerState, probe_at: Option<Instant>) -> Rejected {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Rejected {
            breaker: Arc::clone(&self.name),
            state,
            probe_at,
        }
    }

    /// Records a permit's outcome; `elapsed` of `None` means "since acquire".
    fn finish(&self, token: &mut Token, outcome: Outcome, elapsed: Option<Duration>) {
        token.done = true;
        if token.kind == Kind::Untracked {
            return;
        }
        // Read the clock only when something needs it: timing the call, or
        // placing it in a time window. Transitions read it themselves.
        let mut now = None;
        let slow = self.config.detect_slow && {
            let elapsed = match (elapsed, token.started) {
                (Some(elapsed), _) => elapsed,
                (None, Some(started)) => {
                    let t = Instant::now();
                    now = Some(t);
                    t.saturating_duration_since(started)
                }
                // Untimed and recorded without an elapsed time: not slow.
                (None, None) => Duration::ZERO,
            };
            elapsed > self.config.slow_call_duration
        };
        if now.is_none() && self.config.sliding_window == SlidingWindow::Time {
            now = Some(Instant::now());
        }
        let mut inner = self.lock();
        if inner.epoch != token.epoch {
            // Acquired before the last transition: stale, not recorded.
            return;
        }
        match (inner.state, token.kind) {
            (BreakerState::Closed, Kind::Call) => {
                let failed = match outcome {
                    Outcome::Success => 0,
                    Outcome::Failure => FAILED,
                    Outcome::Ignored => return,
                };
                let code = failed | if slow { SLOW } else { 0 };
                // A count window does not look at the time.
                let totals = inner.window.record(code, now.unwrap_or(self.origin));
                if let Some(reason) = self.config.trips(totals) {
                    let now = now.unwrap_or_else(Instant::now);
                    self.transition(&mut inner, BreakerState::Open, reason, now);
                }
            }
            (BreakerState::HalfOpen, Kind::Probe) => {
                let now = now.unwrap_or_else(Instant::now);
                inner.probes_in_flight -= 1;
                match outcome {
                    Outcome::Ignored => {}
                    Outcome::Failure => {
                        self.transition(
                            &mut inner,
                            BreakerState::Open,
                            TransitionReason::ProbeFailed,
                            now,
                        );
                    }
                    Outcome::Success => {
                        inner.probes_succeeded += 1;
                        inner.probes_slow += u32::from(slow);
                        if inner.probes_succeeded >= self.config.half_open_probes {
                            let slow_rate_reached = f64::from(inner.probes_slow)
                                >= self.config.slow_call_rate_threshold
                                    * f64::from(inner.probes_succeeded);
                            if slow_rate_reached {
                                self.transition(
                                    &mut inner,
                                    BreakerState::Open,
                                    TransitionReason::ProbesSlow,
                                    now,
                                );
                            } else {
                                inner.consecutive_trips = 0;
                                self.transition(
                                    &mut inner,
                                    BreakerState::Closed,
                                    TransitionReason::ProbesSucceeded,
                                    now,
                                );
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A permit dropped without a record: frees its half-open slot.
    fn abandon(&self, token: &mut Token) {
        token.done = true;
        if token.kind != Kind::Probe {
            return;
        }
        let mut inner = self.lock();
        if inner.epoch == token.epoch && inner.state == BreakerState::HalfOpen {
            inner.probes_in_flight -= 1;
        }
    }

    /// Moves to `to`; the caller holds the lock.
    fn transition(
        &self,
        inner: &mut Inner,
        to: BreakerState,
        reason: TransitionReason,
        now: Instant,
    ) {
        let from = inner.state;
        inner.state = to;
        inner.epoch += 1;
        inner.probe_at = None;
        match to {
            BreakerState::Open => {
                inner.consecutive_trips = inner.consecutive_trips.saturating_add(1);
                let open_for = self.config.open_duration_for(inner.consecutive_trips);
                let probe_at = now
                    .checked_add(open_for)
                    .unwrap_or(now + Duration::from_secs(86_400 * 365));
                inner.probe_at = Some(probe_at);
                self.open_until
                    .store(self.nanos_since_origin(probe_at), Ordering::Release);
            }
            BreakerState::HalfOpen => {
                inner.probes_in_flight = 0;
                inner.probes_succeeded = 0;
                inner.probes_slow = 0;
            }
            BreakerState::Closed | BreakerState::ForcedClosed | BreakerState::ForcedOpen => {
                inner.window.clear();
            }
        }
        self.word
            .store((inner.epoch << STATE_BITS) | to.code(), Ordering::Release);
        self.publish(from, to, reason, now, inner.probe_at);
    }

    fn publish(
        &self,
        from: BreakerState,
        to: BreakerState,
        reason: TransitionReason,
        at: Instant,
        probe_at: Option<Instant>,
    ) {
        let name = &*self.name;
        let probe_in_ms = probe_at.map(|p| p.saturating_duration_since(at).as_millis() as u64);
        match to {
            BreakerState::Open | BreakerState::ForcedOpen => tracing::warn!(
                breaker = name, %from, %to, %reason, probe_in_ms, "circuit breaker opened"
            ),
            _ => tracing::info!(
                breaker = name, %from, %to, %reason, "circuit breaker changed state"
            ),
        }
        metrics::gauge!(STATE_METRIC, "node" => name.to_owned()).set(to.gauge_value());
        self.state_tx.send_replace(to);
        // No subscriber is not an error.
        let _ = self.events_tx.send(Transition {
            breaker: Arc::clone(&self.name),
            from,
            to,
            reason,
            at,
            probe_at,
        });
    }
}

impl BreakerPolicy {
    /// Validates `settings`; see [`CircuitBreaker::new`] for the rules.
    /// Slow-call detection follows `slow_call_detection`.
    pub fn from_settings(settings: &CircuitBreakerSettings) -> Result<Self, InvalidSettings> {
        let s = settings;
        let rate = |r: f64| r > 0.0 && r <= 1.0;
        let mut c = Checker::default();
        c.check(
            rate(s.failure_rate_threshold),
            "circuit_breaker.failure_rate_threshold",
            s.failure_rate_threshold,
            "must be within (0, 1], e.g. 0.5 to open when half the calls fail",
        );
        c.check(
            rate(s.slow_call_rate_threshold),
            "circuit_breaker.slow_call_rate_threshold",
            s.slow_call_rate_threshold,
            "must be within (0, 1]; 1.0 opens only when every call is slow",
        );
        c.check(
            !s.slow_call_duration.is_zero(),
            "circuit_breaker.slow_call_duration",
            s.slow_call_duration,
            "must be above zero",
        );
        c.check(
            s.minimum_calls >= 1,
            "circuit_breaker.minimum_calls",
            s.minimum_calls,
            "must be at least 1",
        );
        match s.sliding_window {
            SlidingWindow::Count => c.check(
                (1..=MAX_WINDOW_SIZE).contains(&s.window_size),
                "circuit_breaker.window_size",
                s.window_size,
                "must be within 1..=1048576 calls",
            ),
            SlidingWindow::Time => c.check(
                s.window_duration >= Duration::from_nanos(TIME_BUCKETS as u64),
                "circuit_breaker.window_duration",
                s.window_duration,
                "must be above zero (e.g. \"30s\")",
            ),
        }
        c.check(
            !s.open_duration.is_zero(),
            "circuit_breaker.open_duration",
            s.open_duration,
            "must be above zero",
        );
        c.check(
            s.open_duration_multiplier.is_finite() && s.open_duration_multiplier >= 1.0,
            "circuit_breaker.open_duration_multiplier",
            s.open_duration_multiplier,
            "must be a finite number of at least 1.0 (1.0 keeps the open duration fixed)",
        );
        c.check(
            s.max_open_duration >= s.open_duration,
            "circuit_breaker.max_open_duration",
            s.max_open_duration,
            "must be at least circuit_breaker.open_duration",
        );
        c.check(
            s.half_open_probes >= 1,
            "circuit_breaker.half_open_probes",
            s.half_open_probes,
            "must be at least 1",
        );
        c.finish()?;
        Ok(BreakerPolicy {
            detect_slow: s.slow_call_detection,
            failure_rate_threshold: s.failure_rate_threshold,
            slow_call_rate_threshold: s.slow_call_rate_threshold,
            slow_call_duration: s.slow_call_duration,
            minimum_calls: s.minimum_calls,
            sliding_window: s.sliding_window,
            window_size: s.window_size,
            window_duration: s.window_duration,
            open_duration: s.open_duration,
            open_duration_multiplier: s.open_duration_multiplier,
            max_open_duration: s.max_open_duration,
            half_open_probes: s.half_open_probes,
        })
    }

    /// Turns slow-call detection on (the default) or off.
    ///
    /// Off, no call counts as slow, and a breaker with a count-based window
    /// reads no clock at all while closed: this saves two clock reads per
    /// call (about 50 ns on the benchmark machine). Use it when the work has
    /// its own time limit and slowness need not open the breaker.
    pub fn slow_call_detection(mut self, on: bool) -> Self {
        self.detect_slow = on;
        self
    }

    /// Whether slow calls are detected.
    pub fn detects_slow_calls(&self) -> bool {
        self.detect_slow
    }

    /// A count window never holds more than `window_size` calls.
    fn effective_minimum_calls(&self) -> u32 {
        match self.sliding_window {
            SlidingWindow::Count => self.minimum_calls.min(self.window_size),
            SlidingWindow::Time => self.minimum_calls,
        }
    }

    #[inline]
    fn trips(&self, totals: Totals) -> Option<TransitionReason> {
        if totals.calls < self.effective_minimum_calls() {
            return None;
        }
        let calls = f64::from(totals.calls);
        if f64::from(totals.failures) >= self.failure_rate_threshold * calls {
            Some(TransitionReason::FailureRate)
        } else if f64::from(totals.slow) >= self.slow_call_rate_threshold * calls {
            Some(TransitionReason::SlowCallRate)
        } else {
            None
        }
    }

    /// The open duration after `trips` consecutive trips (1 for the first).
    fn open_duration_for(&self, trips: u32) -> Duration {
        let exponent = trips.saturating_sub(1).min(i32::MAX as u32) as i32;
        crate::backoff::grow(
            self.open_duration,
            self.open_duration_multiplier,
            exponent,
            self.max_open_duration,
        )
    }
}

/// The outcome rule of [`CircuitBreaker::call`]: `Ok` succeeds, `Err` fails.
pub type AnyErrorFails<T, E> = fn(&Result<T, E>) -> Outcome;

fn any_error_fails<T, E>(result: &Result<T, E>) -> Outcome {
    match result {
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

pin_project! {
    /// The future of [`CircuitBreaker::call`] and [`CircuitBreaker::call_with`].
    #[must_use = "futures do nothing unless polled"]
    pub struct Call<'a, Fut, O> {
        shared: &'a Shared,
        // Taken on the first poll; `done` once recorded.
        token: Option<Token>,
        outcome: Option<O>,
        #[pin]
        future: Fut,
    }

    impl<'a, Fut, O> PinnedDrop for Call<'a, Fut, O> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(token) = this.token
                && !token.done
            {
                this.shared.abandon(token);
            }
        }
    }
}

impl<T, E, Fut, O> Future for Call<'_, Fut, O>
where
    Fut: Future<Output = Result<T, E>>,
    O: FnOnce(&Result<T, E>) -> Outcome,
{
    type Output = Result<T, BreakerError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let token = match this.token {
            Some(token) => token,
            None => match this.shared.acquire(true) {
                Ok(token) => this.token.insert(token),
                Err(rejected) => return Poll::Ready(Err(BreakerError::Rejected(rejected))),
            },
        };
        let result = match this.future.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => return Poll::Pending,
        };
        if let Some(outcome) = this.outcome.take() {
            this.shared.finish(token, outcome(&result), None);
        }
        Poll::Ready(result.map_err(BreakerError::Inner))
    }
}

impl<Fut, O> fmt::Debug for Call<'_, Fut, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("breaker", &self.shared.name)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// Permission to run one call through a [`CircuitBreaker`]; record the
/// outcome with [`Permit::record`].
///
/// Dropping it without a record counts as [`Outcome::Ignored`]: nothing is
/// recorded and a half-open probe slot is freed.
#[must_use = "record the outcome, or the call is ignored"]
#[derive(Debug)]
pub struct Permit<'a> {
    shared: &'a Shared,
    token: Token,
}

/// Like [`Permit`], owning a handle to its breaker ([`CircuitBreaker::acquire_owned`]).
#[must_use = "record the outcome, or the call is ignored"]
#[derive(Debug)]
pub struct OwnedPermit {
    shared: Arc<Shared>,
    token: Token,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

macro_rules! permit_methods {
    ($ty:ty) => {
        impl $ty {
            /// Records the outcome, timed from when the permit was acquired.
            #[inline]
            pub fn record(mut self, outcome: Outcome) {
                self.shared.finish(&mut self.token, outcome, None);
            }

            /// Records the outcome with an elapsed time measured by the
            /// caller (it decides whether the call was slow).
            pub fn record_elapsed(mut self, outcome: Outcome, elapsed: Duration) {
                self.shared.finish(&mut self.token, outcome, Some(elapsed));
            }

            /// Records a success.
            pub fn success(self) {
                self.record(Outcome::Success);
            }

            /// Records a failure.
            pub fn failure(self) {
                self.record(Outcome::Failure);
            }

            /// Records nothing and frees a half-open slot (same as dropping).
            pub fn ignore(self) {
                self.record(Outcome::Ignored);
            }

            /// Whether this permit is one of the half-open probes.
            pub fn is_probe(&self) -> bool {
                self.token.kind == Kind::Probe
            }
        }

        impl Drop for $ty {
            fn drop(&mut self) {
                if !self.token.done {
                    self.shared.abandon(&mut self.token);
                }
            }
        }
    };
}

permit_methods!(Permit<'_>);
permit_methods!(OwnedPermit);
