//! The crate's error type.

use std::path::PathBuf;

/// What went wrong while setting up or driving a local PostgreSQL server.
///
/// The test kit re-exports it as `pgstack_tests::KitError`; its own functions
/// return [`anyhow::Result`] whose errors are (or wrap) this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// A data directory was made by another major version than the binaries found.
    #[error(
        "the data directory {data_dir} was made by PostgreSQL {data_major}, but the binaries in {bindir} are \
         PostgreSQL {binaries_major}; point PGSTACK_PG_BINDIR at PostgreSQL {data_major}'s binaries, or \
         start over by deleting the folder (`db-down --purge`)"
    )]
    VersionMismatch {
        /// The data directory.
        data_dir: PathBuf,
        /// Its `PG_VERSION`.
        data_major: String,
        /// The folder of the binaries found.
        bindir: PathBuf,
        /// Their major version.
        binaries_major: u32,
    },
    /// A folder that should hold a data directory holds something else.
    #[error(
        "{data_dir} exists but is not a PostgreSQL data directory (no PG_VERSION); remove it \
         (`db-down --purge`) and start the server again"
    )]
    NotADataDirectory {
        /// The folder.
        data_dir: PathBuf,
    },
    /// The worker thread that ran the blocking work panicked.
    #[error("the worker thread of {what} panicked")]
    WorkerPanicked {
        /// What it was doing.
        what: String,
    },
}

impl Error {
    /// An [`Error::Io`]: `what` failed with `source`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// An [`Error::Postgres`]: the statement or connection `what` failed with `source`.
    pub fn pg(what: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::Postgres {
            what: what.into(),
            source,
        }
    }
}
