//! A retry budget shared across calls.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Buckets the budget window is divided into; deposits expire a bucket at a time.
const BUCKETS: usize = 10;
/// Fixed-point scale: one retry costs this many units.
const UNIT: i64 = 1000;

/// Limits retries to a fraction of first attempts, across every call that
/// shares it, so that an outage does not multiply load by the attempt count.
///
/// Modelled on tower's `TpsBudget`: each call's first attempt deposits
/// `ratio` of a retry, each retry withdraws one, and deposits expire after
/// `window` (in ten steps). On top, `min_per_second × window` retries are
/// always available so that a quiet service can still retry.
///
/// With `ratio = 0.2`, 1000 calls in the window allow 200 retries plus the
/// reserve: when every call fails, load grows by at most 20 % instead of by
/// `max_attempts`.
///
/// A deposit takes no lock: every call makes one, so a lock there would be
/// taken by every call of every task sharing the budget. Deposits gather in
/// one atomic sum and go into the current bucket when the lock is next taken
/// (a withdrawal, a look at what is available, or the first deposit of a
/// new bucket); one that races with that may be filed a bucket late, and
/// then lives up to a tenth of the window longer.
///
/// ```
/// use std::time::Duration;
/// use pgstack_resilience::RetryBudget;
///
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5);
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.try_withdraw()); // two first attempts pay for one retry
/// assert!(!budget.try_withdraw());
/// ```
#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    reserve: i64,
    bucket_width: Duration,
    origin: Instant,
    /// The newest bucket's index, as of the last time the lock was taken.
    head: AtomicU64,
    /// Deposits made while `head` was current, not yet in a bucket.
    pending: AtomicI64,
    state: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// Index of the newest bucket (time since `origin` / `bucket_width`).
    head: u64,
    amounts: [i64; BUCKETS],
    sum: i64,
}

impl RetryBudget {
    /// A budget over `window` (at least 1 ms is used) that always allows
    /// `min_per_second` retries per second and beyond that `ratio` retries per
    /// first attempt. `ratio` is clamped to `0..=1000`.
    pub fn new(window: Duration, min_per_second: u32, ratio: f64) -> Self {
        let window = window.max(Duration::from_millis(1));
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1000.0)
        } else {
            0.0
        };
        let reserve = (f64::from(min_per_second) * window.as_secs_f64() * UNIT as f64) as i64;
        RetryBudget {
            deposit: (ratio * UNIT as f64).round() as i64,
            reserve,
            bucket_width: window / BUCKETS as u32,
            origin: Instant::now(),
            head: AtomicU64::new(0),
            pending: AtomicI64::new(0),
            state: Mutex::new(Buckets {
                head: 0,
                amounts: [0; BUCKETS],
                sum: 0,
            }),
        }
    }

    /// Records a first attempt, earning `ratio` of a retry.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    pub(crate) fn deposit_at(&self, now: Instant) {
        if self.deposit == 0 {
            return;
        }
        if bucket_index(now, self.origin, self.bucket_width) <= self.head.load(Ordering::Acquire) {
            self.pending.fetch_add(self.deposit, Ordering::AcqRel);
            return;
        }
        // The first deposit of a new bucket moves the buckets on.
        self.with_buckets(now, |b| {
            b.add(self.deposit);
        });
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    pub(crate) fn try_withdraw_at(&self, now: Instant) -> bool {
        self.with_buckets(now, |b| {
            if self.reserve + b.sum >= UNIT {
                b.add(-UNIT);
                true
            } else {
                false
            }
        })
    }

    /// Retries the budget would allow right now.
    pub fn available(&self) -> u64 {
        self.with_buckets(Instant::now(), |b| {
            u64::try_from((self.reserve + b.sum) / UNIT).unwrap_or(0)
        })
    }

    fn with_buckets<R>(&self, now: Instant, f: impl FnOnce(&mut Buckets) -> R) -> R {
        let index = bucket_index(now, self.origin, self.bucket_width);
        // The critical section never panics, so a poisoned lock still holds
        // consistent numbers.
        let mut buckets = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // Deposits made while the head was current belong to it, before
        // the buckets move on.
        let pending = self.pending.swap(0, Ordering::AcqRel);
        buckets.add(pending);
        buckets.advance(index);
        self.head.store(buckets.head, Ordering::Release);
        f(&mut buckets)
    }
}

impl Buckets {
    fn advance(&mut self, index: u64) {
        if index <= self.head {
            return;
        }
        let steps = (index - self.head).min(BUCKETS as u64);
        for k in 1..=steps {
            let slot = ((self.head + k) % BUCKETS as u64) as usize;
            self.sum -= self.amounts[slot];
            self.amounts[slot] = 0;
        }
        self.head = index;
    }

    fn add(&mut self, amount: i64) {
        let slot = (self.head % BUCKETS as u64) as usize;
        self.amounts[slot] += amount;
        self.sum += amount;
    }
}

fn bucket_index(now: Instant, origin: Instant, width: Duration) -> u64 {
    // 64-bit nanoseconds cover 584 years; u64 division is far cheaper than u128.
    let elapsed =
        u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX);
    let width = u64::try_from(width.as_nanos()).unwrap_or(u64::MAX).max(1);
    elapsed / width
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_min_per_second_times_window() {
        let budget = RetryBudget::new(Duration::from_secs(10), 2, 0.0);
        assert_eq!(budget.available(), 20);
        for _ in 0..20 {
            assert!(budget.try_withdraw());
        }
        assert!(!budget.try_withdraw());
        // Withdrawals expire with the window, then the reserve is whole again.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.available(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_of_first_attempts_and_expiry() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 2);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(budget.available(), 2, "deposits live for the whole window");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(budget.available(), 0, "deposits expire after the window");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_from_many_threads_are_all_counted_and_expire_with_the_window() {
        let budget = std::sync::Arc::new(RetryBudget::new(Duration::from_secs(10), 0, 0.5));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let budget = std::sync::Arc::clone(&budget);
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        budget.deposit_at(budget.origin);
                    }
                })
            })
            .collect();
        for thread in threads {
            assert!(thread.join().is_ok());
        }
        assert_eq!(budget.available(), 1000, "2,000 deposits of half a retry");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(budget.available(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deposit_in_a_new_bucket_moves_the_window_on() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0);
        budget.deposit(); // bucket 0, lock-free
        tokio::time::advance(Duration::from_secs(5)).await;
        budget.deposit(); // bucket 5: files bucket 0's deposit, then its own
        tokio::time::advance(Duration::from_secs(5)).await;
        // Bucket 0 has expired; bucket 5's deposit is still there.
        assert_eq!(budget.available(), 1);
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn withdrawals_stop_when_spent() {
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.5);
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        assert_eq!(budget.available(), 0);
    }
}
