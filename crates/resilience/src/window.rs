//! Sliding windows of call outcomes for the circuit breaker.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets a time-based window is divided into.
pub(crate) const TIME_BUCKETS: usize = 20;

/// Calls, failures and slow calls in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

impl Totals {
    fn add(&mut self, code: u8) {
        self.calls += 1;
        self.failures += u32::from(code & FAILED != 0);
        self.slow += u32::from(code & SLOW != 0);
    }

    fn sub(&mut self, other: &Totals) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

/// Outcome bits stored per call.
pub(crate) const FAILED: u8 = 1;
pub(crate) const SLOW: u8 = 2;
const FILLED: u8 = 4;

#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

impl Window {
    pub(crate) fn count(size: u32) -> Self {
        Window::Count(CountWindow {
            slots: vec![0; size.max(1) as usize].into_boxed_slice(),
            next: 0,
            totals: Totals::default(),
        })
    }

    pub(crate) fn time(duration: Duration, origin: Instant) -> Self {
        let width = (duration / TIME_BUCKETS as u32).max(Duration::from_nanos(1));
        Window::Time(TimeWindow {
            buckets: Box::new([(0, Totals::default()); TIME_BUCKETS]),
            width_nanos: u64::try_from(width.as_nanos()).unwrap_or(u64::MAX),
            origin,
            head: 0,
            totals: Totals::default(),
        })
    }

    /// Records one call (`code` = FAILED | SLOW bits) at `now`.
    pub(crate) fn record(&mut self, code: u8, now: Instant) -> Totals {
        match self {
            Window::Count(w) => w.record(code),
            Window::Time(w) => w.record(code, now),
        }
    }

    /// The totals as of `now` (a time window drops expired buckets first).
    pub(crate) fn totals(&mut self, now: Instant) -> Totals {
        match self {
            Window::Count(w) => w.totals,
            Window::Time(w) => {
                w.advance(now);
                w.totals
            }
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            Window::Count(w) => {
                w.slots.fill(0);
                w.next = 0;
                w.totals = Totals::default();
            }
            Window::Time(w) => {
                *w.buckets = [(0, Totals::default()); TIME_BUCKETS];
                w.totals = Totals::default();
            }
        }
    }
}

/// The last `size` calls, as a ring buffer.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[u8]>,
    next: usize,
    totals: Totals,
}

impl CountWindow {
    fn record(&mut self, code: u8) -> Totals {
        let old = self.slots[self.next];
        if old & FILLED != 0 {
            self.totals.calls -= 1;
            self.totals.failures -= u32::from(old & FAILED != 0);
            self.totals.slow -= u32::from(old & SLOW != 0);
        }
        self.slots[self.next] = code | FILLED;
        self.next += 1;
        if self.next == self.slots.len() {
            self.next = 0;
        }
        self.totals.add(code);
        self.totals
    }
}

/// The calls of the current bucket and the `TIME_BUCKETS - 1` before it.
/// Buckets are `duration / TIME_BUCKETS` wide, aligned to the breaker's creation.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    /// (bucket index, totals) per slot.
    buckets: Box<[(u64, Totals); TIME_BUCKETS]>,
    width_nanos: u64,
    origin: Instant,
    head: u64,
    totals: Totals,
}

impl TimeWindow {
    fn index(&self, now: Instant) -> u64 {
        // 64-bit nanoseconds cover 584 years; u64 division is far cheaper than u128.
        let elapsed = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        elapsed / self.width_nanos
    }

    fn advance(&mut self, now: Instant) {
        let index = self.index(now);
        if index <= self.head {
            return;
        }
        let steps = (index - self.head).min(TIME_BUCKETS as u64);
        for k in 1..=steps {
            let slot = ((self.head + k) % TIME_BUCKETS as u64) as usize;
            let (_, old) = self.buckets[slot];
            self.totals.sub(&old);
            self.buckets[slot] = (self.head + k, Totals::default());
        }
        self.head = index;
    }

    fn record(&mut self, code: u8, now: Instant) -> Totals {
        // A call measured a moment before another thread advanced the window
        // lands in the newest bucket.
        self.advance(now);
        let slot = (self.head % TIME_BUCKETS as u64) as usize;
        self.buckets[slot].0 = self.head;
        self.buckets[slot].1.add(code);
        self.totals.add(code);
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_forgets_the_oldest_call() {
        let mut w = Window::count(3);
        let now = Instant::now();
        w.record(FAILED, now);
        w.record(SLOW, now);
        let t = w.record(0, now);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        let t = w.record(0, now);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 0,
                slow: 1
            }
        );
        w.record(0, now);
        let t = w.record(FAILED | SLOW, now);
        assert_eq!(
            t,
            Totals {
                calls: 3,
                failures: 1,
                slow: 1
            }
        );
        w.clear();
        assert_eq!(w.totals(now), Totals::default());
    }

    #[tokio::test(start_paused = true)]
    async fn time_window_expires_buckets() {
        let origin = Instant::now();
        let mut w = Window::time(Duration::from_secs(20), origin);
        w.record(FAILED, origin);
        tokio::time::advance(Duration::from_millis(10_500)).await;
        let t = w.record(0, Instant::now());
        assert_eq!(
            t,
            Totals {
                calls: 2,
                failures: 1,
                slow: 0
            }
        );
        // Bucket 0 (0..1s) leaves the window when bucket 20 (20..21s) begins.
        tokio::time::advance(Duration::from_millis(9_499)).await;
        assert_eq!(w.totals(Instant::now()).calls, 2);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            w.totals(Instant::now()),
            Totals {
                calls: 1,
                failures: 0,
                slow: 0
            }
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(w.totals(Instant::now()), Totals::default());
    }
}
