//! OpenTelemetry's database conventions on real calls: the span attributes
//! of a statement that succeeds and of one that fails (SQLSTATE and
//! `error.type`), `db.query.text` only when `telemetry.query_text` is on,
//! and the `db.client.operation.duration` / `db.client.connection.*` series.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use pgstack_connection::{Cluster, OPERATION_DURATION_METRIC, Queryable as _, Route};
use pgstack_tests::TestDb;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A closed span: its name and fields.
#[derive(Clone, Debug)]
struct Closed {
    name: String,
    fields: BTreeMap<String, String>,
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Records every span's fields, as an OpenTelemetry bridge would see them.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Closed>>>);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Spans {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }
    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id) {
            let fields = span
                .extensions()
                .get::<Fields>()
                .map(|f| f.0.clone())
                .unwrap_or_default();
            self.0.lock().unwrap().push(Closed {
                name: span.name().to_owned(),
                fields,
            });
        }
    }
}

impl Spans {
    fn named(&self, op: &str) -> Closed {
        self.0
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|s| s.fields.get("db.operation.name").map(String::as_str) == Some(op))
            .cloned()
            .unwrap_or_else(|| panic!("no span for {op}"))
    }
}

fn spans() -> Spans {
    static SPANS: OnceLock<Spans> = OnceLock::new();
    SPANS
        .get_or_init(|| {
            let spans = Spans::default();
            let subscriber = tracing_subscriber::registry().with(spans.clone());
            tracing::subscriber::set_global_default(subscriber).unwrap();
            spans
        })
        .clone()
}

fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::set_global_recorder(recorder).unwrap();
        snapshotter
    })
}

/// Every series named `name`: its labels and value.
fn series(name: &str) -> Vec<(BTreeMap<String, String>, DebugValue)> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| key.key().name() == name)
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (labels, value)
        })
        .collect()
}

fn setup() -> Spans {
    let _ = snapshotter();
    spans()
}

#[tokio::test]
async fn statements_carry_the_database_conventions_on_success_and_failure() {
    let spans = setup();
    let db = TestDb::new().await.unwrap();
    let config = common::config(db.url());
    assert!(config.telemetry.query_text, "on in the test profile");
    let cluster = Cluster::connect(&config).await.unwrap();
    let sql = "SELECT $1::int + 1";
    // Three calls: the duration histogram gets one value per call.
    for _ in 0..3 {
        cluster
            .query_one("otel-add", Route::Write, sql, &[&987_654_i32])
            .await
            .unwrap();
    }
    let ok = spans.named("otel-add");
    eprintln!("{ok:?}");
    assert_eq!(ok.name, "pgstack.statement");
    let f = &ok.fields;
    assert_eq!(f["db.system.name"], "postgresql");
    assert_eq!(f["db.namespace"], db.name());
    assert_eq!(f["db.query.text"], sql);
    assert_eq!(f["server.address"], config.primary.host);
    assert_eq!(f["server.port"], config.primary.port.to_string());
    assert_eq!(f["otel.kind"], "client");
    assert!(!f.contains_key("error.type"));
    assert!(!f.contains_key("db.response.status_code"));
    // Parameters never appear.
    assert!(f.values().all(|v| !v.contains("987654")), "{f:?}");

    let error = cluster
        .query("otel-divide", Route::Read, "SELECT 1 / $1", &[&0_i32])
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("22012"));
    let failed = spans.named("otel-divide");
    assert_eq!(failed.fields["db.response.status_code"], "22012");
    assert_eq!(failed.fields["error.type"], "22012");

    // A failure without a SQLSTATE names its kind.
    let _ = cluster
        .execute("otel-refused", Route::Write, "BEGIN", &[])
        .await
        .unwrap_err();
    let refused = spans.named("otel-refused");
    assert_eq!(refused.fields["error.type"], "usage");
    assert!(!refused.fields.contains_key("db.response.status_code"));

    // Transactions and closures too.
    cluster
        .transaction("otel-tx", async |tx| {
            tx.execute("SELECT 1", &[]).await?;
            Ok::<_, pgstack_connection::Error>(())
        })
        .await
        .unwrap();
    let tx = spans.named("otel-tx");
    assert_eq!(tx.name, "pgstack.transaction");
    assert_eq!(tx.fields["db.namespace"], db.name());
    cluster
        .read("otel-read", async |conn| conn.query("SELECT 1", &[]).await)
        .await
        .unwrap();
    assert_eq!(
        spans.named("otel-read").fields["server.port"],
        config.primary.port.to_string()
    );

    // The duration histogram, beside pgstack_query_duration_seconds.
    // One snapshot: taking one drains the histograms.
    let durations = series(OPERATION_DURATION_METRIC);
    let ok_series = durations
        .iter()
        .find(|(l, _)| l.get("db.operation.name").map(String::as_str) == Some("otel-add"))
        .expect("a series for otel-add");
    assert_eq!(ok_series.0["db.system.name"], "postgresql");
    assert_eq!(ok_series.0["db.namespace"], db.name());
    assert_eq!(ok_series.0["server.port"], config.primary.port.to_string());
    assert!(!ok_series.0.contains_key("error.type"));
    match &ok_series.1 {
        DebugValue::Histogram(values) => assert_eq!(values.len(), 3, "one value per call"),
        other => panic!("{other:?}"),
    }
    let failed_series = durations
        .iter()
        .find(|(l, _)| l.get("db.operation.name").map(String::as_str) == Some("otel-divide"))
        .expect("a series for otel-divide");
    assert_eq!(failed_series.0["error.type"], "22012");
    assert_eq!(failed_series.0["db.response.status_code"], "22012");
    match &failed_series.1 {
        DebugValue::Histogram(values) => assert!(!values.is_empty()),
        other => panic!("{other:?}"),
    }

    // The pool's series under the connection conventions.
    let counts = series(pgstack_pool::CONNECTION_COUNT_METRIC);
    let states: Vec<&str> = counts
        .iter()
        .filter(|(l, _)| l["db.client.connection.pool.name"] == "primary")
        .map(|(l, _)| l["db.client.connection.state"].as_str())
        .collect();
    assert!(
        states.contains(&"idle") && states.contains(&"used"),
        "{states:?}"
    );
    assert!(!series(pgstack_pool::CONNECTION_MAX_METRIC).is_empty());
    assert!(!series(pgstack_pool::CONNECTION_WAIT_METRIC).is_empty());
    assert!(!series(pgstack_pool::CONNECTION_USE_METRIC).is_empty());
    assert!(!series(pgstack_pool::CONNECTION_CREATE_METRIC).is_empty());
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn query_text_is_left_out_when_turned_off() {
    let spans = setup();
    let db = TestDb::new().await.unwrap();
    let mut config = common::config(db.url());
    config.telemetry.query_text = false;
    let cluster = Cluster::connect(&config).await.unwrap();
    cluster
        .query("otel-quiet", Route::Read, "SELECT 'secret literal'", &[])
        .await
        .unwrap();
    let _ = cluster
        .query("otel-quiet-failed", Route::Read, "SELECT 'secret' / 0", &[])
        .await
        .unwrap_err();
    for op in ["otel-quiet", "otel-quiet-failed"] {
        let span = spans.named(op);
        assert!(!span.fields.contains_key("db.query.text"), "{span:?}");
        assert!(
            span.fields.values().all(|v| !v.contains("secret")),
            "{span:?}"
        );
        assert_eq!(span.fields["db.system.name"], "postgresql");
    }
    cluster.close(Duration::from_secs(5)).await;
}

/// The `db.client.connection.pending_requests` gauge of one pool.
fn pending(pool: &str) -> Option<f64> {
    series(pgstack_pool::CONNECTION_PENDING_METRIC)
        .into_iter()
        .find(|(l, _)| l["db.client.connection.pool.name"] == pool)
        .and_then(|(_, value)| match value {
            DebugValue::Gauge(v) => Some(v.into_inner()),
            _ => None,
        })
}

#[tokio::test]
async fn checkouts_waiting_for_a_connection_are_counted_as_pending_requests() {
    let _ = setup();
    let db = TestDb::new().await.unwrap();
    let node = pgstack_config::NodeSettings::from_url(db.url()).unwrap();
    let pool = pgstack_pool::Pool::builder(node)
        .name("pending-gauge")
        .pool_settings(pgstack_config::PoolSettings {
            max_size: 1,
            min_idle: 0,
            acquire_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .build()
        .await
        .unwrap();
    let held = pool.get("hold").await.unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let conn = pool.get("wait").await.unwrap();
                drop(conn);
            })
        })
        .collect();
    let three = common::eventually(Duration::from_secs(5), || async {
        pool.status().waiters == 3
    })
    .await;
    assert!(three, "{:?}", pool.status());
    // A snapshot drains the debugging recorder's gauges (it reads and
    // zeroes them): the readings add up to the gauge's value.
    let mut gauge = pending("pending-gauge").unwrap();
    assert_eq!(gauge, 3.0);
    drop(held);
    for waiter in waiters {
        waiter.await.unwrap();
    }
    gauge += pending("pending-gauge").unwrap();
    assert_eq!(gauge, 0.0);
    pool.close();
}
