#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! The query API through `pgstack::Database` against the kit's servers: typed
//! rows (`query_as` and kin, the `FromRow` derive) and their misuse (a
//! column of another type, a missing column, `NULL` into a field that is not
//! an `Option`, a number of rows `query_one_as` does not expect), streams
//! (dropped half-read: the connection comes back clean), declared
//! statements, and transactions with the service's own error type (rolled
//! back on `Err`, repeated on a serialization failure).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::TryStreamExt;
use pgstack::prelude::*;
use pgstack::{Routed, RowProblem};
use pgstack_tests::TestDb;

const TABLES: &str = "CREATE TABLE bills (id bigint PRIMARY KEY, amount_cents bigint NOT NULL, \
     note text, paid boolean NOT NULL DEFAULT false); \
     INSERT INTO bills VALUES (1, 1000, 'first', false), (2, 250, NULL, true), (3, 75, 'third', false)";

async fn setup() -> (TestDb, Database) {
    let tdb = common::db_with(TABLES).await;
    let db = common::connect(common::config(tdb.url())).await;
    (tdb, db)
}

#[derive(Debug, PartialEq, FromRow)]
struct Bill {
    id: i64,
    #[pgstack(rename = "amount_cents")]
    amount: i64,
    note: Option<String>,
}

#[derive(Debug, PartialEq, FromRow)]
struct PaidBill {
    #[pgstack(flatten)]
    bill: Bill,
    paid: bool,
}

const BILL: Statement = Statement::read(
    "bill",
    "SELECT id, amount_cents, note FROM bills WHERE id = $1",
);
const MARK_PAID: Statement =
    Statement::write("mark-paid", "UPDATE bills SET paid = true WHERE id = $1").idempotent();

/// The column, Rust type, PostgreSQL type and problem of a `RowMapping`.
fn mapping(error: &Error) -> (&str, &str, Option<&str>, &RowProblem) {
    match error {
        Error::RowMapping {
            column,
            rust_type,
            pg_type,
            source,
            ..
        } => (column, rust_type, pg_type.as_deref(), &source.problem),
        other => panic!("expected RowMapping, got {other:?}"),
    }
}

fn read(db: &Database) -> Routed<'_> {
    db.on("typed", Route::Read)
}

#[tokio::test]
async fn typed_rows_by_name_with_rename_option_and_flatten() {
    let (_tdb, db) = setup().await;
    let bills: Vec<Bill> = read(&db)
        .query_as("SELECT note, amount_cents, id FROM bills ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(
        bills,
        vec![
            Bill {
                id: 1,
                amount: 1000,
                note: Some("first".into())
            },
            Bill {
                id: 2,
                amount: 250,
                note: None
            },
            Bill {
                id: 3,
                amount: 75,
                note: Some("third".into())
            },
        ]
    );
    let paid: PaidBill = read(&db)
        .query_one_as("SELECT * FROM bills WHERE id = $1", &[&2_i64])
        .await
        .unwrap();
    assert!(paid.paid);
    assert_eq!(paid.bill.amount, 250);
    let none: Option<Bill> = read(&db)
        .query_opt_as("SELECT * FROM bills WHERE id = $1", &[&99_i64])
        .await
        .unwrap();
    assert!(none.is_none());

    // Declared statements: through the database, a transaction, a closure.
    let bill: Bill = db.run(&BILL).query_one_as(&[&1_i64]).await.unwrap();
    assert_eq!(bill.note.as_deref(), Some("first"));
    assert_eq!(db.run(&MARK_PAID).execute(&[&1_i64]).await.unwrap(), 1);
    let in_tx: Bill = db
        .transaction("tx-bill", async |tx| {
            tx.query_one_as(&BILL, &[&3_i64]).await
        })
        .await
        .unwrap();
    assert_eq!(in_tx.amount, 75);
    let in_closure: Vec<Bill> = db
        .read("closure-bills", async |conn| {
            conn.query_as("SELECT id, amount_cents, note FROM bills", &[])
                .await
        })
        .await
        .unwrap();
    assert_eq!(in_closure.len(), 3);
    // The per-call form still works.
    let rows = db
        .query("old-form", Route::Read, "SELECT id FROM bills", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
}

#[tokio::test]
async fn a_column_of_another_type_names_the_column_and_both_types() {
    let (_tdb, db) = setup().await;
    #[derive(Debug, FromRow)]
    struct Wrong {
        #[allow(dead_code)]
        note: i32,
    }
    let error = read(&db)
        .query_as::<Wrong>("SELECT note FROM bills", &[])
        .await
        .unwrap_err();
    assert_eq!(
        mapping(&error),
        ("note", "i32", Some("text"), &RowProblem::WrongType)
    );
    assert!(matches!(&error, Error::RowMapping { operation, .. } if operation == "typed"));
    let text = error.to_string();
    for part in ["note", "i32", "text", "typed"] {
        assert!(text.contains(part), "{text} should name {part}");
    }
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_missing_column_is_named_with_the_columns_the_row_has() {
    let (_tdb, db) = setup().await;
    let error = read(&db)
        .query_as::<Bill>("SELECT id, note FROM bills", &[])
        .await
        .unwrap_err();
    let missing = RowProblem::MissingColumn {
        available: vec!["id".into(), "note".into()],
    };
    assert_eq!(mapping(&error), ("amount_cents", "i64", None, &missing));
    assert!(error.to_string().contains("amount_cents"), "{error}");
}

#[tokio::test]
async fn null_into_a_field_that_is_not_an_option_is_an_error() {
    let (_tdb, db) = setup().await;
    #[derive(Debug, FromRow)]
    struct Strict {
        #[allow(dead_code)]
        note: String,
    }
    let error = read(&db)
        .query_one_as::<Strict>("SELECT note FROM bills WHERE id = 2", &[])
        .await
        .unwrap_err();
    assert_eq!(
        mapping(&error),
        ("note", "String", Some("text"), &RowProblem::UnexpectedNull)
    );
    assert!(error.to_string().contains("Option<String>"), "{error}");
}

#[tokio::test]
async fn query_one_as_with_no_row_or_two_rows_says_how_many() {
    let (_tdb, db) = setup().await;
    for (sql, expected) in [
        ("SELECT id, amount_cents, note FROM bills WHERE id = 99", 0),
        ("SELECT id, amount_cents, note FROM bills WHERE id < 3", 2),
    ] {
        match read(&db).query_one_as::<Bill>(sql, &[]).await {
            Err(Error::UnexpectedRows {
                got,
                expected: what,
                ..
            }) => {
                assert_eq!(got, expected);
                assert_eq!(what, "exactly one row");
            }
            other => panic!("expected UnexpectedRows, got {other:?}"),
        }
    }
    match read(&db)
        .query_opt_as::<Bill>("SELECT id, amount_cents, note FROM bills WHERE id < 3", &[])
        .await
    {
        Err(Error::UnexpectedRows { got: 2, .. }) => {}
        other => panic!("expected UnexpectedRows, got {other:?}"),
    }
    // Inside a transaction too.
    let error = db
        .transaction("tx-one", async |tx| {
            tx.query_one_as::<Bill>("SELECT id, amount_cents, note FROM bills", &[])
                .await
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::UnexpectedRows { got: 3, .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_stream_dropped_half_read_gives_its_connection_back_clean() {
    let (tdb, db) = setup().await;
    let pool = db.cluster().primary().pool();
    let before = pool.status();
    {
        let on = db.on("stream-drop", Route::Read);
        let mut rows = on
            .query_stream(
                "SELECT g /* stream-drop */ FROM generate_series(1, 100000) g",
                &[],
            )
            .await
            .unwrap();
        for expected in 1..=10_i32 {
            let row = rows.try_next().await.unwrap().unwrap();
            assert_eq!(row.get::<_, i32>(0), expected);
        }
    }
    pool.returns_settled().await;
    let after = pool.status();
    // Rolled back on its way back (the rest of the reply discarded), not
    // closed.
    assert_eq!(after.rollbacks, before.rollbacks + 1, "{after:?}");
    assert_eq!(after.closed.error, before.closed.error, "{after:?}");
    // Nothing of it still runs on the server.
    let client = tdb.client().await.unwrap();
    let running: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE state <> 'idle' \
             AND query LIKE '%stream-drop%' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(running, 0);
    // Every connection of the pool still works, in and out of transactions.
    let size = pool.status().size as usize;
    let mut calls = Vec::new();
    for i in 0..size * 2 {
        let db = db.clone();
        calls.push(tokio::spawn(async move {
            db.transaction("after-drop", async move |tx| {
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM bills", &[])
                    .await?
                    .get(0);
                Ok::<_, Error>(n + i as i64)
            })
            .await
        }));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_half_read_stream_does_not_hold_up_other_callers() {
    let (_tdb, db) = setup().await;
    let on = db.on("stream-held", Route::Read);
    let mut rows = on
        .query_stream("SELECT g FROM generate_series(1, 100000) g", &[])
        .await
        .unwrap();
    rows.try_next().await.unwrap().unwrap();
    // While the stream waits, half-read, statements run at once.
    for _ in 0..20 {
        let n: i32 = tokio::time::timeout(
            Duration::from_secs(2),
            db.on("beside", Route::Read).query_one("SELECT 1", &[]),
        )
        .await
        .expect("a statement beside a half-read stream")
        .unwrap()
        .get(0);
        assert_eq!(n, 1);
    }
    let mut n = 1;
    while rows.try_next().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 100_000);
}

#[tokio::test]
async fn streams_in_a_transaction_and_a_closure() {
    let (_tdb, db) = setup().await;
    let total = db
        .transaction("tx-stream", async |tx| {
            let mut rows = tx
                .query_stream("SELECT amount_cents FROM bills ORDER BY id", &[])
                .await?;
            let mut total = 0_i64;
            while let Some(row) = rows.try_next().await? {
                total += row.get::<_, i64>(0);
            }
            drop(rows);
            tx.execute("UPDATE bills SET paid = true", &[]).await?;
            Ok::<_, Error>(total)
        })
        .await
        .unwrap();
    assert_eq!(total, 1325);
    // A stream failing mid-way dooms the transaction: returning Ok after it
    // is not a commit.
    let error = db
        .transaction("tx-stream-fails", async |tx| {
            tx.execute("UPDATE bills SET note = 'changed'", &[]).await?;
            let mut rows = tx
                .query_stream("SELECT 1 / (3 - g) FROM generate_series(1, 5) g", &[])
                .await?;
            while let Ok(Some(_)) = rows.try_next().await {}
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::TransactionAborted { .. }),
        "{error:?}"
    );
    let changed: i64 = read(&db)
        .query_one("SELECT count(*) FROM bills WHERE note = 'changed'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, 0);
    let conn = db.connection("conn-stream", Route::Read).await.unwrap();
    let rows: Vec<Row> = conn
        .query_stream("SELECT id FROM bills", &[])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
}

#[derive(Debug)]
enum AppError {
    Db(Error),
    InsufficientFunds { id: i64 },
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Db(e)
    }
}

#[tokio::test]
async fn a_transaction_with_its_own_error_type_rolls_back_on_err() {
    let (_tdb, db) = setup().await;
    let attempts = AtomicU32::new(0);
    let result = db
        .transaction("pay", async |tx| -> Result<(), AppError> {
            attempts.fetch_add(1, Ordering::SeqCst);
            tx.execute("UPDATE bills SET paid = true WHERE id = 3", &[])
                .await?;
            let bill: Bill = tx.query_one_as(&BILL, &[&3_i64]).await?;
            if bill.amount < 100 {
                return Err(AppError::InsufficientFunds { id: bill.id });
            }
            Ok(())
        })
        .await;
    assert!(
        matches!(result, Err(AppError::InsufficientFunds { id: 3 })),
        "{result:?}"
    );
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        1,
        "the caller's own error is not retried"
    );
    let paid: bool = read(&db)
        .query_one("SELECT paid FROM bills WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!paid, "rolled back");
    // pgstack's errors arrive inside the caller's type.
    let result = db
        .transaction("dup", async |tx| -> Result<(), AppError> {
            tx.execute("INSERT INTO bills (id, amount_cents) VALUES (1, 1)", &[])
                .await?;
            Ok(())
        })
        .await;
    match result {
        Err(AppError::Db(error)) => assert!(error.is_unique_violation(), "{error}"),
        other => panic!("expected the unique violation, got {other:?}"),
    }
}

#[tokio::test]
async fn a_transaction_with_its_own_error_type_is_repeated_on_a_serialization_failure() {
    let (_tdb, db) = setup().await;
    let attempts = AtomicU32::new(0);
    let paid = db
        .transaction("pay-retried", async |tx| -> Result<u64, AppError> {
            let attempt = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            let n = tx
                .execute("UPDATE bills SET paid = true WHERE id = 1", &[])
                .await?;
            if attempt == 1 {
                // What a conflicting serializable transaction would cause.
                tx.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                    &[],
                )
                .await?;
            }
            Ok(n)
        })
        .await
        .unwrap();
    assert_eq!(paid, 1);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    // A real conflict between two serializable transactions: each commits
    // exactly once.
    let db2 = db.clone();
    let runs = std::sync::Arc::new(AtomicU32::new(0));
    let mut tasks = Vec::new();
    for who in 0..2_i64 {
        let db = db2.clone();
        let runs = runs.clone();
        tasks.push(tokio::spawn(async move {
            db.transaction_with(
                "serializable",
                TransactionOptions::new().isolation(pgstack::IsolationLevel::Serializable),
                async move |tx| -> Result<(), AppError> {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let total: i64 = tx
                        .query_one("SELECT sum(amount_cents)::bigint FROM bills", &[])
                        .await?
                        .get(0);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    tx.execute(
                        "INSERT INTO bills (id, amount_cents) VALUES ($1, $2)",
                        &[&(100 + who), &total],
                    )
                    .await?;
                    Ok(())
                },
            )
            .await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert!(
        runs.load(Ordering::SeqCst) >= 3,
        "one of the two was repeated"
    );
    let totals: Vec<i64> = read(&db)
        .query(
            "SELECT amount_cents FROM bills WHERE id >= 100 ORDER BY amount_cents",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(totals.len(), 2);
    assert_ne!(totals[0], totals[1], "the second saw the first's insert");
}

#[tokio::test]
async fn a_stream_dropped_half_read_in_a_transaction_leaves_it_usable() {
    let (_tdb, db) = setup().await;
    let n = db
        .transaction("tx-drop-stream", async |tx| {
            {
                let mut rows = tx
                    .query_stream("SELECT g FROM generate_series(1, 50000) g", &[])
                    .await?;
                rows.try_next().await?;
            }
            tx.execute("UPDATE bills SET paid = true WHERE id = 3", &[])
                .await?;
            let n: i64 = tx
                .query_one("SELECT count(*) FROM bills WHERE paid", &[])
                .await?
                .get(0);
            Ok::<_, Error>(n)
        })
        .await
        .unwrap();
    assert_eq!(n, 2);
    let paid: bool = read(&db)
        .query_one("SELECT paid FROM bills WHERE id = 3", &[])
        .await
        .unwrap()
        .get(0);
    assert!(paid, "committed");
}

#[tokio::test]
async fn without_prepared_statements_a_stream_still_yields_every_row() {
    let tdb = TestDb::new().await.unwrap();
    let mut config = common::config(tdb.url());
    config.query.prepared_statements = false;
    let db = common::connect(config).await;
    let rows: Vec<Row> = db
        .on("unnamed-stream", Route::Read)
        .query_stream("SELECT g FROM generate_series(1, $1::int) g", &[&1000_i32])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rows.len(), 1000);
    #[derive(FromRow)]
    struct G {
        g: i32,
    }
    let gs: Vec<G> = db
        .on("unnamed-typed", Route::Read)
        .query_as("SELECT g FROM generate_series(1, 3) g", &[])
        .await
        .unwrap();
    assert_eq!(gs.iter().map(|g| g.g).sum::<i32>(), 6);
}
