//! A node's shared connections ("lanes"): pooled connections that many
//! autocommit statements use at once (tokio-postgres pipelines them), and
//! the rule that keeps a statement from queueing behind a long one.
//!
//! Replies on one connection come back in order, so a statement sent to a
//! lane waits for everything sent before it. A lane is therefore chosen by
//! the work in flight on it: an idle lane first, else the one with the
//! fewest statements in flight among those that made progress (a reply
//! arrived) within the busy threshold; a lane with work in flight and no
//! reply for longer than that is stuck behind a long statement and is
//! passed over. A statement whose duration is not known yet (its text has
//! not run here) goes only to an idle lane, and a lane carrying one counts as
//! busy until it is answered. When every lane is busy the statement takes a
//! connection of its own.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgstack_pool::PooledConnection;
use tokio::time::Instant;

use crate::error::Error;

/// A shared connection.
pub(crate) struct Lane {
    pub(crate) conn: PooledConnection,
    retired: AtomicBool,
    /// Statements sent and not yet answered (low 32 bits), and of those,
    /// the ones of unknown length (high 32 bits): one word, so that taking a
    /// place on the lane and checking who is on it is one atomic step.
    state: AtomicU64,
    /// When the lane last made progress (a reply arrived, or work arrived
    /// while it was idle), in nanoseconds since `epoch`.
    progress: AtomicU64,
    epoch: Instant,
}

const ONE_UNKNOWN: u64 = 1 << 32;

fn in_flight(state: u64) -> u32 {
    (state & 0xFFFF_FFFF) as u32
}

fn unknown(state: u64) -> u32 {
    (state >> 32) as u32
}

impl Lane {
    /// Not retired, not closed, within its lifetime and of the pool's
    /// current generation.
    fn usable(&self) -> bool {
        !self.retired.load(Ordering::Acquire) && !self.conn.should_be_replaced()
    }

    /// Takes the lane out of use (it broke, timed out, or its role changed).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes a place for a statement sent at `now`: a known-short one
    /// joins unless a statement of unknown length is on the lane; one of
    /// unknown length only takes an idle lane.
    fn reserve(self: &Arc<Self>, now: u64, known_short: bool) -> Option<Reserved> {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let next = if known_short {
                if unknown(state) > 0 {
                    return None;
                }
                state + 1
            } else {
                if state != 0 {
                    return None;
                }
                1 + ONE_UNKNOWN
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if in_flight(state) == 0 {
                        self.progress.store(now, Ordering::Release);
                    }
                    return Some(Reserved {
                        lane: Arc::clone(self),
                        sent: now,
                        unknown: !known_short,
                    });
                }
                Err(actual) => state = actual,
            }
        }
    }
}

/// A statement's place on a lane, taken by [`Lanes::pick`]; given back when
/// dropped. [`Reserved::done`] records the reply.
pub(crate) struct Reserved {
    pub(crate) lane: Arc<Lane>,
    sent: u64,
    unknown: bool,
}

impl Reserved {
    /// The reply arrived at `at`: the lane made progress. Returns how long
    /// the server spent on this statement: from the reply before it (or from
    /// when it was sent, if later) to its own, so time spent queued behind
    /// other callers' statements does not count.
    pub(crate) fn done(self, at: Instant) -> Duration {
        let at = self.lane.nanos(at);
        let previous = self.lane.progress.swap(at, Ordering::AcqRel);
        Duration::from_nanos(at.saturating_sub(previous.max(self.sent)))
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let place = if self.unknown { 1 + ONE_UNKNOWN } else { 1 };
        self.lane.state.fetch_sub(place, Ordering::AcqRel);
    }
}

struct Slot {
    lane: Mutex<Option<Arc<Lane>>>,
    refill: tokio::sync::Mutex<()>,
    /// Attempts to open this slot's connection that timed out.
    failures: AtomicU64,
}

/// Where a statement should go.
pub(crate) enum Pick {
    /// This lane; the place on it is taken.
    Lane(Reserved),
    /// Open a lane in this (empty) slot.
    Open(usize),
    /// Every lane is busy: take a connection of its own.
    Busy,
}

/// A node's lanes.
pub(crate) struct Lanes {
    slots: Box<[Slot]>,
    next: AtomicUsize,
    busy_after: Duration,
}

impl Lanes {
    pub(crate) fn new(count: usize, busy_after: Duration) -> Self {
        Lanes {
            slots: (0..count)
                .map(|_| Slot {
                    lane: Mutex::new(None),
                    refill: tokio::sync::Mutex::new(()),
                    failures: AtomicU64::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
            busy_after,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.slots.is_empty()
    }

    /// How long a lane may go without a reply, with work in flight, before
    /// it counts as busy; statements that usually take longer take a
    /// connection of their own.
    pub(crate) fn busy_after(&self) -> Duration {
        self.busy_after
    }

    /// Chooses where a statement starting `now` goes, and takes its place
    /// there; `known_short`: its text has run here and usually takes less
    /// than the busy threshold (else it may only have an idle lane to
    /// itself).
    pub(crate) fn pick(&self, now: Instant, known_short: bool) -> Pick {
        let count = self.slots.len();
        if count == 0 {
            return Pick::Busy;
        }
        let busy_after = u64::try_from(self.busy_after.as_nanos()).unwrap_or(u64::MAX);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // A place taken by someone else between looking and taking: look
        // again, a few times.
        for _ in 0..3 {
            let mut best: Option<(u32, Arc<Lane>)> = None;
            let mut empty = None;
            for k in 0..count {
                let index = (start + k) % count;
                let current = lock(&self.slots[index].lane);
                let Some(lane) = current.as_ref().filter(|l| l.usable()) else {
                    empty.get_or_insert(index);
                    continue;
                };
                let state = lane.state.load(Ordering::Acquire);
                let at = lane.nanos(now);
                if state == 0 {
                    if let Some(place) = lane.reserve(at, known_short) {
                        return Pick::Lane(place);
                    }
                    continue;
                }
                if !known_short || unknown(state) > 0 {
                    // Nothing may queue behind a statement of unknown length,
                    // and one of unknown length queues behind nothing.
                    continue;
                }
                let progress = lane.progress.load(Ordering::Acquire);
                if at.saturating_sub(progress) > busy_after {
                    // Work in flight and no reply for a while: stuck behind a
                    // long statement.
                    continue;
                }
                let n = in_flight(state);
                if best.as_ref().is_none_or(|(m, _)| n < *m) {
                    best = Some((n, Arc::clone(lane)));
                }
            }
            // No idle lane: open another one before piling onto a busy one.
            if let Some(slot) = empty {
                return Pick::Open(slot);
            }
            match best {
                Some((_, lane)) => {
                    if let Some(place) = lane.reserve(lane.nanos(now), known_short) {
                        return Pick::Lane(place);
                    }
                }
                None => return Pick::Busy,
            }
        }
        Pick::Busy
    }

    /// Takes a place on `lane` (just opened) for a statement sent at `now`.
    pub(crate) fn reserve(
        &self,
        lane: &Arc<Lane>,
        now: Instant,
        known_short: bool,
    ) -> Option<Reserved> {
        lane.reserve(lane.nanos(now), known_short)
    }

    pub(crate) fn retire_all(&self) {
        for slot in self.slots.iter() {
            let lane = lock(&slot.lane).take();
            if let Some(lane) = lane {
                lane.retire();
            }
        }
    }

    /// A usable lane in slot `index`, opening one (from the node's pool) when
    /// the slot is empty or its lane broke. `open` checks a new connection
    /// out.
    ///
    /// Opening is single-flight per slot: callers that queued behind an
    /// attempt that timed out get `queued_failure()` at once instead of
    /// trying again one after the other (each would wait out the timeout).
    pub(crate) async fn open<F, Fut>(
        &self,
        index: usize,
        open: F,
        queued_failure: impl FnOnce() -> Error,
    ) -> Result<Arc<Lane>, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<PooledConnection, Error>>,
    {
        let Some(slot) = self.slots.get(index) else {
            return Err(Error::Config("no shared connections configured".to_owned()));
        };
        let failures_seen = slot.failures.load(Ordering::Acquire);
        let _refilling = slot.refill.lock().await;
        {
            let mut current = lock(&slot.lane);
            if let Some(lane) = current.as_ref() {
                if lane.usable() {
                    return Ok(Arc::clone(lane));
                }
                lane.retire();
                *current = None;
            }
        }
        if slot.failures.load(Ordering::Acquire) != failures_seen {
            return Err(queued_failure());
        }
        let mut conn = match open().await {
            Ok(conn) => conn,
            Err(error) => {
                // Only slow failures (the node did not answer in time) are
                // shared with the queue; a quick one (refused, reset) costs
                // the next caller little to try again.
                if matches!(error, Error::Unavailable { .. } | Error::PoolTimeout { .. }) {
                    slot.failures.fetch_add(1, Ordering::AcqRel);
                }
                return Err(error);
            }
        };
        // Held on purpose for as long as it stays usable.
        conn.exempt_from_leak_detection();
        let lane = Arc::new(Lane {
            conn,
            retired: AtomicBool::new(false),
            state: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        *lock(&slot.lane) = Some(Arc::clone(&lane));
        Ok(lane)
    }

    /// Takes `lane` out of its slot (if still there) and out of use.
    pub(crate) fn retire(&self, lane: &Arc<Lane>) {
        lane.retire();
        for slot in self.slots.iter() {
            let mut current = lock(&slot.lane);
            if current.as_ref().is_some_and(|l| Arc::ptr_eq(l, lane)) {
                *current = None;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
