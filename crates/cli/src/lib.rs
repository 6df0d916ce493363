//! `pgstack`: the operator's command line for a service on pgstack, and the
//! library behind it.
//!
//! Run in a service's folder, it works on that folder's own `pgstack.toml`,
//! `migrations/` and `DATABASE_URL` (see [`Project`] for how the folder is
//! found): the local development server (`db-up`, `db-down`, `db-status`),
//! `db-reset`, `migrate …`, `health`, `backup`, `restore`, `config`, and
//! `doctor` (a DBA's checks; the library part is [`doctor`]).
//! With no `DATABASE_URL`, the database commands use a development
//! PostgreSQL under the project's `target/pgstack-dev/`, which they start.
//!
//! ```sh
//! cargo install --path crates/cli     # from a pgstack checkout
//! cd ~/src/bills && pgstack db-reset  # the service's own schema, on its own dev server
//! ```
//!
//! Exit codes: 0 success; 1 failure or refusal (`health`: degraded); 2 usage
//! error (`health`: unhealthy). Results go to stdout (`--json` prints one JSON
//! document there), everything else to stderr; progress bars only on a
//! terminal; passwords never.
//!
//! # Embedding it in a service's own xtask
//!
//! The commands are clap types, so a service's `xtask` gets all of them next
//! to its own by flattening [`Command`] into its command enum:
//!
//! ```no_run
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! #[command(name = "cargo xtask")]
//! enum Xtask {
//!     #[command(flatten)]
//!     Pgstack(Box<pgstack_cli::Command>), // boxed: the commands' options are large
//!     /// Load the demo data (a command of the service's own).
//!     Demo,
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     match Xtask::parse() {
//!         Xtask::Pgstack(command) => command.run(),
//!         Xtask::Demo => std::process::ExitCode::SUCCESS,
//!     }
//! }
//! ```
//!
//! and an xtask that is nothing but pgstack's commands is one line:
//! `fn main() -> std::process::ExitCode { pgstack_cli::run() }`.
//! [`Command::run_with`] takes a [`Project`] to name the folder and how
//! messages name the command line (`Project::discover().named("cargo xtask")`).

use std::ffi::OsString;
use std::io::Write as _;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backup;
mod config;
mod context;
mod db;
mod db_reset;
pub mod doctor;
mod guard;
mod health;
mod migrate;
mod progress;
mod project;

pub use crate::backup::{BackupArgs, RestoreArgs};
pub use crate::config::ConfigArgs;
pub use crate::context::CommonArgs;
pub use crate::db::{DbDownArgs, DbStatusArgs, DbUpArgs};
pub use crate::db_reset::DbResetArgs;
pub use crate::doctor::command::DoctorArgs;
pub use crate::health::HealthArgs;
pub use crate::migrate::MigrateArgs;
pub use crate::project::Project;

/// The `pgstack` command line: one of its [`Command`]s.
#[derive(Debug, Parser)]
#[command(
    name = "pgstack",
    version,
    about = "The operator's command line for a service on pgstack: its development database, migrations, health, backups, configuration and a DBA's checks.",
    long_about = None
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// One `pgstack` command. Flatten it into another clap command enum to offer
/// them all (see the crate docs).
#[derive(Debug, Subcommand)]
#[non_exhaustive]
pub enum Command {
    /// Print the effective configuration, with the source of each value.
    Config(ConfigArgs),
    /// Start the local development PostgreSQL under target/ and print its DATABASE_URL.
    DbUp(DbUpArgs),
    /// Stop the local development PostgreSQL.
    DbDown(DbDownArgs),
    /// Tell whether the local development PostgreSQL is running, and where.
    DbStatus(DbStatusArgs),
    /// Drop and recreate the application database, migrate it, optionally seed it.
    DbReset(DbResetArgs),
    /// Database migrations: status, up, down, validate, dry-run, new, baseline, forget-failed.
    Migrate(MigrateArgs),
    /// One health report of the cluster: exit 0 healthy, 1 degraded, 2 unhealthy.
    Health(HealthArgs),
    /// Dump the database with pg_dump (custom format) to a file, with progress.
    Backup(BackupArgs),
    /// Restore a dump with pg_restore into a database (guarded like db-reset when it replaces data).
    Restore(RestoreArgs),
    /// Check the database as a DBA would: each finding with evidence, why it matters and the SQL
    /// that fixes it; exit 0 nothing found, 1 warnings, 2 critical.
    Doctor(DoctorArgs),
}

impl Command {
    /// Runs the command on the project around the current folder
    /// ([`Project::discover`]); an error is printed on stderr as one
    /// `error: …` line and exits with 1.
    pub fn run(self) -> ExitCode {
        self.run_with(&Project::discover())
    }

    /// Runs the command on `project`; an error is printed on stderr as one
    /// `error: …` line and exits with 1.
    pub fn run_with(self, project: &Project) -> ExitCode {
        match self.execute(project) {
            Ok(code) => code,
            Err(error) => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "error: {error:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// Runs the command on `project` and returns its exit code, or the error
    /// that stopped it (not printed).
    ///
    /// # Errors
    /// Whatever stopped the command: a configuration that does not load, a
    /// server that cannot be reached, a failed migration, …; each says what
    /// to do.
    pub fn execute(self, project: &Project) -> anyhow::Result<ExitCode> {
        let _entered = project::enter(project.clone());
        match self {
            Command::Config(args) => config::run(args),
            Command::DbUp(args) => db::up(args),
            Command::DbDown(args) => db::down(args),
            Command::DbStatus(args) => db::status(args),
            Command::DbReset(args) => db_reset::run(args),
            Command::Migrate(args) => migrate::run(args),
            Command::Health(args) => health::run(args),
            Command::Backup(args) => backup::backup(args),
            Command::Restore(args) => backup::restore(args),
            Command::Doctor(args) => doctor::command::run(args),
        }
    }
}

/// Parses the process's arguments and runs the command on the project
/// around the current folder: the whole `pgstack` binary.
pub fn run() -> ExitCode {
    run_from(std::env::args_os())
}

/// Parses `args` (the first is the program's name) and runs the command on
/// the project around the current folder. A usage error prints clap's message
/// and exits with 2.
pub fn run_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match Cli::try_parse_from(args) {
        Ok(cli) => cli.command.run(),
        Err(error) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let _ = error.print();
            ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2))
        }
    }
}
