//! `pgstack health`: one health report of the configured cluster (or the
//! local development cluster), human or JSON, with recommendations; `--watch`
//! repeats it, `--bench N` measures N probe round trips per node.
//!
//! Exit codes for scripts and orchestrators: 0 healthy, 1 degraded,
//! 2 unhealthy (a cluster that cannot be reached at all is unhealthy).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pgstack_connection::Cluster;
use pgstack_health::{HealthMonitor, HealthReport, HealthStatus, NodeHealth};

use crate::context::{CommonArgs, Context};

/// Arguments of `pgstack health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Show pool figures, latency percentiles, breaker states, recent history and active alerts.
    #[arg(long)]
    detailed: bool,
    /// Print a new report every SECONDS until interrupted (Ctrl-C).
    #[arg(long, value_name = "SECONDS")]
    watch: Option<u64>,
    /// Also run N probe queries on each node and report latency percentiles.
    #[arg(long, value_name = "N")]
    bench: Option<u32>,
}

pub(crate) fn run(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::resolve(&args.common)?;
    ctx.ensure_dev()?;
    let config = ctx.config.clone();
    let timeout = ctx.timeout;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let connected = tokio::time::timeout(timeout, async {
            let cluster = Cluster::builder(&config)
                .shared_connections(0)
                .build()
                .await?;
            let monitor = HealthMonitor::builder(cluster.clone(), &config)
                .without_tracing_sink()
                .start()
                .await?;
            anyhow::Ok((cluster, monitor))
        })
        .await;
        let (cluster, monitor) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => return unreachable(&ctx, &format!("{error:#}")),
            Err(_) => {
                return unreachable(
                    &ctx,
                    &format!(
                        "no answer within {} (--timeout)",
                        humantime::format_duration(timeout)
                    ),
                );
            }
        };

        let mut report = monitor.report();
        let bench = match args.bench {
            Some(n) => Some(bench(&cluster, n).await),
            None => None,
        };
        print_report(&ctx, &report, args.detailed, bench.as_deref())?;
        if let Some(seconds) = args.watch {
            let every = Duration::from_secs(seconds.max(1));
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                report = monitor.check_now().await?;
                print_report(&ctx, &report, args.detailed, None)?;
            }
        }
        monitor.stop().await;
        cluster.close(Duration::from_secs(2)).await;
        Ok(exit_code(report.status))
    })
}

fn exit_code(status: HealthStatus) -> ExitCode {
    match status {
        HealthStatus::Healthy => ExitCode::SUCCESS,
        HealthStatus::Degraded => ExitCode::from(1),
        _ => ExitCode::from(2),
    }
}

/// The report for a cluster that could not be reached: unhealthy, with the reason.
fn unreachable(ctx: &Context, error: &str) -> anyhow::Result<ExitCode> {
    let target = ctx.config.primary.redacted_url();
    if ctx.json {
        let json = serde_json::json!({
            "status": "unhealthy",
            "reasons": [{ "message": format!("cannot reach the primary {target}: {error}") }],
            "nodes": [],
        });
        crate::db::out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        let program = crate::project::program();
        crate::db::out(&format!(
            "UNHEALTHY: cannot reach the primary {target}\n  {error}\n\nrecommendation: check that the server runs and accepts connections ({program} db-status for the development cluster), and the host, port and credentials in the configuration ({program} config)"
        ))?;
    }
    Ok(ExitCode::from(2))
}

/// Per node: N sequential `SELECT 1` round trips on one connection of its pool.
async fn bench(cluster: &Cluster, n: u32) -> Vec<BenchResult> {
    let mut results = Vec::new();
    for node in cluster.nodes() {
        let mut samples = Vec::with_capacity(n as usize);
        let mut errors = 0_u32;
        match node.pool().get("xtask health --bench").await {
            Ok(conn) => {
                for _ in 0..n {
                    let started = Instant::now();
                    match conn.simple_query("SELECT 1").await {
                        Ok(_) => samples.push(started.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
            }
            Err(_) => errors = n,
        }
        samples.sort();
        results.push(BenchResult {
            node: node.name().to_owned(),
            errors,
            samples,
        });
    }
    results
}

/// Probe latencies of one node.
struct BenchResult {
    node: String,
    errors: u32,
    samples: Vec<Duration>,
}

impl BenchResult {
    /// The `p`-th percentile (0..=100) by nearest rank.
    fn percentile(&self, p: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let rank = ((p / 100.0) * self.samples.len() as f64).ceil() as usize;
        self.samples
            .get(rank.clamp(1, self.samples.len()) - 1)
            .copied()
    }

    fn json(&self) -> serde_json::Value {
        let us = |d: Option<Duration>| d.map(|d| d.as_micros() as u64);
        serde_json::json!({
            "node": self.node,
            "queries": self.samples.len(),
            "errors": self.errors,
            "p50_us": us(self.percentile(50.0)),
            "p95_us": us(self.percentile(95.0)),
            "p99_us": us(self.percentile(99.0)),
            "max_us": us(self.samples.last().copied()),
        })
    }
}

fn print_report(
    ctx: &Context,
    report: &HealthReport,
    detailed: bool,
    bench: Option<&[BenchResult]>,
) -> anyhow::Result<()> {
    if ctx.json {
        let mut value = serde_json::to_value(report)?;
        if let (Some(bench), Some(map)) = (bench, value.as_object_mut()) {
            map.insert(
                "bench".to_owned(),
                bench.iter().map(BenchResult::json).collect(),
            );
        }
        // One line per report, so `--watch --json` is a stream of JSON lines.
        return crate::db::out(&serde_json::to_string(&value)?);
    }
    let mut text = String::new();
    writeln!(
        text,
        "{} (round {}, {:.1?})",
        report.status.as_str().to_uppercase(),
        report.round,
        report.took
    )?;
    for reason in &report.reasons {
        writeln!(text, "  - {}", reason.message)?;
    }
    for node in &report.nodes {
        write_node(&mut text, node, detailed)?;
    }
    if detailed && !report.alerts.is_empty() {
        writeln!(text, "active alerts:")?;
        for alert in &report.alerts {
            let node = alert
                .node
                .as_deref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default();
            writeln!(
                text,
                "  [{}] {}{node}: {}",
                alert.severity.as_str(),
                alert.rule,
                alert.detail
            )?;
        }
    }
    if detailed && !report.history.is_empty() {
        let recent: Vec<&str> = report
            .history
            .iter()
            .rev()
            .take(10)
            .map(|h| h.status.as_str())
            .collect();
        writeln!(text, "recent rounds (newest first): {}", recent.join(", "))?;
    }
    if let Some(bench) = bench {
        writeln!(text, "probe round trips:")?;
        for b in bench {
            let fmt = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.0?}", d));
            writeln!(
                text,
                "  {:<12} {} queries, {} errors: p50 {} p95 {} p99 {} max {}",
                b.node,
                b.samples.len(),
                b.errors,
                fmt(b.percentile(50.0)),
                fmt(b.percentile(95.0)),
                fmt(b.percentile(99.0)),
                fmt(b.samples.last().copied()),
            )?;
        }
    }
    for line in &report.recommendations {
        writeln!(text, "recommendation: {line}")?;
    }
    crate::db::out(text.trim_end())
}

fn write_node(text: &mut String, node: &NodeHealth, detailed: bool) -> std::fmt::Result {
    let role = node.observed_role.unwrap_or(node.configured_role);
    write!(
        text,
        "  {:<12} {:<8} {:<9}",
        node.name,
        role.as_str(),
        node.status.as_str()
    )?;
    match node.latency {
        Some(latency) if node.reachable => write!(text, " latency {latency:.1?}")?,
        _ => write!(text, " unreachable")?,
    }
    if let Some(lag) = node.replica_lag {
        write!(text, ", lag {lag:.1?}")?;
    }
    if let (Some(used), Some(max)) = (node.server_connections, node.max_connections) {
        write!(text, ", server connections {used}/{max}")?;
    }
    if node.ejected {
        write!(text, ", EJECTED from reads")?;
    }
    writeln!(text)?;
    if let Some(error) = &node.error {
        writeln!(text, "      error: {error}")?;
    }
    for reason in &node.reasons {
        writeln!(text, "      - {}", reason.message)?;
    }
    if detailed {
        let p = &node.pool;
        writeln!(
            text,
            "      pool: {} open ({} idle, {} in use) of {}, {} waiting, {} timeouts, {:.0}% used",
            p.size,
            p.idle,
            p.in_use,
            p.max_size,
            p.waiters,
            p.timeouts,
            p.utilization * 100.0
        )?;
        let s = &node.latency_summary;
        let fmt = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{d:.1?}"));
        writeln!(
            text,
            "      probe latency over {} rounds: p50 {} p95 {} p99 {} max {}",
            s.samples,
            fmt(s.p50),
            fmt(s.p95),
            fmt(s.p99),
            fmt(s.max)
        )?;
        if let Some(breaker) = &node.breaker {
            writeln!(text, "      breaker: {breaker}")?;
        }
    }
    Ok(())
}
