//! Which failed calls may be repeated, and the retry loop every call runs in.

use super::*;

/// The shape of a call, as far as the retry rules care (the table in
/// `docs/connection.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// One statement; `writes`: it counts as a write (its route is the
    /// primary's writes, or its form is not a plain read).
    Statement { writes: bool },
    /// A `read` or `write` closure: what its connection recorded decides.
    Closure,
    /// A transaction: nothing took effect unless `COMMIT` was answered; its
    /// record holds what nested calls did.
    Transaction,
    /// The checkout of [`Cluster::connection`]: nothing is sent.
    Checkout,
}

/// The retry rules of one call: they read what the call may have done (the
/// record its connection wrappers keep, or for a statement the error
/// itself), never the call's kind, and the call's deadline.
///
/// A node whose breaker is open and will not let a probe through before the
/// deadline ends the retries at once (waiting cannot help, so the call fails
/// in microseconds, naming the node and the next probe); an open breaker that
/// probes before the deadline is waited for like any transient error (a
/// restarting primary).
pub(super) struct CallRules<'a> {
    pub(super) shape: Shape,
    pub(super) idempotent: bool,
    pub(super) record: Option<&'a Record>,
    pub(super) give_up_at: Option<Instant>,
}

impl<'a> CallRules<'a> {
    pub(super) fn new(shape: Shape, op: &Op, record: Option<&'a Record>) -> Self {
        CallRules {
            shape,
            idempotent: op.is_idempotent(),
            record,
            give_up_at: None,
        }
    }

    /// What the call may have done, given the error that ended an attempt.
    pub(super) fn effect(&self, error: &Error) -> Effect {
        let own = match self.shape {
            Shape::Statement { .. } if error.provably_not_sent() => Effect::None,
            Shape::Statement { writes: true } => Effect::MayHaveWritten,
            Shape::Statement { writes: false } => Effect::Read,
            Shape::Closure | Shape::Transaction | Shape::Checkout => Effect::None,
        };
        own.max(self.record.map_or(Effect::None, Record::effect))
    }

    /// The error the caller gets once the retries are over: a write whose
    /// connection broke (or timed out) with it in flight has an unknown
    /// outcome; an error that would say "nothing was sent" after earlier
    /// work of the call may have taken effect says so instead.
    pub(super) fn settle(&self, error: Error, op: &Op) -> Error {
        if self.effect(&error) < Effect::MayHaveWritten {
            // A transaction that broke (or whose COMMIT was found rolled
            // back) did not commit: say so, so that `provably_not_sent`
            // tells the truth.
            return match error {
                // A transient failure whose retries ran out (a broken
                // connection, a round trip that ran out, 57P01 …).
                error
                    if self.shape == Shape::Transaction
                        && error.is_transient()
                        && !error.provably_not_sent() =>
                {
                    Error::RolledBack {
                        node: error.node().map_or_else(|| Arc::from("unknown"), Arc::from),
                        operation: op.name().to_owned(),
                        source: Box::new(error),
                    }
                }
                error => error,
            };
        }
        let in_flight = matches!(self.shape, Shape::Statement { .. } | Shape::Closure);
        match error {
            Error::Connection {
                node,
                operation,
                sent: true,
                source,
            } if in_flight && !self.idempotent => Error::CommitOutcomeUnknown {
                node,
                operation,
                reason: self.lost_in_flight("its connection broke"),
                xid: None,
                source: Some(source),
            },
            Error::Timeout {
                node, operation, ..
            } if in_flight && !self.idempotent => Error::CommitOutcomeUnknown {
                node,
                operation,
                reason: self.lost_in_flight("its round trip ran out"),
                xid: None,
                source: None,
            },
            error if error.provably_not_sent() => Error::PartiallyApplied {
                node: error.node().map_or_else(|| Arc::from("unknown"), Arc::from),
                operation: op.name().to_owned(),
                committed: false,
                source: Box::new(error),
            },
            error => error,
        }
    }
}

impl CallRules<'_> {
    /// Why a write lost in flight cannot be looked up.
    fn lost_in_flight(&self, what: &str) -> String {
        match self.shape {
            Shape::Closure => format!(
                "a statement of the closure wrote, then {what} with a statement in flight \
                 (each autocommit statement is its own commit, which cannot be looked up)"
            ),
            _ => format!(
                "{what} while the autocommit write was in flight (an autocommit statement's \
                 commit cannot be looked up; Op::resolvable runs it as a transaction that can)"
            ),
        }
    }
}

impl Classify<Error> for CallRules<'_> {
    fn classify(&self, error: &Error) -> ErrorClass {
        if error.is_forced_open() {
            return ErrorClass::Permanent;
        }
        if let Error::CircuitOpen {
            probe_in: Some(wait),
            ..
        } = error
            && self
                .give_up_at
                .is_some_and(|at| Instant::now() + *wait >= at)
        {
            return ErrorClass::Permanent;
        }
        // The caller's own error: read as the failed statement it followed.
        if let Error::Aborted(reason) = error
            && let Some(caller) = reason.downcast_ref::<super::transaction::CallerError>()
        {
            return match &caller.0 {
                Some(failure) if failure.timed_out => ErrorClass::TransientNotRepeatable,
                Some(failure) if failure.transient => {
                    if self.idempotent || self.effect(error) <= Effect::Read {
                        ErrorClass::Transient
                    } else {
                        ErrorClass::TransientNotRepeatable
                    }
                }
                _ => ErrorClass::Permanent,
            };
        }
        match error {
            Error::CommitOutcomeUnknown { .. }
            | Error::PartiallyApplied { .. }
            | Error::CommitLost { .. }
            | Error::RolledBack { .. } => {
                return ErrorClass::TransientNotRepeatable;
            }
            // A transaction whose round trip ran out was rolled back; the
            // node did not answer within the bound, and repeating it would
            // wait as long again.
            Error::Timeout { .. } if self.shape == Shape::Transaction => {
                return ErrorClass::TransientNotRepeatable;
            }
            _ => {}
        }
        if !error.is_transient() {
            return ErrorClass::Permanent;
        }
        if self.idempotent || self.effect(error) <= Effect::Read {
            ErrorClass::Transient
        } else {
            ErrorClass::TransientNotRepeatable
        }
    }

    fn breaker_outcome(&self, error: &Error) -> Outcome {
        if error.is_node_failure() {
            Outcome::Failure
        } else {
            Outcome::Ignored
        }
    }

    /// Nothing reached the node: waiting for it spends no attempt and no
    /// retry budget, only the call's deadline. The background probe
    /// half-opens the breaker as soon as the node accepts logins again.
    fn unavailable_wait(&self, error: &Error) -> Option<Duration> {
        match error {
            Error::CircuitOpen { probe_in, .. } => Some(
                probe_in
                    .map_or(UNAVAILABLE_POLL, |p| p.min(UNAVAILABLE_POLL))
                    .max(Duration::from_millis(1)),
            ),
            Error::Unavailable { .. } => Some(UNAVAILABLE_POLL),
            // "the database system is starting up": the login was refused.
            Error::Database(db) if db.code == "57P03" => Some(STARTING_UP_POLL),
            _ => None,
        }
    }
}

/// What one attempt reports besides its value: the node it ran on.
pub(super) type Attempt<T> = Result<(T, Node), (Error, Option<Node>)>;

/// What one attempt reports to the retry loop: its value and node, or its
/// error and the node it got to (if any).
pub(super) type Tried<T> = Result<(T, Node), Failed>;

/// An attempt's error, and the node it ran on when it got that far.
pub(super) struct Failed(pub(super) Error, pub(super) Option<Node>);

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Classify<Failed> for CallRules<'_> {
    fn classify(&self, failed: &Failed) -> ErrorClass {
        Classify::<Error>::classify(self, &failed.0)
    }

    fn breaker_outcome(&self, failed: &Failed) -> Outcome {
        Classify::<Error>::breaker_outcome(self, &failed.0)
    }

    fn unavailable_wait(&self, failed: &Failed) -> Option<Duration> {
        Classify::<Error>::unavailable_wait(self, &failed.0)
    }
}

impl Cluster {
    /// Runs `attempt` under the retry policy, counting retries.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        op: &Op,
        mut rules: CallRules<'_>,
        started: Instant,
        mut attempt: F,
    ) -> Attempt<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Tried<T>>,
    {
        let _work = match self.begin(op) {
            Ok(work) => work,
            Err(e) => return Err((e, None)),
        };
        let deadline = self.retry_deadline(op);
        rules.give_up_at = deadline.map(|d| started + d);
        let result = self
            .inner
            .retry
            .run_since(Some(started), deadline, op.name(), &rules, |n| {
                if n > 1 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                // Handed over as it is: wrapping it in another future would
                // store it twice.
                attempt(n)
            })
            .await;
        result.map_err(|e| {
            let Failed(error, node) = e.into_inner();
            (rules.settle(error, op), node)
        })
    }

    /// The call's retry deadline: its own ([`Op::retry_deadline`]), else
    /// `retry.deadline`.
    pub(super) fn retry_deadline(&self, op: &Op) -> Option<Duration> {
        op.retry_deadline_override()
            .or_else(|| self.inner.retry.deadline())
    }

    /// Records a finished call in the counters and the `pgstack_` series.
    pub(super) fn finish<T>(
        &self,
        op: &Op,
        route: Route,
        started: Instant,
        result: Attempt<T>,
    ) -> Result<(T, Node), Error> {
        let elapsed = started.elapsed();
        let counters = &self.inner.counters;
        counters.calls.fetch_add(1, Ordering::Relaxed);
        counters.latency.record(elapsed);
        let (outcome, node) = match &result {
            Ok((_, node)) => ("ok", Some(node)),
            Err((e, node)) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                if e.is_commit_outcome_unknown() {
                    counters.unknown_outcomes.fetch_add(1, Ordering::Relaxed);
                    ("unknown", node.as_ref())
                } else {
                    ("error", node.as_ref())
                }
            }
        };
        if let Some(node) = node {
            node.inner.queries.fetch_add(1, Ordering::Relaxed);
            if outcome != "ok" {
                node.inner.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        crate::telemetry::finished(node, op, elapsed, result.as_ref().err().map(|(e, _)| e));
        // The series' handles are resolved once per (op, route, node).
        counters.series.record(op, route, node, outcome, elapsed);
        result.map_err(|(e, _)| e)
    }
}

/// How often a call waiting for an unavailable node (its breaker open, with
/// a probe due before the call's deadline) looks again: a local check, no
/// traffic to the node.
pub(super) const UNAVAILABLE_POLL: Duration = Duration::from_millis(20);

/// How often a call looks again while the node refuses logins as starting up.
pub(super) const STARTING_UP_POLL: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> Error {
        Error::Timeout {
            node: "primary".into(),
            operation: "op".into(),
            after: Duration::from_secs(1),
        }
    }

    fn unavailable() -> Error {
        Error::Unavailable {
            node: "primary".into(),
            operation: "op".into(),
            reason: "down".into(),
        }
    }

    fn unknown() -> Error {
        Error::CommitOutcomeUnknown {
            node: "primary".into(),
            operation: "op".into(),
            reason: "test".into(),
            xid: None,
            source: None,
        }
    }

    fn rules(shape: Shape, idempotent: bool, record: Option<&Record>) -> CallRules<'_> {
        let op = if idempotent {
            Op::from("op").idempotent()
        } else {
            Op::from("op")
        };
        CallRules::new(shape, &op, record)
    }

    #[test]
    fn a_statement_is_repeated_by_what_its_error_says_was_sent() {
        let read = rules(Shape::Statement { writes: false }, false, None);
        let write = rules(Shape::Statement { writes: true }, false, None);
        let idempotent = rules(Shape::Statement { writes: true }, true, None);
        // Nothing sent: everyone retries.
        for rules in [&read, &write, &idempotent] {
            assert_eq!(rules.classify(&unavailable()), ErrorClass::Transient);
        }
        // Maybe sent: reads and idempotent writes only.
        assert_eq!(read.classify(&timeout()), ErrorClass::Transient);
        assert_eq!(
            write.classify(&timeout()),
            ErrorClass::TransientNotRepeatable
        );
        assert_eq!(idempotent.classify(&timeout()), ErrorClass::Transient);
        // A write whose round trip ran out may still run: unknown outcome.
        assert!(
            write
                .settle(timeout(), &Op::from("op"))
                .is_commit_outcome_unknown()
        );
        assert!(matches!(
            read.settle(timeout(), &Op::from("op")),
            Error::Timeout { .. }
        ));
        // An unknown commit is never repeated, idempotent or not.
        for rules in [&read, &write, &idempotent] {
            assert_eq!(
                rules.classify(&unknown()),
                ErrorClass::TransientNotRepeatable
            );
        }
        // Misuse and shutdown are permanent.
        let usage = Error::Usage {
            operation: "op".into(),
            problem: "BEGIN".into(),
        };
        let shutting = Error::ShuttingDown {
            operation: "op".into(),
        };
        for error in [usage, shutting] {
            assert_eq!(read.classify(&error), ErrorClass::Permanent);
            assert!(!error.is_transient());
            assert!(error.provably_not_sent());
        }
        assert!(unavailable().is_transient() && unavailable().provably_not_sent());
        assert!(timeout().is_transient() && !timeout().provably_not_sent());
        assert!(!unknown().is_transient() && unknown().is_commit_outcome_unknown());
        // Only node failures count against a breaker.
        assert_eq!(read.breaker_outcome(&timeout()), Outcome::Failure);
        assert_eq!(
            read.breaker_outcome(&Error::Usage {
                operation: "op".into(),
                problem: String::new()
            }),
            Outcome::Ignored
        );
    }

    #[test]
    fn a_closure_is_repeated_by_what_its_connection_recorded() {
        let record = Record::nested();
        let closure = rules(Shape::Closure, false, Some(&record));
        // Nothing yet (the checkout failed): repeat.
        assert_eq!(closure.classify(&timeout()), ErrorClass::Transient);
        // Reads only: repeat.
        let _ = record.sending(false);
        assert_eq!(closure.classify(&timeout()), ErrorClass::Transient);
        assert!(matches!(
            closure.settle(unavailable(), &Op::from("op")),
            Error::Unavailable { .. }
        ));
        // A write reached the server: a later "nothing sent" error (a nested
        // pool time-out, a 55P03) does not make the call repeatable.
        let _ = record.sending(true);
        assert_eq!(
            closure.classify(&unavailable()),
            ErrorClass::TransientNotRepeatable
        );
        let settled = closure.settle(unavailable(), &Op::from("place-order"));
        assert!(
            matches!(
                settled,
                Error::PartiallyApplied {
                    committed: false,
                    ..
                }
            ),
            "{settled:?}"
        );
        assert!(!settled.provably_not_sent() && !settled.is_transient());
        assert!(settled.to_string().contains("place-order"), "{settled}");
        // Lost with a statement in flight: unknown.
        assert!(
            closure
                .settle(timeout(), &Op::from("op"))
                .is_commit_outcome_unknown()
        );
        // Unless the caller says repeating it is safe.
        let idempotent = rules(Shape::Closure, true, Some(&record));
        assert_eq!(idempotent.classify(&unavailable()), ErrorClass::Transient);
    }

    #[test]
    fn a_transaction_is_repeated_unless_it_timed_out_or_a_nested_call_wrote() {
        let record = Record::nested();
        let tx = rules(Shape::Transaction, false, Some(&record));
        assert_eq!(tx.classify(&unavailable()), ErrorClass::Transient);
        // Rolled back after a round trip ran out: not waited for again.
        assert_eq!(tx.classify(&timeout()), ErrorClass::TransientNotRepeatable);
        let settled = tx.settle(timeout(), &Op::from("op"));
        assert!(
            matches!(&settled, Error::RolledBack { source, .. } if matches!(**source, Error::Timeout { .. })),
            "{settled:?}"
        );
        assert!(settled.provably_not_sent());
        // A nested autocommit write outside the transaction took effect.
        let _ = record.sending(true);
        assert_eq!(
            tx.classify(&unavailable()),
            ErrorClass::TransientNotRepeatable
        );
        assert!(matches!(
            tx.settle(unavailable(), &Op::from("op")),
            Error::PartiallyApplied { .. }
        ));
    }

    fn circuit_open(probe_in: Option<Duration>) -> Error {
        Error::CircuitOpen {
            node: "primary".into(),
            operation: "op".into(),
            probe_in,
            source: Box::new(pgstack_pool::PoolError::Closed {
                node: "primary".into(),
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_is_waited_for_only_when_it_probes_before_the_deadline() {
        let mut call = rules(Shape::Statement { writes: false }, false, None);
        call.give_up_at = Some(Instant::now() + Duration::from_secs(3));
        let soon = circuit_open(Some(Duration::from_millis(300)));
        let late = circuit_open(Some(Duration::from_secs(5)));
        let unknown = circuit_open(None);
        assert_eq!(call.classify(&soon), ErrorClass::Transient);
        assert_eq!(call.classify(&late), ErrorClass::Permanent);
        assert_eq!(call.classify(&unknown), ErrorClass::Transient);
        // Nearer the deadline, a probe that was in time no longer is.
        tokio::time::advance(Duration::from_millis(2800)).await;
        assert_eq!(call.classify(&soon), ErrorClass::Permanent);
        // Without a deadline, an open breaker is always waited for.
        let patient = rules(Shape::Statement { writes: false }, false, None);
        assert_eq!(patient.classify(&late), ErrorClass::Transient);
        // Other errors follow the rules.
        assert_eq!(call.classify(&timeout()), patient.classify(&timeout()));
    }
}
