//! Connections and transactions handed to callers, with query methods that
//! return [`Error`] (with the node and the operation) and that respect
//! `query.prepared_statements`.

use std::fmt;
use std::ops::{Deref, DerefMut};

use pgstack_pool::PooledConnection;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::error::Error;
use crate::node::Node;
use crate::route::Op;

/// What a statement should hand back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Want {
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
/// values when they are off.
macro_rules! run_statement {
    ($conn:expr, $prepared:expr, $sql:expr, $params:expr, $want:expr, $node:expr, $op:expr) => {
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
                let result = match $want {
                    $crate::conn::Want::Rows => conn
                        .query(&statement, $params)
                        .await
                        .map($crate::conn::Got::Rows),
                    $crate::conn::Want::Count => conn
                        .execute(&statement, $params)
                        .await
                        .map($crate::conn::Got::Count),
                };
                result.map_err(|e| $crate::error::Error::from_postgres(e, node, op, true))
            } else {
                let typed = $crate::params::typed($params).map_err(|index| {
                    $crate::error::Error::Usage {
                        operation: op.to_owned(),
                        problem: format!(
                            "cannot tell the PostgreSQL type of parameter ${} without a \
                             prepared statement (query.prepared_statements = false); pass a \
                             common type and cast it in SQL (a String and `${}::mytype`), or \
                             call query_typed on a connection from Cluster::connection",
                            index + 1,
                            index + 1
                        ),
                    }
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
        }
    };
}
pub(crate) use run_statement;

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

pub(crate) fn one(rows: Vec<Row>, node: &Node, op: &str) -> Result<Row, Error> {
    let got = rows.len();
    let mut rows = rows.into_iter();
    match (rows.next(), got) {
        (Some(row), 1) => Ok(row),
        _ => Err(Error::UnexpectedRows {
            node: std::sync::Arc::clone(node.name_arc()),
            operation: op.to_owned(),
            expected: "exactly one row",
            got,
        }),
    }
}

pub(crate) fn opt(rows: Vec<Row>, node: &Node, op: &str) -> Result<Option<Row>, Error> {
    let got = rows.len();
    if got > 1 {
        return Err(Error::UnexpectedRows {
            node: std::sync::Arc::clone(node.name_arc()),
            operation: op.to_owned(),
            expected: "at most one row",
            got,
        });
    }
    Ok(rows.into_iter().next())
}

/// The query methods of [`Connection`] and [`Transaction`].
macro_rules! query_methods {
    ($target:ident) => {
        /// Runs a statement and returns its rows.
        ///
        /// # Errors
        /// [`Error::Database`] for a server error, [`Error::Connection`] when
        /// the connection broke, [`Error::Usage`] for a parameter whose type
        /// cannot be told without prepared statements.
        pub async fn query(
            &self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, Error> {
            let got = run_statement!(
                &self.$target,
                self.prepared,
                sql,
                params,
                Want::Rows,
                self.node.name_arc(),
                self.op.name()
            )
            .await?;
            Ok(rows(got))
        }

        /// Runs a statement that returns exactly one row.
        ///
        /// # Errors
        /// As [`Self::query`], and [`Error::UnexpectedRows`] for any other
        /// number of rows.
        pub async fn query_one(
            &self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Row, Error> {
            let rows = self.query(sql, params).await?;
            one(rows, &self.node, self.op.name())
        }

        /// Runs a statement that returns at most one row.
        ///
        /// # Errors
        /// As [`Self::query`], and [`Error::UnexpectedRows`] for more rows.
        pub async fn query_opt(
            &self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Option<Row>, Error> {
            let rows = self.query(sql, params).await?;
            opt(rows, &self.node, self.op.name())
        }

        /// Runs a statement and returns the number of rows it affected.
        ///
        /// # Errors
        /// As [`Self::query`].
        pub async fn execute(
            &self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64, Error> {
            let got = run_statement!(
                &self.$target,
                self.prepared,
                sql,
                params,
                Want::Count,
                self.node.name_arc(),
                self.op.name()
            )
            .await?;
            Ok(count(got))
        }

        /// Runs one or more statements with the simple protocol (no
        /// parameters), discarding rows.
        ///
        /// # Errors
        /// As [`Self::query`].
        pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
            self.$target
                .batch_execute(sql)
                .await
                .map_err(|e| Error::from_postgres(e, self.node.name_arc(), self.op.name(), true))
        }

        /// The node this runs on.
        pub fn node(&self) -> &Node {
            &self.node
        }
    };
}

/// A connection of its own, from [`crate::Cluster::connection`] or the
/// closures of [`crate::Cluster::read`] and [`crate::Cluster::write`].
///
/// Its query methods return [`Error`]; everything else of
/// [`PooledConnection`] (transactions, COPY through the raw client) is
/// reachable through `Deref`. Dropped, it goes back to its node's pool, which
/// rolls back anything left open.
pub struct Connection {
    pub(crate) conn: PooledConnection,
    pub(crate) node: Node,
    pub(crate) op: Op,
    pub(crate) prepared: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("node", &self.node.name())
            .field("operation", &self.op.name())
            .finish_non_exhaustive()
    }
}

impl Connection {
    query_methods!(conn);

    /// The pooled connection itself.
    pub fn into_inner(self) -> PooledConnection {
        self.conn
    }
}

impl Deref for Connection {
    type Target = PooledConnection;

    fn deref(&self) -> &PooledConnection {
        &self.conn
    }
}

impl DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut PooledConnection {
        &mut self.conn
    }
}

/// The transaction handed to the closure of [`crate::Cluster::transaction`].
///
/// The cluster commits it when the closure returns `Ok` and rolls it back on
/// `Err`, on a panic, or when the future is dropped.
pub struct Transaction<'a> {
    pub(crate) tx: pgstack_pool::Transaction<'a>,
    pub(crate) node: Node,
    pub(crate) op: Op,
    pub(crate) prepared: bool,
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
    query_methods!(tx);

    /// The pool's transaction, for what the methods here do not cover
    /// (prepared statements, `query_typed`). Do not commit or roll it back
    /// yourself: return from the closure instead.
    pub fn raw(&self) -> &pgstack_pool::Transaction<'a> {
        &self.tx
    }
}
