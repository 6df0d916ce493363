//! What the cluster knows about a statement text: its class (from
//! [`pgstack_pool::classify`]) and how long it usually takes here, which
//! decides whether it may be pipelined on a shared connection.
//!
//! Three kinds, by the usual duration `d` against the lanes' busy threshold
//! `b` (5 ms by default):
//!
//! - short (`d <= b`): pipelined behind other statements freely;
//! - not known yet, or medium (`b < d <= 10 b`): only an idle shared
//!   connection, which nobody else joins until the statement is answered;
//! - long (`d > 10 b`): a connection of its own, always.
//!
//! A long statement on a shared connection would hold up every statement
//! pipelined behind it. The margin between "not short" and "long" keeps a
//! short statement measured slow on a loaded machine (its run on a connection
//! of its own includes the client's scheduling delays) on the shared
//! connections, where its next run is measured without them. The usual duration falls at once to a faster run and rises
//! slowly with slower ones, so queueing under load does not push a short
//! statement off the lanes, while a statement that is always slow stays off
//! them.
//!
//! The registry is process-wide and bounded: past its capacity, new texts
//! are classified on every call and never shared (a program with unbounded
//! distinct texts builds SQL from values).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use pgstack_pool::{StatementClass, classify};

/// Not run yet.
const NEVER: u32 = u32::MAX;
/// A statement is long when it usually takes over this many times the busy
/// threshold.
const LONG_AFTER_BUSY: u32 = 10;
const SHARDS: usize = 16;
const SHARD_CAPACITY: usize = 1024;
/// Texts longer than this are not remembered.
const REMEMBERED_LEN: usize = 16 * 1024;

/// How long a statement text usually takes, in microseconds.
pub(crate) struct Timing {
    usual_micros: AtomicU32,
}

impl Timing {
    /// Records one run.
    pub(crate) fn record(&self, took: Duration) {
        let sample = u32::try_from(took.as_micros()).unwrap_or(NEVER - 1);
        let _ = self
            .usual_micros
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |usual| {
                Some(if usual == NEVER || sample <= usual {
                    sample
                } else {
                    // A sixteenth of the way up.
                    usual + (sample - usual) / 16
                })
            });
    }

    /// Whether the statement has run and usually takes at most `limit`.
    pub(crate) fn is_short(&self, limit: Duration) -> bool {
        let usual = self.usual_micros.load(Ordering::Acquire);
        usual != NEVER && u128::from(usual) <= limit.as_micros()
    }

    /// Whether the statement has run and usually takes longer than `limit`.
    pub(crate) fn is_long(&self, limit: Duration) -> bool {
        let usual = self.usual_micros.load(Ordering::Acquire);
        usual != NEVER && u128::from(usual) > limit.as_micros()
    }
}

/// A statement text's class and timing.
#[derive(Clone, Copy)]
pub(crate) struct Profile {
    pub(crate) class: StatementClass,
    /// `None` for a text the registry does not remember.
    pub(crate) timing: Option<&'static Timing>,
}

impl Profile {
    /// Whether the statement may use a shared connection at all: one plain
    /// read or write without session effects, whose text the registry
    /// remembers, and not known to be long (usually over ten times the busy
    /// threshold `limit`).
    pub(crate) fn may_share(&self, limit: Duration) -> bool {
        self.class.is_shareable()
            && self
                .timing
                .is_some_and(|t| !t.is_long(limit.saturating_mul(LONG_AFTER_BUSY)))
    }

    /// Whether it has run here and usually takes at most `limit`: it may be
    /// pipelined behind other statements.
    pub(crate) fn is_short(&self, limit: Duration) -> bool {
        self.timing.is_some_and(|t| t.is_short(limit))
    }
}

struct Entry {
    class: StatementClass,
    timing: Timing,
}

struct Registry {
    shards: Vec<RwLock<HashMap<Box<str>, &'static Entry>>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
    })
}

/// The shard of a text: a cheap mix of its length and its last bytes (the
/// map inside hashes the whole text, once).
fn shard_of(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    let mix = tail.iter().fold(bytes.len() as u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(*b))
    });
    (mix as usize) % SHARDS
}

/// The profile of `sql`.
pub(crate) fn profile(sql: &str) -> Profile {
    if sql.len() > REMEMBERED_LEN {
        return Profile {
            class: classify(sql),
            timing: None,
        };
    }
    let shard = &registry().shards[shard_of(sql)];
    if let Some(entry) = shard
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(sql)
        .copied()
    {
        return Profile {
            class: entry.class,
            timing: Some(&entry.timing),
        };
    }
    let class = classify(sql);
    let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
    if let Some(entry) = map.get(sql) {
        return Profile {
            class: entry.class,
            timing: Some(&entry.timing),
        };
    }
    if map.len() >= SHARD_CAPACITY {
        return Profile {
            class,
            timing: None,
        };
    }
    // Entries live as long as the process; the registry is bounded.
    let entry: &'static Entry = Box::leak(Box::new(Entry {
        class,
        timing: Timing {
            usual_micros: AtomicU32::new(NEVER),
        },
    }));
    map.insert(sql.into(), entry);
    Profile {
        class,
        timing: Some(&entry.timing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_shares_once_it_is_known_to_be_short() {
        let limit = Duration::from_millis(5);
        let text = "SELECT 'statements-test-short'";
        assert!(profile(text).may_share(limit), "an idle lane, at most");
        assert!(
            !profile(text).is_short(limit),
            "never run: not behind others"
        );
        let timing = profile(text).timing.expect("remembered");
        timing.record(Duration::from_micros(300));
        assert!(profile(text).may_share(limit) && profile(text).is_short(limit));
        // One slow run (queueing under load) does not push it off.
        timing.record(Duration::from_millis(40));
        assert!(profile(text).may_share(limit));

        let slow = "SELECT pg_sleep(1.5) -- statements-test";
        let timing = profile(slow).timing.expect("remembered");
        timing.record(Duration::from_millis(1500));
        assert!(!profile(slow).may_share(limit));
        // Medium: an idle lane to itself, nobody behind it.
        let medium = "SELECT pg_sleep(0.02) -- statements-test";
        let timing = profile(medium).timing.expect("remembered");
        timing.record(Duration::from_millis(20));
        assert!(profile(medium).may_share(limit) && !profile(medium).is_short(limit));
        // Session statements never share, however fast.
        let set = "SET search_path = x -- statements-test";
        profile(set)
            .timing
            .expect("remembered")
            .record(Duration::from_micros(10));
        assert!(!profile(set).may_share(limit));
    }
}
