//! `cargo xtask ci`: the checks `.ci/run` runs, in one command: the format
//! check, clippy with warnings as errors, and every test of the workspace.
//!
//! Each step is printed before it runs; the first failure stops the run with
//! exit code 1. It installs nothing (`.ci/run` does that on a clean machine)
//! and runs cargo as `$CARGO` (set by `cargo xtask`), else `cargo`.

use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::Context as _;

use crate::out;

/// Arguments of `cargo xtask ci` (none: it runs what CI runs).
#[derive(Debug, clap::Args)]
pub(crate) struct CiArgs {}

/// The steps, in order: a name and cargo's arguments.
const STEPS: [(&str, &[&str]); 3] = [
    ("format", &["fmt", "--all", "--", "--check"]),
    (
        "clippy",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ),
    ("tests", &["test", "--workspace"]),
];

pub(crate) fn run(_args: CiArgs) -> anyhow::Result<ExitCode> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let root = crate::verify::workspace_root()?;
    let started = Instant::now();
    for (i, (name, args)) in STEPS.iter().enumerate() {
        let shown = format!("cargo {}", args.join(" "));
        out(&format!("== [{}/{}] {name}: {shown}", i + 1, STEPS.len()))?;
        let step = Instant::now();
        let status = Command::new(&cargo)
            .args(*args)
            .current_dir(&root)
            .status()
            .with_context(|| format!("starting `{shown}` ({})", cargo.to_string_lossy()))?;
        if !status.success() {
            let mut err = std::io::stderr().lock();
            std::io::Write::write_all(
                &mut err,
                format!(
                    "ci failed at step {} of {} ({name}): `{shown}` exited with {status} after {:.1?}; the later steps did not run\n",
                    i + 1,
                    STEPS.len(),
                    step.elapsed()
                )
                .as_bytes(),
            )?;
            return Ok(ExitCode::FAILURE);
        }
        out(&format!("== {name}: ok ({:.1?})", step.elapsed()))?;
    }
    out(&format!(
        "ci passed: {} in {:.1?}",
        STEPS
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed()
    ))?;
    Ok(ExitCode::SUCCESS)
}
