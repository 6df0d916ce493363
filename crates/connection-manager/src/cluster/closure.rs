//! Closures on a connection of their own, and the raw checkout.
//!
//! The connection a closure gets records what its statements may have done
//! (and so do calls nested in the closure, through the task-local record):
//! the closure runs again only while nothing but reads reached the server,
//! or when its operation is idempotent.

use super::*;

impl Cluster {
    /// A connection of its own on the node `route` picks (an escape hatch:
    /// COPY, cursors, session settings). Only the checkout is retried. Each
    /// round trip on it is bounded by `query.statement_timeout` plus a
    /// margin. When it is dropped, the pool rolls back anything left open
    /// and resets a session it changed (`SET`, temporary tables, `LISTEN`,
    /// advisory locks, prepared statements), so the next caller never sees
    /// them.
    ///
    /// # Errors
    /// [`Error::PoolTimeout`], [`Error::CircuitOpen`], [`Error::ShuttingDown`].
    pub async fn connection(&self, op: impl Into<Op>, route: Route) -> Result<Connection, Error> {
        let op = op.into();
        let span = crate::telemetry::call_span!("pgstack.connection", op, route);
        async {
            let started = Instant::now();
            let rules = CallRules::new(Shape::Checkout, &op, None);
            let result = self
                .with_retries(&op, rules, started, |_| async {
                    let node = self.route_waiting(route).await;
                    match self.checkout(&node, &op).await {
                        Ok(conn) => Ok((conn, node)),
                        Err(e) => Err(Failed(e, Some(node))),
                    }
                })
                .await;
            self.finish(&op, route, started, result)
        }
        .instrument(span)
        .await
        .map(|(conn, node)| self.connection_for(conn, node, op, record::current(), route))
    }

    fn connection_for(
        &self,
        conn: PooledConnection,
        node: Node,
        op: Op,
        record: Option<Arc<Record>>,
        route: Route,
    ) -> Connection {
        Connection {
            conn,
            node,
            op,
            prepared: self.inner.settings.prepared,
            limit: self.inner.settings.round_trip,
            record,
            writes: !route.is_read(),
        }
    }

    /// Runs `work` with a connection of its own on a replica (or the
    /// primary, as [`Route::Read`] routes). Retried, whole, on transient
    /// errors while nothing but plain reads reached the server (a statement
    /// that is not a plain `SELECT`/`VALUES`/`TABLE`/`SHOW`/`WITH`, or use
    /// of the raw connection, makes it a write: then only an
    /// [`Op::idempotent`] closure runs again).
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// use pgstack_connection::Queryable;
    /// let total: i64 = cluster
    ///     .read("count-bills", async |conn| {
    ///         let row = conn.query_one("SELECT count(*) FROM bills", &[]).await?;
    ///         Ok(row.get(0))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The last attempt's error; [`Error::PartiallyApplied`] or
    /// [`Error::CommitOutcomeUnknown`] when it failed after a write reached
    /// the server.
    pub async fn read<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Read, work).await
    }

    /// Runs `work` with a connection of its own on the primary. Retried only
    /// while none of its statements reached the server (the checkout failed,
    /// or every statement was refused before it could take effect), or on
    /// any transient error when the operation is [`Op::idempotent`]: every
    /// statement of a `write` closure counts as a write. A connection lost
    /// while `work` ran gives [`Error::CommitOutcomeUnknown`]; any other
    /// failure after a statement reached the server gives
    /// [`Error::PartiallyApplied`] when the error alone would say nothing
    /// was sent.
    ///
    /// # Errors
    /// The last attempt's error, settled as above.
    pub async fn write<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Write, work).await
    }

    async fn closure<T, F>(&self, op: Op, route: Route, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        let span = crate::telemetry::call_span!("pgstack.closure", op, route);
        self.closure_in_span(op, route, work).instrument(span).await
    }

    async fn closure_in_span<T, F>(&self, op: Op, route: Route, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        let started = Instant::now();
        let record = Record::nested();
        let rules = CallRules::new(Shape::Closure, &op, Some(&*record));
        let work = tokio::sync::Mutex::new(work);
        let result = self
            .with_retries(&op, rules, started, |_| async {
                let node = self.route_waiting(route).await;
                let conn = match self.checkout(&node, &op).await {
                    Ok(conn) => conn,
                    Err(e) => return Err(Failed(e, Some(node))),
                };
                let mut conn = self.connection_for(
                    conn,
                    node.clone(),
                    op.clone(),
                    Some(Arc::clone(&record)),
                    route,
                );
                let mut work = work.lock().await;
                let result = record::scope(Arc::clone(&record), (*work)(&mut conn)).await;
                drop(conn);
                match result {
                    Ok(value) => Ok((value, node)),
                    Err(error) => {
                        let error = self.after_failure(&node, &op, error, true).await;
                        Err(Failed(error, Some(node)))
                    }
                }
            })
            .await;
        self.finish(&op, route, started, result).map(|(v, _)| v)
    }
}
