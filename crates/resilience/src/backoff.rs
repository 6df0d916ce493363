//! Exponential backoff with jitter.

use std::time::Duration;

use pgstack_config::Jitter;
use rand::Rng;

/// Delays between attempts: exponential growth from `initial` by `multiplier`,
/// capped at `max`, with [`Jitter`] applied.
///
/// Retry `n` (the wait before attempt `n + 1`) has the base delay
/// `min(max, initial × multiplier^(n-1))`. Jitter then picks the actual delay:
///
/// | jitter | delay |
/// |---|---|
/// | `None` | the base delay |
/// | `Full` | uniform in `[0, base]` |
/// | `Equal` | `base/2` + uniform in `[0, base/2]` |
/// | `Decorrelated` | uniform in `[initial, 3 × previous delay]`, capped at `max` |
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff; `multiplier` below 1 (or not finite) is treated as 1 and a
    /// `max` below `initial` as `initial`.
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: Jitter) -> Self {
        let multiplier = if multiplier.is_finite() && multiplier >= 1.0 {
            multiplier
        } else {
            1.0
        };
        Backoff {
            initial,
            max: max.max(initial),
            multiplier,
            jitter,
        }
    }

    /// The delay before the first retry.
    pub fn initial(&self) -> Duration {
        self.initial
    }

    /// The upper bound of every delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The jitter in use.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// The delay before retry `retry` (1 for the first retry) without jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(i32::MAX as u32) as i32;
        grow(self.initial, self.multiplier, exponent, self.max)
    }

    /// The delay before retry `retry` (1 for the first retry), with jitter
    /// drawn from the thread's random generator. `previous` is the delay used
    /// before the previous retry (ignored except by decorrelated jitter; pass
    /// [`Duration::ZERO`] for the first retry).
    pub fn delay(&self, retry: u32, previous: Duration) -> Duration {
        self.delay_with(retry, previous, &mut rand::rng())
    }

    pub(crate) fn delay_with<R: Rng + ?Sized>(
        &self,
        retry: u32,
        previous: Duration,
        rng: &mut R,
    ) -> Duration {
        match self.jitter {
            Jitter::None => self.base_delay(retry),
            Jitter::Full => uniform(rng, Duration::ZERO, self.base_delay(retry)),
            Jitter::Equal => {
                let half = self.base_delay(retry) / 2;
                half + uniform(rng, Duration::ZERO, half)
            }
            Jitter::Decorrelated => {
                let previous = previous.max(self.initial);
                let upper = previous.saturating_mul(3).min(self.max);
                uniform(rng, self.initial.min(upper), upper)
            }
        }
    }
}

/// `base × multiplier^exponent`, capped at `max`, rounded to the nanosecond
/// (so 100 ms × 2³ is exactly 800 ms).
pub(crate) fn grow(base: Duration, multiplier: f64, exponent: i32, max: Duration) -> Duration {
    let nanos = base.as_nanos() as f64 * multiplier.powi(exponent);
    if !nanos.is_finite() || nanos >= max.as_nanos() as f64 {
        max
    } else {
        Duration::from_nanos(nanos.round() as u64).min(max)
    }
}

/// A uniform duration in `[low, high]` (nanosecond resolution).
fn uniform<R: Rng + ?Sized>(rng: &mut R, low: Duration, high: Duration) -> Duration {
    if high <= low {
        return low;
    }
    let low_ns = low.as_nanos().min(u64::MAX as u128) as u64;
    let high_ns = high.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rng.random_range(low_ns..=high_ns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn exponential_without_jitter_is_exact_and_capped() {
        let b = Backoff::new(100 * MS, 5000 * MS, 2.0, Jitter::None);
        let delays: Vec<_> = (1..=8).map(|n| b.delay(n, Duration::ZERO)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(|ms| ms * MS)
        );
        assert_eq!(b.base_delay(u32::MAX), 5000 * MS);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        for jitter in [Jitter::Full, Jitter::Equal] {
            let b = Backoff::new(100 * MS, 5000 * MS, 2.0, jitter);
            for n in 1..10 {
                let base = b.base_delay(n);
                let low = if jitter == Jitter::Equal {
                    base / 2
                } else {
                    Duration::ZERO
                };
                for _ in 0..200 {
                    let d = b.delay_with(n, Duration::ZERO, &mut rng);
                    assert!(
                        d >= low && d <= base,
                        "{jitter:?} retry {n}: {d:?} not in [{low:?}, {base:?}]"
                    );
                }
            }
        }
    }

    #[test]
    fn full_jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = Backoff::new(1000 * MS, 5000 * MS, 2.0, Jitter::Full);
        let below_half = (0..1000)
            .filter(|_| b.delay_with(1, Duration::ZERO, &mut rng) < 500 * MS)
            .count();
        assert!(
            (400..600).contains(&below_half),
            "{below_half} of 1000 below half"
        );
    }

    #[test]
    fn decorrelated_jitter_grows_from_the_previous_delay() {
        let mut rng = StdRng::seed_from_u64(3);
        let b = Backoff::new(100 * MS, 5000 * MS, 2.0, Jitter::Decorrelated);
        let mut previous = Duration::ZERO;
        for n in 1..50 {
            let d = b.delay_with(n, previous, &mut rng);
            let upper = (previous.max(100 * MS) * 3).min(5000 * MS);
            assert!(
                d >= 100 * MS && d <= upper,
                "{d:?} not in [100ms, {upper:?}]"
            );
            previous = d;
        }
    }

    #[test]
    fn odd_inputs_are_tamed() {
        let b = Backoff::new(200 * MS, 100 * MS, f64::NAN, Jitter::None);
        assert_eq!(b.max(), 200 * MS);
        assert_eq!(b.delay(5, Duration::ZERO), 200 * MS);
        let huge = Backoff::new(Duration::MAX, Duration::MAX, 10.0, Jitter::Equal);
        assert!(huge.delay(3, Duration::ZERO) <= Duration::MAX);
    }
}
