//! Ejection with hysteresis: out after N bad probes in a row, back after M
//! good ones in a row.

/// What [`Hysteresis::observe`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Take the node out of read routing.
    Eject,
    /// Put the node back.
    Restore,
}

/// Counts consecutive bad and good probes of one node and decides when to
/// eject it and when to restore it. Pure: no clock, no I/O; the monitor
/// feeds it one observation per probe.
///
/// ```
/// use pgstack_health::{Hysteresis, Verdict};
///
/// let mut h = Hysteresis::new(3, 2);
/// assert_eq!(h.observe(false), None);
/// assert_eq!(h.observe(false), None);
/// assert_eq!(h.observe(false), Some(Verdict::Eject));
/// assert_eq!(h.observe(true), None); // one good probe is not enough
/// assert_eq!(h.observe(true), Some(Verdict::Restore));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    eject_after: u32,
    restore_after: u32,
    bad_streak: u32,
    good_streak: u32,
    ejected: bool,
}

impl Hysteresis {
    /// Ejects after `eject_after` consecutive bad probes, restores after
    /// `restore_after` consecutive good ones (each at least 1).
    pub fn new(eject_after: u32, restore_after: u32) -> Self {
        Hysteresis {
            eject_after: eject_after.max(1),
            restore_after: restore_after.max(1),
            bad_streak: 0,
            good_streak: 0,
            ejected: false,
        }
    }

    /// Records one probe (`good`: answered, and within the lag limit);
    /// returns a verdict when the node's state changes.
    pub fn observe(&mut self, good: bool) -> Option<Verdict> {
        if good {
            self.bad_streak = 0;
            self.good_streak = self.good_streak.saturating_add(1);
            if self.ejected && self.good_streak >= self.restore_after {
                self.ejected = false;
                return Some(Verdict::Restore);
            }
        } else {
            self.good_streak = 0;
            self.bad_streak = self.bad_streak.saturating_add(1);
            if !self.ejected && self.bad_streak >= self.eject_after {
                self.ejected = true;
                return Some(Verdict::Eject);
            }
        }
        None
    }

    /// Whether the node is ejected.
    pub fn is_ejected(&self) -> bool {
        self.ejected
    }

    /// Consecutive bad probes so far.
    pub fn bad_streak(&self) -> u32 {
        self.bad_streak
    }

    /// Consecutive good probes so far.
    pub fn good_streak(&self) -> u32 {
        self.good_streak
    }

    /// Forgets everything (the node became the primary, which is never
    /// ejected).
    pub fn reset(&mut self) {
        *self = Hysteresis::new(self.eject_after, self.restore_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternating_probes_never_flap() {
        let mut h = Hysteresis::new(3, 2);
        for _ in 0..20 {
            assert_eq!(h.observe(false), None);
            assert_eq!(h.observe(true), None);
        }
        assert!(!h.is_ejected());
        // Once ejected, alternating probes keep it out.
        for _ in 0..3 {
            h.observe(false);
        }
        assert!(h.is_ejected());
        for _ in 0..20 {
            assert_eq!(h.observe(true), None);
            assert_eq!(h.observe(false), None);
        }
        assert!(h.is_ejected());
    }

    #[test]
    fn ejects_once_and_restores_once() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Verdict::Eject));
        assert_eq!(h.observe(false), None, "already ejected");
        assert_eq!(h.bad_streak(), 3);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Verdict::Restore));
        assert_eq!(h.observe(true), None, "already restored");
        assert_eq!(h.good_streak(), 4);
    }

    #[test]
    fn zero_counts_mean_one() {
        let mut h = Hysteresis::new(0, 0);
        assert_eq!(h.observe(false), Some(Verdict::Eject));
        assert_eq!(h.observe(true), Some(Verdict::Restore));
    }

    #[test]
    fn reset_forgets_the_ejection() {
        let mut h = Hysteresis::new(1, 5);
        h.observe(false);
        assert!(h.is_ejected());
        h.reset();
        assert!(!h.is_ejected());
        assert_eq!(h.bad_streak(), 0);
    }
}
