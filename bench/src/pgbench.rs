//! pgbench on the same server: the floor the libraries are measured
//! against (`-M prepared`, 2 threads, one connection per client). Its
//! `-S` lookup reads pgbench's own table (scale 1), beside the libraries'
//! "bill by id"; `SELECT 1` runs from a script file.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;

use crate::Ctx;
use crate::libs::Query;

/// pgbench's database on the benchmark server.
const PGBENCH_DB: &str = "pgbench";

/// What one pgbench run reported.
pub(crate) struct Run {
    pub(crate) tps: f64,
    /// The average latency, in microseconds.
    pub(crate) latency_avg_us: f64,
}

/// Creates and fills pgbench's tables (`pgbench -i -s 1`) in a database of
/// their own.
pub(crate) async fn setup(ctx: &Ctx) -> anyhow::Result<()> {
    let admin = ctx.cluster.client("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {PGBENCH_DB}"))
        .await?;
    let output = command(ctx)
        .args(["-i", "-s", "1", "-q", PGBENCH_DB])
        .output()
        .await
        .context("running pgbench -i")?;
    anyhow::ensure!(
        output.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn command(ctx: &Ctx) -> tokio::process::Command {
    let tool = ctx.cluster.binaries().tool("pgbench");
    let mut command = tokio::process::Command::new(tool);
    command
        .args(["-h", ctx.cluster.host()])
        .args(["-p", &ctx.cluster.port().to_string()])
        .args(["-U", "postgres"])
        .stdin(Stdio::null());
    command
}

/// Runs `q` with `clients` connections for `window` (whole seconds, at
/// least one).
pub(crate) async fn run(
    ctx: &Ctx,
    q: Query,
    clients: usize,
    window: Duration,
) -> anyhow::Result<Run> {
    let seconds = window.as_secs().max(1).to_string();
    let clients = clients.to_string();
    let threads = "2".to_owned();
    let mut command = command(ctx);
    command.args([
        "-n", "-M", "prepared", "-c", &clients, "-j", &threads, "-T", &seconds,
    ]);
    let script;
    match q {
        Query::Select1 => {
            script = tempfile::Builder::new()
                .prefix("pgstack-bench-select1")
                .suffix(".sql")
                .tempfile()?;
            std::fs::write(script.path(), "SELECT 1;\n")?;
            command.arg("-f").arg(script.path());
        }
        Query::Lookup { .. } => {
            command.arg("-S");
        }
    }
    command.arg(PGBENCH_DB);
    let output = command.output().await.context("running pgbench")?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        text,
        String::from_utf8_lossy(&output.stderr)
    );
    let figure = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    let tps = figure("tps = ").context("pgbench printed no tps")?;
    let latency_ms = figure("latency average = ").unwrap_or(f64::NAN);
    Ok(Run {
        tps,
        latency_avg_us: latency_ms * 1000.0,
    })
}
