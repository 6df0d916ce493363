//! Statements the statement helpers refuse, and why, in words that say what
//! to use instead.
//!
//! The helpers run one statement outside any transaction, on a shared
//! connection or on one of their own that goes back to the pool (and has its
//! session reset) right after. So a statement whose point is the session or
//! the transaction (`BEGIN`, `SET`, a temporary table, `LISTEN`, a session
//! advisory lock) would either leak into other callers' statements or be
//! undone before it could be used: it is refused. A statement that reads its
//! own session's state (`currval`, `lastval`, `pg_temp`) would answer for
//! whichever connection it lands on: refused too. Everything else runs: plain
//! reads and writes may share a connection, the rest (DDL, `COPY`, `DO`,
//! `VACUUM`, ...) takes one of its own.

use pgstack_pool::{Session, StatementClass, StatementKind};

use crate::conn::excerpt;

/// Why `sql` (of class `class`) must not run through a statement helper,
/// if it must not.
pub(crate) fn refusal(class: &StatementClass, sql: &str) -> Option<String> {
    // Built only for a refusal: the common case allocates nothing.
    let statement = || excerpt(sql);
    match class.kind() {
        StatementKind::TransactionControl | StatementKind::Savepoint => {
            return Some(format!(
                "`{}` controls a transaction, which a statement helper does not \
                 have (each statement is its own transaction); use Cluster::transaction",
                statement()
            ));
        }
        StatementKind::Several => {
            return Some(format!(
                "`{}` holds more than one statement; a statement helper sends one \
                 (the extended protocol). Make one call per statement, use \
                 Cluster::transaction to run them together, or batch_execute on a connection \
                 from Cluster::connection",
                statement()
            ));
        }
        StatementKind::Empty => {
            return Some("the statement is empty".to_owned());
        }
        _ => {}
    }
    if class.is_unreadable() {
        // The server will say what is wrong with it.
        return None;
    }
    if let Session::Changes("LISTEN/UNLISTEN") = class.session() {
        return Some(format!(
            "`{}` would listen on a connection that goes back to the pool (or is shared), \
             where notifications would reach nobody; use a listener: Database::listener / \
             Cluster::listener(channels), on a connection of its own that re-connects and \
             LISTENs again, and Database::notify / Cluster::notify to send",
            statement()
        ));
    }
    match class.session() {
        // DO and CALL run on a connection of their own, reset afterwards.
        Session::Neutral | Session::MayChange(_) => None,
        Session::Changes(what) | Session::ChangesLastingly(what) => Some(format!(
            "`{}` changes the session ({what}): on a shared connection other callers \
             would inherit it, and a connection of its own is reset when it goes back to the \
             pool, so the change would not last. Keep a connection for as long as you need it \
             (Cluster::connection), or scope it to a transaction (SET LOCAL, set_config(.., \
             .., true), pg_advisory_xact_lock, ON COMMIT DROP inside Cluster::transaction)",
            statement()
        )),
        Session::Reads(what) => Some(format!(
            "`{}` reads state of its own session ({what}), so its answer would \
             depend on which connection it lands on. Run it where that state was made: on \
             the same connection (Cluster::connection) or in the same transaction \
             (Cluster::transaction); for a new row's key, use RETURNING",
            statement()
        )),
        _ => Some(format!(
            "`{}` uses the session in a way pgstack does not know; run it on a \
             connection from Cluster::connection",
            statement()
        )),
    }
}

#[cfg(test)]
mod tests {
    use pgstack_pool::classify;

    use super::*;

    fn refused(sql: &str) -> Option<String> {
        refusal(&classify(sql), sql)
    }

    #[test]
    fn refuses_transaction_and_session_statements_saying_what_to_use() {
        for (sql, hint) in [
            ("BEGIN", "Cluster::transaction"),
            (" start transaction", "Cluster::transaction"),
            ("COMMIT", "Cluster::transaction"),
            ("/* x */ SAVEPOINT a", "Cluster::transaction"),
            ("SET search_path = x", "SET LOCAL"),
            ("reset all", "Cluster::connection"),
            ("DISCARD ALL", "Cluster::connection"),
            ("LISTEN ch", "Database::listener"),
            ("UNLISTEN *", "Cluster::listener"),
            ("PREPARE p AS SELECT 1", "Cluster::connection"),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                "Cluster::connection",
            ),
            ("CREATE TEMP TABLE accounts (id int)", "ON COMMIT DROP"),
            (
                "SELECT set_config('search_path', 'nowhere', false)",
                "set_config",
            ),
            ("SELECT pg_advisory_lock(1)", "pg_advisory_xact_lock"),
            ("LOAD 'auto_explain'", "Cluster::connection"),
            ("SELECT currval('bills_id_seq')", "RETURNING"),
            ("INSERT INTO pg_temp.t VALUES (1)", "same connection"),
            ("SELECT 1; SELECT 2", "one call per statement"),
        ] {
            let problem = refused(sql).unwrap_or_else(|| panic!("{sql} is refused"));
            assert!(problem.contains(hint), "{sql}: {problem}");
        }
    }

    #[test]
    fn allows_ordinary_statements() {
        for sql in [
            "SELECT 1",
            "select begin_date, set_name from t",
            "INSERT INTO t VALUES ($1)",
            "-- BEGIN\nUPDATE t SET a = 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT set_config('a.b', '1', true)",
            "CREATE TABLE t (a int)",
            "COPY t TO STDOUT",
            "VACUUM t",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL refresh_all()",
            "SELECT 'unterminated",
        ] {
            assert!(refused(sql).is_none(), "{sql}: {:?}", refused(sql));
        }
    }
}
