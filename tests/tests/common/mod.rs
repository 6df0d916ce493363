//! Shared by the end-to-end suites: a configuration with a distinctive
//! password, a log capture that watches for that password, checks of error
//! texts, the ledger of unique writes and its reconciliation, and the summary
//! row every scenario prints.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr
)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgstack::{Database, DatabaseConfig, Error};

/// The password every URL of the suites carries. The kit's servers use trust
/// authentication, so it is accepted and ignored; it must never show up in a
/// log line, an error text or a `Debug` output.
pub(crate) const PASSWORD: &str = "Kq3-SECRET-e2e-pw-7731";

/// `url` (`postgres://user@host:port/db`) with [`PASSWORD`] added.
pub(crate) fn with_password(url: &str) -> String {
    let rest = url.strip_prefix("postgres://").expect("a postgres:// URL");
    let (user, host) = rest.split_once('@').expect("user@host");
    format!("postgres://{user}:{PASSWORD}@{host}")
}

/// A configuration for the suites: the test profile, [`PASSWORD`] in the
/// URL, no migrations at start, short timeouts, quick retries with a roomy
/// budget (the scenarios measure what the retry rules do, not the budget's
/// shedding), a breaker that reopens quickly, a health monitor probing
/// every second.
pub(crate) fn config(url: &str) -> DatabaseConfig {
    let mut config = DatabaseConfig::for_tests(&with_password(url)).expect("test URL");
    assert!(
        config.primary.password.is_some(),
        "the URL carries a password"
    );
    config.migrations.auto_migrate = false;
    config.pool.max_size = 16;
    config.pool.min_idle = 2;
    config.pool.acquire_timeout = Duration::from_secs(2);
    config.pool.connect_timeout = Duration::from_secs(1);
    config.retry.max_attempts = 10;
    config.retry.initial_backoff = Duration::from_millis(20);
    config.retry.max_backoff = Duration::from_millis(400);
    config.retry.deadline = Some(Duration::from_secs(10));
    config.retry.budget_ratio = 1.0;
    config.retry.budget_min_per_second = 10_000;
    config.query.statement_timeout = Some(Duration::from_secs(10));
    config.query.application_name = "e2e".to_owned();
    config.health.max_replica_lag = Duration::from_secs(1);
    config.health.interval = Duration::from_secs(1);
    config.health.probe_timeout = Duration::from_millis(500);
    config.circuit_breaker.open_duration = Duration::from_millis(300);
    config.circuit_breaker.max_open_duration = Duration::from_secs(1);
    config
}

/// A fresh database with `schema` (statements separated by `;`) run in it.
pub(crate) async fn db_with(schema: &str) -> pgstack_tests::TestDb {
    let tdb = pgstack_tests::TestDb::new().await.unwrap();
    tdb.client()
        .await
        .unwrap()
        .batch_execute(schema)
        .await
        .unwrap();
    tdb
}

/// Connects a `Database` over `config` (failing at once if unreachable).
pub(crate) async fn connect(config: DatabaseConfig) -> Database {
    match Database::builder().config(config).connect().await {
        Ok(db) => db,
        Err(error) => panic!("connect: {}", checked(&error)),
    }
}

// ----- the log capture ------------------------------------------------------

/// What the process-wide log capture has seen.
#[derive(Default)]
struct Seen {
    bytes: AtomicU64,
    events: AtomicU64,
    leaks: Mutex<Vec<String>>,
}

static SEEN: OnceLock<Seen> = OnceLock::new();

fn seen() -> &'static Seen {
    SEEN.get_or_init(Seen::default)
}

/// A `MakeWriter` whose writer checks each formatted event for [`PASSWORD`]
/// and keeps only the offending lines (the volume of a storm stays small).
#[derive(Clone, Copy)]
struct Watch;

impl std::io::Write for Watch {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let seen = seen();
        seen.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        seen.events.fetch_add(1, Ordering::Relaxed);
        let text = String::from_utf8_lossy(buf);
        if text.contains(PASSWORD) {
            seen.leaks.lock().unwrap().push(text.into_owned());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Watch {
    type Writer = Watch;

    fn make_writer(&'a self) -> Self::Writer {
        Watch
    }
}

/// Installs the capture once per test binary: every event at `DEBUG` and
/// above, from every thread (the scenarios run multi-threaded runtimes and
/// pgstack spawns tasks, so a thread-local subscriber would miss most of
/// them), formatted with all fields and spans, into [`Watch`].
pub(crate) fn capture_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(Watch)
            .with_ansi(false)
            .finish()
            .with(LookUps);
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    });
}

// ----- interrupted commits looked up -------------------------------------------

/// One `COMMIT` whose connection broke, as pgstack logged its look-up ("a
/// COMMIT whose connection broke was looked up"): the operation, the node
/// the transaction ran on, its id and what the look-up found (`committed`,
/// `aborted`, `lost`, `unknown`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LookUp {
    pub(crate) op: String,
    pub(crate) node: String,
    pub(crate) xid: i64,
    pub(crate) outcome: String,
}

/// The message of pgstack's event for a looked-up `COMMIT`.
const LOOKED_UP: &str = "a COMMIT whose connection broke was looked up";

static LOOK_UPS: Mutex<Vec<LookUp>> = Mutex::new(Vec::new());

/// A layer beside the log capture that keeps every looked-up `COMMIT`, so a
/// scenario can check each "committed" answer against its table by the
/// transaction's id.
struct LookUps;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LookUps {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if !event.metadata().target().starts_with("pgstack_connection") {
            return;
        }
        let mut fields = LookUpFields::default();
        event.record(&mut fields);
        if fields.message == LOOKED_UP {
            LOOK_UPS.lock().unwrap().push(fields.seen);
        }
    }
}

#[derive(Default)]
struct LookUpFields {
    message: String,
    seen: LookUp,
}

impl tracing::field::Visit for LookUpFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "op" => value.clone_into(&mut self.seen.op),
            "node" => value.clone_into(&mut self.seen.node),
            "outcome" => value.clone_into(&mut self.seen.outcome),
            "message" => value.clone_into(&mut self.message),
            _ => {}
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        if field.name() == "xid" {
            self.seen.xid = value;
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

/// The looked-up `COMMIT`s of operation `op` seen so far (by every test of
/// the binary; operation names keep the scenarios apart).
pub(crate) fn look_ups(op: &str) -> Vec<LookUp> {
    LOOK_UPS
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.op == op)
        .cloned()
        .collect()
}

/// Fails if any captured log line so far held the password; returns how many
/// events were captured (so a test can tell the capture saw its run).
pub(crate) fn assert_no_password_in_logs() -> u64 {
    let seen = seen();
    let leaks = seen.leaks.lock().unwrap();
    assert!(
        leaks.is_empty(),
        "the password appeared in {} log lines, e.g. {:?}",
        leaks.len(),
        leaks.first()
    );
    seen.events.load(Ordering::Relaxed)
}

/// Events captured so far (by every test of the binary).
pub(crate) fn events_captured() -> u64 {
    seen().events.load(Ordering::Relaxed)
}

/// `error`'s `Display`, `{:#}`-style cause chain and `Debug`, checked for the
/// password; returns the display text.
pub(crate) fn checked(error: &(dyn std::error::Error + 'static)) -> String {
    let display = error.to_string();
    let mut chain = String::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(chain, ": {cause}");
        source = cause.source();
    }
    let debug = format!("{error:?}");
    for (what, text) in [
        ("Display", &display),
        ("cause chain", &chain),
        ("Debug", &debug),
    ] {
        assert!(
            !text.contains(PASSWORD),
            "the password appeared in an error's {what}: {text}"
        );
    }
    format!("{display}{chain}")
}

/// Checks a `Debug` or serialized text for the password.
pub(crate) fn assert_clean(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD),
        "the password appeared in {what}: {text}"
    );
}

// ----- errors by kind --------------------------------------------------------

/// A short name for an error's kind, for tallies.
pub(crate) fn kind(error: &Error) -> &'static str {
    match error {
        Error::PoolTimeout { .. } => "pool-timeout",
        Error::CircuitOpen { .. } => "circuit-open",
        Error::Unavailable { .. } => "unavailable",
        Error::Database(_) => "database",
        Error::Connection { .. } => "connection",
        Error::Timeout { .. } => "timeout",
        Error::CommitOutcomeUnknown { .. } => "outcome-unknown",
        Error::ShuttingDown { .. } => "shutting-down",
        Error::NoPrimary { .. } => "no-primary",
        Error::PartiallyApplied { .. } => "partially-applied",
        Error::TransactionAborted { .. } => "transaction-aborted",
        Error::RolledBack { .. } => "rolled-back",
        Error::CommitLost { .. } => "commit-lost",
        _ => "other",
    }
}

/// Counts of errors by kind.
#[derive(Debug, Default, Clone)]
pub(crate) struct Kinds(pub HashMap<&'static str, u64>);

impl Kinds {
    pub(crate) fn add(&mut self, error: &Error) {
        checked(error);
        *self.0.entry(kind(error)).or_default() += 1;
    }

    pub(crate) fn merge(&mut self, other: &Kinds) {
        for (k, n) in &other.0 {
            *self.0.entry(k).or_default() += n;
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub(crate) fn get(&self, kind: &str) -> u64 {
        self.0.get(kind).copied().unwrap_or(0)
    }
}

// ----- the ledger -------------------------------------------------------------

/// Creates the ledger table: unique ids, deliberately without a unique
/// constraint, so a write applied twice shows as two rows.
pub(crate) const LEDGER_TABLE: &str = "CREATE TABLE ledger (id bigint NOT NULL, task int NOT NULL)";

/// The outcome of each write the callers made, by id.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ledger {
    /// Acknowledged: must be there exactly once.
    pub(crate) ok: Vec<i64>,
    /// Failed with an error that says nothing was done: must be absent.
    pub(crate) not_applied: Vec<(i64, String)>,
    /// Failed with an unknown outcome (`CommitOutcomeUnknown`, a time-out
    /// after sending, a connection lost in flight): there at most once.
    pub(crate) unknown: Vec<i64>,
}

impl Ledger {
    /// Files the outcome of write `id`.
    pub(crate) fn record(&mut self, id: i64, outcome: &Result<u64, Error>) {
        match outcome {
            Ok(1) => self.ok.push(id),
            Ok(n) => panic!("write {id} affected {n} rows"),
            Err(error) if error.provably_not_sent() => {
                self.not_applied.push((id, checked(error)));
            }
            Err(error) => {
                checked(error);
                self.unknown.push(id);
            }
        }
    }

    pub(crate) fn merge(&mut self, other: Ledger) {
        self.ok.extend(other.ok);
        self.not_applied.extend(other.not_applied);
        self.unknown.extend(other.unknown);
    }

    pub(crate) fn writes(&self) -> usize {
        self.ok.len() + self.not_applied.len() + self.unknown.len()
    }
}

/// What the table says about a [`Ledger`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reconciled {
    /// Acknowledged writes missing from the table.
    pub(crate) lost: u64,
    /// Ids present more than once.
    pub(crate) duplicated: u64,
    /// Writes reported as not done that were done anyway.
    pub(crate) phantom: u64,
    /// Unknown outcomes that turned out applied.
    pub(crate) unknown_applied: u64,
}

/// Reads the ledger table (through a connection of the kit's, not pgstack)
/// and reconciles every outcome.
pub(crate) async fn reconcile(client: &tokio_postgres::Client, ledger: &Ledger) -> Reconciled {
    reconcile_counts(&ledger_counts(client).await, ledger)
}

/// How many rows the ledger table holds per id, through a kit connection.
pub(crate) async fn ledger_counts(client: &tokio_postgres::Client) -> HashMap<i64, i64> {
    let rows = client
        .query("SELECT id, count(*) FROM ledger GROUP BY id", &[])
        .await
        .expect("read the ledger");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Reconciles every outcome of `ledger` with `counts`, the rows per id a
/// table holds (the ledger table, or another table of unique write ids).
pub(crate) fn reconcile_counts(counts: &HashMap<i64, i64>, ledger: &Ledger) -> Reconciled {
    let mut result = Reconciled {
        duplicated: counts.values().filter(|n| **n > 1).count() as u64,
        ..Reconciled::default()
    };
    for id in &ledger.ok {
        if !counts.contains_key(id) {
            result.lost += 1;
        }
    }
    for (id, _) in &ledger.not_applied {
        if counts.contains_key(id) {
            result.phantom += 1;
        }
    }
    for id in &ledger.unknown {
        if counts.contains_key(id) {
            result.unknown_applied += 1;
        }
    }
    let known: usize = ledger.writes();
    let extra = counts.len() as i64
        - (ledger.ok.len() as i64 - result.lost as i64)
        - result.phantom as i64
        - result.unknown_applied as i64;
    assert_eq!(
        extra, 0,
        "the table holds ids no caller wrote ({known} writes made)"
    );
    result
}

/// Asserts the ledger's guarantees: nothing acknowledged lost, nothing
/// applied twice, nothing reported as not done yet done.
pub(crate) fn assert_reconciled(scenario: &str, ledger: &Ledger, r: Reconciled) {
    assert_eq!(r.lost, 0, "{scenario}: acknowledged writes lost: {r:?}");
    assert_eq!(r.duplicated, 0, "{scenario}: writes applied twice: {r:?}");
    assert_eq!(
        r.phantom,
        0,
        "{scenario}: writes reported as not done were done: {r:?}; e.g. {:?}",
        ledger.not_applied.first()
    );
}

// ----- the summary row --------------------------------------------------------

/// One row of the summary table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Figures {
    pub(crate) scenario: String,
    pub(crate) operations: u64,
    pub(crate) faults: u64,
    pub(crate) errors: u64,
    /// `None` where the scenario writes nothing to reconcile.
    pub(crate) lost: Option<u64>,
    pub(crate) duplicated: Option<u64>,
    pub(crate) leaked_connections: Option<u64>,
    pub(crate) seconds: f64,
}

impl Figures {
    pub(crate) fn new(scenario: &str, started: Instant) -> Figures {
        Figures {
            scenario: scenario.to_owned(),
            seconds: started.elapsed().as_secs_f64(),
            ..Figures::default()
        }
    }

    /// The markdown row.
    pub(crate) fn row(&self) -> String {
        fn opt(v: Option<u64>) -> String {
            v.map_or_else(|| "–".to_owned(), |v| v.to_string())
        }
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1} |",
            self.scenario,
            self.operations,
            self.faults,
            self.errors,
            opt(self.lost),
            opt(self.duplicated),
            opt(self.leaked_connections),
            self.seconds
        )
    }

    /// Prints the row (visible with `--nocapture`) and, when
    /// `PGSTACK_RELIABILITY_REPORT` names a file, appends it there (`cargo
    /// xtask soak` collects the rows that way).
    pub(crate) fn report(&self) {
        let row = self.row();
        eprintln!("{SUMMARY_HEADER}\n{SUMMARY_RULE}\n{row}");
        if let Some(path) = std::env::var_os("PGSTACK_RELIABILITY_REPORT") {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the report file");
            writeln!(file, "{row}").expect("write the report file");
        }
    }
}

pub(crate) const SUMMARY_HEADER: &str = "| scenario | operations | faults injected | errors | lost | duplicated | leaked connections | seconds |";
pub(crate) const SUMMARY_RULE: &str = "|---|---:|---:|---:|---:|---:|---:|---:|";

// ----- time -------------------------------------------------------------------

/// How long the load-and-fault scenarios repeat their rounds: one round in
/// CI; `PGSTACK_SOAK_SECONDS` (set by `cargo xtask soak`) for longer.
pub(crate) fn soak() -> Option<Duration> {
    std::env::var("PGSTACK_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

/// The rounds of a load-and-fault scenario: one in CI, as many as fit in
/// `PGSTACK_SOAK_SECONDS` under `cargo xtask soak`.
pub(crate) struct Rounds {
    until: Option<Instant>,
    done: u64,
}

impl Rounds {
    pub(crate) fn new() -> Rounds {
        Rounds {
            until: soak().map(|d| Instant::now() + d),
            done: 0,
        }
    }

    /// Whether to run another round (always the first).
    pub(crate) fn next_round(&mut self) -> Option<u64> {
        let go = self.done == 0 || self.until.is_some_and(|until| Instant::now() < until);
        go.then(|| {
            self.done += 1;
            self.done - 1
        })
    }

    pub(crate) fn done(&self) -> u64 {
        self.done
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes.
pub(crate) async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sessions on the server whose `application_name` starts with `prefix`,
/// with their state, through a kit connection.
pub(crate) async fn sessions(
    client: &tokio_postgres::Client,
    prefix: &str,
) -> Vec<(String, String)> {
    client
        .query(
            "SELECT application_name, coalesce(state, '') FROM pg_stat_activity \
             WHERE application_name LIKE $1 || '%' AND pid <> pg_backend_pid()",
            &[&prefix],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Connections checked out of every pool of `db` now.
pub(crate) fn in_use(db: &Database) -> u64 {
    db.metrics()
        .cluster
        .nodes
        .iter()
        .map(|n| u64::from(n.pool.in_use))
        .sum()
}

/// Checks that each pool's figures add up: open = idle + in use, and
/// created − closed = open. Returns the open connections of all pools.
pub(crate) fn assert_pool_figures_add_up(db: &Database) -> u64 {
    let mut open = 0;
    for node in db.metrics().cluster.nodes {
        let pool = &node.pool;
        let closed = pool.closed.broken
            + pool.closed.lifetime
            + pool.closed.idle
            + pool.closed.error
            + pool.closed.recycled
            + pool.closed.shutdown;
        assert_eq!(
            pool.size,
            pool.idle + pool.in_use,
            "{}: open = idle + in use: {pool:?}",
            node.name
        );
        assert_eq!(
            pool.created - closed,
            u64::from(pool.size),
            "{}: created − closed = open: {pool:?}",
            node.name
        );
        assert!(pool.size <= pool.max_size, "{pool:?}");
        open += u64::from(pool.size);
    }
    open
}

/// Waits until no session whose `application_name` starts with `prefix` is
/// left on the server and returns how long that took. A pool closes its
/// connections by dropping their clients; each connection task then sends
/// `Terminate` and the backend exits, a few milliseconds after `shutdown`
/// returned. A session still there after 2 s is a leak: the test fails.
pub(crate) async fn assert_sessions_gone(
    client: &tokio_postgres::Client,
    prefix: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let left = sessions(client, prefix).await;
        if left.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "sessions of ours left on the server 2 s after the shutdown: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
