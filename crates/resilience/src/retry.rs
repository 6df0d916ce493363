//! The retry loop.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use pgstack_config::{Jitter, RetrySettings};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::budget::RetryBudget;
use crate::classify::{Classify, ErrorClass};
use crate::error::{Checker, InvalidSettings};

/// Name of the counter incremented on each retry, labelled `op`.
pub const RETRIES_METRIC: &str = "pgstack_query_retries_total";

/// How a failed operation is retried: attempts, backoff, deadline and budget.
///
/// Cheap to clone; clones share the [`RetryBudget`].
///
/// ```
/// use std::time::Duration;
/// use pgstack_config::RetrySettings;
/// use pgstack_resilience::{ErrorClass, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let policy = RetryPolicy::from_settings(&RetrySettings::default())?;
/// let mut calls = 0;
/// let value = policy
///     .run("fetch-bills", &|_: &std::io::Error| ErrorClass::Transient, |attempt| {
///         calls += 1;
///         async move {
///             if attempt < 3 { Err(std::io::Error::other("connection refused")) } else { Ok(42) }
///         }
///     })
///     .await?;
/// assert_eq!((value, calls), (42, 3));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    deadline: Option<Duration>,
    budget: Option<Arc<RetryBudget>>,
}

/// Why the retry loop handed an error back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// The error was classified [`ErrorClass::Permanent`].
    Permanent,
    /// The error was classified [`ErrorClass::TransientNotRepeatable`].
    NotRepeatable,
    /// Every permitted attempt was made.
    AttemptsExhausted,
    /// The next attempt would have started after the deadline.
    DeadlineReached,
    /// The shared retry budget had no retry left.
    BudgetExhausted,
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::Permanent => "permanent error",
            GiveUpReason::NotRepeatable => "not safe to repeat",
            GiveUpReason::AttemptsExhausted => "attempts exhausted",
            GiveUpReason::DeadlineReached => "deadline reached",
            GiveUpReason::BudgetExhausted => "retry budget exhausted",
        })
    }
}

/// The last error of a retried operation, with the number of attempts made
/// and why no further attempt was made.
#[derive(Debug, thiserror::Error)]
#[error("failed after {attempts} attempt(s) ({reason}): {error}")]
#[non_exhaustive]
pub struct RetryError<E> {
    /// The error of the last attempt.
    #[source]
    pub error: E,
    /// Attempts made, the first included.
    pub attempts: u32,
    /// Why the loop stopped.
    pub reason: GiveUpReason,
}

impl<E> RetryError<E> {
    /// The last attempt's error.
    pub fn into_inner(self) -> E {
        self.error
    }

    /// The same error with the inner error mapped.
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> RetryError<F> {
        RetryError {
            error: f(self.error),
            attempts: self.attempts,
            reason: self.reason,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // The defaults of `RetrySettings` are valid.
        Self::build(&RetrySettings::default())
    }
}

impl RetryPolicy {
    /// A policy from the configuration's retry section, with a budget of its
    /// own (share one with [`RetryPolicy::with_budget`]).
    ///
    /// Fails with one entry per bad field: `max_attempts` must be at least 1,
    /// `initial_backoff` at most `max_backoff`, `multiplier` a finite number of
    /// at least 1, `deadline` (if set) above zero, `budget_ratio` within
    /// `0..=1` and `budget_window` above zero.
    pub fn from_settings(settings: &RetrySettings) -> Result<Self, InvalidSettings> {
        let mut c = Checker::default();
        c.check(
            settings.max_attempts >= 1,
            "retry.max_attempts",
            settings.max_attempts,
            "must be at least 1 (1 turns retries off)",
        );
        c.check(
            settings.initial_backoff <= settings.max_backoff,
            "retry.initial_backoff",
            settings.initial_backoff,
            "must not exceed retry.max_backoff",
        );
        c.check(
            settings.multiplier.is_finite() && settings.multiplier >= 1.0,
            "retry.multiplier",
            settings.multiplier,
            "must be a finite number of at least 1.0 (1.0 keeps the delay constant)",
        );
        c.check(
            settings.deadline.is_none_or(|d| !d.is_zero()),
            "retry.deadline",
            settings.deadline,
            "must be above zero; leave it unset for no deadline",
        );
        c.check(
            (0.0..=1.0).contains(&settings.budget_ratio),
            "retry.budget_ratio",
            settings.budget_ratio,
            "must be within 0.0..=1.0 (retries per first attempt)",
        );
        c.check(
            !settings.budget_window.is_zero(),
            "retry.budget_window",
            settings.budget_window,
            "must be above zero (e.g. \"10s\")",
        );
        c.finish()?;
        Ok(Self::build(settings))
    }

    fn build(s: &RetrySettings) -> Self {
        RetryPolicy {
            max_attempts: s.max_attempts.max(1),
            backoff: Backoff::new(s.initial_backoff, s.max_backoff, s.multiplier, s.jitter),
            deadline: s.deadline,
            budget: Some(Arc::new(RetryBudget::new(
                s.budget_window,
                s.budget_min_per_second,
                s.budget_ratio,
            ))),
        }
    }

    /// A policy that makes exactly one attempt.
    pub fn no_retry() -> Self {
        RetryPolicy {
            max_attempts: 1,
            backoff: Backoff::new(Duration::ZERO, Duration::ZERO, 1.0, Jitter::None),
            deadline: None,
            budget: None,
        }
    }

    /// A policy with `max_attempts` attempts (at least 1), the given backoff,
    /// no deadline and no budget.
    pub fn new(max_attempts: u32, backoff: Backoff) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            backoff,
            deadline: None,
            budget: None,
        }
    }

    /// Shares `budget` with every other policy holding it.
    pub fn with_budget(mut self, budget: Arc<RetryBudget>) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Drops the budget: retries are limited by attempts and deadline only.
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Sets the overall deadline: no attempt starts later than this after the
    /// first one started.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the number of attempts, the first included (at least 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Attempts in all, the first included (waits for an unavailable
    /// dependency not counted: see [`Classify::unavailable_wait`]).
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The backoff between attempts.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The overall deadline.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The shared budget, if any.
    pub fn budget(&self) -> Option<&Arc<RetryBudget>> {
        self.budget.as_ref()
    }

    /// Runs `operation` until it succeeds or the policy gives up.
    ///
    /// `operation` receives the attempt number (1 for the first) and returns
    /// the attempt's future; to retry a whole transaction, make the closure
    /// run the whole transaction. `classify` decides per error whether to
    /// retry (see [`Classify`]). `op` names the operation in tracing events and
    /// in the `op` label of [`RETRIES_METRIC`].
    ///
    /// Each retry emits a tracing event (at `INFO`) with the attempt number,
    /// the delay and the error, and increments the counter. An error the loop
    /// will not retry is returned with the attempt count and the reason.
    ///
    /// An error for which [`Classify::unavailable_wait`] gives a wait (the
    /// other side cannot take the work yet and never saw it) is waited out
    /// in steps of that length until the deadline, without spending an
    /// attempt or the budget, and without a retry event or count.
    pub async fn run<T, E, C, F, Fut>(
        &self,
        op: &str,
        classify: &C,
        operation: F,
    ) -> Result<T, RetryError<E>>
    where
        E: fmt::Display,
        C: Classify<E> + ?Sized,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_within(self.deadline, op, classify, operation)
            .await
    }

    /// [`RetryPolicy::run`] with `deadline` in place of the policy's own,
    /// for one call whose caller has a deadline of its own (`None`: no
    /// deadline).
    pub async fn run_within<T, E, C, F, Fut>(
        &self,
        deadline: Option<Duration>,
        op: &str,
        classify: &C,
        operation: F,
    ) -> Result<T, RetryError<E>>
    where
        E: fmt::Display,
        C: Classify<E> + ?Sized,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // One clock read serves the deadline and the budget (none without them).
        let started = (self.budget.is_some() || deadline.is_some()).then(Instant::now);
        self.run_since(started, deadline, op, classify, operation)
            .await
    }

    /// [`RetryPolicy::run_within`] for a caller that read the clock when the
    /// call began: `started` is when the deadline counts from (and when the
    /// first attempt is credited to the retry budget), so the loop reads no
    /// clock of its own until an attempt fails. `None` when the caller has
    /// no start time (then the deadline, if any, does not apply).
    pub async fn run_since<T, E, C, F, Fut>(
        &self,
        started: Option<Instant>,
        deadline: Option<Duration>,
        op: &str,
        classify: &C,
        mut operation: F,
    ) -> Result<T, RetryError<E>>
    where
        E: fmt::Display,
        C: Classify<E> + ?Sized,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        if let (Some(budget), Some(now)) = (&self.budget, started) {
            budget.deposit_at(now);
        }
        let deadline = deadline
            .zip(started)
            .and_then(|(limit, started)| started.checked_add(limit));
        let mut attempt = 1;
        // Attempts that count against `max_attempts` (waits for an
        // unavailable other side do not).
        let mut spent = 1;
        let mut previous_delay = Duration::ZERO;
        loop {
            let error = match operation(attempt).await {
                Ok(value) => {
                    if attempt > 1 {
                        tracing::debug!(op, attempts = attempt, "succeeded after retrying");
                    }
                    return Ok(value);
                }
                Err(error) => error,
            };
            let class = classify.classify(&error);
            // The other side cannot take the work yet and never saw it: wait
            // for it until the deadline, spending no attempt and no budget.
            if class == ErrorClass::Transient
                && let Some(deadline) = deadline
                && let Some(wait) = classify.unavailable_wait(&error)
            {
                if Instant::now() + wait > deadline {
                    return Err(give_up(op, error, attempt, GiveUpReason::DeadlineReached));
                }
                tracing::debug!(
                    op,
                    attempt,
                    wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    error = %error,
                    "waiting for an unavailable dependency"
                );
                drop(error);
                Box::pin(tokio::time::sleep(wait)).await;
                attempt += 1;
                continue;
            }
            let reason = match class {
                ErrorClass::Permanent => Some(GiveUpReason::Permanent),
                ErrorClass::TransientNotRepeatable => Some(GiveUpReason::NotRepeatable),
                ErrorClass::Transient if spent >= self.max_attempts => {
                    Some(GiveUpReason::AttemptsExhausted)
                }
                ErrorClass::Transient => None,
            };
            if let Some(reason) = reason {
                return Err(give_up(op, error, attempt, reason));
            }
            let delay = self.backoff.delay(spent, previous_delay);
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now + delay > deadline) {
                return Err(give_up(op, error, attempt, GiveUpReason::DeadlineReached));
            }
            if let Some(budget) = &self.budget
                && !budget.try_withdraw_at(now)
            {
                return Err(give_up(op, error, attempt, GiveUpReason::BudgetExhausted));
            }
            tracing::info!(
                op,
                attempt,
                next_attempt = attempt + 1,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "retrying after a transient error"
            );
            metrics::counter!(RETRIES_METRIC, "op" => op.to_owned()).increment(1);
            drop(error);
            // Boxed: a tokio `Sleep` is large, and keeping it out of this
            // future keeps a first-try success cheap to move.
            Box::pin(tokio::time::sleep(delay)).await;
            previous_delay = delay;
            attempt += 1;
            spent += 1;
        }
    }
}

fn give_up<E: fmt::Display>(
    op: &str,
    error: E,
    attempts: u32,
    reason: GiveUpReason,
) -> RetryError<E> {
    tracing::debug!(op, attempts, %reason, error = %error, "giving up");
    RetryError {
        error,
        attempts,
        reason,
    }
}
