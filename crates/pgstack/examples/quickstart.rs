//! The shortest useful pgstack program.
//!
//! ```sh
//! export DATABASE_URL=postgres://app:secret@localhost/app   # or: cargo xtask db-up
//! cargo run -p pgstack --example quickstart
//! ```
#![allow(clippy::print_stdout)]

use std::time::Duration;

use pgstack::prelude::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    // DATABASE_URL (or DB_HOST, ...), APP_ENV and pgstack.toml; wait up to
    // 30 s for the database, e.g. when it starts next to this process.
    let db = Database::builder()
        .wait_for_database(Duration::from_secs(30))
        .connect()
        .await?;

    // Reads go to a replica when there is one, writes to the primary.
    db.execute(
        "create-notes",
        Route::Write,
        "CREATE TABLE IF NOT EXISTS quickstart_notes (id bigserial PRIMARY KEY, body text NOT NULL)",
        &[],
    )
    .await?;

    // Committed on Ok, rolled back on Err; retried whole on serialization
    // failures.
    let id: i64 = db
        .transaction("add-note", async |tx| {
            let row = tx
                .query_one(
                    "INSERT INTO quickstart_notes (body) VALUES ($1) RETURNING id",
                    &[&"hello from pgstack"],
                )
                .await?;
            Ok::<_, pgstack::Error>(row.get(0))
        })
        .await?;

    // Read your own write, even from a replica that lags.
    let position = db.wal_position("after-add-note").await?;
    let body: String = db
        .query_one(
            "show-note",
            Route::ReadAfter(position),
            "SELECT body FROM quickstart_notes WHERE id = $1",
            &[&id],
        )
        .await?
        .get(0);
    println!("note {id}: {body}");

    // Status and metrics, as a status page would show them.
    println!("{}", serde_json::to_string_pretty(&db.status().await)?);
    println!("{}", serde_json::to_string_pretty(&db.metrics())?);

    let report = db.shutdown(Duration::from_secs(5)).await;
    println!(
        "shut down: {} completed, {} cut off",
        report.completed, report.cut_off
    );
    Ok(())
}
