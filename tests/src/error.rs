//! The kit's error type.

use std::path::PathBuf;

/// What went wrong while the kit set up or drove a PostgreSQL server.
///
/// The public functions of the kit return [`anyhow::Result`]; the errors they
/// produce are (or wrap) a `KitError`, so a test can `downcast_ref::<KitError>()`
/// when it cares about the kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// No `initdb`/`pg_ctl`/`postgres` were found.
    #[error(
        "no PostgreSQL server binaries found (looked for initdb, pg_ctl and postgres in: {searched}); \
         install the PostgreSQL server (e.g. `apt-get install postgresql`), point PGSTACK_PG_BINDIR at \
         the folder holding them, or set DATABASE_URL to a server the tests may create databases on"
    )]
    NoBinaries {
        /// Where the kit looked.
        searched: String,
    },
    /// The tests run as root and there is no unprivileged user to run the server as.
    #[error(
        "running as root, but there is no user `{user}` to run PostgreSQL as (the server refuses to run \
         as root); create it (e.g. `useradd --system --user-group postgres`), name another user with \
         PGSTACK_PG_USER, or run the tests as a normal user"
    )]
    NoServerUser {
        /// The user name looked up.
        user: String,
    },
    /// A PostgreSQL tool (initdb, pg_ctl, pg_basebackup, ...) failed.
    #[error("{what} failed ({status}): {output}")]
    Command {
        /// What the kit tried to do.
        what: String,
        /// The exit status.
        status: String,
        /// The last lines the tool wrote.
        output: String,
    },
    /// The server did not start (or did not come back).
    #[error(
        "the PostgreSQL server in {data_dir} did not start: {reason}\n--- last lines of {log} ---\n{log_tail}"
    )]
    Start {
        /// The data directory.
        data_dir: PathBuf,
        /// The server log.
        log: PathBuf,
        /// Why the kit gave up.
        reason: String,
        /// The end of the server log.
        log_tail: String,
    },
    /// The server did not stop in time.
    #[error("the PostgreSQL server in {data_dir} did not stop within {seconds} s (log: {log})")]
    Stop {
        /// The data directory.
        data_dir: PathBuf,
        /// The server log.
        log: PathBuf,
        /// How long the kit waited.
        seconds: u64,
    },
    /// The server user (tests running as root) cannot reach the kit's folder.
    #[error(
        "the PostgreSQL tools run as user `{user}`, who cannot reach {path}: {detail}; every folder \
         above it must be enterable by that user — point TMPDIR at one that is (e.g. /tmp)"
    )]
    Access {
        /// The server user.
        user: String,
        /// The folder.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the kit tried to do.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A database URL could not be used.
    #[error("unusable database URL: {reason}")]
    BadUrl {
        /// What is wrong with it (never the password).
        reason: String,
    },
    /// A statement the kit ran on the server failed.
    #[error("{what}: {source}")]
    Postgres {
        /// What the kit tried to do.
        what: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The operation does not apply to this server (e.g. pausing replay on a primary).
    #[error("{0}")]
    NotApplicable(String),
}

impl KitError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> KitError {
        KitError::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn pg(what: impl Into<String>, source: tokio_postgres::Error) -> KitError {
        KitError::Postgres {
            what: what.into(),
            source,
        }
    }
}
