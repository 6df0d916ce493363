//! pgstack's spans exported through OpenTelemetry (here to stdout), with the
//! stable database conventions: `db.system.name`, `db.namespace`,
//! `db.operation.name`, `db.query.text` (off in production:
//! `telemetry.query_text`), `db.response.status_code`, `server.address`,
//! `server.port`, `error.type`. Swap `opentelemetry_stdout::SpanExporter` for
//! an OTLP exporter to send them to a collector.
//!
//! ```sh
//! export DATABASE_URL=postgres://app:secret@localhost/app   # or: cargo xtask db-up
//! cargo run -p pgstack --example otel_spans
//! ```
#![allow(clippy::print_stdout)]

#[path = "../tests/tour/mod.rs"]
mod tour;

use std::time::Duration;

use pgstack::Database;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (provider, subscriber) =
        tour::otel_subscriber(opentelemetry_stdout::SpanExporter::default());
    tracing::subscriber::set_global_default(subscriber)?;

    let db = Database::builder()
        .wait_for_database(Duration::from_secs(30))
        .connect()
        .await?;
    // One statement that succeeds, one that fails with SQLSTATE 22012: each
    // span is printed as it ends.
    tour::traced_statements(&db, "otel-double", "otel-divide").await?;
    db.shutdown(Duration::from_secs(5)).await;
    provider.force_flush()?;
    provider.shutdown()?;
    Ok(())
}
