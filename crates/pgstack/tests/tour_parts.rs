//! The tour's LISTEN/NOTIFY, COPY and OpenTelemetry parts, asserted against
//! real servers through `pgstack::Database`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod tour;

use std::time::Duration;

use opentelemetry_sdk::trace::InMemorySpanExporter;
use pgstack::Database;
use pgstack_tests::{TestCluster, TestDb};

async fn database(
    url: &str,
    edit: impl FnOnce(&mut pgstack::DatabaseConfig) + Send + 'static,
) -> Database {
    Database::builder()
        .env_source([("APP_ENV", "test"), ("DATABASE_URL", url)])
        .set("migrations.auto_migrate", false)
        .set("retry.initial_backoff", "20ms")
        .set("retry.max_backoff", "200ms")
        .set("features.health_monitoring", false)
        .with(edit)
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_across_a_server_restart_receives_what_is_sent_after_it_and_reports_the_gap() {
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    let db = database(tdb.url(), |_| {}).await;
    let seen = tour::listen_across_restart(&db, "tour events", async { server.restart().await })
        .await
        .unwrap();
    eprintln!("listener was down for {:?}", seen.down_for);
    assert!(seen.down_for > Duration::ZERO);
    assert_eq!(seen.received.channel, "tour events");
    assert_eq!(seen.received.payload, "after the restart");
    let report = db.shutdown(Duration::from_secs(5)).await;
    eprintln!("{report:?}");
    assert_eq!(db.cluster().listeners(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_the_database() {
    let tdb = TestDb::new().await.unwrap();
    let db = database(tdb.url(), |_| {}).await;
    let figures = tour::copy_rows(&db, "tour_rows", 100_000).await.unwrap();
    eprintln!(
        "copied {} rows in {:?} ({:.0} rows/s), {} bytes back in {:?}",
        figures.rows,
        figures.copy_in,
        figures.rows_per_second(),
        figures.bytes_out,
        figures.copy_out
    );
    assert_eq!(figures.rows, 100_000);
    assert_eq!(figures.lines_out, 100_000);
    db.shutdown(Duration::from_secs(5)).await;
    // After shutdown, no copy starts.
    assert!(matches!(
        db.copy_in("late", "COPY tour_rows FROM STDIN").await,
        Err(pgstack::Error::ShuttingDown { .. })
    ));
}

fn attribute<'a>(attributes: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn spans_exported_through_opentelemetry_carry_the_database_conventions() {
    let tdb = TestDb::new().await.unwrap();
    let db = database(tdb.url(), |_| {}).await;
    let exporter = InMemorySpanExporter::default();
    let (provider, subscriber) = tour::otel_subscriber(exporter.clone());
    {
        let _guard = tracing::subscriber::set_default(subscriber);
        tour::traced_statements(&db, "tour-double", "tour-divide")
            .await
            .unwrap();
    }
    provider.force_flush().unwrap();
    let spans = tour::exported(&exporter);
    let find = |op: &str| {
        spans
            .iter()
            .find(|(_, a)| attribute(a, "db.operation.name") == Some(op))
            .unwrap_or_else(|| panic!("no span for {op} in {spans:?}"))
    };
    let (name, ok) = find("tour-double");
    eprintln!("{name}: {ok:?}");
    assert_eq!(name, "pgstack.statement");
    let port = db.config().primary.port.to_string();
    assert_eq!(attribute(ok, "db.system.name"), Some("postgresql"));
    assert_eq!(attribute(ok, "db.namespace"), Some(tdb.name()));
    assert_eq!(attribute(ok, "db.query.text"), Some("SELECT $1::int * 2"));
    assert_eq!(
        attribute(ok, "server.address"),
        Some(db.config().primary.host.as_str())
    );
    assert_eq!(attribute(ok, "server.port"), Some(port.as_str()));
    // An integer, as the convention says, not the port's text.
    let port_values: Vec<opentelemetry::Value> = exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .flat_map(|span| span.attributes.iter())
        .filter(|kv| kv.key.as_str() == "server.port")
        .map(|kv| kv.value.clone())
        .collect();
    assert!(!port_values.is_empty());
    for value in port_values {
        assert_eq!(
            value,
            opentelemetry::Value::I64(i64::from(db.config().primary.port))
        );
    }
    assert_eq!(attribute(ok, "error.type"), None);
    let (_, failed) = find("tour-divide");
    assert_eq!(attribute(failed, "db.response.status_code"), Some("22012"));
    assert_eq!(attribute(failed, "error.type"), Some("22012"));
    db.shutdown(Duration::from_secs(5)).await;

    // Production leaves the statement's text out.
    let db = database(tdb.url(), |config| config.telemetry.query_text = false).await;
    let exporter = InMemorySpanExporter::default();
    let (provider, subscriber) = tour::otel_subscriber(exporter.clone());
    {
        let _guard = tracing::subscriber::set_default(subscriber);
        tour::traced_statements(&db, "quiet-double", "quiet-divide")
            .await
            .unwrap();
    }
    provider.force_flush().unwrap();
    let spans = tour::exported(&exporter);
    let quiet: Vec<_> = spans
        .iter()
        .filter(|(_, a)| {
            attribute(a, "db.operation.name").is_some_and(|op| op.starts_with("quiet-"))
        })
        .collect();
    assert_eq!(quiet.len(), 2, "{spans:?}");
    for (_, attributes) in quiet {
        assert_eq!(attribute(attributes, "db.query.text"), None);
        assert_eq!(attribute(attributes, "db.system.name"), Some("postgresql"));
    }
    db.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_rows_a_stream_and_a_transaction_with_the_services_own_error_type() {
    use pgstack::Queryable as _;

    let tdb = TestDb::new().await.unwrap();
    let db = database(tdb.url(), |_| {}).await;
    let bills = tour::typed_rows(&db).await.unwrap();
    assert_eq!(
        bills,
        vec![
            tour::Bill {
                id: 1,
                title: "rent".into(),
                note: None
            },
            tour::Bill {
                id: 2,
                title: "power".into(),
                note: Some("paid late".into())
            },
            tour::Bill {
                id: 3,
                title: "water".into(),
                note: None
            },
        ]
    );

    let (count, sum) = tour::stream_rows(&db, 100_000).await.unwrap();
    assert_eq!(count, 100_000);
    assert_eq!(sum, 100_000 * 100_001 / 2);

    // Bill 1 is paid once; the second payment is the service's own error,
    // and its transaction is rolled back (no " paying" left on the note).
    tour::pay(&db, 1).await.unwrap();
    match tour::pay(&db, 1).await {
        Err(tour::AppError::AlreadyPaid(1)) => {}
        other => panic!("expected AlreadyPaid(1), got {other:?}"),
    }
    let note: Option<String> = db
        .on("tour-note", pgstack::Route::Write)
        .query_one("SELECT note FROM tour_bills WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(note.as_deref(), Some("paid"));
    db.shutdown(Duration::from_secs(5)).await;
}
