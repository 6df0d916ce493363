//! The shortest useful pgstack program.
//!
//! ```sh
//! export DATABASE_URL=postgres://app:secret@localhost/app   # or: cargo xtask db-up
//! cargo run -p pgstack --example quickstart
//! ```
#![allow(clippy::print_stdout)]

use std::time::Duration;

use futures_util::TryStreamExt;
use pgstack::prelude::*;

/// A note, read from a row by column name.
#[derive(Debug, FromRow)]
struct Note {
    id: i64,
    body: String,
}

/// A declared statement: name, route and text said once.
const SHOW_NOTE: Statement = Statement::read(
    "show-note",
    "SELECT id, body FROM quickstart_notes WHERE id = $1",
);

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

    // Reads go to a replica when there is one, writes to the primary. The
    // operation's name labels logs, spans and metrics.
    db.on("create-notes", Route::Write)
        .execute(
            "CREATE TABLE IF NOT EXISTS quickstart_notes (id bigserial PRIMARY KEY, body text NOT NULL)",
            &[],
        )
        .await?;

    // Committed on Ok, rolled back on Err; retried whole on serialization
    // failures. The closure's error type is the service's own (anything
    // with `From<pgstack::Error>`; here anyhow's).
    let id: i64 = db
        .transaction("add-note", async |tx| -> anyhow::Result<i64> {
            let note: Note = tx
                .query_one_as(
                    "INSERT INTO quickstart_notes (body) VALUES ($1) RETURNING id, body",
                    &[&"hello from pgstack"],
                )
                .await?;
            anyhow::ensure!(!note.body.is_empty(), "an empty note");
            Ok(note.id)
        })
        .await?;

    // Read your own write, even from a replica that lags; the row read by
    // column name into a struct (a mismatch is an error naming the column
    // and both types, never a panic).
    let position = db.wal_position("after-add-note").await?;
    let note: Note = db
        .run(&SHOW_NOTE)
        .route(Route::ReadAfter(position))
        .query_one_as(&[&id])
        .await?;
    println!("note {}: {}", note.id, note.body);

    // Large results as a stream, read as they arrive.
    let mut notes = db
        .on("all-notes", Route::Read)
        .query_stream("SELECT id, body FROM quickstart_notes", &[])
        .await?;
    let mut count = 0;
    while let Some(_row) = notes.try_next().await? {
        count += 1;
    }
    drop(notes);
    println!("{count} notes in all");

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
