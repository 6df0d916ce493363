//! The one error type of this crate.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use pgstack_config::ConnectExplanation;

use crate::lock::LockHolder;
use crate::lockwait::LockConflict;
use crate::status::Validation;

/// Which way a migration runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Applying: the `.up.sql` (or simple `.sql`) file.
    Up,
    /// Reverting: the `.down.sql` file.
    Down,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Up => "up",
            Direction::Down => "down",
        })
    }
}

/// Everything that can go wrong while loading or running migrations.
///
/// Each message names the file, line or version concerned and says how to
/// fix it. Connection URLs appear only in redacted form.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The migrations folder could not be read.
    #[error(
        "cannot read the migrations folder {dir}: {reason}; check `migrations.dir` \
         (it is resolved against the current directory)"
    )]
    ReadDir {
        /// The folder.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A file name or file content does not follow sqlx's conventions.
    #[error("{file}: {reason}")]
    BadFile {
        /// The offending file.
        file: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// Two files claim the same version.
    #[error(
        "migration version {version} is used twice, by {first} and {second}; \
         give one of them the next free version"
    )]
    DuplicateVersion {
        /// The version.
        version: i64,
        /// One file.
        first: PathBuf,
        /// The other file.
        second: PathBuf,
    },

    /// Sequentially numbered migrations skip a number.
    #[error(
        "migration versions jump from {before} to {after} ({after_file}): \
         version {missing} is missing; renumber the files or restore the missing one"
    )]
    Gap {
        /// The version before the gap.
        before: i64,
        /// The version after the gap.
        after: i64,
        /// The first missing version.
        missing: i64,
        /// The file after the gap.
        after_file: PathBuf,
    },

    /// A `.down.sql` file has no `.up.sql` partner.
    #[error("{file} has no matching up file; add {version}_<name>.up.sql or delete it")]
    DownWithoutUp {
        /// The version.
        version: i64,
        /// The down file.
        file: PathBuf,
    },

    /// A revert was asked for a migration that has no down file.
    #[error(
        "cannot revert migration {version} ({up_file}): it has no down file; \
         write {expected} or revert to a later version"
    )]
    MissingDown {
        /// The version.
        version: i64,
        /// Its up file.
        up_file: PathBuf,
        /// The down file that would be used.
        expected: PathBuf,
    },

    /// A target version is not among the migrations.
    #[error("migration version {version} is not in the migrations folder{hint}")]
    UnknownVersion {
        /// The version asked for.
        version: i64,
        /// Extra advice (may be empty).
        hint: String,
    },

    /// The name given to `new` cannot be used in a file name.
    #[error(
        "invalid migration name {name:?}: {reason}; use letters, digits and underscores, \
         e.g. `add_bill_status`"
    )]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong.
        reason: String,
    },

    /// A new migration file could not be written.
    #[error("cannot write {path}: {reason}")]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The database could not be reached. The message is the cause first,
    /// then the fix ([`pgstack_config::explain_connect_failure`]).
    #[error("{explanation}")]
    Connect {
        /// The node, with its password redacted.
        target: String,
        /// The cause and the fix.
        explanation: Box<ConnectExplanation>,
        /// The driver's error (`None`: no answer within the connect
        /// timeout). Not a `source`: its text is in the explanation, and a
        /// chain would say it again.
        driver: Option<Box<sqlx::Error>>,
    },

    /// A bookkeeping statement (not a migration's own SQL) failed.
    #[error("while {context}: {source}")]
    Database {
        /// What the migrator was doing.
        context: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },

    /// Another instance held the migration lock for longer than the lock timeout.
    #[error(
        "gave up waiting for the migration lock after {:.1?}; {}; raise \
         `migrations.lock_timeout` or stop the other migrator",
        waited,
        match holder { Some(h) => format!("it is held by {h}"), None => "its holder has gone away".to_owned() }
    )]
    LockTimeout {
        /// How long the migrator waited.
        waited: Duration,
        /// Who held the lock when the migrator gave up.
        holder: Option<LockHolder>,
    },

    /// A migration's SQL failed.
    #[error("{0}")]
    MigrationFailed(Box<MigrationFailure>),

    /// A migration could not take the locks it needs within
    /// `migrations.lock_wait`, on every attempt.
    #[error("{0}")]
    LockNotAvailable(Box<LockFailure>),

    /// A migration is marked failed in `_sqlx_migrations` (a dirty database).
    #[error(
        "migration {version} ({description}) is marked failed in _sqlx_migrations: a \
         no-transaction migration stopped part-way; check what it left behind, finish or undo it \
         by hand, then clear the mark with `migrate forget-failed {version}` (or `DELETE FROM \
         _sqlx_migrations WHERE version = {version} AND NOT success`) and run again"
    )]
    Dirty {
        /// The version.
        version: i64,
        /// Its description.
        description: String,
    },

    /// An applied migration's file has changed since it was applied.
    #[error(
        "migration {version} ({file}) was changed after it was applied (checksum mismatch); \
         restore the applied version of the file and put the change in a new migration"
    )]
    ChecksumMismatch {
        /// The version.
        version: i64,
        /// The file.
        file: PathBuf,
    },

    /// A migration recorded as applied has no file any more.
    #[error(
        "migration {version} ({description}) is applied in the database but has no file; \
         restore the file, or allow it with `ignore_missing`"
    )]
    MissingFile {
        /// The version.
        version: i64,
        /// Its description as recorded.
        description: String,
    },

    /// `validate` found problems.
    #[error("{0}")]
    Invalid(Validation),

    /// `pgstack_metadata` holds a value this version does not understand.
    #[error("pgstack_metadata key {key:?} holds {value:?}: {reason}")]
    Metadata {
        /// The key.
        key: String,
        /// The stored value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The details of [`Error::MigrationFailed`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "migration {version} ({}{}) failed: {message}{}; {}",
    file.display(),
    match line { Some(l) => format!(", line {l}"), None => String::new() },
    match code { Some(c) => format!(" (SQLSTATE {c})"), None => String::new() },
    if *dirty && !invalid_indexes.is_empty() {
        format!(
            "it ran outside a transaction and left the INVALID index {} behind, so version \
             {version} is now marked failed; fix the cause (the file, or the data), then \
             `migrate forget-failed {version}` drops the invalid index and clears the mark, and \
             run again",
            invalid_indexes.join(", ")
        )
    } else if *dirty {
        format!(
            "it ran outside a transaction and may have left changes behind, so version {version} \
             is now marked failed; check what it left (e.g. an INVALID index from CREATE INDEX \
             CONCURRENTLY: drop it), then clear the mark with `migrate forget-failed {version}` \
             (or `DELETE FROM _sqlx_migrations WHERE version = {version} AND NOT success`) and run again"
        )
    } else if *no_transaction {
        "it ran outside a transaction; check whether it left changes behind, fix the file and run again".to_owned()
    } else {
        "it was rolled back and nothing of it was applied; fix the file and run again".to_owned()
    }
)]
pub struct MigrationFailure {
    /// The version.
    pub version: i64,
    /// Up or down.
    pub direction: Direction,
    /// The file whose SQL failed.
    pub file: PathBuf,
    /// The line of the failing statement, when PostgreSQL reported a position.
    pub line: Option<u32>,
    /// PostgreSQL's message (with detail and hint when given).
    pub message: String,
    /// The SQLSTATE code.
    pub code: Option<String>,
    /// Whether the script ran outside a transaction (`-- no-transaction`).
    pub no_transaction: bool,
    /// True when the migration ran outside a transaction and is marked failed.
    pub dirty: bool,
    /// The INVALID indexes a failed `CREATE INDEX CONCURRENTLY` of this
    /// migration left behind (`schema.name`).
    pub invalid_indexes: Vec<String>,
    /// The driver's error.
    #[source]
    pub source: sqlx::Error,
}

/// The details of [`Error::LockNotAvailable`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
#[error(
    "migration {version} ({}) could not get the locks it needs: {attempts} attempt(s) each gave up \
     after waiting {} for a lock (migrations.lock_wait; SQLSTATE 55P03){}. Every attempt was \
     rolled back: nothing of it was applied and it is not recorded. {}",
    file.display(),
    humantime::format_duration(*lock_wait),
    match conflict {
        Some(c) => format!("; it waited for {c}"),
        None => String::new(),
    },
    lock_advice(conflict.as_ref()),
)]
pub struct LockFailure {
    /// The version.
    pub version: i64,
    /// Up or down.
    pub direction: Direction,
    /// The file whose SQL waited.
    pub file: PathBuf,
    /// The attempts made, the first included.
    pub attempts: u32,
    /// How long each attempt waited at most (`lock_timeout`).
    pub lock_wait: Duration,
    /// The lock the migration waited for and who held it up, as the
    /// migrator last saw it (it looks every half `lock_wait`; on the last
    /// attempt or an earlier one).
    pub conflict: Option<LockConflict>,
    /// Whether the script ran outside a transaction (`-- no-transaction`).
    pub no_transaction: bool,
    /// The driver's error of the last attempt.
    #[source]
    pub source: sqlx::Error,
}

fn lock_advice(conflict: Option<&LockConflict>) -> String {
    let pids: Vec<String> = conflict
        .map(|c| c.blockers.iter().map(|b| b.pid.to_string()).collect())
        .unwrap_or_default();
    let who = match pids.as_slice() {
        [] => "Find the session holding a lock on the table (pg_locks joined with \
               pg_stat_activity, or pg_blocking_pids of the migrator) and let it finish, or end \
               it"
        .to_owned(),
        [pid] => format!(
            "Let pid {pid} finish, or end it (SELECT pg_terminate_backend({pid})) if it is stuck"
        ),
        pids => format!(
            "Let pids {} finish, or end them (pg_terminate_backend) if they are stuck",
            pids.join(", ")
        ),
    };
    format!(
        "{who}, then run the migrations again; or run them when the table is quieter, or raise \
         migrations.lock_wait or migrations.lock_retries (a longer wait holds the table's other \
         queries in the lock queue for longer)"
    )
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Database { context, source }
}

/// The line (1-based) of a character position (1-based, as PostgreSQL
/// reports it) in `sql`.
pub(crate) fn line_of(sql: &str, position: usize) -> Option<u32> {
    if position == 0 {
        return None;
    }
    let mut line = 1u32;
    let mut seen = 0usize;
    for c in sql.chars() {
        seen += 1;
        if seen >= position {
            return Some(line);
        }
        if c == '\n' {
            line += 1;
        }
    }
    None
}

/// The parts of a failed migration's error that PostgreSQL reported.
pub(crate) struct Failure {
    pub(crate) line: Option<u32>,
    pub(crate) message: String,
    pub(crate) code: Option<String>,
}

pub(crate) fn describe_failure(sql: &str, error: &sqlx::Error) -> Failure {
    let Some(db) = error.as_database_error() else {
        return Failure {
            line: None,
            message: error.to_string(),
            code: None,
        };
    };
    let code = db.code().map(|c| c.into_owned());
    let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return Failure {
            line: None,
            message: db.message().to_owned(),
            code,
        };
    };
    let mut message = pg.message().to_owned();
    if let Some(detail) = pg.detail() {
        message.push_str(&format!(" (detail: {detail})"));
    }
    if let Some(hint) = pg.hint() {
        message.push_str(&format!(" (hint: {hint})"));
    }
    let line = match pg.position() {
        Some(sqlx::postgres::PgErrorPosition::Original(p)) => line_of(sql, p),
        Some(sqlx::postgres::PgErrorPosition::Internal { position, query }) => {
            message.push_str(&format!(
                " (in the internal query {query:?} at character {position})"
            ));
            None
        }
        None => None,
    };
    Failure {
        line,
        message,
        code,
    }
}

/// Explains a failed sqlx connect to `node`: the server's SQLSTATE and
/// message, or the innermost text of the transport's error.
pub(crate) fn explain_connect(
    node: &pgstack_config::NodeSettings,
    error: &sqlx::Error,
) -> ConnectExplanation {
    use pgstack_config::{ConnectFailure, explain_connect_failure};
    if let Some(db) = error.as_database_error()
        && let Some(code) = db.code()
    {
        return explain_connect_failure(
            node,
            ConnectFailure::Server {
                code: &code,
                message: db.message(),
            },
        );
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    // The innermost part is what is quoted; the whole text is searched.
    let innermost = text.rsplit(": ").next().unwrap_or(&text).to_owned();
    let quoted = if text.to_ascii_lowercase().contains("tls")
        && !innermost.to_ascii_lowercase().contains("tls")
    {
        text
    } else {
        innermost
    };
    explain_connect_failure(node, ConnectFailure::Transport { message: &quoted })
}

#[cfg(test)]
mod tests {
    use super::line_of;

    #[test]
    fn positions_map_to_lines() {
        let sql = "a\nbc\n\ndé f\n";
        assert_eq!(line_of(sql, 1), Some(1));
        assert_eq!(line_of(sql, 2), Some(1));
        assert_eq!(line_of(sql, 3), Some(2));
        assert_eq!(line_of(sql, 6), Some(3));
        assert_eq!(line_of(sql, 7), Some(4));
        // character positions, not bytes: 'é' is one character
        assert_eq!(line_of(sql, 10), Some(4));
        assert_eq!(line_of(sql, 11), Some(4));
        assert_eq!(line_of(sql, 12), None);
        assert_eq!(line_of(sql, 0), None);
    }

    proptest::proptest! {
        #[test]
        fn every_character_maps_to_its_line(text in "[a-z \n\r\u{e9}\u{1F600}]{0,80}") {
            let mut line = 1u32;
            for (i, c) in text.chars().enumerate() {
                proptest::prop_assert_eq!(line_of(&text, i + 1), Some(line));
                if c == '\n' {
                    line += 1;
                }
            }
            proptest::prop_assert_eq!(line_of(&text, text.chars().count() + 1), None);
        }
    }

    #[test]
    fn crlf_counts_one_line() {
        assert_eq!(line_of("a\r\nb", 4), Some(2));
    }
}
