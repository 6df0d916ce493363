//! How the caller tells the retry loop and the breaker what an error means.

use std::time::Duration;

use crate::breaker::Outcome;
use crate::timeout::Elapsed;

/// What an error says about repeating the work that produced it.
///
/// The retry loop obeys it: only [`ErrorClass::Transient`] errors are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The failure may go away and the work is safe to repeat (a connection
    /// refused, a serialization failure, a read that timed out).
    Transient,
    /// The failure may go away, but the work may already have taken effect, so
    /// repeating it is not safe (a write whose connection broke after it was
    /// sent). The retry loop stops and hands the error back.
    TransientNotRepeatable,
    /// Repeating cannot help (bad input, a constraint violation, a bug).
    Permanent,
}

impl ErrorClass {
    /// Whether the retry loop may repeat the work.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Transient)
    }
}

/// Classifies a caller's error for the retry loop and the circuit breaker.
///
/// Any closure `Fn(&E) -> ErrorClass` is a classifier that uses the default
/// methods for everything else. Implement the trait to also decide what an
/// error means to a circuit breaker ([`Classify::breaker_outcome`]) or how a
/// timed-out attempt is treated ([`Classify::classify_timeout`]).
///
/// ```
/// use pgstack_resilience::{Classify, ErrorClass, Outcome};
///
/// #[derive(Debug)]
/// enum DbError { ConnectionLost { sent: bool }, UniqueViolation }
///
/// struct WriteClassifier;
///
/// impl Classify<DbError> for WriteClassifier {
///     fn classify(&self, error: &DbError) -> ErrorClass {
///         match error {
///             DbError::ConnectionLost { sent: false } => ErrorClass::Transient,
///             DbError::ConnectionLost { sent: true } => ErrorClass::TransientNotRepeatable,
///             DbError::UniqueViolation => ErrorClass::Permanent,
///         }
///     }
///
///     // A constraint violation proves the node is up: not a breaker failure.
///     fn breaker_outcome(&self, error: &DbError) -> Outcome {
///         match error {
///             DbError::UniqueViolation => Outcome::Success,
///             _ => Outcome::Failure,
///         }
///     }
/// }
///
/// let lost = DbError::ConnectionLost { sent: true };
/// assert_eq!(WriteClassifier.classify(&lost), ErrorClass::TransientNotRepeatable);
/// ```
pub trait Classify<E: ?Sized> {
    /// Whether `error` may be retried.
    fn classify(&self, error: &E) -> ErrorClass;

    /// How an attempt cut off by a timeout is classified.
    ///
    /// Default: [`ErrorClass::TransientNotRepeatable`], since the work may have
    /// reached the other side before the timeout fired. Wrap the classifier in
    /// [`Idempotent`] (or override this) for work that is safe to repeat.
    fn classify_timeout(&self, elapsed: &Elapsed) -> ErrorClass {
        let _ = elapsed;
        ErrorClass::TransientNotRepeatable
    }

    /// What `error` means to a circuit breaker guarding the work.
    ///
    /// Default: every error is a [`Outcome::Failure`]. Return
    /// [`Outcome::Success`] for errors that prove the other side is healthy (a
    /// constraint violation) and [`Outcome::Ignored`] for errors that say
    /// nothing about it (the caller cancelled).
    fn breaker_outcome(&self, error: &E) -> Outcome {
        let _ = error;
        Outcome::Failure
    }

    /// For a [`ErrorClass::Transient`] error that says the other side cannot
    /// take the work *yet* and the work never reached it (a circuit breaker
    /// rejecting calls, a node being probed back into service): how long to
    /// wait before looking again.
    ///
    /// Such a retry costs the other side nothing, so it spends neither an
    /// attempt nor the retry budget: the loop waits in steps of this length
    /// until the work goes through or the policy's deadline comes (a policy
    /// without a deadline treats the error as an ordinary retry). Default:
    /// `None`, an ordinary retry.
    fn unavailable_wait(&self, error: &E) -> Option<Duration> {
        let _ = error;
        None
    }
}

impl<E: ?Sized, F> Classify<E> for F
where
    F: Fn(&E) -> ErrorClass,
{
    fn classify(&self, error: &E) -> ErrorClass {
        self(error)
    }
}

/// A classifier that retries everything transient: the caller marks the work
/// idempotent.
///
/// [`ErrorClass::TransientNotRepeatable`] becomes [`ErrorClass::Transient`] and
/// timed-out attempts are retried. Permanent errors stay permanent.
///
/// ```
/// use pgstack_resilience::{Classify, ErrorClass, Idempotent};
///
/// let maybe_sent = |_: &std::io::Error| ErrorClass::TransientNotRepeatable;
/// let err = std::io::Error::other("connection reset");
/// assert_eq!(Idempotent(maybe_sent).classify(&err), ErrorClass::Transient);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Idempotent<C>(pub C);

impl<E: ?Sized, C: Classify<E>> Classify<E> for Idempotent<C> {
    fn classify(&self, error: &E) -> ErrorClass {
        match self.0.classify(error) {
            ErrorClass::TransientNotRepeatable => ErrorClass::Transient,
            other => other,
        }
    }

    fn classify_timeout(&self, elapsed: &Elapsed) -> ErrorClass {
        match self.0.classify_timeout(elapsed) {
            ErrorClass::TransientNotRepeatable => ErrorClass::Transient,
            other => other,
        }
    }

    fn breaker_outcome(&self, error: &E) -> Outcome {
        self.0.breaker_outcome(error)
    }

    fn unavailable_wait(&self, error: &E) -> Option<Duration> {
        self.0.unavailable_wait(error)
    }
}

/// Classifies every error as transient: retry anything (mostly for tests and
/// reads with no side effects).
#[derive(Clone, Copy, Debug, Default)]
pub struct AlwaysTransient;

impl<E: ?Sized> Classify<E> for AlwaysTransient {
    fn classify(&self, _error: &E) -> ErrorClass {
        ErrorClass::Transient
    }

    fn classify_timeout(&self, _elapsed: &Elapsed) -> ErrorClass {
        ErrorClass::Transient
    }
}
