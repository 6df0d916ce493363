//! Leak detection: checkouts held longer than a threshold are logged once,
//! with the operation that took them (as HikariCP's `leakDetectionThreshold`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::status::Stats;

struct Entry {
    operation: Cow<'static, str>,
    since: Instant,
    reported: bool,
}

/// The checkouts currently held, when leak detection is on.
pub(crate) struct Leaks {
    threshold: Option<Duration>,
    next: AtomicU64,
    held: Mutex<HashMap<u64, Entry>>,
}

impl Leaks {
    pub(crate) fn new(threshold: Option<Duration>) -> Self {
        Leaks {
            threshold,
            next: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a checkout; `None` when leak detection is off.
    /// `operation` is called only when leak detection is on.
    pub(crate) fn register(
        &self,
        operation: impl FnOnce() -> Cow<'static, str>,
        since: Instant,
    ) -> Option<u64> {
        self.threshold?;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            operation: operation(),
            since,
            reported: false,
        };
        self.lock().insert(key, entry);
        Some(key)
    }

    /// The checkout ended.
    pub(crate) fn unregister(&self, key: u64, node: &str) {
        let entry = self.lock().remove(&key);
        if let Some(entry) = entry.filter(|e| e.reported) {
            tracing::info!(
                node,
                operation = %entry.operation,
                held_for = ?entry.since.elapsed(),
                "a connection reported as a possible leak was returned"
            );
        }
    }

    /// Logs every checkout held past the threshold that was not logged yet.
    pub(crate) fn scan(&self, node: &str, stats: &Stats) -> usize {
        let Some(threshold) = self.threshold else {
            return 0;
        };
        let now = Instant::now();
        let mut found = 0;
        let mut held = self.lock();
        for entry in held.values_mut() {
            let held_for = now.saturating_duration_since(entry.since);
            if !entry.reported && held_for >= threshold {
                entry.reported = true;
                found += 1;
                stats.leaked();
                tracing::warn!(
                    node,
                    operation = %entry.operation,
                    held_for = ?held_for,
                    threshold = ?threshold,
                    "connection held longer than the leak detection threshold; possible leak"
                );
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_checkout_past_the_threshold_is_reported_once() {
        let node: Arc<str> = "test-node".into();
        let stats = Stats::new(&node, 4);
        let leaks = Leaks::new(Some(Duration::from_secs(5)));
        let held = leaks.register(|| "fetch-bills".into(), Instant::now());
        let returned = leaks.register(|| "quick".into(), Instant::now());
        assert!(held.is_some() && returned.is_some());

        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(leaks.scan(&node, &stats), 0);
        if let Some(key) = returned {
            leaks.unregister(key, &node);
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(leaks.scan(&node, &stats), 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(leaks.scan(&node, &stats), 0, "reported once");
        assert_eq!(stats.leaks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn off_without_a_threshold() {
        let leaks = Leaks::new(None);
        assert!(leaks.register(|| "op".into(), Instant::now()).is_none());
    }
}
