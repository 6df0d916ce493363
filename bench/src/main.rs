//! `pgstack-bench`: pgstack measured side by side with its peers — raw
//! tokio-postgres (one client per task, no pool), bb8-postgres,
//! deadpool-postgres and sqlx's `PgPool`, each with its defaults — in the
//! same run, on the same throwaway PostgreSQL server (a test-kit
//! `TestCluster`).
//!
//! Run it through `cargo xtask bench` (`--quick` for a short run), which
//! builds it in release mode. The cases (see `docs/benchmarks.md`):
//!
//! 1. checkout and return of a connection, no query;
//! 2. `SELECT 1` and an indexed lookup, throughput and latency;
//! 3. the resilience wrappers' overhead, from criterion's output;
//! 4. an unreachable database (a black-holing proxy);
//! 5. recovery after the server is killed and restarted under load;
//! 6. applying 1,000 generated migrations;
//! 7. mixed load: 64 tasks of `SELECT 1` beside 2 tasks of a 50 ms query;
//! 8. read-write transactions of three statements.
//!
//! pgbench runs beside the libraries in case 2, as the floor.
//!
//! Every measurement is repeated (5 times by default) and the medians are
//! reported, with pgstack's ratio to each peer, as JSON
//! (`target/bench/results.json`) and as markdown tables spliced into
//! `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use pgstack_tests::TestCluster;
use serde_json::{Map, Value};

mod checkout;
mod criterion;
mod libs;
mod load;
mod migrations;
mod mixed;
mod pgbench;
mod phases;
mod recovery;
mod report;
mod statements;
mod transactions;
mod unreachable;

/// pgstack side by side with its peers.
#[derive(Debug, Parser)]
#[command(name = "pgstack-bench", version, about)]
struct Args {
    /// A short run: shorter windows and caps, 200 migrations instead of 1,000.
    #[arg(long)]
    quick: bool,
    /// Which cases to run (comma-separated numbers, 1 to 8).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
    cases: Vec<u8>,
    /// Repetitions of each measurement (the medians are reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Where the JSON goes.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// The markdown page whose generated part is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    markdown: PathBuf,
    /// Leave the markdown page alone.
    #[arg(long)]
    no_markdown: bool,
    /// Where criterion keeps its output (case 3).
    #[arg(long, default_value = "target/criterion")]
    criterion_dir: PathBuf,
    /// Level of the tracing subscriber pgstack runs under (written to
    /// target/bench/tracing.log).
    #[arg(long, default_value = "info")]
    trace_level: String,
    /// Shared (pipelined) connections per node for pgstack's facade instead
    /// of its default: an experiment on the lanes' queueing (0 gives every
    /// statement a connection of its own). A report meant to be kept runs
    /// with the default; the value is written in the JSON's `machine`.
    #[arg(long)]
    shared_connections: Option<usize>,
    /// Splits each statement's latency into queued (woken, waiting for a
    /// worker), running (inside its polls) and waiting (for its answer),
    /// and reports the means around the median and over the slowest 1 %
    /// (cases 2, 7 and 8): an experiment on the tails, written to the JSON
    /// only. The timing wrapper costs every library alike.
    #[arg(long)]
    phases: bool,
    /// Runs without a metrics recorder (every `metrics` handle a no-op),
    /// to measure what recording the figures costs each library: an
    /// experiment, written to the JSON only.
    #[arg(long)]
    no_metrics_recorder: bool,
}

/// What every case needs.
pub(crate) struct Ctx {
    pub(crate) cluster: TestCluster,
    /// The benchmark database (reference schema, seeded).
    pub(crate) url: String,
    pub(crate) quick: bool,
    pub(crate) repeats: usize,
    /// The timed window of one repetition (cases 1 and 2).
    pub(crate) window: Duration,
    pub(crate) warmup: Duration,
    /// Rows in `bills`.
    pub(crate) rows: i64,
    pub(crate) criterion_dir: PathBuf,
}

/// The benchmark database.
pub(crate) const DB: &str = "bench";

/// Prints a progress line.
pub(crate) fn say(text: impl AsRef<str>) {
    #[allow(clippy::print_stdout)]
    {
        println!("{}", text.as_ref());
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The kept report runs the defaults: an experiment writes the JSON only.
    let experiments = [
        (
            args.shared_connections.is_some(),
            "--shared-connections",
            "with the defaults",
        ),
        (
            args.no_metrics_recorder,
            "--no-metrics-recorder",
            "with the recorder a service would install",
        ),
        (
            args.phases,
            "--phases",
            "without its timing wrapper, which slows every call",
        ),
    ];
    if !args.no_markdown
        && let Some((_, flag, why)) = experiments.iter().find(|(given, ..)| *given)
    {
        anyhow::bail!(
            "{flag} is an experiment and docs/benchmarks.md holds runs {why}: add --no-markdown \
             (the figures go to the JSON only)"
        );
    }
    libs::set_shared_connections(args.shared_connections);
    if args.phases {
        phases::enable();
    }
    let root = workspace_root();
    let absolute = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let json = absolute(&args.json);
    let markdown = absolute(&args.markdown);
    let criterion_dir = absolute(&args.criterion_dir);
    let loadavg_start = loadavg();
    let started_at = utc_now();
    init_observability(
        &root.join("target/bench/tracing.log"),
        &args.trace_level,
        !args.no_metrics_recorder,
    )?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&args, root, criterion_dir, loadavg_start, started_at))?;
    report.write_json(&json)?;
    say(format!("wrote {}", json.display()));
    if !args.no_markdown {
        report.write_markdown(&markdown)?;
        say(format!("wrote {}", markdown.display()));
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn run(
    args: &Args,
    root: PathBuf,
    criterion_dir: PathBuf,
    loadavg_start: String,
    started_at: String,
) -> anyhow::Result<report::Report> {
    let began = Instant::now();
    say(format!(
        "pgstack-bench ({} mode), load average {loadavg_start}",
        if args.quick { "quick" } else { "full" }
    ));
    let cluster = TestCluster::start()
        .await
        .context("starting a throwaway PostgreSQL")?;
    let rows = 10_000;
    let postgres = setup(&cluster, rows, &root).await?;
    say(format!("server: {postgres} on port {}", cluster.port()));
    phases::set_server(cluster.data_dir());
    let ctx = Ctx {
        url: cluster.url(DB),
        cluster,
        quick: args.quick,
        repeats: args.repeats.max(1),
        window: if args.quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(1)
        },
        warmup: if args.quick {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(500)
        },
        rows,
        criterion_dir,
    };

    let mut cases = Vec::new();
    for case in &args.cases {
        let t = Instant::now();
        let entries = match case {
            1 => checkout::run(&ctx).await,
            2 => statements::run(&ctx).await,
            3 => criterion::run(&ctx),
            4 => unreachable::run(&ctx).await,
            5 => recovery::run(&ctx).await,
            6 => migrations::run(&ctx).await,
            7 => mixed::run(&ctx).await,
            8 => transactions::run(&ctx).await,
            other => Err(anyhow::anyhow!("there is no case {other} (1 to 8)")),
        }
        .with_context(|| format!("case {case}"))?;
        say(format!(
            "case {case} done in {:.0} s",
            t.elapsed().as_secs_f64()
        ));
        cases.extend(entries);
    }

    let mut machine = Map::new();
    machine.insert(
        "mode".into(),
        Value::from(if args.quick { "quick" } else { "full" }),
    );
    machine.insert("started_at".into(), Value::from(started_at));
    machine.insert("finished_at".into(), Value::from(utc_now()));
    machine.insert(
        "seconds".into(),
        report::num(began.elapsed().as_secs_f64(), 0),
    );
    machine.insert(
        "cores".into(),
        Value::from(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    machine.insert("cpu".into(), Value::from(cpu_model()));
    machine.insert("loadavg_start".into(), Value::from(loadavg_start));
    machine.insert("loadavg_end".into(), Value::from(loadavg()));
    machine.insert("postgres".into(), Value::from(postgres));
    machine.insert("tokio_workers".into(), Value::from(2));
    if let Some(lanes) = libs::shared_connections() {
        machine.insert("pgstack_shared_connections".into(), Value::from(lanes));
    }
    if args.phases {
        machine.insert("phases".into(), Value::from(true));
    }
    if args.no_metrics_recorder {
        machine.insert("metrics_recorder".into(), Value::from(false));
    }
    machine.insert("repeats".into(), Value::from(ctx.repeats));
    machine.insert(
        "window".into(),
        Value::from(format!("{} ms", ctx.window.as_millis())),
    );
    Ok(report::Report { machine, cases })
}

/// Creates the benchmark database with the reference schema and seeds
/// `rows` bills; returns the server's version.
async fn setup(cluster: &TestCluster, rows: i64, root: &Path) -> anyhow::Result<String> {
    let admin = cluster.client("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    let node = pgstack::config::NodeSettings::from_url(&cluster.url(DB))?;
    let migrations = pgstack_migrations::Migrations::from_dir(root.join("migrations"))?;
    pgstack_migrations::Migrator::new(migrations, &node)
        .up(pgstack_migrations::UpTarget::Latest)
        .await
        .context("applying the reference schema")?;
    let client = cluster.client(DB).await?;
    client
        .execute(
            "INSERT INTO bills (session, number, title, introduced_on) \
             SELECT 118, 'H.R. ' || g, 'A bill numbered ' || g, date '2023-01-03' + (g % 700)::int \
             FROM generate_series(1, $1::bigint) AS g",
            &[&rows],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE bills").await?;
    Ok(format!("PostgreSQL {version}"))
}

/// A tracing subscriber (to a file) and a Prometheus metrics recorder, as
/// a service would run pgstack.
fn init_observability(log: &Path, level: &str, recorder: bool) -> anyhow::Result<()> {
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the tracing subscriber: {e}"))?;
    if recorder {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("installing the Prometheus recorder")?;
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown time".to_owned())
}
