//! The one query surface: [`Queryable`], implemented by the routed handle
//! ([`Routed`], from [`Cluster::on`]), [`Connection`] and [`Transaction`];
//! declared statements ([`Statement`], run through [`Cluster::run`] as a
//! [`Bound`]); rows read as they arrive ([`RowStream`]).

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::cluster::Cluster;
use crate::conn::{self, Got, Want};
use crate::error::Error;
use crate::route::{Op, Route};
use crate::row::FromRow;

/// The query methods of everything that runs statements: the routed handle
/// ([`Cluster::on`], [`Cluster::run`]'s statements go through it too), a
/// [`crate::Connection`] of one's own and a [`crate::Transaction`]. Write
/// code once for all three with `&impl Queryable`:
///
/// ```no_run
/// use pgstack_connection::{Cluster, Error, FromRow, Queryable, Route, RowError, column};
/// # use pgstack_connection::tokio_postgres::Row;
///
/// struct Bill { id: i64, amount: i64 }
/// # impl FromRow for Bill {
/// #     fn from_row(row: &Row) -> Result<Self, RowError> {
/// #         Ok(Bill { id: column(row, "id")?, amount: column(row, "amount")? })
/// #     }
/// # }
///
/// async fn unpaid(db: &impl Queryable) -> Result<Vec<Bill>, Error> {
///     db.query_as("SELECT id, amount FROM bills WHERE NOT paid", &[]).await
/// }
///
/// # async fn run(cluster: Cluster) -> Result<(), Error> {
/// let bills = unpaid(&cluster.on("unpaid-bills", Route::Read)).await?;
/// cluster
///     .transaction("pay-all", async |tx| {
///         for bill in unpaid(tx).await? {
///             tx.execute("UPDATE bills SET paid = true WHERE id = $1", &[&bill.id]).await?;
///         }
///         Ok::<_, Error>(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
///
/// Where a statement runs, what is retried and how each round trip is
/// bounded depends on the implementor: see `docs/connection.md`. Every
/// future is `Send`. The trait is sealed: only this crate implements it.
pub trait Queryable: sealed::Sealed {
    /// Runs a statement and returns its rows.
    ///
    /// # Errors
    /// [`Error::Database`] for a server error, [`Error::Connection`] when the
    /// connection broke, [`Error::Timeout`] past `query.statement_timeout`
    /// plus a margin, [`Error::Usage`] for a refused statement; the routed
    /// handle's errors after its retries (see [`Routed`]).
    fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            Ok(conn::rows(fetched.got))
        }
    }

    /// Runs a statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`Queryable::query`], and [`Error::UnexpectedRows`] for any other
    /// number of rows.
    fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            one(conn::rows(fetched.got), &fetched.node, self.operation())
        }
    }

    /// Runs a statement that returns at most one row.
    ///
    /// # Errors
    /// As [`Queryable::query`], and [`Error::UnexpectedRows`] for more rows.
    fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            opt(conn::rows(fetched.got), &fetched.node, self.operation())
        }
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`Queryable::query`].
    fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Count).await?;
            Ok(conn::count(fetched.got))
        }
    }

    /// Runs a statement and reads every row into a `T` ([`FromRow`]:
    /// columns by name).
    ///
    /// # Errors
    /// As [`Queryable::query`], and [`Error::RowMapping`] (the column, the
    /// Rust and the PostgreSQL types) for a row that does not fit `T`.
    fn query_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<T>, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            conn::rows(fetched.got)
                .iter()
                .map(|row| {
                    T::from_row(row)
                        .map_err(|e| Error::row_mapping(e, &fetched.node, self.operation()))
                })
                .collect()
        }
    }

    /// Runs a statement that returns exactly one row, read into a `T`.
    ///
    /// # Errors
    /// As [`Queryable::query_as`], and [`Error::UnexpectedRows`].
    fn query_one_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<T, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            let row = one(conn::rows(fetched.got), &fetched.node, self.operation())?;
            T::from_row(&row).map_err(|e| Error::row_mapping(e, &fetched.node, self.operation()))
        }
    }

    /// Runs a statement that returns at most one row, read into a `T`.
    ///
    /// # Errors
    /// As [`Queryable::query_as`], and [`Error::UnexpectedRows`].
    fn query_opt_as<T: FromRow + Send>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<T>, Error>> + Send {
        async move {
            let fetched = self.fetch(sql, params, Want::Rows).await?;
            match opt(conn::rows(fetched.got), &fetched.node, self.operation())? {
                None => Ok(None),
                Some(row) => T::from_row(&row)
                    .map(Some)
                    .map_err(|e| Error::row_mapping(e, &fetched.node, self.operation())),
            }
        }
    }

    /// Runs a statement and hands back its rows as they arrive, with
    /// back-pressure: rows are read from the socket only as the stream is
    /// polled, so a large result is never held in memory at once (see
    /// [`RowStream`]). Dropping the stream stops reading.
    ///
    /// The routed handle runs it on a connection of its own (never a shared,
    /// pipelined one: a half-read stream would hold up everyone behind it),
    /// kept until the stream is dropped; a [`crate::Connection`] or a
    /// [`crate::Transaction`] runs it on theirs, which it borrows. Only the
    /// checkout is retried, never the statement.
    ///
    /// # Errors
    /// As [`Queryable::query`], before the first row; each item of the
    /// stream is a row or the error that ended it ([`Error::Timeout`] when
    /// no row arrived within the round-trip bound while the stream waited).
    fn query_stream<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<RowStream<'a>, Error>> + Send + 'a {
        self.stream(sql, params)
    }
}

impl<Q: sealed::Sealed> Queryable for Q {}

pub(crate) mod sealed {
    use super::*;

    /// What one statement handed back, and the node it ran on.
    pub struct Fetched {
        pub(crate) got: Got,
        pub(crate) node: Arc<str>,
    }

    /// What an implementor of [`Queryable`] provides: one statement, one
    /// stream, and the operation's name for errors.
    pub trait Sealed: Sync {
        /// Runs one statement.
        fn fetch<'a>(
            &'a self,
            sql: &'a str,
            params: &'a [&'a (dyn ToSql + Sync)],
            want: Want,
        ) -> impl Future<Output = Result<Fetched, Error>> + Send + 'a;

        /// Runs one statement as a stream.
        fn stream<'a>(
            &'a self,
            sql: &'a str,
            params: &'a [&'a (dyn ToSql + Sync)],
        ) -> impl Future<Output = Result<RowStream<'a>, Error>> + Send + 'a;

        /// The operation's name.
        fn operation(&self) -> &str;
    }
}

fn one(rows: Vec<Row>, node: &Arc<str>, op: &str) -> Result<Row, Error> {
    let got = rows.len();
    let mut rows = rows.into_iter();
    match (rows.next(), got) {
        (Some(row), 1) => Ok(row),
        _ => Err(Error::UnexpectedRows {
            node: Arc::clone(node),
            operation: op.to_owned(),
            expected: "exactly one row",
            got,
        }),
    }
}

fn opt(rows: Vec<Row>, node: &Arc<str>, op: &str) -> Result<Option<Row>, Error> {
    let got = rows.len();
    if got > 1 {
        return Err(Error::UnexpectedRows {
            node: Arc::clone(node),
            operation: op.to_owned(),
            expected: "at most one row",
            got,
        });
    }
    Ok(rows.into_iter().next())
}

/// Statements for one operation on the node a route picks: the handle of
/// [`Queryable`] for statements outside any transaction. From
/// [`Cluster::on`]; cheap (a reference, the operation and the route), `Send`
/// and `Sync`.
///
/// Plain reads and writes share a few pipelined connections per node; other
/// statements (DDL, `COPY`, `DO`, ...) take a connection of their own;
/// statements that control transactions or change or read the session
/// (`BEGIN`, `SET`, temporary tables, `LISTEN`, `currval`, ...) are refused
/// ([`Error::Usage`], saying what to use instead). Retried as
/// `docs/connection.md` says: reads on any transient error, writes only when
/// nothing was sent or the operation is [`Op::idempotent`]; a write whose
/// connection was lost in flight gives [`Error::CommitOutcomeUnknown`].
#[derive(Clone, Debug)]
pub struct Routed<'c> {
    cluster: &'c Cluster,
    op: Op,
    route: Route,
}

impl Routed<'_> {
    /// [`Queryable::query_stream`], with a stream that outlives this handle
    /// (it keeps its connection of its own): `db.on(..).query_stream(..)`
    /// needs no handle kept beside it.
    ///
    /// # Errors
    /// As [`Queryable::query_stream`].
    pub async fn query_stream(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream<'static>, Error> {
        self.cluster.stream(&self.op, self.route, sql, params).await
    }

    /// The operation.
    pub fn op(&self) -> &Op {
        &self.op
    }

    /// The route.
    pub fn route(&self) -> Route {
        self.route
    }
}

impl sealed::Sealed for Routed<'_> {
    async fn fetch<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
        want: Want,
    ) -> Result<sealed::Fetched, Error> {
        let ((got, _), node) = self
            .cluster
            .statement(&self.op, self.route, sql, params, want, false)
            .await?;
        Ok(sealed::Fetched {
            got,
            node: Arc::clone(node.name_arc()),
        })
    }

    async fn stream<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn ToSql + Sync)],
    ) -> Result<RowStream<'a>, Error> {
        let stream = Routed::query_stream(self, sql, params).await?;
        Ok(stream)
    }

    fn operation(&self) -> &str {
        self.op.name()
    }
}

impl Cluster {
    /// The handle for statements of operation `op` on the node `route`
    /// picks: `cluster.on("fetch-bills", Route::Read).query_as::<Bill>(..)`.
    /// See [`Routed`] and [`Queryable`].
    pub fn on(&self, op: impl Into<Op>, route: Route) -> Routed<'_> {
        Routed {
            cluster: self,
            op: op.into(),
            route,
        }
    }

    /// The handle for a declared statement: its name, route, idempotency
    /// and text said once ([`Statement`]).
    pub fn run(&self, statement: &Statement) -> Bound<'_> {
        Bound {
            routed: self.on(statement.op(), statement.route),
            sql: statement.sql,
        }
    }
}

/// A statement declared once, as a constant: its operation name, route,
/// idempotency and text. The text is the statement-cache key.
///
/// ```no_run
/// use pgstack_connection::{Cluster, Error, Queryable, Statement};
///
/// const UNPAID: Statement = Statement::read("unpaid-bills", "SELECT id FROM bills WHERE NOT paid");
/// const TOUCH: Statement =
///     Statement::write("touch-bill", "UPDATE bills SET seen = true WHERE id = $1").idempotent();
///
/// # async fn run(cluster: Cluster) -> Result<(), Error> {
/// let unpaid = cluster.run(&UNPAID).query(&[]).await?;
/// cluster.run(&TOUCH).execute(&[&7_i64]).await?;
/// // Inside a transaction (or on a connection), its text is a `&str`.
/// cluster.transaction("touch-all", async |tx| {
///     tx.execute(&TOUCH, &[&8_i64]).await?;
///     Ok::<_, Error>(())
/// }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Statement {
    name: &'static str,
    sql: &'static str,
    route: Route,
    idempotent: bool,
}

impl Statement {
    /// A read: routed as [`Route::Read`], retried on transient errors.
    pub const fn read(name: &'static str, sql: &'static str) -> Statement {
        Statement {
            name,
            sql,
            route: Route::Read,
            idempotent: false,
        }
    }

    /// A write: on the primary, retried only when nothing was sent (unless
    /// [`Statement::idempotent`]).
    pub const fn write(name: &'static str, sql: &'static str) -> Statement {
        Statement {
            name,
            sql,
            route: Route::Write,
            idempotent: false,
        }
    }

    /// Safe to repeat even when it may have taken effect ([`Op::idempotent`]).
    #[must_use]
    pub const fn idempotent(mut self) -> Statement {
        self.idempotent = true;
        self
    }

    /// The operation's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The statement's text.
    pub const fn sql(&self) -> &'static str {
        self.sql
    }

    /// Its route.
    pub const fn route(&self) -> Route {
        self.route
    }

    /// Whether it is marked idempotent.
    pub const fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// Its operation (the name, and idempotency).
    pub fn op(&self) -> Op {
        let op = Op::new(self.name);
        if self.idempotent { op.idempotent() } else { op }
    }
}

/// The text, so a declared statement runs on a transaction or a connection
/// as `tx.execute(&TOUCH, ..)`.
impl Deref for Statement {
    type Target = str;

    fn deref(&self) -> &str {
        self.sql
    }
}

/// A declared [`Statement`] ready to run: [`Queryable`]'s methods without
/// the text. From [`Cluster::run`].
#[derive(Clone, Debug)]
pub struct Bound<'c> {
    routed: Routed<'c>,
    sql: &'static str,
}

impl<'c> Bound<'c> {
    /// The statement on another route: [`Route::ReadAfter`] to read a write
    /// of one's own wherever the read lands.
    #[must_use]
    pub fn route(mut self, route: Route) -> Self {
        self.routed.route = route;
        self
    }

    /// [`Queryable::query`].
    ///
    /// # Errors
    /// As [`Queryable::query`].
    pub async fn query(&self, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        self.routed.query(self.sql, params).await
    }

    /// [`Queryable::query_one`].
    ///
    /// # Errors
    /// As [`Queryable::query_one`].
    pub async fn query_one(&self, params: &[&(dyn ToSql + Sync)]) -> Result<Row, Error> {
        self.routed.query_one(self.sql, params).await
    }

    /// [`Queryable::query_opt`].
    ///
    /// # Errors
    /// As [`Queryable::query_opt`].
    pub async fn query_opt(&self, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, Error> {
        self.routed.query_opt(self.sql, params).await
    }

    /// [`Queryable::execute`].
    ///
    /// # Errors
    /// As [`Queryable::execute`].
    pub async fn execute(&self, params: &[&(dyn ToSql + Sync)]) -> Result<u64, Error> {
        self.routed.execute(self.sql, params).await
    }

    /// [`Queryable::query_as`].
    ///
    /// # Errors
    /// As [`Queryable::query_as`].
    pub async fn query_as<T: FromRow + Send>(
        &self,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<T>, Error> {
        self.routed.query_as(self.sql, params).await
    }

    /// [`Queryable::query_one_as`].
    ///
    /// # Errors
    /// As [`Queryable::query_one_as`].
    pub async fn query_one_as<T: FromRow + Send>(
        &self,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, Error> {
        self.routed.query_one_as(self.sql, params).await
    }

    /// [`Queryable::query_opt_as`].
    ///
    /// # Errors
    /// As [`Queryable::query_opt_as`].
    pub async fn query_opt_as<T: FromRow + Send>(
        &self,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<T>, Error> {
        self.routed.query_opt_as(self.sql, params).await
    }

    /// [`Queryable::query_stream`].
    ///
    /// # Errors
    /// As [`Queryable::query_stream`].
    pub async fn query_stream(
        &self,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream<'static>, Error> {
        self.routed.query_stream(self.sql, params).await
    }
}

/// Where a stream's rows come from.
enum Source<'a> {
    /// Read from the socket as polled.
    Live(pgstack_pool::RowStream<'a>),
    /// Read already (without prepared statements, behind a transaction-mode
    /// pooler, the statement runs on the unnamed statement in one round
    /// trip).
    Read(std::vec::IntoIter<Row>),
}

/// Told when a stream inside a transaction fails (the transaction is
/// doomed) and when it ends; one dropped before its end leaves the
/// transaction's state unseen.
pub(crate) trait StreamWatch: Sync {
    fn failed(&self, sql: &str, error: &Error);
    fn ended(&self);
}

/// The rows of one statement, from [`Queryable::query_stream`]: a
/// [`Stream`] of `Result<Row, Error>`, read from the socket as it is polled
/// (tokio-postgres hands rows over one message at a time, so the server
/// waits while the stream is not read: memory stays bounded whatever the
/// number of rows).
///
/// Dropping it stops reading; the connection it held is rolled back (after
/// the rest of the reply, which is discarded) before anyone else gets it,
/// or closed when that takes longer than the pool's cleanup timeout. With
/// `query.prepared_statements = false` the rows are read at once (the
/// unnamed statement runs in one round trip) and handed out from memory.
pub struct RowStream<'a> {
    source: Source<'a>,
    node: Arc<str>,
    op: Op,
    limit: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    done: bool,
    watch: Option<(&'a dyn StreamWatch, String)>,
}

impl fmt::Debug for RowStream<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowStream")
            .field("node", &self.node)
            .field("operation", &self.op.name())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<'a> RowStream<'a> {
    pub(crate) fn live(
        stream: pgstack_pool::RowStream<'a>,
        node: &Arc<str>,
        op: &Op,
        limit: Option<Duration>,
    ) -> Self {
        Self::new(Source::Live(stream), node, op, limit)
    }

    pub(crate) fn read(rows: Vec<Row>, node: &Arc<str>, op: &Op) -> Self {
        Self::new(Source::Read(rows.into_iter()), node, op, None)
    }

    fn new(source: Source<'a>, node: &Arc<str>, op: &Op, limit: Option<Duration>) -> Self {
        RowStream {
            source,
            node: Arc::clone(node),
            op: op.clone(),
            limit,
            timer: None,
            waiting: false,
            done: false,
            watch: None,
        }
    }

    pub(crate) fn watched(mut self, watch: &'a dyn StreamWatch, sql: &str) -> Self {
        self.watch = Some((watch, sql.to_owned()));
        self
    }

    /// The node it reads from.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The number of rows the statement affected, once the stream has ended.
    pub fn rows_affected(&self) -> Option<u64> {
        match &self.source {
            Source::Live(stream) => stream.rows_affected(),
            Source::Read(_) => None,
        }
    }

    fn fail(&mut self, error: Error) -> Poll<Option<Result<Row, Error>>> {
        if let Some((watch, sql)) = &self.watch {
            watch.failed(sql, &error);
        }
        self.end();
        Poll::Ready(Some(Err(error)))
    }

    /// No more rows: told once to the watch.
    fn end(&mut self) {
        if !self.done {
            self.done = true;
            if let Some((watch, _)) = &self.watch {
                watch.ended();
            }
        }
    }
}

impl Stream for RowStream<'_> {
    type Item = Result<Row, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let stream = match &mut this.source {
            Source::Read(rows) => {
                let next = rows.next();
                if next.is_none() {
                    this.end();
                }
                return Poll::Ready(next.map(Ok));
            }
            Source::Live(stream) => stream,
        };
        match Pin::new(stream).poll_next(cx) {
            Poll::Ready(Some(Ok(row))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(row)))
            }
            Poll::Ready(Some(Err(e))) => {
                let error = Error::from_postgres(e, &this.node, this.op.name(), true);
                this.fail(error)
            }
            Poll::Ready(None) => {
                this.end();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(limit) = this.limit else {
                    return Poll::Pending;
                };
                // The bound runs while the stream waits for the server, not
                // while the caller works on the last row.
                let deadline = tokio::time::Instant::now() + limit;
                if !this.waiting {
                    this.waiting = true;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let expired = match &mut this.timer {
                    Some(timer) => timer.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    let error = Error::Timeout {
                        node: Arc::clone(&this.node),
                        operation: this.op.name().to_owned(),
                        after: limit,
                    };
                    this.fail(error)
                } else {
                    Poll::Pending
                }
            }
        }
    }
}
