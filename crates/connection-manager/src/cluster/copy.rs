//! COPY: `COPY … FROM STDIN` as a sink of bytes or a writer of typed rows,
//! `COPY … TO STDOUT` as a stream of bytes, each on a connection of its own
//! (never a shared one). A copy abandoned half-way (its sink or stream
//! dropped before the end) closes its connection instead of returning it
//! to the pool: the server rolls the `COPY` back, and nobody waits behind
//! the rest of its data.

use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{CopyInSink, CopyOutStream};

use super::*;

/// A call counted in flight for as long as a copy lives, so
/// [`Cluster::close`] waits for it (up to its deadline).
struct OwnedWork(Arc<ClusterInner>);

impl Drop for OwnedWork {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1
            && self.0.closing.load(Ordering::Acquire)
        {
            self.0.drained.notify_waiters();
        }
    }
}

/// What a copy holds on to: for one made by the cluster, its connection
/// (closed when the copy is abandoned) and its place among the calls in
/// flight; for one made on a [`Connection`], nothing (the caller keeps the
/// connection; the pool cleans it up when it is dropped).
struct Holder {
    conn: Option<PooledConnection>,
    _work: Option<OwnedWork>,
    node: Node,
    op: Op,
    /// The copy ran to its end (or failed with the protocol in step).
    done: bool,
}

impl Holder {
    fn error(&self, e: tokio_postgres::Error) -> Error {
        Error::from_postgres(e, self.node.name_arc(), self.op.name(), true)
    }

    /// The copy is over: the connection goes back to the pool (which rolls
    /// it back and resets it, off the caller's path).
    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.done
        {
            tracing::debug!(
                node = self.node.name(),
                op = self.op.name(),
                "copy abandoned half-way; closing its connection"
            );
            conn.discard();
        }
    }
}

/// `COPY … FROM STDIN` in text or CSV: a [`Sink`] of bytes
/// ([`Cluster::copy_in`], [`Connection::copy_in`]).
///
/// Send the data in any pieces (rows need not be aligned with them), then
/// call [`CopyIn::finish`]: the rows are committed together, and the count
/// comes back. A malformed row fails the whole `COPY` (the error names the
/// line and column: [`crate::DbError::context`]), and nothing of it is kept.
/// Dropped before `finish`, the copy is aborted: nothing is kept, and its
/// connection is closed.
pub struct CopyIn<'a> {
    sink: Pin<Box<CopyInSink<Bytes>>>,
    holder: Holder,
    _conn: PhantomData<&'a mut Connection>,
}

impl fmt::Debug for CopyIn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyIn")
            .field("node", &self.holder.node.name())
            .field("operation", &self.holder.op.name())
            .finish_non_exhaustive()
    }
}

impl CopyIn<'_> {
    /// Sends one piece of data (any number of rows, or part of one).
    ///
    /// # Errors
    /// [`Error::Database`] when the server refused the data so far;
    /// [`Error::Connection`] when the connection broke.
    pub async fn send(&mut self, data: impl Into<Bytes>) -> Result<(), Error> {
        SinkExt::send(self, data.into()).await
    }

    /// Ends the copy and returns the number of rows copied: they are
    /// committed now.
    ///
    /// # Errors
    /// As [`CopyIn::send`]; nothing of the copy is kept then.
    pub async fn finish(mut self) -> Result<u64, Error> {
        let result = self.sink.as_mut().finish().await;
        match result {
            Ok(rows) => {
                self.holder.done();
                Ok(rows)
            }
            Err(e) => {
                // A server error leaves the protocol in step.
                if e.as_db_error().is_some() {
                    self.holder.done();
                }
                Err(self.holder.error(e))
            }
        }
    }
}

impl Sink<Bytes> for CopyIn<'_> {
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        this.sink
            .as_mut()
            .poll_ready(cx)
            .map_err(|e| this.holder.error(e))
    }

    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> Result<(), Error> {
        let this = &mut *self;
        this.sink
            .as_mut()
            .start_send(item)
            .map_err(|e| this.holder.error(e))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        this.sink
            .as_mut()
            .poll_flush(cx)
            .map_err(|e| this.holder.error(e))
    }

    /// Ends the copy, as [`CopyIn::finish`] (without the row count).
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = &mut *self;
        match this.sink.as_mut().poll_close(cx) {
            Poll::Ready(Ok(())) => {
                this.holder.done();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.holder.error(e))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `COPY … FROM STDIN (FORMAT binary)` fed with typed rows
/// ([`Cluster::copy_in_binary`], [`Connection::copy_in_binary`]), through
/// tokio-postgres's `BinaryCopyInWriter`: each row is a slice of values in
/// the column types given. As [`CopyIn`], nothing is kept unless
/// [`BinaryCopyIn::finish`] succeeds.
pub struct BinaryCopyIn<'a> {
    writer: Pin<Box<BinaryCopyInWriter>>,
    holder: Holder,
    _conn: PhantomData<&'a mut Connection>,
}

impl fmt::Debug for BinaryCopyIn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BinaryCopyIn")
            .field("node", &self.holder.node.name())
            .field("operation", &self.holder.op.name())
            .finish_non_exhaustive()
    }
}

impl BinaryCopyIn<'_> {
    /// Writes one row (one value per column, in the types given).
    ///
    /// # Errors
    /// [`Error::Client`] for a value that does not fit its column's type;
    /// [`Error::Database`] / [`Error::Connection`] as [`CopyIn::send`].
    pub async fn write(&mut self, row: &[&(dyn ToSql + Sync)]) -> Result<(), Error> {
        let result = self.writer.as_mut().write(row).await;
        result.map_err(|e| self.holder.error(e))
    }

    /// Ends the copy and returns the number of rows copied (committed now).
    ///
    /// # Errors
    /// As [`BinaryCopyIn::write`]; nothing of the copy is kept then.
    pub async fn finish(mut self) -> Result<u64, Error> {
        let result = self.writer.as_mut().finish().await;
        match result {
            Ok(rows) => {
                self.holder.done();
                Ok(rows)
            }
            Err(e) => {
                if e.as_db_error().is_some() {
                    self.holder.done();
                }
                Err(self.holder.error(e))
            }
        }
    }
}

/// `COPY … TO STDOUT`: a [`Stream`] of the data in pieces as the server
/// sends them ([`Cluster::copy_out`], [`Connection::copy_out`]), with
/// back-pressure (nothing is read ahead of the consumer beyond the socket's
/// buffers). Dropped before its end, the copy is abandoned and its
/// connection closed.
pub struct CopyOut<'a> {
    stream: Pin<Box<CopyOutStream>>,
    holder: Holder,
    _conn: PhantomData<&'a mut Connection>,
}

impl fmt::Debug for CopyOut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyOut")
            .field("node", &self.holder.node.name())
            .field("operation", &self.holder.op.name())
            .finish_non_exhaustive()
    }
}

impl Stream for CopyOut<'_> {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.stream.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                this.holder.done();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(data))) => Poll::Ready(Some(Ok(data))),
            Poll::Ready(Some(Err(e))) => {
                if e.as_db_error().is_some() {
                    this.holder.done();
                }
                Poll::Ready(Some(Err(this.holder.error(e))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Refuses a statement that is not a `COPY` (tokio-postgres would take the
/// server's answer for a broken connection).
fn check_copy(sql: &str, op: &Op) -> Result<(), Error> {
    match pgstack_pool::first_keyword(sql) {
        Some(word) if word.eq_ignore_ascii_case("copy") => Ok(()),
        _ => Err(Error::Usage {
            operation: op.name().to_owned(),
            problem: format!(
                "`{}` is not a COPY statement; copy_in takes `COPY … FROM STDIN`, copy_out \
                 `COPY … TO STDOUT`",
                conn::excerpt(sql)
            ),
        }),
    }
}

/// Starts a copy on `client`, bounded by the round-trip limit.
async fn start<T>(
    limit: Option<Duration>,
    node: &Node,
    op: &Op,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    conn::bounded!(limit, node, op, async {
        work.await
            .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), true))
    })
}

impl Cluster {
    /// Counts a copy among the calls in flight for as long as it lives.
    fn begin_owned(&self, op: &Op) -> Result<OwnedWork, Error> {
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let work = OwnedWork(Arc::clone(&self.inner));
        if self.is_closing() {
            return Err(Error::ShuttingDown {
                operation: op.name().to_owned(),
            });
        }
        Ok(work)
    }

    /// A connection of its own for a copy: the checkout is retried as
    /// [`Cluster::connection`]'s.
    async fn copy_connection(&self, op: &Op, route: Route) -> Result<(Holder, Node), Error> {
        let work = self.begin_owned(op)?;
        let conn = self.connection(op.clone(), route).await?;
        let node = conn.node.clone();
        let conn = conn.into_inner();
        Ok((
            Holder {
                conn: Some(conn),
                _work: Some(work),
                node: node.clone(),
                op: op.clone(),
                done: false,
            },
            node,
        ))
    }

    /// Starts `COPY … FROM STDIN` on a connection of its own on the primary:
    /// the checked statement sent, its sink open.
    async fn start_copy_in(
        &self,
        op: Op,
        sql: &str,
    ) -> Result<(Holder, tokio_postgres::CopyInSink<Bytes>), Error> {
        check_copy(sql, &op)?;
        let (mut holder, node) = self.copy_connection(&op, Route::Write).await?;
        let limit = self.inner.settings.round_trip;
        let sink = match holder.conn.as_mut() {
            Some(conn) => {
                let client = conn.client_unchecked();
                start(limit, &node, &op, client.copy_in::<_, Bytes>(sql)).await?
            }
            None => return Err(no_connection(&node, &op)),
        };
        Ok((holder, sink))
    }

    /// `COPY … FROM STDIN` (text or CSV) on a connection of its own on the
    /// primary: send the data through the returned [`CopyIn`], then
    /// [`CopyIn::finish`].
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// let mut copy = cluster
    ///     .copy_in("load-bills", "COPY bills (id, owner) FROM STDIN (FORMAT csv)")
    ///     .await?;
    /// copy.send("1,alice\n2,bob\n").await?;
    /// let rows = copy.finish().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::ShuttingDown`] after [`Cluster::close`]; as
    /// [`Cluster::connection`]; [`Error::Database`] when the server refused
    /// the statement.
    pub async fn copy_in(&self, op: impl Into<Op>, sql: &str) -> Result<CopyIn<'static>, Error> {
        let (holder, sink) = self.start_copy_in(op.into(), sql).await?;
        Ok(CopyIn {
            sink: Box::pin(sink),
            holder,
            _conn: PhantomData,
        })
    }

    /// `COPY … FROM STDIN (FORMAT binary)` on a connection of its own on the
    /// primary, fed with typed rows of the column `types`.
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// use pgstack_connection::tokio_postgres::types::Type;
    /// let mut copy = cluster
    ///     .copy_in_binary("load-bills", "COPY bills (id, owner) FROM STDIN (FORMAT binary)",
    ///                     &[Type::INT8, Type::TEXT])
    ///     .await?;
    /// copy.write(&[&1_i64, &"alice"]).await?;
    /// let rows = copy.finish().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Cluster::copy_in`].
    pub async fn copy_in_binary(
        &self,
        op: impl Into<Op>,
        sql: &str,
        types: &[Type],
    ) -> Result<BinaryCopyIn<'static>, Error> {
        let (holder, sink) = self.start_copy_in(op.into(), sql).await?;
        Ok(BinaryCopyIn {
            writer: Box::pin(BinaryCopyInWriter::new(sink, types)),
            holder,
            _conn: PhantomData,
        })
    }

    /// `COPY … TO STDOUT` on a connection of its own on the node `route`
    /// picks: the data as a [`Stream`] of bytes.
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// use futures_util::TryStreamExt;
    /// use pgstack_connection::Route;
    /// let mut out = cluster
    ///     .copy_out("export-bills", Route::Read, "COPY bills TO STDOUT (FORMAT csv)")
    ///     .await?;
    /// while let Some(chunk) = out.try_next().await? { /* write chunk somewhere */ }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Cluster::copy_in`].
    pub async fn copy_out(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
    ) -> Result<CopyOut<'static>, Error> {
        let op = op.into();
        check_copy(sql, &op)?;
        let (mut holder, node) = self.copy_connection(&op, route).await?;
        let limit = self.inner.settings.round_trip;
        let stream = match holder.conn.as_mut() {
            Some(conn) => {
                let client = conn.client_unchecked();
                start(limit, &node, &op, client.copy_out(sql)).await?
            }
            None => return Err(no_connection(&node, &op)),
        };
        Ok(CopyOut {
            stream: Box::pin(stream),
            holder,
            _conn: PhantomData,
        })
    }
}

fn no_connection(node: &Node, op: &Op) -> Error {
    Error::Unavailable {
        node: Arc::clone(node.name_arc()),
        operation: op.name().to_owned(),
        reason: "the copy's connection is gone".to_owned(),
    }
}

impl Connection {
    fn borrowed_holder(&self) -> Holder {
        Holder {
            conn: None,
            _work: None,
            node: self.node.clone(),
            op: self.op.clone(),
            done: false,
        }
    }

    /// `COPY … FROM STDIN` (text or CSV) on this connection (see
    /// [`CopyIn`]). Counts as a write of the call. Abandoned half-way, the
    /// copy is aborted (tokio-postgres sends `CopyFail`); the connection
    /// stays usable.
    ///
    /// # Errors
    /// As [`Cluster::copy_in`].
    pub async fn copy_in(&mut self, sql: &str) -> Result<CopyIn<'_>, Error> {
        let (holder, sink) = self.start_copy_in(sql).await?;
        Ok(CopyIn {
            sink: Box::pin(sink),
            holder,
            _conn: PhantomData,
        })
    }

    /// `COPY … FROM STDIN (FORMAT binary)` on this connection, fed with
    /// typed rows of the column `types` (see [`BinaryCopyIn`]).
    ///
    /// # Errors
    /// As [`Cluster::copy_in`].
    pub async fn copy_in_binary(
        &mut self,
        sql: &str,
        types: &[Type],
    ) -> Result<BinaryCopyIn<'_>, Error> {
        let (holder, sink) = self.start_copy_in(sql).await?;
        Ok(BinaryCopyIn {
            writer: Box::pin(BinaryCopyInWriter::new(sink, types)),
            holder,
            _conn: PhantomData,
        })
    }

    /// `COPY … TO STDOUT` on this connection (see [`CopyOut`]). Abandoned
    /// half-way, the rest of the data is still read off the socket before
    /// the connection's next statement runs; close a connection after
    /// abandoning a large copy (drop it with [`PooledConnection::discard`]
    /// through [`Connection::into_inner`]).
    ///
    /// # Errors
    /// As [`Cluster::copy_in`].
    pub async fn copy_out(&mut self, sql: &str) -> Result<CopyOut<'_>, Error> {
        check_copy(sql, &self.op)?;
        let holder = self.borrowed_holder();
        let (limit, node, op) = (self.limit, self.node.clone(), self.op.clone());
        let client = self.copy_client();
        let stream = start(limit, &node, &op, client.copy_out(sql)).await?;
        Ok(CopyOut {
            stream: Box::pin(stream),
            holder,
            _conn: PhantomData,
        })
    }

    /// Starts `COPY … FROM STDIN` on this connection: the checked statement
    /// sent, its sink open.
    async fn start_copy_in(
        &mut self,
        sql: &str,
    ) -> Result<(Holder, tokio_postgres::CopyInSink<Bytes>), Error> {
        check_copy(sql, &self.op)?;
        let holder = self.borrowed_holder();
        let (limit, node, op) = (self.limit, self.node.clone(), self.op.clone());
        let client = self.copy_client();
        let sink = start(limit, &node, &op, client.copy_in::<_, Bytes>(sql)).await?;
        Ok((holder, sink))
    }

    /// The raw client for a copy: the pool's connection marked for clean-up
    /// on return, and the call's record told (a write).
    fn copy_client(&mut self) -> &mut tokio_postgres::Client {
        // `DerefMut` records the raw use as a write.
        let conn: &mut PooledConnection = self;
        conn.client_unchecked()
    }
}
