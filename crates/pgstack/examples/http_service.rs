//! A small HTTP service on pgstack and axum:
//!
//! - `GET /healthz`: the health report as JSON; HTTP 200 when healthy or
//!   degraded (keep sending traffic), 503 when unhealthy (primary down,
//!   starting, shutting down);
//! - `GET /metrics`: every `pgstack_*` series in the Prometheus text format
//!   (metrics-exporter-prometheus);
//! - `GET /now`: the database's clock, read from a replica when there is one;
//! - `POST /notes` (body: the note) and `GET /notes/count`: read-your-writes
//!   across requests and services. The write answers with a
//!   `pgstack-read-after` header (`pgstack-lsn:16/B374D848`, the WAL position
//!   of its commit); a read that sends it back is served by a replica that has
//!   replayed the write (waiting up to `query.read_after_wait` for one), else
//!   by the primary, so it never misses the note. Another service receiving
//!   the header does the same.
//!
//! ```sh
//! export DATABASE_URL=postgres://app:secret@localhost/app   # or: cargo xtask db-up
//! cargo run -p pgstack --example http_service -- 127.0.0.1:3000
//! curl -i localhost:3000/healthz
//! lsn=$(curl -si -d 'hello' localhost:3000/notes | grep -i pgstack-read-after | cut -d' ' -f2)
//! curl -H "pgstack-read-after: $lsn" localhost:3000/notes/count
//! ```
//!
//! SIGTERM or Ctrl-C stops taking requests, then shuts the database layer
//! down with a 10 s deadline.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pgstack::prelude::*;

/// What the handlers share: the database handle and the Prometheus recorder.
#[derive(Clone)]
pub struct AppState {
    db: Database,
    prometheus: PrometheusHandle,
}

/// The header that carries a write's WAL position to later reads.
pub const READ_AFTER_HEADER: &str = "pgstack-read-after";

/// The service's routes.
pub fn router(db: Database, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/now", get(now))
        .route("/notes", post(add_note))
        .route("/notes/count", get(count_notes))
        .with_state(AppState { db, prometheus })
}

/// The example's statements: name, route and text said once.
const CREATE_NOTES: Statement = Statement::write(
    "create-notes",
    "CREATE TABLE IF NOT EXISTS example_notes (id bigserial PRIMARY KEY, body text NOT NULL)",
);
const ADD_NOTE: &str = "INSERT INTO example_notes (body) VALUES ($1)";
const COUNT_NOTES: Statement = Statement::read(
    "count-notes",
    "SELECT count(*) AS count, pg_is_in_recovery() AS from_replica FROM example_notes",
);
const NOW: Statement = Statement::read("http-now", "SELECT now()::text AS now");

/// The answer of `GET /notes/count`, read by column name: a column of
/// another type is an `Error::RowMapping` naming it, never a panic.
#[derive(FromRow, serde::Serialize)]
struct NoteCount {
    count: i64,
    from_replica: bool,
}

#[derive(FromRow)]
struct Now {
    now: String,
}

/// The example's table (a real service would have it in a migration).
pub async fn create_schema(db: &Database) -> Result<(), Error> {
    db.run(&CREATE_NOTES).execute(&[]).await.map(|_| ())
}

/// An error as a response: 503 while shutting down, 500 otherwise.
fn failed(what: &str, error: &Error) -> Response {
    if matches!(error, Error::ShuttingDown { .. }) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    tracing::warn!(%error, "{what} failed");
    (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
}

/// `POST /notes`: stores the note; the `pgstack-read-after` header of the
/// answer lets any later read see it.
async fn add_note(State(state): State<AppState>, body: String) -> Response {
    let written = state
        .db
        .execute_tracked("add-note", ADD_NOTE, &[&body])
        .await;
    match written {
        Ok((_, position)) => (
            StatusCode::CREATED,
            [(READ_AFTER_HEADER, position.to_token())],
        )
            .into_response(),
        Err(error) => failed("POST /notes", &error),
    }
}

/// `GET /notes/count`: `{"count": n, "from_replica": bool}`. With a
/// `pgstack-read-after` header, the count includes that write.
async fn count_notes(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let route = match headers.get(READ_AFTER_HEADER).map(|v| v.to_str()) {
        None => Route::Read,
        Some(Ok(token)) => match WalPosition::from_token(token) {
            Ok(position) => Route::ReadAfter(position),
            Err(error) => return (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
        },
        Some(Err(_)) => {
            return (StatusCode::BAD_REQUEST, "the header is not text").into_response();
        }
    };
    let counted = state
        .db
        .run(&COUNT_NOTES)
        .route(route)
        .query_one_as::<NoteCount>(&[])
        .await;
    match counted {
        Ok(count) => Json(count).into_response(),
        Err(error) => failed("GET /notes/count", &error),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.db.health().await;
    let code = if health.is_serving() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(health)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

async fn now(State(state): State<AppState>) -> Response {
    match state.db.run(&NOW).query_one_as::<Now>(&[]).await {
        Ok(Now { now }) => now.into_response(),
        Err(error) => failed("GET /now", &error),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());

    // Install the recorder first: the pools publish figures as they start.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let db = Database::builder()
        .wait_for_database(Duration::from_secs(30))
        .connect()
        .await?;
    create_schema(&db).await?;

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(db.clone(), prometheus))
        .with_graceful_shutdown(pgstack::shutdown_signal())
        .await?;

    let report = db.shutdown(Duration::from_secs(10)).await;
    println!(
        "database shut down: {} calls completed, {} cut off",
        report.completed, report.cut_off
    );
    Ok(())
}
