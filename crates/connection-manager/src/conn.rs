//! Connections and transactions handed to callers. Their query methods
//! return [`Error`] (with the node and the operation), respect
//! `query.prepared_statements`, bound every round trip, and keep the
//! records the retry rules read: what the call may have done (a
//! [`Connection`]'s statements), and whether a transaction is doomed (a
//! [`Transaction`]'s first failed statement).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgstack_pool::{PooledConnection, StatementClass, XACT_PROBE_SQL, XactProbe, classify};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage};

use crate::error::Error;
use crate::node::Node;
use crate::query::sealed::{Fetched, Sealed};
use crate::query::{RowStream, StreamWatch};
use crate::record::{Record, Sent};
use crate::route::Op;

/// What a statement should hand back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Rows,
    Count,
}

/// What a statement handed back.
pub(crate) enum Got {
    Rows(Vec<Row>),
    Count(u64),
}

/// Runs one statement on anything with the pool's query methods (a
/// connection or a transaction): a cached named statement when prepared
/// statements are on, the unnamed statement with types taken from the
/// values when they are off. `$probe` (an `Option` of a future) is sent
/// right behind the statement, in the same round trip, once the statement's
/// request is on its way: a transaction's first write learns its id that
/// way.
macro_rules! run_statement {
    ($conn:expr, $prepared:expr, $sql:expr, $params:expr, $want:expr, $node:expr, $op:expr, $probe:expr) => {
        async {
            let conn = $conn;
            let node: &std::sync::Arc<str> = $node;
            let op: &str = $op;
            if $prepared {
                // Parse/Describe only: nothing ran if this fails.
                let statement = conn
                    .prepare_cached($sql)
                    .await
                    .map_err(|e| $crate::error::Error::from_postgres(e, node, op, false))?;
                let run = $crate::conn::run_prepared!(conn, &statement, $params, $want, node, op);
                match $probe {
                    None => run.await,
                    Some(probe) => tokio::join!(run, probe).0,
                }
            } else {
                let run = $crate::conn::run_unnamed!(conn, $sql, $params, $want, node, op);
                match $probe {
                    None => run.await,
                    Some(probe) => tokio::join!(run, probe).0,
                }
            }
        }
    };
}

/// Runs a statement prepared already (see [`run_statement!`]).
macro_rules! run_prepared {
    ($conn:expr, $statement:expr, $params:expr, $want:expr, $node:expr, $op:expr) => {
        async {
            let conn = $conn;
            let result = match $want {
                $crate::conn::Want::Rows => conn
                    .query($statement, $params)
                    .await
                    .map($crate::conn::Got::Rows),
                $crate::conn::Want::Count => conn
                    .execute($statement, $params)
                    .await
                    .map($crate::conn::Got::Count),
            };
            result.map_err(|e| $crate::error::Error::from_postgres(e, $node, $op, true))
        }
    };
}

/// Runs a statement on the unnamed statement, parameter types taken from
/// the values (see [`run_statement!`]).
macro_rules! run_unnamed {
    ($conn:expr, $sql:expr, $params:expr, $want:expr, $node:expr, $op:expr) => {
        async {
            let conn = $conn;
            let node: &std::sync::Arc<str> = $node;
            let op: &str = $op;
            let typed =
                $crate::params::typed($params).map_err(|index| $crate::error::Error::Usage {
                    operation: op.to_owned(),
                    problem: format!(
                        "cannot tell the PostgreSQL type of parameter ${} without a \
                         prepared statement (query.prepared_statements = false); pass a \
                         common type and cast it in SQL (a String and `${}::mytype`), or \
                         call query_typed on a connection from Cluster::connection",
                        index + 1,
                        index + 1
                    ),
                })?;
            let result = match $want {
                $crate::conn::Want::Rows => conn
                    .query_typed($sql, &typed)
                    .await
                    .map($crate::conn::Got::Rows),
                $crate::conn::Want::Count => conn
                    .execute_typed($sql, &typed)
                    .await
                    .map($crate::conn::Got::Count),
            };
            result.map_err(|e| $crate::error::Error::from_postgres(e, node, op, true))
        }
    };
}
pub(crate) use {run_prepared, run_unnamed};

pub(crate) fn rows(got: Got) -> Vec<Row> {
    match got {
        Got::Rows(rows) => rows,
        Got::Count(_) => Vec::new(),
    }
}

pub(crate) fn count(got: Got) -> u64 {
    match got {
        Got::Count(n) => n,
        Got::Rows(rows) => rows.len() as u64,
    }
}

/// Awaits one round trip bounded by `$limit` (an `Option<Duration>`,
/// `query.statement_timeout` plus a margin): past it, [`Error::Timeout`] for
/// `$node` and `$op`, and the statement, which may still be running, leaves
/// its connection flagged (the pool rolls it back or closes it). A macro, so the request is
/// built in place: a future passed through an `async fn`'s parameter is
/// stored twice in the caller's state.
macro_rules! bounded {
    ($limit:expr, $node:expr, $op:expr, $work:expr) => {
        match $limit {
            None => $work.await,
            Some(limit) => match tokio::time::timeout(limit, $work).await {
                Ok(result) => result,
                Err(_) => Err($crate::error::Error::Timeout {
                    node: std::sync::Arc::clone($node.name_arc()),
                    operation: $op.name().to_owned(),
                    after: limit,
                }),
            },
        }
    };
}

/// [`bounded!`] with the deadline given as an instant (`$deadline`, an
/// `Option<Instant>`; `$limit` the bound it came from, for the error), so a
/// call's round trips share one clock read.
macro_rules! bounded_at {
    ($deadline:expr, $limit:expr, $node:expr, $op:expr, $work:expr) => {
        match $deadline {
            None => $work.await,
            Some(deadline) => match tokio::time::timeout_at(deadline, $work).await {
                Ok(result) => result,
                Err(_) => Err($crate::error::Error::Timeout {
                    node: std::sync::Arc::clone($node.name_arc()),
                    operation: $op.name().to_owned(),
                    after: $limit.unwrap_or_default(),
                }),
            },
        }
    };
}
pub(crate) use {bounded, bounded_at};

/// The text of a statement in messages: its first 200 characters.
pub(crate) fn excerpt(sql: &str) -> String {
    let text: String = sql.trim().chars().take(200).collect();
    if text.len() < sql.trim().len() {
        format!("{text}…")
    } else {
        text
    }
}

/// The methods besides [`Queryable`]'s that [`Connection`] and
/// [`Transaction`] share (the simple protocol), and their implementation of
/// [`Queryable`] (one statement, one stream); each goes through the type's
/// `begin` and `end`. `$target` is the pool's connection or transaction.
macro_rules! connection_methods {
    ($type:ty, $target:ident) => {
        impl $type {
            /// Runs one or more statements with the simple protocol (no
            /// parameters), discarding rows.
            ///
            /// # Errors
            /// As [`Queryable::query`].
            pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
                let class = classify(sql);
                let token = self.begin(sql, class)?;
                let result = bounded!(self.limit, &self.node, &self.op, async {
                    self.$target.batch_execute(sql).await.map_err(|e| {
                        Error::from_postgres(e, self.node.name_arc(), self.op.name(), true)
                    })
                });
                self.end(token, sql, class, &result);
                result
            }

            /// Runs one or more statements with the simple protocol (no
            /// parameters) and returns their rows as text.
            ///
            /// # Errors
            /// As [`Queryable::query`].
            pub async fn simple_query(&self, sql: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
                let class = classify(sql);
                let token = self.begin(sql, class)?;
                let result = bounded!(self.limit, &self.node, &self.op, async {
                    self.$target.simple_query(sql).await.map_err(|e| {
                        Error::from_postgres(e, self.node.name_arc(), self.op.name(), true)
                    })
                });
                self.end(token, sql, class, &result);
                result
            }

            /// The node this runs on.
            pub fn node(&self) -> &Node {
                &self.node
            }
        }

        impl Sealed for $type {
            fn fetch<'q>(
                &'q self,
                sql: &'q str,
                params: &'q [&'q (dyn ToSql + Sync)],
                want: Want,
            ) -> impl Future<Output = Result<Fetched, Error>> + Send + 'q {
                async move {
                    let class = classify(sql);
                    let token = self.begin(sql, class)?;
                    let result = bounded!(
                        self.limit,
                        &self.node,
                        &self.op,
                        run_statement!(
                            &self.$target,
                            self.prepared,
                            sql,
                            params,
                            want,
                            self.node.name_arc(),
                            self.op.name(),
                            self.probe(class)
                        )
                    );
                    self.end(token, sql, class, &result);
                    Ok(Fetched {
                        got: result?,
                        node: Arc::clone(self.node.name_arc()),
                    })
                }
            }

            fn stream<'q>(
                &'q self,
                sql: &'q str,
                params: &'q [&'q (dyn ToSql + Sync)],
            ) -> impl Future<Output = Result<RowStream<'q>, Error>> + Send + 'q {
                async move {
                    let class = classify(sql);
                    let token = self.begin(sql, class)?;
                    let node = self.node.name_arc();
                    let op = self.op.name();
                    let result = bounded!(self.limit, &self.node, &self.op, async {
                        if self.prepared {
                            let statement = self
                                .$target
                                .prepare_cached(sql)
                                .await
                                .map_err(|e| Error::from_postgres(e, node, op, false))?;
                            self.$target
                                .query_raw(&statement, params)
                                .await
                                .map(|s| RowStream::live(s, node, &self.op, self.limit))
                                .map_err(|e| Error::from_postgres(e, node, op, true))
                        } else {
                            run_unnamed!(&self.$target, sql, params, Want::Rows, node, op)
                                .await
                                .map(|got| RowStream::read(rows(got), node, &self.op))
                        }
                    });
                    self.end(token, sql, class, &result);
                    Ok(self.watch(result?, sql))
                }
            }

            fn operation(&self) -> &str {
                self.op.name()
            }
        }
    };
}

/// A connection of its own, from [`crate::Cluster::connection`] or the
/// closures of [`crate::Cluster::read`] and [`crate::Cluster::write`].
///
/// Its query methods return [`Error`], bound each round trip, and record
/// what the call may have done (reads, writes), which decides whether a
/// failed closure may run again. Everything else of [`PooledConnection`]
/// (transactions, COPY through the raw client, prepared statements) is
/// reachable through `Deref`; the record cannot see what goes through it, so
/// using it counts as a write. Dropped, the connection goes back to its
/// node's pool, which rolls back anything left open and resets a session
/// that was changed (`SET`, temporary tables, `LISTEN`, advisory locks).
pub struct Connection {
    pub(crate) conn: PooledConnection,
    pub(crate) node: Node,
    pub(crate) op: Op,
    pub(crate) prepared: bool,
    /// The bound of one round trip.
    pub(crate) limit: Option<Duration>,
    /// What the call may have done: the closure's record, or for a raw
    /// connection the enclosing call's (none outside one: nothing repeats a
    /// raw connection's statements).
    pub(crate) record: Option<Arc<Record>>,
    /// Every statement counts as a write (the call's route is the primary's
    /// writes); else only statements that are not plain reads do.
    pub(crate) writes: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("node", &self.node.name())
            .field("operation", &self.op.name())
            .finish_non_exhaustive()
    }
}

connection_methods!(Connection, conn);
connection_methods!(Transaction<'_>, tx);

impl Connection {
    /// Nothing rides along a connection's statements.
    fn probe(&self, _class: StatementClass) -> Option<std::future::Ready<()>> {
        None
    }

    /// Before one statement: counted in the record before it is sent...
    fn begin(&self, _sql: &str, class: StatementClass) -> Result<Option<Sent>, Error> {
        let write = self.writes || !class.is_read();
        Ok(self.record.as_ref().map(|r| r.sending(write)))
    }

    /// ... and taken back if its error proves it never took effect.
    fn end<T>(
        &self,
        sent: Option<Sent>,
        _sql: &str,
        _class: StatementClass,
        result: &Result<T, Error>,
    ) {
        if let (Err(error), Some(record), Some(sent)) = (result, &self.record, sent)
            && error.provably_not_sent()
        {
            record.not_sent(sent);
        }
    }

    /// A connection's streams need no watching.
    fn watch<'q>(&self, stream: RowStream<'q>, _sql: &str) -> RowStream<'q> {
        stream
    }

    /// Runs `sql` as a stream that keeps this connection, for the routed
    /// handle's streams.
    pub(crate) async fn into_stream(
        self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream<'static>, Error> {
        let class = classify(sql);
        let sent = self.begin(sql, class)?;
        let Connection {
            conn,
            node,
            op,
            prepared,
            limit,
            record,
            ..
        } = self;
        let name = Arc::clone(node.name_arc());
        let result = bounded!(limit, &node, &op, async {
            if prepared {
                let statement = conn
                    .prepare_cached(sql)
                    .await
                    .map_err(|e| Error::from_postgres(e, &name, op.name(), false))?;
                conn.into_row_stream(&statement, params)
                    .await
                    .map(|s| RowStream::live(s, &name, &op, limit))
                    .map_err(|e| Error::from_postgres(e, &name, op.name(), true))
            } else {
                run_unnamed!(&conn, sql, params, Want::Rows, &name, op.name())
                    .await
                    .map(|got| RowStream::read(rows(got), &name, &op))
            }
        });
        if let (Err(error), Some(record), Some(sent)) = (&result, &record, sent)
            && error.provably_not_sent()
        {
            record.not_sent(sent);
        }
        result
    }

    /// Everything sent through the raw connection counts as a write.
    fn raw_use(&self) {
        if let Some(record) = &self.record {
            let _ = record.sending(true);
        }
    }

    /// The pooled connection itself. What is sent through it from now on
    /// counts as a write of the call.
    pub fn into_inner(self) -> PooledConnection {
        self.raw_use();
        self.conn
    }
}

impl Deref for Connection {
    type Target = PooledConnection;

    /// The pooled connection; the record cannot follow what is sent through
    /// it, so the call counts as having written.
    fn deref(&self) -> &PooledConnection {
        self.raw_use();
        &self.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        self.raw_use();
        &mut self.conn
    }
}

/// The first statement that failed in a transaction.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    /// The statement, shortened.
    pub(crate) statement: String,
    /// What went wrong, in words.
    pub(crate) reason: String,
    /// Its SQLSTATE, for a server error.
    pub(crate) code: Option<String>,
    /// Repeating the work may succeed ([`Error::is_transient`]).
    pub(crate) transient: bool,
    /// A round trip ran out.
    pub(crate) timed_out: bool,
}

#[derive(Debug, Default)]
struct Health {
    /// The first statement that failed, unless a `ROLLBACK TO SAVEPOINT`
    /// succeeded since.
    failed: Option<Failure>,
    /// Statements whose outcome the closure did not wait for (the future was
    /// dropped), and streams not read to their end.
    unseen: u32,
}

/// The transaction handed to the closure of [`crate::Cluster::transaction`].
///
/// The cluster commits it when the closure returns `Ok` and rolls it back on
/// `Err`, on a panic, or when the future is dropped. A statement that fails
/// dooms the transaction (PostgreSQL aborts it): unless a `ROLLBACK TO
/// SAVEPOINT` recovers it, returning `Ok` afterwards gives
/// [`Error::TransactionAborted`], never a commit. Transaction control
/// (`BEGIN`, `COMMIT`, `ROLLBACK`, `END`, `ABORT`, `PREPARE TRANSACTION`) is
/// refused; savepoints are allowed. Every round trip is bounded by
/// `query.statement_timeout` plus a margin.
pub struct Transaction<'a> {
    pub(crate) tx: pgstack_pool::Transaction<'a>,
    pub(crate) node: Node,
    pub(crate) op: Op,
    pub(crate) prepared: bool,
    pub(crate) limit: Option<Duration>,
    /// Whether the transaction may write (not `READ ONLY`).
    writable: bool,
    health: Mutex<Health>,
    /// What the probe sent with the first write read: the transaction's id
    /// and where the server was.
    xact: Mutex<Option<XactProbe>>,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("node", &self.node.name())
            .field("operation", &self.op.name())
            .finish_non_exhaustive()
    }
}

impl<'a> Transaction<'a> {
    pub(crate) fn new(
        tx: pgstack_pool::Transaction<'a>,
        node: Node,
        op: Op,
        prepared: bool,
        limit: Option<Duration>,
        writable: bool,
    ) -> Self {
        Transaction {
            tx,
            node,
            op,
            prepared,
            limit,
            writable,
            health: Mutex::new(Health::default()),
            xact: Mutex::new(None),
        }
    }

    /// For a statement that may write, until the transaction's id is known:
    /// [`XACT_PROBE_SQL`], sent right behind the statement in the same round
    /// trip (a cached prepared statement when prepared statements are on, so
    /// the server neither parses nor plans it again). Its answer (the id, the
    /// WAL position after the write, the server's start time and timeline)
    /// lets a `COMMIT` whose connection breaks be looked up on another
    /// connection. Read-only work never probes, so it never takes a
    /// transaction id.
    ///
    /// Boxed: it runs once per transaction, and unboxed its futures (a
    /// prepare and a query) would be part of every statement's future.
    fn probe(
        &self,
        class: StatementClass,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> {
        if !self.writable || class.is_read() || lock(&self.xact).is_some() {
            return None;
        }
        Some(Box::pin(async {
            let seen = if self.prepared {
                match self.tx.prepare_cached(XACT_PROBE_SQL).await {
                    Ok(statement) => self
                        .tx
                        .query(&statement, &[])
                        .await
                        .ok()
                        .map(|rows| XactProbe::from_rows(&rows)),
                    Err(_) => None,
                }
            } else {
                self.tx
                    .simple_query(XACT_PROBE_SQL)
                    .await
                    .ok()
                    .map(|messages| XactProbe::from_messages(&messages))
            };
            // No id yet (the statement wrote nothing): ask again with the
            // next write.
            if let Some(seen) = seen
                && matches!(seen.xid, pgstack_pool::TransactionId::Assigned(_))
            {
                *lock(&self.xact) = Some(seen);
            }
        }))
    }

    /// What the probe sent with the first write read, if it answered.
    pub(crate) fn xact(&self) -> Option<XactProbe> {
        lock(&self.xact).clone()
    }

    /// Before one statement: transaction control is refused; the statement
    /// counts as unseen until its outcome is recorded by
    /// [`Transaction::end`] (a future dropped in between leaves a statement
    /// whose outcome nobody saw).
    fn begin(&self, sql: &str, class: StatementClass) -> Result<(), Error> {
        if class.controls_transaction() {
            return Err(Error::Usage {
                operation: self.op.name().to_owned(),
                problem: format!(
                    "`{}` controls the transaction, which the cluster owns: return Ok from \
                     the closure to commit, Err to roll back (savepoints are allowed: \
                     SAVEPOINT, RELEASE, ROLLBACK TO SAVEPOINT)",
                    excerpt(sql)
                ),
            });
        }
        lock(&self.health).unseen += 1;
        Ok(())
    }

    /// After one statement: the first failure dooms the transaction; a
    /// successful `ROLLBACK TO SAVEPOINT` recovers it.
    fn end<T>(&self, _token: (), sql: &str, class: StatementClass, result: &Result<T, Error>) {
        let mut health = lock(&self.health);
        health.unseen -= 1;
        match result {
            Ok(_) if class.rolls_back_to_savepoint() => health.failed = None,
            Ok(_) => {}
            Err(error) => health.fail(sql, error),
        }
    }

    /// A stream's failure dooms the transaction, as a statement's does; one
    /// not read to its end counts as unseen.
    fn watch<'q>(&'q self, stream: RowStream<'q>, sql: &str) -> RowStream<'q> {
        lock(&self.health).unseen += 1;
        stream.watched(self, sql)
    }

    /// The pool's transaction, to commit or roll back.
    pub(crate) fn into_inner(self) -> pgstack_pool::Transaction<'a> {
        self.tx
    }

    /// The first statement that failed (and was not recovered by a
    /// `ROLLBACK TO SAVEPOINT`), and how many statements' outcomes the
    /// closure did not wait for.
    pub(crate) fn health(&self) -> (Option<Failure>, u32) {
        let health = lock(&self.health);
        (health.failed.clone(), health.unseen)
    }
}

impl StreamWatch for Transaction<'_> {
    fn failed(&self, sql: &str, error: &Error) {
        lock(&self.health).fail(sql, error);
    }

    fn ended(&self) {
        let mut health = lock(&self.health);
        health.unseen = health.unseen.saturating_sub(1);
    }
}

impl Health {
    /// The first error that dooms the transaction is kept.
    fn fail(&mut self, sql: &str, error: &Error) {
        if dooms(error) && self.failed.is_none() {
            self.failed = Some(Failure {
                statement: excerpt(sql),
                reason: error.to_string(),
                code: error.code().map(str::to_owned),
                transient: error.is_transient(),
                timed_out: matches!(error, Error::Timeout { .. }),
            });
        }
    }
}

/// Whether a statement's error leaves the transaction aborted on the server
/// (or its state unknown). A refused statement or a client-side error does
/// not: nothing reached the server, or the server did its part.
fn dooms(error: &Error) -> bool {
    matches!(
        error,
        Error::Database(_) | Error::Connection { .. } | Error::Timeout { .. }
    )
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
