//! Transactions: a closure between `BEGIN` and `COMMIT`.

use super::*;
use crate::conn::Failure;

/// The body of [`Cluster::run_transaction`] and its kin: the span, the
/// call's record and rules, the deadline a broken `COMMIT` is looked up
/// until, the retries, and the figures. `$attempt` is the body of one
/// attempt, given `$attempting` ([`Attempting`]) and `$record`.
macro_rules! run_transaction {
    ($cluster:expr, $op:expr, $options:expr, |$attempting:ident, $record:ident| $attempt:expr) => {{
        let cluster: &Cluster = $cluster;
        let op: Op = $op;
        let options: TransactionOptions = $options;
        let route = if options.read_only {
            Route::Read
        } else {
            Route::Write
        };
        let span = $crate::telemetry::call_span!("pgstack.transaction", op, route);
        async {
            let started = Instant::now();
            // What calls nested in the closure did outside the transaction;
            // the transaction's own statements take effect only with COMMIT.
            let record = Record::nested();
            let rules = CallRules::new(Shape::Transaction, &op, Some(&*record));
            // A broken COMMIT is looked up until the call's deadline.
            let until = started
                + cluster
                    .retry_deadline(&op)
                    .unwrap_or(RESOLVE_WITHOUT_DEADLINE);
            let result = cluster
                .with_retries(&op, rules, started, |attempt| {
                    let ($record, op) = (&record, &op);
                    async move {
                        let $attempting = Attempting {
                            op,
                            route,
                            options,
                            attempt,
                            until,
                        };
                        $attempt
                    }
                })
                .await;
            cluster.finish(&op, route, started, result)
        }
        .instrument(span)
        .await
    }};
}

/// One attempt of a transaction: a connection, `BEGIN`, the work (`$work`,
/// an expression of `$tx: &mut Transaction`), then `COMMIT`, or a rollback.
macro_rules! attempt_transaction {
    ($cluster:expr, $attempting:expr, $record:expr, |$tx:ident| $work:expr) => {{
        let cluster: &Cluster = $cluster;
        let record: &Arc<Record> = $record;
        let Attempting {
            op,
            route,
            options,
            attempt,
            until,
        } = $attempting;
        let node = cluster.route(route).clone();
        record_attempt(&node, attempt);
        match cluster.checkout(&node, op).await {
            Err(e) => Err(Failed(e, Some(node))),
            Ok(mut conn) => {
                let limit = cluster.inner.settings.round_trip;
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
                        cluster.inner.settings.prepared,
                        limit,
                        !options.read_only,
                    );
                    let work = {
                        let $tx = &mut tx;
                        record::scope(Arc::clone(record), $work)
                    };
                    match work.await {
                        Ok(value) => cluster.commit(tx, value, &node, op, record, until).await,
                        Err(error) => {
                            if !matches!(error, Error::Connection { .. } | Error::Timeout { .. }) {
                                // Best effort, bounded: if it fails, the pool
                                // rolls back or closes the connection before
                                // reuse.
                                let rollback = async {
                                    tx.into_inner().rollback().await.map_err(|e| {
                                        Error::from_postgres(e, node.name_arc(), op.name(), true)
                                    })
                                };
                                let _ = conn::bounded!(limit, &node, op, rollback);
                            }
                            // A broken or timed-out connection is not waited
                            // on: the pool rolls it back off the caller's
                            // path, or closes it.
                            Err(error)
                        }
                    }
                }
                .await;
                drop(conn);
                match result {
                    Ok(value) => Ok((value, node)),
                    Err(error) => {
                        // (A read-only transaction's 25006 says nothing about
                        // the node.)
                        let error = cluster
                            .after_failure(&node, op, error, !options.read_only)
                            .await;
                        Err(Failed(error, Some(node)))
                    }
                }
            }
        }
    }};
}

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
    /// use pgstack_connection::Queryable;
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
    /// The closure returns `Result<T, E>` for the service's own `E: From<Error>`
    /// (`async |tx| -> Result<_, AppError> { .. }`): `?` works on pgstack's
    /// errors and the service's alike; an `Err` rolls back and comes back as
    /// it is, and the whole transaction is still repeated when a statement in
    /// it had failed with a serialization failure or a deadlock (the
    /// [`Transaction`] records its first failed statement, which the retry
    /// rules read).
    ///
    /// # Errors
    /// The closure's own error; else the last attempt's [`Error`] as `E`:
    /// [`Error::TransactionAborted`]; [`Error::Usage`] for transaction
    /// control inside the closure.
    pub async fn transaction<T, E, F>(&self, op: impl Into<Op>, work: F) -> Result<T, E>
    where
        E: From<Error> + Send + 'static,
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    {
        self.transaction_with(op, TransactionOptions::new(), work)
            .await
    }

    /// [`Cluster::transaction`] with an isolation level, read-only or
    /// deferrable. A read-only transaction is routed as [`Route::Read`].
    ///
    /// # Errors
    /// As [`Cluster::transaction`].
    pub async fn transaction_with<T, E, F>(
        &self,
        op: impl Into<Op>,
        options: TransactionOptions,
        work: F,
    ) -> Result<T, E>
    where
        E: From<Error> + Send + 'static,
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    {
        self.run_transaction(op.into(), options, work)
            .await
            .map(|(value, _)| value)
    }

    /// [`Cluster::transaction_with`], also handing back the node it ran on.
    ///
    /// The closure's own error (`E`) ends the attempt: rolled back, and
    /// repeated only when a statement of the transaction had failed in a way
    /// that is worth repeating (the wrapper recorded it: a serialization
    /// failure, a deadlock, a broken connection), as if that statement's
    /// error had been returned. `E` being pgstack's [`Error`] itself, it is
    /// read directly.
    pub(super) async fn run_transaction<T, E, F>(
        &self,
        op: Op,
        options: TransactionOptions,
        work: F,
    ) -> Result<(T, Node), E>
    where
        E: From<Error> + Send + 'static,
        F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    {
        let work = &tokio::sync::Mutex::new(work);
        // The caller's error of the last attempt that ended with one.
        let own = &std::sync::Mutex::new(None::<E>);
        let result = run_transaction!(self, op, options, |attempting, record| {
            let mut work = work.lock().await;
            attempt_transaction!(self, attempting, record, |tx| async {
                match work(&mut *tx).await {
                    Ok(value) => Ok(value),
                    Err(error) => match into_pgstack(error) {
                        Ok(error) => Err(error),
                        Err(error) => {
                            let (failed, _) = tx.health();
                            *lock(own) = Some(error);
                            Err(Error::Aborted(Box::new(CallerError(failed))))
                        }
                    },
                }
            })
        });
        match result {
            Ok(done) => Ok(done),
            Err(Error::Aborted(reason)) if reason.is::<CallerError>() => match lock(own).take() {
                Some(error) => Err(error),
                None => Err(E::from(Error::Aborted(reason))),
            },
            Err(error) => Err(E::from(error)),
        }
    }

    /// One statement of an [`Op::resolvable`] operation as a transaction on
    /// the primary, whose broken `COMMIT` is looked up. (Not through
    /// [`Cluster::run_transaction`]: a statement helper's future must be
    /// `Send`, and a closure's cannot yet be shown to be.)
    pub(super) async fn statement_transaction(
        &self,
        op: Op,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
    ) -> Result<(Got, Node), Error> {
        run_transaction!(self, op, TransactionOptions::new(), |attempting, record| {
            attempt_transaction!(self, attempting, record, |tx| async {
                match want {
                    Want::Rows => tx.query(sql, params).await.map(Got::Rows),
                    Want::Count => tx.execute(sql, params).await.map(Got::Count),
                }
            })
        })
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
        until: Instant,
    ) -> Result<T, Error> {
        let limit = self.inner.settings.round_trip;
        let (failed, unseen) = tx.health();
        let first_write = tx.xact();
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
        // Every statement was seen to succeed and the first write's probe
        // read the id: the transaction is not aborted and can be looked up,
        // so COMMIT goes alone. Otherwise the check rides in front of it
        // (an aborted transaction's COMMIT answers with a rollback, not an
        // error; a write the probe missed has an id only the check reads).
        let tx = tx.into_inner();
        let commit = if first_write.is_some() && unseen == 0 {
            tx.commit_bounded(limit).await
        } else {
            tx.commit_checked(limit).await
        };
        match commit {
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
                Some(error) if !failed.sent => {
                    // The connection had closed before COMMIT went out.
                    Err(Error::from_postgres(
                        error,
                        node.name_arc(),
                        op.name(),
                        false,
                    ))
                }
                error => {
                    // What the first write's probe read; else what the check
                    // just before COMMIT read, if it answered.
                    let probe = first_write.unwrap_or(failed.probe);
                    self.resolve_commit(node, op, &probe, error, until).await?;
                    record.committed();
                    Ok(value)
                }
            },
        }
    }
}

/// One attempt of a transaction: what it is, and until when a broken
/// `COMMIT` may be looked up.
struct Attempting<'a> {
    op: &'a Op,
    route: Route,
    options: TransactionOptions,
    attempt: u32,
    until: Instant,
}

/// How long a broken `COMMIT` is looked up when the call has no deadline.
const RESOLVE_WITHOUT_DEADLINE: Duration = Duration::from_secs(30);

/// The caller's error, if it is pgstack's [`Error`] (read as one), or back.
fn into_pgstack<E: 'static>(error: E) -> Result<Error, E> {
    let mut slot = Some(error);
    if let Some(inner) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Error>>()
        && let Some(error) = inner.take()
    {
        return Ok(error);
    }
    match slot {
        Some(error) => Err(error),
        // Only taken when it was an `Error`, returned above.
        None => Ok(Error::Usage {
            operation: String::new(),
            problem: "the transaction closure's error was lost".to_owned(),
        }),
    }
}

/// Stands in, inside the retry loop, for an error of the caller's own type:
/// it carries the transaction's first failed statement (if any), which the
/// retry rules read ([`CallRules::classify`]) as they would its error.
#[derive(Debug)]
pub(super) struct CallerError(pub(super) Option<Failure>);

impl fmt::Display for CallerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(failure) => write!(
                f,
                "the transaction closure returned its own error after `{}` failed: {}",
                failure.statement, failure.reason
            ),
            None => f.write_str("the transaction closure returned its own error"),
        }
    }
}

impl std::error::Error for CallerError {}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
