//! A conservative look at statement text: could it open or close a transaction?
//!
//! tokio-postgres does not report the server's transaction status, so the
//! pool errs on the safe side: a statement that *might* change it marks the
//! connection's state unknown, and the connection is rolled back before it
//! goes back to the pool. False positives cost one `ROLLBACK`; there are no
//! false negatives for the transaction-control commands.

/// Keywords that start a transaction-control command.
const TRANSACTION_WORDS: [&str; 9] = [
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "prepare",
];

fn is_transaction_word(word: &str) -> bool {
    TRANSACTION_WORDS
        .iter()
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// One statement sent with the extended protocol (which accepts exactly one
/// command): does its first keyword control transactions?
pub(crate) fn single_statement_may_change_transaction(sql: &str) -> bool {
    match first_keyword(sql) {
        Some(word) => is_transaction_word(word),
        // Nothing recognisable: be conservative.
        None => !sql.trim().is_empty(),
    }
}

/// A simple-protocol string that may hold several commands: does any word
/// in it control transactions? (Words inside strings and bodies count too:
/// that only costs a spare `ROLLBACK`.)
pub(crate) fn batch_may_change_transaction(sql: &str) -> bool {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(is_transaction_word)
}

/// The first keyword of a statement, skipping white space, comments (nested
/// block comments too) and opening parentheses; `None` when the text holds no
/// keyword. Shared with the layers above, which classify statements too.
///
/// ```
/// assert_eq!(pgstack_pool::first_keyword("/* a /* b */ */ (SELECT 1)"), Some("SELECT"));
/// assert_eq!(pgstack_pool::first_keyword("-- only a comment"), None);
/// ```
pub fn first_keyword(sql: &str) -> Option<&str> {
    let mut rest = sql;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(after) = rest.strip_prefix("--") {
            rest = after.split_once('\n').map_or("", |(_, r)| r);
        } else if let Some(after) = rest.strip_prefix("/*") {
            // PostgreSQL block comments nest.
            let mut depth = 1usize;
            let bytes = after.as_bytes();
            let mut i = 0;
            while i < bytes.len() && depth > 0 {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            rest = after.get(i..).unwrap_or("");
        } else {
            break;
        }
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_recognised() {
        for sql in [
            "BEGIN",
            "begin isolation level serializable",
            "  START TRANSACTION",
            "COMMIT",
            "end",
            "ROLLBACK TO SAVEPOINT a",
            "abort",
            "SAVEPOINT a",
            "RELEASE a",
            "PREPARE TRANSACTION 'x'",
            "-- comment\nBEGIN",
            "/* a /* nested */ comment */ BEGIN",
            "/* unterminated",
        ] {
            assert!(single_statement_may_change_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn ordinary_statements_are_not() {
        for sql in [
            "SELECT 1",
            "select begin_date from t",
            "(SELECT 1)",
            "INSERT INTO t VALUES (1)",
            "-- BEGIN\nSELECT 1",
            "/* BEGIN */ UPDATE t SET a = 1",
            "",
        ] {
            assert!(!single_statement_may_change_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn batches_are_scanned_word_by_word() {
        assert!(batch_may_change_transaction("SELECT 1; BEGIN; SELECT 2"));
        assert!(batch_may_change_transaction("select 1;commit"));
        assert!(!batch_may_change_transaction(
            "SELECT begin_date FROM t; SELECT 2"
        ));
        assert!(!batch_may_change_transaction("CREATE TABLE t (a int)"));
    }
}
