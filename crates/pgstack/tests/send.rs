//! Every call shape of the facade compiles inside `tokio::spawn` and an axum
//! handler: the futures are `Send`. Nothing here runs; the test is that it
//! builds (`cargo test -p pgstack --test send`).
#![allow(dead_code, clippy::unwrap_used)]

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use futures_util::TryStreamExt;
use pgstack::prelude::*;

#[derive(FromRow)]
struct Bill {
    id: i64,
    note: Option<String>,
}

const BILL: Statement = Statement::read("bill", "SELECT id, note FROM bills WHERE id = $1");
const TOUCH: Statement =
    Statement::write("touch", "UPDATE bills SET note = $2 WHERE id = $1").idempotent();

#[derive(Debug)]
enum AppError {
    Db(Error),
    NotFound,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Db(e)
    }
}

impl axum::response::IntoResponse for AppError {
    fn into_response(self) -> axum::response::Response {
        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

/// Each call moved into `tokio::spawn`.
fn spawned(db: Database) {
    let d = db.clone();
    tokio::spawn(async move { d.on("q", Route::Read).query("SELECT 1", &[]).await });
    let d = db.clone();
    tokio::spawn(async move { d.on("q", Route::Read).query_one("SELECT 1", &[]).await });
    let d = db.clone();
    tokio::spawn(async move { d.on("q", Route::Read).query_opt("SELECT 1", &[]).await });
    let d = db.clone();
    tokio::spawn(async move { d.on("q", Route::Write).execute("SELECT 1", &[]).await });
    let d = db.clone();
    tokio::spawn(async move {
        let id = 7_i64;
        let bills: Vec<Bill> = d
            .on("q", Route::Read)
            .query_as("SELECT id, note FROM bills WHERE id = $1", &[&id])
            .await?;
        Ok::<_, Error>(bills.len())
    });
    let d = db.clone();
    tokio::spawn(async move {
        d.on("q", Route::Read)
            .query_one_as::<Bill>("SELECT 1 AS id, NULL::text AS note", &[])
            .await
    });
    let d = db.clone();
    tokio::spawn(async move {
        d.on("q", Route::Read)
            .query_opt_as::<Bill>("SELECT 1 AS id, NULL::text AS note", &[])
            .await
    });
    let d = db.clone();
    tokio::spawn(async move {
        let on = d.on("stream", Route::Read);
        let mut rows = on
            .query_stream("SELECT generate_series(1, 10)", &[])
            .await?;
        let mut n = 0;
        while let Some(_row) = rows.try_next().await? {
            n += 1;
        }
        Ok::<_, Error>(n)
    });
    let d = db.clone();
    tokio::spawn(async move {
        let id = 7_i64;
        let bill: Option<Bill> = d.run(&BILL).query_opt_as(&[&id]).await?;
        d.run(&TOUCH).execute(&[&id, &"seen"]).await?;
        Ok::<_, Error>(bill.map(|b| b.id))
    });
    let d = db.clone();
    tokio::spawn(async move {
        d.query("old-form", Route::Read, "SELECT 1", &[]).await?;
        d.query_one("old-form", Route::Read, "SELECT 1", &[])
            .await?;
        d.query_opt("old-form", Route::Read, "SELECT 1", &[])
            .await?;
        d.execute("old-form", Route::Write, "SELECT 1", &[]).await
    });
    // A transaction whose closure borrows the task's values.
    let d = db.clone();
    tokio::spawn(async move {
        let id = 7_i64;
        let note = String::from("paid");
        d.transaction("pay", async move |tx| {
            tx.execute(&TOUCH, &[&id, &note]).await?;
            let bill: Bill = tx.query_one_as(&BILL, &[&id]).await?;
            let mut rows = tx.query_stream("SELECT id FROM bills", &[]).await?;
            while rows.try_next().await?.is_some() {}
            Ok::<_, Error>(bill.id)
        })
        .await
    });
    // The caller's own error type.
    let d = db.clone();
    tokio::spawn(async move {
        let id = 7_i64;
        d.transaction("pay", async move |tx| -> Result<i64, AppError> {
            let bill: Option<Bill> = tx.query_opt_as(&BILL, &[&id]).await?;
            let bill = bill.ok_or(AppError::NotFound)?;
            Ok(bill.id)
        })
        .await
    });
    let d = db.clone();
    tokio::spawn(async move {
        d.transaction_with(
            "report",
            TransactionOptions::new().read_only(true),
            async move |tx| tx.query("SELECT 1", &[]).await,
        )
        .await
    });
    let d = db.clone();
    tokio::spawn(async move {
        d.read("count", async |conn| {
            let n: i64 = conn
                .query_one("SELECT count(*) FROM bills", &[])
                .await?
                .get(0);
            Ok(n)
        })
        .await
    });
    let d = db.clone();
    tokio::spawn(async move {
        let conn = d.connection("raw", Route::Read).await?;
        let mut rows = conn.query_stream("SELECT 1", &[]).await?;
        while rows.try_next().await?.is_some() {}
        Ok::<_, Error>(())
    });
    let d = db;
    tokio::spawn(async move { d.execute_tracked("w", "SELECT 1", &[]).await });
}

/// The same shapes in axum handlers (which must be `Send`).
async fn bill(State(db): State<Database>, Path(id): Path<i64>) -> Result<String, AppError> {
    let bill: Option<Bill> = db.run(&BILL).query_opt_as(&[&id]).await?;
    let bill = bill.ok_or(AppError::NotFound)?;
    Ok(format!("{}: {}", bill.id, bill.note.unwrap_or_default()))
}

async fn pay(State(db): State<Database>, Path(id): Path<i64>) -> Result<String, AppError> {
    let note = String::from("paid");
    // `async move`: a closure that borrows the handler's locals (`async |tx|`)
    // makes a future the compiler cannot yet show to be `Send` for every
    // lifetime of `tx` ("implementation of `Send` is not general enough").
    let paid = db
        .transaction("pay", async move |tx| -> Result<u64, AppError> {
            let n = tx.execute(&TOUCH, &[&id, &note]).await?;
            if n == 0 {
                return Err(AppError::NotFound);
            }
            Ok(n)
        })
        .await?;
    Ok(paid.to_string())
}

async fn ids(State(db): State<Database>) -> Result<String, AppError> {
    let on = db.on("ids", Route::Read);
    let mut rows = on.query_stream("SELECT id FROM bills", &[]).await?;
    let mut out = String::new();
    while let Some(row) = rows.try_next().await? {
        out.push_str(&row.get::<_, i64>(0).to_string());
    }
    Ok(out)
}

fn router(db: Database) -> Router {
    Router::new()
        .route("/bills/{id}", get(bill).post(pay))
        .route("/ids", get(ids))
        .with_state(db)
}

#[test]
fn every_call_shape_is_send() {
    // The functions above type-check only if every future is `Send`.
    let _ = (spawned as fn(Database), router as fn(Database) -> Router);
}
