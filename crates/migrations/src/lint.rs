//! The linter: lock hazards and breaking changes in migration files, found
//! before they run.
//!
//! The rules follow squawk's and strong_migrations' (the ids are squawk's
//! where there is one). Each statement is read from sqlparser's tokens (see
//! `scan`), so keywords inside strings, comments, dollar-quoted bodies and
//! quoted names never count. A table created in the same migration is new
//! and empty: the rules about existing tables leave it alone.
//!
//! A finding is accepted knowingly with a comment naming its rule, in the
//! comments just above the statement, inside it, or after its `;` on the
//! same line:
//!
//! ```sql
//! -- pgstack:allow ban-drop-column (the code stopped reading it in v41)
//! ALTER TABLE bills DROP COLUMN legacy_code;
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use sqlparser::tokenizer::Token;

use crate::scan::{self, Name, Statement};
use crate::source::{Migration, Migrations, NO_TRANSACTION_MARKER};

/// The comment prefix that accepts a finding: `-- pgstack:allow RULE`.
pub const ALLOW_MARKER: &str = "pgstack:allow";

/// How serious a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Severity {
    /// Worth a look; usually fine once the code no longer depends on what
    /// changes.
    Warning,
    /// Blocks reads or writes for as long as the table takes to scan or
    /// rewrite, breaks running code, or fails at run time.
    Error,
}

impl Severity {
    /// `"warning"` or `"error"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule of the linter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Rule {
    /// `CREATE INDEX` without `CONCURRENTLY` on an existing table.
    RequireConcurrentIndexCreation,
    /// `DROP INDEX` without `CONCURRENTLY`.
    RequireConcurrentIndexDeletion,
    /// A foreign key added to an existing table without `NOT VALID`.
    AddingForeignKeyConstraint,
    /// A `CHECK` constraint added to an existing table without `NOT VALID`.
    ConstraintMissingNotValid,
    /// `ALTER COLUMN … SET NOT NULL` on an existing table.
    AddingNotNullableField,
    /// `ALTER COLUMN … TYPE` on an existing table.
    ChangingColumnType,
    /// `ADD COLUMN` with a volatile default, a serial type, an identity or a
    /// stored generated column.
    AddingFieldWithDefault,
    /// A primary key added to an existing table other than `USING INDEX`.
    AddingSerialPrimaryKeyField,
    /// A unique constraint added to an existing table other than `USING
    /// INDEX`.
    DisallowedUniqueConstraint,
    /// `ALTER TABLE … RENAME [COLUMN] … TO …`.
    RenamingColumn,
    /// `ALTER TABLE … RENAME TO …`.
    RenamingTable,
    /// `ALTER TABLE … DROP [COLUMN]`.
    BanDropColumn,
    /// `DROP TABLE`.
    BanDropTable,
    /// `VACUUM FULL`.
    BanVacuumFull,
    /// `CLUSTER`.
    BanCluster,
    /// `LOCK TABLE`.
    BanLockTable,
    /// A `CONCURRENTLY` index operation where it cannot run: in a
    /// transactional migration, or beside other statements.
    BanConcurrentIndexCreationInTransaction,
    /// A file the linter could not read.
    UnreadableSql,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 18] = [
        Rule::RequireConcurrentIndexCreation,
        Rule::RequireConcurrentIndexDeletion,
        Rule::AddingForeignKeyConstraint,
        Rule::ConstraintMissingNotValid,
        Rule::AddingNotNullableField,
        Rule::ChangingColumnType,
        Rule::AddingFieldWithDefault,
        Rule::AddingSerialPrimaryKeyField,
        Rule::DisallowedUniqueConstraint,
        Rule::RenamingColumn,
        Rule::RenamingTable,
        Rule::BanDropColumn,
        Rule::BanDropTable,
        Rule::BanVacuumFull,
        Rule::BanCluster,
        Rule::BanLockTable,
        Rule::BanConcurrentIndexCreationInTransaction,
        Rule::UnreadableSql,
    ];

    /// The rule's id, as written in `-- pgstack:allow` comments.
    pub fn id(self) -> &'static str {
        match self {
            Rule::RequireConcurrentIndexCreation => "require-concurrent-index-creation",
            Rule::RequireConcurrentIndexDeletion => "require-concurrent-index-deletion",
            Rule::AddingForeignKeyConstraint => "adding-foreign-key-constraint",
            Rule::ConstraintMissingNotValid => "constraint-missing-not-valid",
            Rule::AddingNotNullableField => "adding-not-nullable-field",
            Rule::ChangingColumnType => "changing-column-type",
            Rule::AddingFieldWithDefault => "adding-field-with-default",
            Rule::AddingSerialPrimaryKeyField => "adding-serial-primary-key-field",
            Rule::DisallowedUniqueConstraint => "disallowed-unique-constraint",
            Rule::RenamingColumn => "renaming-column",
            Rule::RenamingTable => "renaming-table",
            Rule::BanDropColumn => "ban-drop-column",
            Rule::BanDropTable => "ban-drop-table",
            Rule::BanVacuumFull => "ban-vacuum-full",
            Rule::BanCluster => "ban-cluster",
            Rule::BanLockTable => "ban-lock-table",
            Rule::BanConcurrentIndexCreationInTransaction => {
                "ban-concurrent-index-creation-in-transaction"
            }
            Rule::UnreadableSql => "unreadable-sql",
        }
    }

    /// The rule with this id.
    pub fn from_id(id: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.id() == id)
    }

    /// How serious its findings are.
    pub fn severity(self) -> Severity {
        match self {
            Rule::BanDropColumn | Rule::BanDropTable | Rule::BanLockTable | Rule::UnreadableSql => {
                Severity::Warning
            }
            _ => Severity::Error,
        }
    }

    /// Why it matters.
    pub fn why(self) -> &'static str {
        match self {
            Rule::RequireConcurrentIndexCreation => {
                "a plain CREATE INDEX holds a SHARE lock on the table for the whole build: every \
                 INSERT, UPDATE and DELETE waits until the index is built"
            }
            Rule::RequireConcurrentIndexDeletion => {
                "DROP INDEX takes an ACCESS EXCLUSIVE lock on the table: every read and write \
                 queues behind it, and behind whatever it waits for"
            }
            Rule::AddingForeignKeyConstraint => {
                "adding a foreign key checks every existing row while holding a SHARE ROW \
                 EXCLUSIVE lock on both tables: writes to both wait for the whole scan"
            }
            Rule::ConstraintMissingNotValid => {
                "adding a CHECK constraint scans every row under an ACCESS EXCLUSIVE lock: reads \
                 and writes wait for the whole scan (and validating it in the transaction that \
                 added it keeps that lock through the scan)"
            }
            Rule::AddingNotNullableField => {
                "SET NOT NULL scans the whole table for NULLs under an ACCESS EXCLUSIVE lock: \
                 reads and writes wait for the whole scan"
            }
            Rule::ChangingColumnType => {
                "changing a column's type rewrites the table and its indexes under an ACCESS \
                 EXCLUSIVE lock (a few changes, such as varchar(n) to text, only take the lock \
                 briefly), and running code may break on the new type"
            }
            Rule::AddingFieldWithDefault => {
                "a default computed per row (a volatile function, a serial, an identity or a \
                 stored generated column) rewrites the whole table under an ACCESS EXCLUSIVE \
                 lock; a constant or stable default such as now() is stored once and costs \
                 nothing (PostgreSQL 11+)"
            }
            Rule::AddingSerialPrimaryKeyField => {
                "adding a primary key builds its unique index (and checks for NULLs) under an \
                 ACCESS EXCLUSIVE lock: reads and writes wait for the whole build"
            }
            Rule::DisallowedUniqueConstraint => {
                "adding a unique constraint builds its index under an ACCESS EXCLUSIVE lock: \
                 reads and writes wait for the whole build"
            }
            Rule::RenamingColumn => {
                "the code that is running still uses the old name and fails as soon as the \
                 migration commits"
            }
            Rule::RenamingTable => {
                "the code that is running still uses the old name and fails as soon as the \
                 migration commits"
            }
            Rule::BanDropColumn => {
                "code that still reads or writes the column fails once it is gone, and its data \
                 is lost"
            }
            Rule::BanDropTable => {
                "code that still uses the table fails once it is gone, and its data is lost"
            }
            Rule::BanVacuumFull => {
                "VACUUM FULL rewrites the table under an ACCESS EXCLUSIVE lock: reads and writes \
                 wait for the whole rewrite"
            }
            Rule::BanCluster => {
                "CLUSTER rewrites the table under an ACCESS EXCLUSIVE lock: reads and writes wait \
                 for the whole rewrite"
            }
            Rule::BanLockTable => {
                "an explicit lock is held until the migration ends; a strong one blocks every \
                 reader and writer of the table for the rest of the migration"
            }
            Rule::BanConcurrentIndexCreationInTransaction => {
                "PostgreSQL refuses CONCURRENTLY inside a transaction block (SQLSTATE 25001), \
                 and it runs a file of several statements as one implicit transaction: the \
                 migration fails when it runs"
            }
            Rule::UnreadableSql => {
                "the linter could not split the file into statements, so it checked nothing in \
                 it; PostgreSQL will most likely reject it as well"
            }
        }
    }

    /// The safe way to do the same.
    pub fn fix(self) -> &'static str {
        match self {
            Rule::RequireConcurrentIndexCreation => {
                "CREATE INDEX CONCURRENTLY, alone in a migration file whose first line is \
                 `-- no-transaction`"
            }
            Rule::RequireConcurrentIndexDeletion => {
                "DROP INDEX CONCURRENTLY, alone in a `-- no-transaction` migration file"
            }
            Rule::AddingForeignKeyConstraint => {
                "ALTER TABLE … ADD CONSTRAINT … FOREIGN KEY … NOT VALID, then ALTER TABLE … \
                 VALIDATE CONSTRAINT … in a later migration (validating lets reads and writes go \
                 on)"
            }
            Rule::ConstraintMissingNotValid => {
                "ALTER TABLE … ADD CONSTRAINT … CHECK (…) NOT VALID, then ALTER TABLE … VALIDATE \
                 CONSTRAINT … in a later migration"
            }
            Rule::AddingNotNullableField => {
                "ADD CONSTRAINT … CHECK (col IS NOT NULL) NOT VALID, VALIDATE it in a later \
                 migration, then SET NOT NULL (PostgreSQL 12+ trusts the validated check and \
                 skips the scan: allow this rule on that statement) and drop the check"
            }
            Rule::ChangingColumnType => {
                "add a column of the new type, write to both, backfill in batches, move the \
                 reads, then drop the old column"
            }
            Rule::AddingFieldWithDefault => {
                "add the column without a default (or with a constant one), SET DEFAULT for new \
                 rows, then backfill the existing rows in batches"
            }
            Rule::AddingSerialPrimaryKeyField => {
                "CREATE UNIQUE INDEX CONCURRENTLY in a `-- no-transaction` migration, then ALTER \
                 TABLE … ADD CONSTRAINT … PRIMARY KEY USING INDEX …"
            }
            Rule::DisallowedUniqueConstraint => {
                "CREATE UNIQUE INDEX CONCURRENTLY in a `-- no-transaction` migration, then ALTER \
                 TABLE … ADD CONSTRAINT … UNIQUE USING INDEX …"
            }
            Rule::RenamingColumn => {
                "add the new column, write to both, backfill, move the reads, then drop the old \
                 one; or first deploy code that works with both names"
            }
            Rule::RenamingTable => {
                "first deploy code that works with both names (e.g. a view with the old name \
                 over the renamed table), then rename"
            }
            Rule::BanDropColumn => {
                "first deploy code that no longer uses the column, then drop it, marked `-- \
                 pgstack:allow ban-drop-column`"
            }
            Rule::BanDropTable => {
                "first deploy code that no longer uses the table (and keep a backup), then drop \
                 it, marked `-- pgstack:allow ban-drop-table`"
            }
            Rule::BanVacuumFull => {
                "plain VACUUM, which does not block; pg_repack or pg_squeeze for an online \
                 rewrite"
            }
            Rule::BanCluster => {
                "pg_repack for an online reorder, or CLUSTER in a maintenance window"
            }
            Rule::BanLockTable => {
                "let each statement take the lock it needs; if the explicit lock is needed, keep \
                 the migration short and mark it `-- pgstack:allow ban-lock-table`"
            }
            Rule::BanConcurrentIndexCreationInTransaction => {
                "put the statement alone in a migration file of its own whose first line is `-- \
                 no-transaction`"
            }
            Rule::UnreadableSql => "close the string, quoted name or comment",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// One hazard found in a migration file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Finding {
    /// The rule.
    pub rule: Rule,
    /// How serious it is (the rule's severity).
    pub severity: Severity,
    /// The migration's version, when the file belongs to a set of migrations.
    pub version: Option<i64>,
    /// The file.
    pub file: PathBuf,
    /// The 1-based line of the statement (of the clause, for one clause of
    /// an `ALTER TABLE`).
    pub line: u32,
    /// The statement, whitespace collapsed, cut to about 120 characters.
    pub statement: String,
    /// What was found, in words.
    pub message: String,
}

impl Finding {
    /// Why it matters.
    pub fn why(&self) -> &'static str {
        self.rule.why()
    }

    /// The safe way to do the same.
    pub fn fix(&self) -> &'static str {
        self.rule.fix()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {} [{}] {}\n    {}\n    why: {}\n    instead: {}",
            self.file.display(),
            self.line,
            self.severity,
            self.rule,
            self.message,
            self.statement,
            self.why(),
            self.fix()
        )
    }
}

/// The findings of one lint run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LintReport {
    /// Every finding, by version, then file and line.
    pub findings: Vec<Finding>,
    /// How many files were read.
    pub files: usize,
    /// How many findings `-- pgstack:allow` comments accepted.
    pub allowed: usize,
}

impl LintReport {
    /// Whether a finding of [`Severity::Error`] is among them (a tool exits
    /// non-zero then).
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The findings of one severity.
    pub fn of_severity(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity == severity)
    }

    fn extend(&mut self, other: LintReport) {
        self.findings.extend(other.findings);
        self.files += other.files;
        self.allowed += other.allowed;
    }
}

impl fmt::Display for LintReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        let errors = self.of_severity(Severity::Error).count();
        let warnings = self.of_severity(Severity::Warning).count();
        write!(
            f,
            "{} file(s) checked: {errors} error(s), {warnings} warning(s)",
            self.files
        )?;
        if self.allowed > 0 {
            write!(f, ", {} allowed by `-- {ALLOW_MARKER}`", self.allowed)?;
        }
        Ok(())
    }
}

impl Migrations {
    /// Lints the up script of every migration (no database needed).
    pub fn lint(&self) -> LintReport {
        lint_migrations(self.iter())
    }
}

/// Lints the up scripts of `migrations`.
pub(crate) fn lint_migrations<'a>(
    migrations: impl IntoIterator<Item = &'a Migration>,
) -> LintReport {
    let mut report = LintReport::default();
    for m in migrations {
        let up = m.up();
        report.extend(lint_text(
            up.path(),
            Some(m.version()),
            up.sql(),
            up.no_transaction(),
        ));
    }
    report
}

/// Lints one migration file's text; a first line `-- no-transaction` means
/// it runs outside a transaction, as for the migrator.
pub fn lint_sql(file: impl AsRef<Path>, sql: &str) -> LintReport {
    lint_text(
        file.as_ref(),
        None,
        sql,
        sql.starts_with(NO_TRANSACTION_MARKER),
    )
}

pub(crate) fn lint_text(
    file: &Path,
    version: Option<i64>,
    sql: &str,
    no_transaction: bool,
) -> LintReport {
    let mut report = LintReport {
        files: 1,
        ..LintReport::default()
    };
    let statements = match scan::statements(sql) {
        Ok(statements) => statements,
        Err(e) => {
            report.findings.push(Finding {
                rule: Rule::UnreadableSql,
                severity: Rule::UnreadableSql.severity(),
                version,
                file: file.to_owned(),
                line: e.line,
                statement: String::new(),
                message: format!("cannot read the file from line {}: {}", e.line, e.message),
            });
            return report;
        }
    };
    let mut linter = Linter {
        created_tables: HashSet::new(),
        created_indexes: HashSet::new(),
        not_valid: HashSet::new(),
        no_transaction,
        several: statements.len() > 1,
        raw: Vec::new(),
    };
    for s in &statements {
        linter.note_created(s);
    }
    for (i, s) in statements.iter().enumerate() {
        linter.statement(i, s);
    }
    for raw in linter.raw {
        let s = &statements[raw.statement];
        if allowed(s).contains(raw.rule.id()) {
            report.allowed += 1;
            continue;
        }
        report.findings.push(Finding {
            rule: raw.rule,
            severity: raw.rule.severity(),
            version,
            file: file.to_owned(),
            line: raw.line,
            statement: s.excerpt(sql, 120),
            message: raw.message,
        });
    }
    report
}

/// The rule ids a statement's `pgstack:allow` comments name.
fn allowed(s: &Statement) -> HashSet<&str> {
    s.comments
        .iter()
        .filter_map(|c| {
            let text = c.text.trim();
            let text = text.strip_prefix('*').unwrap_or(text).trim_start();
            text.strip_prefix(ALLOW_MARKER)
        })
        .flat_map(|rest| {
            rest.split(|c: char| c.is_whitespace() || c == ',')
                .filter(|id| !id.is_empty())
                .take_while(|id| !id.starts_with('('))
        })
        .collect()
}

/// Functions whose value differs per row: a default calling one is
/// computed for every existing row.
const VOLATILE: [&str; 11] = [
    "clock_timestamp",
    "random",
    "random_normal",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "uuidv4",
    "uuidv7",
    "nextval",
    "timeofday",
];

const SERIAL_TYPES: [&str; 6] = [
    "serial",
    "bigserial",
    "smallserial",
    "serial2",
    "serial4",
    "serial8",
];

struct RawFinding {
    rule: Rule,
    statement: usize,
    line: u32,
    message: String,
}

struct Linter {
    /// Tables (and materialized views) this migration creates, by name.
    created_tables: HashSet<String>,
    /// Indexes this migration creates, by name.
    created_indexes: HashSet<String>,
    /// Constraints this migration adds `NOT VALID` to an existing table.
    not_valid: HashSet<String>,
    no_transaction: bool,
    several: bool,
    raw: Vec<RawFinding>,
}

impl Linter {
    fn report(&mut self, rule: Rule, statement: usize, line: u32, message: String) {
        self.raw.push(RawFinding {
            rule,
            statement,
            line,
            message,
        });
    }

    fn is_new(&self, table: &Name) -> bool {
        self.created_tables.contains(&table.name)
    }

    fn note_created(&mut self, s: &Statement) {
        if let Some(index) = scan::created_index(s)
            && let Some(name) = index.name
        {
            self.created_indexes.insert(name.name);
        }
        if !s.kw(0, "CREATE") {
            return;
        }
        let mut i = 1;
        while [
            "GLOBAL",
            "LOCAL",
            "TEMP",
            "TEMPORARY",
            "UNLOGGED",
            "OR",
            "REPLACE",
        ]
        .iter()
        .any(|k| s.kw(i, k))
        {
            i += 1;
        }
        if s.kw(i, "TABLE") {
            i += 1;
        } else if s.kw(i, "MATERIALIZED") && s.kw(i + 1, "VIEW") {
            i += 2;
        } else {
            return;
        }
        if s.kw(i, "IF") && s.kw(i + 1, "NOT") && s.kw(i + 2, "EXISTS") {
            i += 3;
        }
        if let Some(name) = s.name_at(i) {
            self.created_tables.insert(name.name);
        }
    }

    fn statement(&mut self, idx: usize, s: &Statement) {
        if let Some(what) = scan::concurrent_operation(s) {
            if !self.no_transaction {
                self.report(
                    Rule::BanConcurrentIndexCreationInTransaction,
                    idx,
                    s.line_at(0),
                    format!(
                        "{what} in a migration that runs in a transaction (its file does not \
                         start with `-- no-transaction`)"
                    ),
                );
            } else if self.several {
                self.report(
                    Rule::BanConcurrentIndexCreationInTransaction,
                    idx,
                    s.line_at(0),
                    format!(
                        "{what} beside other statements in a `-- no-transaction` file, which \
                         PostgreSQL runs as one implicit transaction"
                    ),
                );
            }
        }
        if s.kw(0, "CREATE") {
            self.create_index(idx, s);
        } else if s.kw(0, "DROP") {
            self.drop(idx, s);
        } else if s.kw(0, "ALTER") && s.kw(1, "TABLE") {
            self.alter_table(idx, s);
        } else if s.kw(0, "VACUUM") {
            if vacuum_full(s) {
                self.report(
                    Rule::BanVacuumFull,
                    idx,
                    s.line_at(0),
                    "VACUUM FULL rewrites the table".to_owned(),
                );
            }
        } else if s.kw(0, "CLUSTER") {
            self.report(
                Rule::BanCluster,
                idx,
                s.line_at(0),
                "CLUSTER rewrites the table".to_owned(),
            );
        } else if s.kw(0, "LOCK") {
            let at = if s.kw(1, "TABLE") { 2 } else { 1 };
            let table = s.name_at(at).map_or_else(String::new, |n| n.display());
            let mode = lock_mode(s);
            self.report(
                Rule::BanLockTable,
                idx,
                s.line_at(0),
                format!("explicit LOCK TABLE {table} IN {mode} MODE"),
            );
        }
    }

    fn create_index(&mut self, idx: usize, s: &Statement) {
        let Some(index) = scan::created_index(s) else {
            return;
        };
        // `ON ONLY` makes a partitioned table's own (invalid, empty) index,
        // at once; the partitions' indexes are built and attached one by one.
        if index.concurrently || index.only {
            return;
        }
        let Some(table) = index.table else {
            return;
        };
        if self.is_new(&table) {
            return;
        }
        let name = index
            .name
            .map(|n| format!(" {}", n.display()))
            .unwrap_or_default();
        self.report(
            Rule::RequireConcurrentIndexCreation,
            idx,
            s.line_at(0),
            format!(
                "CREATE INDEX{name} on {} without CONCURRENTLY (the table exists before this \
                 migration)",
                table.display()
            ),
        );
    }

    fn drop(&mut self, idx: usize, s: &Statement) {
        if s.kw(1, "INDEX") {
            let mut i = 2;
            if s.kw(i, "CONCURRENTLY") {
                return;
            }
            if s.kw(i, "IF") && s.kw(i + 1, "EXISTS") {
                i += 2;
            }
            let names = names_from(s, i);
            if names.is_empty() || names.iter().all(|n| self.created_indexes.contains(&n.name)) {
                return;
            }
            let list: Vec<String> = names.iter().map(Name::display).collect();
            self.report(
                Rule::RequireConcurrentIndexDeletion,
                idx,
                s.line_at(0),
                format!("DROP INDEX {} without CONCURRENTLY", list.join(", ")),
            );
        } else if s.kw(1, "TABLE") {
            let mut i = 2;
            if s.kw(i, "IF") && s.kw(i + 1, "EXISTS") {
                i += 2;
            }
            let names: Vec<Name> = names_from(s, i)
                .into_iter()
                .filter(|n| !self.is_new(n))
                .collect();
            if names.is_empty() {
                return;
            }
            let list: Vec<String> = names.iter().map(Name::display).collect();
            self.report(
                Rule::BanDropTable,
                idx,
                s.line_at(0),
                format!("DROP TABLE {}", list.join(", ")),
            );
        }
    }

    fn alter_table(&mut self, idx: usize, s: &Statement) {
        let mut i = 2;
        if s.kw(i, "IF") && s.kw(i + 1, "EXISTS") {
            i += 2;
        }
        if s.kw(i, "ONLY") {
            i += 1;
        }
        if s.kw(i, "ALL") {
            return; // ALTER TABLE ALL IN TABLESPACE
        }
        let Some(table) = s.name_at(i) else {
            return;
        };
        i = table.next;
        if s.token(i) == Some(&Token::Mul) {
            i += 1;
        }
        if self.is_new(&table) {
            return;
        }
        for (start, end) in clauses(s, i) {
            self.clause(idx, s, &table, start, end);
        }
    }

    /// One clause (`ADD …`, `ALTER COLUMN …`, …) of an `ALTER TABLE` on an
    /// existing table: tokens `start..end`.
    fn clause(&mut self, idx: usize, s: &Statement, table: &Name, start: usize, end: usize) {
        let line = s.line_at(start);
        let t = table.display();
        let kw = |i: usize, k: &str| i < end && s.kw(i, k);
        if kw(start, "ADD") {
            let mut i = start + 1;
            let mut constraint = None;
            if kw(i, "CONSTRAINT") {
                constraint = s.name_at(i + 1).map(|n| n.name);
                i = s.name_at(i + 1).map_or(i + 1, |n| n.next);
            }
            let table_constraint = ["PRIMARY", "UNIQUE", "FOREIGN", "CHECK", "EXCLUDE"]
                .iter()
                .any(|k| kw(i, k));
            if constraint.is_some() || table_constraint {
                self.table_constraint(idx, s, &t, i, end, constraint);
                return;
            }
            if kw(i, "COLUMN") {
                i += 1;
            }
            if kw(i, "IF") && kw(i + 1, "NOT") && kw(i + 2, "EXISTS") {
                i += 3;
            }
            self.column_definition(idx, s, &t, i, end);
        } else if kw(start, "ALTER") {
            let mut i = start + 1;
            if kw(i, "COLUMN") {
                i += 1;
            }
            let column = s.name_at(i).map_or_else(String::new, |n| n.name);
            i = s.name_at(i).map_or(i, |n| n.next);
            if kw(i, "SET") && kw(i + 1, "NOT") && kw(i + 2, "NULL") {
                self.report(
                    Rule::AddingNotNullableField,
                    idx,
                    line,
                    format!("SET NOT NULL on {t}.{column} scans the existing table"),
                );
            } else if kw(i, "TYPE") || (kw(i, "SET") && kw(i + 1, "DATA") && kw(i + 2, "TYPE")) {
                self.report(
                    Rule::ChangingColumnType,
                    idx,
                    line,
                    format!("changes the type of {t}.{column}"),
                );
            }
        } else if kw(start, "DROP") {
            if kw(start + 1, "CONSTRAINT") {
                return;
            }
            let mut i = start + 1;
            if kw(i, "COLUMN") {
                i += 1;
            }
            if kw(i, "IF") && kw(i + 1, "EXISTS") {
                i += 2;
            }
            let column = s.name_at(i).map_or_else(String::new, |n| n.name);
            self.report(
                Rule::BanDropColumn,
                idx,
                line,
                format!("drops the column {t}.{column}"),
            );
        } else if kw(start, "RENAME") {
            if kw(start + 1, "CONSTRAINT") {
                return;
            }
            if kw(start + 1, "TO") {
                let to = s.name_at(start + 2).map_or_else(String::new, |n| n.name);
                self.report(
                    Rule::RenamingTable,
                    idx,
                    line,
                    format!("renames the table {t} to {to}"),
                );
                return;
            }
            let i = if kw(start + 1, "COLUMN") {
                start + 2
            } else {
                start + 1
            };
            let from = s.name_at(i).map_or_else(String::new, |n| n.name);
            let to = s
                .name_at(i)
                .filter(|n| kw(n.next, "TO"))
                .and_then(|n| s.name_at(n.next + 1))
                .map_or_else(String::new, |n| n.name);
            self.report(
                Rule::RenamingColumn,
                idx,
                line,
                format!("renames the column {t}.{from} to {to}"),
            );
        } else if kw(start, "VALIDATE") && kw(start + 1, "CONSTRAINT") {
            // One file is one transaction: an explicit one, or the implicit
            // one PostgreSQL wraps several statements of a
            // `-- no-transaction` file in.
            let Some(name) = s.name_at(start + 2) else {
                return;
            };
            if self.not_valid.contains(&name.name) {
                self.report(
                    Rule::ConstraintMissingNotValid,
                    idx,
                    line,
                    format!(
                        "validates {} in the transaction that added it NOT VALID: the lock \
                         taken by ADD is held through the validating scan",
                        name.name
                    ),
                );
            }
        }
    }

    /// `ADD [CONSTRAINT name] PRIMARY KEY | UNIQUE | FOREIGN KEY | CHECK …`,
    /// the kind starting at `i`.
    fn table_constraint(
        &mut self,
        idx: usize,
        s: &Statement,
        table: &str,
        i: usize,
        end: usize,
        name: Option<String>,
    ) {
        let line = s.line_at(i);
        let has = |k: &str| (i..end).any(|j| s.kw(j, k));
        let not_valid = (i..end).any(|j| s.kw(j, "NOT") && s.kw(j + 1, "VALID") && j + 1 < end);
        let using_index = (i..end).any(|j| s.kw(j, "USING") && s.kw(j + 1, "INDEX") && j + 1 < end);
        let called = name.as_ref().map(|n| format!(" {n}")).unwrap_or_default();
        if s.kw(i, "FOREIGN") {
            if not_valid {
                self.not_valid.extend(name);
            } else {
                self.report(
                    Rule::AddingForeignKeyConstraint,
                    idx,
                    line,
                    format!("adds the foreign key{called} to {table} without NOT VALID"),
                );
            }
        } else if s.kw(i, "CHECK") {
            if not_valid {
                self.not_valid.extend(name);
            } else {
                self.report(
                    Rule::ConstraintMissingNotValid,
                    idx,
                    line,
                    format!("adds the CHECK constraint{called} to {table} without NOT VALID"),
                );
            }
        } else if s.kw(i, "UNIQUE") && !using_index {
            self.report(
                Rule::DisallowedUniqueConstraint,
                idx,
                line,
                format!("adds the UNIQUE constraint{called} to {table}, building its index"),
            );
        } else if s.kw(i, "PRIMARY") && has("KEY") && !using_index {
            self.report(
                Rule::AddingSerialPrimaryKeyField,
                idx,
                line,
                format!("adds the primary key{called} to {table}, building its index"),
            );
        }
    }

    /// `ADD [COLUMN] name type [constraints…]`, the name at `i`.
    fn column_definition(&mut self, idx: usize, s: &Statement, table: &str, i: usize, end: usize) {
        let line = s.line_at(i);
        let Some(column) = s.name_at(i) else {
            return;
        };
        let col = format!("{table}.{}", column.name);
        // The words outside parentheses, with their positions.
        let mut depth = 0usize;
        let mut top: Vec<usize> = Vec::new();
        for j in column.next..end {
            match s.token(j) {
                Some(Token::LParen) => depth += 1,
                Some(Token::RParen) => depth = depth.saturating_sub(1),
                Some(Token::Word(_)) if depth == 0 => top.push(j),
                _ => {}
            }
        }
        let at = |k: &str| top.iter().copied().find(|&j| s.kw(j, k));
        if let Some(Token::Word(w)) = s.token(column.next)
            && w.quote_style.is_none()
            && SERIAL_TYPES.iter().any(|t| w.value.eq_ignore_ascii_case(t))
        {
            self.report(
                Rule::AddingFieldWithDefault,
                idx,
                line,
                format!(
                    "adds {col} as {}, which fills every existing row from a sequence",
                    w.value.to_lowercase()
                ),
            );
        }
        if let Some(generated) = at("GENERATED") {
            let identity = (generated..end).any(|j| s.kw(j, "IDENTITY"));
            let stored = top.iter().any(|&j| j > generated && s.kw(j, "STORED"));
            if identity || stored {
                let what = if identity {
                    "an identity column"
                } else {
                    "a stored generated column"
                };
                self.report(
                    Rule::AddingFieldWithDefault,
                    idx,
                    line,
                    format!("adds {col} as {what}, computed for every existing row"),
                );
            }
        }
        if let Some(default) = at("DEFAULT") {
            let stop = top
                .iter()
                .copied()
                .find(|&j| {
                    j > default
                        && [
                            "NOT",
                            "NULL",
                            "CONSTRAINT",
                            "CHECK",
                            "UNIQUE",
                            "PRIMARY",
                            "REFERENCES",
                            "GENERATED",
                            "COLLATE",
                        ]
                        .iter()
                        .any(|k| s.kw(j, k))
                })
                .unwrap_or(end);
            let volatile = (default + 1..stop).find_map(|j| match (s.token(j), s.token(j + 1)) {
                (Some(Token::Word(w)), Some(Token::LParen))
                    if VOLATILE.iter().any(|v| w.value.eq_ignore_ascii_case(v)) =>
                {
                    Some(w.value.to_lowercase())
                }
                _ => None,
            });
            if let Some(function) = volatile {
                self.report(
                    Rule::AddingFieldWithDefault,
                    idx,
                    line,
                    format!(
                        "adds {col} with the volatile default {function}(), computed for every \
                         existing row"
                    ),
                );
            }
        }
        if at("PRIMARY").is_some() {
            self.report(
                Rule::AddingSerialPrimaryKeyField,
                idx,
                line,
                format!("adds {col} as the primary key, building its index"),
            );
        }
        if at("UNIQUE").is_some() {
            self.report(
                Rule::DisallowedUniqueConstraint,
                idx,
                line,
                format!("adds {col} as UNIQUE, building its index"),
            );
        }
        if at("REFERENCES").is_some() {
            self.report(
                Rule::AddingForeignKeyConstraint,
                idx,
                line,
                format!("adds {col} with REFERENCES (a column's foreign key cannot be NOT VALID)"),
            );
        }
        if at("CHECK").is_some() {
            self.report(
                Rule::ConstraintMissingNotValid,
                idx,
                line,
                format!(
                    "adds {col} with a CHECK constraint (a column's CHECK cannot be NOT VALID)"
                ),
            );
        }
    }
}

/// The clauses of an `ALTER TABLE` after the table name: token ranges split
/// at commas outside parentheses.
fn clauses(s: &Statement, from: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = from;
    for j in from..s.tokens.len() {
        match s.token(j) {
            Some(Token::LParen) => depth += 1,
            Some(Token::RParen) => depth = depth.saturating_sub(1),
            Some(Token::Comma) if depth == 0 => {
                if j > start {
                    out.push((start, j));
                }
                start = j + 1;
            }
            _ => {}
        }
    }
    if s.tokens.len() > start {
        out.push((start, s.tokens.len()));
    }
    out
}

/// Comma-separated names from `i` on (`DROP INDEX a, b CASCADE`).
fn names_from(s: &Statement, mut i: usize) -> Vec<Name> {
    let mut names = Vec::new();
    while let Some(name) = s.name_at(i) {
        i = name.next;
        names.push(name);
        if s.token(i) == Some(&Token::Comma) {
            i += 1;
        } else {
            break;
        }
    }
    names
}

/// `VACUUM FULL …` or `VACUUM (FULL[, …]) …`, not `(FULL false)`.
fn vacuum_full(s: &Statement) -> bool {
    (1..s.tokens.len()).any(|i| {
        s.kw(i, "FULL")
            && !matches!(s.token(i + 1), Some(Token::Number(n, _)) if n == "0")
            && !["FALSE", "OFF"].iter().any(|k| s.kw(i + 1, k))
    })
}

/// The mode of a `LOCK TABLE … IN … MODE` (ACCESS EXCLUSIVE when absent).
fn lock_mode(s: &Statement) -> String {
    let Some(start) = s.find_kw(1, "IN") else {
        return "ACCESS EXCLUSIVE".to_owned();
    };
    let end = s.find_kw(start, "MODE").unwrap_or(s.tokens.len());
    let words: Vec<String> = (start + 1..end)
        .filter_map(|i| match s.token(i) {
            Some(Token::Word(w)) => Some(w.value.to_uppercase()),
            _ => None,
        })
        .collect();
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule ids found in `sql` (a transactional migration unless it
    /// starts with `-- no-transaction`).
    fn rules(sql: &str) -> Vec<&'static str> {
        lint_sql("m.sql", sql)
            .findings
            .iter()
            .map(|f| f.rule.id())
            .collect()
    }

    fn only(sql: &str) -> Finding {
        let report = lint_sql("0007_change.up.sql", sql);
        assert_eq!(report.findings.len(), 1, "{report}");
        report.findings[0].clone()
    }

    #[test]
    fn every_rule_has_a_unique_id_a_why_and_a_fix() {
        let ids: HashSet<&str> = Rule::ALL.iter().map(|r| r.id()).collect();
        assert_eq!(ids.len(), Rule::ALL.len());
        for rule in Rule::ALL {
            assert_eq!(Rule::from_id(rule.id()), Some(rule));
            assert!(
                rule.id()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '-')
            );
            assert!(rule.why().len() > 40 && rule.fix().len() > 20, "{rule}");
        }
        assert_eq!(Rule::from_id("no-such-rule"), None);
    }

    #[test]
    fn every_rule_is_documented() {
        let doc = include_str!("../../../docs/migrations.md");
        for rule in Rule::ALL {
            assert!(
                doc.contains(&format!("`{}`", rule.id())),
                "docs/migrations.md lacks `{}`",
                rule.id()
            );
        }
    }

    #[test]
    fn require_concurrent_index_creation() {
        let f = only("SELECT 1;\n\nCREATE UNIQUE INDEX bills_number_idx ON public.bills (number);");
        assert_eq!(f.rule, Rule::RequireConcurrentIndexCreation);
        assert_eq!(f.severity, Severity::Error);
        assert_eq!(f.line, 3);
        assert_eq!(f.file, PathBuf::from("0007_change.up.sql"));
        assert_eq!(
            f.statement,
            "CREATE UNIQUE INDEX bills_number_idx ON public.bills (number)"
        );
        assert!(f.message.contains("public.bills"), "{f}");
        assert!(
            f.to_string()
                .contains("0007_change.up.sql:3: error [require-concurrent-index-creation]"),
            "{f}"
        );
        // an unnamed index, IF NOT EXISTS
        assert_eq!(
            rules("CREATE INDEX IF NOT EXISTS i ON t (x); CREATE INDEX ON t (y)"),
            ["require-concurrent-index-creation"; 2]
        );
        // a partitioned table's own index (CONCURRENTLY cannot build one)
        assert!(rules("CREATE INDEX i ON ONLY measurements (x)").is_empty());
        // a table created in the same migration is new and empty
        assert!(rules("CREATE TABLE \"T\" (x int); CREATE INDEX i ON \"T\" (x);").is_empty());
        assert!(
            rules("CREATE UNLOGGED TABLE IF NOT EXISTS t (x int);\nCREATE INDEX ON t (x)")
                .is_empty()
        );
        // ... but not another table of the same name in other case
        assert_eq!(
            rules("CREATE TABLE \"T\" (x int); CREATE INDEX i ON t (x);").len(),
            1
        );
        // concurrently, alone, outside a transaction: fine
        assert!(rules("-- no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);").is_empty());
    }

    #[test]
    fn require_concurrent_index_deletion() {
        let f = only("DROP INDEX IF EXISTS a, s.b CASCADE;");
        assert_eq!(f.rule, Rule::RequireConcurrentIndexDeletion);
        assert!(f.message.contains("a, s.b"), "{f}");
        assert!(rules("-- no-transaction\nDROP INDEX CONCURRENTLY IF EXISTS a;").is_empty());
        // an index this migration built itself
        assert!(rules("CREATE TABLE t (x int); CREATE INDEX i ON t (x); DROP INDEX i;").is_empty());
    }

    #[test]
    fn adding_foreign_key_constraint() {
        let f = only(
            "ALTER TABLE bills\n  ADD CONSTRAINT bills_user_fk FOREIGN KEY (user_id) REFERENCES users (id);",
        );
        assert_eq!(f.rule, Rule::AddingForeignKeyConstraint);
        assert_eq!(f.line, 2, "the line of the clause");
        assert!(f.message.contains("bills_user_fk"), "{f}");
        assert_eq!(
            rules("ALTER TABLE bills ADD FOREIGN KEY (u) REFERENCES users"),
            ["adding-foreign-key-constraint"]
        );
        assert_eq!(
            rules("ALTER TABLE bills ADD COLUMN user_id bigint REFERENCES users (id)"),
            ["adding-foreign-key-constraint"]
        );
        assert!(
            rules(
                "ALTER TABLE bills ADD CONSTRAINT fk FOREIGN KEY (u) REFERENCES users NOT VALID;"
            )
            .is_empty()
        );
        // validating in a later migration is the safe form
        assert!(rules("ALTER TABLE bills VALIDATE CONSTRAINT fk;").is_empty());
        // a new table's references are fine
        assert!(rules("CREATE TABLE notes (bill_id bigint REFERENCES bills (id));").is_empty());
    }

    #[test]
    fn constraint_missing_not_valid() {
        let f = only("ALTER TABLE bills ADD CONSTRAINT title_len CHECK (length(title) < 500);");
        assert_eq!(f.rule, Rule::ConstraintMissingNotValid);
        assert!(f.message.contains("title_len"), "{f}");
        assert_eq!(
            rules("ALTER TABLE bills ADD CHECK (x > 0)"),
            ["constraint-missing-not-valid"]
        );
        assert!(rules("ALTER TABLE bills ADD CONSTRAINT c CHECK (x > 0) NOT VALID").is_empty());
        // NOT VALID and VALIDATE in one transaction: the lock is held through the scan
        let f = only(
            "ALTER TABLE bills ADD CONSTRAINT c CHECK (x > 0) NOT VALID;\n\
             ALTER TABLE bills VALIDATE CONSTRAINT c;",
        );
        assert_eq!(f.rule, Rule::ConstraintMissingNotValid);
        assert_eq!(f.line, 2);
        assert!(
            f.message.contains("in the transaction that added it"),
            "{f}"
        );
        // the same outside a transaction: PostgreSQL runs the file as one implicit transaction
        assert_eq!(
            rules(
                "-- no-transaction\nALTER TABLE bills ADD CONSTRAINT fk FOREIGN KEY (u) \
                 REFERENCES users NOT VALID, VALIDATE CONSTRAINT fk;"
            ),
            ["constraint-missing-not-valid"]
        );
        // a column's inline CHECK on an existing table
        assert_eq!(
            rules("ALTER TABLE bills ADD COLUMN pages int CHECK (pages > 0)"),
            ["constraint-missing-not-valid"]
        );
    }

    #[test]
    fn adding_not_nullable_field() {
        let f = only("ALTER TABLE bills ALTER COLUMN title SET NOT NULL;");
        assert_eq!(f.rule, Rule::AddingNotNullableField);
        assert!(f.message.contains("bills.title"), "{f}");
        assert_eq!(
            rules("ALTER TABLE bills ALTER title SET NOT NULL, ALTER summary DROP NOT NULL"),
            ["adding-not-nullable-field"]
        );
        assert!(rules("ALTER TABLE bills ALTER COLUMN title DROP NOT NULL").is_empty());
    }

    #[test]
    fn changing_column_type() {
        let f = only("ALTER TABLE bills ALTER COLUMN number TYPE bigint USING number::bigint;");
        assert_eq!(f.rule, Rule::ChangingColumnType);
        assert_eq!(
            rules("ALTER TABLE bills ALTER number SET DATA TYPE text"),
            ["changing-column-type"]
        );
        assert!(rules("ALTER TABLE bills ALTER COLUMN number SET DEFAULT 'x'").is_empty());
    }

    #[test]
    fn adding_field_with_default() {
        let f = only("ALTER TABLE bills ADD COLUMN token uuid NOT NULL DEFAULT gen_random_uuid();");
        assert_eq!(f.rule, Rule::AddingFieldWithDefault);
        assert!(f.message.contains("gen_random_uuid()"), "{f}");
        for sql in [
            "ALTER TABLE bills ADD seen_at timestamptz DEFAULT clock_timestamp()",
            "ALTER TABLE bills ADD r float8 DEFAULT (random() * 10)",
            "ALTER TABLE bills ADD n bigint DEFAULT nextval('bills_n_seq')",
            "ALTER TABLE bills ADD COLUMN n bigserial",
            "ALTER TABLE bills ADD COLUMN n bigint GENERATED ALWAYS AS IDENTITY",
            "ALTER TABLE bills ADD COLUMN t text GENERATED ALWAYS AS (upper(title)) STORED",
        ] {
            assert_eq!(rules(sql), ["adding-field-with-default"], "{sql}");
        }
        // constants and stable functions are stored once (PostgreSQL 11+)
        for sql in [
            "ALTER TABLE bills ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()",
            "ALTER TABLE bills ADD COLUMN status text NOT NULL DEFAULT 'new'",
            "ALTER TABLE bills ADD COLUMN note text DEFAULT 'random()'",
        ] {
            assert!(rules(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn adding_serial_primary_key_field() {
        let f = only("ALTER TABLE events ADD COLUMN id bigint PRIMARY KEY;");
        assert_eq!(f.rule, Rule::AddingSerialPrimaryKeyField);
        assert_eq!(
            rules("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (id)"),
            ["adding-serial-primary-key-field"]
        );
        assert!(rules("ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY USING INDEX events_id_idx").is_empty());
    }

    #[test]
    fn disallowed_unique_constraint() {
        let f = only("ALTER TABLE users ADD COLUMN handle text UNIQUE;");
        assert_eq!(f.rule, Rule::DisallowedUniqueConstraint);
        assert_eq!(
            rules("ALTER TABLE users ADD CONSTRAINT users_handle_key UNIQUE (handle)"),
            ["disallowed-unique-constraint"]
        );
        assert!(rules("ALTER TABLE users ADD CONSTRAINT users_handle_key UNIQUE USING INDEX users_handle_idx").is_empty());
    }

    #[test]
    fn renaming_column_and_table() {
        let f = only("ALTER TABLE bills RENAME COLUMN title TO name;");
        assert_eq!(f.rule, Rule::RenamingColumn);
        assert!(f.message.contains("bills.title to name"), "{f}");
        assert_eq!(
            rules("ALTER TABLE bills RENAME title TO name"),
            ["renaming-column"]
        );
        let f = only("ALTER TABLE IF EXISTS bills RENAME TO acts;");
        assert_eq!(f.rule, Rule::RenamingTable);
        assert!(f.message.contains("bills to acts"), "{f}");
        assert!(rules("ALTER TABLE bills RENAME CONSTRAINT a TO b").is_empty());
    }

    #[test]
    fn ban_drop_column_and_table_are_warnings() {
        let f = only("ALTER TABLE bills DROP COLUMN IF EXISTS legacy CASCADE;");
        assert_eq!(f.rule, Rule::BanDropColumn);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("bills.legacy"), "{f}");
        assert_eq!(rules("ALTER TABLE bills DROP legacy"), ["ban-drop-column"]);
        assert!(rules("ALTER TABLE bills DROP CONSTRAINT c").is_empty());
        let f = only("DROP TABLE IF EXISTS old_bills, s.older;");
        assert_eq!(f.rule, Rule::BanDropTable);
        assert_eq!(f.severity, Severity::Warning);
        assert!(f.message.contains("old_bills, s.older"), "{f}");
        let report = lint_sql("m.sql", "DROP TABLE t;");
        assert!(!report.has_errors() && report.findings.len() == 1);
        // a scratch table of the same migration
        assert!(rules("CREATE TABLE scratch (x int); DROP TABLE scratch;").is_empty());
    }

    #[test]
    fn ban_vacuum_full_and_cluster() {
        assert_eq!(
            rules("-- no-transaction\nVACUUM FULL bills;"),
            ["ban-vacuum-full"]
        );
        assert_eq!(
            rules("-- no-transaction\nVACUUM (FULL, ANALYZE) bills;"),
            ["ban-vacuum-full"]
        );
        assert!(rules("-- no-transaction\nVACUUM (FULL false) bills;").is_empty());
        assert!(rules("-- no-transaction\nVACUUM ANALYZE bills;").is_empty());
        assert_eq!(rules("CLUSTER bills USING bills_pkey;"), ["ban-cluster"]);
        assert!(rules("ALTER TABLE bills SET WITHOUT CLUSTER").is_empty());
    }

    #[test]
    fn ban_lock_table() {
        let f = only("LOCK TABLE bills IN SHARE ROW EXCLUSIVE MODE;");
        assert_eq!(f.rule, Rule::BanLockTable);
        assert_eq!(f.severity, Severity::Warning);
        assert!(
            f.message.contains("bills IN SHARE ROW EXCLUSIVE MODE"),
            "{f}"
        );
        assert!(only("LOCK bills").message.contains("ACCESS EXCLUSIVE"));
    }

    #[test]
    fn ban_concurrent_index_creation_in_transaction() {
        let f = only("CREATE INDEX CONCURRENTLY i ON t (x);");
        assert_eq!(f.rule, Rule::BanConcurrentIndexCreationInTransaction);
        assert!(f.message.contains("runs in a transaction"), "{f}");
        for sql in [
            "DROP INDEX CONCURRENTLY i",
            "REINDEX INDEX CONCURRENTLY i",
            "ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY",
        ] {
            assert_eq!(
                rules(sql),
                ["ban-concurrent-index-creation-in-transaction"],
                "{sql}"
            );
        }
        // outside a transaction but beside another statement: one implicit transaction
        let report = lint_sql(
            "m.sql",
            "-- no-transaction\nCREATE INDEX CONCURRENTLY i ON t (x);\nANALYZE t;",
        );
        assert_eq!(report.findings.len(), 1, "{report}");
        assert!(
            report.findings[0]
                .message
                .contains("beside other statements")
        );
        assert!(rules("-- no-transaction\nREINDEX INDEX CONCURRENTLY i;").is_empty());
        // REFRESH MATERIALIZED VIEW CONCURRENTLY may run in a transaction
        assert!(rules("REFRESH MATERIALIZED VIEW CONCURRENTLY totals").is_empty());
    }

    #[test]
    fn unreadable_sql_is_a_warning_with_its_line() {
        let f = only("SELECT 1;\nSELECT 'unterminated");
        assert_eq!(f.rule, Rule::UnreadableSql);
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.line, 2);
    }

    #[test]
    fn keywords_in_strings_comments_and_quoted_names_do_not_count() {
        for sql in [
            "INSERT INTO log (note) VALUES ('CREATE INDEX i ON bills (x); DROP TABLE bills;')",
            "-- VACUUM FULL bills;\n/* LOCK TABLE bills; */ SELECT 1",
            "DO $$ BEGIN EXECUTE 'ALTER TABLE bills RENAME TO x'; END $$;",
            "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $body$ CLUSTER bills $body$;",
            "SELECT \"DROP\" FROM \"LOCK\"",
            "ALTER TABLE bills ADD COLUMN note text DEFAULT E'it''s random()'",
        ] {
            assert!(rules(sql).is_empty(), "{sql}: {:?}", rules(sql));
        }
    }

    #[test]
    fn an_allow_comment_accepts_one_rule_on_one_statement() {
        let sql = "-- pgstack:allow ban-drop-column (the code stopped reading it in v41)\n\
                   ALTER TABLE bills DROP COLUMN legacy;\n\
                   ALTER TABLE bills DROP COLUMN other;\n\
                   CREATE INDEX i ON bills (x); -- pgstack:allow require-concurrent-index-creation\n\
                   ALTER TABLE bills /* pgstack:allow renaming-table, ban-lock-table */ RENAME TO acts;\n\
                   -- pgstack:allow renaming-column\n\
                   ALTER TABLE acts RENAME x TO y, ALTER y TYPE text;";
        let report = lint_sql("m.sql", sql);
        let found: Vec<(&str, u32)> = report
            .findings
            .iter()
            .map(|f| (f.rule.id(), f.line))
            .collect();
        assert_eq!(
            found,
            vec![("ban-drop-column", 3), ("changing-column-type", 7)],
            "{report}"
        );
        assert_eq!(report.allowed, 4);
        assert!(
            report
                .to_string()
                .contains("4 allowed by `-- pgstack:allow`"),
            "{report}"
        );
        // the allow names a rule: another rule on the same statement still counts
        assert_eq!(
            rules("-- pgstack:allow ban-drop-column\nALTER TABLE t RENAME a TO b"),
            ["renaming-column"]
        );
    }

    #[test]
    fn a_report_over_migrations_names_versions_and_files() {
        let migrations = Migrations::from_files(
            [
                (
                    "0001_bills.up.sql",
                    "CREATE TABLE bills (id int);\nCREATE INDEX ON bills (id);",
                ),
                ("0002_idx.up.sql", "CREATE INDEX bills_id ON bills (id);"),
                ("0002_idx.down.sql", "DROP INDEX bills_id;"),
                ("0003_drop.up.sql", "DROP TABLE bills;"),
            ],
            &crate::LoadOptions::default(),
        )
        .unwrap();
        let report = migrations.lint();
        assert_eq!(report.files, 3, "down files are not linted");
        let found: Vec<(Option<i64>, &str)> = report
            .findings
            .iter()
            .map(|f| (f.version, f.rule.id()))
            .collect();
        assert_eq!(
            found,
            vec![
                (Some(2), "require-concurrent-index-creation"),
                (Some(3), "ban-drop-table")
            ]
        );
        assert!(report.has_errors());
        assert!(report.findings[0].file.ends_with("0002_idx.up.sql"));
        let text = report.to_string();
        assert!(
            text.ends_with("3 file(s) checked: 1 error(s), 1 warning(s)"),
            "{text}"
        );
        assert!(
            text.contains("instead: CREATE INDEX CONCURRENTLY"),
            "{text}"
        );
    }

    #[test]
    fn the_reference_schema_is_clean() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../migrations");
        let report = Migrations::from_dir(dir).unwrap().lint();
        assert!(report.findings.is_empty(), "{report}");
        assert_eq!(report.files, 5);
    }
}
