//! Loading migrations: a folder in sqlx-cli's format, files given in code,
//! or a migrator embedded with `sqlx::migrate!`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use sqlx::migrate::MigrationType;

use crate::checksum::Checksums;
use crate::error::{Error, Result};

/// Versions below this are taken as sequential numbers (`0001`, `0002`, …)
/// and must not skip a number; larger ones are timestamps
/// (`20240101120000`), which naturally do.
pub const SEQUENTIAL_LIMIT: i64 = 1_000_000;

/// The marker sqlx recognises on a file's first line: run the file outside a
/// transaction.
pub const NO_TRANSACTION_MARKER: &str = "-- no-transaction";

/// One SQL file (an up or a down script).
#[derive(Clone, Debug)]
pub struct Script {
    path: PathBuf,
    sql: Arc<str>,
    no_transaction: bool,
    pub(crate) checksums: Checksums,
}

impl Script {
    fn new(path: PathBuf, sql: String) -> Self {
        let no_transaction = sql.starts_with(NO_TRANSACTION_MARKER);
        let checksums = Checksums::of(&sql);
        Script {
            path,
            sql: Arc::from(sql),
            no_transaction,
            checksums,
        }
    }

    /// Where the script came from (for embedded migrations, a made-up
    /// `<embedded>/…` path with the original file name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The SQL text, exactly as read.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    pub(crate) fn sql_arc(&self) -> Arc<str> {
        Arc::clone(&self.sql)
    }

    /// Whether the file starts with `-- no-transaction` and so runs outside
    /// a transaction.
    pub fn no_transaction(&self) -> bool {
        self.no_transaction
    }

    /// The checksum pgstack records: SHA-384 of the text with LF line endings.
    pub fn checksum(&self) -> &[u8] {
        &self.checksums.canonical
    }
}

/// One version: its up script and, for reversible migrations, its down script.
#[derive(Clone, Debug)]
pub struct Migration {
    version: i64,
    description: String,
    up: Script,
    down: Option<Script>,
}

impl Migration {
    /// The version (the number before the first `_` of the file name).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The description (the rest of the file name, `_` read as a space), as
    /// sqlx records it.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The script that applies the migration.
    pub fn up(&self) -> &Script {
        &self.up
    }

    /// The script that reverts it, if there is one.
    pub fn down(&self) -> Option<&Script> {
        self.down.as_ref()
    }

    /// The file name the down script would have.
    pub(crate) fn expected_down_path(&self) -> PathBuf {
        let up = self.up.path.to_string_lossy();
        let base = up
            .strip_suffix(".up.sql")
            .or_else(|| up.strip_suffix(".sql"))
            .unwrap_or(&up)
            .to_owned();
        PathBuf::from(format!("{base}.down.sql"))
    }
}

/// How strictly a folder is checked.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Accept sequentially numbered folders that skip a number.
    pub allow_gaps: bool,
}

impl LoadOptions {
    /// Accept (or refuse, the default) gaps between sequential versions.
    pub fn allow_gaps(mut self, allow: bool) -> Self {
        self.allow_gaps = allow;
        self
    }
}

/// A checked, ordered set of migrations. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Migrations {
    items: Arc<[Migration]>,
    dir: Option<PathBuf>,
}

/// One file before grouping.
struct RawFile {
    version: i64,
    description: String,
    kind: MigrationType,
    path: PathBuf,
    sql: String,
}

impl Migrations {
    /// Reads a folder written by sqlx-cli's conventions
    /// (`<VERSION>_<NAME>.up.sql` / `.down.sql`, or simple `<VERSION>_<NAME>.sql`),
    /// using sqlx's own resolver. Files whose names do not match are ignored,
    /// as sqlx does.
    ///
    /// # Errors
    /// [`Error::ReadDir`], [`Error::BadFile`], [`Error::DuplicateVersion`],
    /// [`Error::Gap`], [`Error::DownWithoutUp`].
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_with(dir, &LoadOptions::default())
    }

    /// [`Migrations::from_dir`] with options.
    ///
    /// # Errors
    /// As [`Migrations::from_dir`].
    pub fn from_dir_with(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::ReadDir {
                dir: dir.to_owned(),
                reason: "no such folder".to_owned(),
            });
        }
        check_names(dir)?;
        let resolved = sqlx::migrate::resolve_blocking(dir).map_err(|e| {
            let mut reason = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                reason.push_str(&format!(": {source}"));
            }
            Error::ReadDir {
                dir: dir.to_owned(),
                reason,
            }
        })?;
        let files = resolved
            .into_iter()
            .map(|(m, path)| RawFile {
                version: m.version,
                description: m.description.into_owned(),
                kind: m.migration_type,
                // name files relative to the folder as given, not canonicalised
                path: match path.file_name() {
                    Some(name) => dir.join(name),
                    None => path,
                },
                sql: m.sql.as_str().to_owned(),
            })
            .collect();
        Self::group(files, Some(dir.to_owned()), options)
    }

    /// Builds a set from `(file name, contents)` pairs, named as in a folder
    /// (`0001_users.up.sql`). Useful with `include_str!`.
    ///
    /// # Errors
    /// As [`Migrations::from_dir`].
    pub fn from_files<N, S>(
        files: impl IntoIterator<Item = (N, S)>,
        options: &LoadOptions,
    ) -> Result<Self>
    where
        N: AsRef<str>,
        S: Into<String>,
    {
        let mut raw = Vec::new();
        for (name, sql) in files {
            let name = name.as_ref();
            let path = PathBuf::from("<embedded>").join(name);
            let Some((version, rest)) = name.split_once('_') else {
                continue;
            };
            if !rest.ends_with(".sql") {
                continue;
            }
            let version: i64 = version.parse().map_err(|_| Error::BadFile {
                file: path.clone(),
                reason:
                    "expected an integer version before the first `_` (e.g. `0001_users.up.sql`)"
                        .to_owned(),
            })?;
            let kind = MigrationType::from_filename(rest);
            let description = rest.trim_end_matches(kind.suffix()).replace('_', " ");
            raw.push(RawFile {
                version,
                description,
                kind,
                path,
                sql: sql.into(),
            });
        }
        Self::group(raw, None, options)
    }

    /// Takes the migrations of a sqlx [`Migrator`](sqlx::migrate::Migrator),
    /// e.g. one embedded at compile time with `sqlx::migrate!("./migrations")`.
    ///
    /// # Errors
    /// As [`Migrations::from_dir`].
    pub fn from_sqlx(migrator: &sqlx::migrate::Migrator) -> Result<Self> {
        let raw = migrator
            .iter()
            .map(|m| {
                let name = format!(
                    "{}_{}{}",
                    m.version,
                    m.description.replace(' ', "_"),
                    m.migration_type.suffix()
                );
                RawFile {
                    version: m.version,
                    description: m.description.to_string(),
                    kind: m.migration_type,
                    path: PathBuf::from("<embedded>").join(name),
                    sql: m.sql.as_str().to_owned(),
                }
            })
            .collect();
        Self::group(raw, None, &LoadOptions::default().allow_gaps(true))
    }

    fn group(files: Vec<RawFile>, dir: Option<PathBuf>, options: &LoadOptions) -> Result<Self> {
        struct Slot {
            description: String,
            up: Option<Script>,
            down: Option<Script>,
        }
        let mut slots: BTreeMap<i64, Slot> = BTreeMap::new();
        for file in files {
            if file.version <= 0 {
                return Err(Error::BadFile {
                    file: file.path,
                    reason: "versions start at 1; rename the file".to_owned(),
                });
            }
            let slot = slots.entry(file.version).or_insert_with(|| Slot {
                description: file.description.clone(),
                up: None,
                down: None,
            });
            let place = if file.kind.is_down_migration() {
                &mut slot.down
            } else {
                &mut slot.up
            };
            if let Some(existing) = place {
                return Err(Error::DuplicateVersion {
                    version: file.version,
                    first: existing.path.clone(),
                    second: file.path,
                });
            }
            if !file.kind.is_down_migration() {
                slot.description = file.description.clone();
            }
            *place = Some(Script::new(file.path, file.sql));
        }
        let mut items = Vec::with_capacity(slots.len());
        for (version, slot) in slots {
            let Some(up) = slot.up else {
                let file = slot.down.map(|d| d.path).unwrap_or_default();
                return Err(Error::DownWithoutUp { version, file });
            };
            items.push(Migration {
                version,
                description: slot.description,
                up,
                down: slot.down,
            });
        }
        if !options.allow_gaps {
            for pair in items.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                if b.version < SEQUENTIAL_LIMIT && b.version != a.version + 1 {
                    return Err(Error::Gap {
                        before: a.version,
                        after: b.version,
                        missing: a.version + 1,
                        after_file: b.up.path.clone(),
                    });
                }
            }
        }
        Ok(Migrations {
            items: items.into(),
            dir,
        })
    }

    /// The migrations in version order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Migration> + ExactSizeIterator {
        self.items.iter()
    }

    /// How many versions there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The migration with this version.
    pub fn get(&self, version: i64) -> Option<&Migration> {
        self.items
            .binary_search_by_key(&version, |m| m.version)
            .ok()
            .map(|i| &self.items[i])
    }

    /// The highest version, if any.
    pub fn latest(&self) -> Option<i64> {
        self.items.last().map(|m| m.version)
    }

    /// The folder the migrations were read from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// Refuses, naming the file, what sqlx's resolver would refuse with a
/// message about the folder: a `.sql` file whose version is not an integer.
fn check_names(dir: &Path) -> Result<()> {
    let entries = fs::read_dir(dir).map_err(|e| Error::ReadDir {
        dir: dir.to_owned(),
        reason: e.to_string(),
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some((version, rest)) = name.split_once('_') else {
            continue;
        };
        if rest.ends_with(".sql") && entry.path().is_file() && version.parse::<i64>().is_err() {
            return Err(Error::BadFile {
                file: dir.join(name.as_ref()),
                reason: "the part before the first `_` must be an integer version \
                         (e.g. `0001_users.up.sql`); rename the file"
                    .to_owned(),
            });
        }
    }
    Ok(())
}

/// The files written by [`new_migration`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewMigration {
    /// The version given to the pair.
    pub version: i64,
    /// The up file.
    pub up: PathBuf,
    /// The down file.
    pub down: PathBuf,
}

/// Writes a reversible pair `<next version>_<name>.up.sql` / `.down.sql` in
/// `dir` (created if needed), as `sqlx migrate add -r` does.
///
/// The next version follows the folder's style: sequential numbers keep
/// their zero-padding (`0007` after `0006`); timestamped folders get the
/// current UTC time (`YYYYMMDDHHMMSS`); an empty folder starts at `0001`.
///
/// # Errors
/// [`Error::InvalidName`], [`Error::WriteFile`], or any error of
/// [`Migrations::from_dir`] for the existing files.
pub fn new_migration(dir: impl AsRef<Path>, name: &str) -> Result<NewMigration> {
    let dir = dir.as_ref();
    let name = clean_name(name)?;
    fs::create_dir_all(dir).map_err(|e| Error::WriteFile {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let existing = Migrations::from_dir_with(dir, &LoadOptions::default().allow_gaps(true))?;
    let (version, text) = match existing.iter().last() {
        None => (1, "0001".to_owned()),
        Some(last) if last.version < SEQUENTIAL_LIMIT => {
            let next = last.version + 1;
            let width = last
                .up
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split_once('_'))
                .map(|(digits, _)| digits.len())
                .unwrap_or(4);
            (next, format!("{next:0width$}"))
        }
        Some(last) => {
            let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
                .to_string()
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            let now: i64 = stamp.parse().unwrap_or(0);
            let next = now.max(last.version + 1);
            (next, next.to_string())
        }
    };
    let up = dir.join(format!("{text}_{name}.up.sql"));
    let down = dir.join(format!("{text}_{name}.down.sql"));
    write_new(&up, MigrationType::ReversibleUp.file_content())?;
    if let Err(e) = write_new(&down, MigrationType::ReversibleDown.file_content()) {
        let _ = fs::remove_file(&up);
        return Err(e);
    }
    tracing::info!(version, up = %up.display(), down = %down.display(), "created migration");
    Ok(NewMigration { version, up, down })
}

fn clean_name(name: &str) -> Result<String> {
    let cleaned: String = name
        .trim()
        .chars()
        .map(|c| if c == ' ' || c == '-' { '_' } else { c })
        .collect();
    let invalid = |reason: &str| Error::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if cleaned.is_empty() {
        return Err(invalid("the name is empty"));
    }
    if let Some(c) = cleaned
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(invalid(&format!(
            "{c:?} cannot be part of a file name here"
        )));
    }
    Ok(cleaned.to_ascii_lowercase())
}

fn write_new(path: &Path, content: &str) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        file.write_all(content.as_bytes())
    };
    write().map_err(|e| Error::WriteFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<Migrations> {
        Migrations::from_files(files.iter().copied(), &LoadOptions::default())
    }

    #[test]
    fn pairs_up_and_down() {
        let m = load(&[
            ("0002_bills.up.sql", "b"),
            ("0001_users.up.sql", "-- no-transaction\na"),
            ("0001_users.down.sql", "drop"),
            ("README.md", "ignored"),
        ])
        .unwrap();
        assert_eq!(m.len(), 2);
        let first = m.get(1).unwrap();
        assert_eq!(first.description(), "users");
        assert!(first.up().no_transaction());
        assert_eq!(first.down().unwrap().sql(), "drop");
        assert!(m.get(2).unwrap().down().is_none());
        assert_eq!(m.latest(), Some(2));
    }

    #[test]
    fn duplicate_versions_are_refused() {
        let err = load(&[("0001_a.up.sql", "a"), ("0001_b.up.sql", "b")]).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateVersion { version: 1, .. }),
            "{err}"
        );
        let err = load(&[("0001_a.sql", "a"), ("0001_a.up.sql", "b")]).unwrap_err();
        assert!(
            matches!(err, Error::DuplicateVersion { version: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn gaps_are_refused_unless_allowed() {
        let files = [("0001_a.up.sql", "a"), ("0003_c.up.sql", "c")];
        let err = load(&files).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Gap {
                    before: 1,
                    after: 3,
                    missing: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 2 is missing"), "{err}");
        Migrations::from_files(files, &LoadOptions::default().allow_gaps(true)).unwrap();
        // timestamps skip numbers by nature
        load(&[("20240101000000_a.sql", "a"), ("20240305120000_b.sql", "b")]).unwrap();
    }

    #[test]
    fn orphan_down_and_bad_versions_are_refused() {
        let err = load(&[("0001_a.down.sql", "a")]).unwrap_err();
        assert!(
            matches!(err, Error::DownWithoutUp { version: 1, .. }),
            "{err}"
        );
        let err = load(&[("x1_a.up.sql", "a")]).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
        let err = load(&[("0_a.up.sql", "a")]).unwrap_err();
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
    }

    #[test]
    fn new_migration_continues_the_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let first = new_migration(dir.path(), "create users").unwrap();
        assert_eq!(first.version, 1);
        assert!(first.up.ends_with("0001_create_users.up.sql"));
        assert!(first.down.ends_with("0001_create_users.down.sql"));
        let second = new_migration(dir.path(), "add-bills").unwrap();
        assert!(
            second.up.ends_with("0002_add_bills.up.sql"),
            "{:?}",
            second.up
        );
        let loaded = Migrations::from_dir(dir.path()).unwrap();
        assert_eq!(loaded.len(), 2);
        assert!(loaded.get(2).unwrap().down().is_some());
        let err = new_migration(dir.path(), "../evil").unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{err}");
    }

    #[test]
    fn new_migration_in_a_timestamped_folder_uses_a_timestamp() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("20200718111257_todos.up.sql"), "a").unwrap();
        fs::write(dir.path().join("20200718111257_todos.down.sql"), "b").unwrap();
        let created = new_migration(dir.path(), "more").unwrap();
        assert!(created.version > 20200718111257);
        assert_eq!(created.version.to_string().len(), 14);
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let err = Migrations::from_dir("/definitely/not/here").unwrap_err();
        assert!(err.to_string().contains("/definitely/not/here"), "{err}");
    }
}
