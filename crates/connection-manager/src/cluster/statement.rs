//! The statement helpers: one statement on a shared (pipelined) connection
//! or a connection of its own.
//!
//! A statement shares a connection only when it is one plain read or write
//! without session effects (the allow-list in `pgstack_pool::classify`) and
//! is known to be short ([`statements`]); the lane is chosen by the work in
//! flight on it ([`crate::lanes`]). Session statements are refused (their
//! effect would not outlive the call); anything else takes a connection of
//! its own.

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

/// What one statement attempt needs besides the cluster.
#[derive(Clone, Copy)]
pub(super) struct Statement<'a> {
    pub(super) op: &'a Op,
    pub(super) route: Route,
    pub(super) sql: &'a str,
    pub(super) params: &'a [&'a (dyn ToSql + Sync)],
    pub(super) want: Want,
    pub(super) profile: statements::Profile,
    /// It counts as a write: its route or its form says so.
    pub(super) writes: bool,
    /// Read the WAL position after it, on the same connection.
    pub(super) track: bool,
}

/// A statement's result, and the WAL position read after it when asked for.
pub(super) type Done = (Got, Option<Result<WalPosition, Error>>);

impl Cluster {
    /// Runs a statement on the node `route` picks and returns its rows: the
    /// per-call form of `self.on(op, route).query(sql, params)` ([`Cluster::on`],
    /// [`crate::Queryable::query`]), for ad-hoc statements.
    ///
    /// # Errors
    /// As [`crate::Queryable::query`] on a [`crate::Routed`].
    pub async fn query(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        self.on(op, route).query(sql, params).await
    }

    /// `self.on(op, route).query_one(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`crate::Queryable::query_one`].
    pub async fn query_one(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.on(op, route).query_one(sql, params).await
    }

    /// `self.on(op, route).query_opt(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`crate::Queryable::query_opt`].
    pub async fn query_opt(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        self.on(op, route).query_opt(sql, params).await
    }

    /// `self.on(op, route).execute(sql, params)`, per call.
    ///
    /// # Errors
    /// As [`crate::Queryable::execute`].
    pub async fn execute(
        &self,
        op: impl Into<Op>,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        self.on(op, route).execute(sql, params).await
    }

    /// A statement as a stream on a connection of its own (never a shared
    /// one: a half-read stream would hold up everything behind it), kept
    /// until the stream is dropped. Only the checkout is retried.
    pub(crate) async fn stream(
        &self,
        op: &Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<RowStream<'static>, Error> {
        let profile = statements::profile(sql);
        if let Some(problem) = sqlcheck::refusal(&profile.class, sql) {
            return Err(Error::Usage {
                operation: op.name().to_owned(),
                problem,
            });
        }
        let conn = self.connection(op.clone(), route).await?;
        let node = conn.node().clone();
        let started = Instant::now();
        let result = conn.into_stream(sql, params).await;
        self.slow_check(op, route, &node, started, sql, params);
        match result {
            Ok(stream) => Ok(stream),
            Err(error) => Err(self.after_failure(&node, op, error, true).await),
        }
    }

    /// Runs a write on the primary and hands back, with the number of rows
    /// affected, a WAL position at or after its commit (read on the same
    /// connection right after it): give it to a later read as
    /// [`Route::ReadAfter`] to read your own write.
    ///
    /// # Errors
    /// As [`Cluster::execute`]; [`Error::PartiallyApplied`] (with
    /// `committed`) when the write committed but the position could not be
    /// read: the write is not repeated.
    pub async fn execute_tracked(
        &self,
        op: impl Into<Op>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(u64, WalPosition), Error> {
        let op = op.into();
        let ((got, position), node) = self
            .statement(&op, Route::Write, sql, params, Want::Count, true)
            .await?;
        match position {
            Some(Ok(position)) => Ok((conn::count(got), position)),
            Some(Err(error)) => Err(Error::PartiallyApplied {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                committed: true,
                source: Box::new(error),
            }),
            None => Err(Error::PartiallyApplied {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                committed: true,
                source: Box::new(no_position(&node, &op)),
            }),
        }
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
        let conn = self.checkout(&node, &op).await?;
        let limit = self.inner.settings.round_trip;
        conn::bounded!(limit, &node, &op, position_on(&conn, &node, &op))
    }

    pub(crate) async fn statement(
        &self,
        op: &Op,
        route: Route,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        track: bool,
    ) -> Result<(Done, Node), Error> {
        let span = crate::telemetry::call_span!("pgstack.statement", op, route);
        crate::telemetry::record_query_text(&span, sql, self.inner.settings.query_text);
        async {
            let started = Instant::now();
            let profile = statements::profile(sql);
            let result = match sqlcheck::refusal(&profile.class, sql) {
                Some(problem) => Err((
                    Error::Usage {
                        operation: op.name().to_owned(),
                        problem,
                    },
                    None,
                )),
                None if op.is_resolvable() && (!route.is_read() || !profile.class.is_read()) => {
                    return self
                        .resolvable_statement(op, sql, params, want, track)
                        .await;
                }
                None => {
                    let writes = !route.is_read() || !profile.class.is_read();
                    let statement = Statement {
                        op,
                        route,
                        sql,
                        params,
                        want,
                        profile,
                        writes,
                        track,
                    };
                    let rules = CallRules::new(Shape::Statement { writes }, op, None);
                    let enclosing = Enclosing::find();
                    self.with_retries(op, rules, started, |attempt| {
                        self.statement_attempt(statement, attempt, started, &enclosing)
                    })
                    .await
                }
            };
            self.finish(op, route, started, result)
        }
        .instrument(span)
        .await
    }

    /// A write of an [`Op::resolvable`] operation: a one-statement
    /// transaction on the primary, whose broken `COMMIT` is looked up.
    async fn resolvable_statement(
        &self,
        op: &Op,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        want: Want,
        track: bool,
    ) -> Result<(Done, Node), Error> {
        let (got, node) = self
            .statement_transaction(op.clone(), sql, params, want)
            .await?;
        // The commit's position: read after it, on the primary.
        let position = if track {
            Some(self.wal_position(op.clone()).await)
        } else {
            None
        };
        Ok(((got, position), node))
    }

    async fn statement_attempt(
        &self,
        statement: Statement<'_>,
        attempt: u32,
        call_started: Instant,
        enclosing: &Enclosing,
    ) -> Tried<Done> {
        let Statement {
            op,
            route,
            sql,
            params,
            ..
        } = statement;
        let node = if attempt == 1 {
            self.route_waiting(route).await
        } else {
            self.route(route).clone()
        };
        record_attempt(&node, attempt);
        // The first attempt starts with the call: one clock read fewer.
        let started = if attempt == 1 {
            call_started
        } else {
            Instant::now()
        };
        let sent = enclosing.sending(statement.writes);
        let lanes = &node.inner.lanes;
        let busy_after = lanes.busy_after();
        let shared = lanes.enabled() && statement.profile.may_share(busy_after);
        let known_short = statement.profile.is_short(busy_after);
        let pick = if shared {
            lanes.pick(started, known_short)
        } else {
            if lanes.enabled() && statement.profile.class.is_shareable() {
                // It could share, but it usually takes long.
                self.inner
                    .counters
                    .long_statements
                    .fetch_add(1, Ordering::Relaxed);
            }
            Pick::Busy
        };
        let result = match pick {
            Pick::Lane(place) => self.on_lane(&node, place, statement, started).await,
            Pick::Open(slot) => {
                let queued_failure = || Error::Unavailable {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    reason: "opening a shared connection just failed; the node is being probed"
                        .to_owned(),
                };
                match lanes
                    .open(slot, || self.open_lane(&node), queued_failure)
                    .await
                {
                    Ok(lane) => match lanes.reserve(&lane, Instant::now(), known_short) {
                        Some(place) => self.on_lane(&node, place, statement, Instant::now()).await,
                        // Taken by another statement in the meantime.
                        None => {
                            self.inner
                                .counters
                                .lanes_busy
                                .fetch_add(1, Ordering::Relaxed);
                            self.on_own(&node, statement).await
                        }
                    },
                    Err(e) => Err(e),
                }
            }
            Pick::Busy => {
                if shared {
                    self.inner
                        .counters
                        .lanes_busy
                        .fetch_add(1, Ordering::Relaxed);
                }
                self.on_own(&node, statement).await
            }
        };
        self.slow_check(op, route, &node, started, sql, params);
        match result {
            Ok(done) => Ok((done, node)),
            Err(error) => {
                if error.provably_not_sent() {
                    enclosing.not_sent(sent);
                }
                let error = self.after_failure(&node, op, error, true).await;
                Err(Failed(error, Some(node)))
            }
        }
    }

    /// Runs `statement` on a shared connection.
    async fn on_lane(
        &self,
        node: &Node,
        place: Reserved,
        statement: Statement<'_>,
        started: Instant,
    ) -> Result<Done, Error> {
        let lanes = &node.inner.lanes;
        let lane = &Arc::clone(&place.lane);
        // (The first run on a connection includes its Parse; the usual
        // duration falls to the next, faster run at once.)
        let mut guard = LaneGuard {
            node,
            lane,
            armed: true,
        };
        let limit = self.inner.settings.round_trip;
        // One deadline for the statement's round trips (no clock read each).
        let deadline = limit.map(|l| started + l);
        let result = async {
            // Parse once per connection, apart: the time the statement takes
            // is its execution, not its first preparation.
            match self.prepare(&lane.conn, node, statement, deadline).await? {
                Some(prepared) => {
                    conn::bounded_at!(
                        deadline,
                        limit,
                        node,
                        statement.op,
                        run_prepared!(
                            &lane.conn,
                            &prepared,
                            statement.params,
                            statement.want,
                            node.name_arc(),
                            statement.op.name()
                        )
                    )
                }
                None => conn::bounded_at!(
                    deadline,
                    limit,
                    node,
                    statement.op,
                    run_unnamed!(
                        &lane.conn,
                        statement.sql,
                        statement.params,
                        statement.want,
                        node.name_arc(),
                        statement.op.name()
                    )
                ),
            }
        }
        .await;
        let served = place.done(Instant::now());
        let result = match result {
            Ok(got) => {
                if let Some(timing) = statement.profile.timing {
                    timing.record(served);
                }
                let position = if statement.track {
                    Some(conn::bounded!(
                        limit,
                        node,
                        statement.op,
                        position_on(&lane.conn, node, statement.op)
                    ))
                } else {
                    None
                };
                Ok((got, position))
            }
            Err(error) => Err(error),
        };
        guard.armed = false;
        let broken = |e: &Error| matches!(e, Error::Connection { .. } | Error::Timeout { .. });
        let broke = match &result {
            Err(e) | Ok((_, Some(Err(e)))) => broken(e),
            Ok(_) => false,
        };
        // The allow-list keeps session statements off the lanes; should the
        // pool still see a change, the lane is not used again.
        if broke || lane.conn.session_changed() {
            lanes.retire(lane);
        }
        result
    }

    /// Runs `statement` on a connection of its own.
    async fn on_own(&self, node: &Node, statement: Statement<'_>) -> Result<Done, Error> {
        let conn = self.checkout(node, statement.op).await?;
        let limit = self.inner.settings.round_trip;
        let deadline = limit.map(|l| Instant::now() + l);
        let prepared = self.prepare(&conn, node, statement, deadline).await?;
        let sent_at = Instant::now();
        let got = match prepared {
            Some(prepared) => conn::bounded_at!(
                deadline,
                limit,
                node,
                statement.op,
                run_prepared!(
                    &conn,
                    &prepared,
                    statement.params,
                    statement.want,
                    node.name_arc(),
                    statement.op.name()
                )
            ),
            None => conn::bounded_at!(
                deadline,
                limit,
                node,
                statement.op,
                run_unnamed!(
                    &conn,
                    statement.sql,
                    statement.params,
                    statement.want,
                    node.name_arc(),
                    statement.op.name()
                )
            ),
        }?;
        if let Some(timing) = statement.profile.timing {
            timing.record(sent_at.elapsed());
        }
        let position = if statement.track {
            Some(conn::bounded!(
                limit,
                node,
                statement.op,
                position_on(&conn, node, statement.op)
            ))
        } else {
            None
        };
        Ok((got, position))
    }

    /// Prepares the statement on `conn` (a round trip the first time on a
    /// connection, a cache look-up after) when prepared statements are on
    /// (`None` when they are off).
    async fn prepare(
        &self,
        conn: &PooledConnection,
        node: &Node,
        statement: Statement<'_>,
        deadline: Option<Instant>,
    ) -> Result<Option<tokio_postgres::Statement>, Error> {
        if !self.inner.settings.prepared {
            return Ok(None);
        }
        let prepare = async {
            conn.prepare_cached(statement.sql)
                .await
                .map_err(|e| Error::from_postgres(e, node.name_arc(), statement.op.name(), false))
        };
        let limit = self.inner.settings.round_trip;
        conn::bounded_at!(deadline, limit, node, statement.op, prepare).map(Some)
    }

    /// What a failed attempt means for routing: a node failure sets the
    /// node aside, a `25006` from the primary starts a search for the new
    /// one. (What the caller sees is settled by the retry rules.)
    pub(super) async fn after_failure(
        &self,
        node: &Node,
        op: &Op,
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
        error
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
            let role = role_of(&conn, node, op.name()).await?;
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

/// Reads the primary's WAL insert position on `conn`: with
/// `synchronous_commit = off` a commit's record may not be written yet when
/// the commit returns, but it is inserted.
async fn position_on(conn: &PooledConnection, node: &Node, op: &Op) -> Result<WalPosition, Error> {
    let rows = conn
        .simple_query("SELECT pg_current_wal_insert_lsn()::text")
        .await
        .map_err(|e| Error::from_postgres(e, node.name_arc(), op.name(), true))?;
    first_text(&rows)
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| no_position(node, op))
}

fn no_position(node: &Node, op: &Op) -> Error {
    Error::Usage {
        operation: op.name().to_owned(),
        problem: format!(
            "{} returned no WAL position after the write (is it a standby?)",
            node.name()
        ),
    }
}
