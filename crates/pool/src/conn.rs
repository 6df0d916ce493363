//! The pooled connection: a tokio-postgres client with the bookkeeping that
//! keeps a connection in an unknown session state out of the pool.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error, Row, SimpleQueryMessage, Statement, ToStatement};

use crate::pool::{Manager, Shared};
use crate::sql::{self, Session, StatementClass};
use crate::status::CloseReason;
use crate::stream::{Holder, RowStream};

/// Session state: no transaction, nothing in flight.
const IDLE: u8 = 0;
/// Inside a transaction opened by [`PooledConnection::transaction`].
const IN_TRANSACTION: u8 = 1;
/// Might be inside a transaction: a statement that can open one ran, an
/// error left the state unclear, or the raw client was used.
const UNKNOWN: u8 = 2;

/// The session is as the pool opened it.
const SESSION_CLEAN: u8 = 0;
/// A statement that changes the session ran (or may have): `DISCARD ALL`
/// before anyone else gets the connection.
const SESSION_CHANGED: u8 = 1;
/// The session was changed in a way `DISCARD ALL` does not undo: close it.
const SESSION_LASTING: u8 = 2;

/// The connection bb8 stores: the client plus creation time, lifetime
/// deadline, last use, generation and the session-state flags.
pub(crate) struct PgConnection {
    pub(crate) client: Client,
    pub(crate) created_at: Instant,
    pub(crate) deadline: Option<Instant>,
    pub(crate) last_used: Instant,
    pub(crate) generation: u64,
    pub(crate) cache_generation: u64,
    state: AtomicU8,
    session: AtomicU8,
    pub(crate) in_flight: AtomicU32,
    /// A helper transaction was dropped unfinished: roll it back before the
    /// next statement on this checkout.
    stale_transaction: AtomicBool,
    pub(crate) close_reason: Option<CloseReason>,
    statements: Mutex<HashMap<String, Statement>>,
    shared: Arc<Shared>,
}

impl PgConnection {
    pub(crate) fn new(
        client: Client,
        deadline: Option<Instant>,
        generation: u64,
        cache_generation: u64,
        shared: Arc<Shared>,
    ) -> Self {
        let now = Instant::now();
        shared.stats.opened();
        PgConnection {
            client,
            created_at: now,
            deadline,
            last_used: now,
            generation,
            cache_generation,
            state: AtomicU8::new(IDLE),
            session: AtomicU8::new(SESSION_CLEAN),
            in_flight: AtomicU32::new(0),
            stale_transaction: AtomicBool::new(false),
            close_reason: None,
            statements: Mutex::new(HashMap::new()),
            shared,
        }
    }

    /// No transaction open, nothing in flight: fit to go back to the pool.
    pub(crate) fn is_clean(&self) -> bool {
        self.state.load(Ordering::Acquire) == IDLE
            && self.in_flight.load(Ordering::Acquire) == 0
            && !self.stale_transaction.load(Ordering::Acquire)
    }

    /// A session-changing statement ran (or may have) since the pool last
    /// reset the session.
    pub(crate) fn session_changed(&self) -> bool {
        self.session.load(Ordering::Acquire) != SESSION_CLEAN
    }

    /// The session was changed beyond what `DISCARD ALL` undoes.
    pub(crate) fn session_changed_lastingly(&self) -> bool {
        self.session.load(Ordering::Acquire) == SESSION_LASTING
    }

    /// Records what a statement about to be sent may do to the transaction
    /// state and the session. Called before sending: a future dropped after
    /// the request left still leaves the connection marked.
    fn note(&self, class: StatementClass) {
        if class.may_change_transaction() {
            self.mark_unknown();
        }
        match class.session() {
            Session::MayChange(_) | Session::Changes(_) => {
                self.session.fetch_max(SESSION_CHANGED, Ordering::AcqRel);
            }
            Session::ChangesLastingly(_) => {
                self.session.fetch_max(SESSION_LASTING, Ordering::AcqRel);
            }
            _ => {}
        }
    }

    pub(crate) fn mark_session_changed(&self) {
        self.session.fetch_max(SESSION_CHANGED, Ordering::AcqRel);
    }

    pub(crate) fn has_statement_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// After a confirmed `ROLLBACK`/`COMMIT` with nothing else in flight.
    pub(crate) fn mark_idle(&self) {
        self.in_flight.store(0, Ordering::Release);
        self.stale_transaction.store(false, Ordering::Release);
        self.state.store(IDLE, Ordering::Release);
    }

    /// Rolls back (a round trip) when asked to or when the state is not
    /// known-idle; the flags are cleared only once the server confirmed it.
    /// tokio-postgres runs requests in order, so the `ROLLBACK` also runs
    /// after anything a cancelled future left in flight.
    async fn roll_back_if(&self, needed: bool) -> Result<(), Error> {
        if !needed {
            return Ok(());
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let result = self.client.batch_execute("ROLLBACK").await;
        let others = self.in_flight.fetch_sub(1, Ordering::AcqRel) - 1;
        match &result {
            Ok(()) if others == 0 => self.mark_idle(),
            Ok(()) => self.stale_transaction.store(false, Ordering::Release),
            Err(_) => self.mark_unknown(),
        }
        result
    }

    pub(crate) fn mark_unknown(&self) {
        self.state.store(UNKNOWN, Ordering::Release);
    }

    pub(crate) fn clear_statement_cache(&mut self) {
        lock(&self.statements).clear();
        self.client.clear_type_cache();
    }

    /// Before one request: rolls back what a dropped transaction left, marks
    /// what the statement may change, and raises the in-flight count. The
    /// count is lowered only when the result arrived
    /// ([`PgConnection::after_request`]), so a future dropped in between
    /// leaves the connection flagged. (See [`run`].)
    pub(crate) async fn before_request(&self, class: Option<StatementClass>) -> Result<(), Error> {
        self.roll_back_if(self.stale_transaction.load(Ordering::Acquire))
            .await?;
        if let Some(class) = class {
            self.note(class);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// After one request's result arrived.
    pub(crate) fn after_request<T>(&self, result: &Result<T, Error>) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Err(e) = result {
            // A server error leaves the protocol in step and the transaction
            // state as it was (aborted if one was open). Anything else
            // (I/O, a closed socket, a row-count or conversion error that
            // dropped a reply stream half-read) leaves it unclear.
            if e.as_db_error().is_none() {
                self.mark_unknown();
            }
        }
    }

    fn class_of<T: ?Sized + StatementText>(statement: &T) -> Option<StatementClass> {
        match statement.text() {
            StatementRef::Sql(text) => Some(sql::classify(text)),
            // Preparing it already marked the connection (see `prepared`),
            // and such statements are never cached.
            StatementRef::Prepared => None,
        }
    }

    /// A statement was prepared: whatever runs it later (the pool cannot see
    /// the text of a prepared statement), it is marked for what its text may
    /// do to the transaction state and the session.
    fn prepared(&self, sql: &str) {
        self.note(sql::classify(sql));
    }
}

impl Drop for PgConnection {
    fn drop(&mut self) {
        let reason = self.close_reason.unwrap_or(CloseReason::Shutdown);
        if self.has_statement_in_flight() && !self.client.is_closed() {
            // A statement may still be running on the server: ask it to stop,
            // so the backend does not hold locks after we hang up.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                let token = self.client.cancel_token();
                let tls = self.shared.tls.clone();
                handle.spawn(async move {
                    let _ = token.cancel_query(tls).await;
                });
            }
        }
        tracing::debug!(
            node = %self.shared.label,
            reason = reason.as_str(),
            age = ?self.created_at.elapsed(),
            "closing a pooled connection"
        );
        self.shared.stats.closed(reason);
    }
}

/// Parameters as tokio-postgres's `query_raw` takes them.
fn params_iter<'p>(
    params: &'p [&'p (dyn ToSql + Sync)],
) -> impl ExactSizeIterator<Item = &'p dyn ToSql> {
    params.iter().map(|p| *p as &dyn ToSql)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a statement argument is, for the transaction-state check.
#[doc(hidden)]
#[derive(Debug)]
pub enum StatementRef<'a> {
    /// SQL text.
    Sql(&'a str),
    /// A prepared statement.
    Prepared,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for str {}
    impl Sealed for String {}
    impl Sealed for tokio_postgres::Statement {}
}

/// A statement argument: SQL text (`&str`, `String`) or a [`Statement`].
///
/// Sealed; it lets the pool see whether a statement may open or close a
/// transaction.
pub trait StatementText: ToStatement + sealed::Sealed {
    #[doc(hidden)]
    fn text(&self) -> StatementRef<'_>;
}

impl StatementText for str {
    fn text(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}

impl StatementText for String {
    fn text(&self) -> StatementRef<'_> {
        StatementRef::Sql(self)
    }
}

impl StatementText for Statement {
    fn text(&self) -> StatementRef<'_> {
        StatementRef::Prepared
    }
}

/// Isolation levels for [`TransactionOptions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IsolationLevel {
    /// `READ COMMITTED` (PostgreSQL's default).
    ReadCommitted,
    /// `REPEATABLE READ`.
    RepeatableRead,
    /// `SERIALIZABLE`.
    Serializable,
}

/// How [`PooledConnection::transaction_with`] opens its transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TransactionOptions {
    /// The isolation level; the server's default when `None`.
    pub isolation: Option<IsolationLevel>,
    /// `READ ONLY`.
    pub read_only: bool,
    /// `DEFERRABLE` (with `SERIALIZABLE` and `READ ONLY`).
    pub deferrable: bool,
}

impl TransactionOptions {
    /// The server's defaults: read-write, default isolation.
    pub fn new() -> Self {
        TransactionOptions::default()
    }

    /// Sets the isolation level.
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Makes the transaction read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Makes the transaction deferrable.
    pub fn deferrable(mut self, deferrable: bool) -> Self {
        self.deferrable = deferrable;
        self
    }

    fn begin_statement(&self) -> Cow<'static, str> {
        if self.isolation.is_none() && !self.read_only && !self.deferrable {
            return Cow::Borrowed("BEGIN");
        }
        let mut sql = String::from("BEGIN");
        match self.isolation {
            Some(IsolationLevel::ReadCommitted) => sql.push_str(" ISOLATION LEVEL READ COMMITTED"),
            Some(IsolationLevel::RepeatableRead) => {
                sql.push_str(" ISOLATION LEVEL REPEATABLE READ")
            }
            Some(IsolationLevel::Serializable) => sql.push_str(" ISOLATION LEVEL SERIALIZABLE"),
            None => {}
        }
        if self.read_only {
            sql.push_str(" READ ONLY");
        }
        if self.deferrable {
            sql.push_str(" DEFERRABLE");
        }
        Cow::Owned(sql)
    }
}

/// A connection checked out of a [`crate::Pool`] with [`crate::Pool::get`].
///
/// Dropping it returns the connection. It goes back to the pool only in a
/// known idle state: no transaction open, no statement in flight. Otherwise
/// (a future dropped mid-statement or mid-transaction, a panic, an error
/// that leaves the state unclear, use of the raw client) it is rolled back
/// first, off the caller's path, and closed if the rollback fails or takes
/// longer than the pool's cleanup timeout. See `docs/pool.md`.
pub struct PooledConnection {
    pub(crate) conn: Option<bb8::PooledConnection<'static, Manager>>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) operation: Cow<'static, str>,
    pub(crate) checked_out_at: Instant,
    pub(crate) leak_key: Option<u64>,
}

impl fmt::Debug for PooledConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledConnection")
            .field("node", &self.shared.label)
            .field("operation", &self.operation)
            .field("held_for", &self.checked_out_at.elapsed())
            .finish_non_exhaustive()
    }
}

/// Runs one request on `$pg` (a [`PgConnection`]), keeping the flags. A
/// macro, not a function taking the request: the request is made only after
/// `before_request` (its rollback must go out first), and a future passed
/// through an `async fn`'s parameter is stored twice in the caller's state.
macro_rules! run {
    ($pg:expr, $class:expr, $request:expr) => {{
        let pg: &PgConnection = $pg;
        pg.before_request($class).await?;
        let result = $request.await;
        pg.after_request(&result);
        result
    }};
}

/// The query methods shared by [`PooledConnection`] and [`Transaction`].
macro_rules! query_methods {
    () => {
        /// Prepares a statement (a round trip).
        pub async fn prepare(&self, query: &str) -> Result<Statement, Error> {
            let pg = self.pg();
            pg.prepared(query);
            let statement = run!(pg, None, pg.client.prepare(query))?;
            Ok(statement)
        }

        /// Prepares a statement with the given parameter types.
        pub async fn prepare_typed(&self, query: &str, types: &[Type]) -> Result<Statement, Error> {
            let pg = self.pg();
            pg.prepared(query);
            let statement = run!(pg, None, pg.client.prepare_typed(query, types))?;
            Ok(statement)
        }

        /// Prepares a statement once per connection and reuses it.
        ///
        /// With `query.prepared_statements = false` (behind a
        /// transaction-mode pooler) nothing is cached. Caches are cleared by
        /// [`crate::Pool::clear_statement_caches`].
        pub async fn prepare_cached(&self, query: &str) -> Result<Statement, Error> {
            let pg = self.pg();
            // Only statements that change neither the transaction nor the
            // session are ever cached: a hit needs no classification.
            if pg.shared.cache_statements
                && let Some(statement) = lock(&pg.statements).get(query)
            {
                return Ok(statement.clone());
            }
            let class = sql::classify(query);
            let cache = pg.shared.cache_statements
                && !class.may_change_transaction()
                && !class.session().changes();
            let statement = self.prepare(query).await?;
            if cache {
                lock(&pg.statements).insert(query.to_owned(), statement.clone());
            }
            Ok(statement)
        }

        /// Runs a statement and returns its rows.
        pub async fn query<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, Error>
        where
            T: ?Sized + StatementText,
        {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            run!(pg, class, pg.client.query(statement, params))
        }

        /// Runs a statement that returns exactly one row.
        pub async fn query_one<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Row, Error>
        where
            T: ?Sized + StatementText,
        {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            run!(pg, class, pg.client.query_one(statement, params))
        }

        /// Runs a statement that returns at most one row.
        pub async fn query_opt<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Option<Row>, Error>
        where
            T: ?Sized + StatementText,
        {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            run!(pg, class, pg.client.query_opt(statement, params))
        }

        /// Runs a statement with explicitly typed parameters, without a
        /// named prepared statement (one round trip; works behind
        /// transaction-mode poolers).
        pub async fn query_typed(
            &self,
            query: &str,
            params: &[(&(dyn ToSql + Sync), Type)],
        ) -> Result<Vec<Row>, Error> {
            let pg = self.pg();
            let class = Some(sql::classify(query));
            run!(pg, class, pg.client.query_typed(query, params))
        }

        /// Runs a statement with explicitly typed parameters on the unnamed
        /// statement (one round trip, no named prepared statement: works
        /// behind transaction-mode poolers) and returns the number of rows it
        /// affected.
        pub async fn execute_typed(
            &self,
            query: &str,
            params: &[(&(dyn ToSql + Sync), Type)],
        ) -> Result<u64, Error> {
            let pg = self.pg();
            let class = Some(sql::classify(query));
            run!(pg, class, async {
                let typed = params.iter().map(|(value, ty)| (*value, ty.clone()));
                let stream = pg.client.query_typed_raw(query, typed).await?;
                let mut stream = std::pin::pin!(stream);
                while futures_util::TryStreamExt::try_next(&mut stream)
                    .await?
                    .is_some()
                {}
                Ok(stream.rows_affected().unwrap_or(0))
            })
        }

        /// Runs a statement and returns the number of rows it affected.
        pub async fn execute<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64, Error>
        where
            T: ?Sized + StatementText,
        {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            run!(pg, class, pg.client.execute(statement, params))
        }

        /// Runs a statement and hands back its rows as they arrive (see
        /// [`RowStream`]): the connection counts as busy until the stream
        /// ends.
        pub async fn query_raw<T>(
            &self,
            statement: &T,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<RowStream<'_>, Error>
        where
            T: ?Sized + StatementText,
        {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            pg.before_request(class).await?;
            let result = pg
                .client
                .query_raw(statement, params_iter(params))
                .await
                .map(|stream| RowStream::new(stream, Holder::Borrowed(pg)));
            if result.is_err() {
                pg.after_request(&result);
            }
            result
        }

        /// Runs one or more statements with the simple protocol, discarding rows.
        pub async fn batch_execute(&self, query: &str) -> Result<(), Error> {
            let pg = self.pg();
            let class = Some(sql::classify(query));
            run!(pg, class, pg.client.batch_execute(query))
        }

        /// Runs one or more statements with the simple protocol, returning text rows.
        pub async fn simple_query(&self, query: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
            let pg = self.pg();
            let class = Some(sql::classify(query));
            run!(pg, class, pg.client.simple_query(query))
        }
    };
}

impl PooledConnection {
    pub(crate) fn pg(&self) -> &PgConnection {
        match &self.conn {
            Some(conn) => conn,
            // The connection is only taken out in Drop.
            None => unreachable!("a PooledConnection always holds its connection until dropped"),
        }
    }

    fn pg_mut(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Some(conn) => conn,
            None => unreachable!("a PooledConnection always holds its connection until dropped"),
        }
    }

    query_methods!();

    /// Opens a transaction (`BEGIN`). It rolls back unless
    /// [`Transaction::commit`] is called; dropping it, a panic or a
    /// cancelled future all end in a rollback before the connection is
    /// reused.
    pub async fn transaction(&mut self) -> Result<Transaction<'_>, Error> {
        self.transaction_with(TransactionOptions::default()).await
    }

    /// Opens a transaction with an isolation level, read-only or deferrable.
    pub async fn transaction_with(
        &mut self,
        options: TransactionOptions,
    ) -> Result<Transaction<'_>, Error> {
        let pg = self.pg();
        // A fresh transaction: whatever this checkout left open (a dropped
        // transaction, a BEGIN sent as plain SQL) is rolled back first.
        pg.roll_back_if(!pg.is_clean() || pg.stale_transaction.load(Ordering::Acquire))
            .await?;
        let before = pg.state.load(Ordering::Acquire);
        // Flag first: a BEGIN that is cancelled after it was sent still
        // leaves the connection marked as (maybe) inside a transaction.
        if before == IDLE {
            pg.state.store(IN_TRANSACTION, Ordering::Release);
        }
        pg.in_flight.fetch_add(1, Ordering::AcqRel);
        let result = pg.client.batch_execute(&options.begin_statement()).await;
        pg.in_flight.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(()) => Ok(Transaction {
                conn: self,
                done: false,
            }),
            Err(e) => {
                if e.as_db_error().is_some() {
                    // The server refused the BEGIN: no transaction was opened.
                    pg.state.store(before, Ordering::Release);
                } else {
                    pg.mark_unknown();
                }
                Err(e)
            }
        }
    }

    /// [`PooledConnection::query_raw`] keeping the checkout: it goes back to
    /// the pool when the stream is dropped (rolled back first if the stream
    /// did not end).
    pub async fn into_row_stream<T>(
        self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream<'static>, Error>
    where
        T: ?Sized + StatementText,
    {
        let stream = {
            let pg = self.pg();
            let class = PgConnection::class_of(statement);
            pg.before_request(class).await?;
            let result = pg.client.query_raw(statement, params_iter(params)).await;
            if result.is_err() {
                pg.after_request(&result);
            }
            result?
        };
        Ok(RowStream::new(stream, Holder::Owned(Box::new(self))))
    }

    /// The raw tokio-postgres client, for what the methods here do not
    /// cover (COPY, streaming rows, notifications).
    ///
    /// The pool cannot see what is sent through it, so both the
    /// transaction state and the session become unknown: when the
    /// connection is returned it is rolled back and its session reset with
    /// `DISCARD ALL` (settings, temporary tables, prepared statements,
    /// listeners, advisory locks), off the caller's path, or closed if that
    /// fails. (`LOAD` through the raw client is not undone by a reset: close
    /// such a connection with [`PooledConnection::discard`].)
    pub fn client_unchecked(&mut self) -> &mut Client {
        let pg = self.pg_mut();
        pg.mark_unknown();
        pg.mark_session_changed();
        &mut pg.client
    }

    /// Whether the connection's socket is closed (it will be discarded).
    pub fn is_closed(&self) -> bool {
        self.pg().client.is_closed()
    }

    /// Whether the connection is in a known idle state right now (no
    /// transaction open, nothing in flight).
    pub fn is_clean(&self) -> bool {
        self.pg().is_clean()
    }

    /// Whether a statement that changes the session (`SET`, `set_config(..,
    /// false)`, temporary objects, session advisory locks, `LISTEN`,
    /// `PREPARE`, `DISCARD`, `DEALLOCATE`, cursors `WITH HOLD`, `DO`, `CALL`,
    /// or use of the raw client) ran on this checkout: the session is reset
    /// (`DISCARD ALL`, statement cache cleared) before the connection is
    /// used by anyone else, or closed when a reset cannot undo it.
    pub fn session_changed(&self) -> bool {
        self.pg().session_changed()
    }

    /// The operation name given to [`crate::Pool::get`].
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// How long the connection has been checked out.
    pub fn held_for(&self) -> Duration {
        self.checked_out_at.elapsed()
    }

    /// How long ago the underlying connection was opened.
    pub fn age(&self) -> Duration {
        self.pg().created_at.elapsed()
    }

    /// Whether the pool would replace this connection: its socket is
    /// closed, it belongs to an older generation ([`crate::Pool::recycle_all`])
    /// or its (jittered) lifetime is over. For holders of long-lived
    /// checkouts, which the pool cannot replace on its own.
    pub fn should_be_replaced(&self) -> bool {
        let pg = self.pg();
        pg.client.is_closed()
            || pg.generation < self.shared.generation.load(Ordering::Acquire)
            || pg.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Takes this checkout out of leak detection, for connections held on
    /// purpose for a long time (e.g. a shared, pipelined connection).
    pub fn exempt_from_leak_detection(&mut self) {
        if let Some(key) = self.leak_key.take() {
            self.shared.leaks.unregister(key, &self.shared.label);
        }
    }

    /// Closes the connection instead of returning it to the pool.
    pub fn discard(mut self) {
        self.pg_mut().close_reason = Some(CloseReason::Error);
    }

    pub(crate) fn release(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let permit = self.permit.take();
        let shared = &self.shared;
        // One clock read for the return: the time in use and the idle clock.
        let now = Instant::now();
        shared
            .stats
            .used_for(now.saturating_duration_since(self.checked_out_at));
        if let Some(key) = self.leak_key.take() {
            shared.leaks.unregister(key, &shared.label);
        }
        conn.last_used = now;
        if conn.close_reason.is_none() && conn.client.is_closed() {
            conn.close_reason = Some(CloseReason::Broken);
        }
        if conn.close_reason.is_none() && conn.session_changed_lastingly() {
            conn.close_reason = Some(CloseReason::Session);
        }
        if conn.close_reason.is_none() && (!conn.is_clean() || conn.session_changed()) {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    let timeout = shared.cleanup_timeout;
                    let operation = std::mem::take(&mut self.operation);
                    shared.returning.send_modify(|n| *n += 1);
                    handle.spawn(clean_up_and_return(
                        conn,
                        permit,
                        Arc::clone(shared),
                        timeout,
                        operation,
                    ));
                    return;
                }
                Err(_) => conn.close_reason = Some(CloseReason::Error),
            }
        }
        if conn.close_reason.is_none() {
            // Parked before the permit goes: the caller the permit wakes
            // finds it.
            shared.park(conn);
        } else {
            drop(conn);
        }
        drop(permit);
        shared.stats.returned();
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        self.release();
    }
}

/// Makes a returned connection fit for the next caller, off the caller's
/// path: rolls back when its transaction state is unknown, resets its session
/// with `DISCARD ALL` (and forgets the statements cached for it) when a
/// statement changed it, then returns it to the pool; closes it if that
/// fails or takes longer than the pool's cleanup timeout.
///
/// tokio-postgres runs requests in order, so the `ROLLBACK` runs after any
/// statement a cancelled future left behind, and `DISCARD ALL` (which refuses
/// to run inside a transaction block) after the `ROLLBACK`; both go out
/// together, one round trip.
async fn clean_up_and_return(
    mut conn: bb8::PooledConnection<'static, Manager>,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    timeout: Duration,
    operation: Cow<'static, str>,
) {
    let roll_back = !conn.is_clean();
    let reset = conn.session_changed();
    let work = async {
        let client = &conn.client;
        match (roll_back, reset) {
            (true, true) => {
                let (rolled_back, discarded) = tokio::join!(
                    client.batch_execute("ROLLBACK"),
                    client.batch_execute("DISCARD ALL")
                );
                rolled_back.and(discarded)
            }
            (false, true) => client.batch_execute("DISCARD ALL").await,
            _ => client.batch_execute("ROLLBACK").await,
        }
    };
    let outcome = tokio::time::timeout(timeout, work).await;
    let what = if reset { "reset" } else { "rollback" };
    match outcome {
        Ok(Ok(())) if !conn.client.is_closed() => {
            if reset {
                conn.clear_statement_cache();
                conn.session.store(SESSION_CLEAN, Ordering::Release);
                shared.stats.session_reset();
            }
            if roll_back {
                shared.stats.rolled_back();
            }
            conn.mark_idle();
            tracing::debug!(
                node = %shared.label,
                operation = %operation,
                rolled_back = roll_back,
                session_reset = reset,
                "cleaned up a returned connection"
            );
        }
        Ok(Ok(())) => conn.close_reason = Some(CloseReason::Broken),
        Ok(Err(e)) => {
            conn.close_reason = Some(if conn.client.is_closed() {
                CloseReason::Broken
            } else if reset {
                CloseReason::Session
            } else {
                CloseReason::Error
            });
            tracing::debug!(node = %shared.label, operation = %operation, error = %e,
                "{what} on return failed; closing the connection");
        }
        Err(_) => {
            conn.close_reason = Some(CloseReason::Error);
            tracing::warn!(
                node = %shared.label,
                operation = %operation,
                timeout = ?timeout,
                "{what} on return did not finish in time (a cancelled statement is still \
                 running?); closing the connection"
            );
        }
    }
    if conn.close_reason.is_none() {
        shared.park(conn);
    } else {
        drop(conn);
    }
    drop(permit);
    shared.stats.returned();
    shared.returning.send_modify(|n| *n = n.saturating_sub(1));
}

/// A transaction's id, as a [`XactProbe`] saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransactionId {
    /// The check did not answer.
    Unknown,
    /// No id was assigned: the transaction wrote nothing, so there was
    /// nothing to commit.
    Unassigned,
    /// The id (`txid_current_if_assigned()`, with its epoch), for
    /// `txid_status`.
    Assigned(i64),
}

/// The statement of a [`XactProbe`]: the transaction's id, and where the
/// server is (its start time, and on a primary the WAL insert position and
/// the timeline), read inside the transaction in one row.
pub const XACT_PROBE_SQL: &str = "SELECT txid_current_if_assigned()::text, \
     pg_postmaster_start_time()::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn()::text END, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) END";

/// What [`XACT_PROBE_SQL`] read inside a transaction: enough to ask the
/// server later, on another connection, whether the transaction committed,
/// and to tell whether the server answering is the one that ran it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct XactProbe {
    /// The transaction's id.
    pub xid: TransactionId,
    /// `pg_postmaster_start_time()` as text: a server restarted since has
    /// another.
    pub server_started: Option<String>,
    /// The WAL insert position when the probe ran (64-bit): every record the
    /// transaction wrote before the probe ends at or before it.
    pub insert_lsn: Option<u64>,
    /// The primary's timeline: a promotion starts a new one.
    pub timeline: Option<u32>,
}

impl XactProbe {
    /// A probe that did not answer.
    pub const UNKNOWN: XactProbe = XactProbe {
        xid: TransactionId::Unknown,
        server_started: None,
        insert_lsn: None,
        timeline: None,
    };

    /// Reads the row of [`XACT_PROBE_SQL`] from a simple query's messages.
    pub fn from_messages(messages: &[SimpleQueryMessage]) -> XactProbe {
        let Some(row) = messages.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        }) else {
            return XactProbe::UNKNOWN;
        };
        XactProbe::from_texts(|i| row.try_get(i).map_err(drop))
    }

    /// Reads the row of [`XACT_PROBE_SQL`] run as a prepared statement.
    pub fn from_rows(rows: &[Row]) -> XactProbe {
        let Some(row) = rows.first() else {
            return XactProbe::UNKNOWN;
        };
        XactProbe::from_texts(|i| row.try_get::<_, Option<&str>>(i).map_err(drop))
    }

    /// The probe from its four text columns, however they were read.
    fn from_texts<'r>(column: impl Fn(usize) -> Result<Option<&'r str>, ()>) -> XactProbe {
        let text = |i: usize| column(i).ok().flatten();
        let xid = match column(0) {
            Ok(None) => TransactionId::Unassigned,
            Ok(Some(text)) => text
                .parse()
                .map_or(TransactionId::Unknown, TransactionId::Assigned),
            Err(()) => TransactionId::Unknown,
        };
        XactProbe {
            xid,
            server_started: text(1).map(str::to_owned),
            insert_lsn: text(2).and_then(parse_lsn),
            timeline: text(3).and_then(|t| u32::from_str_radix(t, 16).ok()),
        }
    }
}

/// A `pg_lsn` in its text form (`16/B374D848`) as a 64-bit position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// What [`Transaction::commit_checked`] saw.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CommitOutcome {
    /// The server confirmed the `COMMIT`.
    Committed {
        /// What the check before `COMMIT` read.
        probe: XactProbe,
    },
    /// A statement had failed in the transaction (or the check before
    /// `COMMIT` failed), so the server rolled it back: nothing was
    /// committed.
    RolledBack,
}

/// [`Transaction::commit_checked`] got no confirmation.
#[derive(Debug, thiserror::Error)]
#[error("{}", match &self.error {
    Some(e) => format!("COMMIT failed: {e}"),
    None => "COMMIT got no answer in time".to_owned(),
})]
#[non_exhaustive]
pub struct CommitFailed {
    /// What the check before `COMMIT` read (its id, where the server was),
    /// when it answered.
    pub probe: XactProbe,
    /// What tokio-postgres reported; `None` when the round trip ran past
    /// its limit. A server error means nothing was committed; anything else
    /// leaves the outcome unknown, unless `sent` is false.
    #[source]
    pub error: Option<Error>,
    /// Whether `COMMIT` may have reached the server: false when the
    /// connection had already closed before it was sent, so the transaction
    /// did not commit.
    pub sent: bool,
}

impl CommitFailed {
    /// Whether the server refused the `COMMIT` (nothing was committed), as
    /// opposed to a lost connection or a time-out (unknown outcome).
    pub fn is_server_error(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.as_db_error().is_some())
    }
}

/// A transaction on a [`PooledConnection`], from
/// [`PooledConnection::transaction`].
///
/// Ends with [`Transaction::commit`] or [`Transaction::rollback`]; dropped
/// without either, it is rolled back before the connection is reused.
pub struct Transaction<'a> {
    conn: &'a mut PooledConnection,
    done: bool,
}

impl fmt::Debug for Transaction<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("connection", &self.conn)
            .field("done", &self.done)
            .finish()
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            // The connection stays flagged: it is rolled back before the next
            // statement on this checkout, or when it is returned.
            self.pg().stale_transaction.store(true, Ordering::Release);
            tracing::debug!(
                node = %self.conn.shared.label,
                operation = %self.conn.operation,
                "transaction dropped without commit or rollback; it will be rolled back"
            );
        }
    }
}

impl Transaction<'_> {
    fn pg(&self) -> &PgConnection {
        self.conn.pg()
    }

    query_methods!();

    /// Commits. The state flag is cleared only once the server confirmed
    /// the `COMMIT`.
    ///
    /// An error that is not a server error (a lost connection) means the
    /// outcome is unknown: the commit may or may not have happened.
    pub async fn commit(mut self) -> Result<(), Error> {
        self.done = true;
        self.finish("COMMIT").await
    }

    /// Commits, and tells whether it did: the transaction's id is read in
    /// the same round trip, just before the `COMMIT`.
    ///
    /// PostgreSQL answers `COMMIT` of a transaction in which a statement
    /// failed with `ROLLBACK` (a command tag, not an error, and
    /// tokio-postgres does not show tags), so a plain [`Transaction::commit`]
    /// returns `Ok` for a transaction that was rolled back. Here the check
    /// before `COMMIT` fails in such a transaction, and the result is
    /// [`CommitOutcome::RolledBack`]. The id lets a caller whose connection
    /// broke with `COMMIT` in flight ask another session whether it
    /// committed (`txid_status`).
    ///
    /// `limit` bounds the round trip; past it the outcome is unknown.
    ///
    /// # Errors
    /// [`CommitFailed`]: a server error (nothing was committed), or a lost
    /// connection or a time-out (the outcome is unknown), with the id when
    /// the check answered.
    pub async fn commit_checked(
        self,
        limit: Option<Duration>,
    ) -> Result<CommitOutcome, CommitFailed> {
        self.commit_with(limit, true).await
    }

    /// Commits within `limit`, without the check of
    /// [`Transaction::commit_checked`]: for a caller that saw every
    /// statement of the transaction succeed (so it was not aborted) and read
    /// its id already. The outcome's probe is [`XactProbe::UNKNOWN`].
    ///
    /// # Errors
    /// As [`Transaction::commit_checked`].
    pub async fn commit_bounded(
        self,
        limit: Option<Duration>,
    ) -> Result<CommitOutcome, CommitFailed> {
        self.commit_with(limit, false).await
    }

    async fn commit_with(
        mut self,
        limit: Option<Duration>,
        check: bool,
    ) -> Result<CommitOutcome, CommitFailed> {
        self.done = true;
        let pg = self.pg();
        // A connection that has closed already takes no COMMIT: the
        // transaction did not commit.
        let sent = !pg.client.is_closed();
        pg.in_flight
            .fetch_add(if check { 2 } else { 1 }, Ordering::AcqRel);
        // Both requests go out in this order on the first poll (biased
        // select): the check runs inside the transaction, then COMMIT.
        let probe = async {
            if check {
                pg.client.simple_query(XACT_PROBE_SQL).await
            } else {
                Ok(Vec::new())
            }
        };
        let commit = pg.client.batch_execute("COMMIT");
        let mut probe = std::pin::pin!(probe);
        let mut commit = std::pin::pin!(commit);
        let deadline = limit.map(|l| Instant::now() + l);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut timer = std::pin::pin!(timer);
        let mut probed: Option<Result<Vec<SimpleQueryMessage>, Error>> = None;
        let committed = loop {
            tokio::select! {
                biased;
                answer = &mut probe, if probed.is_none() => {
                    if check {
                        pg.in_flight.fetch_sub(1, Ordering::AcqRel);
                    }
                    probed = Some(answer);
                }
                done = &mut commit => {
                    pg.in_flight.fetch_sub(1, Ordering::AcqRel);
                    break Some(done);
                }
                () = &mut timer => break None,
            }
        };
        let xact = match &probed {
            Some(Ok(messages)) => XactProbe::from_messages(messages),
            _ => XactProbe::UNKNOWN,
        };
        match committed {
            Some(Ok(())) => {
                if pg.in_flight.load(Ordering::Acquire) == 0 {
                    pg.mark_idle();
                } else {
                    pg.mark_unknown();
                }
                match probed {
                    // The check failed inside the transaction: it was (or
                    // became) aborted, and COMMIT rolled it back.
                    Some(Err(e)) if e.as_db_error().is_some() => Ok(CommitOutcome::RolledBack),
                    _ => Ok(CommitOutcome::Committed { probe: xact }),
                }
            }
            Some(Err(error)) => {
                pg.mark_unknown();
                Err(CommitFailed {
                    probe: xact,
                    error: Some(error),
                    sent,
                })
            }
            None => {
                pg.mark_unknown();
                Err(CommitFailed {
                    probe: xact,
                    error: None,
                    sent,
                })
            }
        }
    }

    /// Rolls back.
    pub async fn rollback(mut self) -> Result<(), Error> {
        self.done = true;
        self.finish("ROLLBACK").await
    }

    async fn finish(&self, sql: &'static str) -> Result<(), Error> {
        let pg = self.pg();
        pg.in_flight.fetch_add(1, Ordering::AcqRel);
        let result = pg.client.batch_execute(sql).await;
        pg.in_flight.fetch_sub(1, Ordering::AcqRel);
        match &result {
            Ok(()) if pg.in_flight.load(Ordering::Acquire) == 0 => pg.mark_idle(),
            // A failed COMMIT ends the transaction on the server, but stay
            // conservative: the connection is rolled back on return.
            _ => pg.mark_unknown(),
        }
        result
    }

    /// Whether `commit` or `rollback` was called.
    pub fn is_finished(&self) -> bool {
        self.done
    }
}
