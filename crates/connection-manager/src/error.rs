//! The one error type of the cluster, and the SQLSTATE table that says which
//! server errors are worth retrying.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use pgstack_pool::{AcquirePhase, PoolError};

use crate::row::RowError;

/// SQLSTATE codes (besides class `08`, connection exceptions) after which
/// repeating the work may succeed.
///
/// | code | name | why it may pass next time |
/// |---|---|---|
/// | `08xxx` | connection exception | a new connection may work |
/// | `40001` | serialization_failure | the conflicting transaction is gone |
/// | `40P01` | deadlock_detected | the other party of the deadlock is gone |
/// | `53000` | insufficient_resources | transient pressure |
/// | `53200` | out_of_memory | transient pressure |
/// | `53300` | too_many_connections | a slot frees up |
/// | `55P03` | lock_not_available | the lock is released |
/// | `57P01` | admin_shutdown | the server or a replacement comes back |
/// | `57P02` | crash_shutdown | the server comes back after recovery |
/// | `57P03` | cannot_connect_now | the server finishes starting |
/// | `58000` | system_error | transient I/O trouble on the server |
/// | `25006` | read_only_sql_transaction | sent to a demoted primary: the new primary is found |
pub const TRANSIENT_SQLSTATES: [&str; 12] = [
    "40001", "40P01", "53000", "53200", "53300", "55P03", "57P01", "57P02", "57P03", "58000",
    "25006", "08000",
];

/// Whether a server error with SQLSTATE `code` may go away if the work is
/// repeated (see [`TRANSIENT_SQLSTATES`]; every `08xxx` code counts).
///
/// ```
/// use pgstack_connection::is_transient_sqlstate;
/// assert!(is_transient_sqlstate("40001"));
/// assert!(is_transient_sqlstate("08006"));
/// assert!(!is_transient_sqlstate("23505")); // unique_violation
/// ```
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || TRANSIENT_SQLSTATES.contains(&code)
}

/// SQLSTATE codes after which the statement provably had no effect and the
/// server is healthy: the work can be repeated even if it writes.
pub(crate) fn is_rejected_before_effect(code: &str) -> bool {
    matches!(
        code,
        "40001" | "40P01" | "53000" | "53200" | "53300" | "55P03" | "57P03" | "25006"
    )
}

/// Whether the SQLSTATE says the node itself is in trouble (for routing:
/// the node is set aside and probed in the background).
pub(crate) fn is_node_failure(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "58000")
}

/// A server error, with everything PostgreSQL said about it.
#[derive(Debug)]
#[non_exhaustive]
pub struct DbError {
    /// The node that answered.
    pub node: Arc<str>,
    /// The operation.
    pub operation: String,
    /// The SQLSTATE code, e.g. `23505`.
    pub code: String,
    /// `ERROR`, `FATAL`, ...
    pub severity: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    pub detail: Option<String>,
    /// The optional hint.
    pub hint: Option<String>,
    /// The constraint violated, if any.
    pub constraint: Option<String>,
    /// The table concerned, if any.
    pub table: Option<String>,
    /// The column concerned, if any.
    pub column: Option<String>,
    /// Where it happened, as the server says (`COPY bills, line 3, column
    /// id: "x"`; a function's call stack), if it said.
    pub context: Option<String>,
    /// The error as tokio-postgres reported it.
    pub source: tokio_postgres::Error,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` on {}: {} {}: {}",
            self.operation, self.node, self.severity, self.code, self.message
        )?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        if let Some(constraint) = &self.constraint {
            write!(f, " (constraint: {constraint})")?;
        }
        if let Some(context) = &self.context {
            write!(f, " (context: {context})")?;
        }
        Ok(())
    }
}

/// Everything the cluster can fail with.
///
/// [`Error::is_transient`] says whether repeating the work may help; the
/// cluster's own retries already follow the rules in `docs/connection.md`,
/// so an error that reaches the caller was either permanent or not safe to
/// repeat, or the retries ran out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connection within `pool.acquire_timeout`; the pool's error names
    /// the phase (waiting, connecting, validating), the last connect error and
    /// the pool's figures.
    #[error("pool timeout on {node} for `{operation}`: {source}")]
    PoolTimeout {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The pool's error (see [`PoolError::timeout_phase`]).
        #[source]
        source: Box<PoolError>,
    },
    /// The node's circuit breaker is open: nothing was sent.
    #[error("circuit open on {node} for `{operation}`: {}", probe_text(*.probe_in))]
    CircuitOpen {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// Time until the breaker lets a probe through, when known.
        probe_in: Option<Duration>,
        /// The pool's error.
        #[source]
        source: Box<PoolError>,
    },
    /// The node could not be reached in time; nothing was sent.
    #[error("{node} is unavailable for `{operation}` (nothing was sent): {reason}")]
    Unavailable {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// What happened.
        reason: String,
    },
    /// The server answered with an error.
    #[error("database error: {0}")]
    Database(Box<DbError>),
    /// The connection broke, or could not be used. `sent` says whether the
    /// work may have reached the server.
    #[error("connection to {node} lost during `{operation}` ({}): {source}",
        if *.sent { "the request may have reached the server" } else { "nothing was sent" })]
    Connection {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// Whether the request may have reached the server.
        sent: bool,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The call took longer than its time limit; the work may have reached
    /// the server.
    #[error("`{operation}` on {node} timed out after {after:?}")]
    Timeout {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The limit.
        after: Duration,
    },
    /// The connection was lost while `COMMIT` (or an autocommit write) was in
    /// flight, and nobody could tell whether it committed: `reason` says why
    /// (an autocommit write cannot be looked up; a transaction's id was not
    /// learned; no primary answered before the call's deadline). Never
    /// retried; look the effect up (e.g. by its key) before repeating it,
    /// or, for a transaction whose id is known, ask the primary
    /// `SELECT txid_status(xid)`.
    #[error(
        "the outcome of `{operation}` on {node} is unknown: {reason}{}; check whether it took \
         effect before repeating it",
        match .xid {
            Some(xid) => format!(" (transaction id {xid}: `SELECT txid_status({xid})` on the primary tells)"),
            None => String::new(),
        }
    )]
    CommitOutcomeUnknown {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// Why the outcome could not be found out.
        reason: String,
        /// The transaction's id, when it was learned.
        xid: Option<i64>,
        /// What tokio-postgres reported; `None` when the commit ran past the
        /// attempt's time limit.
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// The connection was lost while `COMMIT` was in flight, and the primary
    /// that answers now has never seen the transaction's writes: another
    /// node was promoted (or the server's log was cut short) before they
    /// reached it. It did not commit there; whatever the old primary did is
    /// gone with it. Repeating the work on the current primary is safe
    /// ([`Error::provably_not_sent`] is true), but it is not done for the
    /// caller: a commit lost in a failover is worth knowing about.
    #[error(
        "the commit of `{operation}` on {node} was lost: {reason} (transaction id {xid}); it \
         did not commit on the current primary, so repeating it is safe"
    )]
    CommitLost {
        /// The node the transaction ran on.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The transaction's id on the old primary.
        xid: i64,
        /// What showed it.
        reason: String,
    },
    /// The call failed after some of its work reached the server and may
    /// have taken effect (`committed`: did take effect), so it was not
    /// repeated: a `write` closure whose second statement failed after its
    /// first one wrote, a closure whose nested call failed after an earlier
    /// one wrote, an `execute_tracked` whose write committed but whose WAL
    /// position could not be read. `source` is the failure; [`Error::code`]
    /// and [`Error::as_db_error`] look through to it. Mark the operation
    /// [`crate::Op::idempotent`] if repeating all of it is safe.
    #[error(
        "`{operation}` on {node} failed after {}: {source}",
        if *.committed {
            "its write committed"
        } else {
            "earlier statements of the call reached the server and may have taken effect \
             (it was not repeated)"
        }
    )]
    PartiallyApplied {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// Whether the work is known to have committed.
        committed: bool,
        /// The failure.
        #[source]
        source: Box<Error>,
    },
    /// The transaction closure returned `Ok` after a statement in it had
    /// failed (the error was swallowed) and no `ROLLBACK TO SAVEPOINT`
    /// recovered it: PostgreSQL had aborted the transaction, so it was rolled
    /// back, not committed. Also when the check before `COMMIT` found the
    /// transaction aborted by a statement whose result the closure did not
    /// wait for. Return the statement's error (`?`) instead, or roll back to
    /// a savepoint to go on after it.
    #[error(
        "`{operation}` on {node} was rolled back, not committed: {statement} failed ({reason}) \
         and the closure still returned Ok; return the error, or roll back to a savepoint to \
         carry on after it"
    )]
    TransactionAborted {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The first statement that failed (its first 200 characters, in
        /// backquotes), or what the check found.
        statement: String,
        /// Why it failed.
        reason: String,
        /// Its SQLSTATE, for a server error.
        code: Option<String>,
    },
    /// A transaction failed and did not commit: nothing of it took effect
    /// (its connection broke before `COMMIT`, a round trip ran out, or a
    /// `COMMIT` whose connection broke was looked up and found rolled back),
    /// and the retries, if any, ran out. `source` is the last failure;
    /// [`Error::code`] and [`Error::is_transient`] look through to it.
    #[error("`{operation}` on {node} did not commit (nothing of it took effect): {source}")]
    RolledBack {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The failure.
        #[source]
        source: Box<Error>,
    },
    /// The cluster is shutting down: no new work is taken.
    #[error("the cluster is shutting down; `{operation}` was not started")]
    ShuttingDown {
        /// The operation.
        operation: String,
    },
    /// No configured node accepts writes (every node is down, read-only or in
    /// recovery).
    #[error("{details} (no configured node accepts writes, for `{operation}`)")]
    NoPrimary {
        /// The operation.
        operation: String,
        /// What each node answered.
        details: String,
    },
    /// A statement the shared (pipelined) connections must not run, or
    /// another misuse; the message says what to do instead.
    #[error("`{operation}`: {problem}")]
    Usage {
        /// The operation.
        operation: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// A client-side error: a parameter that could not be encoded, a column
    /// that could not be decoded, an unexpected number of rows. Nothing to
    /// retry.
    #[error("`{operation}` on {node}: {source}")]
    Client {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement returned another number of rows than the call expects
    /// (`query_one`: exactly one; `query_opt`: at most one).
    #[error("`{operation}` on {node} expected {expected} but got {got} rows")]
    UnexpectedRows {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// What was expected.
        expected: &'static str,
        /// Rows returned.
        got: usize,
    },
    /// A row could not be read into the caller's type (`query_as` and its
    /// kin): `column`, the Rust type it was read as and its PostgreSQL type
    /// (`None` when the row has no such column); `source` says what went
    /// wrong. The statement ran: nothing to retry.
    #[error("`{operation}` on {node}: {source}")]
    RowMapping {
        /// The node.
        node: Arc<str>,
        /// The operation.
        operation: String,
        /// The column.
        column: String,
        /// The Rust type.
        rust_type: String,
        /// The column's PostgreSQL type, when the row has the column.
        pg_type: Option<String>,
        /// What went wrong, in full.
        #[source]
        source: Box<RowError>,
    },
    /// The caller's closure gave up with an error of its own (see
    /// [`Error::abort`]); the transaction was rolled back. Never retried.
    #[error("aborted by the caller: {0}")]
    Aborted(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The pool could not be built or was closed.
    #[error("pool for {node}: {source}")]
    Pool {
        /// The node.
        node: Arc<str>,
        /// The pool's error.
        #[source]
        source: Box<PoolError>,
    },
    /// Invalid settings, each problem with the key and the fix.
    #[error("invalid settings: {0}")]
    Config(String),
}

fn probe_text(probe_in: Option<Duration>) -> String {
    match probe_in {
        Some(wait) => format!("next probe in {wait:?}"),
        None => "no probe scheduled (forced open, or every probe slot taken)".to_owned(),
    }
}

impl Error {
    /// An error of the caller's own, to end a transaction (rolled back) or a
    /// closure with; get it back with [`Error::aborted_with`].
    pub fn abort(reason: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Aborted(reason.into())
    }

    /// The caller's own error given to [`Error::abort`], if it is a `E`.
    pub fn aborted_with<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Error::Aborted(reason) => reason.downcast_ref::<E>(),
            _ => None,
        }
    }

    /// Whether repeating the work may succeed: connection loss, pool
    /// timeouts, an open breaker, time-outs, and server errors whose
    /// SQLSTATE is in [`TRANSIENT_SQLSTATES`] (or class `08`).
    ///
    /// Transient does not mean safe to repeat: a write whose connection broke
    /// may already have happened ([`Error::CommitOutcomeUnknown`] is never
    /// transient).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::PoolTimeout { .. }
            | Error::CircuitOpen { .. }
            | Error::Unavailable { .. }
            | Error::Connection { .. }
            | Error::Timeout { .. } => true,
            Error::Database(db) => is_transient_sqlstate(&db.code),
            Error::RolledBack { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// The SQLSTATE code of a server error (also the one behind
    /// [`Error::PartiallyApplied`] and [`Error::TransactionAborted`]).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Database(db) => Some(&db.code),
            Error::PartiallyApplied { source, .. } | Error::RolledBack { source, .. } => {
                source.code()
            }
            Error::TransactionAborted { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The server error, if this is one (or the one behind
    /// [`Error::PartiallyApplied`]).
    pub fn as_db_error(&self) -> Option<&DbError> {
        match self {
            Error::Database(db) => Some(db),
            Error::PartiallyApplied { source, .. } | Error::RolledBack { source, .. } => {
                source.as_db_error()
            }
            _ => None,
        }
    }

    /// Whether this is [`Error::CommitOutcomeUnknown`].
    pub fn is_commit_outcome_unknown(&self) -> bool {
        matches!(self, Error::CommitOutcomeUnknown { .. })
    }

    /// Whether this is [`Error::CommitLost`].
    pub fn is_commit_lost(&self) -> bool {
        matches!(self, Error::CommitLost { .. })
    }

    /// Whether this is a unique-constraint violation (`23505`).
    pub fn is_unique_violation(&self) -> bool {
        self.code() == Some("23505")
    }

    /// The node the error came from, when one was involved.
    pub fn node(&self) -> Option<&str> {
        match self {
            Error::PoolTimeout { node, .. }
            | Error::CircuitOpen { node, .. }
            | Error::Unavailable { node, .. }
            | Error::Connection { node, .. }
            | Error::Timeout { node, .. }
            | Error::CommitOutcomeUnknown { node, .. }
            | Error::CommitLost { node, .. }
            | Error::RolledBack { node, .. }
            | Error::Client { node, .. }
            | Error::UnexpectedRows { node, .. }
            | Error::RowMapping { node, .. }
            | Error::PartiallyApplied { node, .. }
            | Error::TransactionAborted { node, .. }
            | Error::Pool { node, .. } => Some(node),
            Error::Database(db) => Some(&db.node),
            _ => None,
        }
    }

    /// Whether no part of the call can have taken effect: nothing was sent,
    /// the server refused it before it could take effect, or (for a
    /// transaction) it was rolled back. A call whose earlier statements may
    /// have written reports [`Error::PartiallyApplied`] instead, so this is
    /// true of every error a call returns only when repeating it is safe.
    pub fn provably_not_sent(&self) -> bool {
        match self {
            Error::PoolTimeout { .. }
            | Error::CircuitOpen { .. }
            | Error::Unavailable { .. }
            | Error::ShuttingDown { .. }
            | Error::NoPrimary { .. }
            | Error::Usage { .. }
            | Error::TransactionAborted { .. }
            | Error::CommitLost { .. }
            | Error::RolledBack { .. }
            | Error::Pool { .. } => true,
            Error::Connection { sent, .. } => !sent,
            Error::Database(db) => is_rejected_before_effect(&db.code),
            _ => false,
        }
    }

    /// An open circuit that only an operator's reset closes (no probe is
    /// ever due): waiting cannot help.
    pub(crate) fn is_forced_open(&self) -> bool {
        matches!(
            self,
            Error::CircuitOpen { source, .. }
                if matches!(
                    source.as_ref(),
                    PoolError::CircuitOpen { source, .. }
                        if source.state == pgstack_resilience::BreakerState::ForcedOpen
                )
        )
    }

    /// Whether the error says the node is unreachable or going away.
    pub(crate) fn is_node_failure(&self) -> bool {
        match self {
            Error::Connection { .. } | Error::Timeout { .. } | Error::Unavailable { .. } => true,
            Error::PoolTimeout { source, .. } => {
                source.timeout_phase() != Some(AcquirePhase::WaitingForConnection)
            }
            Error::CircuitOpen { .. } => true,
            Error::Database(db) => is_node_failure(&db.code),
            _ => false,
        }
    }

    /// Wraps a tokio-postgres error with its context. `sent`: whether the
    /// request may have reached the server.
    pub(crate) fn from_postgres(
        source: tokio_postgres::Error,
        node: &Arc<str>,
        operation: &str,
        sent: bool,
    ) -> Error {
        if let Some(db) = source.as_db_error() {
            return Error::Database(Box::new(DbError {
                node: Arc::clone(node),
                operation: operation.to_owned(),
                code: db.code().code().to_owned(),
                severity: db.severity().to_owned(),
                message: db.message().to_owned(),
                detail: db.detail().map(str::to_owned),
                hint: db.hint().map(str::to_owned),
                constraint: db.constraint().map(str::to_owned),
                table: db.table().map(str::to_owned),
                column: db.column().map(str::to_owned),
                context: db.where_().map(str::to_owned),
                source,
            }));
        }
        match client_side(&source) {
            Some(ClientSide::BeforeSend) | Some(ClientSide::AfterReply) => Error::Client {
                node: Arc::clone(node),
                operation: operation.to_owned(),
                source,
            },
            None => Error::Connection {
                node: Arc::clone(node),
                operation: operation.to_owned(),
                sent,
                source,
            },
        }
    }

    /// A row that could not be read into the caller's type.
    pub(crate) fn row_mapping(source: RowError, node: &Arc<str>, operation: &str) -> Error {
        Error::RowMapping {
            node: Arc::clone(node),
            operation: operation.to_owned(),
            column: source.column.clone(),
            rust_type: source.rust_type.clone(),
            pg_type: source.pg_type.clone(),
            source: Box::new(source),
        }
    }

    pub(crate) fn from_pool(source: PoolError, node: &Arc<str>, operation: &str) -> Error {
        match source {
            PoolError::Timeout(_) => Error::PoolTimeout {
                node: Arc::clone(node),
                operation: operation.to_owned(),
                source: Box::new(source),
            },
            PoolError::CircuitOpen { source: ref r, .. } => Error::CircuitOpen {
                node: Arc::clone(node),
                operation: operation.to_owned(),
                probe_in: r.probe_in(),
                source: Box::new(source),
            },
            PoolError::Closed { .. } => Error::ShuttingDown {
                operation: operation.to_owned(),
            },
            source => Error::Pool {
                node: Arc::clone(node),
                source: Box::new(source),
            },
        }
    }
}

/// tokio-postgres errors raised by the client itself, not by the
/// connection. Its error kinds are private; their messages are stable.
enum ClientSide {
    /// A parameter could not be encoded: nothing was sent.
    BeforeSend,
    /// The reply could not be used (rows, columns): the server did its part.
    AfterReply,
}

fn client_side(error: &tokio_postgres::Error) -> Option<ClientSide> {
    if error.is_closed() {
        return None;
    }
    let text = error.to_string();
    if text.starts_with("error serializing parameter") || text.starts_with("expected ") {
        Some(ClientSide::BeforeSend)
    } else if text.starts_with("error deserializing column")
        || text.starts_with("invalid column")
        || text.starts_with("query returned an unexpected number of")
    {
        Some(ClientSide::AfterReply)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_table() {
        for code in [
            "08000", "08003", "08006", "08001", "08004", "57P01", "57P02", "57P03", "53300",
            "40001", "40P01", "55P03", "25006",
        ] {
            assert!(is_transient_sqlstate(code), "{code}");
        }
        for code in [
            "23505", "23503", "42P01", "42601", "22012", "57014", "XX000",
        ] {
            assert!(!is_transient_sqlstate(code), "{code}");
        }
        assert!(is_rejected_before_effect("40001"));
        assert!(!is_rejected_before_effect("57P01"));
        assert!(!is_rejected_before_effect("08006"));
    }
}
