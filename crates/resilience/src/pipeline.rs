//! Timeout, breaker and retry composed in one documented order.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::breaker::{CircuitBreaker, Outcome, Permit, Rejected};
use crate::classify::{Classify, ErrorClass};
use crate::retry::{RetryError, RetryPolicy};
use crate::timeout::{Elapsed, timeout};

/// The error of one attempt run by a [`Pipeline`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError<E> {
    /// The breaker did not let the attempt through; the retry loop stops.
    #[error(transparent)]
    Rejected(Rejected),
    /// The attempt ran out of time (and counted as a breaker failure).
    #[error(transparent)]
    Timeout(Elapsed),
    /// The operation's own error.
    #[error(transparent)]
    Inner(E),
}

impl<E> AttemptError<E> {
    /// The operation's own error, if that is what this is.
    pub fn into_inner(self) -> Option<E> {
        match self {
            AttemptError::Inner(e) => Some(e),
            _ => None,
        }
    }
}

/// Retry around breaker around timeout around the operation:
///
/// ```text
/// retry ( breaker ( timeout ( operation ) ) )
/// ```
///
/// - Each attempt asks the breaker first. A rejection stops the retry loop at
///   once ([`ErrorClass::Permanent`]): an open breaker means "do not call",
///   and the error says when it will probe again.
/// - The timeout bounds one attempt, not the whole loop (the retry deadline
///   does that). A timed-out attempt is recorded as a breaker failure and
///   classified by [`Classify::classify_timeout`].
/// - Each attempt's error is recorded in the breaker as
///   [`Classify::breaker_outcome`] says, then classified for the retry loop.
///
/// ```
/// use std::time::Duration;
/// use pgstack_config::{CircuitBreakerSettings, RetrySettings};
/// use pgstack_resilience::{AttemptError, CircuitBreaker, ErrorClass, Pipeline, RetryPolicy};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let breaker = CircuitBreaker::new("replica-1", &CircuitBreakerSettings::default())?;
/// let pipeline = Pipeline::new()
///     .retry(RetryPolicy::from_settings(&RetrySettings::default())?)
///     .breaker(breaker.clone())
///     .timeout(Duration::from_secs(2));
///
/// let transient = |_: &std::io::Error| ErrorClass::Transient;
/// let rows = pipeline
///     .run("fetch-bills", &transient, |_attempt| async { Ok::<_, std::io::Error>(vec![1, 2]) })
///     .await?;
/// assert_eq!(rows, [1, 2]);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Pipeline {
    retry: RetryPolicy,
    breaker: Option<CircuitBreaker>,
    timeout: Option<Duration>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Pipeline {
    /// One attempt, no breaker, no timeout.
    pub fn new() -> Self {
        Pipeline {
            retry: RetryPolicy::no_retry(),
            breaker: None,
            timeout: None,
        }
    }

    /// Retries with `policy`.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Guards each attempt with `breaker`.
    pub fn breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = Some(breaker);
        self
    }

    /// Limits each attempt to `limit`.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The breaker, if any.
    pub fn circuit_breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_ref()
    }

    /// Runs `operation` (given the attempt number, 1 for the first) in the
    /// order described above; `op` names it in events and metrics.
    pub async fn run<T, E, C, F, Fut>(
        &self,
        op: &str,
        classify: &C,
        mut operation: F,
    ) -> Result<T, RetryError<AttemptError<E>>>
    where
        E: fmt::Display,
        C: Classify<E> + ?Sized,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let classifier = AttemptClassifier(classify);
        self.retry
            .run(op, &classifier, |attempt| {
                // Ask the breaker before calling `operation`, so a rejected
                // attempt does no work at all (not even the closure's).
                let admitted = match &self.breaker {
                    Some(breaker) => breaker.acquire().map(Some),
                    None => Ok(None),
                };
                self.attempt(
                    classify,
                    admitted.map(|permit| (permit, operation(attempt))),
                )
            })
            .await
    }

    async fn attempt<T, E, C, Fut>(
        &self,
        classify: &C,
        admitted: Result<(Option<Permit<'_>>, Fut), Rejected>,
    ) -> Result<T, AttemptError<E>>
    where
        C: Classify<E> + ?Sized,
        Fut: Future<Output = Result<T, E>>,
    {
        let (permit, work) = admitted.map_err(AttemptError::Rejected)?;
        let result = match self.timeout {
            // Boxed: a tokio `Sleep` is large; without a timeout the
            // attempt future stays small and cheap to move.
            Some(limit) => match Box::pin(timeout(limit, work)).await {
                Ok(result) => result.map_err(AttemptError::Inner),
                Err(elapsed) => Err(AttemptError::Timeout(elapsed)),
            },
            None => work.await.map_err(AttemptError::Inner),
        };
        if let Some(permit) = permit {
            permit.record(match &result {
                Ok(_) => Outcome::Success,
                Err(AttemptError::Inner(e)) => classify.breaker_outcome(e),
                Err(_) => Outcome::Failure,
            });
        }
        result
    }
}

/// Lifts a classifier of `E` to [`AttemptError<E>`].
struct AttemptClassifier<'a, C: ?Sized>(&'a C);

impl<E, C: Classify<E> + ?Sized> Classify<AttemptError<E>> for AttemptClassifier<'_, C> {
    fn classify(&self, error: &AttemptError<E>) -> ErrorClass {
        match error {
            AttemptError::Rejected(_) => ErrorClass::Permanent,
            AttemptError::Timeout(elapsed) => self.0.classify_timeout(elapsed),
            AttemptError::Inner(e) => self.0.classify(e),
        }
    }
}
