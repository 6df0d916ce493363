//! Transactions: a closure between `BEGIN` and `COMMIT`.

use super::*;

impl Cluster {
    /// Runs `work` inside a transaction on the primary: committed when it
    /// returns `Ok`, rolled back on `Err`, on a panic or when the future is
    /// dropped. Retried as a whole on serialization failures and deadlocks
    /// (`40001`, `40P01`) and when the transaction could not start or broke
    /// before `COMMIT` was sent; a connection lost while `COMMIT` was in
    /// flight gives [`Error::CommitOutcomeUnknown`] and no retry.
    ///
    /// `work` may run more than once: keep effects outside the database out
    /// of it. For a call moved into `tokio::spawn`, write `async move |tx|`
    /// and capture owned values (a borrowing async closure's future is not
    /// provably `Send`).
    ///
    /// ```no_run
    /// # async fn run(cluster: pgstack_connection::Cluster) -> Result<(), pgstack_connection::Error> {
    /// cluster
    ///     .transaction("pay-bill", async |tx| {
    ///         tx.execute("UPDATE bills SET paid = true WHERE id = $1", &[&7_i64]).await?;
    ///         tx.execute("INSERT INTO payments (bill) VALUES ($1)", &[&7_i64]).await?;
    ///         Ok(())
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The last attempt's error; [`Error::Aborted`] for the caller's own.
    pub async fn transaction<T, F>(&self, op: impl Into<Op>, work: F) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        self.transaction_with(op, TransactionOptions::new(), work)
            .await
    }

    /// [`Cluster::transaction`] with an isolation level, read-only or
    /// deferrable. A read-only transaction is routed as [`Route::Read`].
    ///
    /// # Errors
    /// As [`Cluster::transaction`].
    pub async fn transaction_with<T, F>(
        &self,
        op: impl Into<Op>,
        options: TransactionOptions,
        work: F,
    ) -> Result<T, Error>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let op = op.into();
        let route = if options.read_only {
            Route::Read
        } else {
            Route::Write
        };
        let span = tracing::debug_span!(
            "pgstack.transaction",
            op = op.name(),
            route = route.as_str(),
            node = tracing::field::Empty,
            attempt = tracing::field::Empty
        );
        async {
            let started = Instant::now();
            // A transaction that did not commit had no effect: repeating it
            // is safe whatever it wrote.
            let rules = Rules {
                write: false,
                idempotent: true,
            };
            let work = tokio::sync::Mutex::new(work);
            let result = self
                .with_retries(&op, rules, |attempt| {
                    let (work, op) = (&work, &op);
                    async move {
                        let mut work = work.lock().await;
                        self.transaction_attempt(op, route, options, attempt, &mut *work)
                            .await
                    }
                })
                .await;
            self.finish(&op, route, started, result).map(|(v, _)| v)
        }
        .instrument(span)
        .await
    }

    pub(super) async fn transaction_attempt<T, F>(
        &self,
        op: &Op,
        route: Route,
        options: TransactionOptions,
        attempt: u32,
        work: &mut F,
    ) -> Attempt<T>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let node = self.route(route).clone();
        record_attempt(&node, attempt);
        let mut conn = match self.checkout(&node, op).await {
            Ok(conn) => conn,
            Err(e) => return Err((e, Some(node))),
        };
        let result = async {
            let tx = conn
                .transaction_with(options)
                .await
                .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), false))?;
            let mut tx = Transaction {
                tx,
                node: node.clone(),
                op: op.clone(),
                prepared: self.inner.settings.prepared,
            };
            match work(&mut tx).await {
                Ok(value) => {
                    let commit = tx.tx.commit();
                    let committed = match self.inner.settings.attempt_timeout {
                        Some(limit) => tokio::time::timeout(limit, commit).await.ok(),
                        None => Some(commit.await),
                    };
                    match committed {
                        Some(Ok(())) => Ok(value),
                        Some(Err(e)) if e.as_db_error().is_some() => {
                            Err(Error::from_postgres(e, node.name_arc(), op.name(), true))
                        }
                        // Lost or cut off with COMMIT in flight: it may have
                        // happened. (A dropped commit leaves the connection
                        // flagged; the pool rolls back or closes it.)
                        source => Err(Error::CommitOutcomeUnknown {
                            node: Arc::clone(node.name_arc()),
                            operation: op.name().to_owned(),
                            source: source.and_then(Result::err),
                        }),
                    }
                }
                Err(error) => {
                    // Best effort: if it fails, the pool rolls back or closes
                    // the connection before reuse.
                    let _ = tx.tx.rollback().await;
                    Err(error)
                }
            }
        }
        .await;
        drop(conn);
        match result {
            Ok(value) => Ok((value, node)),
            Err(error) => {
                // Statements inside a transaction are not autocommit writes:
                // only COMMIT decides the outcome.
                // (A read-only transaction's 25006 says nothing about the node.)
                let error = self
                    .after_failure(&node, op, Route::Read, error, !options.read_only)
                    .await;
                Err((error, Some(node)))
            }
        }
    }
}
