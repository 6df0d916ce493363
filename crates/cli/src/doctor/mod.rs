//! `pgstack doctor`: a database checked the way an experienced DBA would
//! check it, as a library.
//!
//! [`examine`] runs every [`Check`] on one connection and returns a
//! [`Report`] of [`Finding`]s, each with its evidence (numbers and names),
//! why it matters and the SQL that fixes it. [`examine_replica`] checks a
//! replica from its own side. Thresholds are the fields of [`Thresholds`];
//! their defaults are the `DEFAULT_*` constants, chosen after PgHero's and
//! postgres-checkup's.
//!
//! ```no_run
//! # async fn demo(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
//! use pgstack_cli::doctor::{self, Check, Options, Severity};
//!
//! let report = doctor::examine(client, &Options::default()).await?;
//! for finding in &report.findings {
//!     if finding.check == Check::ForeignKeyWithoutIndex {
//!         assert_eq!(finding.severity, Severity::Warning);
//!         println!("{}\n{}", finding.evidence, finding.fix_sql);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Every check reads statistics and catalogs only; nothing is changed. Each
//! one that fails (a permission, a lock held too long) is listed in
//! [`Report::skipped`] with the reason, and the others still run. Session
//! checks (idle in transaction, long queries) look at the sessions of the
//! examined database; the server-wide ones (wraparound, replication,
//! connections) at the whole server.

use std::fmt;
use std::time::Duration;

use pgstack_pool::tokio_postgres::Client;
use serde::Serialize;

pub(crate) mod command;
mod indexes;
mod replication;
mod sessions;
mod tables;

/// How serious a finding is. A run's exit code is 0 with no finding, 1 when
/// the worst is a warning and 2 when one is critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Severity {
    /// Worth fixing soon: it costs performance, space or safety margin.
    Warning,
    /// Fix it now: an outage, data loss or a stopped server is near.
    Critical,
}

impl Severity {
    /// `"warning"` or `"critical"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the doctor's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Check {
    /// A foreign key whose columns lead no index of the referencing table.
    ForeignKeyWithoutIndex,
    /// An index never scanned (not unique, not a primary key, not a
    /// foreign key's), from [`Thresholds::unused_index_min_bytes`] on.
    UnusedIndex,
    /// Two or more indexes of one table with the same columns, expressions,
    /// operator classes, collations and predicate.
    DuplicateIndex,
    /// A plain b-tree index whose columns are the leading columns of another.
    RedundantIndex,
    /// An index left INVALID, typically by a failed `CREATE INDEX CONCURRENTLY`.
    InvalidIndex,
    /// A CHECK or foreign-key constraint added `NOT VALID` and never validated.
    InvalidConstraint,
    /// A session idle in an open transaction for longer than
    /// [`Thresholds::idle_in_transaction`].
    IdleInTransaction,
    /// A statement running for longer than [`Thresholds::long_query`].
    LongRunningQuery,
    /// A table with a high share of dead rows ([`Thresholds::dead_tuple_ratio`]).
    DeadTuples,
    /// A large table read mostly by sequential scans.
    SequentialScans,
    /// A database's transaction-id (or multixact) age near wraparound.
    XidWraparound,
    /// A sequence, or the integer column it feeds, near its maximum.
    SequenceExhaustion,
    /// Too many blocks read from outside shared buffers.
    CacheHitRatio,
    /// A replication slot that is inactive or holds much WAL.
    ReplicationSlot,
    /// A replica behind its primary (seen from either side).
    ReplicationLag,
    /// Client connections near `max_connections`.
    Connections,
}

impl Check {
    /// Every check, in the order they run and are reported.
    pub const ALL: [Check; 16] = [
        Check::ForeignKeyWithoutIndex,
        Check::UnusedIndex,
        Check::DuplicateIndex,
        Check::RedundantIndex,
        Check::InvalidIndex,
        Check::InvalidConstraint,
        Check::IdleInTransaction,
        Check::LongRunningQuery,
        Check::DeadTuples,
        Check::SequentialScans,
        Check::XidWraparound,
        Check::SequenceExhaustion,
        Check::CacheHitRatio,
        Check::ReplicationSlot,
        Check::ReplicationLag,
        Check::Connections,
    ];

    /// The check's name, as `--check` and the JSON output spell it.
    pub fn name(self) -> &'static str {
        match self {
            Check::ForeignKeyWithoutIndex => "fk_without_index",
            Check::UnusedIndex => "unused_index",
            Check::DuplicateIndex => "duplicate_index",
            Check::RedundantIndex => "redundant_index",
            Check::InvalidIndex => "invalid_index",
            Check::InvalidConstraint => "invalid_constraint",
            Check::IdleInTransaction => "idle_in_transaction",
            Check::LongRunningQuery => "long_running_query",
            Check::DeadTuples => "dead_tuples",
            Check::SequentialScans => "seq_scans",
            Check::XidWraparound => "xid_wraparound",
            Check::SequenceExhaustion => "sequence_exhaustion",
            Check::CacheHitRatio => "cache_hit_ratio",
            Check::ReplicationSlot => "replication_slot",
            Check::ReplicationLag => "replication_lag",
            Check::Connections => "connections",
        }
    }

    /// The check named `name` (as [`Check::name`] spells it).
    pub fn from_name(name: &str) -> Option<Check> {
        Check::ALL.into_iter().find(|check| check.name() == name)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One problem the doctor found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Finding {
    /// The check that found it.
    pub check: Check,
    /// How serious it is.
    pub severity: Severity,
    /// What it is about: a table, an index, a session, a slot, a database.
    pub subject: String,
    /// What shows it: the numbers and names read from the server.
    pub evidence: String,
    /// Why it matters.
    pub why: String,
    /// The SQL that fixes it (lines starting with `--` explain a step, or
    /// what to look at first when the fix depends on it).
    pub fix_sql: String,
}

/// A check that could not run, and why (a permission, a lock timeout, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Skipped {
    /// The check.
    pub check: Check,
    /// What stopped it.
    pub reason: String,
}

/// What [`examine`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The database examined.
    pub database: String,
    /// `SHOW server_version`.
    pub server_version: String,
    /// Whether the server is a replica (`pg_is_in_recovery()`).
    pub in_recovery: bool,
    /// When the statistics the usage checks read begin: the database's
    /// `stats_reset`, else the server's start.
    pub stats_since: Option<String>,
    /// The checks that ran.
    pub checks: Vec<Check>,
    /// What they found, the most serious first.
    pub findings: Vec<Finding>,
    /// The checks that could not run.
    pub skipped: Vec<Skipped>,
}

impl Report {
    /// The most serious finding's severity; `None` when nothing was found.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// 0 when nothing was found, 1 for warnings, 2 for a critical finding.
    pub fn exit_code(&self) -> u8 {
        match self.worst() {
            None => 0,
            Some(Severity::Warning) => 1,
            Some(Severity::Critical) => 2,
        }
    }

    /// The findings of `check`.
    pub fn of(&self, check: Check) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.check == check)
    }

    /// Adds findings from another source (e.g. [`examine_replica`]) and
    /// keeps the order: the most serious first, then by check and subject.
    pub fn extend(&mut self, findings: impl IntoIterator<Item = Finding>) {
        self.findings.extend(findings);
        sort(&mut self.findings);
    }
}

fn sort(findings: &mut [Finding]) {
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.check.cmp(&b.check))
            .then(a.subject.cmp(&b.subject))
    });
}

/// The default of [`Thresholds::unused_index_min_bytes`]: 1 MiB.
pub const DEFAULT_UNUSED_INDEX_MIN_BYTES: u64 = 1024 * 1024;
/// The default of [`Thresholds::idle_in_transaction`]: 1 minute.
pub const DEFAULT_IDLE_IN_TRANSACTION: Duration = Duration::from_secs(60);
/// The default of [`Thresholds::long_query`]: 1 minute.
pub const DEFAULT_LONG_QUERY: Duration = Duration::from_secs(60);
/// The default of [`Thresholds::dead_tuple_ratio`]: 20 %, where
/// autovacuum's default `autovacuum_vacuum_scale_factor` should have acted.
pub const DEFAULT_DEAD_TUPLE_RATIO: f64 = 0.2;
/// The dead-row share from which a table is critical: 50 %.
pub const DEAD_TUPLE_CRITICAL_RATIO: f64 = 0.5;
/// The default of [`Thresholds::dead_tuples_min_bytes`]: 10 MiB.
pub const DEFAULT_DEAD_TUPLES_MIN_BYTES: u64 = 10 * 1024 * 1024;
/// Tables with fewer dead rows than this are never reported: 1,000.
pub const DEAD_TUPLES_MIN_ROWS: i64 = 1_000;
/// The default of [`Thresholds::seq_scan_min_rows`]: 10,000 rows (PgHero's).
pub const DEFAULT_SEQ_SCAN_MIN_ROWS: i64 = 10_000;
/// Tables scanned fewer times than this are not judged: 50 scans.
pub const SEQ_SCAN_MIN_SCANS: i64 = 50;
/// A table is read mostly sequentially below this share of index scans: 95 % (PgHero's).
pub const SEQ_SCAN_INDEX_SHARE: f64 = 0.95;
/// The default of [`Thresholds::xid_age_critical`]: 1,000,000,000
/// transactions (47 % of the 2^31 limit).
pub const DEFAULT_XID_AGE_CRITICAL: i64 = 1_000_000_000;
/// The default warning age is this times `autovacuum_freeze_max_age` (the
/// multixact age: times `autovacuum_multixact_freeze_max_age`).
pub const XID_AGE_WARNING_FACTOR: f64 = 1.5;
/// The default of [`Thresholds::sequence_warning`]: 75 % used.
pub const DEFAULT_SEQUENCE_WARNING: f64 = 0.75;
/// The default of [`Thresholds::sequence_critical`]: 90 % used (PgHero's).
pub const DEFAULT_SEQUENCE_CRITICAL: f64 = 0.9;
/// The default of [`Thresholds::cache_hit_ratio`]: 99 % (PgHero's).
pub const DEFAULT_CACHE_HIT_RATIO: f64 = 0.99;
/// Below this hit ratio the cache is critical: 90 %.
pub const CACHE_HIT_CRITICAL_RATIO: f64 = 0.9;
/// The default of [`Thresholds::cache_min_blocks`]: 10,000 blocks read or hit.
pub const DEFAULT_CACHE_MIN_BLOCKS: i64 = 10_000;
/// The default of [`Thresholds::slot_retained_bytes`]: 1 GiB.
pub const DEFAULT_SLOT_RETAINED_BYTES: i64 = 1024 * 1024 * 1024;
/// The default of [`Thresholds::replica_lag_bytes`]: 64 MiB.
pub const DEFAULT_REPLICA_LAG_BYTES: i64 = 64 * 1024 * 1024;
/// The default of [`Thresholds::replica_lag`]: 10 s (`health.max_replica_lag`'s default).
pub const DEFAULT_REPLICA_LAG: Duration = Duration::from_secs(10);
/// The default of [`Thresholds::connections_ratio`]: 80 % of the usable connections.
pub const DEFAULT_CONNECTIONS_RATIO: f64 = 0.8;
/// From this share of the usable connections, critical: 95 %.
pub const CONNECTIONS_CRITICAL_RATIO: f64 = 0.95;
/// Time and size thresholds turn critical at this many times their value.
pub const CRITICAL_FACTOR: u32 = 10;

/// Where each check draws the line. `Thresholds::default()` holds the
/// `DEFAULT_*` constants; `pgstack doctor` has a flag for each field.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Thresholds {
    /// Unused indexes smaller than this are not reported.
    pub unused_index_min_bytes: u64,
    /// Sessions idle in a transaction at least this long are reported
    /// (critical from ten times as long).
    pub idle_in_transaction: Duration,
    /// Statements running at least this long are reported (critical from ten
    /// times as long).
    pub long_query: Duration,
    /// Tables whose dead rows are at least this share of all rows are
    /// reported (critical from [`DEAD_TUPLE_CRITICAL_RATIO`]).
    pub dead_tuple_ratio: f64,
    /// Tables smaller than this are not judged for dead rows.
    pub dead_tuples_min_bytes: u64,
    /// Tables with fewer live rows than this are not judged for sequential scans.
    pub seq_scan_min_rows: i64,
    /// The transaction-id age from which a database is a warning; `None`:
    /// [`XID_AGE_WARNING_FACTOR`] × `autovacuum_freeze_max_age`.
    pub xid_age_warning: Option<i64>,
    /// The transaction-id age from which a database is critical.
    pub xid_age_critical: i64,
    /// The share of a sequence's (or its column's) range used from which it
    /// is a warning.
    pub sequence_warning: f64,
    /// … and from which it is critical.
    pub sequence_critical: f64,
    /// Hit ratios below this are reported (critical below [`CACHE_HIT_CRITICAL_RATIO`]).
    pub cache_hit_ratio: f64,
    /// Hit ratios are judged only after this many blocks were read or hit.
    pub cache_min_blocks: i64,
    /// A slot holding at least this much WAL is critical (an inactive slot
    /// is always at least a warning).
    pub slot_retained_bytes: i64,
    /// A replica this many bytes of WAL behind is reported (critical from ten times).
    pub replica_lag_bytes: i64,
    /// A replica this far behind in time is reported (critical from ten times).
    pub replica_lag: Duration,
    /// Client connections from this share of the usable ones are reported
    /// (critical from [`CONNECTIONS_CRITICAL_RATIO`]).
    pub connections_ratio: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            unused_index_min_bytes: DEFAULT_UNUSED_INDEX_MIN_BYTES,
            idle_in_transaction: DEFAULT_IDLE_IN_TRANSACTION,
            long_query: DEFAULT_LONG_QUERY,
            dead_tuple_ratio: DEFAULT_DEAD_TUPLE_RATIO,
            dead_tuples_min_bytes: DEFAULT_DEAD_TUPLES_MIN_BYTES,
            seq_scan_min_rows: DEFAULT_SEQ_SCAN_MIN_ROWS,
            xid_age_warning: None,
            xid_age_critical: DEFAULT_XID_AGE_CRITICAL,
            sequence_warning: DEFAULT_SEQUENCE_WARNING,
            sequence_critical: DEFAULT_SEQUENCE_CRITICAL,
            cache_hit_ratio: DEFAULT_CACHE_HIT_RATIO,
            cache_min_blocks: DEFAULT_CACHE_MIN_BLOCKS,
            slot_retained_bytes: DEFAULT_SLOT_RETAINED_BYTES,
            replica_lag_bytes: DEFAULT_REPLICA_LAG_BYTES,
            replica_lag: DEFAULT_REPLICA_LAG,
            connections_ratio: DEFAULT_CONNECTIONS_RATIO,
        }
    }
}

/// What [`examine`] runs: which checks, with which thresholds.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Options {
    /// Where each check draws the line.
    pub thresholds: Thresholds,
    /// Run only these checks; empty runs them all.
    pub only: Vec<Check>,
}

impl Options {
    /// Whether `check` runs.
    pub fn runs(&self, check: Check) -> bool {
        self.only.is_empty() || self.only.contains(&check)
    }
}

/// The result of one check's queries.
type Found = Result<Vec<Finding>, pgstack_pool::tokio_postgres::Error>;

/// Runs the checks of `options` on the database `client` is connected to.
///
/// A check that fails is listed in [`Report::skipped`]; the others still run.
///
/// # Errors
/// Only when the first query (the server's version and role) fails: the
/// connection is not usable.
pub async fn examine(
    client: &Client,
    options: &Options,
) -> Result<Report, pgstack_pool::tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_database()::text, current_setting('server_version'), pg_is_in_recovery(), \
             (SELECT coalesce(stats_reset, pg_postmaster_start_time())::text FROM pg_stat_database \
              WHERE datname = current_database())",
            &[],
        )
        .await?;
    let mut report = Report {
        database: row.get(0),
        server_version: row.get(1),
        in_recovery: row.get(2),
        stats_since: row.get(3),
        checks: Vec::new(),
        findings: Vec::new(),
        skipped: Vec::new(),
    };
    let t = &options.thresholds;
    for check in Check::ALL {
        if !options.runs(check) {
            continue;
        }
        let found: Found = match check {
            Check::ForeignKeyWithoutIndex => indexes::fk_without_index(client).await,
            Check::UnusedIndex => indexes::unused(client, t, report.stats_since.as_deref()).await,
            Check::DuplicateIndex => indexes::duplicates(client).await,
            Check::RedundantIndex => indexes::redundant(client).await,
            Check::InvalidIndex => indexes::invalid(client).await,
            Check::InvalidConstraint => indexes::invalid_constraints(client).await,
            Check::IdleInTransaction => sessions::idle_in_transaction(client, t).await,
            Check::LongRunningQuery => sessions::long_running(client, t).await,
            Check::Connections => sessions::connections(client, t).await,
            Check::DeadTuples => tables::dead_tuples(client, t).await,
            Check::SequentialScans => {
                tables::seq_scans(client, t, report.stats_since.as_deref()).await
            }
            Check::XidWraparound => tables::wraparound(client, t).await,
            Check::SequenceExhaustion => tables::sequences(client, t).await,
            Check::CacheHitRatio => {
                tables::cache_hit(client, t, report.stats_since.as_deref()).await
            }
            Check::ReplicationSlot => replication::slots(client, t).await,
            Check::ReplicationLag if report.in_recovery => {
                replication::replica_lag(client, "this server", t).await
            }
            Check::ReplicationLag => replication::standbys(client, t).await,
        };
        report.checks.push(check);
        match found {
            Ok(findings) => report.findings.extend(findings),
            Err(error) => {
                tracing::debug!(%check, %error, "doctor: a check could not run");
                report.skipped.push(Skipped {
                    check,
                    reason: reason(&error),
                });
            }
        }
    }
    sort(&mut report.findings);
    Ok(report)
}

/// Checks a replica from its own side: how far its replay is behind what it
/// received, and whether replay is paused. `name` labels the findings
/// (e.g. the replica's redacted URL).
///
/// # Errors
/// When its queries fail (the server is not a replica: no finding, no error).
pub async fn examine_replica(
    client: &Client,
    name: &str,
    thresholds: &Thresholds,
) -> Result<Vec<Finding>, pgstack_pool::tokio_postgres::Error> {
    replication::replica_lag(client, name, thresholds).await
}

/// What a failed query says, for [`Skipped::reason`].
fn reason(error: &pgstack_pool::tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// `1234567` as `1,234,567`.
pub(crate) fn count(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Bytes for people: `12.0 MiB`.
pub(crate) fn bytes(n: i64) -> String {
    indicatif::HumanBytes(u64::try_from(n).unwrap_or(0)).to_string()
}

/// A share as a percentage with one decimal: `93.1%`.
pub(crate) fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// Seconds for people: `2m 5s`.
pub(crate) fn seconds(secs: f64) -> String {
    let whole = Duration::from_secs(secs.max(0.0).round() as u64);
    humantime::format_duration(whole).to_string()
}

/// A statement's text for evidence: one line, at most 120 characters, and
/// hidden when it mentions a password.
pub(crate) fn statement(text: Option<&str>) -> String {
    let Some(text) = text else {
        return "(not visible to this role)".to_owned();
    };
    if text.to_lowercase().contains("password") {
        return "(hidden: it mentions a password)".to_owned();
    }
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 120 {
        let cut: String = one_line.chars().take(117).collect();
        format!("{cut}...")
    } else {
        one_line
    }
}

/// An SQL string literal.
pub(crate) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for check in Check::ALL {
            assert_eq!(Check::from_name(check.name()), Some(check));
        }
        let mut names: Vec<_> = Check::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Check::ALL.len());
        assert_eq!(Check::from_name("nope"), None);
    }

    fn finding(check: Check, severity: Severity, subject: &str) -> Finding {
        Finding {
            check,
            severity,
            subject: subject.to_owned(),
            evidence: String::new(),
            why: String::new(),
            fix_sql: String::new(),
        }
    }

    #[test]
    fn exit_codes_follow_the_worst_finding_and_critical_comes_first() {
        let mut report = Report {
            database: "app".to_owned(),
            server_version: "15".to_owned(),
            in_recovery: false,
            stats_since: None,
            checks: Check::ALL.to_vec(),
            findings: Vec::new(),
            skipped: Vec::new(),
        };
        assert_eq!(report.exit_code(), 0);
        report.extend([finding(Check::UnusedIndex, Severity::Warning, "b")]);
        assert_eq!(report.exit_code(), 1);
        report.extend([
            finding(Check::ForeignKeyWithoutIndex, Severity::Warning, "a"),
            finding(Check::SequenceExhaustion, Severity::Critical, "s"),
        ]);
        assert_eq!(report.exit_code(), 2);
        let order: Vec<_> = report.findings.iter().map(|f| f.subject.as_str()).collect();
        assert_eq!(order, ["s", "a", "b"]);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(2_147_483_647), "2,147,483,647");
        assert_eq!(count(-12_345), "-12,345");
        assert_eq!(percent(0.9312), "93.1%");
        assert_eq!(seconds(125.4), "2m 5s");
    }

    #[test]
    fn statements_are_shortened_and_passwords_hidden() {
        assert_eq!(statement(Some("SELECT  1\n FROM t")), "SELECT 1 FROM t");
        assert_eq!(
            statement(Some("ALTER ROLE app PASSWORD 'x'")),
            "(hidden: it mentions a password)"
        );
        assert!(statement(Some(&"x".repeat(500))).ends_with("..."));
        assert_eq!(statement(None), "(not visible to this role)");
        assert_eq!(literal("it's"), "'it''s'");
    }
}
