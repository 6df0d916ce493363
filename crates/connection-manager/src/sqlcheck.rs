//! Statements the statement helpers refuse: the ones that would leave a
//! (shared) connection inside a transaction or change its session.
//!
//! The helpers send one statement with the extended protocol, which accepts
//! exactly one command, so the first keyword decides.

use pgstack_pool::first_keyword;

/// Why `sql` must not run through a statement helper, if it must not.
pub(crate) fn refusal(sql: &str) -> Option<&'static str> {
    let word = first_keyword(sql)?;
    let is = |w: &str| word.eq_ignore_ascii_case(w);
    if [
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
    ]
    .iter()
    .any(|w| is(w))
    {
        return Some(
            "transaction control is not allowed in a statement helper (it would leave a \
             shared connection inside a transaction); use Cluster::transaction",
        );
    }
    if is("prepare") || is("deallocate") {
        return Some(
            "PREPARE/DEALLOCATE change the session; statements are prepared for you \
             (or use a raw connection from Cluster::connection)",
        );
    }
    if ["set", "reset", "discard"].iter().any(|w| is(w)) {
        return Some(
            "SET/RESET/DISCARD change the session of a shared connection; use SET LOCAL \
             inside Cluster::transaction, or a raw connection from Cluster::connection",
        );
    }
    if [
        "listen", "unlisten", "declare", "fetch", "move", "close", "lock",
    ]
    .iter()
    .any(|w| is(w))
    {
        return Some(
            "this statement needs a session or a transaction of its own; use \
             Cluster::transaction or a raw connection from Cluster::connection",
        );
    }
    let lower = sql.to_ascii_lowercase();
    let session_lock = ["pg_advisory_lock", "pg_try_advisory_lock"]
        .iter()
        .any(|f| lower.contains(f));
    if session_lock {
        return Some(
            "session-level advisory locks outlive the statement on a shared connection; use \
             pg_advisory_xact_lock inside Cluster::transaction, or a raw connection",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_transaction_and_session_statements() {
        for sql in [
            "BEGIN",
            " start transaction",
            "COMMIT",
            "rollback",
            "/* x */ SAVEPOINT a",
            "SET search_path = x",
            "reset all",
            "DISCARD ALL",
            "LISTEN ch",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "LOCK TABLE t",
            "SELECT pg_advisory_lock(1)",
            "select pg_try_advisory_lock(1)",
        ] {
            assert!(refusal(sql).is_some(), "{sql}");
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
        ] {
            assert!(refusal(sql).is_none(), "{sql}");
        }
    }
}
