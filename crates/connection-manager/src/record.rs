//! What a call may have done: the record the connection wrappers keep as
//! statements go out, and that the retry rules read.
//!
//! A statement is counted before it is sent (a future dropped after the
//! request left must still count) and taken back only when its error proves
//! it never took effect. Nested calls (a statement helper or a transaction
//! run inside a closure) count toward every enclosing call too, through a
//! task-local: a closure whose inner `db.execute` wrote is not "nothing
//! sent" because its own connection did nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// What a call may have done to the database, as far as its statements'
/// outcomes tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Effect {
    /// Nothing reached the server, or what did was refused before it could
    /// take effect: repeating the call is safe.
    None,
    /// Only reads reached the server: repeating the call is safe.
    Read,
    /// Statements that may change data reached the server: some of them may
    /// have taken effect, so the call is repeated only when its operation is
    /// idempotent.
    MayHaveWritten,
    /// The work committed.
    Committed,
}

/// The record of one call. Cheap to share: the connection handed to a
/// closure holds it, and so does the task-local of nested calls.
#[derive(Debug, Default)]
pub(crate) struct Record {
    reads: AtomicU32,
    writes: AtomicU32,
    committed: AtomicBool,
    parent: Option<Arc<Record>>,
}

/// A statement counted as sent; give it back to [`Record::not_sent`] when
/// its error proves it never took effect.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub(crate) struct Sent {
    write: bool,
}

tokio::task_local! {
    /// The record of the closure or transaction whose future is running.
    static CALL: Arc<Record>;
}

impl Record {
    /// A record for a new call, nested in the call running on this task (if
    /// any), so that its effects count there too.
    pub(crate) fn nested() -> Arc<Record> {
        Arc::new(Record {
            parent: current(),
            ..Record::default()
        })
    }

    fn chain(&self) -> impl Iterator<Item = &Record> {
        std::iter::successors(Some(self), |r| r.parent.as_deref())
    }

    /// A statement is about to be sent; `write`: it may change data.
    pub(crate) fn sending(&self, write: bool) -> Sent {
        for record in self.chain() {
            let counter = if write { &record.writes } else { &record.reads };
            counter.fetch_add(1, Ordering::AcqRel);
        }
        Sent { write }
    }

    /// The statement counted by `sent` provably never took effect.
    pub(crate) fn not_sent(&self, sent: Sent) {
        for record in self.chain() {
            let counter = if sent.write {
                &record.writes
            } else {
                &record.reads
            };
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// The call's work committed. To enclosing calls, a nested commit is a
    /// write that took effect.
    pub(crate) fn committed(&self) {
        self.committed.store(true, Ordering::Release);
        for record in self.chain().skip(1) {
            record.writes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// What the call may have done so far.
    pub(crate) fn effect(&self) -> Effect {
        if self.committed.load(Ordering::Acquire) {
            Effect::Committed
        } else if self.writes.load(Ordering::Acquire) > 0 {
            Effect::MayHaveWritten
        } else if self.reads.load(Ordering::Acquire) > 0 {
            Effect::Read
        } else {
            Effect::None
        }
    }
}

/// The record of the call whose closure is running on this task.
pub(crate) fn current() -> Option<Arc<Record>> {
    CALL.try_with(Arc::clone).ok()
}

/// `work` (a closure's future) with `record` as the current call, so calls
/// nested in it count toward it. (Not an `async fn`: that would store
/// `work` twice.)
pub(crate) fn scope<F: Future>(
    record: Arc<Record>,
    work: F,
) -> tokio::task::futures::TaskLocalFuture<Arc<Record>, F> {
    CALL.scope(record, work)
}

/// Counts one statement of a call that is not a closure (a statement
/// helper) toward the enclosing call, if there is one.
pub(crate) struct Enclosing(Option<Arc<Record>>);

impl Enclosing {
    /// The enclosing call of this task, if any.
    pub(crate) fn find() -> Enclosing {
        Enclosing(current())
    }

    pub(crate) fn sending(&self, write: bool) -> Option<Sent> {
        self.0.as_ref().map(|r| r.sending(write))
    }

    pub(crate) fn not_sent(&self, sent: Option<Sent>) {
        if let (Some(record), Some(sent)) = (&self.0, sent) {
            record.not_sent(sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn effects_only_grow_and_reach_enclosing_calls() {
        let outer = Record::nested();
        assert_eq!(outer.effect(), Effect::None);
        let inner = scope(Arc::clone(&outer), async { Record::nested() }).await;

        // Refused before effect: taken back.
        let sent = inner.sending(true);
        inner.not_sent(sent);
        assert_eq!(inner.effect(), Effect::None);
        assert_eq!(outer.effect(), Effect::None);

        let _ = inner.sending(false);
        assert_eq!(inner.effect(), Effect::Read);
        assert_eq!(outer.effect(), Effect::Read);

        let _ = inner.sending(true);
        // A later statement refused before effect does not undo the first.
        let refused = inner.sending(true);
        inner.not_sent(refused);
        assert_eq!(inner.effect(), Effect::MayHaveWritten);
        assert_eq!(outer.effect(), Effect::MayHaveWritten);

        let tx = Record::nested();
        tx.committed();
        assert_eq!(tx.effect(), Effect::Committed);
        // Outside any call: no enclosing record.
        assert!(current().is_none());
        let none = Enclosing::find();
        assert!(none.sending(true).is_none());
    }

    #[tokio::test]
    async fn a_nested_commit_is_a_write_to_the_enclosing_call() {
        let outer = Record::nested();
        scope(Arc::clone(&outer), async {
            let tx = Record::nested();
            tx.committed();
        })
        .await;
        assert_eq!(outer.effect(), Effect::MayHaveWritten);
        // A statement helper inside a closure counts toward it.
        let closure = Record::nested();
        scope(Arc::clone(&closure), async {
            let enclosing = Enclosing::find();
            let refused = enclosing.sending(true);
            enclosing.not_sent(refused);
            assert_eq!(closure.effect(), Effect::None);
            let _ = enclosing.sending(false);
        })
        .await;
        assert_eq!(closure.effect(), Effect::Read);
    }
}
