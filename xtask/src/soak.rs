//! `cargo xtask soak --minutes N`: the end-to-end load-and-fault scenarios
//! (`tests/tests/e2e_restart.rs`, `e2e_network.rs`, `e2e_lifecycle.rs`) for
//! longer than CI runs them.
//!
//! The test binaries are built once, then run at the same time, each with
//! all its tests at once, with
//! `PGSTACK_SOAK_SECONDS` set: each scenario repeats its rounds (kill -9 and
//! restart, lag and loss, latency, resets, refusals, black holes,
//! cancellation storms, overload, concurrent starts, shutdowns) until the
//! time is up, checking its assertions after every round. Each scenario
//! appends its summary row to `target/reliability/soak-<time>.md`
//! (`PGSTACK_RELIABILITY_REPORT`); the binaries' output goes to a log next to
//! it. At the end the table is printed with the totals; the exit code is 0
//! only if every scenario passed and nothing was lost, duplicated or leaked.
//! Not part of CI.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::out;

/// The suites with load-and-fault scenarios.
const SUITES: [&str; 3] = ["e2e_restart", "e2e_network", "e2e_lifecycle"];

/// Arguments of `cargo xtask soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long each scenario keeps repeating its rounds, in minutes.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Only the scenarios whose test name contains this text.
    #[arg(long)]
    filter: Option<String>,
}

pub(crate) fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.minutes > 0, "--minutes must be at least 1");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let root = crate::verify::workspace_root()?;
    let started = Instant::now();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = root.join("target/reliability");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let report = dir.join(format!("soak-{stamp}.md"));

    out(&format!("== building the suites: {}", SUITES.join(", ")))?;
    let binaries = build(&cargo, &root)?;

    let seconds = args.minutes * 60;
    out(&format!(
        "== soaking for {} min: every scenario repeats its rounds until then; rows go to {}",
        args.minutes,
        report.display()
    ))?;
    let mut running: Vec<(String, PathBuf, Child)> = Vec::new();
    for (suite, binary) in &binaries {
        let log = dir.join(format!("soak-{stamp}-{suite}.log"));
        let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(binary);
        // Every scenario at once: libtest would otherwise run as many tests
        // at a time as there are cores and start the others only after
        // the first ones' N minutes.
        command
            .args(["--nocapture", "--test-threads", "64"])
            .env("PGSTACK_SOAK_SECONDS", seconds.to_string())
            .env("PGSTACK_RELIABILITY_REPORT", &report)
            .current_dir(root.join("tests"))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        if let Some(filter) = &args.filter {
            command.arg(filter);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        out(&format!("   {suite}: running (log {})", log.display()))?;
        running.push((suite.clone(), log, child));
    }

    let mut failed = Vec::new();
    for (suite, log, mut child) in running {
        let status = child
            .wait()
            .with_context(|| format!("waiting for {suite}"))?;
        if status.success() {
            out(&format!("   {suite}: passed"))?;
        } else {
            out(&format!(
                "   {suite}: FAILED ({status}); see {}",
                log.display()
            ))?;
            failed.push(suite);
        }
    }

    let rows = fs::read_to_string(&report).unwrap_or_default();
    let totals = totals(&rows);
    let table = format!(
        "{HEADER}\n{RULE}\n{}",
        rows.lines().collect::<Vec<_>>().join("\n")
    );
    fs::write(&report, format!("{table}\n"))
        .with_context(|| format!("writing {}", report.display()))?;
    out(&format!(
        "\nsoak of {} min finished after {:.1?}:\n\n{table}\n",
        args.minutes,
        started.elapsed()
    ))?;
    out(&format!(
        "totals: {} operations, {} faults injected, {} errors, {} lost, {} duplicated, {} leaked connections",
        totals.operations,
        totals.faults,
        totals.errors,
        totals.lost,
        totals.duplicated,
        totals.leaked
    ))?;
    if !failed.is_empty() {
        out(&format!("failed suites: {}", failed.join(", ")))?;
        return Ok(ExitCode::FAILURE);
    }
    if totals.lost + totals.duplicated + totals.leaked > 0 {
        out("writes were lost or duplicated, or connections leaked")?;
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The header of the summary table, as the suites print it.
const HEADER: &str = "| scenario | operations | faults injected | errors | lost | duplicated | leaked connections | seconds |";
const RULE: &str = "|---|---:|---:|---:|---:|---:|---:|---:|";

/// Builds the suites' test binaries and returns (suite, executable).
fn build(cargo: &OsString, root: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut command = Command::new(cargo);
    command
        .args([
            "test",
            "-p",
            "pgstack-tests",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit());
    for suite in SUITES {
        command.args(["--test", suite]);
    }
    let output = command.output().context("running cargo test --no-run")?;
    anyhow::ensure!(
        output.status.success(),
        "building the suites failed ({})",
        output.status
    );
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if let (Some(executable), true) = (
            message["executable"].as_str(),
            SUITES.contains(&name) && message["profile"]["test"].as_bool() == Some(true),
        ) {
            binaries.push((name.to_owned(), PathBuf::from(executable)));
        }
    }
    anyhow::ensure!(
        binaries.len() == SUITES.len(),
        "expected {} test binaries from cargo, found {binaries:?}",
        SUITES.len()
    );
    Ok(binaries)
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    operations: u64,
    faults: u64,
    errors: u64,
    lost: u64,
    duplicated: u64,
    leaked: u64,
}

/// Sums the numeric columns of the rows (`–` counts as zero).
fn totals(rows: &str) -> Totals {
    let mut totals = Totals::default();
    for line in rows.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 7 {
            continue;
        }
        let n = |i: usize| cells[i].parse::<u64>().unwrap_or(0);
        totals.operations += n(1);
        totals.faults += n(2);
        totals.errors += n(3);
        totals.lost += n(4);
        totals.duplicated += n(5);
        totals.leaked += n(6);
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_the_rows_and_read_dashes_as_zero() {
        let rows = "| restart | 100 | 2 | 3 | 0 | 0 | 0 | 5.0 |\n\
                    | lag | 50 | 4 | 0 | – | – | 1 | 2.0 |\n";
        assert_eq!(
            totals(rows),
            Totals {
                operations: 150,
                faults: 6,
                errors: 3,
                lost: 0,
                duplicated: 0,
                leaked: 1,
            }
        );
    }
}
