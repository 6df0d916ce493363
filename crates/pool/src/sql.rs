//! What a statement is, read from its tokens: whether it only reads, may
//! write, controls the transaction, or uses or changes its session.
//!
//! The pool uses this to keep its promise that no connection goes back to the
//! idle set inside a transaction or with another caller's session state; the
//! layers above use it to decide which statements may share a connection and
//! which ones may be repeated after a failure.
//!
//! The text is split into tokens by [`sqlparser`]'s tokenizer (PostgreSQL
//! dialect: dollar quoting, `E''` strings, nested comments, quoted
//! identifiers), so keywords inside strings, comments and quoted identifiers
//! are never mistaken for commands. The rules are an allow-list: only the
//! plain forms of `SELECT`/`VALUES`/`TABLE`/`SHOW`/`WITH` and of
//! `INSERT`/`UPDATE`/`DELETE`/`MERGE` without session effects are
//! [`StatementClass::is_shareable`]; everything else, and anything that
//! cannot be read, is not.
//!
//! Classifications are cached per text (a bounded, process-wide cache), so a
//! statement is tokenized once, not on every call.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{OnceLock, RwLock};

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, Tokenizer, Word};

/// What a single statement is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatementKind {
    /// `SELECT`, `VALUES`, `TABLE`, `SHOW`, a `WITH` without data-modifying
    /// parts, or `EXPLAIN` without `ANALYZE`: reads only (functions it calls
    /// aside).
    Read,
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, a `WITH` with a data-modifying
    /// part, or `EXPLAIN ANALYZE` of one.
    Write,
    /// Opens or ends a transaction: `BEGIN`, `START TRANSACTION`, `COMMIT`,
    /// `END`, `ROLLBACK`, `ABORT`, `PREPARE TRANSACTION`, `COMMIT PREPARED`,
    /// `ROLLBACK PREPARED`.
    TransactionControl,
    /// `SAVEPOINT`, `RELEASE [SAVEPOINT]`, `ROLLBACK TO [SAVEPOINT]`.
    Savepoint,
    /// Anything else: DDL, `DO`, `CALL`, `COPY`, `SET`, `LISTEN`, `VACUUM`,
    /// ..., and text that could not be read. Never shared.
    Other,
    /// More than one statement (the simple protocol's batches).
    Several,
    /// No statement at all (empty, or only comments).
    Empty,
}

/// How a statement involves the session (the server process) it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Session {
    /// Neither changes nor depends on session state.
    Neutral,
    /// Reads state of its own session (`currval`, `lastval`, temporary
    /// objects): the answer depends on which connection it runs on. The
    /// text says what.
    Reads(&'static str),
    /// May change the session, as far as its text tells (`DO`, `CALL`: the
    /// code they run may do anything; text that could not be read). Treated
    /// like [`Session::Changes`] by the pool (reset on return), but the
    /// statement may run on a connection of its own.
    MayChange(&'static str),
    /// Changes the session in a way `DISCARD ALL` undoes (`SET`,
    /// `set_config(.., false)`, temporary objects, session advisory locks,
    /// `LISTEN`, `PREPARE`, cursors `WITH HOLD`). The text says what.
    Changes(&'static str),
    /// Changes the session in a way `DISCARD ALL` does not undo (`LOAD`,
    /// `setseed`, dblink's named connections): the connection must be closed
    /// after it. The text says what.
    ChangesLastingly(&'static str),
}

impl Session {
    fn rank(self) -> u8 {
        match self {
            Session::Neutral => 0,
            Session::Reads(_) => 1,
            Session::MayChange(_) => 2,
            Session::Changes(_) => 3,
            Session::ChangesLastingly(_) => 4,
        }
    }

    fn max(self, other: Session) -> Session {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }

    /// Whether the session may be left changed.
    pub fn changes(self) -> bool {
        matches!(
            self,
            Session::MayChange(_) | Session::Changes(_) | Session::ChangesLastingly(_)
        )
    }

    /// What the statement does with the session, in words (`None` when
    /// neutral).
    pub fn describe(self) -> Option<&'static str> {
        match self {
            Session::Neutral => None,
            Session::Reads(what)
            | Session::MayChange(what)
            | Session::Changes(what)
            | Session::ChangesLastingly(what) => Some(what),
        }
    }
}

/// What a statement text is; from [`classify`].
///
/// ```
/// use pgstack_pool::{classify, Session, StatementKind};
/// let select = classify("SELECT id FROM bills WHERE id = $1");
/// assert_eq!(select.kind(), StatementKind::Read);
/// assert!(select.is_shareable());
///
/// let temp = classify("CREATE TEMP TABLE scratch (id int)");
/// assert!(!temp.is_shareable());
/// assert_eq!(temp.session(), Session::Changes("a temporary object"));
///
/// let setting = classify("SELECT set_config('search_path', 'x', false)");
/// assert!(setting.session().changes());
/// assert!(classify("SELECT set_config('search_path', 'x', true)").is_shareable());
///
/// // Keywords in strings and comments are not commands.
/// assert!(classify("/* BEGIN */ SELECT 'COMMIT; SET x = 1'").is_shareable());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatementClass {
    kind: StatementKind,
    session: Session,
    transaction_control: bool,
    savepoint: bool,
    rollback_to_savepoint: bool,
    writes: bool,
    unreadable: bool,
}

impl StatementClass {
    const UNREADABLE: StatementClass = StatementClass {
        kind: StatementKind::Other,
        session: Session::MayChange("a statement that could not be read"),
        transaction_control: true,
        savepoint: false,
        rollback_to_savepoint: false,
        writes: true,
        unreadable: true,
    };

    fn single(kind: StatementKind, session: Session) -> StatementClass {
        StatementClass {
            kind,
            session,
            transaction_control: kind == StatementKind::TransactionControl,
            savepoint: kind == StatementKind::Savepoint,
            rollback_to_savepoint: false,
            writes: !matches!(kind, StatementKind::Read | StatementKind::Empty),
            unreadable: false,
        }
    }

    /// Whether the text could not be tokenized (an unterminated string or
    /// comment): it is then treated as the worst case, and the server will
    /// most likely reject it.
    pub fn is_unreadable(&self) -> bool {
        self.unreadable
    }

    /// The kind of the statement ([`StatementKind::Several`] for a batch).
    pub fn kind(&self) -> StatementKind {
        self.kind
    }

    /// How the statement (the strongest of a batch) involves its session.
    pub fn session(&self) -> Session {
        self.session
    }

    /// Whether the statement may share a connection with other callers'
    /// statements: one plain read or write (see [`StatementKind`]) that
    /// neither changes nor reads session state.
    pub fn is_shareable(&self) -> bool {
        matches!(self.kind, StatementKind::Read | StatementKind::Write)
            && self.session == Session::Neutral
    }

    /// Whether it only reads: one [`StatementKind::Read`] statement.
    pub fn is_read(&self) -> bool {
        self.kind == StatementKind::Read
    }

    /// Whether any statement of the text may change data (anything but a
    /// plain read; functions a read calls are not looked into).
    pub fn may_write(&self) -> bool {
        self.writes
    }

    /// Whether any statement of the text opens or ends a transaction.
    pub fn controls_transaction(&self) -> bool {
        self.transaction_control
    }

    /// Whether any statement of the text is a savepoint command.
    pub fn uses_savepoints(&self) -> bool {
        self.savepoint
    }

    /// Whether the text rolls back to a savepoint (which, when it succeeds,
    /// leaves a failed transaction usable again).
    pub fn rolls_back_to_savepoint(&self) -> bool {
        self.rollback_to_savepoint
    }

    /// Whether running it may leave the connection's transaction state
    /// other than it was (transaction control or savepoints).
    pub fn may_change_transaction(&self) -> bool {
        self.transaction_control || self.savepoint
    }
}

/// What `sql` is (one statement, or a batch for the simple protocol).
///
/// Cached per text; the first call for a text tokenizes it. A text that
/// cannot be tokenized is treated as the worst case: not shareable, may
/// write, may control the transaction and change the session.
pub fn classify(sql: &str) -> StatementClass {
    cache().get_or_insert(sql)
}

/// Texts longer than this are classified on every call, not cached.
const CACHEABLE_LEN: usize = 16 * 1024;
/// Entries per shard; once a shard is full, new texts are classified on
/// every call (a program with unbounded distinct texts builds SQL from
/// values, and caching those would only grow).
const SHARD_CAPACITY: usize = 1024;
const SHARDS: usize = 16;

struct Cache {
    hasher: RandomState,
    shards: Vec<RwLock<HashMap<Box<str>, StatementClass>>>,
}

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Cache {
        hasher: RandomState::new(),
        shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
    })
}

impl Cache {
    fn get_or_insert(&self, sql: &str) -> StatementClass {
        if sql.len() > CACHEABLE_LEN {
            return classify_uncached(sql);
        }
        let shard = &self.shards[(self.hasher.hash_one(sql) as usize) % SHARDS];
        if let Some(class) = shard
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
            .copied()
        {
            return class;
        }
        let class = classify_uncached(sql);
        let mut map = shard.write().unwrap_or_else(|p| p.into_inner());
        if map.len() < SHARD_CAPACITY {
            map.insert(sql.into(), class);
        }
        class
    }
}

/// [`classify`] without the cache.
fn classify_uncached(sql: &str) -> StatementClass {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return StatementClass::UNREADABLE;
    };
    let tokens: Vec<Token> = tokens
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let statements: Vec<&[Token]> = tokens
        .split(|t| *t == Token::SemiColon)
        .filter(|s| !s.is_empty())
        .collect();
    match statements.as_slice() {
        [] => StatementClass::single(StatementKind::Empty, Session::Neutral),
        [one] => statement(one),
        several => {
            let mut class = StatementClass::single(StatementKind::Several, Session::Neutral);
            class.writes = false;
            for part in several {
                let part = statement(part);
                class.session = class.session.max(part.session);
                class.transaction_control |= part.transaction_control;
                class.savepoint |= part.savepoint;
                class.rollback_to_savepoint |= part.rollback_to_savepoint;
                class.writes |= part.writes;
                class.unreadable |= part.unreadable;
            }
            class
        }
    }
}

/// A keyword-like word (unquoted), lowercased for comparison.
fn word(token: &Token) -> Option<&str> {
    match token {
        Token::Word(Word {
            value,
            quote_style: None,
            ..
        }) => Some(value.as_str()),
        _ => None,
    }
}

fn is_word(token: Option<&Token>, expected: &str) -> bool {
    token
        .and_then(word)
        .is_some_and(|w| w.eq_ignore_ascii_case(expected))
}

/// The name a word stands for: unquoted words fold to lower case, quoted
/// ones keep their case (as PostgreSQL does).
fn name(token: &Token) -> Option<String> {
    match token {
        Token::Word(Word {
            value,
            quote_style: None,
            ..
        }) => Some(value.to_ascii_lowercase()),
        Token::Word(Word {
            value,
            quote_style: Some('"'),
            ..
        }) => Some(value.clone()),
        _ => None,
    }
}

/// One statement's class.
fn statement(tokens: &[Token]) -> StatementClass {
    // `(SELECT 1) UNION (SELECT 2)`: the first keyword decides.
    let start = tokens
        .iter()
        .position(|t| *t != Token::LParen)
        .unwrap_or(tokens.len());
    let body = &tokens[start..];
    let Some(first) = body.first().and_then(word) else {
        return match body.first() {
            None => StatementClass::single(StatementKind::Empty, Session::Neutral),
            Some(_) => StatementClass::single(
                StatementKind::Other,
                Session::MayChange("a statement pgstack cannot read"),
            ),
        };
    };
    let next = body.get(1);
    let first = first.to_ascii_lowercase();
    let (kind, session) = match first.as_str() {
        "select" | "values" | "table" | "with" => {
            let kind = if writes_in_query(body) {
                StatementKind::Write
            } else {
                StatementKind::Read
            };
            match select_into(body) {
                Some(temporary) => (
                    StatementKind::Other,
                    if temporary {
                        Session::Changes("a temporary object")
                    } else {
                        Session::Neutral
                    },
                ),
                None => (kind, Session::Neutral),
            }
        }
        "show" => (StatementKind::Read, Session::Neutral),
        "insert" | "update" | "delete" | "merge" => (StatementKind::Write, Session::Neutral),
        "explain" => {
            let analyze = body.iter().take(12).any(|t| is_word(Some(t), "analyze"));
            let kind = if analyze && writes_in_query(body) {
                StatementKind::Write
            } else {
                StatementKind::Read
            };
            (kind, Session::Neutral)
        }
        "begin" | "start" | "commit" | "end" | "abort" => {
            (StatementKind::TransactionControl, Session::Neutral)
        }
        "rollback" => {
            if is_word(next, "to") {
                let mut class = StatementClass::single(StatementKind::Savepoint, Session::Neutral);
                class.rollback_to_savepoint = true;
                return class;
            }
            (StatementKind::TransactionControl, Session::Neutral)
        }
        "savepoint" | "release" => (StatementKind::Savepoint, Session::Neutral),
        "prepare" => {
            if is_word(next, "transaction") {
                (StatementKind::TransactionControl, Session::Neutral)
            } else {
                (
                    StatementKind::Other,
                    Session::Changes("a prepared statement (PREPARE)"),
                )
            }
        }
        "set" => {
            if ["local", "transaction", "constraints"]
                .iter()
                .any(|w| is_word(next, w))
            {
                // Lasts until the end of the transaction only.
                (StatementKind::Other, Session::Neutral)
            } else {
                (
                    StatementKind::Other,
                    Session::Changes("a session setting (SET)"),
                )
            }
        }
        "reset" => (
            StatementKind::Other,
            Session::Changes("a session setting (RESET)"),
        ),
        "discard" => (
            StatementKind::Other,
            Session::Changes("DISCARD (prepared statements the client cached are gone)"),
        ),
        "deallocate" => (
            StatementKind::Other,
            Session::Changes("DEALLOCATE (prepared statements the client cached are gone)"),
        ),
        "listen" | "unlisten" => (StatementKind::Other, Session::Changes("LISTEN/UNLISTEN")),
        "declare" => {
            let hold = body
                .windows(2)
                .any(|w| is_word(w.first(), "with") && is_word(w.get(1), "hold"));
            if hold {
                (StatementKind::Other, Session::Changes("a cursor WITH HOLD"))
            } else {
                (StatementKind::Other, Session::Neutral)
            }
        }
        "close" => (StatementKind::Other, Session::Changes("CLOSE (a cursor)")),
        "load" => (
            StatementKind::Other,
            Session::ChangesLastingly("LOAD (a library loaded into the session)"),
        ),
        "create" => {
            let header_end = body
                .iter()
                .position(|t| {
                    ["table", "view", "sequence"]
                        .iter()
                        .any(|w| is_word(Some(t), w))
                })
                .unwrap_or(0);
            let temporary = body[..header_end]
                .iter()
                .any(|t| is_word(Some(t), "temp") || is_word(Some(t), "temporary"));
            if temporary {
                (StatementKind::Other, Session::Changes("a temporary object"))
            } else {
                (StatementKind::Other, Session::Neutral)
            }
        }
        "do" => (
            StatementKind::Other,
            Session::MayChange("a DO block (its code may change the session)"),
        ),
        "call" => (
            StatementKind::Other,
            Session::MayChange("CALL (a procedure may change the session)"),
        ),
        _ => (StatementKind::Other, Session::Neutral),
    };
    let session = session.max(functions_and_names(body, first == "create"));
    StatementClass::single(kind, session)
}

/// Whether a query form (`WITH`, `EXPLAIN ANALYZE`) holds a data-modifying
/// statement. `FOR UPDATE` / `FOR NO KEY UPDATE` are row locks, not writes.
fn writes_in_query(tokens: &[Token]) -> bool {
    tokens.iter().enumerate().any(|(i, t)| {
        let Some(w) = word(t) else { return false };
        let previous = i.checked_sub(1).and_then(|p| tokens.get(p));
        if w.eq_ignore_ascii_case("update") {
            !(is_word(previous, "for") || is_word(previous, "key") || is_word(previous, "on"))
        } else if w.eq_ignore_ascii_case("delete") {
            !is_word(previous, "on")
        } else {
            w.eq_ignore_ascii_case("insert") || w.eq_ignore_ascii_case("merge")
        }
    })
}

/// `SELECT ... INTO [TEMP] name` at the top level: creates a table. Returns
/// whether it is temporary, or `None` when there is no such `INTO`.
fn select_into(tokens: &[Token]) -> Option<bool> {
    let mut depth = 0i32;
    for (i, token) in tokens.iter().enumerate() {
        match token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            t if depth <= 0 && is_word(Some(t), "into") => {
                let previous = i.checked_sub(1).and_then(|p| tokens.get(p));
                if is_word(previous, "insert") || is_word(previous, "merge") {
                    continue;
                }
                let after = &tokens[i + 1..];
                let temporary = after
                    .iter()
                    .take(3)
                    .any(|t| is_word(Some(t), "temp") || is_word(Some(t), "temporary"))
                    || mentions_pg_temp(after);
                return Some(temporary);
            }
            _ => {}
        }
    }
    None
}

fn mentions_pg_temp(tokens: &[Token]) -> bool {
    tokens.iter().take(3).any(is_pg_temp)
}

fn is_pg_temp(token: &Token) -> bool {
    name(token).is_some_and(|n| n == "pg_temp" || n.starts_with("pg_temp_"))
}

/// Functions known to use or change the session, and references to this
/// session's temporary schema.
fn functions_and_names(tokens: &[Token], creating: bool) -> Session {
    let mut found = Session::Neutral;
    for (i, token) in tokens.iter().enumerate() {
        if is_pg_temp(token) && tokens.get(i + 1) == Some(&Token::Period) {
            found = found.max(if creating {
                Session::Changes("a temporary object")
            } else {
                Session::Reads("a temporary object (pg_temp)")
            });
            continue;
        }
        if tokens.get(i + 1) != Some(&Token::LParen) {
            continue;
        }
        let Some(function) = name(token) else {
            continue;
        };
        let effect = match function.as_str() {
            "set_config" => {
                if third_argument_is_true(&tokens[i + 1..]) {
                    Session::Neutral
                } else {
                    Session::Changes("set_config(.., .., false) (a session setting)")
                }
            }
            "pg_advisory_lock"
            | "pg_advisory_lock_shared"
            | "pg_try_advisory_lock"
            | "pg_try_advisory_lock_shared"
            | "pg_advisory_unlock"
            | "pg_advisory_unlock_shared"
            | "pg_advisory_unlock_all" => Session::Changes("a session-level advisory lock"),
            "currval" | "lastval" => {
                Session::Reads("currval/lastval (this session's last nextval)")
            }
            "pg_listening_channels" => Session::Reads("pg_listening_channels"),
            "setseed" => Session::ChangesLastingly("setseed (the session's random seed)"),
            f if f.starts_with("dblink_") && f != "dblink_build_sql_insert" => {
                Session::ChangesLastingly("dblink (named connections of the session)")
            }
            _ => Session::Neutral,
        };
        found = found.max(effect);
    }
    found
}

/// `( a, b, true )`: whether the third argument of the call starting at the
/// `(` in `call[0]` is the literal `true` (or `'t'`, `'true'`, `'on'`,
/// `'yes'`, `'1'`).
fn third_argument_is_true(call: &[Token]) -> bool {
    let mut depth = 0i32;
    let mut argument = 0;
    let mut third: Vec<&Token> = Vec::new();
    for token in call {
        match token {
            Token::LParen | Token::LBracket => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            Token::RParen | Token::RBracket => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            Token::Comma if depth == 1 => {
                argument += 1;
                continue;
            }
            _ => {}
        }
        if argument == 2 {
            third.push(token);
        }
    }
    match third.as_slice() {
        [t] if is_word(Some(t), "true") => true,
        [Token::SingleQuotedString(s)] => ["t", "true", "on", "yes", "1"]
            .iter()
            .any(|v| s.trim().eq_ignore_ascii_case(v)),
        _ => false,
    }
}

/// The first keyword of a statement, skipping white space, comments (nested
/// block comments too) and opening parentheses; `None` when the text holds no
/// keyword.
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
    fn plain_reads_and_writes_may_share() {
        for (sql, read) in [
            ("SELECT 1", true),
            ("select begin_date, set_name from t", true),
            ("(SELECT 1) UNION (SELECT 2)", true),
            ("VALUES (1), (2)", true),
            ("TABLE bills", true),
            ("SHOW search_path", true),
            ("WITH x AS (SELECT 1) SELECT * FROM x", true),
            ("SELECT id FROM t WHERE id = $1 FOR UPDATE NOWAIT", true),
            ("SELECT id FROM t FOR NO KEY UPDATE", true),
            ("SELECT pg_advisory_xact_lock(1)", true),
            ("SELECT set_config('a.b', '1', true)", true),
            ("SELECT pg_catalog.set_config('a.b', '1', 'on')", true),
            ("SELECT nextval('s'), pg_sleep(0.1), pg_backend_pid()", true),
            (
                "SELECT '; SET x = 1; BEGIN', $$ DO $x$ $$, \"commit\" FROM t",
                true,
            ),
            ("-- BEGIN\nUPDATE t SET a = 1", false),
            (
                "/* SET x */ INSERT INTO t VALUES ($1) ON CONFLICT DO NOTHING",
                false,
            ),
            ("DELETE FROM t USING u WHERE t.id = u.id", false),
            (
                "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
                false,
            ),
            (
                "WITH a AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM a",
                false,
            ),
            (
                "WITH a AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM a",
                false,
            ),
            ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", false),
            ("EXPLAIN INSERT INTO t VALUES (1)", true),
        ] {
            let class = classify(sql);
            assert!(class.is_shareable(), "{sql}: {class:?}");
            assert_eq!(class.is_read(), read, "{sql}: {class:?}");
            assert_eq!(class.may_write(), !read, "{sql}");
        }
    }

    #[test]
    fn transaction_control_and_savepoints() {
        for sql in [
            "BEGIN",
            "begin isolation level serializable",
            "  START TRANSACTION",
            "COMMIT",
            "commit and chain",
            "end",
            "ROLLBACK",
            "abort",
            "PREPARE TRANSACTION 'x'",
            "COMMIT PREPARED 'x'",
            "ROLLBACK PREPARED 'x'",
            "-- comment\nBEGIN",
            "/* a /* nested */ comment */ BEGIN",
        ] {
            let class = classify(sql);
            assert_eq!(class.kind(), StatementKind::TransactionControl, "{sql}");
            assert!(
                class.controls_transaction() && !class.is_shareable(),
                "{sql}"
            );
        }
        for sql in [
            "SAVEPOINT a",
            "RELEASE a",
            "release savepoint a",
            "ROLLBACK TO a",
        ] {
            let class = classify(sql);
            assert_eq!(class.kind(), StatementKind::Savepoint, "{sql}");
            assert!(!class.controls_transaction() && class.may_change_transaction());
        }
        assert!(classify("ROLLBACK TO SAVEPOINT a").rolls_back_to_savepoint());
        assert!(!classify("RELEASE a").rolls_back_to_savepoint());
        let batch = classify("SELECT 1; COMMIT; SELECT 2");
        assert_eq!(batch.kind(), StatementKind::Several);
        assert!(batch.controls_transaction());
        assert!(!classify("SELECT 1; SELECT 'commit'").controls_transaction());
        assert!(
            classify("SAVEPOINT a; INSERT INTO t VALUES (1); ROLLBACK TO a")
                .rolls_back_to_savepoint()
        );
    }

    #[test]
    fn session_changes_are_seen() {
        for sql in [
            "SET search_path = x",
            "set session statement_timeout = 0",
            "SET ROLE app",
            "reset all",
            "DISCARD ALL",
            "DEALLOCATE ALL",
            "LISTEN ch",
            "UNLISTEN *",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "CREATE TEMP TABLE accounts (id int)",
            "create temporary table t as select 1",
            "CREATE GLOBAL TEMPORARY TABLE t (a int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "CREATE TABLE pg_temp.t (a int)",
            "SELECT * INTO TEMP t FROM x",
            "SELECT 1 INTO TEMPORARY TABLE t",
            "SELECT set_config('search_path', 'nowhere', false)",
            "SELECT set_config('search_path', 'nowhere', $1)",
            "select SET_CONFIG('a', 'b', 'off')",
            "SELECT * FROM set_config('a', 'b', false)",
            "SELECT pg_advisory_lock(1)",
            "select pg_try_advisory_lock(1, 2)",
            "SELECT pg_advisory_unlock_all()",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CALL refresh_all()",
        ] {
            let class = classify(sql);
            assert!(class.session().changes(), "{sql}: {class:?}");
            assert!(!class.is_shareable(), "{sql}");
        }
        for sql in [
            "LOAD 'auto_explain'",
            "SELECT setseed(0.5)",
            "SELECT dblink_connect('c', 'dbname=x')",
        ] {
            assert!(
                matches!(classify(sql).session(), Session::ChangesLastingly(_)),
                "{sql}"
            );
        }
        for sql in [
            "SELECT currval('s')",
            "SELECT lastval()",
            "INSERT INTO pg_temp.x VALUES (1)",
        ] {
            let class = classify(sql);
            assert!(
                matches!(class.session(), Session::Reads(_)),
                "{sql}: {class:?}"
            );
            assert!(!class.is_shareable() && !class.session().changes(), "{sql}");
        }
        // Quoted names keep their case: "SET_CONFIG" is another function.
        assert!(classify("SELECT \"SET_CONFIG\"('a', 'b', false)").is_shareable());
    }

    #[test]
    fn other_statements_need_a_connection_of_their_own() {
        for sql in [
            "CREATE TABLE t (a int)",
            "ALTER TABLE t ADD COLUMN b int",
            "COPY t FROM STDIN",
            "VACUUM t",
            "LOCK TABLE t",
            "SET LOCAL search_path = x",
            "SELECT * INTO new_table FROM t",
            "GRANT SELECT ON t TO app",
        ] {
            let class = classify(sql);
            assert_eq!(class.kind(), StatementKind::Other, "{sql}");
            assert!(!class.session().changes(), "{sql}: {class:?}");
            assert!(!class.is_shareable(), "{sql}");
        }
    }

    #[test]
    fn unreadable_text_is_the_worst_case() {
        for sql in ["SELECT 'unterminated", "SELECT 1 /* open", "$$ x"] {
            let class = classify(sql);
            assert!(!class.is_shareable(), "{sql}");
            assert!(class.may_write() && class.may_change_transaction(), "{sql}");
            assert!(class.session().changes(), "{sql}");
        }
        assert_eq!(classify("").kind(), StatementKind::Empty);
        assert_eq!(classify("-- nothing").kind(), StatementKind::Empty);
    }
}
