//! A timeout combinator with its own error.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// The error of a [`Timeout`]: the work did not finish in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {after:?}")]
#[non_exhaustive]
pub struct Elapsed {
    /// The time limit that ran out.
    pub after: Duration,
}

pin_project! {
    /// A future that fails with [`Elapsed`] when `inner` does not finish within
    /// its time limit. Made by [`timeout`].
    ///
    /// The inner future is dropped (cancelled) when the timer fires.
    #[must_use = "futures do nothing unless polled"]
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Sleep,
        after: Duration,
    }
}

/// Runs `future` with a time limit: `Ok(output)` if it finishes within
/// `after`, `Err(Elapsed)` otherwise. The inner future is polled first, so
/// work that is ready when the limit runs out still counts.
///
/// ```
/// use std::time::Duration;
/// use pgstack_resilience::timeout;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let slow = tokio::time::sleep(Duration::from_secs(10));
/// let err = timeout(Duration::from_millis(250), slow).await.unwrap_err();
/// assert_eq!(err.to_string(), "timed out after 250ms");
/// # }
/// ```
pub fn timeout<F: Future>(after: Duration, future: F) -> Timeout<F> {
    let deadline = Instant::now().checked_add(after);
    // A limit too far away to represent is no limit; tokio caps far deadlines.
    let sleep = match deadline {
        Some(at) => tokio::time::sleep_until(at),
        None => tokio::time::sleep(Duration::from_secs(60 * 60 * 24 * 365 * 30)),
    };
    Timeout {
        inner: future,
        sleep,
        after,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed { after: *this.after })),
            Poll::Pending => Poll::Pending,
        }
    }
}
