//! `cargo xtask`: the operator's tools for pgstack.
//!
//! One binary, one small module per command. Exit codes: 0 success,
//! 1 failure, 2 usage error (clap's own).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backup;
mod bench;
mod ci;
mod config;
mod context;
mod db;
mod db_reset;
mod guard;
mod health;
mod migrate;
mod progress;
mod soak;
mod verify;

/// The operator's tools for pgstack.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective configuration, with the source of each value.
    Config(config::ConfigArgs),
    /// Start the local development PostgreSQL under target/ and print its DATABASE_URL.
    DbUp(db::DbUpArgs),
    /// Stop the local development PostgreSQL.
    DbDown(db::DbDownArgs),
    /// Tell whether the local development PostgreSQL is running, and where.
    DbStatus(db::DbStatusArgs),
    /// Drop and recreate the application database, migrate it, optionally seed it.
    DbReset(db_reset::DbResetArgs),
    /// Database migrations: status, up, down, validate, dry-run, new, baseline, forget-failed.
    Migrate(migrate::MigrateArgs),
    /// One health report of the cluster: exit 0 healthy, 1 degraded, 2 unhealthy.
    Health(health::HealthArgs),
    /// Dump the database with pg_dump (custom format) to a file, with progress.
    Backup(backup::BackupArgs),
    /// Restore a dump with pg_restore into a database (guarded like db-reset when it replaces data).
    Restore(backup::RestoreArgs),
    /// Run what CI runs: the format check, clippy with -D warnings, and the workspace's tests.
    Ci(ci::CiArgs),
    /// Check the architecture rules: layering, crate hygiene, lints, documented configuration keys.
    Verify(verify::VerifyArgs),
    /// Run the end-to-end load-and-fault scenarios for N minutes (not part of CI).
    Soak(soak::SoakArgs),
    /// Benchmark pgstack side by side with its peers (tokio-postgres, bb8, deadpool, sqlx).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(args) => config::run(args),
        Command::DbUp(args) => db::up(args),
        Command::DbDown(args) => db::down(args),
        Command::DbStatus(args) => db::status(args),
        Command::DbReset(args) => db_reset::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Health(args) => health::run(args),
        Command::Backup(args) => backup::backup(args),
        Command::Restore(args) => backup::restore(args),
        Command::Ci(args) => ci::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}
