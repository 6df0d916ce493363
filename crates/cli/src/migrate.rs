//! `pgstack migrate …`: status, up, down, validate, dry-run, lint, new,
//! baseline and forget-failed, on `pgstack-migrations`.
//!
//! The folder is `--migrations`, else `migrations.dir` of the configuration
//! (`migrations`, or `PGSTACK_MIGRATIONS__DIR`), looked up in the current
//! folder and then in the project's root. With no `--database-url` / `DATABASE_URL` the commands
//! work on the local development cluster. `down` destroys data, so it is
//! guarded like `db-reset`: a production environment, a non-local host or a
//! database recorded as production needs `--confirm-destroy DATABASE`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use pgstack_config::Environment;
use pgstack_migrations::{
    DownTarget, Event, Finding, InvalidIndex, LintReport, MigrationState, Migrations, Migrator,
    Operation, Plan, Report, Status, StatusEntry, UpTarget,
};
use serde_json::json;

use crate::context::{CommonArgs, Context, resolve_dir};
use crate::db::out;
use crate::guard::{self, Action};

/// Arguments of `pgstack migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    command: MigrateCommand,
}

#[derive(Debug, Subcommand)]
enum MigrateCommand {
    /// List every migration and where it stands: applied, pending, checksum mismatch, missing file or failed.
    Status(PlainArgs),
    /// Apply the pending migrations (all of them, or up to --to VERSION).
    Up(UpArgs),
    /// Revert applied migrations, newest first: the last one, the last --steps N, or all above --to VERSION.
    Down(DownArgs),
    /// Compare the applied migrations with their files; exit 1 when one changed, vanished or failed.
    Validate(PlainArgs),
    /// Print the plan and the SQL of what `up` would do; change nothing.
    DryRun(DryRunArgs),
    /// Look for lock hazards in the migration files (every file, or --pending ones); exit 1 on an error-level finding.
    Lint(LintArgs),
    /// Write a reversible pair NNNN_NAME.up.sql / .down.sql with the next version in the migrations folder.
    New(NewArgs),
    /// Record every migration up to VERSION as applied without running it (adopting an existing schema).
    Baseline(VersionArgs),
    /// Remove the failed mark a no-transaction migration left, dropping the INVALID indexes its CREATE INDEX CONCURRENTLY left.
    ForgetFailed(ForgetArgs),
}

/// Only the shared options.
#[derive(Debug, clap::Args)]
struct PlainArgs {
    #[command(flatten)]
    common: CommonArgs,
}

/// Arguments of `migrate up`.
#[derive(Debug, clap::Args)]
struct UpArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Apply pending migrations up to and including this version.
    #[arg(long, value_name = "VERSION")]
    to: Option<i64>,
    /// Print the plan and the SQL; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Arguments of `migrate down`.
#[derive(Debug, clap::Args)]
struct DownArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Revert the last N applied migrations [default: 1].
    #[arg(long, value_name = "N", conflicts_with = "to", value_parser = clap::value_parser!(u32).range(1..))]
    steps: Option<u32>,
    /// Revert every applied migration above this version (0: all of them).
    #[arg(long, value_name = "VERSION", value_parser = clap::value_parser!(i64).range(0..))]
    to: Option<i64>,
    /// Print the plan and the SQL; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Revert even on a production or non-local database; give its name to confirm.
    #[arg(long, value_name = "DATABASE")]
    confirm_destroy: Option<String>,
}

/// Arguments of `migrate dry-run`.
#[derive(Debug, clap::Args)]
struct DryRunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Plan up to and including this version.
    #[arg(long, value_name = "VERSION")]
    to: Option<i64>,
}

/// Arguments of `migrate lint`.
#[derive(Debug, clap::Args)]
struct LintArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Lint only the migrations not applied yet to the database (default: every file, no database needed).
    #[arg(long)]
    pending: bool,
}

/// Arguments of `migrate forget-failed`.
#[derive(Debug, clap::Args)]
struct ForgetArgs {
    /// The migration version.
    version: i64,
    /// Remove the mark only; keep the INVALID indexes the migration left.
    #[arg(long)]
    keep_invalid_indexes: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// Arguments of `migrate new`.
#[derive(Debug, clap::Args)]
struct NewArgs {
    /// What the migration does, e.g. add_bill_status (spaces and dashes become underscores).
    name: String,
    /// The migrations folder [default: migrations.dir of the configuration].
    #[arg(long, visible_alias = "migrations", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The configuration file [default: pgstack.toml, or PGSTACK_CONFIG].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Environment: development, test, staging or production [default: APP_ENV / PGSTACK_ENV, else development].
    #[arg(long, value_name = "ENV")]
    env: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `migrate baseline`.
#[derive(Debug, clap::Args)]
struct VersionArgs {
    /// The migration version.
    version: i64,
    #[command(flatten)]
    common: CommonArgs,
}

/// `migrate down`, for the guard's messages.
const MIGRATE_DOWN: Action = Action {
    command: "migrate down",
    verb: "migrate down",
    done: "migrated down",
};

pub(crate) fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        MigrateCommand::Status(a) => status(&a.common),
        MigrateCommand::Up(a) => up(&a),
        MigrateCommand::Down(a) => down(&a),
        MigrateCommand::Validate(a) => validate(&a.common),
        MigrateCommand::DryRun(a) => {
            let target = a.to.map_or(UpTarget::Latest, UpTarget::Version);
            let (ctx, migrator) = open(&a.common, "migrate dry-run")?;
            dry_run(&ctx, &migrator, Operation::Up(target), &[])
        }
        MigrateCommand::Lint(a) => lint(&a),
        MigrateCommand::New(a) => new(&a),
        MigrateCommand::Baseline(a) => baseline(&a),
        MigrateCommand::ForgetFailed(a) => forget_failed(&a),
    }
}

/// Resolves the context, reads the folder, starts the development cluster
/// when it is the target, and builds the migrator.
fn open(common: &CommonArgs, what: &str) -> anyhow::Result<(Context, Migrator)> {
    let mut ctx = Context::resolve(common)?;
    let migrator = migrator_for(&mut ctx, what)?;
    Ok((ctx, migrator))
}

fn migrator_for(ctx: &mut Context, what: &str) -> anyhow::Result<Migrator> {
    let dir = resolve_dir(&ctx.config.migrations.dir);
    let migrations = Migrations::from_dir(&dir)?;
    ctx.ensure_dev()?;
    let config = &ctx.config;
    Ok(Migrator::new(migrations, &config.primary)
        .tls(&config.tls)
        .with_settings(&config.migrations)
        .application_name(&format!("{} {what}", config.query.application_name))
        .with_environment(config.environment))
}

fn status(common: &CommonArgs) -> anyhow::Result<ExitCode> {
    let (ctx, migrator) = open(common, "migrate status")?;
    let status = ctx.block_on(async { Ok(migrator.status().await?) })?;
    let target = ctx.config.primary.redacted_url();
    if ctx.json {
        let json = json!({
            "database": ctx.config.primary.database,
            "target": target,
            "table_exists": status.table_exists,
            "current_version": status.current_version(),
            "up_to_date": status.is_up_to_date(),
            "pending": status.in_state(MigrationState::Pending).count(),
            "problems": status.validation().problems.len(),
            "migrations": status.entries.iter().map(entry_json).collect::<Vec<_>>(),
            "invalid_indexes": status.invalid_indexes.iter().map(invalid_json).collect::<Vec<_>>(),
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!("Migrations of {target}:\n");
    text.push_str(&status_table(&status, ctx.verbose));
    text.push('\n');
    text.push_str(&invalid_lines(&status));
    text.push_str(&summary(&status));
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn status_table(status: &Status, verbose: bool) -> String {
    if status.entries.is_empty() {
        return "  (no migrations in the folder or the database)".to_owned();
    }
    let mut lines = vec![format!(
        "  {:>14}  {:<18} {:<20} {}",
        "VERSION", "STATE", "APPLIED AT", "DESCRIPTION"
    )];
    for e in &status.entries {
        let applied = e
            .installed_on
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|| "-".to_owned());
        let mut line = format!(
            "  {:>14}  {:<18} {:<20} {}",
            e.version,
            e.state.to_string(),
            applied,
            e.description
        );
        if verbose && let Some(file) = &e.file {
            line.push_str(&format!("  ({})", file.display()));
        }
        lines.push(line);
    }
    lines.join("\n")
}

fn summary(status: &Status) -> String {
    let pending = status.in_state(MigrationState::Pending).count();
    let problems = status.validation().problems.len();
    let current = match status.current_version() {
        Some(v) => format!("version {v}"),
        None => "no migration applied".to_owned(),
    };
    let mut text = format!("Current: {current}; {pending} pending");
    if problems > 0 {
        text.push_str(&format!(
            "; {problems} problem(s): run `{} migrate validate` for how to fix them",
            crate::project::program()
        ));
    }
    text.push('.');
    text
}

/// The INVALID indexes of a status, one line each with what to do.
fn invalid_lines(status: &Status) -> String {
    let mut text = String::new();
    for index in &status.invalid_indexes {
        let advice = match index.version.filter(|v| {
            status
                .in_state(MigrationState::Failed)
                .any(|e| e.version == *v)
        }) {
            Some(v) => format!(
                "left by the failed migration {v}: `{} migrate forget-failed {v}` drops it",
                crate::project::program()
            ),
            None => format!(
                "unless it is being built right now, DROP INDEX CONCURRENTLY {}",
                index.qualified_name()
            ),
        };
        text.push_str(&format!("INVALID index {index}; {advice}.\n"));
    }
    text
}

fn invalid_json(index: &InvalidIndex) -> serde_json::Value {
    json!({
        "schema": index.schema,
        "name": index.name,
        "table": index.table,
        "definition": index.definition,
        "version": index.version,
    })
}

fn finding_json(f: &Finding) -> serde_json::Value {
    json!({
        "rule": f.rule.id(),
        "severity": f.severity.as_str(),
        "version": f.version,
        "file": f.file,
        "line": f.line,
        "statement": f.statement,
        "message": f.message,
        "why": f.why(),
        "fix": f.fix(),
    })
}

fn entry_json(e: &StatusEntry) -> serde_json::Value {
    json!({
        "version": e.version,
        "description": e.description,
        "state": state_name(e.state),
        "file": e.file,
        "installed_on": e.installed_on.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        "execution_time_ms": e.execution_time.map(millis),
    })
}

/// The state as a JSON-friendly word.
fn state_name(state: MigrationState) -> &'static str {
    match state {
        MigrationState::Applied => "applied",
        MigrationState::Pending => "pending",
        MigrationState::ChecksumMismatch => "checksum_mismatch",
        MigrationState::MissingFile => "missing_file",
        MigrationState::Failed => "failed",
        _ => "unknown",
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    let target = args.to.map_or(UpTarget::Latest, UpTarget::Version);
    let (ctx, migrator) = open(&args.common, "migrate up")?;
    if args.dry_run {
        return dry_run(&ctx, &migrator, Operation::Up(target), &[]);
    }
    let (migrator, bar) = with_progress(&ctx, migrator, "migrating");
    let result = ctx.block_on(async {
        let report = migrator.up(target).await?;
        let status = migrator.status().await?;
        Ok((report, status))
    });
    bar.finish_and_clear();
    let (report, status) = result?;
    print_report(&ctx, &report, &status, "up")
}

fn down(args: &DownArgs) -> anyhow::Result<ExitCode> {
    let target = match (args.steps, args.to) {
        (_, Some(version)) => DownTarget::Version(version),
        (steps, None) => DownTarget::Steps(steps.unwrap_or(1) as usize),
    };
    let mut ctx = Context::resolve(&args.common)?;
    // Guards that need no server: nothing is started or touched before they pass.
    let database = guard::database_name(&ctx).to_owned();
    let confirmed = guard::confirmation(args.confirm_destroy.as_deref(), &database, MIGRATE_DOWN)?;
    let mut refusals = guard::static_refusals(&ctx, MIGRATE_DOWN);
    if !refusals.is_empty() && !confirmed && !args.dry_run {
        return guard::refuse(MIGRATE_DOWN, &database, &refusals);
    }
    let migrator = migrator_for(&mut ctx, "migrate down")?;
    let recorded = ctx.block_on(async { Ok(migrator.recorded_environment().await?) })?;
    if recorded == Some(Environment::Production) {
        refusals.push(guard::marked_production(&database));
    }
    if args.dry_run {
        let unconfirmed = if confirmed { &[][..] } else { &refusals[..] };
        return dry_run(&ctx, &migrator, Operation::Down(target), unconfirmed);
    }
    if !refusals.is_empty() && !confirmed {
        return guard::refuse(MIGRATE_DOWN, &database, &refusals);
    }
    let (migrator, bar) = with_progress(&ctx, migrator, "reverting");
    let result = ctx.block_on(async {
        let report = migrator.down(target).await?;
        let status = migrator.status().await?;
        Ok((report, status))
    });
    bar.finish_and_clear();
    let (report, status) = result?;
    print_report(&ctx, &report, &status, "down")
}

/// A progress bar fed by the migrator's events; lock waits are reported on stderr.
fn with_progress(
    ctx: &Context,
    migrator: Migrator,
    prefix: &'static str,
) -> (Migrator, indicatif::ProgressBar) {
    let bar = crate::progress::bar(ctx.json, 0, prefix);
    let events = bar.clone();
    let verbose = ctx.verbose;
    let migrator = migrator.on_progress(move |event| match event {
        Event::LockWaiting { holder, waited } => {
            let who = holder
                .as_ref()
                .map_or_else(|| "another session".to_owned(), ToString::to_string);
            events.suspend(|| {
                note(&format!(
                    "waiting for the migration lock held by {who} ({:.0?} so far; gives up after migrations.lock_timeout)",
                    waited
                ));
            });
        }
        Event::LockAcquired { waited } if verbose => {
            events.suspend(|| note(&format!("took the migration lock after {waited:.1?}")));
        }
        Event::Applying {
            version,
            description,
            direction,
            index,
            total,
            ..
        } => {
            events.set_length(*total as u64);
            events.set_message(format!("{version} {description}"));
            if verbose {
                events.suspend(|| {
                    note(&format!(
                        "[{index}/{total}] {direction} {version} {description}"
                    ));
                });
            }
        }
        Event::Applied { .. } => events.inc(1),
        Event::LockNotAvailable {
            version,
            attempt,
            attempts,
            lock_wait,
            retry_in,
            conflict,
            ..
        } => {
            let what = conflict
                .as_ref()
                .map_or_else(|| "a table lock".to_owned(), ToString::to_string);
            let next = match retry_in {
                Some(delay) => format!("rolled back; attempt {} of {attempts} in {delay:.1?}", attempt + 1),
                None => "rolled back; that was the last attempt (migrations.lock_retries)".to_owned(),
            };
            events.suspend(|| {
                note(&format!(
                    "migration {version} gave up waiting {lock_wait:.1?} (migrations.lock_wait) for {what}; {next}"
                ));
            });
        }
        _ => {}
    });
    (migrator, bar)
}

/// A line on stderr for the person watching (not part of the output).
fn note(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = std::io::Write::write_all(&mut err, format!("{text}\n").as_bytes());
}

fn print_report(
    ctx: &Context,
    report: &Report,
    status: &Status,
    direction: &str,
) -> anyhow::Result<ExitCode> {
    let database = &ctx.config.primary.database;
    if ctx.json {
        let steps: Vec<_> = report
            .steps
            .iter()
            .map(|s| {
                json!({
                    "version": s.version,
                    "description": s.description,
                    "elapsed_ms": millis(s.elapsed),
                })
            })
            .collect();
        let json = json!({
            "database": database,
            "target": ctx.config.primary.redacted_url(),
            "direction": direction,
            (if direction == "up" { "applied" } else { "reverted" }): steps,
            "current_version": status.current_version(),
            "pending": status.in_state(MigrationState::Pending).count(),
            "lock_wait_ms": millis(report.lock_wait),
            "elapsed_ms": millis(report.elapsed),
            "environment": ctx.config.environment.as_str(),
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if direction == "up" {
        "Applied"
    } else {
        "Reverted"
    };
    let mut text = if report.steps.is_empty() {
        if direction == "up" {
            format!("Nothing to apply on `{database}`.")
        } else {
            format!("Nothing to revert on `{database}`.")
        }
    } else {
        let mut text = format!(
            "{verb} {} migration(s) on `{database}` in {:.1?}:",
            report.steps.len(),
            report.elapsed
        );
        for s in &report.steps {
            text.push_str(&format!(
                "\n  {} {} ({:.1?})",
                s.version, s.description, s.elapsed
            ));
        }
        text
    };
    text.push('\n');
    text.push_str(&summary(status));
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the plan and SQL of `operation`; changes nothing. `unconfirmed`
/// lists the guards a real run would have to get past.
fn dry_run(
    ctx: &Context,
    migrator: &Migrator,
    operation: Operation,
    unconfirmed: &[guard::Refusal],
) -> anyhow::Result<ExitCode> {
    let plan: Plan = ctx.block_on(async { Ok(migrator.plan(operation).await?) })?;
    let direction = match operation {
        Operation::Down(_) => "down",
        _ => "up",
    };
    let target = ctx.config.primary.redacted_url();
    if ctx.json {
        let json = json!({
            "dry_run": true,
            "direction": direction,
            "database": ctx.config.primary.database,
            "target": target,
            "steps": plan.steps.iter().map(|s| json!({
                "version": s.version,
                "description": s.description,
                "direction": s.direction.to_string(),
                "file": s.file,
                "no_transaction": s.no_transaction,
                "sql": s.sql,
            })).collect::<Vec<_>>(),
            "needs_confirmation": unconfirmed.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            "lint": plan.findings.iter().map(finding_json).collect::<Vec<_>>(),
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = format!(
        "-- migrate {direction} --dry-run: nothing will be changed. {} migration(s) would run on {target}.\n",
        plan.steps.len()
    );
    for r in unconfirmed {
        text.push_str(&format!(
            "-- the real run needs --confirm-destroy {} because {}\n",
            ctx.config.primary.database, r.0
        ));
    }
    text.push_str(&plan.to_string());
    out(text.trim_end())?;
    Ok(ExitCode::SUCCESS)
}

fn validate(common: &CommonArgs) -> anyhow::Result<ExitCode> {
    let (ctx, migrator) = open(common, "migrate validate")?;
    let mut validation = ctx.block_on(async { Ok(migrator.validate().await?) })?;
    let code = if validation.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    if ctx.json {
        let json = json!({
            "valid": validation.is_ok(),
            "database": ctx.config.primary.database,
            "target": ctx.config.primary.redacted_url(),
            "problems": validation.problems.iter().map(entry_json).collect::<Vec<_>>(),
            "lint": validation.findings.iter().map(finding_json).collect::<Vec<_>>(),
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(code);
    }
    let findings = std::mem::take(&mut validation.findings);
    let mut text = if validation.is_ok() {
        format!("Valid: on `{}`, {validation}.", ctx.config.primary.database)
    } else {
        format!(
            "Invalid: on `{}`, {validation}",
            ctx.config.primary.database
        )
    };
    if !findings.is_empty() {
        text.push_str(&format!(
            "\nLint: {} finding(s) in the pending migrations (warnings here; `{} migrate lint --pending` explains them):",
            findings.len(),
            crate::project::program()
        ));
        for f in &findings {
            text.push_str(&format!(
                "\n  {}:{}: {} [{}] {}",
                f.file.display(),
                f.line,
                f.severity,
                f.rule,
                f.message
            ));
        }
    }
    out(&text)?;
    Ok(code)
}

/// `migrate lint`: every file without a database, or the pending ones.
fn lint(args: &LintArgs) -> anyhow::Result<ExitCode> {
    let (ctx, dir, report) = if args.pending {
        let (ctx, migrator) = open(&args.common, "migrate lint")?;
        let dir = migrator.migrations().dir().map(ToOwned::to_owned);
        let report = ctx.block_on(async { Ok(migrator.lint().await?) })?;
        (ctx, dir, report)
    } else {
        let ctx = Context::resolve(&args.common)?;
        let dir = resolve_dir(&ctx.config.migrations.dir);
        let report = Migrations::from_dir(&dir)?.lint();
        (ctx, Some(dir), report)
    };
    let code = if report.has_errors() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    if ctx.json {
        out(&serde_json::to_string_pretty(&lint_json(
            &report,
            args.pending,
        ))?)?;
        return Ok(code);
    }
    let what = if args.pending {
        "the pending migrations"
    } else {
        "every migration"
    };
    let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
    let mut text = format!("Lint of {what} in {dir}:\n");
    if report.findings.is_empty() {
        text.push_str("  no lock hazard found\n");
    }
    text.push_str(&report.to_string());
    if !report.findings.is_empty() {
        text.push_str(
            "\nAccept a finding knowingly with a comment `-- pgstack:allow RULE` above the statement.",
        );
    }
    out(&text)?;
    Ok(code)
}

fn lint_json(report: &LintReport, pending: bool) -> serde_json::Value {
    json!({
        "pending_only": pending,
        "files": report.files,
        "errors": report.of_severity(pgstack_migrations::Severity::Error).count(),
        "warnings": report.of_severity(pgstack_migrations::Severity::Warning).count(),
        "allowed": report.allowed,
        "findings": report.findings.iter().map(finding_json).collect::<Vec<_>>(),
    })
}

fn new(args: &NewArgs) -> anyhow::Result<ExitCode> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            let common = CommonArgs {
                env: args.env.clone(),
                database_url: None,
                config: args.config.clone(),
                json: args.json,
                verbose: false,
                timeout: Duration::from_secs(120),
                dev_dir: None,
                migrations: None,
            };
            let ctx = Context::resolve(&common)?;
            resolve_dir(&ctx.config.migrations.dir)
        }
    };
    let created = pgstack_migrations::new_migration(&dir, &args.name)?;
    if args.json {
        let json = json!({
            "version": created.version,
            "up": created.up,
            "down": created.down,
        });
        out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        out(&format!(
            "Created migration {}:\n  {}\n  {}\nWrite the change in the up file and its undo in the down file.",
            created.version,
            created.up.display(),
            created.down.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn baseline(args: &VersionArgs) -> anyhow::Result<ExitCode> {
    let (ctx, migrator) = open(&args.common, "migrate baseline")?;
    let version = args.version;
    let (report, status) = ctx.block_on(async {
        let report = migrator.baseline(version).await?;
        let status = migrator.status().await?;
        Ok((report, status))
    })?;
    if ctx.json {
        let json = json!({
            "database": ctx.config.primary.database,
            "target": ctx.config.primary.redacted_url(),
            "baselined": report.baselined,
            "current_version": status.current_version(),
            "pending": status.in_state(MigrationState::Pending).count(),
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut text = if report.baselined.is_empty() {
        format!("Nothing to record: every migration up to {version} is already applied.")
    } else {
        format!(
            "Recorded {} migration(s) as applied without running them: {}.",
            report.baselined.len(),
            report
                .baselined
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    text.push('\n');
    text.push_str(&summary(&status));
    out(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn forget_failed(args: &ForgetArgs) -> anyhow::Result<ExitCode> {
    let (ctx, migrator) = open(&args.common, "migrate forget-failed")?;
    let version = args.version;
    let keep = args.keep_invalid_indexes;
    let (removed, dropped) = ctx.block_on(async {
        if keep {
            Ok((migrator.forget_failed(version).await?, Vec::new()))
        } else {
            let repair = migrator.repair_failed(version).await?;
            Ok((repair.removed, repair.dropped_indexes))
        }
    })?;
    let dropped: Vec<String> = dropped.iter().map(InvalidIndex::qualified_name).collect();
    if ctx.json {
        let json = json!({
            "database": ctx.config.primary.database,
            "target": ctx.config.primary.redacted_url(),
            "version": version,
            "removed": removed,
            "dropped_indexes": dropped,
        });
        out(&serde_json::to_string_pretty(&json)?)?;
    } else if removed {
        let mut text = String::new();
        for index in &dropped {
            text.push_str(&format!(
                "Dropped the INVALID index {index} that migration {version} left.\n"
            ));
        }
        text.push_str(&format!(
            "Removed the failed mark of migration {version}; `{} migrate up` runs it again.",
            crate::project::program()
        ));
        out(&text)?;
    } else {
        note(&format!(
            "error: migration {version} has no failed mark in `{}`; nothing was changed (`{} migrate status` shows which one failed)",
            ctx.config.primary.database,
            crate::project::program()
        ));
    }
    Ok(if removed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_keep_three_decimals() {
        assert_eq!(millis(Duration::from_micros(1500)), 1.5);
        assert_eq!(millis(Duration::from_nanos(1_234_567)), 1.235);
    }
}
