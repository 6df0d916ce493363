//! A tour of pgstack's API on a throwaway server of the test kit: typed
//! rows through a declared statement, a stream of 100,000 rows, a
//! transaction with the service's own error type, LISTEN across a server
//! restart (the gap reported), COPY of 1,000,000 rows, and every call's
//! span exported through OpenTelemetry (to stdout, with the database
//! conventions: `db.system.name`, `db.operation.name`, `server.address`, …).
//!
//! ```sh
//! cargo run -p pgstack --example tour
//! ```
//!
//! The same parts are asserted by `crates/pgstack/tests/tour_parts.rs`.
#![allow(clippy::print_stdout)]

#[path = "../tests/tour/mod.rs"]
mod tour;

use std::time::Duration;

use pgstack::Database;
use pgstack_tests::{TestCluster, TestDb};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (provider, subscriber) =
        tour::otel_subscriber(opentelemetry_stdout::SpanExporter::default());
    tracing::subscriber::set_global_default(subscriber)?;

    // A server of its own, so that the tour can restart it.
    let server = TestCluster::start().await?;
    let tdb = TestDb::on(&server).await?;
    let db = Database::builder()
        .env_source([("APP_ENV", "development"), ("DATABASE_URL", tdb.url())])
        .set("migrations.auto_migrate", false)
        .connect()
        .await?;

    let bills = tour::typed_rows(&db).await?;
    println!("typed rows: {bills:?}");

    let (count, sum) = tour::stream_rows(&db, 100_000).await?;
    println!("streamed {count} rows (sum of ids {sum})");

    tour::pay(&db, 1)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    match tour::pay(&db, 1).await {
        Err(tour::AppError::AlreadyPaid(id)) => {
            println!("paying bill {id} twice: AlreadyPaid, rolled back")
        }
        other => anyhow::bail!("expected AlreadyPaid, got {other:?}"),
    }

    let seen = tour::listen_across_restart(&db, "tour events", server.restart()).await?;
    println!(
        "after the restart: {:?} (the listener was down for {:?} and said so)",
        seen.received.payload, seen.down_for
    );

    let figures = tour::copy_rows(&db, "tour_rows", 1_000_000).await?;
    println!(
        "COPY: {} rows in {:?} ({:.0} rows/s); {} lines back in {:?}",
        figures.rows,
        figures.copy_in,
        figures.rows_per_second(),
        figures.lines_out,
        figures.copy_out
    );

    db.shutdown(Duration::from_secs(5)).await;
    provider.force_flush()?;
    provider.shutdown()?;
    Ok(())
}
