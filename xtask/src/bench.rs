//! `cargo xtask bench`: pgstack side by side with its peers.
//!
//! Builds and runs the `pgstack-bench` binary in release mode from the
//! workspace root. In full mode it first runs `cargo bench -p
//! pgstack-resilience` when criterion's output (which case 3 reads) is
//! missing, or when `--rerun-criterion` asks for it. Results go to
//! `target/bench/results.json` and the generated part of `docs/benchmarks.md`.
//! Runs cargo as `$CARGO` (set by `cargo xtask`), else `cargo`.

use std::ffi::OsString;
use std::process::{Command, ExitCode};

use anyhow::Context as _;

use crate::verify::workspace_root;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A short run: shorter windows and caps, fewer migrations; the resilience
    /// figures only if criterion has written them before.
    #[arg(long)]
    quick: bool,
    /// Which cases to run, comma-separated (1 checkout, 2 statements,
    /// 3 resilience overhead, 4 unreachable, 5 recovery, 6 migrations,
    /// 7 mixed load, 8 transactions).
    #[arg(long)]
    cases: Option<String>,
    /// Repetitions of each measurement (default 5; medians are reported).
    #[arg(long)]
    repeats: Option<usize>,
    /// Write the JSON only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_markdown: bool,
    /// Run `cargo bench -p pgstack-resilience` even when criterion's output
    /// is already there (full mode runs it only when it is missing).
    #[arg(long)]
    rerun_criterion: bool,
    /// pgstack's shared connections per node instead of its default: an
    /// experiment on the lanes' queueing (needs `--no-markdown`).
    #[arg(long)]
    shared_connections: Option<usize>,
    /// Split each statement's latency into queued, running and waiting and
    /// report the means around the median and over the slowest 1 %: an
    /// experiment on the tails (needs `--no-markdown`).
    #[arg(long)]
    phases: bool,
    /// Run without a metrics recorder, to measure what recording the
    /// figures costs (needs `--no-markdown`).
    #[arg(long)]
    no_metrics_recorder: bool,
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let root = workspace_root()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let wants_resilience = args
        .cases
        .as_deref()
        .is_none_or(|cases| cases.split(',').any(|c| c.trim() == "3"));
    let criterion_present = root
        .join("target/criterion/breaker/closed_call/new/estimates.json")
        .is_file();
    if !args.quick && wants_resilience && (args.rerun_criterion || !criterion_present) {
        let status = Command::new(&cargo)
            .args(["bench", "-p", "pgstack-resilience", "--bench", "overhead"])
            .current_dir(&root)
            .status()
            .context("running cargo bench -p pgstack-resilience")?;
        if !status.success() {
            anyhow::bail!("cargo bench -p pgstack-resilience failed ({status})");
        }
    }
    let mut command = Command::new(&cargo);
    command
        .args(["run", "--release", "-p", "pgstack-bench", "--"])
        .current_dir(&root);
    if args.quick {
        command.arg("--quick");
    }
    if let Some(cases) = &args.cases {
        command.args(["--cases", cases]);
    }
    if let Some(repeats) = args.repeats {
        command.args(["--repeats", &repeats.to_string()]);
    }
    if args.no_markdown {
        command.arg("--no-markdown");
    }
    if let Some(lanes) = args.shared_connections {
        command.args(["--shared-connections", &lanes.to_string()]);
    }
    if args.phases {
        command.arg("--phases");
    }
    if args.no_metrics_recorder {
        command.arg("--no-metrics-recorder");
    }
    let status = command
        .status()
        .context("running cargo run --release -p pgstack-bench")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
