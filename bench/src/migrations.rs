//! Case 6: applying 1,000 small generated migrations to an empty database:
//! pgstack-migrations, sqlx's migrator called directly, and `psql -f` of the
//! concatenated files (no bookkeeping at all: the floor).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::report::{Better, Entry, Medians};
use crate::{Ctx, say};

const PGSTACK: &str = "pgstack";
const SQLX: &str = "sqlx";
const PSQL: &str = "psql";

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    let count: usize = if ctx.quick { 200 } else { 1000 };
    say(format!("case 6: {count} migrations"));
    let dir = tempfile::Builder::new()
        .prefix("pgstack-bench-migrations-")
        .tempdir()?;
    // psql runs as the server's user when this runs as root: it must read the file.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let all_sql = generate(dir.path(), count)?;
    let script = dir.path().join("all.sql");
    std::fs::write(&script, all_sql)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644))?;
    let migrations_dir = dir.path().join("migrations");

    let admin = ctx.cluster.client("postgres").await?;
    let mut results: Vec<(&str, Medians)> = [PGSTACK, SQLX, PSQL]
        .into_iter()
        .map(|t| (t, Medians::default()))
        .collect();
    for rep in 0..ctx.repeats {
        for (tool, m) in &mut results {
            let db = format!("mig_{}_{rep}", tool.replace('-', "_"));
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await?;
            let url = ctx.cluster.url(&db);
            let elapsed = match *tool {
                PGSTACK => pgstack_up(&migrations_dir, &url).await?,
                SQLX => sqlx_up(&migrations_dir, &url).await?,
                _ => psql(ctx, &script, &db).await?,
            };
            let tables: i64 = ctx
                .cluster
                .client(&db)
                .await?
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_m%'",
                    &[],
                )
                .await?
                .get(0);
            anyhow::ensure!(
                tables == count as i64,
                "{tool} left {tables} of {count} tables in {db}"
            );
            admin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await?;
            m.push("seconds", 3, elapsed.as_secs_f64());
            m.push("per_s", 0, count as f64 / elapsed.as_secs_f64());
        }
    }
    let mut entry = Entry::new("6. migrations")
        .param("migrations", count as u64)
        .column("seconds", "seconds")
        .column("per_s", "migrations/s")
        .column("bookkeeping", "bookkeeping")
        .headline("seconds", Better::Lower);
    for (tool, mut m) in results {
        m.set(
            "bookkeeping",
            match tool {
                PGSTACK => "lock, table, checksums, one transaction per migration",
                SQLX => "lock, table, checksums, one transaction per migration",
                _ => "none (autocommit statements)",
            },
        );
        entry.result(tool, m.into_map());
    }
    entry.note(format!(
        "Each migration is `CREATE TABLE bench_mNNNN (id bigint PRIMARY KEY, note text)` in \
         sqlx's reversible format; every run starts from an empty database. pgstack: \
         `Migrator::up(UpTarget::Latest)`; sqlx: `sqlx::migrate::Migrator::new(dir).run(&pool)`; \
         psql: `psql -X -q -v ON_ERROR_STOP=1 -f` of the {count} up files concatenated."
    ));
    Ok(vec![entry])
}

/// Writes `count` migrations (up and down) under `dir/migrations`; returns
/// the up files concatenated.
fn generate(dir: &Path, count: usize) -> anyhow::Result<String> {
    let out = dir.join("migrations");
    std::fs::create_dir_all(&out)?;
    let mut all = String::new();
    for i in 1..=count {
        let up = format!(
            "-- Generated migration {i}.\nCREATE TABLE bench_m{i:04} (id bigint PRIMARY KEY, note text);\n"
        );
        std::fs::write(out.join(format!("{i:04}_table_{i:04}.up.sql")), &up)?;
        std::fs::write(
            out.join(format!("{i:04}_table_{i:04}.down.sql")),
            format!("DROP TABLE bench_m{i:04};\n"),
        )?;
        all.push_str(&up);
    }
    Ok(all)
}

async fn pgstack_up(dir: &Path, url: &str) -> anyhow::Result<Duration> {
    let node = pgstack::config::NodeSettings::from_url(url)?;
    let migrations = pgstack_migrations::Migrations::from_dir(dir)?;
    let migrator = pgstack_migrations::Migrator::new(migrations, &node);
    let started = Instant::now();
    migrator
        .up(pgstack_migrations::UpTarget::Latest)
        .await
        .context("pgstack-migrations up")?;
    Ok(started.elapsed())
}

async fn sqlx_up(dir: &Path, url: &str) -> anyhow::Result<Duration> {
    let migrator = sqlx::migrate::Migrator::new(dir).await?;
    // Timed from the connection on, as pgstack's `up` is.
    let started = Instant::now();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    migrator.run(&pool).await.context("sqlx migrate run")?;
    let elapsed = started.elapsed();
    pool.close().await;
    Ok(elapsed)
}

async fn psql(ctx: &Ctx, script: &Path, db: &str) -> anyhow::Result<Duration> {
    let mut command = ctx.cluster.binaries().command("psql");
    command
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(ctx.cluster.host())
        .arg("-p")
        .arg(ctx.cluster.port().to_string())
        .args(["-U", "postgres", "-d", db, "-f"])
        .arg(script);
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(elapsed)
}
