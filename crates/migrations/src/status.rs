//! Status of a database against a set of migrations, and validation.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::error::Direction;
use crate::invalid::InvalidIndex;
use crate::lint::Finding;

/// One row of `_sqlx_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppliedRecord {
    /// The version.
    pub version: i64,
    /// The description recorded when it was applied.
    pub description: String,
    /// When it was applied.
    pub installed_on: Option<SystemTime>,
    /// `false` for a migration that failed outside a transaction (dirty).
    pub success: bool,
    /// The recorded checksum.
    pub checksum: Vec<u8>,
    /// How long it took, in nanoseconds; `-1` when it was baselined or skipped.
    pub execution_time_ns: i64,
}

/// Where one migration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MigrationState {
    /// Applied, and the file still matches.
    Applied,
    /// In the folder, not applied yet.
    Pending,
    /// Applied, but the file has changed since.
    ChecksumMismatch,
    /// Applied, but its file is gone.
    MissingFile,
    /// Marked failed: a no-transaction migration stopped part-way (dirty).
    Failed,
}

impl MigrationState {
    /// Whether this state makes `validate` fail and `up` refuse to run.
    pub fn is_problem(self) -> bool {
        matches!(
            self,
            MigrationState::ChecksumMismatch | MigrationState::MissingFile | MigrationState::Failed
        )
    }
}

impl fmt::Display for MigrationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigrationState::Applied => "applied",
            MigrationState::Pending => "pending",
            MigrationState::ChecksumMismatch => "checksum mismatch",
            MigrationState::MissingFile => "missing file",
            MigrationState::Failed => "failed (dirty)",
        })
    }
}

/// One line of a status report.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusEntry {
    /// The version.
    pub version: i64,
    /// The description (from the file, or as recorded when the file is gone).
    pub description: String,
    /// Where it stands.
    pub state: MigrationState,
    /// The up file, when there is one.
    pub file: Option<PathBuf>,
    /// When it was applied.
    pub installed_on: Option<SystemTime>,
    /// How long it took to apply, when recorded.
    pub execution_time: Option<Duration>,
}

/// The state of every migration known to the folder or the database.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// One entry per version, in version order.
    pub entries: Vec<StatusEntry>,
    /// Whether `_sqlx_migrations` exists yet.
    pub table_exists: bool,
    /// INVALID indexes in the database (left by a failed `CREATE INDEX
    /// CONCURRENTLY`, or being built right now), each with the migration
    /// that builds it when one does.
    pub invalid_indexes: Vec<InvalidIndex>,
}

impl Status {
    /// The entries in a given state.
    pub fn in_state(&self, state: MigrationState) -> impl Iterator<Item = &StatusEntry> {
        self.entries.iter().filter(move |e| e.state == state)
    }

    /// The highest applied version.
    pub fn current_version(&self) -> Option<i64> {
        self.entries
            .iter()
            .filter(|e| {
                matches!(
                    e.state,
                    MigrationState::Applied | MigrationState::ChecksumMismatch
                )
            })
            .map(|e| e.version)
            .max()
    }

    /// Whether nothing is pending and nothing is wrong.
    pub fn is_up_to_date(&self) -> bool {
        self.entries
            .iter()
            .all(|e| e.state == MigrationState::Applied)
    }

    /// The problems `validate` reports (without lint findings, which
    /// [`Migrator::validate`](crate::Migrator::validate) adds).
    pub fn validation(&self) -> Validation {
        Validation {
            problems: self
                .entries
                .iter()
                .filter(|e| e.state.is_problem())
                .cloned()
                .collect(),
            findings: Vec::new(),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.entries.is_empty() {
            f.write_str("no migrations")?;
            if self.invalid_indexes.is_empty() {
                return Ok(());
            }
            f.write_str("\n")?;
        }
        for e in &self.entries {
            writeln!(
                f,
                "{:>14}  {:<18} {}",
                e.version,
                e.state.to_string(),
                e.description
            )?;
        }
        for index in &self.invalid_indexes {
            writeln!(f, "INVALID index {index}: {}", invalid_advice(index, self))?;
        }
        Ok(())
    }
}

/// What to do about an INVALID index.
pub(crate) fn invalid_advice(index: &InvalidIndex, status: &Status) -> String {
    let failed = index.version.filter(|v| {
        status
            .entries
            .iter()
            .any(|e| e.version == *v && e.state == MigrationState::Failed)
    });
    match failed {
        Some(v) => format!(
            "left by the failed migration {v}; `migrate forget-failed {v}` drops it and clears \
             the mark"
        ),
        None => format!(
            "queries ignore it but writes still maintain it; unless it is being built right now, \
             DROP INDEX CONCURRENTLY {} (or REINDEX INDEX CONCURRENTLY it)",
            index.qualified_name()
        ),
    }
}

/// The outcome of `validate`: every applied migration whose file changed,
/// vanished, or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Validation {
    /// The entries with a problem; empty when the database is consistent.
    pub problems: Vec<StatusEntry>,
    /// The linter's findings in the pending migrations: warnings, which do
    /// not make the validation fail.
    pub findings: Vec<Finding>,
}

impl Validation {
    /// Whether no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// `Ok(())` when valid, otherwise [`crate::Error::Invalid`]; a tool maps
    /// the error to a non-zero exit status.
    ///
    /// # Errors
    /// [`crate::Error::Invalid`] with this report.
    pub fn into_result(self) -> crate::Result<()> {
        if self.is_ok() {
            Ok(())
        } else {
            Err(crate::Error::Invalid(self))
        }
    }
}

impl fmt::Display for Validation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_problems(f)?;
        if !self.findings.is_empty() {
            write!(
                f,
                "\n{} lint finding(s) in the pending migrations:",
                self.findings.len()
            )?;
            write_findings(f, &self.findings)?;
        }
        Ok(())
    }
}

/// One line per finding: `file:line: severity [rule] message`.
pub(crate) fn write_findings(f: &mut fmt::Formatter<'_>, findings: &[Finding]) -> fmt::Result {
    for finding in findings {
        write!(
            f,
            "\n  {}:{}: {} [{}] {}",
            finding.file.display(),
            finding.line,
            finding.severity,
            finding.rule,
            finding.message
        )?;
    }
    Ok(())
}

impl Validation {
    fn write_problems(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.is_empty() {
            return f.write_str("all applied migrations match their files");
        }
        write!(
            f,
            "{} applied migration(s) do not match the folder:",
            self.problems.len()
        )?;
        for p in &self.problems {
            let file = p
                .file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default();
            let advice = match p.state {
                MigrationState::ChecksumMismatch => {
                    "the file changed after it was applied; restore it and put the change in a new migration"
                }
                MigrationState::MissingFile => "the file is gone; restore it",
                MigrationState::Failed => {
                    "it failed outside a transaction; repair by hand, then `migrate forget-failed`"
                }
                _ => "",
            };
            write!(
                f,
                "\n  {} {} {}: {} ({advice})",
                p.version, p.description, file, p.state
            )?;
        }
        Ok(())
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PlannedStep {
    /// The version.
    pub version: i64,
    /// Its description.
    pub description: String,
    /// Up or down.
    pub direction: Direction,
    /// The file that would run.
    pub file: PathBuf,
    /// The SQL that would run.
    pub sql: String,
    /// Whether it would run outside a transaction.
    pub no_transaction: bool,
}

/// What `up` or `down` would do, computed without changing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Plan {
    /// The steps in the order they would run.
    pub steps: Vec<PlannedStep>,
    /// The linter's findings in the planned scripts (warnings; the plan
    /// runs all the same).
    pub findings: Vec<Finding>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            return f.write_str("-- nothing to do\n");
        }
        for s in &self.steps {
            writeln!(
                f,
                "-- {} {} {} ({}){}",
                s.direction,
                s.version,
                s.description,
                s.file.display(),
                if s.no_transaction {
                    ", outside a transaction"
                } else {
                    ""
                }
            )?;
            for finding in self
                .findings
                .iter()
                .filter(|x| x.version == Some(s.version) && x.file == s.file)
            {
                writeln!(
                    f,
                    "-- lint {} [{}] line {}: {}",
                    finding.severity, finding.rule, finding.line, finding.message
                )?;
            }
            f.write_str(&s.sql)?;
            if !s.sql.ends_with('\n') {
                f.write_str("\n")?;
            }
        }
        Ok(())
    }
}

/// One migration a run applied or reverted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Step {
    /// The version.
    pub version: i64,
    /// Its description.
    pub description: String,
    /// Up or down.
    pub direction: Direction,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Report {
    /// The migrations applied or reverted, in order.
    pub steps: Vec<Step>,
    /// Versions recorded by `baseline` without running them.
    pub baselined: Vec<i64>,
    /// How long the migrator waited for the lock.
    pub lock_wait: Duration,
    /// How long the whole run took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether the schema changed (anything applied or reverted). After a
    /// change, pooled connections should drop cached statements.
    pub fn schema_changed(&self) -> bool {
        !self.steps.is_empty()
    }

    /// The versions applied or reverted.
    pub fn changed_versions(&self) -> Vec<i64> {
        self.steps.iter().map(|s| s.version).collect()
    }
}
