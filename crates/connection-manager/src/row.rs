//! Rows into the caller's types: [`FromRow`], columns read by name with
//! errors that say which column and which types ([`RowError`]), never a
//! panic.

use std::fmt;

use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, WasNull};

/// A type built from one row, column by column, by name.
///
/// Derive it with `#[derive(pgstack::FromRow)]` (the `pgstack-macros`
/// crate, re-exported by the facade), or write it with [`column`]:
///
/// ```
/// use pgstack_connection::{FromRow, RowError, column};
/// use pgstack_connection::tokio_postgres::Row;
///
/// struct Bill {
///     id: i64,
///     note: Option<String>,
/// }
///
/// impl FromRow for Bill {
///     fn from_row(row: &Row) -> Result<Self, RowError> {
///         Ok(Bill {
///             id: column(row, "id")?,
///             note: column(row, "note")?,
///         })
///     }
/// }
/// ```
///
/// The query methods that return `T: FromRow` turn a [`RowError`] into
/// [`crate::Error::RowMapping`] with the node and the operation.
pub trait FromRow: Sized {
    /// Builds a value from `row`.
    ///
    /// # Errors
    /// [`RowError`]: a column missing, of a type the field cannot be read
    /// from, `NULL` for a field that is not an `Option`, or a value that did
    /// not decode.
    fn from_row(row: &Row) -> Result<Self, RowError>;
}

impl FromRow for Row {
    fn from_row(row: &Row) -> Result<Self, RowError> {
        Ok(row.clone())
    }
}

/// Reads the column named `name` of `row` as a `T`.
///
/// # Errors
/// [`RowError`] naming the column, the Rust type and (when the column
/// exists) its PostgreSQL type: [`RowProblem::MissingColumn`] (with the
/// columns the row has), [`RowProblem::WrongType`], [`RowProblem::UnexpectedNull`]
/// (use an `Option` for a nullable column), [`RowProblem::Invalid`].
pub fn column<'r, T: FromSql<'r>>(row: &'r Row, name: &str) -> Result<T, RowError> {
    let rust_type = short_type_name(std::any::type_name::<T>());
    let columns = row.columns();
    let Some(index) = columns.iter().position(|c| c.name() == name) else {
        return Err(RowError {
            column: name.to_owned(),
            rust_type,
            pg_type: None,
            problem: RowProblem::MissingColumn {
                available: columns.iter().map(|c| c.name().to_owned()).collect(),
            },
        });
    };
    let pg_type = columns[index].type_();
    let error = |problem| RowError {
        column: name.to_owned(),
        rust_type: rust_type.clone(),
        pg_type: Some(pg_type.name().to_owned()),
        problem,
    };
    if !T::accepts(pg_type) {
        return Err(error(RowProblem::WrongType));
    }
    row.try_get::<_, T>(index).map_err(|e| {
        let null = std::error::Error::source(&e).is_some_and(|s| s.is::<WasNull>());
        if null {
            error(RowProblem::UnexpectedNull)
        } else {
            let reason =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            error(RowProblem::Invalid(reason))
        }
    })
}

/// Why a row could not be read into the caller's type.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RowError {
    /// The column.
    pub column: String,
    /// The Rust type it was read as (module paths left out: `Option<String>`).
    pub rust_type: String,
    /// The column's PostgreSQL type, when the row has the column.
    pub pg_type: Option<String>,
    /// What went wrong.
    pub problem: RowProblem,
}

impl RowError {
    /// An error of the caller's own about `column` (for hand-written
    /// [`FromRow`] implementations: a value out of range for the domain).
    pub fn custom(column: impl Into<String>, reason: impl Into<String>) -> RowError {
        RowError {
            column: column.into(),
            rust_type: String::new(),
            pg_type: None,
            problem: RowProblem::Invalid(reason.into()),
        }
    }
}

/// What went wrong with a column ([`RowError::problem`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RowProblem {
    /// The row has no column of that name.
    MissingColumn {
        /// The columns it has.
        available: Vec<String>,
    },
    /// The column's PostgreSQL type cannot be read as the Rust type.
    WrongType,
    /// The column is `NULL` and the Rust type is not an `Option`.
    UnexpectedNull,
    /// The value did not decode.
    Invalid(String),
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let column = &self.column;
        let rust = &self.rust_type;
        let pg = self.pg_type.as_deref().unwrap_or("?");
        match &self.problem {
            RowProblem::MissingColumn { available } => write!(
                f,
                "no column `{column}` (for a {rust}) in the row; it has: {}",
                if available.is_empty() {
                    "no columns".to_owned()
                } else {
                    available.join(", ")
                }
            ),
            RowProblem::WrongType => write!(
                f,
                "column `{column}` is PostgreSQL type {pg}, which cannot be read as Rust type \
                 {rust}"
            ),
            RowProblem::UnexpectedNull => write!(
                f,
                "column `{column}` (PostgreSQL type {pg}) is NULL, which Rust type {rust} \
                 cannot hold; use Option<{rust}>"
            ),
            RowProblem::Invalid(reason) if rust.is_empty() => {
                write!(f, "column `{column}`: {reason}")
            }
            RowProblem::Invalid(reason) => write!(
                f,
                "column `{column}` (PostgreSQL type {pg}) could not be read as Rust type \
                 {rust}: {reason}"
            ),
        }
    }
}

impl std::error::Error for RowError {}

/// `core::option::Option<alloc::string::String>` → `Option<String>`.
fn short_type_name(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    let mut chars = full.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            segment.clear();
        } else if c.is_alphanumeric() || c == '_' {
            segment.push(c);
        } else {
            out.push_str(&segment);
            segment.clear();
            out.push(c);
        }
    }
    out.push_str(&segment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_lose_their_paths() {
        assert_eq!(
            short_type_name("core::option::Option<alloc::string::String>"),
            "Option<String>"
        );
        assert_eq!(short_type_name("i64"), "i64");
        assert_eq!(
            short_type_name("alloc::vec::Vec<(i32, &str)>"),
            "Vec<(i32, &str)>"
        );
    }
}
