//! Rows read as they arrive: [`RowStream`], from
//! [`crate::PooledConnection::query_raw`], [`crate::Transaction::query_raw`]
//! and [`crate::PooledConnection::into_row_stream`].

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio_postgres::{Error, Row};

use crate::conn::{PgConnection, PooledConnection};

/// Who keeps the connection a stream reads from.
pub(crate) enum Holder<'a> {
    /// A checkout or a transaction the caller keeps.
    Borrowed(&'a PgConnection),
    /// The checkout itself, returned to the pool when the stream is dropped.
    Owned(Box<PooledConnection>),
}

/// The rows of one statement, read from the socket as the stream is polled.
///
/// tokio-postgres hands rows over through a channel of one message, so the
/// connection stops reading the socket while the stream is not polled, and
/// the server waits: memory stays bounded whatever the number of rows.
///
/// The connection counts as having a statement in flight until the stream
/// has ended (its last row read, or an error). A stream dropped half-read
/// leaves it flagged: the pool rolls it back after the rest of the reply
/// (tokio-postgres discards it) before anyone else gets it, and closes it if
/// that takes longer than the cleanup timeout.
pub struct RowStream<'a> {
    inner: Pin<Box<tokio_postgres::RowStream>>,
    holder: Holder<'a>,
    done: bool,
}

impl fmt::Debug for RowStream<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowStream")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<'a> RowStream<'a> {
    pub(crate) fn new(inner: tokio_postgres::RowStream, holder: Holder<'a>) -> Self {
        RowStream {
            inner: Box::pin(inner),
            holder,
            done: false,
        }
    }

    fn pg(&self) -> &PgConnection {
        match &self.holder {
            Holder::Borrowed(pg) => pg,
            Holder::Owned(conn) => conn.pg(),
        }
    }

    /// The number of rows the statement affected, once the stream has ended
    /// (`None` before).
    pub fn rows_affected(&self) -> Option<u64> {
        self.inner.rows_affected()
    }

    /// Whether the stream has ended (its last row read, or an error).
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl Stream for RowStream<'_> {
    type Item = Result<Row, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                this.done = true;
                this.pg().in_flight.fetch_sub(1, Ordering::AcqRel);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                this.done = true;
                let result = Err(error);
                this.pg().after_request::<Row>(&result);
                Poll::Ready(Some(result))
            }
            other => other,
        }
    }
}
