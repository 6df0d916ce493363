//! Property test: the breaker against a simple reference model, driven by
//! random outcomes, call durations, held permits and clock steps on tokio's
//! paused clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgstack_config::{CircuitBreakerSettings, SlidingWindow};
use pgstack_resilience::{BreakerState, CircuitBreaker, Outcome, OwnedPermit};
use proptest::prelude::*;
use tokio::time::{Instant, advance};

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}
/// Buckets of a time window (documented in docs/resilience.md).
const BUCKETS: u64 = 20;

#[derive(Clone, Debug)]
enum Op {
    /// Acquire, let `ms` pass, record.
    Call(Outcome, u64),
    /// Acquire and hold the permit.
    Acquire,
    /// Record a held permit (index modulo the number held).
    Finish(usize, Outcome),
    /// Drop a held permit without recording.
    Drop(usize),
    Advance(u64),
    ProbeNow,
    ForceOpen,
    ForceClosed,
    Reset,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        3 => Just(Outcome::Success),
        3 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (outcome(), 0u64..300).prop_map(|(o, ms)| Op::Call(o, ms)),
        4 => (0u64..3000).prop_map(Op::Advance),
        2 => Just(Op::Acquire),
        2 => (0usize..8, outcome()).prop_map(|(i, o)| Op::Finish(i, o)),
        1 => (0usize..8).prop_map(Op::Drop),
        1 => Just(Op::ProbeNow),
        1 => prop_oneof![Just(Op::ForceOpen), Just(Op::ForceClosed), Just(Op::Reset)],
    ]
}

fn settings() -> impl Strategy<Value = CircuitBreakerSettings> {
    (
        prop_oneof![Just(0.25), Just(0.5), Just(0.75), Just(1.0)],
        prop_oneof![Just(0.5), Just(1.0)],
        1u32..7,
        prop_oneof![
            (1u32..9).prop_map(|n| (SlidingWindow::Count, n, 1000)),
            prop_oneof![Just(1000u64), Just(2000)].prop_map(|ms| (SlidingWindow::Time, 10, ms)),
        ],
        100u64..2000,
        prop_oneof![Just(1.0), Just(2.0), Just(1.5)],
        1u32..4,
    )
        .prop_map(
            |(fail, slow, min, (kind, size, window_ms), open_ms, mult, probes)| {
                CircuitBreakerSettings {
                    failure_rate_threshold: fail,
                    slow_call_detection: true,
                    slow_call_rate_threshold: slow,
                    slow_call_duration: millis(100),
                    minimum_calls: min,
                    sliding_window: kind,
                    window_size: size,
                    window_duration: millis(window_ms),
                    open_duration: millis(open_ms),
                    open_duration_multiplier: mult,
                    max_open_duration: millis(4000),
                    half_open_probes: probes,
                }
            },
        )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Call,
    Probe,
    Untracked,
}

#[derive(Clone, Copy, Debug)]
struct ModelPermit {
    epoch: u64,
    kind: Kind,
    started: u64,
}

/// The reference: a list of recorded calls, filtered on demand.
struct Model {
    s: CircuitBreakerSettings,
    now: u64,
    state: BreakerState,
    epoch: u64,
    /// (time ms, failed, slow) of the calls recorded since the window was cleared.
    records: Vec<(u64, bool, bool)>,
    /// Offset from the origin.
    probe_at: Option<Duration>,
    trips: u32,
    in_flight: u32,
    succeeded: u32,
    slow_probes: u32,
    rejected: u64,
}

impl Model {
    fn new(s: CircuitBreakerSettings) -> Self {
        Model {
            s,
            now: 0,
            state: BreakerState::Closed,
            epoch: 0,
            records: Vec::new(),
            probe_at: None,
            trips: 0,
            in_flight: 0,
            succeeded: 0,
            slow_probes: 0,
            rejected: 0,
        }
    }

    fn window(&self) -> Vec<(u64, bool, bool)> {
        match self.s.sliding_window {
            SlidingWindow::Count => {
                let n = self.s.window_size as usize;
                self.records[self.records.len().saturating_sub(n)..].to_vec()
            }
            SlidingWindow::Time => {
                let width = self.s.window_duration.as_millis() as u64 / BUCKETS;
                let current = self.now / width;
                self.records
                    .iter()
                    .copied()
                    .filter(|(t, ..)| t / width + BUCKETS > current)
                    .collect()
            }
        }
    }

    fn totals(&self) -> (u32, u32, u32) {
        let w = self.window();
        let count = |f: fn(&(u64, bool, bool)) -> bool| w.iter().filter(|r| f(r)).count() as u32;
        (w.len() as u32, count(|r| r.1), count(|r| r.2))
    }

    /// open_duration × multiplier^(trips-1), to the nanosecond, capped.
    fn open_for(&self, trips: u32) -> Duration {
        let base = self.s.open_duration.as_nanos() as f64;
        let grown = (base * self.s.open_duration_multiplier.powi(trips as i32 - 1)).round() as u64;
        Duration::from_nanos(grown).min(self.s.max_open_duration)
    }

    fn transition(&mut self, to: BreakerState) {
        self.state = to;
        self.epoch += 1;
        self.probe_at = None;
        match to {
            BreakerState::Open => {
                self.trips += 1;
                self.probe_at = Some(millis(self.now) + self.open_for(self.trips));
            }
            BreakerState::HalfOpen => {
                self.in_flight = 0;
                self.succeeded = 0;
                self.slow_probes = 0;
            }
            _ => self.records.clear(),
        }
    }

    fn acquire(&mut self) -> Result<ModelPermit, (BreakerState, Option<Duration>)> {
        let permit = |m: &Model, kind| ModelPermit {
            epoch: m.epoch,
            kind,
            started: m.now,
        };
        match self.state {
            BreakerState::Closed => Ok(permit(self, Kind::Call)),
            BreakerState::ForcedClosed => Ok(permit(self, Kind::Untracked)),
            BreakerState::ForcedOpen => {
                self.rejected += 1;
                Err((BreakerState::ForcedOpen, None))
            }
            BreakerState::Open if millis(self.now) < self.probe_at.unwrap() => {
                self.rejected += 1;
                Err((BreakerState::Open, self.probe_at))
            }
            BreakerState::Open => {
                self.transition(BreakerState::HalfOpen);
                self.in_flight = 1;
                Ok(permit(self, Kind::Probe))
            }
            BreakerState::HalfOpen if self.in_flight + self.succeeded < self.s.half_open_probes => {
                self.in_flight += 1;
                Ok(permit(self, Kind::Probe))
            }
            BreakerState::HalfOpen => {
                self.rejected += 1;
                Err((BreakerState::HalfOpen, None))
            }
            other => panic!("unexpected state {other:?}"),
        }
    }

    fn record(&mut self, p: ModelPermit, outcome: Outcome) {
        if p.kind == Kind::Untracked || p.epoch != self.epoch {
            return;
        }
        let slow = self.now - p.started > self.s.slow_call_duration.as_millis() as u64;
        match (self.state, p.kind) {
            (BreakerState::Closed, Kind::Call) => {
                if outcome == Outcome::Ignored {
                    return;
                }
                self.records
                    .push((self.now, outcome == Outcome::Failure, slow));
                let (calls, failed, slow) = self.totals();
                let minimum = match self.s.sliding_window {
                    SlidingWindow::Count => self.s.minimum_calls.min(self.s.window_size),
                    SlidingWindow::Time => self.s.minimum_calls,
                };
                if calls >= minimum
                    && (failed as f64 >= self.s.failure_rate_threshold * calls as f64
                        || slow as f64 >= self.s.slow_call_rate_threshold * calls as f64)
                {
                    self.transition(BreakerState::Open);
                }
            }
            (BreakerState::HalfOpen, Kind::Probe) => {
                self.in_flight -= 1;
                match outcome {
                    Outcome::Failure => self.transition(BreakerState::Open),
                    Outcome::Success => {
                        self.succeeded += 1;
                        self.slow_probes += slow as u32;
                        if self.succeeded >= self.s.half_open_probes {
                            if self.slow_probes as f64
                                >= self.s.slow_call_rate_threshold * self.succeeded as f64
                            {
                                self.transition(BreakerState::Open);
                            } else {
                                self.trips = 0;
                                self.transition(BreakerState::Closed);
                            }
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn permits_calls(&self) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::ForcedClosed => true,
            BreakerState::ForcedOpen => false,
            BreakerState::Open => millis(self.now) >= self.probe_at.unwrap(),
            _ => self.in_flight + self.succeeded < self.s.half_open_probes,
        }
    }

    fn drop_permit(&mut self, p: ModelPermit) {
        if p.kind == Kind::Probe && p.epoch == self.epoch && self.state == BreakerState::HalfOpen {
            self.in_flight -= 1;
        }
    }
}

fn check_acquire(
    got: &Result<OwnedPermit, pgstack_resilience::Rejected>,
    want: &Result<ModelPermit, (BreakerState, Option<Duration>)>,
    origin: Instant,
    step: usize,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(p), Ok(m)) => prop_assert_eq!(p.is_probe(), m.kind == Kind::Probe, "step {}", step),
        (Err(r), Err((state, probe_at))) => {
            prop_assert_eq!(r.state, *state, "step {}", step);
            prop_assert_eq!(r.probe_at, probe_at.map(|d| origin + d), "step {}", step);
        }
        (got, want) => prop_assert!(
            false,
            "step {}: breaker {:?}, model {:?}",
            step,
            got.as_ref().map(|p| p.is_probe()),
            want
        ),
    }
    Ok(())
}

fn run(s: CircuitBreakerSettings, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let breaker = CircuitBreaker::new("model", &s).unwrap();
        let origin = Instant::now();
        let mut model = Model::new(s);
        let mut held: Vec<(OwnedPermit, ModelPermit)> = Vec::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Call(outcome, ms) => {
                    let got = breaker.acquire_owned();
                    let want = model.acquire();
                    check_acquire(&got, &want, origin, step)?;
                    if let (Ok(p), Ok(m)) = (got, want) {
                        advance(millis(ms)).await;
                        model.now += ms;
                        p.record(outcome);
                        model.record(m, outcome);
                    }
                }
                Op::Acquire => {
                    let got = breaker.acquire_owned();
                    let want = model.acquire();
                    check_acquire(&got, &want, origin, step)?;
                    if let (Ok(p), Ok(m)) = (got, want) {
                        held.push((p, m));
                    }
                }
                Op::Finish(i, outcome) if !held.is_empty() => {
                    let (p, m) = held.remove(i % held.len());
                    p.record(outcome);
                    model.record(m, outcome);
                }
                Op::Drop(i) if !held.is_empty() => {
                    let (p, m) = held.remove(i % held.len());
                    drop(p);
                    model.drop_permit(m);
                }
                Op::Finish(..) | Op::Drop(_) => {}
                Op::Advance(ms) => {
                    advance(millis(ms)).await;
                    model.now += ms;
                }
                Op::ProbeNow => {
                    let want = model.state == BreakerState::Open;
                    if want {
                        model.transition(BreakerState::HalfOpen);
                    }
                    prop_assert_eq!(breaker.probe_now(), want, "step {}", step);
                }
                Op::ForceOpen => {
                    breaker.force_open();
                    if model.state != BreakerState::ForcedOpen {
                        model.transition(BreakerState::ForcedOpen);
                    }
                }
                Op::ForceClosed => {
                    breaker.force_closed();
                    if model.state != BreakerState::ForcedClosed {
                        model.transition(BreakerState::ForcedClosed);
                    }
                }
                Op::Reset => {
                    breaker.reset();
                    model.trips = 0;
                    model.transition(BreakerState::Closed);
                }
            }
            prop_assert_eq!(Instant::now() - origin, millis(model.now));
            prop_assert_eq!(
                breaker.permits_calls(),
                model.permits_calls(),
                "step {}",
                step
            );
            let snap = breaker.snapshot();
            prop_assert_eq!(snap.state, model.state, "step {}", step);
            let (calls, failed, slow) = model.totals();
            prop_assert_eq!(
                (snap.calls, snap.failed_calls, snap.slow_calls),
                (calls, failed, slow),
                "step {}",
                step
            );
            prop_assert_eq!(snap.consecutive_trips, model.trips, "step {}", step);
            prop_assert_eq!(snap.rejected_calls, model.rejected, "step {}", step);
            prop_assert_eq!(
                snap.probe_at,
                model.probe_at.map(|d| origin + d),
                "step {}",
                step
            );
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn breaker_matches_the_reference_model(s in settings(), ops in prop::collection::vec(op(), 1..120)) {
        run(s, ops)?;
    }
}
