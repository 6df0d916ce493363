//! `cargo xtask`: the operator's tools for pgstack.
//!
//! One binary, one small module per command of its own (verify, ci, bench,
//! soak); the operator commands (db-up/down/status, db-reset, migrate,
//! health, backup, restore, config) are pgstack-cli's, flattened in, and run
//! on this workspace. Exit codes: 0 success, 1 failure, 2 usage error
//! (clap's own).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgstack_cli::Project;

mod bench;
mod ci;
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
    #[command(flatten)]
    Pgstack(Box<pgstack_cli::Command>),
    /// Run what CI runs: the format check, clippy with -D warnings, and the workspace's tests.
    Ci(ci::CiArgs),
    /// Check the architecture rules: layering, crate hygiene, lints, documented configuration keys.
    Verify(verify::VerifyArgs),
    /// Run the end-to-end load-and-fault scenarios for N minutes (not part of CI).
    Soak(soak::SoakArgs),
    /// Benchmark pgstack side by side with its peers (tokio-postgres, bb8, deadpool, sqlx).
    Bench(bench::BenchArgs),
}

/// This workspace as pgstack-cli's project: messages say `cargo xtask`, and
/// the development server stays where it always was, `target/pgstack-dev`
/// under `CARGO_TARGET_DIR` when that is set.
fn project() -> anyhow::Result<Project> {
    let root = verify::workspace_root()?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => root.join("target"),
    };
    Ok(Project::at(root)
        .named("cargo xtask")
        .with_target_dir(target))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Pgstack(command) => project().map(|project| command.run_with(&project)),
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

/// Writes to standard output (the command's result, meant for the user).
pub(crate) fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}
