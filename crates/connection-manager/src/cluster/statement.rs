//! The statement helpers: one statement on a shared (pipelined) connection
//! or a connection of its own.

use super::*;

/// Retires a lane when a call on it is dropped mid-flight: the statement may
/// still be running and would hold up everything pipelined behind it.
pub(super) struct LaneGuard<'a> {
    node: &'a Node,
    lane: &'a Arc<Lane>,
    armed: bool,
}

impl Drop for LaneGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.node.inner.lanes.retire(self.lane);
        }
    }
}

impl Cluster {
    /// Runs a statement on the node `route` picks and returns its rows.
    ///
    /// Outside a transaction, statements share a few pipelined connections
    /// per node; transaction control, `SET` and other session statements are
    /// refused ([`Error::Usage`]). Retried as `docs/connection.md` says: reads
    /// on any transient error, writes only when nothing was sent or the
    /// operation is [`Op::idempotent`].
    ///
    /// # Errors
    /// Any [`Error`]; a write whose connection was lost in flight gives
    /// [`Error::CommitOutcomeUnknown`].
    pub async fn query(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let got = self
            .statement(op.into(), route, sql, params, Want::Rows)
            .await?;
        Ok(conn::rows(got.0))
    }

    /// Runs a statement that returns exactly one row.
    ///
    /// # Errors
    /// As [`Cluster::query`], and [`Error::UnexpectedRows`].
    pub async fn query_one(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), route, sql, params, Want::Rows)
            .await?;
        conn::one(conn::rows(got), &node, op.name())
    }

    /// Runs a statement that returns at most one row.
    ///
    /// # Errors
    /// As [`Cluster::query`], and [`Error::UnexpectedRows`].
    pub async fn query_opt(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), route, sql, params, Want::Rows)
            .await?;
        conn::opt(conn::rows(got), &node, op.name())
    }

    /// Runs a statement and returns the number of rows it affected.
    ///
    /// # Errors
    /// As [`Cluster::query`].
    pub async fn execute(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let got = self
            .statement(op.into(), route, sql, params, Want::Count)
            .await?;
        Ok(conn::count(got.0))
    }

    /// Runs a write on the primary and hands back, with the number of rows
    /// affected, a WAL position at or after its commit: give it to a later
    /// read as [`Route::ReadAfter`] to read your own write.
    ///
    /// # Errors
    /// As [`Cluster::execute`].
    pub async fn execute_tracked(
        &self,
        op: impl Into<Op>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(u64, WalPosition), Error> {
        let op = op.into();
        let (got, node) = self
            .statement(op.clone(), Route::Write, sql, params, Want::Count)
            .await?;
        let position = self.position_on(&node, &op).await?;
        Ok((conn::count(got), position))
    }

    /// The primary's current WAL position: every write acknowledged before
    /// this call is at or before it. Give it to [`Route::ReadAfter`] after a
    /// transaction or a closure that wrote.
    ///
    /// # Errors
    /// As [`Cluster::query`].
    pub async fn wal_position(&self, op: impl Into<Op>) -> Result<WalPosition, Error> {
        let op = op.into();
        let node = self.primary().clone();
        self.position_on(&node, &op).await
    }

    pub(super) async fn position_on(&self, node: &Node, op: &Op) -> Result<WalPosition, Error> {
        let conn = self.checkout(node, op).await?;
        // The insert position: with `synchronous_commit = off` the commit
        // record may not be written yet, but it is inserted.
        let rows = conn
            .simple_query("SELECT pg_current_wal_insert_lsn()::text")
            .await
            .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), true))?;
        first_text(&rows)
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Error::Usage {
                operation: op.name().to_owned(),
                problem: format!(
                    "{} returned no WAL position (is it a standby?)",
                    node.name()
                ),
            })
    }

    pub(super) async fn statement(
        &self,
        op: Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
    ) -> Result<(Got, Node), Error> {
        let span = tracing::debug_span!(
            "pgstack.statement",
            op = op.name(),
            route = route.as_str(),
            node = tracing::field::Empty,
            attempt = tracing::field::Empty
        );
        async {
            let started = Instant::now();
            let result = match sqlcheck::refusal(sql) {
                Some(problem) => Err((
                    Error::Usage {
                        operation: op.name().to_owned(),
                        problem: problem.to_owned(),
                    },
                    None,
                )),
                None => {
                    let rules = Rules {
                        write: !route.is_read(),
                        idempotent: op.is_idempotent(),
                    };
                    self.with_retries(&op, rules, |attempt| {
                        self.statement_attempt(&op, route, sql, params, want, attempt)
                    })
                    .await
                }
            };
            self.finish(&op, route, started, result)
        }
        .instrument(span)
        .await
    }

    pub(super) async fn statement_attempt(
        &self,
        op: &Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        attempt: u32,
    ) -> Attempt<Got> {
        let node = self.route(route).clone();
        record_attempt(&node, attempt);
        let started = Instant::now();
        let prepared = self.inner.settings.prepared;
        let result = if node.inner.lanes.enabled() {
            let queued_failure = || Error::Unavailable {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                reason: "opening a shared connection just failed; the node is being probed"
                    .to_owned(),
            };
            match node
                .inner
                .lanes
                .get(|| self.open_lane(&node), queued_failure)
                .await
            {
                Err(e) => Err(e),
                Ok(lane) => {
                    let mut guard = LaneGuard {
                        node: &node,
                        lane: &lane,
                        armed: true,
                    };
                    let run = run_statement!(
                        &lane.conn,
                        prepared,
                        sql,
                        params,
                        want,
                        node.name_arc(),
                        op.name()
                    );
                    let result = self.timed(&node, op, run).await;
                    guard.armed = false;
                    if matches!(
                        result,
                        Err(Error::Connection { .. } | Error::Timeout { .. })
                    ) {
                        node.inner.lanes.retire(&lane);
                    }
                    result
                }
            }
        } else {
            match self.checkout(&node, op).await {
                Err(e) => Err(e),
                Ok(conn) => {
                    let run = run_statement!(
                        &conn,
                        prepared,
                        sql,
                        params,
                        want,
                        node.name_arc(),
                        op.name()
                    );
                    self.timed(&node, op, run).await
                }
            }
        };
        self.slow_check(op, route, &node, started, sql, params);
        match result {
            Ok(got) => Ok((got, node)),
            Err(error) => {
                let error = self.after_failure(&node, op, route, error, true).await;
                Err((error, Some(node)))
            }
        }
    }

    /// Bounds one attempt by `statement_timeout + connect_timeout`.
    pub(super) async fn timed<T>(
        &self,
        node: &Node,
        op: &Op,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        match self.inner.settings.attempt_timeout {
            None => work.await,
            Some(limit) => match tokio::time::timeout(limit, work).await {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    after: limit,
                }),
            },
        }
    }

    /// What a failed attempt means for routing, and the error the caller
    /// sees: a write whose connection broke in flight has an unknown outcome.
    pub(super) async fn after_failure(
        &self,
        node: &Node,
        op: &Op,
        route: Route,
        error: Error,
        read_only_means_failover: bool,
    ) -> Error {
        if error.is_node_failure() {
            self.node_failed(node);
        }
        if read_only_means_failover
            && error.code() == Some("25006")
            && node.inner.index == self.primary().inner.index
        {
            tracing::warn!(
                node = node.name(),
                op = op.name(),
                "the primary refused a write as read-only; looking for the new primary"
            );
            node.set_observed_role(Some(Role::Replica));
            if let Err(e) = self.rediscover().await {
                tracing::warn!(error = %e, "re-discovery found no writable primary");
            }
        }
        match error {
            Error::Connection {
                node,
                operation,
                sent: true,
                source,
            } if route == Route::Write && !op.is_idempotent() => Error::CommitOutcomeUnknown {
                node,
                operation,
                source: Some(source),
            },
            other => other,
        }
    }

    pub(super) fn slow_check(
        &self,
        op: &Op,
        route: Route,
        node: &Node,
        started: Instant,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) {
        let Some(threshold) = self.inner.settings.slow_threshold else {
            return;
        };
        let elapsed = started.elapsed();
        if elapsed < threshold {
            return;
        }
        self.inner.counters.slow.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(SLOW_QUERIES_METRIC, "op" => op.label(), "node" => node_label(node))
            .increment(1);
        let statement: String = sql.chars().take(200).collect();
        if self.inner.settings.log_parameters {
            tracing::warn!(
                op = op.name(),
                node = node.name(),
                route = route.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                statement,
                parameters = ?params,
                "slow query"
            );
        } else {
            tracing::warn!(
                op = op.name(),
                node = node.name(),
                route = route.as_str(),
                duration_ms = elapsed.as_millis() as u64,
                statement,
                "slow query"
            );
        }
    }

    /// Checks a connection of its own out of `node`'s pool.
    pub(super) async fn checkout(&self, node: &Node, op: &Op) -> Result<PooledConnection, Error> {
        match node.pool().get(op.cow()).await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                let error = Error::from_pool(e, node.name_arc(), op.name());
                if error.is_node_failure() {
                    self.node_failed(node);
                }
                Err(error)
            }
        }
    }

    /// Opens a shared connection for `node`, checking its role.
    pub(super) async fn open_lane(&self, node: &Node) -> Result<PooledConnection, Error> {
        let op = Op::from("pgstack-shared-connection");
        let check = async {
            let conn = node
                .pool()
                .get("pgstack-shared-connection")
                .await
                .map_err(|e| Error::from_pool(e, node.name_arc(), op.name()))?;
            let role = role_of(&conn)
                .await
                .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), false))?;
            Ok::<_, Error>((conn, role))
        };
        // Bounded by the connect timeout: a node that is down must not hold
        // a statement for the whole acquire timeout.
        let limit = self.inner.settings.check_timeout;
        let result = match tokio::time::timeout(limit + limit, check).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                after: limit + limit,
            }),
        };
        match result {
            Ok((conn, role)) => {
                self.observed(node, role);
                Ok(conn)
            }
            Err(error) => {
                if error.is_node_failure() {
                    self.node_failed(node);
                }
                // Nothing of the caller's was sent.
                Err(match error {
                    Error::Timeout {
                        node,
                        operation,
                        after,
                    } => Error::Unavailable {
                        node,
                        operation,
                        reason: format!("no connection with a role check within {after:?}"),
                    },
                    Error::Connection {
                        node,
                        operation,
                        source,
                        ..
                    } => Error::Connection {
                        node,
                        operation,
                        sent: false,
                        source,
                    },
                    other => other,
                })
            }
        }
    }
}
