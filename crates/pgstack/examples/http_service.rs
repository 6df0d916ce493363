//! A small HTTP service on pgstack and axum:
//!
//! - `GET /healthz`: the health report as JSON; HTTP 200 when healthy or
//!   degraded (keep sending traffic), 503 when unhealthy (primary down,
//!   starting, shutting down);
//! - `GET /metrics`: every `pgstack_*` series in the Prometheus text format
//!   (metrics-exporter-prometheus);
//! - `GET /now`: the database's clock, read from a replica when there is one.
//!
//! ```sh
//! export DATABASE_URL=postgres://app:secret@localhost/app   # or: cargo xtask db-up
//! cargo run -p pgstack --example http_service -- 127.0.0.1:3000
//! curl -i localhost:3000/healthz
//! ```
//!
//! SIGTERM or Ctrl-C stops taking requests, then shuts the database layer
//! down with a 10 s deadline.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pgstack::prelude::*;

/// What the handlers share: the database handle and the Prometheus recorder.
#[derive(Clone)]
pub struct AppState {
    db: Database,
    prometheus: PrometheusHandle,
}

/// The service's routes.
pub fn router(db: Database, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/now", get(now))
        .with_state(AppState { db, prometheus })
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
    match state
        .db
        .query_one("http-now", Route::Read, "SELECT now()::text", &[])
        .await
    {
        Ok(row) => row.get::<_, String>(0).into_response(),
        Err(Error::ShuttingDown { .. }) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Err(error) => {
            tracing::warn!(%error, "GET /now failed");
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
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
