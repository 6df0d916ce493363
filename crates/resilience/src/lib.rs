//! Retry, circuit breaker and timeouts for any async operation.
//!
//! This crate knows nothing about databases: the caller says what its errors
//! mean through [`Classify`], and names its operations and breakers.
//!
//! - [`RetryPolicy`]: attempts, exponential backoff with jitter, an overall
//!   deadline and a [`RetryBudget`] shared across calls. Built from
//!   [`pgstack_config::RetrySettings`].
//! - [`CircuitBreaker`]: count- or time-based sliding window, failure-rate and
//!   slow-call-rate thresholds, growing open durations, an exact number of
//!   half-open probes, forced states, and transitions published to tracing,
//!   the `pgstack_circuit_state` gauge and subscribers. Built from
//!   [`pgstack_config::CircuitBreakerSettings`].
//! - [`timeout`]: a per-attempt time limit with its own error, [`Elapsed`].
//! - [`Pipeline`]: retry ( breaker ( timeout ( operation ) ) ).
//!
//! # Retry
//!
//! ```
//! use pgstack_config::RetrySettings;
//! use pgstack_resilience::{ErrorClass, GiveUpReason, RetryPolicy};
//!
//! #[derive(Debug)]
//! enum Error { Refused, BadInput }
//! impl std::fmt::Display for Error {
//!     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
//!         write!(f, "{self:?}")
//!     }
//! }
//! impl std::error::Error for Error {}
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = RetryPolicy::from_settings(&RetrySettings { max_attempts: 4, ..Default::default() })?;
//! let classify = |e: &Error| match e {
//!     Error::Refused => ErrorClass::Transient,
//!     Error::BadInput => ErrorClass::Permanent,
//! };
//!
//! // Transient errors are retried with backoff ...
//! let value = policy
//!     .run("load-user", &classify, |attempt| async move {
//!         if attempt < 3 { Err(Error::Refused) } else { Ok("alice") }
//!     })
//!     .await?;
//! assert_eq!(value, "alice");
//!
//! // ... permanent ones are handed back at once, with the attempt count.
//! let err = policy
//!     .run("load-user", &classify, |_| async { Err::<(), _>(Error::BadInput) })
//!     .await
//!     .unwrap_err();
//! assert_eq!((err.attempts, err.reason), (1, GiveUpReason::Permanent));
//! # Ok(()) }
//! ```
//!
//! # Circuit breaker
//!
//! ```
//! use std::time::Duration;
//! use pgstack_config::CircuitBreakerSettings;
//! use pgstack_resilience::{BreakerError, BreakerState, CircuitBreaker};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = CircuitBreakerSettings {
//!     minimum_calls: 4,
//!     window_size: 10,
//!     open_duration: Duration::from_secs(5),
//!     half_open_probes: 1,
//!     ..Default::default()
//! };
//! let breaker = CircuitBreaker::new("primary", &settings)?;
//! let mut transitions = breaker.subscribe();
//!
//! for _ in 0..4 {
//!     let _ = breaker.call(async { Err::<(), _>(std::io::Error::other("refused")) }).await;
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! assert_eq!(transitions.recv().await?.to, BreakerState::Open);
//!
//! // While open, calls fail at once with the breaker's name and the probe time.
//! match breaker.call(async { Ok::<_, std::io::Error>(()) }).await {
//!     Err(BreakerError::Rejected(r)) => assert_eq!(r.probe_in(), Some(Duration::from_secs(5))),
//!     other => panic!("expected a rejection, got {other:?}"),
//! }
//!
//! // After the open duration, one probe goes through; its success closes the breaker.
//! tokio::time::advance(Duration::from_secs(5)).await;
//! breaker.call(async { Ok::<_, std::io::Error>(()) }).await?;
//! assert_eq!(breaker.state(), BreakerState::Closed);
//! # Ok(()) }
//! ```
//!
//! Work that is not one future (a pooled connection checked out, used, and
//! returned) takes a [`Permit`] with [`CircuitBreaker::acquire`] and records
//! its [`Outcome`] later; a dropped permit records nothing and frees its
//! half-open slot.
//!
//! # Clock
//!
//! All time comes from [`tokio::time::Instant`], so tests can run on tokio's
//! paused clock.

mod backoff;
mod breaker;
mod budget;
mod classify;
mod error;
mod pipeline;
mod retry;
mod timeout;
mod window;

pub use crate::backoff::Backoff;
pub use crate::breaker::{
    AnyErrorFails, BreakerError, BreakerPolicy, BreakerSnapshot, BreakerState, Call,
    CircuitBreaker, Outcome, OwnedPermit, Permit, Rejected, STATE_METRIC, Transition,
    TransitionReason,
};
pub use crate::budget::RetryBudget;
pub use crate::classify::{AlwaysTransient, Classify, ErrorClass, Idempotent};
pub use crate::error::{InvalidSetting, InvalidSettings};
pub use crate::pipeline::{AttemptError, Pipeline};
pub use crate::retry::{GiveUpReason, RETRIES_METRIC, RetryError, RetryPolicy};
pub use crate::timeout::{Elapsed, Timeout, timeout};
