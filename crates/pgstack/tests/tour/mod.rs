//! Parts of the tour (`examples/tour.rs`) that the tests assert too:
//! LISTEN across a server restart, COPY of many rows in and out, and
//! OpenTelemetry export of pgstack's spans. Each part is a function taking
//! a `Database`, so the example prints what the test checks.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pgstack::{Database, ListenerEvent, Notification, Queryable as _, Route};
use tracing_subscriber::layer::SubscriberExt;

/// What [`listen_across_restart`] saw.
#[derive(Debug)]
pub struct ListenAcrossRestart {
    /// How long the listener said it was not listening (the gap).
    pub down_for: Duration,
    /// The notification sent after the restart, as received.
    pub received: Notification,
}

/// Listens on `channel`, runs `restart` (which restarts the server), waits
/// for the listener to say it is back and what it may have missed, then
/// sends a notification and receives it.
pub async fn listen_across_restart<F>(
    db: &Database,
    channel: &str,
    restart: F,
) -> anyhow::Result<ListenAcrossRestart>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let mut listener = db.listener([channel]).await?;
    db.notify(channel, "before the restart").await?;
    match tokio::time::timeout(Duration::from_secs(10), listener.recv()).await?? {
        ListenerEvent::Notification(n) if n.payload == "before the restart" => {}
        other => anyhow::bail!("expected the first notification, got {other:?}"),
    }
    restart.await?;
    let down_for = match tokio::time::timeout(Duration::from_secs(60), listener.recv()).await?? {
        ListenerEvent::Reconnected { down_for, .. } => down_for,
        other => anyhow::bail!("expected the gap to be reported, got {other:?}"),
    };
    // The pool's connections died with the server: the first sends may
    // find that out.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match db.notify(channel, "after the restart").await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, "notify while the pool re-connects");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let received = match tokio::time::timeout(Duration::from_secs(10), listener.recv()).await?? {
        ListenerEvent::Notification(n) => n,
        other => anyhow::bail!("expected the notification, got {other:?}"),
    };
    Ok(ListenAcrossRestart { down_for, received })
}

/// What [`copy_rows`] did.
#[derive(Debug)]
pub struct CopyFigures {
    /// Rows copied in.
    pub rows: u64,
    /// How long the copy in took.
    pub copy_in: Duration,
    /// Bytes read back by `copy_out`.
    pub bytes_out: usize,
    /// Lines read back by `copy_out`.
    pub lines_out: usize,
    /// How long the copy out took.
    pub copy_out: Duration,
}

impl CopyFigures {
    /// Rows per second of the copy in.
    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.copy_in.as_secs_f64()
    }
}

/// Creates `table`, copies `rows` generated CSV rows into it in 64 KiB
/// pieces (generated as they go, never all in memory), and copies it back
/// out as a stream.
pub async fn copy_rows(db: &Database, table: &str, rows: u64) -> anyhow::Result<CopyFigures> {
    db.execute(
        "tour-copy-table",
        Route::Write,
        &format!(
            "CREATE TABLE IF NOT EXISTS {table} (id bigint PRIMARY KEY, name text NOT NULL, \
             amount int)"
        ),
        &[],
    )
    .await?;
    let started = Instant::now();
    let mut copy = db
        .copy_in(
            "tour-copy-in",
            &format!("COPY {table} (id, name, amount) FROM STDIN (FORMAT csv)"),
        )
        .await?;
    let mut piece = String::with_capacity(70_000);
    for id in 0..rows {
        piece.push_str(&format!("{id},row {id},{}\n", id % 1000));
        if piece.len() >= 65_536 {
            copy.send(std::mem::take(&mut piece)).await?;
        }
    }
    if !piece.is_empty() {
        copy.send(piece).await?;
    }
    let copied = copy.finish().await?;
    let copy_in = started.elapsed();

    let started = Instant::now();
    let mut out = db
        .copy_out(
            "tour-copy-out",
            Route::Read,
            &format!("COPY {table} TO STDOUT (FORMAT csv)"),
        )
        .await?;
    let (mut bytes_out, mut lines_out) = (0, 0);
    while let Some(chunk) = out.try_next().await? {
        bytes_out += chunk.len();
        lines_out += chunk.iter().filter(|b| **b == b'\n').count();
    }
    Ok(CopyFigures {
        rows: copied,
        copy_in,
        bytes_out,
        lines_out,
        copy_out: started.elapsed(),
    })
}

/// A tracer provider whose spans go to `exporter`, and a subscriber that
/// bridges pgstack's `tracing` spans to it (`pgstack_connection` at debug,
/// where the call spans are).
pub fn otel_subscriber<E>(
    exporter: E,
) -> (SdkTracerProvider, impl tracing::Subscriber + Send + Sync)
where
    E: opentelemetry_sdk::trace::SpanExporter + 'static,
{
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter)
        .build();
    let tracer = provider.tracer("pgstack");
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(
            "pgstack_connection=debug",
        ))
        .with(tracing_opentelemetry::layer().with_tracer(tracer));
    (provider, subscriber)
}

/// The spans exported so far to an in-memory exporter, with their
/// attributes as text.
pub fn exported(exporter: &InMemorySpanExporter) -> Vec<(String, Vec<(String, String)>)> {
    exporter
        .get_finished_spans()
        .unwrap_or_default()
        .into_iter()
        .map(|span: SpanData| {
            let attributes = span
                .attributes
                .iter()
                .map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().into_owned()))
                .collect();
            (span.name.into_owned(), attributes)
        })
        .collect()
}

/// Runs a statement that succeeds and one that fails, named `ok_op` and
/// `failing_op`, inside `subscriber`'s reach (the caller sets it as the
/// default).
pub async fn traced_statements(db: &Database, ok_op: &str, failing_op: &str) -> anyhow::Result<()> {
    db.query_one(
        ok_op.to_owned(),
        Route::Read,
        "SELECT $1::int * 2",
        &[&21_i32],
    )
    .await?;
    let error = db
        .query(
            failing_op.to_owned(),
            Route::Read,
            "SELECT 1 / $1::int",
            &[&0_i32],
        )
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a division by zero should fail"))?;
    anyhow::ensure!(error.code() == Some("22012"), "{error}");
    Ok(())
}

/// A bill read into a struct by column name.
#[derive(Debug, PartialEq, pgstack::FromRow)]
pub struct Bill {
    /// The bill's id.
    pub id: i64,
    /// Its title.
    pub title: String,
    /// Its note, when it has one.
    pub note: Option<String>,
}

/// Creates `tour_bills` with three bills and reads them back typed, through
/// a declared statement.
pub async fn typed_rows(db: &Database) -> anyhow::Result<Vec<Bill>> {
    const OPEN_BILLS: pgstack::Statement = pgstack::Statement::read(
        "tour-open-bills",
        "SELECT id, title, note FROM tour_bills WHERE id <= $1 ORDER BY id",
    );
    db.execute(
        "tour-bills-table",
        Route::Write,
        "CREATE TABLE IF NOT EXISTS tour_bills (id bigint PRIMARY KEY, title text NOT NULL, \
         note text)",
        &[],
    )
    .await?;
    db.on("tour-bills-setup", Route::Write)
        .execute(
            "INSERT INTO tour_bills VALUES (1, 'rent', NULL), (2, 'power', 'paid late'), \
             (3, 'water', NULL) ON CONFLICT DO NOTHING",
            &[],
        )
        .await?;
    Ok(db.run(&OPEN_BILLS).query_as::<Bill>(&[&3_i64]).await?)
}

/// Reads `rows` generated rows as a stream (never all in memory) and sums
/// their ids.
pub async fn stream_rows(db: &Database, rows: i64) -> anyhow::Result<(u64, i64)> {
    let stream = db
        .on("tour-stream", Route::Read)
        .query_stream(
            "SELECT i, repeat('x', 100) AS padding FROM generate_series(1, $1::bigint) AS i",
            &[&rows],
        )
        .await?;
    futures_util::pin_mut!(stream);
    let (mut count, mut sum) = (0_u64, 0_i64);
    while let Some(row) = stream.try_next().await? {
        count += 1;
        sum += row.try_get::<_, i64>("i")?;
    }
    Ok((count, sum))
}

/// A service's own error type: pgstack's errors convert into it.
#[derive(Debug)]
pub enum AppError {
    /// The database failed.
    Db(pgstack::Error),
    /// The bill was already paid: a business rule, not a database error.
    AlreadyPaid(i64),
}

impl From<pgstack::Error> for AppError {
    fn from(error: pgstack::Error) -> Self {
        AppError::Db(error)
    }
}

/// Pays bill `id` in a transaction whose closure uses the service's own
/// error type; paying it twice is `AppError::AlreadyPaid`, and that
/// transaction is rolled back (its note change is not kept).
pub async fn pay(db: &Database, id: i64) -> Result<(), AppError> {
    db.transaction("tour-pay", async |tx| -> Result<(), AppError> {
        tx.execute(
            "UPDATE tour_bills SET note = coalesce(note, '') || ' paying' WHERE id = $1",
            &[&id],
        )
        .await?;
        let paid = tx
            .execute(
                "SELECT 1 FROM tour_bills WHERE id = $1 AND note LIKE 'paid%'",
                &[&id],
            )
            .await?;
        if paid > 0 {
            return Err(AppError::AlreadyPaid(id));
        }
        tx.execute("UPDATE tour_bills SET note = 'paid' WHERE id = $1", &[&id])
            .await?;
        Ok(())
    })
    .await
}
