//! Which failed calls may be repeated, and the retry loop every call runs in.

use super::*;

/// How a call's errors are retried.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rules {
    /// The work may write outside a transaction.
    pub(super) write: bool,
    pub(super) idempotent: bool,
}

impl Classify<Error> for Rules {
    fn classify(&self, error: &Error) -> ErrorClass {
        let repeatable_if_sent = !self.write || self.idempotent;
        match error {
            Error::PoolTimeout { .. } | Error::CircuitOpen { .. } | Error::Unavailable { .. } => {
                ErrorClass::Transient
            }
            Error::Connection { sent: false, .. } => ErrorClass::Transient,
            Error::Connection { sent: true, .. } | Error::Timeout { .. } => {
                if repeatable_if_sent {
                    ErrorClass::Transient
                } else {
                    ErrorClass::TransientNotRepeatable
                }
            }
            Error::Database(db) if is_transient_sqlstate(&db.code) => {
                if repeatable_if_sent || is_rejected_before_effect(&db.code) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::TransientNotRepeatable
                }
            }
            Error::CommitOutcomeUnknown { .. } => ErrorClass::TransientNotRepeatable,
            _ => ErrorClass::Permanent,
        }
    }

    fn breaker_outcome(&self, error: &Error) -> Outcome {
        if error.is_node_failure() {
            Outcome::Failure
        } else {
            Outcome::Ignored
        }
    }
}

/// [`Rules`] for one call, with the call's retry deadline: a node whose
/// breaker is open and will not let a probe through before that deadline
/// ends the retries at once (waiting cannot help, so the call fails in
/// microseconds, naming the node and the next probe); an open breaker that
/// probes before the deadline is waited for like any transient error (a
/// restarting primary).
pub(super) struct CallRules {
    pub(super) rules: Rules,
    pub(super) give_up_at: Option<Instant>,
}

impl Classify<Error> for CallRules {
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
        self.rules.classify(error)
    }

    fn breaker_outcome(&self, error: &Error) -> Outcome {
        self.rules.breaker_outcome(error)
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

impl Cluster {
    /// Runs `attempt` under the retry policy, counting retries.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        op: &Op,
        rules: Rules,
        mut attempt: F,
    ) -> Attempt<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let _work = match self.begin(op) {
            Ok(work) => work,
            Err(e) => return Err((e, None)),
        };
        let last_node = std::sync::Mutex::new(None::<Node>);
        let deadline = op
            .retry_deadline_override()
            .or_else(|| self.inner.retry.deadline());
        let rules = CallRules {
            rules,
            give_up_at: deadline.map(|d| Instant::now() + d),
        };
        let result = self
            .inner
            .retry
            .run_within(deadline, op.name(), &rules, |n| {
                if n > 1 {
                    self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                }
                let fut = attempt(n);
                let last_node = &last_node;
                async move {
                    match fut.await {
                        Ok(ok) => Ok(ok),
                        Err((error, node)) => {
                            if let Some(node) = node {
                                *last_node.lock().unwrap_or_else(|p| p.into_inner()) = Some(node);
                            }
                            Err(error)
                        }
                    }
                }
            })
            .await;
        result.map_err(|e| {
            let node = last_node.lock().unwrap_or_else(|p| p.into_inner()).take();
            (e.into_inner(), node)
        })
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
        let node_label = match node {
            Some(node) => {
                node.inner.queries.fetch_add(1, Ordering::Relaxed);
                if outcome != "ok" {
                    node.inner.failures.fetch_add(1, Ordering::Relaxed);
                }
                node_label(node)
            }
            None => SharedString::const_str("none"),
        };
        let route_label = SharedString::const_str(route.as_str());
        metrics::counter!(
            QUERIES_METRIC,
            "op" => op.label(),
            "route" => route_label.clone(),
            "node" => node_label.clone(),
            "outcome" => outcome
        )
        .increment(1);
        metrics::histogram!(
            QUERY_DURATION_METRIC,
            "op" => op.label(),
            "route" => route_label,
            "node" => node_label
        )
        .record(elapsed.as_secs_f64());
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

    pub(super) fn timeout() -> Error {
        Error::Timeout {
            node: "primary".into(),
            operation: "op".into(),
            after: Duration::from_secs(1),
        }
    }

    pub(super) fn unavailable() -> Error {
        Error::Unavailable {
            node: "primary".into(),
            operation: "op".into(),
            reason: "down".into(),
        }
    }

    #[test]
    pub(super) fn retry_rules_follow_what_was_sent() {
        let read = Rules {
            write: false,
            idempotent: false,
        };
        let write = Rules {
            write: true,
            idempotent: false,
        };
        let idempotent = Rules {
            write: true,
            idempotent: true,
        };
        // Nothing sent: everyone retries.
        for rules in [read, write, idempotent] {
            assert_eq!(rules.classify(&unavailable()), ErrorClass::Transient);
        }
        // Maybe sent: reads and idempotent writes only.
        assert_eq!(read.classify(&timeout()), ErrorClass::Transient);
        assert_eq!(
            write.classify(&timeout()),
            ErrorClass::TransientNotRepeatable
        );
        assert_eq!(idempotent.classify(&timeout()), ErrorClass::Transient);
        // An unknown commit is never repeated, idempotent or not.
        let unknown = Error::CommitOutcomeUnknown {
            node: "primary".into(),
            operation: "op".into(),
            source: None,
        };
        for rules in [read, write, idempotent] {
            assert_eq!(rules.classify(&unknown), ErrorClass::TransientNotRepeatable);
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
        assert!(!unknown.is_transient() && unknown.is_commit_outcome_unknown());
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
    pub(super) fn default_shared_connections() {
        assert_eq!(ClusterBuilder::default_lanes(1), 0);
        assert_eq!(ClusterBuilder::default_lanes(2), 0);
        assert_eq!(ClusterBuilder::default_lanes(3), 1);
        assert_eq!(ClusterBuilder::default_lanes(10), 2);
        assert_eq!(ClusterBuilder::default_lanes(50), 4);
    }

    pub(super) fn circuit_open(probe_in: Option<Duration>) -> Error {
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
    pub(super) async fn an_open_breaker_is_waited_for_only_when_it_probes_before_the_deadline() {
        let read = Rules {
            write: false,
            idempotent: false,
        };
        let call = CallRules {
            rules: read,
            give_up_at: Some(Instant::now() + Duration::from_secs(3)),
        };
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
        let patient = CallRules {
            rules: read,
            give_up_at: None,
        };
        assert_eq!(patient.classify(&late), ErrorClass::Transient);
        // Other errors follow the rules.
        assert_eq!(call.classify(&timeout()), read.classify(&timeout()));
    }
}
