//! `pgstack doctor`: the command around [`super::examine`]: options, the
//! connection, replicas from the configuration, human and JSON output, and
//! exit codes 0 (nothing found), 1 (warnings), 2 (critical, or unreachable).

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use pgstack_config::NodeSettings;
use serde_json::json;

use super::{Check, Finding, Options, Report, Severity, Skipped, Thresholds};
use crate::context::{CommonArgs, Context};
use crate::db::out;
use crate::guard::pool_on;

/// Arguments of `pgstack doctor`. Every threshold has a flag; the defaults
/// are the `DEFAULT_*` constants of [`crate::doctor`].
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Run only this check (repeat for more): fk_without_index, unused_index, duplicate_index,
    /// redundant_index, invalid_index, invalid_constraint, idle_in_transaction, long_running_query,
    /// dead_tuples, seq_scans, xid_wraparound, sequence_exhaustion, cache_hit_ratio,
    /// replication_slot, replication_lag, connections.
    #[arg(long = "check", value_name = "CHECK", value_parser = parse_check)]
    checks: Vec<Check>,
    /// Report unused indexes from this size on (e.g. 512kB, 1MiB, 0).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    unused_index_min_size: u64,
    /// Report sessions idle in a transaction this long (critical from ten times).
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    idle_in_transaction: Duration,
    /// Report statements running this long (critical from ten times).
    #[arg(long, value_name = "DURATION", default_value = "1m", value_parser = humantime::parse_duration)]
    long_query: Duration,
    /// Report tables with this share of dead rows (0.2 or 20%; critical from 50%).
    #[arg(long, value_name = "SHARE", default_value = "0.2", value_parser = parse_share)]
    dead_tuple_ratio: f64,
    /// Judge dead rows only in tables from this size on.
    #[arg(long, value_name = "SIZE", default_value = "10MiB", value_parser = parse_size)]
    dead_tuples_min_size: u64,
    /// Judge sequential scans only in tables with this many live rows.
    #[arg(long, value_name = "ROWS", default_value = "10000")]
    seq_scan_min_rows: i64,
    /// Transaction-id age from which a database is a warning [default: 1.5 × autovacuum_freeze_max_age].
    #[arg(long, value_name = "XIDS")]
    xid_age_warning: Option<i64>,
    /// Transaction-id age from which a database is critical.
    #[arg(long, value_name = "XIDS", default_value = "1000000000")]
    xid_age_critical: i64,
    /// Share of a sequence's (or its column's) range used from which it is a warning.
    #[arg(long, value_name = "SHARE", default_value = "0.75", value_parser = parse_share)]
    sequence_warning: f64,
    /// Share of a sequence's (or its column's) range used from which it is critical.
    #[arg(long, value_name = "SHARE", default_value = "0.9", value_parser = parse_share)]
    sequence_critical: f64,
    /// Report hit ratios of tables and indexes below this (critical below 90%).
    #[arg(long, value_name = "SHARE", default_value = "0.99", value_parser = parse_share)]
    cache_hit_ratio: f64,
    /// Judge hit ratios only after this many blocks were read or hit.
    #[arg(long, value_name = "BLOCKS", default_value = "10000")]
    cache_min_blocks: i64,
    /// A replication slot holding this much WAL is critical (an inactive one is always a warning).
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    slot_retained_size: u64,
    /// Report replicas this much WAL behind (critical from ten times).
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    replica_lag_size: u64,
    /// Report replicas this far behind in time (critical from ten times) [default: health.max_replica_lag].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    replica_lag: Option<Duration>,
    /// Report client connections from this share of the usable ones (critical from 95%).
    #[arg(long, value_name = "SHARE", default_value = "0.8", value_parser = parse_share)]
    connections_ratio: f64,
}

impl DoctorArgs {
    fn thresholds(&self, max_replica_lag: Duration) -> Thresholds {
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Thresholds {
            unused_index_min_bytes: self.unused_index_min_size,
            idle_in_transaction: self.idle_in_transaction,
            long_query: self.long_query,
            dead_tuple_ratio: self.dead_tuple_ratio,
            dead_tuples_min_bytes: self.dead_tuples_min_size,
            seq_scan_min_rows: self.seq_scan_min_rows,
            xid_age_warning: self.xid_age_warning,
            xid_age_critical: self.xid_age_critical,
            sequence_warning: self.sequence_warning,
            sequence_critical: self.sequence_critical,
            cache_hit_ratio: self.cache_hit_ratio,
            cache_min_blocks: self.cache_min_blocks,
            slot_retained_bytes: signed(self.slot_retained_size),
            replica_lag_bytes: signed(self.replica_lag_size),
            replica_lag: self.replica_lag.unwrap_or(max_replica_lag),
            connections_ratio: self.connections_ratio,
        }
    }
}

fn parse_check(text: &str) -> Result<Check, String> {
    Check::from_name(text).ok_or_else(|| {
        format!(
            "unknown check `{text}`; the checks are: {}",
            Check::ALL.map(Check::name).join(", ")
        )
    })
}

/// `0.2`, or `20%`: a share between 0 and 1.
fn parse_share(text: &str) -> Result<f64, String> {
    let value = match text.trim().strip_suffix('%') {
        Some(pct) => pct.trim().parse::<f64>().map(|p| p / 100.0),
        None => text.trim().parse::<f64>(),
    }
    .map_err(|_| format!("`{text}` is not a share; write 0.2 or 20%"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("`{text}` is not between 0 and 1 (0% and 100%)"))
    }
}

/// `1048576`, `512kB`, `1MB`, `1MiB`, `2GB`: bytes, with PostgreSQL's
/// binary units (kB is 1024 bytes, as in its settings).
fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("`{text}` is not a size; write e.g. 512kB, 1MiB, 2GB or a byte count")
    })?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        "t" | "tb" | "tib" => 1024 * 1024 * 1024 * 1024,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}`; use kB, MB, GB or TB"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
}

pub(crate) fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::resolve(&args.common)?;
    ctx.ensure_dev()?;
    let options = Options {
        thresholds: args.thresholds(ctx.config.health.max_replica_lag),
        only: args.checks.clone(),
    };
    let config = ctx.config.clone();
    let timeout = ctx.timeout;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::time::timeout(timeout, async {
            let primary = examine_node(&config, config.primary.clone(), "doctor", &options).await?;
            let mut report = primary;
            let mut replicas = Vec::new();
            if options.runs(Check::ReplicationLag) {
                for node in &config.replicas {
                    let name = node.redacted_url();
                    match examine_replica_node(&config, node.clone(), &name, &options).await {
                        Ok(findings) => report.extend(findings),
                        Err(error) => report.skipped.push(Skipped {
                            check: Check::ReplicationLag,
                            reason: format!("replica {name}: {error:#}"),
                        }),
                    }
                    replicas.push(name);
                }
            }
            anyhow::Ok((report, replicas))
        })
        .await
    });
    let (report, replicas) = match outcome {
        Ok(Ok(done)) => done,
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
    print(&ctx, &report, &replicas)?;
    Ok(ExitCode::from(report.exit_code()))
}

/// Session settings for the doctor's own connection: it never waits long
/// for a lock (a table being rewritten) and never runs long itself.
const SESSION: &str = "SET lock_timeout = '5s'; SET statement_timeout = '60s'; SET idle_in_transaction_session_timeout = '60s'";

async fn examine_node(
    config: &pgstack_config::DatabaseConfig,
    node: NodeSettings,
    what: &str,
    options: &Options,
) -> anyhow::Result<Report> {
    let pool = pool_on(config, node, what)?;
    let result = async {
        let mut conn = crate::guard::checkout(&pool, "doctor").await?;
        let client = conn.client_unchecked();
        client
            .batch_execute(SESSION)
            .await
            .context("preparing the doctor's session")?;
        let report = super::examine(client, options)
            .await
            .context("asking the server for its version and role")?;
        anyhow::Ok(report)
    }
    .await;
    pool.close();
    result
}

async fn examine_replica_node(
    config: &pgstack_config::DatabaseConfig,
    node: NodeSettings,
    name: &str,
    options: &Options,
) -> anyhow::Result<Vec<Finding>> {
    let pool = pool_on(config, node, "doctor replica")?;
    let result = async {
        let mut conn = crate::guard::checkout(&pool, "doctor replica").await?;
        let client = conn.client_unchecked();
        client.batch_execute(SESSION).await?;
        anyhow::Ok(super::examine_replica(client, name, &options.thresholds).await?)
    }
    .await;
    pool.close();
    result
}

/// A server that cannot be examined: critical, exit 2.
fn unreachable(ctx: &Context, error: &str) -> anyhow::Result<ExitCode> {
    let target = ctx.config.primary.redacted_url();
    if ctx.json {
        let json = json!({
            "status": "unreachable",
            "target": target,
            "error": error,
            "findings": [],
        });
        out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        out(&format!(
            "CRITICAL: cannot examine {target}\n  {error}\n\ncheck that the server runs and accepts connections ({program} db-status for the development server), and the configuration ({program} config)",
            program = crate::project::program()
        ))?;
    }
    Ok(ExitCode::from(2))
}

fn status(report: &Report) -> &'static str {
    match report.worst() {
        None => "ok",
        Some(Severity::Warning) => "warning",
        Some(Severity::Critical) => "critical",
    }
}

fn print(ctx: &Context, report: &Report, replicas: &[String]) -> anyhow::Result<()> {
    let target = ctx.config.primary.redacted_url();
    if ctx.json {
        let json = json!({
            "status": status(report),
            "database": report.database,
            "target": target,
            "server_version": report.server_version,
            "in_recovery": report.in_recovery,
            "stats_since": report.stats_since,
            "checks": report.checks,
            "replicas": replicas,
            "findings": report.findings,
            "skipped": report.skipped,
        });
        return out(&serde_json::to_string_pretty(&json)?);
    }
    let mut text = String::new();
    let critical = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Critical)
        .count();
    let warnings = report.findings.len() - critical;
    write!(
        text,
        "Doctor: {target} (PostgreSQL {}{}), {} checks",
        report.server_version,
        if report.in_recovery {
            ", a replica"
        } else {
            ""
        },
        report.checks.len()
    )?;
    if !replicas.is_empty() {
        write!(text, ", {} replica(s)", replicas.len())?;
    }
    if report.findings.is_empty() {
        writeln!(text, ": no problems found.")?;
    } else {
        writeln!(text, ": {critical} critical, {warnings} warning(s).")?;
    }
    for finding in &report.findings {
        writeln!(
            text,
            "\n[{}] {} — {}",
            finding.severity.as_str().to_uppercase(),
            finding.check,
            finding.subject
        )?;
        writeln!(text, "  evidence: {}", finding.evidence)?;
        writeln!(text, "  why:      {}", finding.why)?;
        writeln!(text, "  fix:")?;
        for line in finding.fix_sql.lines() {
            writeln!(text, "    {line}")?;
        }
    }
    if !report.skipped.is_empty() {
        writeln!(text)?;
        for skipped in &report.skipped {
            writeln!(text, "skipped {}: {}", skipped.check, skipped.reason)?;
        }
    }
    if ctx.verbose
        && let Some(since) = &report.stats_since
    {
        writeln!(text, "\nusage statistics since {since}")?;
    }
    out(text.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Harness {
        #[command(flatten)]
        args: DoctorArgs,
    }

    #[test]
    fn the_flags_default_to_the_documented_thresholds() {
        let harness = Harness::try_parse_from(["doctor"]).unwrap();
        let t = harness.args.thresholds(super::super::DEFAULT_REPLICA_LAG);
        assert_eq!(t, Thresholds::default());
        assert!(harness.args.checks.is_empty());
    }

    #[test]
    fn flags_set_thresholds_and_checks() {
        let harness = Harness::try_parse_from([
            "doctor",
            "--check",
            "dead_tuples",
            "--check",
            "connections",
            "--dead-tuple-ratio",
            "35%",
            "--unused-index-min-size",
            "512kB",
            "--idle-in-transaction",
            "30s",
        ])
        .unwrap();
        assert_eq!(harness.args.checks, [Check::DeadTuples, Check::Connections]);
        let t = harness.args.thresholds(Duration::from_secs(3));
        assert!((t.dead_tuple_ratio - 0.35).abs() < 1e-9);
        assert_eq!(t.unused_index_min_bytes, 512 * 1024);
        assert_eq!(t.idle_in_transaction, Duration::from_secs(30));
        assert_eq!(t.replica_lag, Duration::from_secs(3));
        assert!(Harness::try_parse_from(["doctor", "--check", "nope"]).is_err());
        assert!(Harness::try_parse_from(["doctor", "--cache-hit-ratio", "1.5"]).is_err());
    }

    #[test]
    fn sizes_use_postgres_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("8kB"), Ok(8192));
        assert_eq!(parse_size("1MB"), Ok(1 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("MB").is_err());
    }
}
