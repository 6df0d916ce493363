//! `pgstack db-reset`: drop and recreate the application database, apply
//! the migrations, record the environment, optionally load a seed file.
//!
//! Guarded as mature tools guard it: it refuses when the environment is
//! production, when the host is not local, or when the database records
//! (in `pgstack_metadata`) that it is a production database — unless
//! `--confirm-destroy DATABASE` names the database. Refusals change nothing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use pgstack_config::{DatabaseConfig, Environment};
use pgstack_migrations::{Event, Migrations, Migrator, UpTarget};
use pgstack_pool::Pool;

use crate::context::{CommonArgs, Context, Target, resolve_dir};
use crate::guard::{self, DB_RESET, Refusal, admin_pool, database_exists, quote_ident};

/// Arguments of `pgstack db-reset`.
#[derive(Debug, clap::Args)]
pub struct DbResetArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// SQL file to load after migrating, in one transaction.
    #[arg(long, value_name = "FILE")]
    seed: Option<PathBuf>,
    /// Print what would happen and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Reset even a production or non-local database; give its name to confirm.
    #[arg(long, value_name = "DATABASE")]
    confirm_destroy: Option<String>,
}

/// Databases that are never reset: the server needs them.
pub(crate) const MAINTENANCE_DATABASES: [&str; 3] = ["postgres", "template0", "template1"];

pub(crate) fn run(args: DbResetArgs) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::resolve(&args.common)?;
    if let Some(seed) = &args.seed
        && !seed.is_file()
    {
        anyhow::bail!(
            "seed file {} does not exist; give a path to a .sql file",
            seed.display()
        );
    }

    // Guards that need no server: nothing is started or touched before they pass.
    let confirmed = guard::confirmation(
        args.confirm_destroy.as_deref(),
        guard::database_name(&ctx),
        DB_RESET,
    )?;
    if MAINTENANCE_DATABASES.contains(&ctx.config.primary.database.as_str())
        && ctx.target == Target::Configured
    {
        anyhow::bail!(
            "refusing to reset the `{}` database: the server itself needs it; point --database-url or DATABASE_URL at an application database",
            ctx.config.primary.database
        );
    }
    let mut refusals = guard::static_refusals(&ctx, DB_RESET);
    if !refusals.is_empty() && !confirmed {
        return guard::refuse(DB_RESET, guard::database_name(&ctx), &refusals);
    }

    ctx.ensure_dev()?;
    let migrations_dir = resolve_dir(&ctx.config.migrations.dir);
    let migrations = Migrations::from_dir(&migrations_dir)?;
    let config = ctx.config.clone();
    let seed = args.seed.clone();
    let dry_run = args.dry_run;

    let target = config.primary.redacted_url();
    let progress = crate::progress::bar(ctx.json || dry_run, migrations.len() as u64, "migrating");
    let bar = progress.clone();
    let started = Instant::now();
    let plan_migrations = migrations.clone();
    let outcome = ctx.block_on(async {
        let admin = admin_pool(&config, "db-reset")?;
        let result = async {
            let exists = database_exists(&admin, &config.primary.database).await?;
            let recorded = if exists {
                recorded_environment(&config, &migrations).await?
            } else {
                None
            };
            if recorded == Some(Environment::Production) {
                refusals.push(guard::marked_production(&config.primary.database));
            }
            if !refusals.is_empty() && !confirmed {
                return Ok(Outcome::Refused);
            }
            if dry_run {
                return Ok(Outcome::Planned { exists });
            }
            recreate(&admin, &config.primary.database).await?;
            Ok(Outcome::Recreated)
        }
        .await;
        admin.close();
        if !matches!(result, Ok(Outcome::Recreated)) {
            return result;
        }
        let migrator = Migrator::new(migrations, &config.primary)
            .tls(&config.tls)
            .with_settings(&config.migrations)
            .application_name(&format!("{} db-reset", config.query.application_name))
            .with_environment(config.environment)
            .on_progress(move |event| match event {
                Event::Applying {
                    version,
                    description,
                    ..
                } => {
                    bar.set_message(format!("{version} {description}"));
                }
                Event::Applied { .. } => bar.inc(1),
                _ => {}
            });
        let report = migrator.up(UpTarget::Latest).await?;
        if let Some(seed) = &seed {
            load_seed(&config, seed).await?;
        }
        Ok(Outcome::Migrated(report))
    });
    progress.finish_and_clear();
    let report = match outcome? {
        Outcome::Refused => return guard::refuse(DB_RESET, guard::database_name(&ctx), &refusals),
        Outcome::Planned { exists } => {
            print_plan(
                &ctx,
                &config,
                &target,
                exists,
                &refusals,
                &plan_migrations,
                &migrations_dir,
                seed.as_deref(),
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Outcome::Migrated(report) => report,
        Outcome::Recreated => {
            anyhow::bail!("the reset stopped after recreating the database; run it again")
        }
    };

    if ctx.json {
        let json = serde_json::json!({
            "database": config.primary.database,
            "target": target,
            "applied": report.steps.iter().map(|s| s.version).collect::<Vec<_>>(),
            "environment": config.environment.as_str(),
            "seed": seed,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        });
        crate::db::out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        let mut text = format!(
            "Reset `{}`: applied {} migration(s){} in {:.1?}; environment `{}` recorded.",
            config.primary.database,
            report.steps.len(),
            if seed.is_some() {
                " and loaded the seed"
            } else {
                ""
            },
            started.elapsed(),
            config.environment
        );
        if ctx.verbose {
            for step in &report.steps {
                text.push_str(&format!(
                    "\n  {} {} ({:.1?})",
                    step.version, step.description, step.elapsed
                ));
            }
        }
        if matches!(ctx.target, Target::Dev { .. }) {
            text.push_str(&format!("\n\nexport DATABASE_URL={target}"));
        }
        crate::db::out(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// How the server part of a reset ended.
enum Outcome {
    /// A guard that needs the server refused.
    Refused,
    /// `--dry-run`: nothing was changed.
    Planned { exists: bool },
    /// The database was recreated (an intermediate state).
    Recreated,
    /// Recreated and migrated.
    Migrated(pgstack_migrations::Report),
}

#[allow(clippy::too_many_arguments)]
fn print_plan(
    ctx: &Context,
    config: &DatabaseConfig,
    target: &str,
    exists: bool,
    refusals: &[Refusal],
    migrations: &Migrations,
    migrations_dir: &Path,
    seed: Option<&Path>,
) -> anyhow::Result<()> {
    if ctx.json {
        let json = serde_json::json!({
            "dry_run": true,
            "database": config.primary.database,
            "target": target,
            "exists": exists,
            "migrations": migrations.iter().map(|m| m.version()).collect::<Vec<_>>(),
            "environment": config.environment.as_str(),
            "seed": seed,
        });
        return crate::db::out(&serde_json::to_string_pretty(&json)?);
    }
    let db = &config.primary.database;
    let mut plan = vec![format!(
        "db-reset --dry-run: nothing will be changed. The plan for {target}:"
    )];
    for r in refusals {
        plan.push(format!(
            "  - confirmed with --confirm-destroy although {}",
            r.0
        ));
    }
    plan.push(if exists {
        format!("  1. drop the database `{db}` (disconnecting its sessions)")
    } else {
        format!("  1. (the database `{db}` does not exist yet)")
    });
    plan.push(format!("  2. create the database `{db}`"));
    plan.push(format!(
        "  3. apply {} migration(s) from {}:",
        migrations.len(),
        migrations_dir.display()
    ));
    for m in migrations.iter() {
        plan.push(format!("       {} {}", m.version(), m.description()));
    }
    plan.push(format!(
        "  4. record environment `{}` in pgstack_metadata",
        config.environment
    ));
    if let Some(seed) = seed {
        plan.push(format!("  5. load {} in one transaction", seed.display()));
    }
    crate::db::out(&plan.join("\n"))
}

async fn recorded_environment(
    config: &DatabaseConfig,
    migrations: &Migrations,
) -> anyhow::Result<Option<Environment>> {
    let reader = Migrator::new(migrations.clone(), &config.primary).tls(&config.tls);
    reader
        .recorded_environment()
        .await
        .context("reading the environment recorded in pgstack_metadata")
}

async fn recreate(admin: &Pool, name: &str) -> anyhow::Result<()> {
    let conn = guard::checkout(admin, "db-reset: recreate database").await?;
    let ident = quote_ident(name);
    conn.batch_execute(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping the database `{name}`"))?;
    conn.batch_execute(&format!("CREATE DATABASE {ident}"))
        .await
        .with_context(|| format!("creating the database `{name}` (the role needs CREATEDB)"))?;
    Ok(())
}

async fn load_seed(config: &DatabaseConfig, seed: &Path) -> anyhow::Result<()> {
    let sql = std::fs::read_to_string(seed)
        .with_context(|| format!("reading the seed file {}", seed.display()))?;
    let pool = guard::pool_on(config, config.primary.clone(), "db-reset seed")?;
    let mut conn = guard::checkout(&pool, "db-reset: seed").await?;
    let tx = conn.transaction().await?;
    tx.batch_execute(&sql)
        .await
        .with_context(|| format!("loading the seed file {} (rolled back)", seed.display()))?;
    tx.commit().await?;
    drop(conn);
    pool.close();
    Ok(())
}
