//! Transactions: a closure between `BEGIN` and `COMMIT`.

use super::*;

impl Cluster {
    /// Runs `work` inside a transaction on the primary: committed when it
    /// returns `Ok`, rolled back on `Err`, on a panic or when the future is
    /// dropped. Retried as a whole on serialization failures and deadlocks
    /// (`40001`, `40P01`) and when the transaction could not start or broke
    /// before `COMMIT` was sent (unless a call nested in the closure wrote
    /// outside the transaction: then only when the operation is
    /// [`Op::idempotent`]).
    ///
    /// Every round trip is bounded by `query.statement_timeout` plus a
    /// margin; a transaction whose round trip runs out is rolled back and not
    /// retried ([`Error::Timeout`]). A statement that failed dooms the
    /// transaction: returning `Ok` after it (the error swallowed) gives
    /// [`Error::TransactionAborted`], never a commit, unless a `ROLLBACK TO
    /// SAVEPOINT` recovered it. `COMMIT` is checked in the same round trip: a
    /// transaction the server rolled back instead is never reported
    /// committed. A connection lost while `COMMIT` was in flight is resolved
    /// by asking the node whether the transaction committed
    /// (`txid_status`); only an unanswerable one gives
    /// [`Error::CommitOutcomeUnknown`], never retried.
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
    /// The last attempt's error; [`Error::Aborted`] for the caller's own;
    /// [`Error::TransactionAborted`]; [`Error::Usage`] for transaction
    /// control inside the closure.
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
            // What calls nested in the closure did outside the transaction;
            // the transaction's own statements take effect only with COMMIT.
            let record = Record::nested();
            let rules = CallRules::new(Shape::Transaction, &op, Some(&*record));
            let work = tokio::sync::Mutex::new(work);
            let result = self
                .with_retries(&op, rules, started, |attempt| {
                    let (work, op, record) = (&work, &op, &record);
                    async move {
                        let mut work = work.lock().await;
                        self.transaction_attempt(op, route, options, attempt, record, &mut *work)
                            .await
                    }
                })
                .await;
            self.finish(&op, route, started, result).map(|(v, _)| v)
        }
        .instrument(span)
        .await
    }

    async fn transaction_attempt<T, F>(
        &self,
        op: &Op,
        route: Route,
        options: TransactionOptions,
        attempt: u32,
        record: &Arc<Record>,
        work: &mut F,
    ) -> Tried<T>
    where
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, Error>,
    {
        let node = self.route(route).clone();
        record_attempt(&node, attempt);
        let mut conn = match self.checkout(&node, op).await {
            Ok(conn) => conn,
            Err(e) => return Err(Failed(e, Some(node))),
        };
        let limit = self.inner.settings.round_trip;
        let result = async {
            let begin = async {
                conn.transaction_with(options)
                    .await
                    .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), false))
            };
            let tx = conn::bounded!(limit, &node, op, begin)?;
            let mut tx = Transaction::new(
                tx,
                node.clone(),
                op.clone(),
                self.inner.settings.prepared,
                limit,
            );
            match record::scope(Arc::clone(record), work(&mut tx)).await {
                Ok(value) => self.commit(tx, value, &node, op, record).await,
                Err(error) => {
                    if !matches!(error, Error::Connection { .. } | Error::Timeout { .. }) {
                        // Best effort, bounded: if it fails, the pool rolls
                        // back or closes the connection before reuse.
                        let rollback = async {
                            tx.into_inner().rollback().await.map_err(|e| {
                                Error::from_postgres(e, node.name_arc(), op.name(), true)
                            })
                        };
                        let _ = conn::bounded!(limit, &node, op, rollback);
                    }
                    // A broken or timed-out connection is not waited on: the
                    // pool rolls it back off the caller's path, or closes it.
                    Err(error)
                }
            }
        }
        .await;
        drop(conn);
        match result {
            Ok(value) => Ok((value, node)),
            Err(error) => {
                // (A read-only transaction's 25006 says nothing about the node.)
                let error = self
                    .after_failure(&node, op, error, !options.read_only)
                    .await;
                Err(Failed(error, Some(node)))
            }
        }
    }

    /// Commits `tx` unless a statement in it failed, checking in the same
    /// round trip that the server did commit; resolves a `COMMIT` whose
    /// connection broke.
    async fn commit<T>(
        &self,
        tx: Transaction<'_>,
        value: T,
        node: &Node,
        op: &Op,
        record: &Record,
    ) -> Result<T, Error> {
        let limit = self.inner.settings.round_trip;
        let (failed, unseen) = tx.health();
        if let Some(failure) = failed {
            let rollback = async {
                tx.into_inner()
                    .rollback()
                    .await
                    .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), true))
            };
            let _ = conn::bounded!(limit, node, op, rollback);
            tracing::warn!(
                op = op.name(),
                node = node.name(),
                statement = %failure.statement,
                "a transaction closure returned Ok after a failed statement; rolled back"
            );
            return Err(Error::TransactionAborted {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                statement: format!("`{}`", failure.statement),
                reason: failure.reason,
                code: failure.code,
            });
        }
        match tx.into_inner().commit_checked(limit).await {
            Ok(CommitOutcome::Committed { .. }) => {
                record.committed();
                Ok(value)
            }
            Ok(_) => Err(Error::TransactionAborted {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                statement: if unseen > 0 {
                    "a statement whose result the closure did not wait for".to_owned()
                } else {
                    "a statement pgstack did not see".to_owned()
                },
                reason: "the server had aborted the transaction and answered COMMIT by \
                         rolling it back"
                    .to_owned(),
                code: None,
            }),
            Err(failed) => match failed.error {
                Some(error) if error.as_db_error().is_some() => {
                    // Refused (a serialization failure at commit, a deferred
                    // constraint): nothing was committed.
                    Err(Error::from_postgres(
                        error,
                        node.name_arc(),
                        op.name(),
                        true,
                    ))
                }
                error => {
                    self.resolve_commit(node, op, failed.xid, error).await?;
                    record.committed();
                    Ok(value)
                }
            },
        }
    }

    /// A `COMMIT` was in flight when its connection broke or its round trip
    /// ran out: asks the node, on another connection and within the connect
    /// timeout, whether the transaction committed. `Ok` when it did; a
    /// retryable error when it was rolled back (nothing took effect);
    /// [`Error::CommitOutcomeUnknown`] when nobody can tell.
    async fn resolve_commit(
        &self,
        node: &Node,
        op: &Op,
        xid: TransactionId,
        source: Option<tokio_postgres::Error>,
    ) -> Result<(), Error> {
        let unknown = |source| Error::CommitOutcomeUnknown {
            node: Arc::clone(node.name_arc()),
            operation: op.name().to_owned(),
            source,
        };
        let xid = match xid {
            TransactionId::Assigned(xid) => xid,
            // It wrote nothing: there was nothing to commit, and what it
            // read stands.
            TransactionId::Unassigned => return Ok(()),
            _ => return Err(unknown(source)),
        };
        let limit = self.inner.settings.check_timeout;
        let ask = async {
            loop {
                let conn = node.pool().get("pgstack-commit-status").await.ok()?;
                let rows = conn
                    .simple_query(&format!("SELECT txid_status({xid})"))
                    .await
                    .ok()?;
                match first_text(&rows) {
                    // The session that ran it is still there (it has not
                    // noticed the break yet): ask again.
                    Some("in progress") => {
                        drop(conn);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    answer => return answer.map(str::to_owned),
                }
            }
        };
        let answer = tokio::time::timeout(limit, ask).await.ok().flatten();
        match answer.as_deref() {
            Some("committed") => {
                tracing::info!(
                    op = op.name(),
                    node = node.name(),
                    xid,
                    "a COMMIT whose connection broke did commit"
                );
                Ok(())
            }
            Some("aborted") => match source {
                // Rolled back: nothing took effect, so repeating it is safe.
                Some(source) => Err(Error::Connection {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    sent: true,
                    source,
                }),
                None => Err(Error::Timeout {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    after: self.inner.settings.round_trip.unwrap_or(limit),
                }),
            },
            _ => Err(unknown(source)),
        }
    }
}
