//! Closures on a connection of their own, and the raw checkout.

use super::*;

impl Cluster {
    /// A connection of its own on the node `route` picks (an escape hatch:
    /// COPY, cursors, session settings). Only the checkout is retried.
    ///
    /// # Errors
    /// [`Error::PoolTimeout`], [`Error::CircuitOpen`], [`Error::ShuttingDown`].
    pub async fn connection(&self, op: impl Into<Op>, route: Route) -> Result<Connection, Error> {
        let op = op.into();
        let started = Instant::now();
        let rules = Rules {
            write: false,
            idempotent: true,
        };
        let result = self
            .with_retries(&op, rules, |_| async {
                let node = self.route(route).clone();
                match self.checkout(&node, &op).await {
                    Ok(conn) => Ok((conn, node)),
                    Err(e) => Err((e, Some(node))),
                }
            })
            .await;
        let (conn, node) = self.finish(&op, route, started, result)?;
        Ok(Connection {
            conn,
            node,
            op,
            prepared: self.inner.settings.prepared,
        })
    }

    /// Runs `work` with a connection of its own on a replica (or the
    /// primary, as [`Route::Read`] routes). Retried, whole, on any transient
    /// error.
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
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
    /// The last attempt's error.
    pub async fn read<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Read, work).await
    }

    /// Runs `work` with a connection of its own on the primary. Retried only
    /// when the connection could not be had (nothing was sent), or on any
    /// transient error when the operation is [`Op::idempotent`]. A connection
    /// lost while `work` ran gives [`Error::CommitOutcomeUnknown`]: its
    /// writes may or may not have happened.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn write<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        self.closure(op.into(), Route::Write, work).await
    }

    pub(super) async fn closure<T, F>(&self, op: Op, route: Route, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Connection) -> Result<T, Error>,
    {
        let started = Instant::now();
        let rules = Rules {
            write: !route.is_read(),
            idempotent: op.is_idempotent(),
        };
        let work = tokio::sync::Mutex::new(work);
        let result = self
            .with_retries(&op, rules, |_| async {
                let node = self.route(route).clone();
                let conn = match self.checkout(&node, &op).await {
                    Ok(conn) => conn,
                    Err(e) => return Err((e, Some(node))),
                };
                let mut conn = Connection {
                    conn,
                    node: node.clone(),
                    op: op.clone(),
                    prepared: self.inner.settings.prepared,
                };
                let mut work = work.lock().await;
                let result = (*work)(&mut conn).await;
                drop(conn);
                match result {
                    Ok(value) => Ok((value, node)),
                    Err(error) => {
                        let error = self.after_failure(&node, &op, route, error, true).await;
                        Err((error, Some(node)))
                    }
                }
            })
            .await;
        self.finish(&op, route, started, result).map(|(v, _)| v)
    }
}
