//! Helpers shared by the migration tests.

#![allow(dead_code, unreachable_pub, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgstack_config::NodeSettings;
use pgstack_migrations::{Migrations, Migrator};
use pgstack_tests::{PgBinaries, TestDb};

/// The reference schema at the top of the workspace.
pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations")
}

/// The test database as pgstack settings.
pub fn node(db: &TestDb) -> NodeSettings {
    NodeSettings::from_url(db.url()).expect("the kit's URL parses")
}

/// A migrator over the folder `dir` on `db`.
pub fn migrator(dir: &Path, db: &TestDb) -> Migrator {
    Migrator::new(Migrations::from_dir(dir).expect("folder loads"), &node(db))
}

/// Writes `(name, contents)` files into `dir`.
pub fn write(dir: &Path, files: &[(&str, &str)]) {
    for (name, sql) in files {
        std::fs::write(dir.join(name), sql).expect("write migration file");
    }
}

/// The applied versions, in order, read with tokio-postgres.
pub async fn applied_versions(db: &TestDb) -> anyhow::Result<Vec<i64>> {
    let client = db.client().await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('_sqlx_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query("SELECT version FROM _sqlx_migrations ORDER BY version", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Whether a relation (table, index, type…) exists.
pub async fn exists(db: &TestDb, name: &str) -> anyhow::Result<bool> {
    let client = db.client().await?;
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
        .await?
        .get(0))
}

/// `pg_dump --schema-only` of the test database, with the lines that change
/// from run to run (the `\restrict` keys of newer pg_dump) left out.
pub async fn schema_dump(db: &TestDb) -> anyhow::Result<String> {
    let url = db.url().to_owned();
    let output = tokio::task::spawn_blocking(move || -> anyhow::Result<std::process::Output> {
        let bins = PgBinaries::find()?;
        Ok(bins
            .command("pg_dump")
            .args([
                "--schema-only",
                "--no-owner",
                "--no-privileges",
                "--dbname",
                &url,
            ])
            .output()?)
    })
    .await??;
    anyhow::ensure!(
        output.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n"))
}
